"""
Built-in post-training data on the scenes of `vlbridge.data.synthetic`: preference pairs against hallucination for
DPO, and chats that decline to describe absent objects for safety / helpfulness SFT.

Every image is the one `make_synthetic_image_text` (and so `make_synthetic_vqa` / `make_synthetic_chat`) draws for
the same `seed`, `image_size` and `max_objects`, so a model fine-tuned on the chat data's `"train"` split can be
post-trained on the preference `"train"` split and evaluated on `"test"` scenes it has never seen.

Preference pairs (`make_synthetic_preference`) come in four types, each with one thing wrong in the rejected answer:

- `caption`: "describe the image." -> the full description; rejected describes the scene with **one** hallucinated
  change (`edit`): a colour or shape the image does not hold, the other size, another count, or an extra object;
- `question`: a question of `vlbridge.data.synthetic_vqa` -> its right answer; rejected is a wrong answer of the same
  kind (`edit` is the question type);
- `absent`: a question about an object the image does not hold ("what colour is the star?") -> "there is no star in
  the image."; rejected answers it as if it were there (`edit` is `"absent"`);
- `present`: the same kind of question about an object the image does hold -> its right answer; rejected denies the
  object is there ("there is no circle in the image.", `edit` is `"denial"`). Without these, pairs of `absent` type
  teach a model that refusing is always preferred: it learns to refuse questions about objects it sees.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from .synthetic import (
    CELL_NAMES,
    COLOURS,
    COLUMN_NAMES,
    GRID,
    ROW_NAMES,
    SHAPES,
    SIZES,
    ObjectGroup,
    Scene,
    describe_full,
    require_datasets,
    synthetic_features,
)
from .synthetic_vqa import (
    CAPTION_PROMPT,
    NUMBER_WORDS,
    QUESTION_TYPES,
    QUESTION_WRITERS,
    _check_types,
    _scene_rows,
    _words,
    chat_features,
    chat_vocabulary,
    to_messages,
)


if TYPE_CHECKING:
    from datasets import DatasetDict, Features


PREFERENCE_TYPES = ("caption", "question", "absent", "present")
CAPTION_EDITS = ("colour", "shape", "size", "count", "object")
REFUSAL_TEMPLATE = "there is no {} in the image."


def _message(role: str, text: str, image: bool = False) -> list[dict]:
    """One message as a conversation of its own; `image=True` puts an image entry before the text."""
    content = [{"type": "image"}] * image + [{"type": "text", "text": text}]
    return [{"role": role, "content": content}]


# ---------------------------------------------------------------------------------------------------------------
# Hallucinated captions: the scene with one thing changed
# ---------------------------------------------------------------------------------------------------------------


def _free_cells(scene: Scene) -> list[tuple[int, int]]:
    used = {(obj.row, obj.column) for obj in scene.objects}
    return [(row, column) for row in range(GRID) for column in range(GRID) if (row, column) not in used]


def _edit_group(scene: Scene, rng: random.Random, edit: str) -> Scene | None:
    """`scene` with one group changed in attribute `edit`, to a value the scene does not show; None if impossible."""
    index = rng.randrange(len(scene.groups))
    group = scene.groups[index]
    if edit == "colour":
        absent = [colour for colour in sorted(COLOURS) if colour not in {g.colour for g in scene.groups}]
        changed = replace(group, colour=rng.choice(absent)) if absent else None
    elif edit == "shape":
        absent = [shape for shape in SHAPES if shape not in {g.shape for g in scene.groups}]
        changed = replace(group, shape=rng.choice(absent)) if absent else None
    elif edit == "size":
        changed = replace(group, size=SIZES[1 - SIZES.index(group.size)])
    else:  # count: one object more (into a free cell) or one fewer, never none; captions only say how many
        free = _free_cells(scene)
        more = group.count < 3 and bool(free) and (group.count == 1 or rng.random() < 0.5)
        cells = group.cells + (rng.choice(free),) if more else group.cells[:-1]
        changed = replace(group, cells=tuple(sorted(cells))) if cells else None
    if changed is None:
        return None
    return Scene(scene.groups[:index] + (changed,) + scene.groups[index + 1 :])


def _add_object(scene: Scene, rng: random.Random) -> Scene | None:
    """`scene` with one more object, of a shape and a colour it does not show, at a random place in the caption."""
    shapes = [shape for shape in SHAPES if shape not in {g.shape for g in scene.groups}]
    colours = [colour for colour in sorted(COLOURS) if colour not in {g.colour for g in scene.groups}]
    free = _free_cells(scene)
    if not (shapes and colours and free):
        return None
    extra = ObjectGroup(rng.choice(shapes), rng.choice(colours), rng.choice(SIZES), (rng.choice(free),))
    at = rng.randint(0, len(scene.groups))
    return Scene(scene.groups[:at] + (extra,) + scene.groups[at:])


def hallucinated_caption(scene: Scene, rng: random.Random, edit: str) -> str | None:
    """
    The full description of `scene` (see `describe_full`) with one hallucination, or None when `scene` leaves no room
    for that kind of change.

    Args:
        scene (`Scene`): The true scene.
        rng (`random.Random`): Which group changes, and to what.
        edit (`str`): One of `CAPTION_EDITS`: `"colour"` / `"shape"` (a group takes a colour or shape absent from the
            scene), `"size"` (the other size), `"count"` (one object more or fewer, at least one), `"object"` (an
            extra object of an absent shape and colour).

    Example:

    ```python
    >>> import random
    >>> from vlbridge.data.synthetic import ObjectGroup, Scene, describe_full
    >>> from vlbridge.data.synthetic_preference import hallucinated_caption
    >>> circles = ObjectGroup("circle", "red", "small", ((0, 0), (1, 0)))
    >>> scene = Scene((circles, ObjectGroup("square", "blue", "large", ((1, 2),))))
    >>> describe_full(scene)
    'two small red circles and a large blue square'
    >>> hallucinated_caption(scene, random.Random(0), "colour")
    'two small red circles and a large pink square'
    >>> hallucinated_caption(scene, random.Random(0), "object")
    'two small red circles and a large blue square and a small pink cross'
    ```
    """
    if edit not in CAPTION_EDITS:
        raise ValueError(f"Unknown caption edit {edit!r}; choose one of {CAPTION_EDITS}.")
    changed = _add_object(scene, rng) if edit == "object" else _edit_group(scene, rng, edit)
    return None if changed is None else describe_full(changed)


# ---------------------------------------------------------------------------------------------------------------
# Wrong answers and questions about absent objects
# ---------------------------------------------------------------------------------------------------------------


def _region_names() -> tuple[list[str], list[str]]:
    cells = [name for row in CELL_NAMES for name in row]
    lines = [f"{name} row" for name in ROW_NAMES] + [f"{name} column" for name in COLUMN_NAMES]
    return cells, lines


def wrong_answer(question_type: str, answer: str, rng: random.Random) -> str:
    """
    A wrong answer of the same kind as `answer` to a question of `question_type` (see `write_questions`): another
    colour, shape, number, region of the same kind (cell or line), the other size, or the opposite yes / no.

    Example:

    ```python
    >>> import random
    >>> from vlbridge.data.synthetic_preference import wrong_answer
    >>> wrong_answer("size", "small", random.Random(0)), wrong_answer("exists", "yes", random.Random(0))
    ('large', 'no')
    ```
    """
    cells, lines = _region_names()
    choices = {
        "colour": sorted(COLOURS),
        "shape": list(SHAPES),
        "count": list(NUMBER_WORDS),
        "position": cells if answer in cells else lines,
        "size": list(SIZES),
        "exists": ["yes", "no"],
    }[question_type]
    return rng.choice([choice for choice in choices if choice != answer])


def ask_absent(scene: Scene, rng: random.Random) -> tuple[str, str, str] | None:
    """
    A question about an object the scene does not hold, its refusal, and a hallucinated answer:
    `("what colour is the star?", "there is no star in the image.", "green")`; None if every shape and colour is in
    the scene.

    Example:

    ```python
    >>> import random
    >>> from vlbridge.data.synthetic import ObjectGroup, Scene
    >>> from vlbridge.data.synthetic_preference import ask_absent
    >>> ask_absent(Scene((ObjectGroup("circle", "red", "small", ((0, 0),)),)), random.Random(1))
    ('what colour is the cross?', 'there is no cross in the image.', 'blue')
    ```
    """
    shapes = [shape for shape in SHAPES if shape not in {g.shape for g in scene.groups}]
    colours = [colour for colour in sorted(COLOURS) if colour not in {g.colour for g in scene.groups}]
    options = [("shape", shapes)] * bool(shapes) + [("colour", colours)] * bool(colours)
    if not options:
        return None
    kind, values = rng.choice(options)
    value = rng.choice(values)
    if kind == "shape":  # asked by shape, answered (wrongly) with a colour
        return f"what colour is the {value}?", REFUSAL_TEMPLATE.format(value), rng.choice(sorted(COLOURS))
    noun = f"{value} object"
    return f"what shape is the {noun}?", REFUSAL_TEMPLATE.format(noun), rng.choice(SHAPES)


def ask_present(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    """
    The counterpart of `ask_absent` for an object the scene holds: a colour or shape question about it (`ask_colour`
    / `ask_shape` of `vlbridge.data.synthetic_vqa`), its right answer, and a false denial that the object is there.

    Example:

    ```python
    >>> import random
    >>> from vlbridge.data.synthetic import ObjectGroup, Scene
    >>> from vlbridge.data.synthetic_preference import ask_present
    >>> ask_present(Scene((ObjectGroup("circle", "red", "small", ((0, 0),)),)), random.Random(0))
    ('what shape is the red object?', 'circle', 'there is no red object in the image.')
    ```
    """
    kind = rng.choice(("colour", "shape"))
    question, answer = QUESTION_WRITERS[kind](scene, rng)
    # Groups differ in both shape and colour (see `Scene`), so the answer names the one group asked about.
    group = next(g for g in scene.groups if (g.colour if kind == "colour" else g.shape) == answer)
    noun = group.shape if kind == "colour" else f"{group.colour} object"  # singular, as `ask_absent` words it
    return question, answer, REFUSAL_TEMPLATE.format(noun)


def write_preference_pair(
    scene: Scene, rng: random.Random, pair_type: str, question_types: Iterable[str] | None = None
) -> dict[str, str] | None:
    """
    One preference pair about `scene`: `{"question", "chosen", "rejected", "pair_type", "edit"}`, or None when the
    scene leaves no room for it (e.g. no absent shape or colour).

    Args:
        scene (`Scene`): The true scene.
        rng (`random.Random`): Which question or change.
        pair_type (`str`): One of `PREFERENCE_TYPES` (`"caption"`, `"question"`, `"absent"`, `"present"`).
        question_types (`Iterable[str]`, *optional*): For `"question"` pairs, the question types to draw from
            (`QUESTION_TYPES` by default).

    Example:

    ```python
    >>> import random
    >>> from vlbridge.data.synthetic import ObjectGroup, Scene
    >>> from vlbridge.data.synthetic_preference import write_preference_pair
    >>> scene = Scene((ObjectGroup("circle", "red", "small", ((0, 0), (1, 0))),))
    >>> pair = write_preference_pair(scene, random.Random(0), "caption")
    >>> pair["chosen"], pair["rejected"], pair["edit"]
    ('two small red circles', 'a small red circle', 'count')
    ```
    """
    if pair_type == "caption":
        for edit in rng.sample(CAPTION_EDITS, len(CAPTION_EDITS)):
            rejected = hallucinated_caption(scene, rng, edit)
            if rejected is not None:
                return {
                    "question": CAPTION_PROMPT,
                    "chosen": describe_full(scene),
                    "rejected": rejected,
                    "pair_type": pair_type,
                    "edit": edit,
                }
        return None
    if pair_type == "question":
        question_type = rng.choice(list(QUESTION_TYPES if question_types is None else question_types))
        question, answer = QUESTION_WRITERS[question_type](scene, rng)
        return {
            "question": question,
            "chosen": answer,
            "rejected": wrong_answer(question_type, answer, rng),
            "pair_type": pair_type,
            "edit": question_type,
        }
    if pair_type == "absent":
        absent = ask_absent(scene, rng)
        if absent is None:
            return None
        question, refusal, hallucination = absent
        return {
            "question": question,
            "chosen": refusal,
            "rejected": hallucination,
            "pair_type": pair_type,
            "edit": "absent",
        }
    if pair_type == "present":
        question, answer, denial = ask_present(scene, rng)
        return {"question": question, "chosen": answer, "rejected": denial, "pair_type": pair_type, "edit": "denial"}
    raise ValueError(f"Unknown preference pair type {pair_type!r}; choose one of {PREFERENCE_TYPES}.")


def preference_vocabulary() -> list[str]:
    """
    Every word of `make_synthetic_preference` and `make_synthetic_safety_chat`: `chat_vocabulary()` already holds
    them all (checked here), so a tokenizer built for the chat data serves for post-training too.

    Example:

    ```python
    >>> from vlbridge.data.synthetic_preference import preference_vocabulary
    >>> from vlbridge.data.synthetic_vqa import chat_vocabulary
    >>> preference_vocabulary() == chat_vocabulary()
    True
    ```
    """
    vocabulary = chat_vocabulary()
    missing = [word for word in _words(REFUSAL_TEMPLATE.format("object")) if word not in vocabulary]
    return vocabulary + missing


# ---------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------


def preference_features() -> Features:
    """The `datasets.Features` of `make_synthetic_preference` splits (see its docstring for what each column holds)."""
    datasets = require_datasets()
    string = datasets.Value("string")
    messages = chat_features()["messages"]
    return datasets.Features(
        {
            "images": chat_features()["images"],
            "prompt": messages,
            "chosen": messages,
            "rejected": messages,
            "pair_type": string,
            "edit": string,
            "image_id": datasets.Value("int64"),
            "objects": synthetic_features()["objects"],
        }
    )


def _scene_datasets(
    num_images_per_split, image_size: int, seed: int, max_objects: int, name: str, features, write_rows: Callable
) -> DatasetDict:
    """One dataset per split: `write_rows(scene, rng, image, image_id, objects, columns)` fills the columns."""
    datasets = require_datasets()
    splits = {}
    for split, scenes in _scene_rows(num_images_per_split, image_size, seed, max_objects).items():
        rng = random.Random(f"vlbridge-synthetic-{name}:{seed}:{split}")
        columns: dict[str, list] = {key: [] for key in features}
        for image, image_id, objects in zip(scenes["image"], scenes["image_id"], scenes["objects"]):
            write_rows(Scene.from_objects(objects), rng, image, image_id, objects, columns)
        splits[split] = datasets.Dataset.from_dict(columns, features=features)
    return datasets.DatasetDict(splits)


def make_synthetic_preference(
    num_images_per_split: dict[str, int] | None = None,
    image_size: int = 64,
    seed: int = 0,
    pairs_per_image: int = 2,
    max_objects: int = 4,
    pair_types: Iterable[str] | None = None,
    question_types: Iterable[str] | None = None,
) -> DatasetDict:
    """
    A deterministic preference dataset against hallucination, in the conversational format of TRL's `DPOTrainer`:
    **one row per (image, pair)**; the chosen answer is true of the image, the rejected one has one thing wrong.

    Columns:
        - `images` (list of `datasets.Image()`): the one image, byte-identical to `make_synthetic_chat`'s for the
          same `seed`, `image_size` and `max_objects`.
        - `prompt`: one `user` message, `[{"type": "image"}, {"type": "text", "text": question}]`.
        - `chosen`, `rejected`: one `assistant` message each, `[{"type": "text", "text": answer}]`.
        - `pair_type` (`string`): `caption`, `question`, `absent` or `present` (see the module docstring).
        - `edit` (`string`): what is wrong in `rejected`: a caption edit of `CAPTION_EDITS` (`colour`, `shape`,
          `size`, `count`, `object`), a question type of `QUESTION_TYPES`, `absent`, or `denial` (`present` pairs).
        - `image_id` (`int64`) and `objects`: as in `make_synthetic_image_text`.

    Args:
        num_images_per_split (`dict[str, int]`, *optional*):
            Number of images per split; defaults to `{"train": 1000, "validation": 100, "test": 100}`. Splits never
            share a scene, so a held-out split measures preferences on unseen images.
        image_size (`int`, *optional*, defaults to 64):
            Image width and height in pixels (at least 24).
        seed (`int`, *optional*, defaults to 0):
            The same seed gives identical rows; pairs draw from their own random stream per split.
        pairs_per_image (`int`, *optional*, defaults to 2):
            Pairs per image, each of a type drawn from `pair_types` (a type the scene leaves no room for is redrawn).
        max_objects (`int`, *optional*, defaults to 4):
            The most objects in an image (1 to 9).
        pair_types (`Iterable[str]`, *optional*):
            Among `PREFERENCE_TYPES`; defaults to all four. Keep `present` beside `absent`: alone, `absent` pairs
            reward refusing, and a model trained on them refuses questions about objects it sees too.
        question_types (`Iterable[str]`, *optional*):
            Question types of the `"question"` pairs, among `QUESTION_TYPES`; defaults to all.

    Returns:
        `datasets.DatasetDict`: the requested splits.

    Example:

    ```python
    >>> from vlbridge.data import make_synthetic_preference
    >>> data = make_synthetic_preference({"train": 4, "test": 2}, pairs_per_image=2)
    >>> data["train"].num_rows, data["test"][0]["image_id"]
    (8, 4)
    >>> row = data["train"][0]
    >>> [entry["type"] for entry in row["prompt"][0]["content"]], row["chosen"][0]["role"]
    (['image', 'text'], 'assistant')
    >>> row["pair_type"], row["chosen"][0]["content"][0]["text"], row["rejected"][0]["content"][0]["text"]
    ('caption', 'three large green circles', 'three large green circles and a large yellow star')
    ```
    """
    types = _check_types(pair_types, PREFERENCE_TYPES, "pair_types")
    questions = _check_types(question_types, QUESTION_TYPES, "question_types")
    if pairs_per_image < 1:
        raise ValueError(f"`pairs_per_image` must be at least 1, got {pairs_per_image}.")

    def write_rows(scene, rng, image, image_id, objects, columns):
        for _ in range(pairs_per_image):
            candidates = rng.sample(types, len(types))  # the drawn type first, the others if the scene has no room
            pair = next(
                filter(None, (write_preference_pair(scene, rng, kind, questions) for kind in candidates)), None
            )
            if pair is None:
                raise ValueError(f"No preference pair of types {types} fits the scene {describe_full(scene)!r}.")
            columns["images"].append([image])
            columns["prompt"].append(_message("user", pair["question"], image=True))
            columns["chosen"].append(_message("assistant", pair["chosen"]))
            columns["rejected"].append(_message("assistant", pair["rejected"]))
            columns["pair_type"].append(pair["pair_type"])
            columns["edit"].append(pair["edit"])
            columns["image_id"].append(image_id)
            columns["objects"].append(objects)

    features = preference_features()
    return _scene_datasets(num_images_per_split, image_size, seed, max_objects, "preference", features, write_rows)


def make_synthetic_safety_chat(
    num_images_per_split: dict[str, int] | None = None,
    image_size: int = 64,
    seed: int = 0,
    turns: int = 2,
    refusal_rate: float = 0.5,
    max_objects: int = 4,
    caption_rate: float = 0.0,
) -> DatasetDict:
    """
    A deterministic chat dataset for safety / helpfulness SFT: **one row per image**, in the `messages` / `images`
    format of `make_synthetic_chat`. Each turn is, with probability `refusal_rate`, a question about an object the
    image does not hold, answered with a refusal to make it up ("what colour is the star?" -> "there is no star in
    the image."); otherwise a true question (`write_questions`) with its right answer, so the model learns both to
    answer and to decline. With `caption_rate`, some of the other turns ask for the full description instead
    (`CAPTION_PROMPT`), so that a model fine-tuned on these chats keeps describing images.

    Columns:
        `images`, `messages`, `turn_types` (each `"absent"`, `"caption"` or a question type), `image_id` and
        `objects`, as in `make_synthetic_chat`.

    Args:
        num_images_per_split (`dict[str, int]`, *optional*):
            Number of images (conversations) per split; defaults to `{"train": 1000, "validation": 100, "test": 100}`.
        image_size (`int`, *optional*, defaults to 64):
            Image width and height in pixels (at least 24).
        seed (`int`, *optional*, defaults to 0):
            The same seed gives identical rows.
        turns (`int`, *optional*, defaults to 2):
            Turns per conversation.
        refusal_rate (`float`, *optional*, defaults to 0.5):
            Share of turns about an absent object.
        max_objects (`int`, *optional*, defaults to 4):
            The most objects in an image (1 to 9).
        caption_rate (`float`, *optional*, defaults to 0.0):
            Share of the turns that are not refusals which ask for the full description. LoRA SFT on refusals and
            questions alone made a model forget how to caption (held-out CIDEr 4.7 -> near 0, measured).

    Example:

    ```python
    >>> from vlbridge.data import make_synthetic_safety_chat
    >>> row = make_synthetic_safety_chat({"train": 2}, turns=2, refusal_rate=1.0)["train"][0]
    >>> row["turn_types"], row["messages"][1]["content"][0]["text"]
    (['absent', 'absent'], 'there is no black object in the image.')
    ```
    """
    if turns < 1 or not 0.0 <= refusal_rate <= 1.0 or not 0.0 <= caption_rate <= 1.0:
        raise ValueError(
            f"`turns` must be at least 1 and `refusal_rate` and `caption_rate` in [0, 1], got {turns}, {refusal_rate} "
            f"and {caption_rate}."
        )

    def write_rows(scene, rng, image, image_id, objects, columns):
        pairs, kinds = [], []
        for _ in range(turns):
            absent = ask_absent(scene, rng) if rng.random() < refusal_rate else None
            if absent is not None:
                pairs.append(absent[:2])
                kinds.append("absent")
            elif caption_rate and rng.random() < caption_rate:  # no draw at 0: the rows stay those of older versions
                pairs.append((CAPTION_PROMPT, describe_full(scene)))
                kinds.append("caption")
            else:
                kind = rng.choice(QUESTION_TYPES)
                pairs.append(QUESTION_WRITERS[kind](scene, rng))
                kinds.append(kind)
        columns["images"].append([image])
        columns["messages"].append(to_messages(pairs))
        columns["turn_types"].append(kinds)
        columns["image_id"].append(image_id)
        columns["objects"].append(objects)

    return _scene_datasets(num_images_per_split, image_size, seed, max_objects, "safety", chat_features(), write_rows)


__all__ = [
    "CAPTION_EDITS",
    "PREFERENCE_TYPES",
    "REFUSAL_TEMPLATE",
    "ask_absent",
    "ask_present",
    "hallucinated_caption",
    "make_synthetic_preference",
    "make_synthetic_safety_chat",
    "preference_features",
    "preference_vocabulary",
    "wrong_answer",
    "write_preference_pair",
]
