"""Processing: [`BridgeProcessor`] (images + text -> model inputs), its default chat template, the any-res image
processor [`BridgeAnyResImageProcessor`], and coordinates as text with the geometry of image processors
([`ImageGeometry`], [`format_box`], [`parse_coordinates`])."""

from .coordinates import (
    ImageGeometry,
    ParsedCoordinates,
    format_box,
    format_point,
    image_size_of,
    parse_coordinates,
    region_text,
    render_region_entries,
)
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
    "ImageGeometry",
    "ParsedCoordinates",
    "anyres_num_tiles",
    "default_chat_template",
    "format_box",
    "format_point",
    "grid_pinpoints_from_grids",
    "image_size_of",
    "parse_coordinates",
    "region_text",
    "render_region_entries",
]
