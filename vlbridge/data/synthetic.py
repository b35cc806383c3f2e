"""
Built-in synthetic image-text data: scenes of coloured shapes on a 3x3 grid, rendered with PIL, with several true
compositional captions per image ("two small red circles left of a large blue square").

The module is organised as scene description -> renderer -> caption writers, so that other text generators (VQA
questions, multi-turn chat, preference pairs) can be added on top of the same `Scene`:

- `sample_scene` draws a `Scene` (groups of identical objects, each group lying in one row or column of the grid);
- `render_scene` draws it (exact palette colours, no anti-aliasing, jittered sizes and offsets);
- `CAPTION_WRITERS` turn a scene into true sentences over the fixed vocabulary `caption_vocabulary()`;
- `make_synthetic_image_text` puts it all in a `datasets.DatasetDict`.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw
from transformers.utils import logging


if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict, Features


logger = logging.get_logger(__name__)

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}
# Saturated, mutually distant colours; red / green / blue / yellow match `vlbridge.data.shapes`.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 20),
    "pink": (245, 130, 200),
    "black": (30, 30, 30),
}
SIZES = ("small", "large")
BACKGROUND = (255, 255, 255)
GRID = 3
# `position` value of each cell of the 3x3 grid, and how captions say "in that cell".
CELL_NAMES = (("top left", "top", "top right"), ("left", "centre", "right"), ("bottom left", "bottom", "bottom right"))
CELL_PHRASES = {"left": "on the left", "right": "on the right", "centre": "in the centre"}
ROW_NAMES = ("top", "middle", "bottom")
COLUMN_NAMES = ("left", "middle", "right")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
MAX_PER_GROUP = 3
# Extent of an object as a fraction of its grid cell, per size; the ranges are far apart so size is never ambiguous.
_EXTENT = {"small": (0.36, 0.46), "large": (0.76, 0.95)}
_MIN_IMAGE_SIZE = 24


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: `row` / `column` index the 3x3 grid, `position` names that cell ("top left")."""

    shape: str
    colour: str
    size: str
    row: int
    column: int

    @property
    def position(self) -> str:
        return CELL_NAMES[self.row][self.column]


@dataclass(frozen=True)
class ObjectGroup:
    """
    One to three identical objects (same shape, colour and size) lying in one row or one column of the grid.

    Args:
        shape (`str`): One of `SHAPES`.
        colour (`str`): One of `COLOURS`.
        size (`str`): `"small"` or `"large"`.
        cells (`tuple[tuple[int, int], ...]`): The `(row, column)` of each object, sorted in reading order.

    Example:

    ```python
    >>> from vlbridge.data.synthetic import ObjectGroup
    >>> group = ObjectGroup("circle", "red", "small", ((0, 0), (0, 2)))
    >>> group.count, group.region
    (2, 'top row')
    ```
    """

    shape: str
    colour: str
    size: str
    cells: tuple[tuple[int, int], ...]

    @property
    def count(self) -> int:
        return len(self.cells)

    @property
    def region(self) -> str:
        """The smallest named region holding every object: a cell ("top left") or a line ("left column")."""
        if self.count == 1:
            return CELL_NAMES[self.cells[0][0]][self.cells[0][1]]
        rows, columns = {row for row, _ in self.cells}, {column for _, column in self.cells}
        if len(rows) == 1:
            return f"{ROW_NAMES[rows.pop()]} row"
        if len(columns) == 1:
            return f"{COLUMN_NAMES[columns.pop()]} column"
        raise ValueError(f"The objects of a group must share a row or a column, got cells {self.cells}.")

    @property
    def objects(self) -> tuple[SceneObject, ...]:
        return tuple(SceneObject(self.shape, self.colour, self.size, row, column) for row, column in self.cells)


