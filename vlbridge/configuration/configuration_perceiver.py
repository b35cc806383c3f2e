"""Configuration of the Flamingo / BLIP-3 Perceiver Resampler bridge. Imports no torch."""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig


@strict
class PerceiverResamplerConfig(PreTrainedConfig):
    r"""
    Configuration of [`PerceiverResamplerModel`]: learned latents that, layer after layer, attend to
    concat(image features, latents) and so compress any number of image features to `num_latents` tokens
    (OpenFlamingo, BLIP-3 / xGen-MM).

    Args:
        hidden_size (`int`, *optional*, defaults to 1024):
            Width of the latents and of the output. When it differs from `encoder_hidden_size` the image
            features are first projected to it.
        encoder_hidden_size (`int`, *optional*, defaults to 1024):
            Width of the image features. [`BridgeVLMConfig`] sets it to the vision tower's hidden size.
        num_latents (`int`, *optional*, defaults to 64):
            Number of learned latents, hence of output tokens per image (BLIP-3 uses 128); at least 1.
        num_hidden_layers (`int`, *optional*, defaults to 6):
            Depth of the resampler.
        num_attention_heads (`int`, *optional*, defaults to 8):
            Attention heads.
        head_dim (`int`, *optional*, defaults to 64):
            Width of each head; the inner attention width is `num_attention_heads * head_dim`.
        ff_mult (`int`, *optional*, defaults to 4):
            The feed-forward block is `hidden_size -> ff_mult * hidden_size -> hidden_size`.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the feed-forward block.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the layer norms.
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on attention probabilities.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation.
        num_frames (`int`, *optional*):
            Size of the media-time (frame) embedding table, OpenFlamingo's `max_num_frames`: the most frames (or
            crops) of one video (or multi-crop image) that are resampled together into `num_latents` tokens. Frame
            `t` gets row `t` of the table added to its features; a single image gets row 0, as in OpenFlamingo.
            `None` (the default) builds no table, hence no `media_time_embeddings` checkpoint key, and the bridge
            takes one frame per image; at least 1 when set.

    Example:

    ```python
    >>> from vlbridge import PerceiverResamplerConfig
    >>> config = PerceiverResamplerConfig(hidden_size=32, num_latents=8, num_hidden_layers=2, head_dim=8)
    >>> config.num_output_tokens(257)
    8
    >>> video_config = PerceiverResamplerConfig(hidden_size=32, num_latents=8, head_dim=8, num_frames=16)
    >>> video_config.num_output_tokens(16 * 257)  # every frame of a video together: still one set of latents
    8
    ```"""

    model_type = "vlbridge_perceiver"
    base_config_key = "bridge_config"

    hidden_size: int = 1024
    encoder_hidden_size: int = 1024
    num_latents: int = 64
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    head_dim: int = 64
    ff_mult: int = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float | int = 0.0
    initializer_range: float = 0.02
    num_frames: int | None = None

    def num_output_tokens(self, num_input_tokens: int | None = None) -> int:
        """Tokens produced per image (per tile with any-res): the number of latents."""
        return self.num_latents

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Raised here as a plain ValueError at build; `validate_architecture` repeats it when the config is saved.
        self._check_sizes()

    def validate_architecture(self):
        super().validate_architecture()
        self._check_sizes()

    def _check_sizes(self) -> None:
        if self.num_latents < 1:
            raise ValueError(f"num_latents must be >= 1 (each latent gives one image token), got {self.num_latents}.")
        if self.num_frames is not None and (isinstance(self.num_frames, bool) or self.num_frames < 1):
            raise ValueError(
                f"num_frames must be None (no media-time embeddings) or >= 1 (the most frames per video), got "
                f"{self.num_frames!r}."
            )


__all__ = ["PerceiverResamplerConfig"]
