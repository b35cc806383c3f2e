"""Conversion of transformers checkpoints into vlbridge models."""

from .blip2 import convert_blip2_checkpoint
from .qformer import qformer_config_from_blip2, qformer_state_dict_from_blip2


__all__ = ["convert_blip2_checkpoint", "qformer_config_from_blip2", "qformer_state_dict_from_blip2"]
