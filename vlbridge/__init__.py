"""vlbridge: vision-language models whose vision encoder reaches the language model through a learned bridge.

Importing the package registers its configs, models and processor with the transformers Auto classes
(`AutoConfig`, `AutoModel`, `AutoModelForImageTextToText`, `AutoModelForZeroShotImageClassification`,
`AutoProcessor`, `AutoImageProcessor`).
"""

__version__ = "0.1.0"

from transformers import AutoImageProcessor, AutoProcessor

from .configuration import (
    BlipMEDConfig,
    BridgeVLMConfig,
    MLPProjectorConfig,
    PerceiverResamplerConfig,
    QFormerConfig,
    QFormerPretrainingConfig,
)
from .modeling import (
    BlipMEDForImageTextPretraining,
    BlipMEDForQuestionAnswering,
    BlipMEDPretrainingOutput,
    BlipMEDQuestionAnsweringOutput,
    BridgeModelOutput,
    BridgeVLMForConditionalGeneration,
    BridgeVLMModel,
    BridgeVLMPreTrainedModel,
    MLPProjectorModel,
    PerceiverResamplerModel,
    QFormerFeaturesOutput,
    QFormerForImageTextPretraining,
    QFormerForZeroShotImageClassification,
    QFormerModel,
    QFormerPretrainingOutput,
    QFormerZeroShotOutput,
    load_qformer_into_vlm,
)
from .processing import (
    BridgeAnyResImageProcessor,
    BridgeProcessor,
    ImageGeometry,
    format_box,
    format_point,
    parse_coordinates,
)


def __getattr__(name: str):
    # The LoRA helper belongs to the training layer: imported on first use, so that `import vlbridge` (and with it
    # every `vlbridge.modeling` import) does not load the trainers, the data and the metrics.
    if name == "language_model_lora_config":
        from .trainers.lora import language_model_lora_config

        return language_model_lora_config
    raise AttributeError(f"module 'vlbridge' has no attribute {name!r}")


AutoProcessor.register(BridgeVLMConfig, BridgeProcessor, exist_ok=True)
AutoImageProcessor.register(
    BridgeVLMConfig, image_processor_classes={"pil": BridgeAnyResImageProcessor}, exist_ok=True
)

__all__ = [
    "BlipMEDConfig",
    "BlipMEDForImageTextPretraining",
    "BlipMEDForQuestionAnswering",
    "BlipMEDPretrainingOutput",
    "BlipMEDQuestionAnsweringOutput",
    "BridgeAnyResImageProcessor",
    "BridgeModelOutput",
    "BridgeProcessor",
    "BridgeVLMConfig",
    "BridgeVLMForConditionalGeneration",
    "BridgeVLMModel",
    "BridgeVLMPreTrainedModel",
    "ImageGeometry",
    "MLPProjectorConfig",
    "MLPProjectorModel",
    "PerceiverResamplerConfig",
    "PerceiverResamplerModel",
    "QFormerConfig",
    "QFormerFeaturesOutput",
    "QFormerForImageTextPretraining",
    "QFormerForZeroShotImageClassification",
    "QFormerModel",
    "QFormerPretrainingConfig",
    "QFormerPretrainingOutput",
    "QFormerZeroShotOutput",
    "format_box",
    "format_point",
    "language_model_lora_config",
    "load_qformer_into_vlm",
    "parse_coordinates",
]
