"""Conversion of released checkpoints into vlbridge models: [`convert_checkpoint`] dispatches on the source's config;
[`convert_openflamingo_checkpoint`] takes OpenFlamingo's `checkpoint.pt`, which has none, with its two backbones."""

from .blip import convert_blip_checkpoint
from .blip2 import convert_blip2_checkpoint
from .blip2_retrieval import convert_blip2_qformer_checkpoint, convert_blip2_retrieval_checkpoint
from .dispatch import CONVERTERS, convert_checkpoint, source_architecture
from .llava import convert_llava_checkpoint
from .openflamingo import convert_openflamingo_checkpoint
from .qformer import qformer_config_from_blip2, qformer_state_dict_from_blip2


__all__ = [
    "CONVERTERS",
    "convert_blip_checkpoint",
    "convert_blip2_checkpoint",
    "convert_blip2_qformer_checkpoint",
    "convert_blip2_retrieval_checkpoint",
    "convert_checkpoint",
    "convert_llava_checkpoint",
    "convert_openflamingo_checkpoint",
    "qformer_config_from_blip2",
    "qformer_state_dict_from_blip2",
    "source_architecture",
]
