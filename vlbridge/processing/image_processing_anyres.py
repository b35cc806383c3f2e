"""Any-resolution image processing (LLaVA-NeXT / BLIP-3 "any-res"): each image becomes its resized base view plus the
tiles of a best-fit high-resolution canvas, all at the vision tower's input size.

The tiling itself is transformers' LLaVA-NeXT code (`select_best_resolution`, resize and pad, `divide_to_patches`,
zero tiles to batch); this module adds BLIP-3's default grid (1x2, 2x1, 2x2, 3x1, 1x3 tiles of the base size), the
tile count per image the processor and the model both need, and the box of real (unpadded) content in the canvas, from
which the model masks features that only see padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image
from transformers.image_processing_utils import select_best_resolution
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from .image_utils import to_rgb_image


# BLIP-3 / xGen-MM `--anyres_grids "(1,2),(2,1),(2,2),(3,1),(1,3)"`, as (rows, columns) of base-size tiles.
BLIP3_ANYRES_GRIDS: tuple[tuple[int, int], ...] = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def grid_pinpoints_from_grids(
    base_size: int | Sequence[int], grids: Sequence[Sequence[int]] = BLIP3_ANYRES_GRIDS
) -> list[list[int]]:
    """
    Canvas resolutions `[[height, width], ...]` for grids of `(rows, columns)` base-size tiles.

    Example:

    ```python
    >>> from vlbridge.processing import grid_pinpoints_from_grids
    >>> grid_pinpoints_from_grids(384)
    [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]]
    ```
    """
    height, width = (base_size, base_size) if isinstance(base_size, int) else base_size
    return [[int(rows) * height, int(columns) * width] for rows, columns in grids]


def anyres_tile_grid(
    image_size: Sequence[int], grid_pinpoints: Sequence[Sequence[int]], tile_size: int
) -> tuple[int, int]:
    """`(rows, columns)` of tiles for an image of `image_size = (height, width)`: the best-fit canvas (transformers'
    `select_best_resolution`, as LLaVA-NeXT and BLIP-3) divided by `tile_size`."""
    height, width = (int(value) for value in image_size)
    best_height, best_width = select_best_resolution((height, width), [list(p) for p in grid_pinpoints])
    return best_height // tile_size, best_width // tile_size


def anyres_num_tiles(image_size: Sequence[int], grid_pinpoints: Sequence[Sequence[int]], tile_size: int) -> int:
    """Tiles one image gives, the resized base view included: `1 + rows * columns`."""
    rows, columns = anyres_tile_grid(image_size, grid_pinpoints, tile_size)
    return 1 + rows * columns


def anyres_content_box(
    image_size: Sequence[int], grid_pinpoints: Sequence[Sequence[int]]
) -> tuple[int, int, int, int]:
    """
    Where the image lies in its best-fit canvas after the aspect-preserving resize and the centred black padding:
    `(top, left, height, width)` in canvas pixels. The arithmetic is that of transformers' `get_patch_output_size`
    and LLaVA-NeXT's `_get_padding_size`, which produce the tiles.
    """
    height, width = (int(value) for value in image_size)
    canvas_height, canvas_width = select_best_resolution((height, width), [list(p) for p in grid_pinpoints])
    scale_w, scale_h = canvas_width / width, canvas_height / height
    if scale_w < scale_h:
        new_height, new_width = min(math.ceil(height * scale_w), canvas_height), canvas_width
    else:
        new_height, new_width = canvas_height, min(math.ceil(width * scale_h), canvas_width)
    return (canvas_height - new_height) // 2, (canvas_width - new_width) // 2, new_height, new_width


class BridgeAnyResImageProcessor(LlavaNextImageProcessorPil):
    r"""
    Any-resolution image processor (BLIP-3 / xGen-MM, LLaVA-NeXT): each image is turned into a stack of tiles at the
    vision tower's input size, `[base view] + high-resolution tiles`, so the model sees both the whole image and its
    details.

    For each image: the best-fit canvas among `image_grid_pinpoints` is chosen (the one that keeps the most of the
    image's pixels, then the one that wastes the least), the image is resized into it keeping its aspect ratio and
    centred on black, and the canvas is cut into `size`-sized tiles, row by row; the base view is the whole image
    resized to `size` (not aspect-preserving, as BLIP-3). Every tile is then rescaled and normalised.

    Outputs:

    - `pixel_values` `(num_images, max_tiles, num_channels, height, width)`: tile 0 is the base view; images with
      fewer tiles than the batch's most are padded with zero tiles, which the model drops (it counts each image's
      tiles from `image_sizes`).
    - `image_sizes` `(num_images, 2)`: each image's original `(height, width)`.

    Each image then takes `get_number_of_image_patches(height, width)` (tiles, base included) x the bridge's tokens
    per tile placeholders in the text; [`BridgeProcessor`] expands every `<image>` by that image's own count, and the
    model's config must carry the same `image_grid_pinpoints` (see [`BridgeVLMConfig`]).

    It is the PIL / NumPy backend (no torchvision needed), and saves, loads and registers with `AutoImageProcessor`
    like any transformers image processor once `vlbridge` is imported.

    Args:
        size (`dict[str, int]`, *optional*, defaults to `{"height": 384, "width": 384}`):
            Tile size, the vision tower's input size (square). BLIP-3 uses SigLIP at 384.
        image_grid_pinpoints (`list[list[int]]`, *optional*):
            Candidate canvases as `[height, width]` pairs, multiples of the tile size. Defaults to BLIP-3's grids of
            1x2, 2x1, 2x2, 3x1 and 1x3 tiles ([`grid_pinpoints_from_grids`] of `size`), stored in pixels.
        image_mean (`float` or `list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
            Normalisation mean (SigLIP's; pass the vision tower's own).
        image_std (`float` or `list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
            Normalisation standard deviation.
        resample (`PILImageResampling`, *optional*, defaults to `BICUBIC`):
            Resampling filter of every resize.
        kwargs:
            The other arguments of transformers' `LlavaNextImageProcessorPil` (`do_rescale`, `do_normalize`,
            `do_convert_rgb`, `do_pad`, ...). Center cropping is off: tiles are already at `size`.

    Example:

    ```python
    >>> from PIL import Image
    >>> from vlbridge.processing import BridgeAnyResImageProcessor
    >>> image_processor = BridgeAnyResImageProcessor(size={"height": 32, "width": 32})
    >>> image_processor.image_grid_pinpoints
    [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
    >>> out = image_processor([Image.new("RGB", (100, 30)), Image.new("RGB", (64, 64))], return_tensors="pt")
    >>> tuple(out["pixel_values"].shape), out["image_sizes"].tolist()
    ((2, 5, 3, 32, 32), [[30, 100], [64, 64]])
    >>> image_processor.get_number_of_image_patches(30, 100), image_processor.get_number_of_image_patches(64, 64)
    (4, 5)
    ```
    """

    resample = PILImageResampling.BICUBIC
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    size = {"height": 384, "width": 384}
    crop_size = None
    do_center_crop = False
    default_to_square = True
    image_grid_pinpoints = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        height, width = self.size.height, self.size.width
        if height is None or height != width:
            raise ValueError(
                f"{type(self).__name__} cuts square tiles at the vision tower's input size: pass size={{'height': S, "
                f"'width': S}}, got {dict(self.size)}."
            )
        if self.image_grid_pinpoints is None:
            self.image_grid_pinpoints = grid_pinpoints_from_grids(height)
        self.image_grid_pinpoints = [[int(h), int(w)] for h, w in self.image_grid_pinpoints]
        for pinpoint in self.image_grid_pinpoints:
            if pinpoint[0] % height or pinpoint[1] % width:
                raise ValueError(
                    f"Every image_grid_pinpoints entry must be a multiple of the tile size {height}, got {pinpoint}: "
                    f"use grid_pinpoints_from_grids({height}, grids) to build them from (rows, columns) grids."
                )

    def preprocess(self, images, *args, **kwargs):
        """transformers' `preprocess`, with PIL images of any mode made 8-bit RGB by [`to_rgb_image`] first: the PIL
        backend's own conversion clips 16-bit and float images (a 16-bit PNG comes out almost all white)."""
        return super().preprocess(_pil_to_rgb(images), *args, **kwargs)

    @property
    def tile_size(self) -> int:
        """Side of a tile in pixels (`size`), the vision tower's input size."""
        return self.size.height

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        """
        Tiles (the base view included) that an image of `height` x `width` pixels gives; times the bridge's tokens per
        tile, the number of `<image>` tokens it takes.

        Args:
            height (`int`): Image height in pixels.
            width (`int`): Image width in pixels.
            images_kwargs (`dict`, *optional*): Call-time overrides of `image_grid_pinpoints` and `size`.
        """
        images_kwargs = images_kwargs or {}
        pinpoints = images_kwargs.get("image_grid_pinpoints") or self.image_grid_pinpoints
        size = images_kwargs.get("size") or self.size
        tile = size.height if isinstance(size, SizeDict) else size["height"]
        return anyres_num_tiles((height, width), pinpoints, tile)


def _pil_to_rgb(images):
    """`images` (one, a list, or nested lists) with every PIL image made 8-bit RGB; arrays and tensors as given."""
    if isinstance(images, (list, tuple)):
        return [_pil_to_rgb(image) for image in images]
    return to_rgb_image(images) if isinstance(images, Image.Image) and images.mode != "RGB" else images


__all__ = [
    "BLIP3_ANYRES_GRIDS",
    "BridgeAnyResImageProcessor",
    "anyres_content_box",
    "anyres_num_tiles",
    "anyres_tile_grid",
    "grid_pinpoints_from_grids",
]
