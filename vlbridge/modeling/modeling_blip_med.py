"""BLIP's multimodal mixture of encoder-decoder (MED) and its pretraining: ITC, ITM and LM (Li et al., 2022).

The model is BLIP's: a vision tower (BLIP's ViT by default, any `AutoModel` vision tower), transformers'
`BlipTextModel` as the text encoder (text-only for ITC; image-grounded through cross-attention to every image patch,
with `[ENC]` first, for ITM) and `BlipTextLMHeadModel` as the image-grounded causal decoder (`[DEC]` first, LM loss
and captioning). In pretraining the decoder shares every parameter of the encoder except self-attention
(`share_encoder_decoder`): one tensor, declared to transformers as tied weights, so that it is saved once and tied
again on loading.

The losses are those of BLIP-2's stage-1 model, from one module ([`ImageTextPretrainingMixin`]): ITC between the
projected image `[CLS]` and text `[CLS]` (the one-query case of BLIP-2's best-query similarity), ALBEF / BLIP
momentum distillation with feature queues (on by default, as BLIP), ITM with hard negatives drawn from the ITC
similarities, and the label-smoothed LM loss (named ITG, as stage 1's image-grounded generation). The Trainer, the
exact gradient accumulation, the held-out evaluation and CapFilt take either model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, PreTrainedModel
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel, BlipTextModel

from ..configuration.configuration_blip_med import BlipMEDConfig
from .bridge_utils import check_pixel_values
from .freezing import FrozenVisionTowerMixin
from .qformer_captioning import captioning_generation_config
from .saving import SelfDescribingMixin
from .stage1_objectives import ImageTextPretrainingMixin, ImageTextPretrainingOutput


# Submodules that get an exponential-moving-average copy, "<name>_m", under momentum distillation (and the vision
# tower when it trains), as BLIP's `visual_encoder_m`, `vision_proj_m`, `text_encoder_m`, `text_proj_m`.
MOMENTUM_MODULES = ("text_encoder", "vision_proj", "text_proj")

# The parameters of a BERT text tower that the decoder keeps its own under sharing: each layer's self-attention
# (`attention`: query / key / value and its output dense + LayerNorm). BLIP ties everything else.
_SELF_ATTENTION = re.compile(r"(^|\.)encoder\.layer\.\d+\.attention\.")


def shared_encoder_decoder_keys(
    encoder: nn.Module, encoder_prefix: str = "text_encoder", decoder_prefix: str = "text_decoder.bert"
) -> dict[str, str]:
    """
    `{decoder parameter: encoder parameter}` for BLIP's encoder-decoder sharing: every parameter of the text encoder
    (embeddings, cross-attention, feed-forward) except self-attention, as transformers' `_tied_weights_keys` spells
    ties (target: source).

    Example:

    ```python
    >>> from transformers import BlipTextConfig
    >>> from transformers.models.blip.modeling_blip_text import BlipTextModel
    >>> from vlbridge.modeling.modeling_blip_med import shared_encoder_decoder_keys
    >>> encoder = BlipTextModel(
    ...     BlipTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
    ...                    vocab_size=50, encoder_hidden_size=16),
    ...     add_pooling_layer=False,
    ... )
    >>> keys = shared_encoder_decoder_keys(encoder)
    >>> keys["text_decoder.bert.encoder.layer.0.crossattention.self.query.weight"]
    'text_encoder.encoder.layer.0.crossattention.self.query.weight'
    >>> any(".attention." in target for target in keys)
    False
    ```
    """
    return {
        f"{decoder_prefix}.{name}": f"{encoder_prefix}.{name}"
        for name, _ in encoder.named_parameters()
        if not _SELF_ATTENTION.search(name)
    }


def _resolve_tie_chains(tied: dict[str, str]) -> dict[str, str]:
    """Points every tied target at the parameter that is kept: the decoder's LM head is tied to the decoder's word
    embeddings, themselves tied to the encoder's, so the head's source becomes the encoder's embeddings. Loading then
    finds every source in the checkpoint (the decoder's embeddings are not saved)."""
    resolved = {}
    for target, source in tied.items():
        seen = {target}
        while source in tied and source not in seen:
            seen.add(source)
            source = tied[source]
        resolved[target] = source
    return resolved


@dataclass
class BlipMEDPretrainingOutput(ImageTextPretrainingOutput):
    """
    Output of [`BlipMEDForImageTextPretraining`] (the fields of [`ImageTextPretrainingOutput`]).

    Args:
        loss (`torch.FloatTensor`, *optional*):
            `itc_weight * loss_itc + itm_weight * loss_itm + itg_weight * loss_itg` (the losses computed).
        loss_itc (`torch.FloatTensor`, *optional*):
            Image-text contrastive loss; with momentum distillation, against the momentum features of the batch and
            the queues, with soft targets.
        loss_itm (`torch.FloatTensor`, *optional*):
            Image-text matching loss over `B` positives and `2B` hard negatives.
        loss_itg (`torch.FloatTensor`, *optional*):
            BLIP's LM loss: next-token cross-entropy of the image-grounded decoder, smoothed by
            `config.label_smoothing`.
        logits_per_image, logits_per_text (`torch.FloatTensor` of shape `(batch_size, global_batch_size)`, *optional*):
            ITC logits (cosine / temperature) of each local image (text) against every text (image) of the batch.
        itm_logits (`torch.FloatTensor` of shape `(3 * batch_size, 2)`, *optional*):
            `itm_head` on the `[ENC]` output of the image-grounded encoder, for the positive and hard negative pairs.
        itm_labels (`torch.LongTensor` of shape `(3 * batch_size,)`, *optional*):
            `[1] * batch_size + [0] * 2 * batch_size`.
        itm_accuracy (`torch.FloatTensor`, *optional*):
            Fraction of the ITM pairs classified right (detached).
        itg_logits (`torch.FloatTensor` of shape `(batch_size, text_length, vocab_size)`, *optional*):
            The decoder's next-token logits.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, 1, embed_dim)`, *optional*):
            L2-normalised `vision_proj` of the image `[CLS]`.
        text_embeds (`torch.FloatTensor` of shape `(batch_size, embed_dim)`, *optional*):
            L2-normalised `text_proj` of the text `[CLS]`.
        temperature (`torch.FloatTensor`, *optional*):
            The (clamped) ITC temperature (detached).
    """


class BlipMEDForImageTextPretraining(
    SelfDescribingMixin, FrozenVisionTowerMixin, ImageTextPretrainingMixin, PreTrainedModel
):
    r"""
    BLIP's pretraining model: a vision tower, the text encoder `text_encoder` (transformers' `BlipTextModel`, with
    cross-attention layers), the image-grounded decoder `text_decoder` (`BlipTextLMHeadModel`), and the heads of its
    three objectives:

    - **ITC**: `vision_proj` of the image `[CLS]` against `text_proj` of the text `[CLS]` of a text-only encoder pass,
      divided by the learned temperature `temp`, with momentum distillation and feature queues (ALBEF / BLIP).
    - **ITM**: `itm_head` on the first output of the image-grounded encoder (first token replaced by
      `enc_token_id`), for every positive pair and one hard negative text per image and image per text.
    - **LM** (`loss_itg`): the decoder's next-token cross-entropy (first token replaced by `decoder_start_token_id`,
      label smoothing `config.label_smoothing`).

    With `share_encoder_decoder=True` the decoder's embeddings, cross-attention and feed-forward layers are the
    encoder's tensors (declared to transformers as tied weights: saved once, tied again by `from_pretrained`), and
    each decoder layer keeps its own self-attention. `with_text_encoder=False` builds a captioner alone,
    `with_text_decoder=False` a matcher alone. The vision tower trains by default (`freeze_vision_tower`).

    Args:
        config ([`BlipMEDConfig`]):
            The vision and text configs, loss weights, special tokens and distillation settings.

    Example:

    ```python
    >>> import torch
    >>> from vlbridge import BlipMEDConfig, BlipMEDForImageTextPretraining
    >>> config = BlipMEDConfig(
    ...     vision_config={"model_type": "blip_vision_model", "hidden_size": 32, "intermediate_size": 64,
    ...                    "num_hidden_layers": 1, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
    ...     text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    ...                  "vocab_size": 100, "max_position_embeddings": 32, "bos_token_id": 98, "sep_token_id": 3},
    ...     embed_dim=16, decoder_start_token_id=98, enc_token_id=99, eos_token_id=3, pad_token_id=0, queue_size=8,
    ... )
    >>> model = BlipMEDForImageTextPretraining(config)
    >>> input_ids = torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]])
    >>> out = model(pixel_values=torch.randn(2, 3, 32, 32), input_ids=input_ids, attention_mask=input_ids != 0)
    >>> out.logits_per_image.shape, out.itm_logits.shape, out.itg_logits.shape
    (torch.Size([2, 2]), torch.Size([6, 2]), torch.Size([2, 4, 100]))
    >>> sorted(k for k in out.keys() if k.startswith("loss"))
    ['loss', 'loss_itc', 'loss_itg', 'loss_itm']
    >>> decoder_layer = model.text_decoder.bert.encoder.layer[0]
    >>> decoder_layer.output.dense.weight is model.text_encoder.encoder.layer[0].output.dense.weight
    True
    >>> decoder_layer.attention.self.query.weight is model.text_encoder.encoder.layer[0].attention.self.query.weight
    False
    >>> model.generate_captions(torch.randn(2, 3, 32, 32), max_new_tokens=5).shape[0]
    2
    ```
    """

    config: BlipMEDConfig
    config_class = BlipMEDConfig
    base_model_prefix = "blip_med"  # no such submodule: loading never adds or strips a prefix
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["BlipTextLayer", "BlipTextEmbeddings", "BlipEncoderLayer"]
    # The small heads, the temperature and the queues stay fp32 when the towers are loaded in bf16 / fp16; the
    # features are cast to them at their boundaries.
    _keep_in_fp32_modules_strict = [
        "vision_proj",
        "text_proj",
        "itm_head",
        "vision_proj_m",
        "text_proj_m",
        "temp",
        "image_queue",
        "text_queue",
    ]
    # The Trainer must not assume the loss is already normalised for gradient accumulation (hf_stack_internals §6).
    accepts_loss_kwargs = False
    _momentum_modules = MOMENTUM_MODULES
    _output_class = BlipMEDPretrainingOutput

    def __init__(self, config: BlipMEDConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        vision_width, text_width = config.vision_config.hidden_size, config.text_config.hidden_size
        if config.with_text_encoder:
            self.text_encoder = BlipTextModel(config.text_config, add_pooling_layer=False)
            self.vision_proj = nn.Linear(vision_width, config.embed_dim)
            self.text_proj = nn.Linear(text_width, config.embed_dim)
            self.itm_head = nn.Linear(text_width, 2)
        if config.with_text_decoder:
            self.text_decoder = BlipTextLMHeadModel(config.text_config)
        self.temp = nn.Parameter(torch.tensor(config.temperature_init))
        if self.uses_momentum_distillation:
            self._build_momentum_state()
        # Instance-level, as it depends on the config; `post_init` expands it into `all_tied_weights_keys`, which
        # `from_pretrained` ties after loading and `save_pretrained` uses to save each shared tensor once.
        self._tied_weights_keys = (
            shared_encoder_decoder_keys(self.text_encoder) if config.share_encoder_decoder else {}
        )
        # A frozen tower also stays in eval mode, whatever train() is called with (FrozenVisionTowerMixin).
        self._frozen_vision_tower = config.freeze_vision_tower
        self._freeze_fixed_parts()
        self.post_init()
        for name in ("vision_proj", "text_proj", "itm_head", "vision_proj_m", "text_proj_m"):
            if hasattr(self, name):
                getattr(self, name).float()  # fp32 even under a bf16 / fp16 default dtype (see above)
        self.temp.data = self.temp.data.float()
        if self.uses_momentum_distillation:
            self.copy_params()
        self.train(self.training)

    def _build_momentum_state(self):
        config = self.config
        self.text_encoder_m = BlipTextModel(config.text_config, add_pooling_layer=False)
        self.vision_proj_m = nn.Linear(config.vision_config.hidden_size, config.embed_dim)
        self.text_proj_m = nn.Linear(config.text_config.hidden_size, config.embed_dim)
        if not config.freeze_vision_tower:
            self.vision_tower_m = AutoModel.from_config(config.vision_config)
        self._build_queues()  # one image feature (the projected [CLS]) per image: (K, 1, E)

    # ----------------------------------------------------------------------------------------------------------------
    # Tied weights: the encoder-decoder sharing, whatever `tie_word_embeddings` says
    # ----------------------------------------------------------------------------------------------------------------

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        if not all_submodels:
            # The parent class returns nothing when `tie_word_embeddings` is false; the sharing is
            # `share_encoder_decoder`'s, and the decoder's own LM-head tie is its text config's.
            return dict(self._tied_weights_keys or {})
        return _resolve_tie_chains(super().get_expanded_tied_weights_keys(all_submodels=True))

    def post_init(self):
        super().post_init()
        self.all_tied_weights_keys = _resolve_tie_chains(self.all_tied_weights_keys)

    # ----------------------------------------------------------------------------------------------------------------
    # What the model can do, embeddings
    # ----------------------------------------------------------------------------------------------------------------

    @property
    def supports_captioning(self) -> bool:
        """Whether [`generate_captions`] can write captions (a text decoder and a decoder start token)."""
        return hasattr(self, "text_decoder") and self.config.decoder_start_token_id is not None

    @property
    def supports_matching(self) -> bool:
        """Whether `compute_itm_logits` scores (image, text) pairs and ITC embeds them (a text encoder)."""
        return hasattr(self, "text_encoder")

    @property
    def uses_momentum_distillation(self) -> bool:
        """Momentum distillation softens ITC targets: on when the config asks for it and there is a text encoder."""
        return bool(self.config.use_momentum_distillation and self.config.with_text_encoder)

    @property
    def _num_image_features(self) -> int:
        return 1

    @property
    def itc_label_smoothing(self) -> float:
        """BLIP smooths the LM loss (`config.label_smoothing`), not ITC (`config.itc_label_smoothing`, 0)."""
        return self.config.itc_label_smoothing

    def _text_towers(self) -> list[PreTrainedModel]:
        return [getattr(self, name) for name in ("text_encoder", "text_decoder") if hasattr(self, name)]

    def get_input_embeddings(self) -> nn.Embedding:
        return self._text_towers()[0].get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding):
        for tower in self._text_towers():  # shared or not, one vocabulary
            tower.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear | None:
        return self.text_decoder.get_output_embeddings() if hasattr(self, "text_decoder") else None

    def set_output_embeddings(self, value: nn.Linear):
        self.text_decoder.set_output_embeddings(value)

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """Resizes the vocabulary of every text tower (encoder, decoder and its LM head, the momentum encoder, which
        copies the encoder's new rows) and ties the shared weights again."""
        for tower in self._text_towers():
            tower.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        embeddings = self.get_input_embeddings()
        if hasattr(self, "text_encoder_m"):
            self.text_encoder_m.resize_token_embeddings(embeddings.num_embeddings, mean_resizing=False)
            with torch.no_grad():
                self.text_encoder_m.get_input_embeddings().weight.copy_(embeddings.weight)
        self.config.text_config.vocab_size = embeddings.num_embeddings
        self.tie_weights()
        return self.get_input_embeddings()

    # ----------------------------------------------------------------------------------------------------------------
    # The passes (the hooks of ImageTextPretrainingMixin) and features
    # ----------------------------------------------------------------------------------------------------------------

    def _require(self, name: str, purpose: str) -> nn.Module:
        if not hasattr(self, name):
            flag = "with_text_encoder" if name == "text_encoder" else "with_text_decoder"
            raise ValueError(f"{purpose} needs the {name}, which this model does not have ({flag}=False).")
        return getattr(self, name)

    def _unimodal_features(self, image_embeds, input_ids, attention_mask, momentum: bool = False):
        """ITC embeddings: `vision_proj` of the image `[CLS]` `(B, 1, E)` and `text_proj` of the `[CLS]` of a
        text-only encoder pass `(B, E)`, L2-normalised (the momentum copies with `momentum=True`)."""
        self._require("text_encoder", "ITC")
        suffix = "_m" if momentum else ""
        text_encoder, vision_proj, text_proj = (getattr(self, f"{name}{suffix}") for name in MOMENTUM_MODULES)
        image_feats = F.normalize(vision_proj(image_embeds[:, :1].to(vision_proj.weight.dtype)), dim=-1)  # (B, 1, E)
        hidden = text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        text_feat = F.normalize(text_proj(hidden[:, 0].to(text_proj.weight.dtype)), dim=-1)  # (B, E)
        return image_feats, text_feat

    def compute_itm_logits(
        self, image_embeds: torch.FloatTensor, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> torch.FloatTensor:
        """ITM logits `(B, 2)` of the pairs (image `i`, text `i`): `itm_head` on the first output of the encoder
        reading the text (first token replaced by `enc_token_id`) with cross-attention to the image features
        `(B, P, Dv)` from [`get_vision_features`]. Index 1 is "match"."""
        text_encoder = self._require("text_encoder", "ITM")
        if image_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"ITM pairs image i with text i: got {image_embeds.shape[0]} images and {input_ids.shape[0]} texts."
            )
        if self.config.enc_token_id is not None:
            input_ids = input_ids.clone()
            input_ids[:, 0] = self.config.enc_token_id
        hidden = text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds.to(text_encoder.dtype),
        ).last_hidden_state  # (B, T, H)
        return self.itm_head(hidden[:, 0].to(self.itm_head.weight.dtype))

    def compute_itg_logits(
        self,
        image_embeds: torch.FloatTensor,
        decoder_input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.FloatTensor:
        """The decoder's next-token logits `(B, T, vocab_size)` for `decoder_input_ids` (`[DEC]` first), reading the
        image features `(B, P, Dv)` through cross-attention."""
        text_decoder = self._require("text_decoder", "The LM loss (ITG) and captioning")
        return text_decoder(
            input_ids=decoder_input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds.to(text_decoder.dtype),
            use_cache=False,
        ).logits

    def _vision_embeds(self, pixel_values, image_embeds) -> torch.FloatTensor:
        if image_embeds is not None:
            return image_embeds
        if pixel_values is None:
            raise ValueError(
                "Pass pixel_values (from the image processor) or image_embeds (from get_vision_features)."
            )
        return self.get_vision_features(check_pixel_values(pixel_values))  # (B, P, Dv)

    def get_image_features(
        self, pixel_values: torch.FloatTensor | None = None, image_embeds: torch.FloatTensor | None = None
    ) -> torch.FloatTensor:
        """ITC image embeddings `(B, 1, embed_dim)`: L2-normalised `vision_proj` of the image `[CLS]` (one "query",
        so that retrieval treats BLIP and BLIP-2 alike). Pass `pixel_values`, or the vision features `image_embeds`
        from [`get_vision_features`]."""
        self._require("text_encoder", "ITC image embeddings")
        embeds = self._vision_embeds(pixel_values, image_embeds)
        return F.normalize(self.vision_proj(embeds[:, :1].to(self.vision_proj.weight.dtype)), dim=-1)

    def get_text_features(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> torch.FloatTensor:
        """ITC text embeddings `(B, embed_dim)`: L2-normalised `text_proj` of the `[CLS]` output of a text-only
        encoder pass."""
        text_encoder = self._require("text_encoder", "ITC text embeddings")
        hidden = text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.text_proj(hidden[:, 0].to(self.text_proj.weight.dtype)), dim=-1)

    # ----------------------------------------------------------------------------------------------------------------
    # Captioning
    # ----------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_captions(
        self,
        pixel_values: torch.FloatTensor,
        max_new_tokens: int = 30,
        num_beams: int = 1,
        do_sample: bool = False,
        top_p: float | None = None,
        temperature: float | None = None,
        repetition_penalty: float | None = None,
        min_new_tokens: int | None = None,
        num_return_sequences: int = 1,
        prompt_ids: torch.LongTensor | list[int] | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """
        Captions with the image-grounded decoder through transformers' `generate` (`text_decoder.generate` with the
        image features as `encoder_hidden_states`, repeated for beams and samples by `generate`): greedy by default,
        beam search with `num_beams`, nucleus sampling with `do_sample=True, top_p=0.9` (BLIP's CapFilt). Starts
        from `decoder_start_token_id` (then `prompt_ids`), stops at `eos_token_id`. The decoder keeps a KV cache, its
        cross-attention keys / values computed once (`use_cache=False` re-runs the whole prefix each step, with the
        same result).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                The images.
            max_new_tokens (`int`, *optional*, defaults to 30):
                Longest caption, EOS included (capped by the text config's `max_position_embeddings`).
            num_beams (`int`, *optional*, defaults to 1):
                Beam search with this many beams when above 1.
            do_sample (`bool`, *optional*, defaults to `False`):
                Sample instead of searching (seed with `torch.manual_seed` for reproducible captions).
            top_p, temperature, repetition_penalty (`float`, *optional*):
                Nucleus mass, softmax temperature and repetition penalty, as in `GenerationConfig`.
            min_new_tokens (`int`, *optional*):
                At least this many tokens before the EOS (which is forbidden until then).
            num_return_sequences (`int`, *optional*, defaults to 1):
                Captions per image (at most `num_beams` for beam search), consecutive rows.
            prompt_ids (`torch.LongTensor` or `list[int]`, *optional*):
                A text prompt for every image, as ids without special tokens (BLIP's captioner was fine-tuned with
                "a picture of "); it follows the start token and is not returned.
            generate_kwargs:
                Anything else `generate` takes (`top_k`, `length_penalty`, `no_repeat_ngram_size`, `use_cache`, ...).

        Returns:
            `torch.LongTensor` of shape `(batch_size * num_return_sequences, length)`: the generated ids after the
            decoder start token (and the prompt), each row ending at its EOS and padded with `pad_token_id` after it.
        """
        if not self.supports_captioning:
            raise ValueError(
                "Captioning needs the text decoder (with_text_decoder=True) and config.decoder_start_token_id ([DEC])."
            )
        image_embeds = self.get_vision_features(check_pixel_values(pixel_values))  # (B, P, Dv)
        batch_size, device = image_embeds.shape[0], image_embeds.device
        start = torch.full((batch_size, 1), self.config.decoder_start_token_id, dtype=torch.long, device=device)
        if prompt_ids is not None:
            prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).view(1, -1)
            start = torch.cat([start, prompt.expand(batch_size, -1)], dim=1)  # (B, 1 + prompt)
        room = self.config.text_config.max_position_embeddings - start.shape[1]
        options = {
            "top_p": top_p,
            "temperature": temperature,
            "repetition_penalty": repetition_penalty,
            "min_new_tokens": min_new_tokens,
        }
        # One generation config holds every generation option (passing one with loose options is deprecated); what
        # it does not know goes to the decoder's forward.
        generation_config = captioning_generation_config(
            self.config,
            max_new_tokens=min(max_new_tokens, room),
            num_beams=num_beams,
            do_sample=do_sample,
            num_return_sequences=num_return_sequences,
            **{key: value for key, value in options.items() if value is not None},
        )
        model_kwargs = generation_config.update(**generate_kwargs)
        generated = self.text_decoder.generate(
            input_ids=start,
            attention_mask=torch.ones_like(start),
            encoder_hidden_states=image_embeds.to(self.text_decoder.dtype),
            generation_config=generation_config,
            **model_kwargs,
        )
        return generated[:, start.shape[1] :]


__all__ = ["BlipMEDForImageTextPretraining", "BlipMEDPretrainingOutput", "shared_encoder_decoder_keys"]
