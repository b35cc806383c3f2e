"""Configuration of the LLaVA-1.5 MLP projector bridge. Imports no torch."""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig


@strict
class MLPProjectorConfig(PreTrainedConfig):
    r"""
    Configuration of [`MLPProjectorModel`], LLaVA-1.5's connector: `num_layers` linear layers with GELU between
    them, applied to every image feature, so one output token per patch.

    Args:
        hidden_size (`int`, *optional*, defaults to 4096):
            Width of the hidden and output layers.
        encoder_hidden_size (`int`, *optional*, defaults to 1024):
            Width of the image features. [`BridgeVLMConfig`] sets it to the vision tower's hidden size.
        num_layers (`int`, *optional*, defaults to 2):
            Number of linear layers (LLaVA-1.5's `mlp2x_gelu` is 2; 1 is LLaVA-1's linear projection).
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation between the linear layers.
        drop_cls_token (`bool`, *optional*, defaults to `False`):
            Drop the first image feature (the CLS token of CLIP-style towers), as LLaVA's "default" feature
            selection does.
        bias (`bool`, *optional*, defaults to `True`):
            Use biases in the linear layers.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation.

    Example:

    ```python
    >>> from vlbridge import MLPProjectorConfig
    >>> config = MLPProjectorConfig(hidden_size=32, drop_cls_token=True)
    >>> config.num_output_tokens(257)
    256
    ```"""

    model_type = "vlbridge_mlp"
    base_config_key = "bridge_config"

    hidden_size: int = 4096
    encoder_hidden_size: int = 1024
    num_layers: int = 2
    hidden_act: str = "gelu"
    drop_cls_token: bool = False
    bias: bool = True
    initializer_range: float = 0.02

    def num_output_tokens(self, num_input_tokens: int | None = None) -> int:
        """Tokens produced per image: one per image feature, less the CLS token when it is dropped."""
        if num_input_tokens is None:
            raise ValueError("MLPProjectorConfig needs the number of image features to count its output tokens.")
        num_output_tokens = num_input_tokens - int(self.drop_cls_token)
        if num_output_tokens < 1:
            raise ValueError(
                f"The MLP projector gets {num_input_tokens} image feature(s) and gives {num_output_tokens} tokens: it "
                "needs at least one feature besides a dropped CLS token (set drop_cls_token=False, or use a vision "
                "tower with more patches)."
            )
        return num_output_tokens

    def validate_architecture(self):
        super().validate_architecture()
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}.")


__all__ = ["MLPProjectorConfig"]