@dataclass(frozen=True)
class Scene:
    """
    A scene: groups of identical objects on a 3x3 grid. Groups differ in both shape and colour, so "the circle" or
    "the red object" always names one group (questions and captions stay unambiguous).

    Args:
        groups (`tuple[ObjectGroup, ...]`): Sorted by their first cell in reading order (the caption order).

    Example:

    ```python
    >>> from vlbridge.data.synthetic import ObjectGroup, Scene
    >>> circles = ObjectGroup("circle", "red", "small", ((0, 0), (1, 0)))
    >>> scene = Scene((circles, ObjectGroup("square", "blue", "large", ((1, 2),))))
    >>> [o.position for o in scene.objects]
    ['top left', 'left', 'right']
    ```
    """

    groups: tuple[ObjectGroup, ...]

    @property
    def objects(self) -> tuple[SceneObject, ...]:
        return tuple(obj for group in self.groups for obj in group.objects)

    def to_objects(self) -> list[dict]:
        """The structured `objects` column: one `{shape, colour, size, position}` dict per object."""
        return [{"shape": o.shape, "colour": o.colour, "size": o.size, "position": o.position} for o in self.objects]

    @classmethod
    def from_objects(cls, objects: Iterable[dict]) -> Scene:
        """Rebuild a scene from its `objects` column (objects of the same shape, colour and size form one group)."""
        cells = {name: (row, column) for row, names in enumerate(CELL_NAMES) for column, name in enumerate(names)}
        grouped: dict[tuple[str, str, str], list[tuple[int, int]]] = {}
        for obj in objects:
            grouped.setdefault((obj["shape"], obj["colour"], obj["size"]), []).append(cells[obj["position"]])
        groups = [ObjectGroup(*kind, tuple(sorted(where))) for kind, where in grouped.items()]
        return cls(tuple(sorted(groups, key=lambda group: group.cells[0])))


# ---------------------------------------------------------------------------------------------------------------
# Scene sampling
# ---------------------------------------------------------------------------------------------------------------


def _place_group(rng: random.Random, count: int, free: set[tuple[int, int]]) -> tuple[tuple[int, int], ...] | None:
    """`count` free cells in one random row or column (any free cell for a single object), or None if none fit."""
    if count == 1:
        return (rng.choice(sorted(free)),) if free else None
    lines = [[(i, j) for j in range(GRID)] for i in range(GRID)] + [[(i, j) for i in range(GRID)] for j in range(GRID)]
    lines = [[cell for cell in line if cell in free] for line in lines]
    lines = [line for line in lines if len(line) >= count]
    if not lines:
        return None
    return tuple(sorted(rng.sample(rng.choice(lines), count)))


def sample_scene(rng: random.Random, max_objects: int = 4, max_groups: int = 3) -> Scene:
    """
    Draw a random scene: 1 to `max_groups` groups of 1 to 3 identical objects, at most `max_objects` objects in all.

    Args:
        rng (`random.Random`):
            The only source of randomness, so a seeded `rng` gives the same scene.
        max_objects (`int`, *optional*, defaults to 4):
            The most objects in the scene (1 to 9).
        max_groups (`int`, *optional*, defaults to 3):
            The most groups (distinct kinds of object).

    Example:

    ```python
    >>> import random
    >>> from vlbridge.data.synthetic import sample_scene
    >>> sample_scene(random.Random(0)) == sample_scene(random.Random(0))
    True
    ```
    """
    if not 1 <= max_objects <= GRID * GRID:
        raise ValueError(f"`max_objects` must be between 1 and {GRID * GRID}, got {max_objects}.")
    max_groups = max(1, min(max_groups, max_objects, len(SHAPES), len(COLOURS)))
    while True:
        num_groups = rng.randint(1, max_groups)
        counts, budget = [], max_objects - num_groups
        for _ in range(num_groups):
            extra = rng.randint(0, min(MAX_PER_GROUP - 1, budget))
            counts.append(1 + extra)
            budget -= extra
        rng.shuffle(counts)
        shapes, colours = rng.sample(SHAPES, num_groups), rng.sample(sorted(COLOURS), num_groups)
        free = {(row, column) for row in range(GRID) for column in range(GRID)}
        groups = []
        # Larger groups first: they need a line with enough free cells.
        for index in sorted(range(num_groups), key=lambda i: -counts[i]):
            cells = _place_group(rng, counts[index], free)
            if cells is None:
                break
            free -= set(cells)
            groups.append(ObjectGroup(shapes[index], colours[index], rng.choice(SIZES), cells))
        else:
            return Scene(tuple(sorted(groups, key=lambda group: group.cells[0])))


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


