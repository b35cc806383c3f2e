"""
Coordinates as text (Shikra, ChatSpot) and the geometry that carries boxes between an image as the user has it and
the image the vision tower sees.

Shikra writes boxes `[xmin, ymin, xmax, ymax]` and points `[x, y]` as plain text, normalised to [0, 1] with three
decimals, anywhere in questions and answers; ChatSpot puts a region in a prompt as `<box>[x0, y0, x1, y1]</box>`.
Normalised against *which* image matters: the image processor resizes, crops or pads, so a box normalised against the
original image points elsewhere in `pixel_values`. Every function here names its frames:

- **original pixels**: continuous pixel coordinates of the image the user passes. `(0, 0)` is the top-left corner of
  the top-left pixel and `(width, height)` the bottom-right corner of the bottom-right pixel, so a box covering pixel
  columns 10 to 19 has `xmin=10, xmax=20` (exclusive, as `PIL.Image.crop` and COCO's `x + w`).
- **model frame**: the same continuous coordinates on the image the vision tower sees (one image of
  `pixel_values`; with any-res, its base view), divided by that image's width and height: values in [0, 1].
- **text**: the model frame written with `decimals` decimals by [`format_box`] / [`format_point`] and read back by
  [`parse_coordinates`].

[`ImageGeometry`] maps between the first two for a given image processor and image size.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
from PIL import Image
from transformers.image_processing_utils import select_best_resolution
from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
from transformers.image_utils import ChannelDimension, SizeDict, get_image_size_for_max_height_width

from .image_processing_anyres import anyres_content_box
from .image_utils import to_rgb_image


# Float noise from mapping a box that touches an edge (1.0000000000000002) is snapped, not counted as clipping.
_EPS = 1e-9
_NUMBER = r"(?<![\w.])[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_BRACKETED = re.compile(r"\[([^\[\]]*)\]")
# Two or more numbers separated by commas and / or spaces, outside brackets ("0.1, 0.2, 0.3, 0.4" or "(0.5 0.5)").
_RUN = re.compile(rf"{_NUMBER}(?:\s*,\s*|\s+)(?:{_NUMBER}(?:\s*,\s*|\s+))*{_NUMBER}")
REGION_TAGS = {"box": ("<box>", "</box>"), "point": ("<point>", "</point>")}


# ---------------------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------------------


def _numbers(values: Any, count: int, what: str) -> list[float]:
    """`values` as `count` finite floats, or a ValueError that says what was expected."""
    # Lists, tuples, NumPy arrays and tensors (`tolist`); a string is a sequence too, but of characters.
    if isinstance(values, (str, bytes)) or not (isinstance(values, Sequence) or hasattr(values, "tolist")):
        raise ValueError(f"A {what} must be a sequence of {count} numbers, got {type(values).__name__}.")
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    if len(values) != count:
        hint = {2: " (a point is [x, y])", 4: " (a box is [xmin, ymin, xmax, ymax])"}.get(len(values), "")
        raise ValueError(f"A {what} needs {count} values, got {len(values)}: {values}{hint}.")
    try:
        floats = [float(value) for value in values]
    except (TypeError, ValueError) as error:
        raise ValueError(f"A {what} must hold numbers, got {values}.") from error
    if not all(math.isfinite(value) for value in floats):
        raise ValueError(f"A {what} must hold finite numbers, got {values}.")
    return floats


def _check_order(box: list[float], what: str) -> None:
    if box[2] < box[0] or box[3] < box[1]:
        raise ValueError(
            f"A {what} is [xmin, ymin, xmax, ymax] with xmin <= xmax and ymin <= ymax, got {box}; for [x, y, width, "
            "height] boxes (COCO) pass [x, y, x + width, y + height]."
        )


def _normalised(values: Any, count: int, what: str) -> list[float]:
    floats = _numbers(values, count, what)
    if any(value < -_EPS or value > 1 + _EPS for value in floats):
        raise ValueError(
            f"A normalised {what} has values in [0, 1], got {floats}: divide pixel coordinates by the image's width "
            "and height, or map them with ImageGeometry.to_model."
        )
    return [min(max(value, 0.0), 1.0) for value in floats]


def format_box(box: Sequence[float], decimals: int = 3) -> str:
    """
    A normalised box as Shikra writes it: `"[xmin, ymin, xmax, ymax]"` with `decimals` decimals.

    Args:
        box (`Sequence[float]`):
            `[xmin, ymin, xmax, ymax]` in the normalised model frame (values in [0, 1]); map boxes in pixels with
            [`ImageGeometry.to_model`] first.
        decimals (`int`, *optional*, defaults to 3):
            Decimals per value (Shikra uses 3: a thousandth of the image, under a pixel up to 1000 pixels).

    Raises:
        `ValueError`: for a wrong number of values, values outside [0, 1], or `xmax < xmin` / `ymax < ymin`.

    Example:

    ```python
    >>> from vlbridge.processing import format_box
    >>> format_box([0.1234, 0.456, 0.789, 0.9])
    '[0.123, 0.456, 0.789, 0.900]'
    ```
    """
    values = _normalised(box, 4, "box")
    _check_order(values, "box")
    return "[" + ", ".join(f"{value:.{decimals}f}" for value in values) + "]"


def format_point(point: Sequence[float], decimals: int = 3) -> str:
    """
    A normalised point as Shikra writes it: `"[x, y]"` with `decimals` decimals.

    Args:
        point (`Sequence[float]`):
            `[x, y]` in the normalised model frame (values in [0, 1]).
        decimals (`int`, *optional*, defaults to 3):
            Decimals per value.

    Example:

    ```python
    >>> from vlbridge.processing import format_point
    >>> format_point([0.5, 0.25])
    '[0.500, 0.250]'
    ```
    """
    return "[" + ", ".join(f"{value:.{decimals}f}" for value in _normalised(point, 2, "point")) + "]"


@dataclass
class ParsedCoordinates:
    """
    The coordinates found in a text by [`parse_coordinates`], in the order they appear.

    Args:
        boxes (`list[list[float]]`): Every `[xmin, ymin, xmax, ymax]` (four values), clipped to [0, 1].
        points (`list[list[float]]`): Every `[x, y]` (two values), clipped to [0, 1].
        num_clipped (`int`): Values that lay outside [0, 1] and were clipped into it.
        num_invalid (`int`): Groups of numbers that are neither a box nor a point (another count of values, or a
            box with `xmax < xmin` / `ymax < ymin`); they are left out of `boxes` and `points`.
    """

    boxes: list[list[float]] = field(default_factory=list)
    points: list[list[float]] = field(default_factory=list)
    num_clipped: int = 0
    num_invalid: int = 0

    @property
    def num_boxes(self) -> int:
        return len(self.boxes)

    @property
    def num_points(self) -> int:
        return len(self.points)


def _groups(text: str) -> list[tuple[int, list[float]]]:
    """`(position, values)` of every group of numbers: bracketed ones (split at `;`, as Shikra separates several
    boxes) and, outside brackets, runs of two or more numbers. A lone number outside brackets is prose, not a
    coordinate."""
    found, masked = [], list(text)
    for match in _BRACKETED.finditer(text):
        for part in match.group(1).split(";"):
            values = [float(number) for number in re.findall(_NUMBER, part)]
            if values:
                found.append((match.start(), values))
        # Masked with a character that is no separator, so runs outside brackets do not reach into them.
        masked[match.start() : match.end()] = "|" * (match.end() - match.start())
    rest = "".join(" " if char in "[]" else char for char in masked)  # an unclosed bracket: its numbers still count
    for match in _RUN.finditer(rest):
        found.append((match.start(), [float(number) for number in re.findall(_NUMBER, match.group())]))
    return sorted(found, key=lambda item: item[0])


def parse_coordinates(text: str) -> ParsedCoordinates:
    """
    Every box and point written in a text, tolerant of how a model writes them: any spacing, missing or unclosed
    brackets, `<box>` tags or parentheses around them, prose before and after, several boxes in one bracket separated
    by `;`. Groups of four numbers are boxes, groups of two are points.

    Nothing is dropped silently: values outside [0, 1] are clipped into it and counted in `num_clipped`; groups with
    another count of values, and boxes whose `xmax < xmin` or `ymax < ymin`, are counted in `num_invalid`.

    Args:
        text (`str`):
            Generated or written text; coordinates in the normalised model frame.

    Returns:
        [`ParsedCoordinates`]: `boxes`, `points`, `num_clipped`, `num_invalid`.

    Example:

    ```python
    >>> from vlbridge.processing import parse_coordinates
    >>> parsed = parse_coordinates("the cat <box>[0.1,0.2 , 0.5,0.6]</box> looks at 0.7, 1.2 and [0.3]")
    >>> parsed.boxes, parsed.points, parsed.num_clipped, parsed.num_invalid
    ([[0.1, 0.2, 0.5, 0.6]], [[0.7, 1.0]], 1, 1)
    ```
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_coordinates reads a string, got {type(text).__name__}.")
    parsed = ParsedCoordinates()
    for _, values in _groups(text):
        if len(values) not in (2, 4):
            parsed.num_invalid += 1
            continue
        clipped = [min(max(value, 0.0), 1.0) for value in values]
        parsed.num_clipped += sum(a != b for a, b in zip(values, clipped))
        if len(clipped) == 2:
            parsed.points.append(clipped)
        elif clipped[2] < clipped[0] or clipped[3] < clipped[1]:
            parsed.num_invalid += 1
        else:
            parsed.boxes.append(clipped)
    return parsed


