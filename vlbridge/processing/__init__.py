"""Processing: [`BridgeProcessor`] (images + text -> model inputs), its default chat template, and the any-res image
processor [`BridgeAnyResImageProcessor`]."""

from .image_processing_anyres import (
    BLIP3_ANYRES_GRIDS,
    BridgeAnyResImageProcessor,
    anyres_num_tiles,
    grid_pinpoints_from_grids,
)
from .processing_bridge import BridgeProcessor, default_chat_template


__all__ = [
    "BLIP3_ANYRES_GRIDS",
    "BridgeAnyResImageProcessor",
    "BridgeProcessor",
    "anyres_num_tiles",
    "default_chat_template",
    "grid_pinpoints_from_grids",
]
