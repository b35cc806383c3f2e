"""
Built-in grounded data (referential dialogue, as Shikra and ChatSpot train it) on the scenes of
`vlbridge.data.synthetic`: boxes and points written as text, normalised to [0, 1] with three decimals
(`vlbridge.processing.format_box`), in questions and in answers.

Tasks (`GROUNDING_TASKS`), one question each:

- `rec` (referring expression comprehension): "where is the red square? answer with a box." -> "[x0, y0, x1, y1]";
- `region_caption`: "what is in the region <box>[x0, y0, x1, y1]</box>?" -> "a small red square";
- `grounded_caption`: every object named with its box, "a small red square [...] left of a large blue circle [...]";
- `point`: "point at the blue circle." -> "[x, y]", the centre of its box;
- `quadrant` (Shikra's Chessboard Test): "which quadrant holds the red square? ..." -> "top left".

Referring expressions name an object by colour and shape (sometimes with its size), which the scenes make unique
when the object's group has one object (groups differ in colour and in shape); scenes with no such object are drawn
again, and counted.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from transformers.utils import logging

from ..processing.coordinates import format_box, format_point
from .local import _chat_features
from .synthetic import (
    BACKGROUND,
    ObjectGroup,
    SceneObject,
    _png_bytes,
    _relation,
    render_scene,
    require_datasets,
    sample_scene,
)
from .synthetic import synthetic_features as _synthetic_features
from .synthetic_vqa import _check_types, to_messages


if TYPE_CHECKING:
    from datasets import Dataset, Features


logger = logging.get_logger(__name__)

GROUNDING_TASKS = ("rec", "region_caption", "grounded_caption", "point", "quadrant")
QUADRANTS = (("top left", "top right"), ("bottom left", "bottom right"))
GROUNDED_CAPTION_PROMPT = "describe the image and give the box of each object."
_QUADRANT_OPTIONS = "top left, top right, bottom left or bottom right"
_MAX_DRAWS_PER_IMAGE = 200


@dataclass
class GroundingReport:
    """
    What [`make_synthetic_grounding`] drew again or left out, so that nothing is skipped silently.

    Args:
        num_images (`int`): Images in the dataset.
        num_rows (`int`): Rows (questions) in the dataset.
        redrawn (`dict[str, int]`): Scenes drawn again, by reason: `"no_unique_object"` (every object shares its
            colour and shape with another, so no referring expression is unique), `"too_few_objects"` (fewer than
            `min_objects`).
        skipped (`dict[str, int]`): Questions left out, by task: `"quadrant"` when every uniquely named object
            crosses a centre line of the image, so no quadrant holds it whole.
    """

    num_images: int = 0
    num_rows: int = 0
    redrawn: dict[str, int] = field(default_factory=lambda: {"no_unique_object": 0, "too_few_objects": 0})
    skipped: dict[str, int] = field(default_factory=lambda: {"quadrant": 0})


# ---------------------------------------------------------------------------------------------------------------
# Objects, boxes and words
# ---------------------------------------------------------------------------------------------------------------


def object_pixel_box(pixels: np.ndarray, drawn_box: Iterable[int]) -> list[int]:
    """
    The tight box `[x0, y0, x1, y1]` (pixels, exclusive right / bottom) of the object drawn inside `drawn_box`:
    a star or a triangle does not fill the square `render_scene` draws it in, and a box that is not tight would make
    IoU targets loose. Objects never touch (a one-pixel margin inside each cell), so the drawn box holds one object.

    Args:
        pixels (`np.ndarray`): The rendered image, `(height, width, 3)` uint8.
        drawn_box (`Iterable[int]`): The box `render_scene` returned for the object.

    Example:

    ```python
    >>> import numpy as np
    >>> from PIL import Image, ImageDraw
    >>> from vlbridge.data.synthetic import draw_object
    >>> from vlbridge.data.synthetic_grounding import object_pixel_box
    >>> image = Image.new("RGB", (32, 32), "white")
    >>> draw_object(ImageDraw.Draw(image), "triangle", "red", (4, 4, 20, 20))
    >>> object_pixel_box(np.asarray(image), (4, 4, 20, 20))
    [4, 4, 20, 20]
    >>> draw_object(ImageDraw.Draw(image), "star", "blue", (4, 4, 20, 20))
    >>> object_pixel_box(np.asarray(image), (4, 4, 20, 20))
    [4, 4, 20, 20]
    ```
    """
    x0, y0, x1, y1 = (int(value) for value in drawn_box)
    inside = np.any(pixels[y0:y1, x0:x1] != np.array(BACKGROUND, dtype=pixels.dtype), axis=-1)  # (h, w)
    rows, columns = np.nonzero(inside.any(axis=1))[0], np.nonzero(inside.any(axis=0))[0]
    if not len(rows):
        raise ValueError(f"No object pixels inside {list(drawn_box)}: pass the box render_scene drew it in.")
    return [x0 + int(columns[0]), y0 + int(rows[0]), x0 + int(columns[-1]) + 1, y0 + int(rows[-1]) + 1]


def _phrase(obj: SceneObject) -> str:
    """What a region holds: "a small red square"."""
    return f"a {obj.size} {obj.colour} {obj.shape}"


def _name(obj: SceneObject, rng: random.Random) -> str:
    """A referring expression, unique for an object alone in its group: "the red square" / "the small red square"."""
    return f"the {obj.size} {obj.colour} {obj.shape}" if rng.random() < 0.5 else f"the {obj.colour} {obj.shape}"


def _quadrant(box: list[float]) -> str | None:
    """The quadrant holding the whole normalised box, or None when it crosses a centre line."""
    if box[2] <= 0.5 or box[0] >= 0.5:
        if box[3] <= 0.5 or box[1] >= 0.5:
            return QUADRANTS[int(box[1] >= 0.5)][int(box[0] >= 0.5)]
    return None


@dataclass
class _Image:
    """One rendered scene: its objects, their normalised boxes, and which ones a colour and shape name uniquely."""

    objects: tuple[SceneObject, ...]
    boxes: list[list[float]]
    unique: list[int]


# ---------------------------------------------------------------------------------------------------------------
# Task writers: (question, answer, target object index, every object named in the answer), or None to skip
# ---------------------------------------------------------------------------------------------------------------


def _write_rec(scene: _Image, rng: random.Random):
    index = rng.choice(scene.unique)
    question = f"where is {_name(scene.objects[index], rng)}? answer with a box."
    return question, format_box(scene.boxes[index]), index, [index]


def _write_region_caption(scene: _Image, rng: random.Random):
    index = rng.randrange(len(scene.objects))  # the box names the region: any object, alone in its group or not
    question = f"what is in the region <box>{format_box(scene.boxes[index])}</box>?"
    return question, _phrase(scene.objects[index]), index, [index]


def _write_grounded_caption(scene: _Image, rng: random.Random):
    named = [f"{_phrase(obj)} {format_box(box)}" for obj, box in zip(scene.objects, scene.boxes)]
    answer = " and ".join(named)
    if len(scene.objects) == 2:
        first, second = scene.objects
        relation = _relation(_single(first), _single(second))
        answer = f"{named[0]} {relation} {named[1]}" if relation else answer
    return GROUNDED_CAPTION_PROMPT, answer, 0, list(range(len(scene.objects)))


def _single(obj: SceneObject) -> ObjectGroup:
    return ObjectGroup(obj.shape, obj.colour, obj.size, ((obj.row, obj.column),))


def _write_point(scene: _Image, rng: random.Random):
    index = rng.choice(scene.unique)
    box = scene.boxes[index]
    centre = [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]
    return f"point at {_name(scene.objects[index], rng)}.", format_point(centre), index, [index]


def _write_quadrant(scene: _Image, rng: random.Random):
    whole = [index for index in scene.unique if _quadrant(scene.boxes[index]) is not None]
    if not whole:
        return None
    index = rng.choice(whole)
    question = f"which quadrant holds {_name(scene.objects[index], rng)}? {_QUADRANT_OPTIONS}?"
    return question, _quadrant(scene.boxes[index]), index, [index]


_WRITERS = {
    "rec": _write_rec,
    "region_caption": _write_region_caption,
    "grounded_caption": _write_grounded_caption,
    "point": _write_point,
    "quadrant": _write_quadrant,
}


# ---------------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------------


def grounding_features() -> Features:
    """The `datasets.Features` of [`make_synthetic_grounding`] (see its docstring for what each column holds)."""
    datasets = require_datasets()
    number = datasets.Value("float64")
    columns = dict(_chat_features())
    columns.update(task=datasets.Value("string"), answer=datasets.Value("string"))
    columns.update(target_box=datasets.List(number, length=4), target_point=datasets.List(number, length=2))
    columns.update(target_boxes=datasets.List(datasets.List(number, length=4)), image_id=datasets.Value("int64"))
    columns.update(objects=_synthetic_features()["objects"])
    return datasets.Features(columns)


def _row(task: str, rendered: _Image, rng: random.Random) -> dict | None:
    """The text and target columns of one question, or None when the image has no object the task can ask about."""
    written = _WRITERS[task](rendered, rng)
    if written is None:
        return None
    question, answer, index, named = written
    box = rendered.boxes[index]
    return {
        "messages": to_messages([(question, answer)]),
        "task": task,
        "answer": answer,
        "target_box": box,
        "target_point": [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2],
        "target_boxes": [rendered.boxes[i] for i in named],
    }


def _draw_scene(rng: random.Random, max_objects: int, min_objects: int, report: GroundingReport):
    for _ in range(_MAX_DRAWS_PER_IMAGE):
        scene = sample_scene(rng, max_objects=max_objects)
        if len(scene.objects) < min_objects:
            report.redrawn["too_few_objects"] += 1
            continue
        counts = [group.count for group in scene.groups for _ in group.cells]
        if 1 not in counts:
            report.redrawn["no_unique_object"] += 1
            continue
        return scene, [index for index, count in enumerate(counts) if count == 1]
    raise ValueError(f"Could not draw a scene with {min_objects} to {max_objects} objects: raise max_objects.")


def make_synthetic_grounding(
    num_images: int = 100,
    tasks: Iterable[str] | None = None,
    seed: int = 0,
    image_size: int = 64,
    max_objects: int = 2,
    min_objects: int = 1,
    return_report: bool = False,
) -> Dataset | tuple[Dataset, GroundingReport]:
    """
    A deterministic grounded dataset of coloured shapes: **one row per (image, task)**, a single-turn chat in the
    `messages` / `images` format of TRL's `SFTTrainer` and [`ChatCollator`], with machine-readable targets, so that
    evaluation never parses the prompt.

    Coordinates, in the text and in the targets, are normalised against the rendered (square) image: they are the
    model frame of any image processor that keeps the whole square (resize to a square, pad to square, any-res base
    view). An image processor that crops a square image (CLIP with `crop_size` below `shortest_edge`) cuts the frame:
    map with `ImageGeometry` there.

    Columns:
        - `images` (list of one `datasets.Image()`), `messages` (user: the image and the question; assistant: the
          answer).
        - `task` (`string`): one of `GROUNDING_TASKS` (see the module docstring).
        - `answer` (`string`): the assistant's text.
        - `target_box` (4 floats): the normalised tight box of the object the question is about (`rec`: the answer;
          `region_caption`: the region asked about; `grounded_caption`: the first object).
        - `target_point` (2 floats): the centre of `target_box` (`point`: the answer).
        - `target_boxes` (list of 4 floats): every object the answer names (`grounded_caption`: all of them, in the
          answer's order; otherwise `[target_box]`).
        - `image_id` (`int64`), `objects`: as in `make_synthetic_image_text`, `bbox` being the tight pixel box.

    Args:
        num_images (`int`, *optional*, defaults to 100):
            Images; each gives one row per task, but `quadrant` questions are left out (and counted) for images
            where every uniquely named object crosses a centre line.
        tasks (`Iterable[str]`, *optional*):
            Among `GROUNDING_TASKS`; defaults to all.
        seed (`int`, *optional*, defaults to 0):
            The same seed gives identical rows; a held-out set is another seed. Images depend only on `seed`,
            `image_size`, `max_objects` and `min_objects`, not on `tasks`. Layouts come from a small space (shapes,
            colours, sizes, 9 cells), so two seeds can share a layout, never its jittered rendering.
        image_size (`int`, *optional*, defaults to 64):
            Image width and height in pixels (at least 24).
        max_objects (`int`, *optional*, defaults to 2):
            The most objects in an image (1 to 9): 1 gives one-object scenes.
        min_objects (`int`, *optional*, defaults to 1):
            The fewest: `min_objects=max_objects=2` gives two-object scenes.
        return_report (`bool`, *optional*, defaults to `False`):
            Also return the [`GroundingReport`] of what was drawn again or left out (it is logged either way).

    Example:

    ```python
    >>> from vlbridge.data.synthetic_grounding import make_synthetic_grounding
    >>> data, report = make_synthetic_grounding(4, tasks=["rec", "quadrant"], return_report=True)
    >>> row = data[0]
    >>> row["task"], row["messages"][0]["content"][1]["text"], row["answer"]
    ('rec', 'where is the large red square? answer with a box.', '[0.734, 0.078, 0.969, 0.312]')
    >>> row["target_box"]  # exact: pixels / image_size
    [0.734375, 0.078125, 0.96875, 0.3125]
    >>> data.num_rows == 4 * 2 - report.skipped["quadrant"]
    True
    ```
    """
    task_names = _check_types(tasks, GROUNDING_TASKS, "tasks")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"Need 1 <= min_objects <= max_objects, got {min_objects} and {max_objects}.")
    if num_images < 0:
        raise ValueError(f"num_images must be non-negative, got {num_images}.")
    datasets, features = require_datasets(), grounding_features()
    # Scenes and renderings draw from one stream and the texts from another, so `tasks` never changes the images.
    scene_rng = random.Random(f"vlbridge-synthetic-grounding:{seed}:scenes")
    text_rng = random.Random(f"vlbridge-synthetic-grounding:{seed}:texts")
    report = GroundingReport(num_images=num_images)
    columns: dict[str, list] = {key: [] for key in features}
    for image_id in range(num_images):
        scene, unique = _draw_scene(scene_rng, max_objects, min_objects, report)
        image, drawn = render_scene(scene, image_size, scene_rng)
        pixels = np.asarray(image)
        boxes = [object_pixel_box(pixels, box) for box in drawn]
        rendered = _Image(scene.objects, [[value / image_size for value in box] for box in boxes], unique)
        shared = {
            "images": [{"bytes": _png_bytes(image), "path": None}],
            "image_id": image_id,
            "objects": [{**obj, "bbox": box} for obj, box in zip(scene.to_objects(), boxes)],
        }
        for task in task_names:
            row = _row(task, rendered, text_rng)
            if row is None:
                report.skipped[task] += 1
                continue
            for key, value in {**shared, **row}.items():
                columns[key].append(value)
    report.num_rows = len(columns["task"])
    # Left-out questions change the row count: said at warning level; redrawn scenes only shape the sampling.
    log = logger.warning if any(report.skipped.values()) else logger.info
    log(
        f"make_synthetic_grounding: {report.num_rows} rows from {num_images} images; questions left out "
        f"{report.skipped}, scenes drawn again {report.redrawn} (see GroundingReport)."
    )
    dataset = datasets.Dataset.from_dict(columns, features=features)
    return (dataset, report) if return_report else dataset


__all__ = [
    "GROUNDED_CAPTION_PROMPT",
    "GROUNDING_TASKS",
    "QUADRANTS",
    "GroundingReport",
    "grounding_features",
    "make_synthetic_grounding",
    "object_pixel_box",
]