# ---------------------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------------------


def image_size_of(image: Any) -> tuple[int, int]:
    """`(height, width)` of a PIL image, an array / tensor (as [`to_rgb_image`] reads it), or a `(height, width)`
    pair given as is."""
    if isinstance(image, (tuple, list)) and len(image) == 2 and all(isinstance(v, (int, np.integer)) for v in image):
        return int(image[0]), int(image[1])
    if not isinstance(image, Image.Image):
        image = to_rgb_image(image)
    return image.height, image.width


class _Affine:
    """Per axis, `model = original * scale + offset`, composed step by step, and the current image size."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        # Exact fractions: sizes are integers, so a box that maps to 0.25 comes out as 0.25, not 0.2500000000000001.
        self.scale, self.offset = [Fraction(1), Fraction(1)], [Fraction(0), Fraction(0)]  # (y, x)
        self.steps: list[str] = []

    def pad(self, top: int, left: int, height: int, width: int, name: str) -> None:
        self.offset = [self.offset[0] + top, self.offset[1] + left]
        self.height, self.width = height, width
        self.steps.append(f"{name} to {height}x{width}")

    def resize(self, height: int, width: int) -> None:
        factors = (Fraction(height, self.height), Fraction(width, self.width))
        self.scale = [s * f for s, f in zip(self.scale, factors)]
        self.offset = [o * f for o, f in zip(self.offset, factors)]
        self.height, self.width = height, width
        self.steps.append(f"resize to {height}x{width}")

    def crop(self, top: int, left: int, height: int, width: int) -> None:
        self.offset = [self.offset[0] - top, self.offset[1] - left]
        self.height, self.width = height, width
        self.steps.append(f"center crop to {height}x{width}")


def _size_dict(size: Any) -> SizeDict | None:
    if size is None or isinstance(size, SizeDict):
        return size
    if isinstance(size, Mapping):
        return SizeDict(**size)
    if isinstance(size, int):  # old processors: an int is a square size
        return SizeDict(height=size, width=size)
    raise ValueError(f"Cannot read the image processor's size {size!r}: expected a dict such as {{'height': ...}}.")


def _resized_size(size: SizeDict, height: int, width: int) -> tuple[int, int]:
    """The output size of transformers' backend `resize` for `size`, computed by transformers' own functions."""
    if size.shortest_edge and size.longest_edge:
        return tuple(get_size_with_aspect_ratio((height, width), size.shortest_edge, size.longest_edge))
    if size.shortest_edge:
        # A zero-strided view: the function reads only the shape.
        shape_only = np.broadcast_to(np.zeros((), dtype=np.uint8), (1, height, width))
        return tuple(
            get_resize_output_image_size(
                shape_only, size.shortest_edge, default_to_square=False, input_data_format=ChannelDimension.FIRST
            )
        )
    if size.max_height and size.max_width:
        return tuple(get_image_size_for_max_height_width((height, width), size.max_height, size.max_width))
    if size.height and size.width:
        return size.height, size.width
    raise ValueError(
        f"ImageGeometry reads resize sizes given as shortest_edge (+ longest_edge), max_height / max_width, or height "
        f"/ width, got {size}: give the image processor one of those."
    )


def _known_methods() -> tuple[set, set, set]:
    """The `_preprocess`, `resize` and `center_crop` whose geometry ImageGeometry reproduces: transformers' PIL and
    torchvision backends, LLaVA's (pad to square first) and LLaVA-NeXT's (any-res) processors."""
    from transformers.image_processing_backends import PilBackend, TorchvisionBackend
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    classes = [PilBackend, TorchvisionBackend, LlavaImageProcessorPil, LlavaNextImageProcessorPil]
    try:  # the torchvision variants import only with torchvision installed
        from transformers.models.llava.image_processing_llava import LlavaImageProcessor
        from transformers.models.llava_next.image_processing_llava_next import LlavaNextImageProcessor

        classes += [LlavaImageProcessor, LlavaNextImageProcessor]
    except ImportError:
        pass
    return tuple({getattr(cls, name) for cls in classes if name in vars(cls)} for name in _CHECKED_METHODS)


_CHECKED_METHODS = ("_preprocess", "resize", "center_crop")


def _is_torchvision(image_processor) -> bool:
    from transformers.image_processing_backends import TorchvisionBackend

    return isinstance(image_processor, TorchvisionBackend)


def _crop_start(size: int, crop: int, torchvision: bool) -> int:
    """Where a center crop of `crop` starts in an image side of `size` (negative: the crop pads). The PIL backend
    pads with the larger half first, the torchvision backend with the smaller one, as their own code does."""
    if size >= crop or not torchvision:
        return (size - crop) // 2
    return -((crop - size) // 2)


class ImageGeometry:
    r"""
    How an image processor moves the pixels of one image, so that boxes and points can be carried between the image
    as the user has it (original pixels) and the image the vision tower sees (normalised model frame). The frames are
    defined in the module docstring of `vlbridge.processing.coordinates`.

    The transforms are read from the image processor's own settings, in the order transformers applies them:

    1. pad to square (LLaVA's "expand to square": the shorter side is padded equally on both sides, the extra pixel
       at the end), when `pad_to_square` is set or the processor pads so itself (`LlavaImageProcessor(do_pad=True)`);
    2. any-res ([`BridgeAnyResImageProcessor`], LLaVA-NeXT): the **base view**, the whole image resized to the tile
       size without keeping its aspect ratio. The model frame is that base view, so a normalised box is simply the
       box divided by the original width and height; [`ImageGeometry.to_canvas`] gives the box on the tiled canvas;
    3. resize (`do_resize`, `size`): `shortest_edge` keeps the aspect ratio (CLIP; with `longest_edge` too, the long
       side is capped), `height` / `width` is a fixed size (SigLIP, ViT, BLIP), `max_height` / `max_width` fits
       inside; the output size comes from transformers' own functions;
    4. center crop (`do_center_crop`, `crop_size`, CLIP), with each backend's rounding;
    5. padding at the bottom / right to `pad_size` (`do_pad` of the backends).

    Each step scales or shifts each axis, so the whole mapping is `model = original * scale + offset` per axis.
    Image processors that transform differently (their own `_preprocess`, `resize` or `center_crop`, as Idefics2 or
    ConvNeXt) raise a `ValueError` unless `allow_unknown_processor=True`.

    Args:
        image_processor ([`BaseImageProcessor`], *optional*):
            The image processor the image goes through. `None`: the model sees the image as it is (normalised by the
            original width and height), as Shikra normalises.
        image_size (`tuple[int, int]`):
            The original image's `(height, width)` in pixels (not PIL's `(width, height)`); see [`image_size_of`].
        pad_to_square (`bool`, *optional*):
            The image is padded to a square before the image processor (by the caller, as LLaVA-1.5's
            `expand2square`). Defaults to what the image processor does itself.
        allow_unknown_processor (`bool`, *optional*, defaults to `False`):
            Use the `size` / `crop_size` settings of an image processor whose transforms are not transformers'
            backend ones; check the result with a test image first.

    Example:

    ```python
    >>> from transformers import CLIPImageProcessorPil
    >>> from vlbridge.processing import ImageGeometry
    >>> clip = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    >>> geometry = ImageGeometry(clip, image_size=(400, 800))  # height 400, width 800: the crop keeps x 200..600
    >>> geometry.steps
    ['resize to 224x448', 'center crop to 224x224']
    >>> geometry.to_model([300, 100, 500, 300])
    [0.25, 0.25, 0.75, 0.75]
    >>> geometry.to_original([0.25, 0.25, 0.75, 0.75])
    [300.0, 100.0, 500.0, 300.0]
    >>> geometry.to_model([100, 100, 300, 300]), geometry.num_clipped  # cut by the crop: clipped and counted
    ([0.0, 0.25, 0.25, 0.75], 1)
    ```
    """

    def __init__(
        self,
        image_processor=None,
        image_size: Sequence[int] | None = None,
        *,
        pad_to_square: bool | None = None,
        allow_unknown_processor: bool = False,
    ):
        if image_size is None or len(image_size) != 2 or min(int(v) for v in image_size) < 1:
            raise ValueError(f"image_size must be the original image's (height, width) in pixels, got {image_size}.")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.image_processor = image_processor
        self.num_clipped = 0
        self.is_anyres = getattr(image_processor, "image_grid_pinpoints", None) is not None
        affine = _Affine(*self.image_size)
        if image_processor is not None:
            self._check_processor(image_processor, allow_unknown_processor)
        processor_pads = self._processor_pads_to_square(image_processor)
        if pad_to_square is False and processor_pads:
            raise ValueError(
                f"pad_to_square=False, but {type(image_processor).__name__} pads images to a square itself "
                "(do_pad=True): leave pad_to_square unset, or build the image processor with do_pad=False."
            )
        self.pad_to_square = bool(pad_to_square or processor_pads)
        if self.pad_to_square:
            side = max(affine.height, affine.width)
            top, left = (side - affine.height) // 2, (side - affine.width) // 2
            affine.pad(top, left, side, side, "pad to square")
        if image_processor is not None:
            self._processor_steps(image_processor, affine)
        self.steps = affine.steps
        self.model_size = (affine.height, affine.width)
        self._scale, self._offset = tuple(affine.scale), tuple(affine.offset)

    @staticmethod
    def _check_processor(image_processor, allow_unknown: bool) -> None:
        if allow_unknown:
            return
        known = _known_methods()
        cls = type(image_processor)
        unknown = [name for name, funcs in zip(_CHECKED_METHODS, known) if getattr(cls, name, None) not in funcs]
        if unknown:
            raise ValueError(
                f"{cls.__name__} has its own {', '.join(unknown)}, so ImageGeometry cannot know where its pixels go: "
                "it reproduces transformers' PIL / torchvision backends (CLIP, SigLIP, ViT, BLIP, ...), LLaVA and "
                "LLaVA-NeXT / BridgeAnyResImageProcessor. Pass allow_unknown_processor=True to use its size and "
                "crop_size settings anyway, after checking them on a test image."
            )

    def _processor_pads_to_square(self, image_processor) -> bool:
        # LLaVA's `do_pad` pads to a square before resizing; other backends' `do_pad` pads bottom / right after.
        return (
            not self.is_anyres
            and bool(getattr(image_processor, "do_pad", False))
            and hasattr(image_processor, "pad_to_square")
        )

    def _processor_steps(self, image_processor, affine: _Affine) -> None:
        size = _size_dict(getattr(image_processor, "size", None))
        if self.is_anyres:
            # LLaVA-NeXT's base view: the whole image resized to (height, width), or a square of shortest_edge.
            side = (size.height, size.width) if size.height and size.width else (size.shortest_edge,) * 2
            affine.resize(*side)
        if getattr(image_processor, "do_resize", False):
            affine.resize(*_resized_size(size, affine.height, affine.width))
        if getattr(image_processor, "do_center_crop", False):
            crop = _size_dict(image_processor.crop_size)
            torchvision = _is_torchvision(image_processor)
            top = _crop_start(affine.height, crop.height, torchvision)
            left = _crop_start(affine.width, crop.width, torchvision)
            affine.crop(top, left, crop.height, crop.width)
        do_pad = getattr(image_processor, "do_pad", False)
        if do_pad and not self.is_anyres and not hasattr(image_processor, "pad_to_square"):
            pad_size = _size_dict(getattr(image_processor, "pad_size", None))
            if pad_size is None:
                raise ValueError(
                    f"{type(image_processor).__name__} pads each batch to its largest image (do_pad=True without "
                    "pad_size), so the model frame depends on the batch: set pad_size, or do_pad=False."
                )
            affine.pad(0, 0, pad_size.height, pad_size.width, "pad bottom / right")

    def __repr__(self) -> str:
        return f"ImageGeometry(image_size={self.image_size}, steps={self.steps}, model_size={self.model_size})"

    # -----------------------------------------------------------------------------------------------------------------
    # Mapping
    # -----------------------------------------------------------------------------------------------------------------

    def _check_in_image(self, values: list[float], what: str) -> None:
        height, width = self.image_size
        xs, ys = values[0::2], values[1::2]
        if min(xs + ys) < 0 or max(xs) > width or max(ys) > height:
            raise ValueError(
                f"The {what} {values} (original pixels) lies outside the {width}x{height} (width x height) image: "
                "clip it to the image, and pass pixel coordinates, not normalised ones."
            )

    def _clip(self, values: list[float], limits: Sequence[float]) -> tuple[list[float], bool]:
        """`values` (x, y, ...) clipped to [0, limit]; whether any moved by more than float noise."""
        clipped, moved = [], False
        for index, value in enumerate(values):
            limit = limits[index % 2]
            inside = min(max(value, 0), limit)
            moved |= abs(inside - value) > _EPS * max(1.0, limit)
            clipped.append(inside)
        return clipped, moved

    def _forward(self, values: list[float]) -> list[float]:
        """Original pixels -> model-frame pixels."""
        return [Fraction(v) * self._scale[1 - i % 2] + self._offset[1 - i % 2] for i, v in enumerate(values)]

    def _backward(self, values: list[float]) -> list[float]:
        """Model-frame pixels -> original pixels."""
        return [(Fraction(v) - self._offset[1 - i % 2]) / self._scale[1 - i % 2] for i, v in enumerate(values)]

    def to_model(self, box: Sequence[float], strict: bool = False) -> list[float]:
        """
        A box in original pixels -> the normalised box in the image the model sees (any-res: in the base view, i.e.
        the box over the whole image divided by its width and height).

        A box partly cut away (by a center crop) is clipped to what the model sees and counted in `num_clipped`.

        Args:
            box (`Sequence[float]`): `[xmin, ymin, xmax, ymax]` in original pixels, inside the image.
            strict (`bool`, *optional*, defaults to `False`): Raise instead of clipping a box that is partly cut away.

        Raises:
            `ValueError`: for a malformed box (not four values, a point, `xmax < xmin`), a box outside the image, or
                one the model does not see at all.
        """
        values = _numbers(box, 4, "box")
        _check_order(values, "box")
        self._check_in_image(values, "box")
        height, width = self.model_size
        mapped, moved = self._clip(self._forward(values), (width, height))
        if moved:
            empty = (mapped[2] <= mapped[0] and values[2] > values[0]) or (
                mapped[3] <= mapped[1] and values[3] > values[1]
            )
            if empty or strict:
                reason = "lies entirely outside" if empty else "is partly outside"
                raise ValueError(
                    f"The box {values} (original pixels) {reason} what the model sees after {self.steps}: pick a "
                    "region the image processor keeps" + ("." if empty else ", or pass strict=False to clip it.")
                )
            self.num_clipped += 1
        return [float(value / (width, height)[i % 2]) for i, value in enumerate(mapped)]

    def to_original(self, box: Sequence[float]) -> list[float]:
        """
        A normalised box in the model frame (as the model writes it) -> the box in original pixels. Parts that fall
        on padding (pad to square) are clipped to the image and counted in `num_clipped`.

        Args:
            box (`Sequence[float]`): `[xmin, ymin, xmax, ymax]` in the normalised model frame.
        """
        values = _normalised(box, 4, "box")
        _check_order(values, "box")
        height, width = self.model_size
        mapped = self._backward([Fraction(value) * (width, height)[i % 2] for i, value in enumerate(values)])
        original, moved = self._clip(mapped, self.image_size[::-1])
        self.num_clipped += moved
        return [float(value) for value in original]

    def point_to_model(self, point: Sequence[float]) -> list[float]:
        """A point `[x, y]` in original pixels -> the normalised point in the model frame; a point the model does not
        see (cut by a center crop) raises a `ValueError`."""
        values = _numbers(point, 2, "point")
        self._check_in_image(values, "point")
        height, width = self.model_size
        mapped = self._forward(values)
        clipped, moved = self._clip(mapped, (width, height))
        if moved:
            raise ValueError(
                f"The point {values} (original pixels) lies outside what the model sees after {self.steps}."
            )
        return [float(clipped[0] / width), float(clipped[1] / height)]

    def point_to_original(self, point: Sequence[float]) -> list[float]:
        """A normalised point `[x, y]` in the model frame -> original pixels (clipped to the image, and counted, when
        it falls on padding)."""
        height, width = self.model_size
        values = _normalised(point, 2, "point")
        mapped = self._backward([Fraction(values[0]) * width, Fraction(values[1]) * height])
        original, moved = self._clip(mapped, self.image_size[::-1])
        self.num_clipped += moved
        return [float(value) for value in original]

    @property
    def canvas_size(self) -> tuple[int, int]:
        """Any-res: `(height, width)` of the best-fit canvas the tiles are cut from."""
        self._require_anyres()
        pinpoints = [list(pinpoint) for pinpoint in self.image_processor.image_grid_pinpoints]
        return tuple(select_best_resolution(self.image_size, pinpoints))

    def _require_anyres(self) -> None:
        if not self.is_anyres:
            raise ValueError("to_canvas / canvas_size need an any-res image processor (with image_grid_pinpoints).")

    def to_canvas(self, box: Sequence[float]) -> list[float]:
        """
        Any-res: a box in original pixels -> the normalised box on the best-fit canvas the tiles are cut from. Tile
        `(row, column)` of side `T` covers canvas pixels `[column * T, (column + 1) * T)` horizontally and
        `[row * T, (row + 1) * T)` vertically.

        Args:
            box (`Sequence[float]`): `[xmin, ymin, xmax, ymax]` in original pixels, inside the image.
        """
        self._require_anyres()
        values = _numbers(box, 4, "box")
        _check_order(values, "box")
        self._check_in_image(values, "box")
        top, left, height, width = anyres_content_box(self.image_size, self.image_processor.image_grid_pinpoints)
        canvas_height, canvas_width = self.canvas_size
        scale = (width / self.image_size[1], height / self.image_size[0])
        return [
            ((left, top)[i % 2] + value * scale[i % 2]) / (canvas_width, canvas_height)[i % 2]
            for i, value in enumerate(values)
        ]


# ---------------------------------------------------------------------------------------------------------------------
# Region prompts
# ---------------------------------------------------------------------------------------------------------------------


def region_text(region: Sequence[float], geometry: ImageGeometry, kind: str = "box", tags: bool = True) -> str:
    """
    A region prompt: a box (or point) in original pixels written in the model frame, as ChatSpot
    (`"<box>[0.250, 0.250, 0.750, 0.750]</box>"`) or, with `tags=False`, as Shikra (`"[0.250, ...]"`).

    Args:
        region (`Sequence[float]`): `[xmin, ymin, xmax, ymax]` (or `[x, y]` for `kind="point"`) in original pixels.
        geometry ([`ImageGeometry`]): The geometry of the image the region is on.
        kind (`str`, *optional*, defaults to `"box"`): `"box"` or `"point"`.
        tags (`bool`, *optional*, defaults to `True`): Wrap it in `<box>` / `<point>` tags.

    Example:

    ```python
    >>> from vlbridge.processing import ImageGeometry, region_text
    >>> region_text([10, 20, 30, 40], ImageGeometry(None, image_size=(40, 40)))
    '<box>[0.250, 0.500, 0.750, 1.000]</box>'
    ```
    """
    if kind == "box":
        text = format_box(geometry.to_model(region))
    elif kind == "point":
        text = format_point(geometry.point_to_model(region))
    else:
        raise ValueError(f"A region is a 'box' or a 'point', got kind={kind!r}.")
    return f"{REGION_TAGS[kind][0]}{text}{REGION_TAGS[kind][1]}" if tags else text


def _entry_images(conversation: list[dict]) -> list:
    """The images of a conversation's `{"type": "image"}` entries, in order (None where an entry holds none)."""
    found = []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, str) or not content:
            continue
        for entry in content:
            if entry.get("type") == "image":
                found.append(
                    next((entry[key] for key in ("image", "path", "url") if entry.get(key) is not None), None)
                )
    return found