def _shape_polygon(shape: str, x0: int, y0: int, extent: int) -> list[tuple[float, float]] | None:
    x1, y1, cx, cy = x0 + extent - 1, y0 + extent - 1, x0 + (extent - 1) / 2, y0 + (extent - 1) / 2
    if shape == "triangle":
        return [(cx, y0), (x0, y1), (x1, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "star":
        outer, inner = (extent - 1) / 2, (extent - 1) / 2 * 0.45
        return [
            (cx + r * math.sin(math.pi * k / 5), cy - r * math.cos(math.pi * k / 5))
            for k, r in zip(range(10), [outer, inner] * 5)
        ]
    return None


def draw_object(draw: ImageDraw.ImageDraw, shape: str, colour: str, box: tuple[int, int, int, int]) -> None:
    """
    Draw one shape filling the square pixel box `(x0, y0, x1, y1)` (exclusive right / bottom, like `Image.crop`).

    Args:
        draw (`PIL.ImageDraw.ImageDraw`): Where to draw.
        shape (`str`): One of `SHAPES`.
        colour (`str`): One of `COLOURS`; drawn without anti-aliasing, so the image holds the exact palette value.
        box (`tuple[int, int, int, int]`): A square box.

    Example:

    ```python
    >>> from PIL import Image, ImageDraw
    >>> from vlbridge.data.synthetic import draw_object
    >>> image = Image.new("RGB", (16, 16), "white")
    >>> draw_object(ImageDraw.Draw(image), "square", "red", (4, 4, 12, 12))
    >>> image.getpixel((8, 8)), image.getpixel((2, 2))
    ((220, 40, 40), (255, 255, 255))
    ```
    """
    x0, y0, x1, _ = box
    extent, fill = x1 - x0, COLOURS[colour]
    if shape == "circle":
        draw.ellipse((x0, y0, x0 + extent - 1, y0 + extent - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x0 + extent - 1, y0 + extent - 1), fill=fill)
    elif shape == "cross":
        arm = max(1, round(extent / 3))
        start = x0 + (extent - arm) // 2
        draw.rectangle((start, y0, start + arm - 1, y0 + extent - 1), fill=fill)
        start = y0 + (extent - arm) // 2
        draw.rectangle((x0, start, x0 + extent - 1, start + arm - 1), fill=fill)
    elif shape in SHAPES:
        draw.polygon(_shape_polygon(shape, x0, y0, extent), fill=fill)
    else:
        raise ValueError(f"Unknown shape {shape!r}; choose one of {SHAPES}.")


def render_scene(
    scene: Scene, image_size: int = 64, rng: random.Random | None = None
) -> tuple[Image.Image, list[list[int]]]:
    """
    Draw a scene on a white background; each object's size and offset inside its cell are jittered by `rng`.

    Args:
        scene (`Scene`): What to draw.
        image_size (`int`, *optional*, defaults to 64): Width and height in pixels (at least 24).
        rng (`random.Random`, *optional*): Source of the jitter; `None` draws every object centred at its mean size.

    Returns:
        `tuple[PIL.Image.Image, list[list[int]]]`: the RGB image, and the `[x0, y0, x1, y1]` box of each object of
        `scene.objects` (exclusive right / bottom).

    Example:

    ```python
    >>> import random
    >>> from vlbridge.data.synthetic import render_scene, sample_scene
    >>> image, boxes = render_scene(sample_scene(random.Random(0)), image_size=48, rng=random.Random(0))
    >>> image.size, len(boxes) >= 1
    ((48, 48), True)
    ```
    """
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"`image_size` must be at least {_MIN_IMAGE_SIZE} pixels to draw shapes, got {image_size}.")
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    edges = [round(i * image_size / GRID) for i in range(GRID + 1)]
    boxes = []
    for obj in scene.objects:
        # A one-pixel margin inside every cell keeps neighbouring objects from touching.
        left, top = edges[obj.column] + 1, edges[obj.row] + 1
        cell = min(edges[obj.column + 1] - left, edges[obj.row + 1] - top) - 1
        low, high = _EXTENT[obj.size]
        fraction = rng.uniform(low, high) if rng is not None else (low + high) / 2
        extent = max(3, round(fraction * cell))
        slack = cell - extent
        dx, dy = (rng.randint(0, slack), rng.randint(0, slack)) if rng is not None else (slack // 2, slack // 2)
        box = (left + dx, top + dy, left + dx + extent, top + dy + extent)
        draw_object(draw, obj.shape, obj.colour, box)
        boxes.append(list(box))
    return image, boxes


# ---------------------------------------------------------------------------------------------------------------
# Caption writers: each returns a true sentence about the scene, or None when it has nothing true to say
# ---------------------------------------------------------------------------------------------------------------


def _noun_phrase(group: ObjectGroup, size: bool = True, colour: bool = True, one: str = "a") -> str:
    words = [one if group.count == 1 else COUNT_WORDS[group.count]]
    words += [group.size] if size else []
    words += [group.colour] if colour else []
    words.append(group.shape if group.count == 1 else PLURALS[group.shape])
    return " ".join(words)


def _region_phrase(group: ObjectGroup) -> str:
    region = group.region
    if region.endswith(("row", "column")):
        return f"in the {region}"
    return CELL_PHRASES.get(region, f"at the {region}")


def _relation(first: ObjectGroup, second: ObjectGroup) -> str | None:
    """A spatial relation that holds between every object of `first` and every object of `second`, if any."""
    rows = ([r for r, _ in first.cells], [r for r, _ in second.cells])
    columns = ([c for _, c in first.cells], [c for _, c in second.cells])
    if max(columns[0]) < min(columns[1]):
        return "left of"
    if min(columns[0]) > max(columns[1]):
        return "right of"
    if max(rows[0]) < min(rows[1]):
        return "above"
    if min(rows[0]) > max(rows[1]):
        return "below"
    return None


def describe_full(scene: Scene) -> str:
    """Every group with count, size, colour and shape: "two small red circles and a large blue square"."""
    return " and ".join(_noun_phrase(group) for group in scene.groups)


def describe_positions(scene: Scene) -> str:
    """Every group with where it lies; unique per scene layout: "a large blue square at the top left and ..."."""
    return " and ".join(f"{_noun_phrase(group)} {_region_phrase(group)}" for group in scene.groups)


def describe_relation(scene: Scene) -> str | None:
    """The first pair of groups in caption order with a strict relation: "two small red circles left of a ..."."""
    for i, first in enumerate(scene.groups):
        for second in scene.groups[i + 1 :]:
            relation = _relation(first, second)
            if relation is not None:
                return f"{_noun_phrase(first)} {relation} {_noun_phrase(second)}"
    return None


def describe_counts(scene: Scene) -> str:
    """Counts first: "there are two red circles and one blue square"."""
    verb = "is" if scene.groups[0].count == 1 else "are"
    return f"there {verb} " + " and ".join(_noun_phrase(group, size=False, one="one") for group in scene.groups)


def describe_attributes(scene: Scene) -> str:
    """Size and colour per shape: "the circles are small and red and the square is large and blue"."""
    parts = []
    for group in scene.groups:
        noun, verb = (group.shape, "is") if group.count == 1 else (PLURALS[group.shape], "are")
        parts.append(f"the {noun} {verb} {group.size} and {group.colour}")
    return " and ".join(parts)


def describe_picture(scene: Scene) -> str:
    """A paraphrase of the full description, used to pad when a scene has too few other true captions."""
    return "a picture of " + describe_full(scene)


# Writers by name, in the order captions are listed; "full" always comes first and "picture" only pads.
CAPTION_WRITERS: dict[str, Callable[[Scene], str | None]] = {
    "full": describe_full,
    "positions": describe_positions,
    "relation": describe_relation,
    "counts": describe_counts,
    "attributes": describe_attributes,
    "picture": describe_picture,
}
MAX_CAPTIONS_PER_IMAGE = len(CAPTION_WRITERS) - 1


def write_captions(scene: Scene, num_captions: int, rng: random.Random | None = None) -> list[tuple[str, str]]:
    """
    `num_captions` distinct true `(style, caption)` pairs: the full description, then others drawn by `rng`.

    Args:
        scene (`Scene`): What to describe.
        num_captions (`int`): How many captions (1 to 5).
        rng (`random.Random`, *optional*): Which other styles to use; `None` takes them in `CAPTION_WRITERS` order.

    Example:

    ```python
    >>> from vlbridge.data.synthetic import ObjectGroup, Scene, write_captions
    >>> circles = ObjectGroup("circle", "red", "small", ((0, 0), (1, 0)))
    >>> scene = Scene((circles, ObjectGroup("square", "blue", "large", ((1, 2),))))
    >>> for style, caption in write_captions(scene, 5):
    ...     print(f"{style}: {caption}")
    full: two small red circles and a large blue square
    positions: two small red circles in the left column and a large blue square on the right
    relation: two small red circles left of a large blue square
    counts: there are two red circles and one blue square
    attributes: the circles are small and red and the square is large and blue
    ```
    """
    if not 1 <= num_captions <= MAX_CAPTIONS_PER_IMAGE:
        raise ValueError(f"`captions_per_image` must be between 1 and {MAX_CAPTIONS_PER_IMAGE}, got {num_captions}.")
    others = [name for name in CAPTION_WRITERS if name not in ("full", "picture")]
    candidates = {name: CAPTION_WRITERS[name](scene) for name in others}
    available = [name for name in others if candidates[name] is not None]
    wanted = min(len(available), num_captions - 1)
    chosen = available[:wanted] if rng is None else rng.sample(available, wanted)
    chosen = [name for name in available if name in chosen]  # keep the writers' order for readability
    captions = [("full", describe_full(scene))] + [(name, candidates[name]) for name in chosen]
    if len(captions) < num_captions:
        captions.append(("picture", describe_picture(scene)))
    return captions


def caption_vocabulary() -> list[str]:
    """
    Every word that can appear in a synthetic caption, for `build_word_tokenizer`.

    Example:

    ```python
    >>> from vlbridge.data import build_word_tokenizer
    >>> from vlbridge.data.synthetic import caption_vocabulary
    >>> tokenizer = build_word_tokenizer(caption_vocabulary())
    >>> tokenizer.unk_token_id in tokenizer("two small red circles left of a large blue square").input_ids
    False
    ```
    """
    function_words = ["a", "and", "the", "there", "is", "are", "of", "picture", "at", "on", "in", "row", "column"]
    function_words += ["left", "right", "above", "below", "top", "middle", "bottom", "centre"]
    words = function_words + list(COUNT_WORDS.values()) + list(SIZES) + list(COLOURS) + list(SHAPES)
    return list(dict.fromkeys(words + list(PLURALS.values())))


# ---------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------


def require_datasets():
    """The `datasets` module, or an error naming the fix (it is an optional dependency of vlbridge)."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            "vlbridge's data loaders need `datasets` (a requirement of vlbridge): `pip install datasets`."
        ) from error
    return datasets


def synthetic_features() -> Features:
    """The `datasets.Features` of `make_synthetic_image_text` splits (see its docstring for what each column holds)."""
    datasets = require_datasets()
    value, string = datasets.Value, datasets.Value("string")
    objects = {"shape": string, "colour": string, "size": string, "position": string}
    objects["bbox"] = datasets.List(value("int32"), length=4)
    return datasets.Features(
        {
            "image": datasets.Image(),
            "caption": string,
            "image_id": value("int64"),
            "caption_style": string,
            "objects": datasets.List(objects),
        }
    )


DEFAULT_SPLITS = {"train": 1000, "validation": 100, "test": 100}
_MAX_TRIES_PER_IMAGE = 200


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _generate_split(
    name: str,
    num_images: int,
    first_id: int,
    seen: set[str],
    *,
    image_size: int,
    seed: int,
    captions_per_image: int,
    max_objects: int,
) -> dict[str, list]:
    # A split's random stream depends only on (seed, split name), so growing "train" leaves "test" unchanged.
    rng = random.Random(f"vlbridge-synthetic:{seed}:{name}")
    columns: dict[str, list] = {key: [] for key in ("image", "caption", "image_id", "caption_style", "objects")}
    for offset in range(num_images):
        for _ in range(_MAX_TRIES_PER_IMAGE):
            scene = sample_scene(rng, max_objects=max_objects)
            # The positions caption names every group's kind, count and region: distinct across all splits, so no
            # two images (in particular no train and test images) share a scene or their most specific caption.
            key = describe_positions(scene)
            if key not in seen:
                break
        else:
            raise ValueError(
                f"Could not draw {num_images} distinct scenes for split {name!r} with max_objects={max_objects}; "
                "raise `max_objects` or ask for fewer images."
            )
        seen.add(key)
        image, boxes = render_scene(scene, image_size, rng)
        encoded = {"bytes": _png_bytes(image), "path": None}
        objects = [{**obj, "bbox": box} for obj, box in zip(scene.to_objects(), boxes)]
        for style, caption in write_captions(scene, captions_per_image, rng):
            columns["image"].append(encoded)
            columns["caption"].append(caption)
            columns["image_id"].append(first_id + offset)
            columns["caption_style"].append(style)
            columns["objects"].append(objects)
    return columns


def make_synthetic_image_text(
    num_images_per_split: dict[str, int] | None = None,
    image_size: int = 64,
    seed: int = 0,
    captions_per_image: int = 3,
    max_objects: int = 4,
) -> DatasetDict:
    """
    A deterministic image-text dataset of coloured shapes with several true compositional captions per image.

    Layout: **one row per (image, caption) pair**, like an image-text training set; an image appears
    `captions_per_image` times, with the same `image_id`. `group_captions` gives one row per image (`captions`
    list) for retrieval evaluation, and `explode_captions` turns that back into pairs.

    Columns:
        - `image` (`datasets.Image()`): an RGB PNG, `image_size` x `image_size`, white background, exact palette
          colours (no anti-aliasing).
        - `caption` (`string`): a true sentence over the words of `caption_vocabulary()`.
        - `image_id` (`int64`): unique across splits, numbered in the order of `num_images_per_split`.
        - `caption_style` (`string`): which writer produced it: `full` (always the first caption of an image),
          `positions`, `relation`, `counts`, `attributes`, or `picture` (padding paraphrase).
        - `objects` (list of `{shape, colour, size, position, bbox}`): the scene, one entry per object; `position`
          is a cell of the 3x3 grid ("top left", ..., "centre", ..., "bottom right"); `bbox` is `[x0, y0, x1, y1]`.
          `Scene.from_objects` rebuilds the scene for generating other texts (questions, dialogues).

    Args:
        num_images_per_split (`dict[str, int]`, *optional*):
            Number of images per split; defaults to `{"train": 1000, "validation": 100, "test": 100}`.
        image_size (`int`, *optional*, defaults to 64):
            Image width and height in pixels (at least 24).
        seed (`int`, *optional*, defaults to 0):
            The same seed gives byte-identical images and identical captions. Each split draws from its own random
            stream and the evaluation splits are drawn first, so growing `"train"` never changes them.
        captions_per_image (`int`, *optional*, defaults to 3):
            Distinct captions per image (1 to 5): the full description, then other true descriptions chosen at
            random, padded with a paraphrase when a scene has too few.
        max_objects (`int`, *optional*, defaults to 4):
            The most objects in an image (1 to 9); an image holds 1 to 3 groups of 1 to 3 identical objects.

    Returns:
        `datasets.DatasetDict`: the requested splits, no scene shared between splits or within one.

    Example:

    ```python
    >>> from vlbridge.data import make_synthetic_image_text
    >>> data = make_synthetic_image_text({"train": 8, "test": 2}, captions_per_image=2)
    >>> data["train"].num_rows, data["test"][0]["image_id"]
    (16, 8)
    >>> data["train"][0]["image"].size
    (64, 64)
    >>> sorted(data["train"][0]["objects"][0])
    ['bbox', 'colour', 'position', 'shape', 'size']
    ```
    """
    require_datasets()
    splits = dict(DEFAULT_SPLITS if num_images_per_split is None else num_images_per_split)
    if any(int(n) < 0 for n in splits.values()):
        raise ValueError(f"Split sizes must be non-negative, got {splits}.")
    options = {"image_size": image_size, "seed": seed, "captions_per_image": captions_per_image}
    options["max_objects"] = max_objects
    first_ids, next_id = {}, 0
    for name, size in splits.items():
        first_ids[name], next_id = next_id, next_id + int(size)
    # Evaluation splits draw their scenes first, so "train" is the one that avoids them, whatever its size.
    seen: set[str] = set()
    columns = {}
    for name in sorted(splits, key=lambda split: split == "train"):
        columns[name] = _generate_split(name, int(splits[name]), first_ids[name], seen, **options)
    datasets, features = require_datasets(), synthetic_features()
    splits = {name: datasets.Dataset.from_dict(columns[name], features=features) for name in splits}
    return datasets.DatasetDict(splits)


def _rebuild(dataset: Dataset, rows: list[int], columns: dict[str, tuple[str, object, list]]) -> Dataset:
    """Rows `rows` of `dataset`, with column `old` replaced by `(new, feature, values)`, without decoding images."""
    datasets = require_datasets()
    import pyarrow as pa
    from datasets.table import InMemoryTable

    table = dataset.with_format("arrow")[rows] if rows else dataset.with_format("arrow")[:0]
    features = dict(dataset.features)
    for old, (new, feature, values) in columns.items():
        # Each new column takes the old one's place, so grouping then exploding restores the column order.
        features = {new if name == old else name: feature if name == old else kept for name, kept in features.items()}
        type_ = datasets.Features({new: feature}).arrow_schema.field(new).type
        table = table.set_column(table.column_names.index(old), new, pa.array(values, type=type_))
    info = datasets.DatasetInfo(features=datasets.Features(features))
    return datasets.Dataset(InMemoryTable(table), info=info)


def group_captions(dataset: Dataset) -> Dataset:
    """
    One row per image: the pair rows of each `image_id` merged into `captions` (and `caption_styles` if present).

    Rows keep the order of each image's first pair; images are not decoded.

    Args:
        dataset (`datasets.Dataset`): Pairs with `image_id` and `caption` columns (synthetic or local data).

    Example:

    ```python
    >>> from vlbridge.data import group_captions, make_synthetic_image_text
    >>> images = group_captions(make_synthetic_image_text({"test": 4}, captions_per_image=3)["test"])
    >>> images.num_rows, len(images[0]["captions"])
    (4, 3)
    ```
    """
    datasets = require_datasets()
    ids = list(dataset["image_id"])
    first_rows: dict[int, int] = {}
    for row, image_id in enumerate(ids):
        first_rows.setdefault(image_id, row)
    columns = {}
    for column, plural in (("caption", "captions"), ("caption_style", "caption_styles")):
        if column in dataset.column_names:
            grouped: dict[int, list] = {image_id: [] for image_id in first_rows}
            for image_id, value in zip(ids, dataset[column]):
                grouped[image_id].append(value)
            columns[column] = (plural, datasets.List(dataset.features[column]), list(grouped.values()))
    return _rebuild(dataset, list(first_rows.values()), columns)


def explode_captions(dataset: Dataset) -> Dataset:
    """
    One row per (image, caption) pair from one row per image with a `captions` list (the inverse of
    `group_captions`); images are not decoded.

    Args:
        dataset (`datasets.Dataset`): Rows with a `captions` column (and optionally `caption_styles`).

    Example:

    ```python
    >>> from vlbridge.data import explode_captions, group_captions, make_synthetic_image_text
    >>> pairs = make_synthetic_image_text({"test": 4})["test"]
    >>> list(explode_captions(group_captions(pairs))["caption"]) == list(pairs["caption"])
    True
    ```
    """
    captions = list(dataset["captions"])
    empty = sum(not texts for texts in captions)
    if empty:
        logger.warning(f"explode_captions: {empty} of {len(captions)} images have no caption and were left out.")
    rows = [row for row, texts in enumerate(captions) for _ in texts]
    columns = {}
    for plural, column in (("captions", "caption"), ("caption_styles", "caption_style")):
        if plural in dataset.column_names:
            flat = [value for values in dataset[plural] for value in values]
            columns[plural] = (column, dataset.features[plural].feature, flat)
    return _rebuild(dataset, rows, columns)


__all__ = [
    "CAPTION_WRITERS",
    "COLOURS",
    "SHAPES",
    "SIZES",
    "ObjectGroup",
    "Scene",
    "SceneObject",
    "caption_vocabulary",
    "draw_object",
    "explode_captions",
    "group_captions",
    "make_synthetic_image_text",
    "render_scene",
    "require_datasets",
    "sample_scene",
    "synthetic_features",
    "write_captions",
]
