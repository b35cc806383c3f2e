"""Bridges and the composite VLM. Importing this registers them with `AutoModel` / `AutoModelForImageTextToText`."""

from transformers import (
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForPreTraining,
    AutoModelForVisualQuestionAnswering,
    AutoModelForZeroShotImageClassification,
)
from transformers.models.blip import BlipVisionConfig, BlipVisionModel
from transformers.models.blip_2 import Blip2VisionConfig, Blip2VisionModel
from transformers.models.instructblip import InstructBlipVisionConfig, InstructBlipVisionModel

from ..configuration import (
    BlipMEDConfig,
    BridgeVLMConfig,
    MLPProjectorConfig,
    PerceiverResamplerConfig,
    QFormerConfig,
    QFormerPretrainingConfig,
)
from .modeling_blip_med import BlipMEDForImageTextPretraining, BlipMEDPretrainingOutput
from .modeling_blip_vqa import BlipMEDForQuestionAnswering, BlipMEDQuestionAnsweringOutput
from .modeling_bridge_vlm import (
    BridgeVLMForConditionalGeneration,
    BridgeVLMModel,
    BridgeVLMModelOutput,
    BridgeVLMOutput,
    BridgeVLMPreTrainedModel,
)
from .modeling_mlp import MLPProjectorModel
from .modeling_perceiver import PerceiverResamplerModel
from .modeling_qformer import QFormerModel
from .modeling_qformer_pretraining import QFormerForImageTextPretraining, QFormerPretrainingOutput
from .modeling_qformer_zero_shot import QFormerForZeroShotImageClassification, QFormerZeroShotOutput
from .outputs import BridgeModelOutput
from .qformer_captioning import QFormerCaptioner
from .qformer_features import QFormerFeaturesOutput
from .stage1_handoff import (
    add_qformer_instruction_input,
    load_qformer_into_vlm,
    qformer_instruction_processor,
    vlm_from_stage1,
)


for _config, _model in (
    (QFormerConfig, QFormerModel),
    (PerceiverResamplerConfig, PerceiverResamplerModel),
    (MLPProjectorConfig, MLPProjectorModel),
    (BridgeVLMConfig, BridgeVLMModel),
    # BLIP-2 / InstructBLIP vision towers are not in AutoModel's mapping; converted checkpoints build them by config.
    (Blip2VisionConfig, Blip2VisionModel),
    (InstructBlipVisionConfig, InstructBlipVisionModel),
    # BLIP's ViT, the default vision tower of the BLIP MED models.
    (BlipVisionConfig, BlipVisionModel),
):
    AutoModel.register(_config, _model, exist_ok=True)
AutoModelForImageTextToText.register(BridgeVLMConfig, BridgeVLMForConditionalGeneration, exist_ok=True)
# BLIP's VQA model, as transformers registers its `BlipForQuestionAnswering`.
AutoModelForVisualQuestionAnswering.register(BlipMEDConfig, BlipMEDForQuestionAnswering, exist_ok=True)
AutoModel.register(QFormerPretrainingConfig, QFormerForImageTextPretraining, exist_ok=True)
AutoModelForPreTraining.register(QFormerPretrainingConfig, QFormerForImageTextPretraining, exist_ok=True)
# BLIP's pretraining model (ITC / ITM / LM, captioning and matching) is what a BLIP MED folder loads as by default.
AutoModel.register(BlipMEDConfig, BlipMEDForImageTextPretraining, exist_ok=True)
AutoModelForPreTraining.register(BlipMEDConfig, BlipMEDForImageTextPretraining, exist_ok=True)
# `pipeline("zero-shot-image-classification")` on a stage-1 folder: same weights, CLIP-style logits.
AutoModelForZeroShotImageClassification.register(
    QFormerPretrainingConfig, QFormerForZeroShotImageClassification, exist_ok=True
)

__all__ = [
    "add_qformer_instruction_input",
    "BlipMEDForImageTextPretraining",
    "BlipMEDForQuestionAnswering",
    "BlipMEDPretrainingOutput",
    "BlipMEDQuestionAnsweringOutput",
    "BridgeModelOutput",
    "BridgeVLMForConditionalGeneration",
    "BridgeVLMModel",
    "BridgeVLMModelOutput",
    "BridgeVLMOutput",
    "BridgeVLMPreTrainedModel",
    "MLPProjectorModel",
    "PerceiverResamplerModel",
    "QFormerCaptioner",
    "QFormerFeaturesOutput",
    "QFormerForImageTextPretraining",
    "QFormerForZeroShotImageClassification",
    "QFormerModel",
    "QFormerPretrainingOutput",
    "QFormerZeroShotOutput",
    "load_qformer_into_vlm",
    "qformer_instruction_processor",
    "vlm_from_stage1",
]