def _region_entry(entry: dict, images: list, geometry_for: Callable[[Any], ImageGeometry], where: str) -> dict:
    kind = entry["type"]
    if kind not in entry:
        raise ValueError(f"{where}: a {{'type': {kind!r}}} entry holds its coordinates under {kind!r}.")
    values = entry[kind]
    if kind == "box" and hasattr(values, "__len__") and len(values) == 2:
        raise ValueError(
            f"{where}: got a point {list(values)} where a box [xmin, ymin, xmax, ymax] is expected: use "
            f"{{'type': 'point', 'point': [x, y]}} for a point."
        )
    if not images:
        raise ValueError(
            f"{where}: a region prompt needs the image it points into, but the conversation has none: add a "
            "{'type': 'image'} entry and pass the image (processor_kwargs={'images': ...} or the entry's 'image')."
        )
    index = entry.get("image_index")
    if index is None and len(images) > 1:
        raise ValueError(f"{where}: the conversation has {len(images)} images: say which with 'image_index'.")
    index = 0 if index is None else index
    if not isinstance(index, int) or not 0 <= index < len(images):
        raise ValueError(f"{where}: image_index {index!r} is not one of the conversation's {len(images)} images.")
    if images[index] is None:
        raise ValueError(
            f"{where}: image {index} is not available to place the region: pass the images in "
            "processor_kwargs={'images': ...} or put them in the {'type': 'image', 'image': ...} entries."
        )
    text = region_text(values, geometry_for(images[index]), kind=kind, tags=entry.get("tags", True))
    return {"type": "text", "text": text}


