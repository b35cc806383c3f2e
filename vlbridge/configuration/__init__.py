"""Configurations of the bridges and of the composite VLM. Importing this registers them with `AutoConfig`."""

from transformers import AutoConfig

from .configuration_mlp import MLPProjectorConfig
from .configuration_perceiver import PerceiverResamplerConfig
from .configuration_qformer import QFormerConfig


# The bridge configs must be known to AutoConfig before BridgeVLMConfig resolves a `bridge_config` dict.
for _config_class in (QFormerConfig, PerceiverResamplerConfig, MLPProjectorConfig):
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)

from .configuration_bridge_vlm import BridgeVLMConfig  # noqa: E402


AutoConfig.register(BridgeVLMConfig.model_type, BridgeVLMConfig, exist_ok=True)

from .configuration_qformer_pretraining import QFormerPretrainingConfig  # noqa: E402


AutoConfig.register(QFormerPretrainingConfig.model_type, QFormerPretrainingConfig, exist_ok=True)

from .configuration_blip_med import BlipMEDConfig  # noqa: E402


AutoConfig.register(BlipMEDConfig.model_type, BlipMEDConfig, exist_ok=True)

__all__ = [
    "BlipMEDConfig",
    "BridgeVLMConfig",
    "MLPProjectorConfig",
    "PerceiverResamplerConfig",
    "QFormerConfig",
    "QFormerPretrainingConfig",
]
