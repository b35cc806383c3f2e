"""Configuration of BLIP's multimodal mixture of encoder-decoder (MED) and its heads. Imports no torch."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from .configuration_bridge_vlm import check_vision_feature_layer


@strict
class BlipMEDConfig(PreTrainedConfig):
    r"""
    Configuration of BLIP's multimodal mixture of encoder-decoder (MED): a vision tower, a BERT text encoder that
    becomes image-grounded with cross-attention to the image patches in every layer (`[ENC]` first token), and an
    image-grounded causal decoder (`[DEC]` first token) that, in pretraining, shares every parameter with the encoder
    except self-attention. One config serves [`BlipMEDForImageTextPretraining`] (ITC, ITM and LM; captioning and
    matching) and [`BlipMEDForQuestionAnswering`] (question encoder, answer decoder), as transformers' `BlipConfig`
    serves its BLIP heads, whose weights convert to these models.

    The text tower is transformers' `BlipTextModel` (and `BlipTextLMHeadModel` for the decoder), so `text_config` is
    a `BlipTextConfig`; its `encoder_hidden_size` is set from the vision tower's hidden size here.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Vision tower config (any `AutoModel` vision config; BLIP's ViT, `blip_vision_model`, by default).
        text_config (`dict` or `BlipTextConfig`, *optional*):
            The BERT text encoder / decoder (`blip_text_model`).
        embed_dim (`int`, *optional*, defaults to 256):
            Width of the contrastive embedding space (`vision_proj` / `text_proj`).
        with_text_encoder (`bool`, *optional*, defaults to `True`):
            Build the text encoder and the ITC / ITM heads (`text_encoder`, `vision_proj`, `text_proj`, `itm_head`).
            `False` for a captioner alone (transformers' `BlipForConditionalGeneration`).
        with_text_decoder (`bool`, *optional*, defaults to `True`):
            Build the image-grounded decoder (`text_decoder`). `False` for a matcher alone (transformers'
            `BlipForImageTextRetrieval`).
        share_encoder_decoder (`bool`, *optional*, defaults to `True`):
            The decoder shares the encoder's embeddings, cross-attention and feed-forward weights; only the
            self-attention layers differ (BLIP's pretraining). Released fine-tuned checkpoints do not share.
        temperature_init (`float`, *optional*, defaults to 0.07):
            Initial value of the learned ITC temperature.
        temperature_min (`float`, *optional*, defaults to 0.001):
            Lower clamp of the temperature, applied before every forward (ALBEF / BLIP).
        temperature_max (`float`, *optional*, defaults to 0.5):
            Upper clamp of the temperature.
        label_smoothing (`float`, *optional*, defaults to 0.1):
            Label smoothing of the LM cross-entropy (BLIP: 0.1).
        itc_label_smoothing (`float`, *optional*, defaults to 0.0):
            Label smoothing of the ITC targets (BLIP uses none: momentum distillation softens them instead).
        freeze_vision_tower (`bool`, *optional*, defaults to `False`):
            Freeze the vision tower and keep it in eval mode. BLIP trains its ViT.
        vision_feature_layer (`int`, *optional*):
            Hidden state of the vision tower the text reads: `None` takes `last_hidden_state` (BLIP's ViT ends with
            its post-LayerNorm there), an integer indexes `hidden_states`.
        decoder_start_token_id (`int`, *optional*, defaults to 30522):
            `[DEC]`: replaces the first text token for the decoder (LM loss and captioning); BLIP's `bos_token`.
        enc_token_id (`int`, *optional*, defaults to 30523):
            `[ENC]`: replaces the first text token for the image-grounded encoder (ITM). `None` keeps the first
            token as given (transformers' `BlipForImageTextRetrieval` does).
        pad_token_id (`int`, *optional*, defaults to 0):
            Padding id of the text; padded positions get no LM loss.
        eos_token_id (`int`, *optional*, defaults to 102):
            End of a caption (`[SEP]`); captioning stops at it.
        itc_weight (`float`, *optional*, defaults to 1.0):
            Weight of the ITC loss in `loss`; 0 skips it.
        itm_weight (`float`, *optional*, defaults to 1.0):
            Weight of the ITM loss (hard negatives from the ITC similarities); 0 skips it.
        itg_weight (`float`, *optional*, defaults to 1.0):
            Weight of the LM loss (BLIP's "LM", named as stage 1's image-grounded generation so that one loss module
            and one trainer serve both models); 0 skips it.
        use_momentum_distillation (`bool`, *optional*, defaults to `True`):
            ALBEF / BLIP momentum distillation: EMA copies of the vision tower, text encoder and projections give soft
            ITC targets, and feature queues add negatives.
        momentum (`float`, *optional*, defaults to 0.995):
            EMA factor of the momentum copies.
        queue_size (`int`, *optional*, defaults to 57600):
            Length of the feature queues (BLIP: 57600); a multiple of the global batch size.
        alpha (`float`, *optional*, defaults to 0.4):
            Weight of the momentum model's soft targets in the ITC targets.
        alpha_warmup_steps (`int`, *optional*, defaults to 0):
            Training forwards over which `alpha` ramps linearly from 0 (BLIP ramps over the first epoch).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of the projections and heads.
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Tie the decoder's vocabulary projection to its word embeddings (BERT's LM head). The decoder reads it from
            `text_config.tie_word_embeddings`, which is set to this value.

    Example:

    ```python
    >>> from vlbridge import BlipMEDConfig
    >>> config = BlipMEDConfig(
    ...     vision_config={"model_type": "blip_vision_model", "hidden_size": 48, "num_attention_heads": 4},
    ...     text_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4},
    ...     embed_dim=16,
    ... )
    >>> config.text_config.encoder_hidden_size, config.share_encoder_decoder
    (48, True)
    ```"""

    model_type = "vlbridge_blip_med"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="blip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="blip_text_model"),
    }
    keys_to_ignore_at_inference = ["itg_logits", "image_embeds", "text_embeds"]

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    embed_dim: int = 256
    with_text_encoder: bool = True
    with_text_decoder: bool = True
    share_encoder_decoder: bool = True
    temperature_init: float = 0.07
    temperature_min: float = 0.001
    temperature_max: float = 0.5
    label_smoothing: float | int = 0.1
    itc_label_smoothing: float | int = 0.0
    freeze_vision_tower: bool = False
    vision_feature_layer: int | None = None
    decoder_start_token_id: int | None = 30522
    enc_token_id: int | None = 30523
    pad_token_id: int | None = 0
    eos_token_id: int | None = 102
    itc_weight: float | int = 1.0
    itm_weight: float | int = 1.0
    itg_weight: float | int = 1.0
    use_momentum_distillation: bool = True
    momentum: float = 0.995
    queue_size: int = 57600
    alpha: float | int = 0.4
    alpha_warmup_steps: int = 0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.text_config.encoder_hidden_size = self.vision_config.hidden_size
        # The decoder (a `BlipTextLMHeadModel`) ties its LM head by its own config: one flag, the top-level one.
        self.text_config.tie_word_embeddings = self.tie_word_embeddings
        check_vision_feature_layer(self.vision_feature_layer, self.vision_config)

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        # One BERT config serves the encoder and the decoder: `resize_token_embeddings` reads and updates it.
        return self.text_config

    def validate_architecture(self):
        super().validate_architecture()
        if not (self.with_text_encoder or self.with_text_decoder):
            raise ValueError("A BLIP model needs a text encoder, a text decoder or both: set one of them to True.")
        if self.share_encoder_decoder and not (self.with_text_encoder and self.with_text_decoder):
            raise ValueError("share_encoder_decoder=True needs both the text encoder and the decoder.")
        if not self.with_text_encoder and (self.itc_weight or self.itm_weight):
            raise ValueError("ITC and ITM need the text encoder: set itc_weight=itm_weight=0 or with_text_encoder.")
        if not self.with_text_decoder and self.itg_weight:
            raise ValueError("The LM loss needs the text decoder: set itg_weight=0 or with_text_decoder=True.")
        if not 0 < self.temperature_min <= self.temperature_init <= self.temperature_max:
            raise ValueError(
                f"Need 0 < temperature_min <= temperature_init <= temperature_max, got {self.temperature_min}, "
                f"{self.temperature_init}, {self.temperature_max}."
            )
        for name in ("label_smoothing", "itc_label_smoothing"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}.")
        if not 0 <= self.alpha <= 1 or not 0 <= self.momentum <= 1:
            raise ValueError(f"alpha and momentum must be in [0, 1], got {self.alpha} and {self.momentum}.")
        if not getattr(self.text_config, "is_decoder", False):
            raise ValueError(
                "text_config.is_decoder must be True: BlipText layers build their cross-attention to the image only "
                "then (the encoder uses it for ITM, the decoder for the LM loss)."
            )
        vocab_size = self.text_config.vocab_size
        for name in ("decoder_start_token_id", "enc_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < vocab_size:
                raise ValueError(f"{name}={value} is outside the text vocabulary (vocab_size={vocab_size}).")
        if self.queue_size < 1 or self.alpha_warmup_steps < 0 or self.embed_dim < 1:
            raise ValueError("queue_size and embed_dim must be positive, alpha_warmup_steps non-negative.")


__all__ = ["BlipMEDConfig"]
