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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput, logging

from ..configuration.configuration_qformer import QFormerConfig
from ..configuration.configuration_qformer_pretraining import QFormerPretrainingConfig
from . import stage1_losses as losses
from .bridge_utils import check_pixel_values, vision_tower_features
from .freezing import FrozenVisionTowerMixin
from .modeling_qformer import QFormerModel
from .qformer_captioning import QFormerCaptioner
from .qformer_features import QFormerFeaturesMixin
from .saving import SelfDescribingMixin
from .stage1_accumulation import AccumulationWindow, windowed_forward


logger = logging.get_logger(__name__)

# Submodules that get an exponential-moving-average copy, "<name>_m", under momentum distillation.
MOMENTUM_MODULES = ("qformer", "vision_proj", "text_proj")


@dataclass
class QFormerPretrainingOutput(ModelOutput):
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

    loss: torch.FloatTensor | None = None
    loss_itc: torch.FloatTensor | None = None
    loss_itm: torch.FloatTensor | None = None
    loss_itg: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    itm_labels: torch.LongTensor | None = None
    itm_accuracy: torch.FloatTensor | None = None
    itg_logits: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    temperature: torch.FloatTensor | None = None


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
    SelfDescribingMixin, FrozenVisionTowerMixin, QFormerFeaturesMixin, PreTrainedModel
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
        num_queries, size = config.qformer_config.num_query_tokens, config.queue_size
        # Queues hold gathered momentum features of past batches: every query's feature for the images, since ITC
        # takes the best query per pair. The image ids let captions of a queued image count as positives.
        self.register_buffer("image_queue", torch.zeros(size, num_queries, config.embed_dim))  # (K, Q, E)
        self.register_buffer("text_queue", torch.zeros(size, config.embed_dim))  # (K, E)
        self.register_buffer("image_id_queue", torch.full((size,), -1, dtype=torch.long))  # (K,)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("momentum_step", torch.zeros((), dtype=torch.long))  # drives the alpha warm-up

    def _momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        names = MOMENTUM_MODULES + (("vision_tower",) if hasattr(self, "vision_tower_m") else ())
        return [(getattr(self, name), getattr(self, f"{name}_m")) for name in names]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)  # Linear / LayerNorm / Embedding: normal(initializer_range), ones, zeros
        if module is not self:
            return
        init.constant_(self.temp, self.config.temperature_init)
        if self.config.use_momentum_distillation:
            if not getattr(self.image_queue, "_is_hf_initialized", False):
                init.copy_(self.image_queue, F.normalize(torch.randn_like(self.image_queue), dim=-1))
            if not getattr(self.text_queue, "_is_hf_initialized", False):
                init.copy_(self.text_queue, F.normalize(torch.randn_like(self.text_queue), dim=-1))
            init.constant_(self.image_id_queue, -1)
            init.zeros_(self.queue_ptr)
            init.zeros_(self.momentum_step)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """[`~PreTrainedModel.from_pretrained`]; momentum copies missing from the checkpoint start as copies of the
        loaded weights (ALBEF's `copy_params`) instead of random."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        # Loading puts fresh parameters in place, which require grad again: a frozen tower would train.
        model._freeze_fixed_parts()
        prefixes = tuple(f"{name}_m." for name in MOMENTUM_MODULES + ("vision_tower",))
        if model.config.use_momentum_distillation and any(k.startswith(prefixes) for k in info["missing_keys"]):
            logger.warning("The checkpoint has no momentum encoders: initialising them as copies of the model.")
            model.copy_params()
        return (model, info) if want_info else model

    def _freeze_fixed_parts(self) -> None:
        """What never trains: the vision tower when the config freezes it, and the momentum copies (EMA only)."""
        if self.config.freeze_vision_tower:
            self.vision_tower.requires_grad_(False)
        if self.config.use_momentum_distillation:
            for _, model_m in self._momentum_pairs():
                model_m.requires_grad_(False)

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
    # `QFormerFeaturesMixin`, in qformer_features.py)
    # ----------------------------------------------------------------------------------------------------------------

    def get_vision_features(self, pixel_values: torch.FloatTensor, momentum: bool = False) -> torch.FloatTensor:
        """
        Runs the vision tower as the stage-2 VLM does; `(B, C, H, W) -> (B, P, Dv)`, in the tower's dtype. A frozen
        tower builds no autograd graph.
        """
        tower = self.vision_tower_m if momentum else self.vision_tower
        trainable = False if momentum else None  # the momentum copy never gets gradients
        return vision_tower_features(tower, pixel_values, self.config.vision_feature_layer, trainable)

    def compute_itg_logits(
        self,
        image_embeds: torch.FloatTensor,
        decoder_input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.FloatTensor:
        """Next-token logits `(B, T, vocab_size)` at the text positions of a multimodal-causal pass (text reads every
        query and the text up to itself; queries read the image, never the text)."""
        hidden = self.qformer(
            image_embeds=image_embeds,
            input_ids=decoder_input_ids,
            attention_mask=attention_mask,
            attention_mode="multimodal_causal",
        ).last_hidden_state
        return self.lm_head(hidden[:, self.config.qformer_config.num_query_tokens :])  # (B, T, V)

    def _unimodal_features(self, image_embeds, input_ids, attention_mask, momentum: bool = False):
        """Image and text ITC embeddings from one `unimodal` pass (queries and text never see each other, which is
        LAVIS' two separate passes in one)."""
        suffix = "_m" if momentum else ""
        qformer, vision_proj, text_proj = (getattr(self, f"{name}{suffix}") for name in MOMENTUM_MODULES)
        hidden = qformer(
            image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask, attention_mode="unimodal"
        ).last_hidden_state  # (B, Q + T, H)
        num_queries = self.config.qformer_config.num_query_tokens
        image_feats = F.normalize(vision_proj(hidden[:, :num_queries]), dim=-1)  # (B, Q, E)
        text_feat = F.normalize(text_proj(hidden[:, num_queries]), dim=-1)  # (B, E), the [CLS] position
        return image_feats, text_feat

    # ----------------------------------------------------------------------------------------------------------------
    # Forward and losses
    # ----------------------------------------------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        image_ids: torch.LongTensor | None = None,
        return_loss: bool = True,
        sampling_seed: int | None = None,
        itm_negative_hardness: float = 1.0,
        accumulation_window: AccumulationWindow | None = None,
        **kwargs,
    ) -> QFormerPretrainingOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                One image per caption (repeat an image for each of its captions).
            input_ids (`torch.LongTensor` of shape `(batch_size, text_length)`):
                Captions tokenized for the Q-Former, starting with `[CLS]` / BOS (ITG replaces it with
                `decoder_start_token_id`).
            attention_mask (`torch.Tensor` of shape `(batch_size, text_length)`, *optional*):
                Text padding mask; padded positions get no ITG loss.
            image_ids (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Non-negative id of each caption's image. Captions sharing an id are positives of each other in ITC and
                never drawn as ITM negatives; without ids only the pair itself is positive.
            return_loss (`bool`, *optional*, defaults to `True`):
                `False` returns only the local ITC logits and embeddings (no gathering, no ITM / ITG, no momentum
                update).
            sampling_seed (`int`, *optional*):
                Seeds the ITM hard-negative sampling (default: the global RNG). [`Stage1Trainer`] draws one per step.
            itm_negative_hardness (`float`, *optional*, defaults to 1.0):
                ITM negatives are drawn from `softmax(itm_negative_hardness * ITC logits)`: 1 is LAVIS, 0 draws them
                uniformly. [`Stage1Trainer`] ramps it from 0 to 1 over `Stage1Config.itm_hard_negative_warmup_ratio`
                of training: a from-scratch ITM head that only ever sees near-duplicate negatives can stay on "no
                match".
            accumulation_window ([`AccumulationWindow`], *optional*):
                Set by [`Stage1Trainer`] under gradient accumulation: the other micro-batches of this optimizer step,
                so that the accumulated loss and gradients equal those of the larger batch (see
                `vlbridge.modeling.stage1_accumulation`).
        """
        pixel_values = check_pixel_values(pixel_values)  # (B, C, H, W); raises on raw or broken pixels
        self._clamp_temperature()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.long()
        if accumulation_window is not None and return_loss:
            return windowed_forward(
                self,
                accumulation_window,
                pixel_values,
                input_ids,
                attention_mask,
                QFormerPretrainingOutput,
                itm_negative_hardness,
            )
        image_embeds = self.get_vision_features(pixel_values)  # (B, P, Dv)
        image_feats, text_feat = self._unimodal_features(image_embeds, input_ids, attention_mask)
        if not return_loss:
            sim = losses.query_text_similarity(image_feats, text_feat) / self.temp  # (B, B)
            return QFormerPretrainingOutput(
                logits_per_image=sim,
                logits_per_text=sim.t(),
                image_embeds=image_feats,
                text_embeds=text_feat,
                temperature=self.temp.detach().clone(),
            )

        global_batch = input_ids.shape[0] * losses.world_info()[1]
        image_ids_all = None if image_ids is None else losses.concat_all_gather(image_ids.view(-1))
        if self.config.use_momentum_distillation:
            loss_itc, sim_i2t, sim_t2i, positives = self._itc_momentum(
                pixel_values, image_embeds, input_ids, attention_mask, image_feats, text_feat, image_ids, image_ids_all
            )
        else:
            loss_itc, sim_i2t, sim_t2i, positives = self._itc(image_feats, text_feat, image_ids, image_ids_all)
        output = QFormerPretrainingOutput(
            loss_itc=loss_itc,
            logits_per_image=sim_i2t[:, :global_batch],
            logits_per_text=sim_t2i[:, :global_batch],
            image_embeds=image_feats,
            text_embeds=text_feat,
            temperature=self.temp.detach().clone(),
        )
        weighted = [self.config.itc_weight * loss_itc]
        if self.config.itm_weight:
            output.loss_itm, output.itm_logits, output.itm_labels = self._itm(
                image_embeds,
                input_ids,
                attention_mask,
                sim_i2t[:, :global_batch],
                sim_t2i[:, :global_batch],
                positives[:, :global_batch],
                sampling_seed,
                itm_negative_hardness,
            )
            output.itm_accuracy = (output.itm_logits.detach().argmax(-1) == output.itm_labels).float().mean()
            weighted.append(self.config.itm_weight * output.loss_itm)
        if self.config.itg_weight:
            output.loss_itg, output.itg_logits = self._itg(image_embeds, input_ids, attention_mask)
            weighted.append(self.config.itg_weight * output.loss_itg)
        output.loss = torch.stack(weighted).sum()
        return output

    def _clamp_temperature(self):
        with torch.no_grad():
            self.temp.clamp_(self.config.temperature_min, self.config.temperature_max)

    def _itc(self, image_feats, text_feat, image_ids, image_ids_all):
        """BLIP-2's ITC over the global batch; returns the loss, both logit matrices and the positive mask."""
        rank, _ = losses.world_info()
        image_feats_all = losses.all_gather_with_grad(image_feats)  # (N, Q, E)
        text_feat_all = losses.all_gather_with_grad(text_feat)  # (N, E)
        sim_i2t = losses.query_text_similarity(image_feats, text_feat_all) / self.temp  # (B, N)
        sim_t2i = losses.query_text_similarity(image_feats_all, text_feat).t() / self.temp  # (B, N)
        positives = losses.positive_mask(
            image_feats.shape[0], text_feat_all.shape[0], rank, image_ids, image_ids_all, device=sim_i2t.device
        )
        loss = losses.contrastive_loss(sim_i2t, sim_t2i, positives, self.config.label_smoothing)
        return loss, sim_i2t, sim_t2i, positives

    def _itm(self, image_embeds, input_ids, attention_mask, sim_i2t, sim_t2i, positives, seed=None, hardness=1.0):
        """ITM with one hard negative text per image and one hard negative image per text (LAVIS)."""
        rank, _ = losses.world_info()
        batch_size = input_ids.shape[0]
        pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        image_embeds_all = losses.all_gather_with_grad(image_embeds)  # (N, P, Dv)
        input_ids_all = losses.gather_padded(input_ids, pad_id)  # (N, T_max)
        attention_mask_all = losses.gather_padded(attention_mask, 0)
        local = slice(rank * batch_size, (rank + 1) * batch_size)  # this process's rows of the global batch
        # Every process draws the negatives of the whole global batch with the same seeded generator and keeps its
        # own rows: the draws are those of one process holding the global batch, whatever the world size. Drawing
        # from the local rows alone would give every process the random numbers of the global batch's first rows.
        sim_t2i_all = losses.concat_all_gather(sim_t2i)  # (N, N), detached
        sim_i2t_all = losses.concat_all_gather(sim_i2t)
        positives_all = losses.concat_all_gather(positives.to(torch.uint8)).bool()  # not every backend gathers bool
        generator = None if seed is None else torch.Generator(device=sim_i2t.device).manual_seed(seed)
        negative_images = losses.sample_hard_negatives(sim_t2i_all, positives_all, generator, hardness)[local]
        negative_texts = losses.sample_hard_negatives(sim_i2t_all, positives_all, generator, hardness)[local]
        return self._itm_on_pairs(
            image_embeds,
            image_embeds_all[negative_images],
            input_ids_all[local],
            attention_mask_all[local],
            input_ids_all[negative_texts],
            attention_mask_all[negative_texts],
        )

    def _itm_on_pairs(self, image_embeds, negative_images, text_ids, text_mask, negative_text_ids, negative_text_mask):
        """ITM over LAVIS' 3B pairs: (image, its text) match; (hard negative image, text) and (image, hard negative
        text) do not. Returns the loss, the logits `(3B, 2)` and the labels."""
        batch_size = image_embeds.shape[0]
        texts = torch.cat([text_ids, text_ids, negative_text_ids])  # (3B, T)
        masks = torch.cat([text_mask, text_mask, negative_text_mask])
        images = torch.cat([image_embeds, negative_images.to(image_embeds.dtype), image_embeds])  # (3B, P, Dv)
        itm_logits = self.compute_itm_logits(images, texts, masks)  # (3B, 2)
        itm_labels = torch.cat([torch.ones(batch_size), torch.zeros(2 * batch_size)]).long().to(itm_logits.device)
        return F.cross_entropy(itm_logits.float(), itm_labels), itm_logits, itm_labels

    def _itg(self, image_embeds, input_ids, attention_mask):
        """ITG: `[DEC]` replaces the first token; labels are the ids, -100 on padding."""
        if self.config.decoder_start_token_id is None:
            raise ValueError("ITG needs config.decoder_start_token_id (BLIP-2's [DEC]); set it, or itg_weight=0.")
        decoder_input_ids = input_ids.clone()
        decoder_input_ids[:, 0] = self.config.decoder_start_token_id
        # Masking by the attention mask rather than by pad id keeps EOS when a tokenizer pads with its EOS token.
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        logits = self.compute_itg_logits(image_embeds, decoder_input_ids, attention_mask)  # (B, T, V)
        return losses.itg_loss(logits, labels, self.config.label_smoothing), logits

    # ----------------------------------------------------------------------------------------------------------------
    # Momentum distillation (ALBEF / BLIP)
    # ----------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def copy_params(self):
        """Sets every momentum parameter to its model parameter (ALBEF's `copy_params`); they never train."""
        for model, model_m in self._momentum_pairs():
            for param, param_m in zip(model.parameters(), model_m.parameters(), strict=True):
                param_m.copy_(param)
                param_m.requires_grad_(False)

    @torch.no_grad()
    def _momentum_update(self):
        momentum = self.config.momentum
        for model, model_m in self._momentum_pairs():
            for param, param_m in zip(model.parameters(), model_m.parameters(), strict=True):
                param_m.mul_(momentum).add_(param.detach().to(param_m.dtype), alpha=1.0 - momentum)

    def current_alpha(self) -> float:
        """Weight of the momentum targets now: `alpha`, ramped linearly over the first `alpha_warmup_steps` steps."""
        warmup = self.config.alpha_warmup_steps
        if warmup <= 0:
            return float(self.config.alpha)
        return float(self.config.alpha) * min(1.0, int(self.momentum_step) / warmup)

    def _itc_momentum(
        self, pixel_values, image_embeds, input_ids, attention_mask, image_feats, text_feat, image_ids, image_ids_all
    ):
        """ITC against momentum features of the global batch plus the queues, with soft momentum targets."""
        rank, world_size = losses.world_info()
        batch_size = input_ids.shape[0]
        global_batch = batch_size * world_size
        if self.config.queue_size % global_batch:
            raise ValueError(
                f"queue_size ({self.config.queue_size}) must be a multiple of the global batch size ({global_batch})."
            )
        if self.training:
            self._momentum_update()
        with torch.no_grad():
            image_embeds_m = self.get_vision_features(pixel_values, True) if hasattr(self, "vision_tower_m") else None
            image_embeds_m = image_embeds if image_embeds_m is None else image_embeds_m
            image_feat_m, text_feat_m = self._unimodal_features(image_embeds_m, input_ids, attention_mask, True)
            image_feat_m_all = losses.concat_all_gather(image_feat_m)  # (N, Q, E)
            text_feat_m_all = losses.concat_all_gather(text_feat_m)  # (N, E)
            image_columns = torch.cat([image_feat_m_all, self.image_queue.clone()])  # (N + K, Q, E)
            text_columns = torch.cat([text_feat_m_all, self.text_queue.clone()])  # (N + K, E)
            sim_i2t_m = losses.query_text_similarity(image_feat_m, text_columns) / self.temp
            sim_t2i_m = losses.query_text_similarity(image_columns, text_feat_m).t() / self.temp
            positives = self._momentum_positives(batch_size, rank, global_batch, image_ids, image_ids_all)
        sim_i2t = losses.query_text_similarity(image_feats, text_columns) / self.temp  # (B, N + K)
        sim_t2i = losses.query_text_similarity(image_columns, text_feat).t() / self.temp  # (B, N + K)
        alpha = self.current_alpha()
        loss = losses.contrastive_loss(
            sim_i2t, sim_t2i, positives, self.config.label_smoothing, sim_i2t_m, sim_t2i_m, alpha
        )
        if self.training:
            ids = image_ids_all
            if ids is None:  # queued entries without an id are never positives
                ids = torch.full_like(self.image_id_queue[:global_batch], -1)
            self._dequeue_and_enqueue(image_feat_m_all, text_feat_m_all, ids)
            self.momentum_step += 1
        return loss, sim_i2t, sim_t2i, positives

    def _momentum_positives(self, batch_size, rank, global_batch, image_ids, image_ids_all) -> torch.Tensor:
        """Positives over `[global batch; queue]`: the pair itself, or every column with the same image id."""
        num_columns = global_batch + self.config.queue_size
        if image_ids is None:
            return losses.positive_mask(batch_size, num_columns, rank, device=self.text_queue.device)
        column_ids = torch.cat([image_ids_all.to(self.image_id_queue.device), self.image_id_queue])
        return losses.positive_mask(batch_size, num_columns, rank, image_ids, column_ids)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feats: torch.Tensor, text_feats: torch.Tensor, image_ids: torch.Tensor):
        """Writes the gathered momentum features of this step over the oldest queue entries."""
        size, pointer = image_feats.shape[0], int(self.queue_ptr)
        self.image_queue[pointer : pointer + size] = image_feats.to(self.image_queue.dtype)
        self.text_queue[pointer : pointer + size] = text_feats.to(self.text_queue.dtype)
        self.image_id_queue[pointer : pointer + size] = image_ids.to(self.image_id_queue.device)
        self.queue_ptr.fill_((pointer + size) % self.config.queue_size)

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
