"""Configuration of BLIP-2's stage-1 model (vision tower + Q-Former + ITC / ITM / ITG heads). Imports no torch."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from .configuration_bridge_vlm import check_vision_feature_layer
from .configuration_qformer import QFormerConfig


@strict
class QFormerPretrainingConfig(PreTrainedConfig):
    r"""
    Configuration of [`QFormerForImageTextPretraining`], BLIP-2's stage-1 representation learning: a vision tower
    (frozen by default), a Q-Former with its text branch, and the image-text contrastive (ITC), image-text matching
    (ITM) and image-grounded text generation (ITG) objectives, optionally with ALBEF / BLIP momentum distillation.

    The Q-Former's `encoder_hidden_size` is set from the vision tower's hidden size here, so the two never disagree.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Vision tower config (any `AutoModel` vision config; CLIP's by default).
        qformer_config (`dict` or [`QFormerConfig`], *optional*):
            The Q-Former; it must have its text branch (`use_text_input=True`, the default).
        embed_dim (`int`, *optional*, defaults to 256):
            Width of the contrastive embedding space (`vision_proj` / `text_proj`).
        temperature_init (`float`, *optional*, defaults to 0.07):
            Initial value of the learned ITC temperature.
        temperature_min (`float`, *optional*, defaults to 0.001):
            Lower clamp of the temperature, applied before every forward (ALBEF / BLIP; BLIP-2 does not clamp).
        temperature_max (`float`, *optional*, defaults to 0.5):
            Upper clamp of the temperature.
        label_smoothing (`float`, *optional*, defaults to 0.1):
            Label smoothing of the ITC targets and of the ITG cross-entropy (LAVIS). ITM uses none.
        freeze_vision_tower (`bool`, *optional*, defaults to `True`):
            Freeze the vision tower and keep it in eval mode (no dropout / drop-path) even after `model.train()`.
        vision_feature_layer (`int`, *optional*):
            Hidden state of the vision tower fed to the Q-Former: `None` takes `last_hidden_state`, an integer
            indexes `hidden_states`. Must match the stage-2 VLM's `vision_feature_layer`.
        decoder_start_token_id (`int`, *optional*, defaults to 30522):
            Id that replaces the first text token (BOS / `[CLS]`) for ITG: BLIP-2's `[DEC]` token, added after
            bert-base-uncased's 30522 ids.
        pad_token_id (`int`, *optional*, defaults to 0):
            Padding id of the text; padded positions get no ITG loss, and finished captions are padded with it.
        eos_token_id (`int`, *optional*, defaults to 102):
            End of a caption (`[SEP]` for BERT); [`~QFormerForImageTextPretraining.generate_captions`] stops at it.
        itc_weight (`float`, *optional*, defaults to 1.0):
            Weight of the ITC loss in `loss`.
        itm_weight (`float`, *optional*, defaults to 1.0):
            Weight of the ITM loss; 0 skips ITM (and its hard-negative forward) entirely.
        itg_weight (`float`, *optional*, defaults to 1.0):
            Weight of the ITG loss; 0 skips ITG entirely.
        use_momentum_distillation (`bool`, *optional*, defaults to `False`):
            ALBEF / BLIP momentum distillation: EMA copies of the encoders and projections give soft ITC targets,
            and feature queues add negatives. BLIP-2 itself does not use it.
        momentum (`float`, *optional*, defaults to 0.995):
            EMA factor: `momentum_param = momentum * momentum_param + (1 - momentum) * param` at every training
            forward.
        queue_size (`int`, *optional*, defaults to 4096):
            Length of the feature queues; must be a multiple of the global batch size. The image queue stores every
            query's feature, `queue_size * num_query_tokens * embed_dim` floats.
        alpha (`float`, *optional*, defaults to 0.4):
            Weight of the momentum model's soft targets in the ITC targets.
        alpha_warmup_steps (`int`, *optional*, defaults to 0):
            Training forwards over which `alpha` ramps linearly from 0 (ALBEF ramps over the first epoch); 0 uses
            `alpha` from the start.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of the projections and heads.
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Tie the ITG decoder to the Q-Former's word embeddings (as BERT's LM head is).
        reuse_image_key_values (`bool`, *optional*, defaults to `True`):
            Project the Q-Former's cross-attention keys / values of each image once per training step and share them
            between the ITC, ITM and ITG passes (ITM's pairs index them), instead of projecting the image features
            in every pass (5 x batch size images per step and cross-attention layer). The losses and gradients are
            the same up to float rounding; `False` is the old path, kept for comparison (`bench_stage1.py
            --compare-reuse`).
        zero_shot_use_itm (`bool`, *optional*, defaults to `False`):
            `True`: [`QFormerForZeroShotImageClassification`] (the `zero-shot-image-classification` pipeline)
            re-ranks every label with ITM unless its `forward` gets `use_itm=False`: the scores are the ITM "match"
            logit plus the ITC cosine (LAVIS' re-ranking) instead of the ITC logits.

    Example:

    ```python
    >>> from vlbridge import QFormerPretrainingConfig
    >>> config = QFormerPretrainingConfig(
    ...     vision_config={"model_type": "clip_vision_model", "hidden_size": 48, "num_attention_heads": 4},
    ...     qformer_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4},
    ...     embed_dim=16,
    ... )
    >>> config.qformer_config.encoder_hidden_size, config.qformer_config.use_text_input
    (48, True)
    ```"""

    model_type = "vlbridge_qformer_pretraining"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "qformer_config": SubConfigSpec(config_class=QFormerConfig),
    }
    # Large per-batch tensors the HF Trainer would otherwise accumulate over a whole evaluation.
    keys_to_ignore_at_inference = ["itg_logits", "image_embeds", "text_embeds"]

    vision_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    embed_dim: int = 256
    temperature_init: float = 0.07
    temperature_min: float = 0.001
    temperature_max: float = 0.5
    label_smoothing: float | int = 0.1
    freeze_vision_tower: bool = True
    vision_feature_layer: int | None = None
    decoder_start_token_id: int | None = 30522
    pad_token_id: int | None = 0
    eos_token_id: int | None = 102
    itc_weight: float | int = 1.0
    itm_weight: float | int = 1.0
    itg_weight: float | int = 1.0
    use_momentum_distillation: bool = False
    momentum: float = 0.995
    queue_size: int = 4096
    alpha: float | int = 0.4
    alpha_warmup_steps: int = 0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    reuse_image_key_values: bool = True
    zero_shot_use_itm: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        check_vision_feature_layer(self.vision_feature_layer, self.vision_config)

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        # The model's only text part is the Q-Former's text branch: `resize_token_embeddings` and other
        # transformers utilities then read and update its `vocab_size`.
        return self.qformer_config

    def validate_architecture(self):
        super().validate_architecture()
        if not getattr(self.qformer_config, "use_text_input", False):
            raise ValueError(
                "Stage-1 pretraining needs the Q-Former's text branch: build qformer_config with use_text_input=True."
            )
        if not 0 < self.temperature_min <= self.temperature_init <= self.temperature_max:
            raise ValueError(
                f"Need 0 < temperature_min <= temperature_init <= temperature_max, got {self.temperature_min}, "
                f"{self.temperature_init}, {self.temperature_max}."
            )
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if not 0 <= self.alpha <= 1 or not 0 <= self.momentum <= 1:
            raise ValueError(f"alpha and momentum must be in [0, 1], got {self.alpha} and {self.momentum}.")
        vocab_size = self.qformer_config.vocab_size
        for name in ("decoder_start_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < vocab_size:
                raise ValueError(f"{name}={value} is outside the Q-Former's vocabulary (vocab_size={vocab_size}).")
        if self.queue_size < 1 or self.alpha_warmup_steps < 0 or self.embed_dim < 1:
            raise ValueError("queue_size and embed_dim must be positive, alpha_warmup_steps non-negative.")


__all__ = ["QFormerPretrainingConfig"]
