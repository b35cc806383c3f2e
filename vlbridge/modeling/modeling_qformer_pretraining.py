"""BLIP-2 stage 1 in the HF stack: vision tower + Q-Former trained with ITC, ITM and ITG (LAVIS `Blip2Qformer`).

transformers ships no stage-1 losses (its `Blip2ForImageTextRetrieval` has heads but computes no loss), so this
module implements them as LAVIS does, with the gathers and loss functions in `stage1_losses.py`. Differences from
LAVIS, each deliberate:

- ITC gathers features *with* gradient ([`AllGatherWithGrad`]) where LAVIS gathers without, so the gradient equals
  that of one process holding the whole global batch. With one process the two are identical.
- ITG re-runs the queries beside the text under the multimodal-causal mask instead of reusing their KV cache: queries
  never see the text under that mask, so the numbers are the same.
- The temperature is clamped to `[temperature_min, temperature_max]` (ALBEF / BLIP; LAVIS' BLIP-2 never clamps).
- No `ln_vision`: the Q-Former reads the vision tower's output exactly as the stage-2 VLM's bridge does, so the
  trained Q-Former drops into [`BridgeVLMForConditionalGeneration`] ([`load_qformer_into_vlm`]).
- Optional ALBEF / BLIP momentum distillation (`use_momentum_distillation`), which BLIP-2 itself does not use.
- The Q-Former's cross-attention keys / values of each image are projected once per step and shared by the ITC, ITM
  and ITG passes (ITM's pairs index them; `reuse_image_key_values`), where LAVIS projects them in every pass (5B
  images per step): the same losses and gradients with fewer FLOPs.

The orchestration of the losses and of momentum distillation is shared with BLIP's MED model
([`ImageTextPretrainingMixin`] in `stage1_objectives.py`); this module holds what is the Q-Former's: its passes
(the hooks the mixin calls), its heads and its captioner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, PreTrainedModel
from transformers.activations import ACT2FN

from ..configuration.configuration_qformer import QFormerConfig
from ..configuration.configuration_qformer_pretraining import QFormerPretrainingConfig
from .bridge_utils import check_pixel_values
from .freezing import FrozenVisionTowerMixin
from .modeling_qformer import ImageKeyValues, QFormerModel
from .qformer_captioning import QFormerCaptioner
from .qformer_features import QFormerFeaturesMixin
from .saving import SelfDescribingMixin
from .stage1_objectives import ImageTextPretrainingMixin, ImageTextPretrainingOutput


# Submodules that get an exponential-moving-average copy, "<name>_m", under momentum distillation.
MOMENTUM_MODULES = ("qformer", "vision_proj", "text_proj")


@dataclass
class QFormerPretrainingOutput(ImageTextPretrainingOutput):
    """
    Output of [`QFormerForImageTextPretraining`].

    Args:
        loss (`torch.FloatTensor`, *optional*):
            `itc_weight * loss_itc + itm_weight * loss_itm + itg_weight * loss_itg` (the losses computed).
        loss_itc (`torch.FloatTensor`, *optional*):
            Image-text contrastive loss (symmetric, label-smoothed, negatives from every process).
        loss_itm (`torch.FloatTensor`, *optional*):
            Image-text matching loss over `B` positives and `2B` hard negatives.
        loss_itg (`torch.FloatTensor`, *optional*):
            Image-grounded text generation loss (next-token cross-entropy, label-smoothed).
        logits_per_image (`torch.FloatTensor` of shape `(batch_size, global_batch_size)`):
            ITC logits (max over queries of the cosine, divided by the temperature) of each local image against every
            text of the global batch; `(batch_size, batch_size)` local logits when `return_loss=False`.
        logits_per_text (`torch.FloatTensor` of shape `(batch_size, global_batch_size)`):
            The same for each local text against every image.
        itm_logits (`torch.FloatTensor` of shape `(3 * batch_size, 2)`, *optional*):
            ITM logits (averaged over queries) of the pairs `[positives; text with hard negative image; image with
            hard negative text]`.
        itm_labels (`torch.LongTensor` of shape `(3 * batch_size,)`, *optional*):
            `[1] * batch_size + [0] * 2 * batch_size`.
        itm_accuracy (`torch.FloatTensor`, *optional*):
            Fraction of the ITM pairs classified right (detached; for logging).
        itg_logits (`torch.FloatTensor` of shape `(batch_size, text_length, vocab_size)`, *optional*):
            Next-token logits at the text positions of the ITG pass.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, num_query_tokens, embed_dim)`):
            L2-normalised projected query outputs.
        text_embeds (`torch.FloatTensor` of shape `(batch_size, embed_dim)`):
            L2-normalised projected text `[CLS]` outputs.
        temperature (`torch.FloatTensor`):
            The (clamped) ITC temperature used (detached; for logging).
    """


class QFormerLMHead(nn.Module):
    """BERT's prediction head (dense, activation, LayerNorm, then a vocabulary decoder tied to the word embeddings)."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.LayerNorm(self.transform_act_fn(self.dense(hidden_states))))


class QFormerForImageTextPretraining(
    SelfDescribingMixin, FrozenVisionTowerMixin, QFormerFeaturesMixin, ImageTextPretrainingMixin, PreTrainedModel
):
    r"""
    BLIP-2's stage-1 model: a vision tower (frozen and in eval mode by default), a [`QFormerModel`] with its text
    branch, and the heads of its three objectives:

    - **ITC**: `vision_proj` of the query outputs against `text_proj` of the text `[CLS]` (one uni-modal pass),
      best query per pair, divided by the learned temperature `temp`; negatives from every process, captions of
      the same image (`image_ids`) never negatives of each other.
    - **ITM**: `itm_head` on the query outputs of a bidirectional queries+text pass, for every positive pair and one
      hard negative text per image and image per text, sampled from the ITC similarities.
    - **ITG**: `lm_head` (BERT's prediction head, tied to the word embeddings) on the text positions of a
      multimodal-causal pass whose first text token is `decoder_start_token_id`.

    With `use_momentum_distillation=True` the ITC targets mix in the predictions of momentum (EMA) copies of
    `qformer`, `vision_proj`, `text_proj` (and of the vision tower when it trains), and feature queues add
    negatives (ALBEF / BLIP). The momentum copies and queues are saved with the model, so resuming training from a
    checkpoint restores them; loading a checkpoint without them copies the loaded weights into them.

    Stage 2: `model.qformer` is a plain [`QFormerModel`]; save it with `model.qformer.save_pretrained(path)` and
    build the VLM's bridge from it, or copy it into a VLM with [`load_qformer_into_vlm`].

    Args:
        config ([`QFormerPretrainingConfig`]):
            The vision tower and Q-Former configs, loss weights and distillation settings.

    Example:

    ```python
    >>> import torch
    >>> from vlbridge import QFormerForImageTextPretraining, QFormerPretrainingConfig
    >>> config = QFormerPretrainingConfig(
    ...     vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
    ...                    "num_hidden_layers": 1, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
    ...     qformer_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    ...                     "intermediate_size": 64, "num_query_tokens": 4, "vocab_size": 100},
    ...     embed_dim=16, decoder_start_token_id=1, eos_token_id=3, pad_token_id=0,
    ... )
    >>> model = QFormerForImageTextPretraining(config)
    >>> input_ids = torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]])
    >>> out = model(pixel_values=torch.randn(2, 3, 32, 32), input_ids=input_ids, attention_mask=input_ids != 0)
    >>> out.logits_per_image.shape, out.itm_logits.shape, out.itg_logits.shape
    (torch.Size([2, 2]), torch.Size([6, 2]), torch.Size([2, 4, 100]))
    >>> sorted(k for k in out.keys() if k.startswith("loss"))
    ['loss', 'loss_itc', 'loss_itg', 'loss_itm']
    >>> model.generate_captions(torch.randn(2, 3, 32, 32), max_new_tokens=5).shape[0]
    2
    ```
    """

    config: QFormerPretrainingConfig
    config_class = QFormerPretrainingConfig
    base_model_prefix = "qformer"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _supports_flash_attn = False  # the Q-Former stays fp32
    _no_split_modules = ["QFormerLayer", "QFormerEmbeddings"]
    _tied_weights_keys = {"lm_head.decoder.weight": "qformer.embeddings.word_embeddings.weight"}
    # Everything that trains stays fp32 when the model is loaded in bf16 / fp16; only the vision tower follows `dtype`.
    _keep_in_fp32_modules_strict = [
        "qformer",
        "vision_proj",
        "text_proj",
        "itm_head",
        "lm_head",
        "temp",
        "image_queue",
        "text_queue",
    ]
    # The Trainer must not assume the loss is already normalised for gradient accumulation (hf_stack_internals §6).
    accepts_loss_kwargs = False
    _momentum_modules = MOMENTUM_MODULES
    _output_class = QFormerPretrainingOutput

    def __init__(self, config: QFormerPretrainingConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.qformer = QFormerModel._from_config(config.qformer_config)
        hidden_size = config.qformer_config.hidden_size
        self.vision_proj = nn.Linear(hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(hidden_size, 2)
        self.lm_head = QFormerLMHead(config.qformer_config)
        self.temp = nn.Parameter(torch.tensor(config.temperature_init))
        if config.use_momentum_distillation:
            self._build_momentum_state()
        # A frozen tower also stays in eval mode, whatever train() is called with (FrozenVisionTowerMixin).
        self._frozen_vision_tower = config.freeze_vision_tower
        self._freeze_fixed_parts()
        self.post_init()
        # fp32 even when built under a bf16 / fp16 default dtype: the bridge trains in fp32, cast at its boundaries.
        for name, _ in self._trainable_parts():
            getattr(self, name).float()
        self.temp.data = self.temp.data.float()
        if config.use_momentum_distillation:
            self.copy_params()
        self.train(self.training)

    def _trainable_parts(self) -> list[tuple[str, nn.Module]]:
        names = ("qformer", "vision_proj", "text_proj", "itm_head", "lm_head") + tuple(
            f"{name}_m" for name in MOMENTUM_MODULES if hasattr(self, f"{name}_m")
        )
        return [(name, getattr(self, name)) for name in names]

    def _build_momentum_state(self):
        config = self.config
        hidden_size = config.qformer_config.hidden_size
        self.qformer_m = QFormerModel._from_config(config.qformer_config)
        self.vision_proj_m = nn.Linear(hidden_size, config.embed_dim)
        self.text_proj_m = nn.Linear(hidden_size, config.embed_dim)
        if not config.freeze_vision_tower:
            self.vision_tower_m = AutoModel.from_config(config.vision_config)
        self._build_queues()  # every query's momentum feature per image: (K, num_query_tokens, E)

    @property
    def _num_image_features(self) -> int:
        return self.config.qformer_config.num_query_tokens

    @property
    def itc_label_smoothing(self) -> float:
        """BLIP-2 smooths ITC and ITG alike (`config.label_smoothing`)."""
        return self.config.label_smoothing

    @property
    def supports_captioning(self) -> bool:
        """Whether [`generate_captions`] can write captions (an ITG head and a decoder start token)."""
        return self.config.decoder_start_token_id is not None

    @property
    def supports_matching(self) -> bool:
        """Whether `compute_itm_logits` scores (image, text) pairs (every stage-1 model has its ITM head)."""
        return True

    def get_input_embeddings(self) -> nn.Embedding:
        return self.qformer.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding):
        self.qformer.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    def set_output_embeddings(self, value: nn.Linear):
        self.lm_head.decoder = value

    def resize_token_embeddings(self, new_num_tokens: int | None = None, *args, **kwargs) -> nn.Embedding:
        """Resizes the Q-Former's word embeddings and the tied ITG decoder (e.g. after adding `[DEC]`), and the
        momentum Q-Former's embeddings with them."""
        embeddings = super().resize_token_embeddings(new_num_tokens, *args, **kwargs)
        if hasattr(self, "qformer_m"):
            self.qformer_m.resize_token_embeddings(embeddings.num_embeddings, mean_resizing=False)
            with torch.no_grad():
                self.qformer_m.get_input_embeddings().weight.copy_(embeddings.weight)
        return embeddings

    # ----------------------------------------------------------------------------------------------------------------
    # Features (`get_image_features`, `get_text_features`, `compute_itm_logits` and `extract_features` come from
    # `QFormerFeaturesMixin`, in qformer_features.py; `forward`, the losses and momentum distillation from
    # `ImageTextPretrainingMixin`, in stage1_objectives.py)
    # ----------------------------------------------------------------------------------------------------------------

    def compute_itg_logits(
        self,
        image_embeds: torch.FloatTensor | None,
        decoder_input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        image_key_values: ImageKeyValues | None = None,
    ) -> torch.FloatTensor:
        """Next-token logits `(B, T, vocab_size)` at the text positions of a multimodal-causal pass (text reads every
        query and the text up to itself; queries read the image, never the text). The images are the vision features
        `image_embeds` `(B, P, Dv)` or, with `image_embeds=None`, their cross-attention keys / values."""
        hidden = self.qformer(
            image_embeds=image_embeds,
            input_ids=decoder_input_ids,
            attention_mask=attention_mask,
            attention_mode="multimodal_causal",
            image_key_values=image_key_values,
        ).last_hidden_state
        return self.lm_head(hidden[:, self.config.qformer_config.num_query_tokens :])  # (B, T, V)

    def _image_key_values(self, image_embeds: torch.FloatTensor) -> ImageKeyValues | None:
        """The Q-Former's cross-attention keys / values of `image_embeds` `(B, P, Dv)`, projected once per training
        step for ITC, ITM and ITG (`config.reuse_image_key_values`); `None` makes each pass project its own."""
        if not self.config.reuse_image_key_values:
            return None
        return self.qformer.image_key_values(image_embeds)

    def _unimodal_features(
        self, image_embeds, input_ids, attention_mask, momentum: bool = False, image_key_values=None
    ):
        """Image and text ITC embeddings from one `unimodal` pass (queries and text never see each other, which is
        LAVIS' two separate passes in one). `image_key_values` (the model's, never the momentum model's) stand in for
        `image_embeds` (then `None`)."""
        suffix = "_m" if momentum else ""
        qformer, vision_proj, text_proj = (getattr(self, f"{name}{suffix}") for name in MOMENTUM_MODULES)
        hidden = qformer(
            image_embeds=image_embeds,
            input_ids=input_ids,
            attention_mask=attention_mask,
            attention_mode="unimodal",
            image_key_values=image_key_values,
        ).last_hidden_state  # (B, Q + T, H)
        num_queries = self.config.qformer_config.num_query_tokens
        image_feats = F.normalize(vision_proj(hidden[:, :num_queries]), dim=-1)  # (B, Q, E)
        text_feat = F.normalize(text_proj(hidden[:, num_queries]), dim=-1)  # (B, E), the [CLS] position
        return image_feats, text_feat

    # ----------------------------------------------------------------------------------------------------------------
    # Captioning, BERT initialisation
    # ----------------------------------------------------------------------------------------------------------------

    def get_captioner(self) -> QFormerCaptioner:
        """The ITG decoder as a [`QFormerCaptioner`] (a `GenerationMixin` model) sharing this model's `qformer` and
        `lm_head`: call its `generate(input_ids, image_embeds=...)` for anything `generate_captions` does not expose.
        Built on each call and never registered as a submodule, so it adds nothing to the state dict."""
        return QFormerCaptioner(self.config, self.qformer, self.lm_head)

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
        **generate_kwargs,
    ) -> torch.LongTensor:
        """
        Captions with the ITG head through transformers' `generate` ([`QFormerCaptioner`]): greedy by default, beam
        search with `num_beams`, nucleus sampling with `do_sample=True, top_p=0.9` (BLIP's CapFilt). Starts from
        `decoder_start_token_id`, stops at `eos_token_id`. The Q-Former keeps a KV cache (`use_cache=False` in
        `generate_kwargs` re-runs the whole prefix each step, with the same result).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                The images.
            max_new_tokens (`int`, *optional*, defaults to 30):
                Longest caption, EOS included (capped by the Q-Former's `max_position_embeddings`).
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
            generate_kwargs:
                Anything else `generate` takes (`top_k`, `length_penalty`, `no_repeat_ngram_size`, `use_cache`, ...).

        Returns:
            `torch.LongTensor` of shape `(batch_size * num_return_sequences, length)`: the generated ids after the
            decoder start token, each row ending at its EOS and padded with `pad_token_id` after it.
        """
        captioner = self.get_captioner()
        image_embeds = self.get_vision_features(check_pixel_values(pixel_values))  # (B, P, Dv)
        batch_size = image_embeds.shape[0]
        start = torch.full((batch_size, 1), self.config.decoder_start_token_id, device=image_embeds.device)
        max_new_tokens = min(max_new_tokens, self.config.qformer_config.max_position_embeddings - 1)
        options = {
            "top_p": top_p,
            "temperature": temperature,
            "repetition_penalty": repetition_penalty,
            "min_new_tokens": min_new_tokens,
        }
        generated = captioner.generate(
            start,
            image_embeds=image_embeds,
            attention_mask=torch.ones_like(start),
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=do_sample,
            num_return_sequences=num_return_sequences,
            **{key: value for key, value in options.items() if value is not None},
            **generate_kwargs,
        )
        return generated[:, 1:]


__all__ = ["QFormerForImageTextPretraining", "QFormerLMHead", "QFormerPretrainingOutput"]
