"""
Built-in chat data that stretches a VLM beyond one small image, on the scenes and renderer of
`vlbridge.data.synthetic`, in the `messages` / `images` format of TRL's `SFTTrainer`:

- `make_synthetic_multi_image`: two images per conversation and a question that needs both, "which image has more
  circles?" -> "the first image" / "the second image";
- `make_synthetic_small_objects`: large images (96-192 px) whose objects are all small, each covering about 1.4-2.4 %
  of the image, with the questions of `vlbridge.data.synthetic_vqa` (a model that downsizes the image to its vision
  tower's resolution loses them; any-res tiling keeps them).

Both draw every scene afresh from a seeded stream, never show a scene twice across splits (evaluation splits are drawn
first, so growing `"train"` never changes them), and use only words of `multi_image_vocabulary()`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from .synthetic import (
    DEFAULT_SPLITS,
    PLURALS,
    Scene,
    _png_bytes,
    describe_full,
    describe_positions,
    render_scene,
    require_datasets,
    sample_scene,
    synthetic_features,
)
from .synthetic_vqa import (
    CAPTION_PROMPT,
    QUESTION_WRITERS,
    _check_types,
    _words,
    chat_features,
    chat_vocabulary,
    to_messages,
)


if TYPE_CHECKING:
    from datasets import DatasetDict


MULTI_IMAGE_QUESTION_TYPES = ("more", "find")
ORDINALS = ("first", "second")
ANSWER_TEMPLATE = "the {} image"
# Every question type of `synthetic_vqa` but size (every object is small), and captions.
SMALL_OBJECT_TURN_TYPES = ("colour", "shape", "count", "position", "exists", "caption")
_MAX_TRIES = 200


# ---------------------------------------------------------------------------------------------------------------
# Two-image questions
# ---------------------------------------------------------------------------------------------------------------


def _counts(scene: Scene, key: Callable) -> dict[str, int]:
    counts: dict[str, int] = {}
    for group in scene.groups:
        counts[key(group)] = counts.get(key(group), 0) + group.count
    return counts


def ask_which_has_more(scenes: tuple[Scene, Scene], rng: random.Random) -> tuple[str, str] | None:
    """
    "which image has more circles?" (or "... more red objects?", "... more objects?") about a shape, colour or all
    objects whose counts differ between the two scenes, answered "the first image" / "the second image".

    Example:

    ```python
    >>> import random
    >>> from vlbridge.data.synthetic import ObjectGroup, Scene
    >>> from vlbridge.data.synthetic_multi import ask_which_has_more
    >>> first = Scene((ObjectGroup("circle", "red", "small", ((0, 0),)),))
    >>> second = Scene((ObjectGroup("circle", "blue", "large", ((0, 0), (0, 1))),))
    >>> ask_which_has_more((first, second), random.Random(0))
    ('which image has more objects?', 'the second image')
    ```
    """
    options = []
    for key, noun in ((lambda g: g.shape, lambda v: PLURALS[v]), (lambda g: g.colour, lambda v: f"{v} objects")):
        first, second = _counts(scenes[0], key), _counts(scenes[1], key)
        for value in sorted(set(first) | set(second)):
            if first.get(value, 0) != second.get(value, 0):
                options.append((noun(value), int(second.get(value, 0) > first.get(value, 0))))
    totals = [len(scene.objects) for scene in scenes]
    if totals[0] != totals[1]:
        options.append(("objects", int(totals[1] > totals[0])))
    if not options:
        return None
    noun, index = rng.choice(options)
    return f"which image has more {noun}?", ANSWER_TEMPLATE.format(ORDINALS[index])


def ask_which_has(scenes: tuple[Scene, Scene], rng: random.Random) -> tuple[str, str] | None:
    """
    "which image has a red circle?" (or "... a circle?") about a kind of object only one of the two scenes holds,
    answered "the first image" / "the second image".

    Example:

    ```python
    >>> import random
    >>> from vlbridge.data.synthetic import ObjectGroup, Scene
    >>> from vlbridge.data.synthetic_multi import ask_which_has
    >>> first = Scene((ObjectGroup("circle", "red", "small", ((0, 0),)),))
    >>> second = Scene((ObjectGroup("square", "red", "large", ((0, 0),)),))
    >>> ask_which_has((first, second), random.Random(0))
    ('which image has a square?', 'the second image')
    ```
    """
    kinds = [{(g.colour, g.shape) for g in scene.groups} for scene in scenes]
    shapes = [{g.shape for g in scene.groups} for scene in scenes]
    options = []
    for index in (0, 1):
        options += [(f"{colour} {shape}", index) for colour, shape in sorted(kinds[index] - kinds[1 - index])]
        options += [(shape, index) for shape in sorted(shapes[index] - shapes[1 - index])]
    if not options:
        return None
    noun, index = rng.choice(options)
    article = "an" if noun[0] in "aeiou" else "a"
    return f"which image has {article} {noun}?", ANSWER_TEMPLATE.format(ORDINALS[index])


MULTI_IMAGE_WRITERS: dict[str, Callable] = {"more": ask_which_has_more, "find": ask_which_has}


def multi_image_vocabulary() -> list[str]:
    """
    Every word of `make_synthetic_multi_image` and `make_synthetic_small_objects`: `chat_vocabulary()` plus the
    two-image questions' words.

    Example:

    ```python
    >>> from vlbridge.data import build_word_tokenizer
    >>> from vlbridge.data.synthetic_multi import multi_image_vocabulary
    >>> tokenizer = build_word_tokenizer(multi_image_vocabulary())
    >>> tokenizer.unk_token_id in tokenizer("which image has more circles? the second image").input_ids
    False
    ```
    """
    words = _words("which image has a an more objects ?") + list(ORDINALS) + _words(ANSWER_TEMPLATE.format(""))
    return list(dict.fromkeys(chat_vocabulary() + words))


# ---------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------


def _draw_scene(rng: random.Random, seen: set[str], max_objects: int, small: bool = False) -> Scene:
    """A scene no split has shown yet (all objects small if `small`); it is added to `seen`."""
    for _ in range(_MAX_TRIES):
        scene = sample_scene(rng, max_objects=max_objects)
        if small:
            scene = Scene(tuple(replace(group, size="small") for group in scene.groups))
        key = describe_positions(scene)
        if key not in seen:
            seen.add(key)
            return scene
    raise ValueError(
        f"Could not draw a new scene with max_objects={max_objects} after {len(seen)} scenes: raise `max_objects` "
        "or ask for fewer examples."
    )


def _splits(num_per_split: dict[str, int] | None, name: str, seed: int, features, write_row: Callable) -> DatasetDict:
    """Evaluation splits first, each from its own stream; `write_row(rng, seen, columns)` appends one example."""
    datasets = require_datasets()
    splits = dict(DEFAULT_SPLITS if num_per_split is None else num_per_split)
    if any(int(size) < 0 for size in splits.values()):
        raise ValueError(f"Split sizes must be non-negative, got {splits}.")
    seen: set[str] = set()
    columns = {}
    for split in sorted(splits, key=lambda split: split == "train"):
        rng = random.Random(f"vlbridge-synthetic-{name}:{seed}:{split}")
        columns[split] = {key: [] for key in features}
        for _ in range(int(splits[split])):
            write_row(rng, seen, columns[split])
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(columns[split], features=features) for split in splits}
    )


def _objects_with_boxes(scene: Scene, boxes: list[list[int]]) -> list[dict]:
    return [{**obj, "bbox": box} for obj, box in zip(scene.to_objects(), boxes)]


def make_synthetic_multi_image(
    num_examples_per_split: dict[str, int] | None = None,
    image_size: int = 64,
    seed: int = 0,
    max_objects: int = 4,
    question_types: Iterable[str] | None = None,
) -> DatasetDict:
    """
    A deterministic two-image question dataset: **one row per conversation**, two images and one question that needs
    both, answered "the first image" or "the second image" (about half of each: the images come in random order).

    Columns:
        - `images` (list of two `datasets.Image()`): in the order the question calls them first and second.
        - `messages`: a `user` message `[{"type": "image"}, {"type": "image"}, {"type": "text", ...}]` and an
          `assistant` answer (image entries stored with `text` None, as in `make_synthetic_chat`).
        - `question_type` (`string`): `"more"` ("which image has more circles?", see `ask_which_has_more`) or
          `"find"` ("which image has a red circle?", see `ask_which_has`).
        - `objects` (list of two `objects` lists, as in `make_synthetic_image_text`): each image's scene.

    Args:
        num_examples_per_split (`dict[str, int]`, *optional*):
            Conversations per split; defaults to `{"train": 1000, "validation": 100, "test": 100}`. No scene appears
            twice in the whole dataset.
        image_size (`int`, *optional*, defaults to 64):
            Width and height of each image (at least 24).
        seed (`int`, *optional*, defaults to 0):
            The same seed gives byte-identical images and identical texts.
        max_objects (`int`, *optional*, defaults to 4):
            The most objects per image (1 to 9).
        question_types (`Iterable[str]`, *optional*):
            Among `MULTI_IMAGE_QUESTION_TYPES` (`"more"`, `"find"`); defaults to both.

    Example:

    ```python
    >>> from vlbridge.data import make_synthetic_multi_image
    >>> row = make_synthetic_multi_image({"train": 2})["train"][0]
    >>> len(row["images"]), [entry["type"] for entry in row["messages"][0]["content"]]
    (2, ['image', 'image', 'text'])
    >>> row["messages"][0]["content"][2]["text"], row["messages"][1]["content"][0]["text"]
    ('which image has more pink objects?', 'the first image')
    ```
    """
    types = _check_types(question_types, MULTI_IMAGE_QUESTION_TYPES, "question_types")
    datasets = require_datasets()
    chat = chat_features()
    features = datasets.Features(
        {
            "images": chat["images"],
            "messages": chat["messages"],
            "question_type": datasets.Value("string"),
            "objects": datasets.List(synthetic_features()["objects"]),
        }
    )

    def write_row(rng, seen, columns):
        for _ in range(_MAX_TRIES):
            scenes = (_draw_scene(rng, seen, max_objects), _draw_scene(rng, seen, max_objects))
            kind = rng.choice(types)
            asked = MULTI_IMAGE_WRITERS[kind](scenes, rng)
            if asked is not None:
                break
        else:
            raise ValueError(f"No {types} question fits {_MAX_TRIES} pairs of scenes; raise `max_objects`.")
        rendered = [render_scene(scene, image_size, rng) for scene in scenes]
        question, answer = asked
        messages = to_messages([(question, answer)])
        messages[0]["content"].insert(0, {"type": "image"})  # to_messages puts one image entry before the question
        columns["images"].append([{"bytes": _png_bytes(image), "path": None} for image, _ in rendered])
        columns["messages"].append(messages)
        columns["question_type"].append(kind)
        columns["objects"].append([_objects_with_boxes(s, boxes) for s, (_, boxes) in zip(scenes, rendered)])

    return _splits(num_examples_per_split, "multi-image", seed, features, write_row)


def make_synthetic_small_objects(
    num_images_per_split: dict[str, int] | None = None,
    image_size: int = 160,
    seed: int = 0,
    turns: int | tuple[int, int] = (1, 2),
    max_objects: int = 4,
    turn_types: Iterable[str] | None = None,
) -> DatasetDict:
    """
    A deterministic chat dataset of large images with small objects: the scenes of `make_synthetic_image_text` with
    every object small, so each covers about 1.4-2.4 % of the image (a 15-20 px shape in a 160 px image), and
    questions about them: **one row per image**, in the format of `make_synthetic_chat`.

    Columns:
        `images` (one `image_size` x `image_size` image), `messages`, `turn_types` (among `SMALL_OBJECT_TURN_TYPES`:
        the question types of `synthetic_vqa` but `size`, and `caption`), `image_id` (numbered across splits) and
        `objects` (with each object's `bbox`).

    Args:
        num_images_per_split (`dict[str, int]`, *optional*):
            Images per split; defaults to `{"train": 1000, "validation": 100, "test": 100}`.
        image_size (`int`, *optional*, defaults to 160):
            Width and height in pixels; 96 to 192 keeps the objects a few pixels wide after a 32 px downsizing.
        seed (`int`, *optional*, defaults to 0):
            The same seed gives byte-identical images and identical texts.
        turns (`int` or `tuple[int, int]`, *optional*, defaults to `(1, 2)`):
            Turns per conversation (between the two bounds, inclusive), each of a different type.
        max_objects (`int`, *optional*, defaults to 4):
            The most objects per image (1 to 9).
        turn_types (`Iterable[str]`, *optional*):
            Among `SMALL_OBJECT_TURN_TYPES`; defaults to all.

    Example:

    ```python
    >>> from vlbridge.data import make_synthetic_small_objects
    >>> row = make_synthetic_small_objects({"train": 2}, image_size=160)["train"][0]
    >>> row["images"][0].size, {obj["size"] for obj in row["objects"]}
    ((160, 160), {'small'})
    ```
    """
    types = _check_types(turn_types, SMALL_OBJECT_TURN_TYPES, "turn_types")
    low, high = (turns, turns) if isinstance(turns, int) else tuple(turns)
    if not 1 <= low <= high <= len(types):
        raise ValueError(f"`turns` must be a number or (min, max) range between 1 and {len(types)}, got {turns}.")
    features = chat_features()
    next_id = [0]  # image ids in the order images are drawn (evaluation splits first), unique across splits

    def write_row(rng, seen, columns):
        scene = _draw_scene(rng, seen, max_objects, small=True)
        image, boxes = render_scene(scene, image_size, rng)
        kinds = rng.sample(types, rng.randint(low, high))
        pairs = [
            (CAPTION_PROMPT, describe_full(scene)) if kind == "caption" else QUESTION_WRITERS[kind](scene, rng)
            for kind in kinds
        ]
        columns["images"].append([{"bytes": _png_bytes(image), "path": None}])
        columns["messages"].append(to_messages(pairs))
        columns["turn_types"].append(kinds)
        columns["image_id"].append(next_id[0])
        columns["objects"].append(_objects_with_boxes(scene, boxes))
        next_id[0] += 1

    return _splits(num_images_per_split, "small-objects", seed, features, write_row)


__all__ = [
    "MULTI_IMAGE_QUESTION_TYPES",
    "MULTI_IMAGE_WRITERS",
    "SMALL_OBJECT_TURN_TYPES",
    "ask_which_has",
    "ask_which_has_more",
    "make_synthetic_multi_image",
    "make_synthetic_small_objects",
    "multi_image_vocabulary",
]