def render_region_entries(conversation: list, images: list | None, geometry_for: Callable[[Any], ImageGeometry]):
    """
    A copy of a conversation (or a batch of them) with every `{"type": "box", "box": [...], "image_index": i}` and
    `{"type": "point", "point": [...]}` content entry replaced by a text entry holding the region in the model frame
    of image `i` of that conversation ([`region_text`]; `"tags": False` in the entry writes Shikra's bare brackets).
    Coordinates in the entries are original pixels; `image_index` counts the conversation's `{"type": "image"}`
    entries from 0 and may be left out when there is one image.

    Args:
        conversation (`list`): A conversation (a list of messages) or a batch of them.
        images (`list`, *optional*): The images, as `apply_chat_template` gets them in `processor_kwargs["images"]`
            (a list per conversation for a batch); otherwise they are taken from the image entries.
        geometry_for (`Callable`): Builds the [`ImageGeometry`] of an image.

    Example:

    ```python
    >>> from PIL import Image
    >>> from vlbridge.processing import ImageGeometry, image_size_of, render_region_entries
    >>> messages = [{"role": "user", "content": [
    ...     {"type": "image"}, {"type": "text", "text": "what is in "}, {"type": "box", "box": [0, 0, 50, 25]}]}]
    >>> rendered = render_region_entries(messages, [Image.new("RGB", (100, 50))], lambda image: ImageGeometry(
    ...     None, image_size_of(image)))
    >>> rendered[0]["content"][2]
    {'type': 'text', 'text': '<box>[0.000, 0.000, 0.500, 0.500]</box>'}
    ```
    """
    batched = bool(conversation) and not isinstance(conversation[0], Mapping)
    conversations = conversation if batched else [conversation]
    if images is not None and not batched:
        images = [images]
    rendered = []
    for number, messages in enumerate(conversations):
        own = images[number] if images is not None else None
        own = list(own) if isinstance(own, (list, tuple)) else ([] if own is None else [own])
        if images is None:
            own = _entry_images(messages)
        rendered.append(_render_messages(messages, own, geometry_for, number if batched else None))
    return rendered if batched else rendered[0]


def _render_messages(messages: list[dict], images: list, geometry_for, number: int | None) -> list[dict]:
    out = []
    for index, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, str) or not content or not any(e.get("type") in REGION_TAGS for e in content):
            out.append(message)
            continue
        where = f"message {index}" if number is None else f"conversation {number}, message {index}"
        entries = [
            _region_entry(e, images, geometry_for, where) if e.get("type") in REGION_TAGS else e for e in content
        ]
        out.append({**message, "content": entries})
    return out


def has_region_entries(conversation: list) -> bool:
    """Whether a conversation (or a batch of them) holds `{"type": "box"}` / `{"type": "point"}` entries."""
    batched = bool(conversation) and not isinstance(conversation[0], Mapping)
    for messages in conversation if batched else [conversation]:
        for message in messages:
            content = message.get("content")
            if not isinstance(content, str) and any(e.get("type") in REGION_TAGS for e in content or []):
                return True
    return False


__all__ = [
    "ImageGeometry",
    "ParsedCoordinates",
    "format_box",
    "format_point",
    "has_region_entries",
    "image_size_of",
    "parse_coordinates",
    "region_text",
    "render_region_entries",
]
