"""vlbridge: vision-language models whose vision encoder reaches the language model through a learned bridge.

Importing the package registers its configs, models and processor with the transformers Auto classes.
"""

__version__ = "0.1.0"

from .configuration import BridgeVLMConfig, MLPProjectorConfig, PerceiverResamplerConfig, QFormerConfig


__all__ = [
    "BridgeVLMConfig",
    "MLPProjectorConfig",
    "PerceiverResamplerConfig",
    "QFormerConfig",
]
