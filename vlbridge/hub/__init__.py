"""
Sharing checkpoints: the model card and `auto_map` of a saved run ([`describe_checkpoint`]), checks on a folder
before loading it, and (in `vlbridge.conversion`) the conversion of released checkpoints. What `save_pretrained`
and `push_to_hub` themselves write lives with the models, in `vlbridge.modeling.saving`.
"""

from ..modeling.saving import (
    add_auto_map,
    auto_classes,
    build_model_card,
    push_to_hub_with_processor,
    write_model_card,
)
from .checkpoint import check_model_folder, describe_checkpoint, describe_train_data, infer_stage


__all__ = [
    "add_auto_map",
    "auto_classes",
    "build_model_card",
    "check_model_folder",
    "describe_checkpoint",
    "describe_train_data",
    "infer_stage",
    "push_to_hub_with_processor",
    "write_model_card",
]
