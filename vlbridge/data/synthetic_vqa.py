"""
Built-in visual question answering and multi-turn chat data on the scenes of `vlbridge.data.synthetic`.

Every image is the one `make_synthetic_image_text` draws for the same `seed`, `image_size` and `max_objects` (with
its default `captions_per_image`); only the texts differ:

- `QUESTION_WRITERS` ask one true question of each type (`colour`, `shape`, `count`, `position`, `size`,
  `exists`) about a `Scene`, answered with one or two words of the closed vocabulary `vqa_vocabulary()`;
- `make_synthetic_vqa` gives one row per (image, question);
- `make_synthetic_chat` gives one row per image with a multi-turn conversation in the `messages` / `images` format
  of TRL's `SFTTrainer` and transformers' chat templates, mixing questions with captioning turns.

Groups of a scene differ in shape and in colour, so "the circle" or "the red objects" always names one group and
every question has exactly one right answer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from .local import _chat_features
from .synthetic import (
    CELL_NAMES,
    COLOURS,
    COLUMN_NAMES,
    COUNT_WORDS,
    PLURALS,
    ROW_NAMES,
    SHAPES,
    SIZES,
    ObjectGroup,
    Scene,
    caption_vocabulary,
    describe_full,
    make_synthetic_image_text,
    require_datasets,
    synthetic_features,
)


if TYPE_CHECKING:
    from datasets import DatasetDict, Features


NUMBER_WORDS = ("zero",) + tuple(COUNT_WORDS[n] for n in sorted(COUNT_WORDS))
CAPTION_PROMPT = "describe the image."
SYSTEM_PROMPT = "look at the image and answer each question."
# Share of count questions about something absent: often enough that "zero" is a real answer to learn.
_ABSENT_COUNT_RATE = 0.25


# ---------------------------------------------------------------------------------------------------------------
# Question writers: each returns one true (question, answer) pair about the scene
# ---------------------------------------------------------------------------------------------------------------


def _verb(group: ObjectGroup) -> str:
    return "is" if group.count == 1 else "are"


def _by_shape(group: ObjectGroup) -> str:
    return group.shape if group.count == 1 else PLURALS[group.shape]


def _by_colour(group: ObjectGroup) -> str:
    return f"{group.colour} {'object' if group.count == 1 else 'objects'}"


def _by_both(group: ObjectGroup) -> str:
    return f"{group.colour} {_by_shape(group)}"


def ask_colour(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """Colour of a group named by its shape: "what colour are the circles?" -> "red"."""
    group = rng.choice(scene.groups)
    return f"what colour {_verb(group)} the {_by_shape(group)}?", group.colour


def ask_shape(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """Shape of a group named by its colour: "what shape is the blue object?" -> "square"."""
    group = rng.choice(scene.groups)
    return f"what shape {_verb(group)} the {_by_colour(group)}?", group.shape


def ask_count(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """Objects of a shape or colour: "how many circles are there?" -> "two"; absent ones sometimes -> "zero"."""
    by_shape = rng.random() < 0.5
    present = {group.shape if by_shape else group.colour for group in scene.groups}
    absent = [value for value in (SHAPES if by_shape else sorted(COLOURS)) if value not in present]
    if absent and rng.random() < _ABSENT_COUNT_RATE:
        value, count = rng.choice(absent), 0
    else:
        group = rng.choice(scene.groups)
        value, count = (group.shape if by_shape else group.colour), group.count
    noun = PLURALS[value] if by_shape else f"{value} objects"
    return f"how many {noun} are there?", NUMBER_WORDS[count]


def ask_position(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """Where a group lies: "where is the red square?" -> "top left"; several objects -> their line ("left column")."""
    group = rng.choice(scene.groups)
    noun = rng.choice((_by_shape, _by_colour, _by_both))(group)
    return f"where {_verb(group)} the {noun}?", group.region


def ask_size(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """Size of a group: "is the circle small or large?" -> "small"."""
    group = rng.choice(scene.groups)
    noun = rng.choice((_by_shape, _by_colour, _by_both))(group)
    return f"{_verb(group)} the {noun} small or large?", group.size


def ask_exists(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """Whether a colour and shape go together: "is there a red circle?" -> "yes" or "no", each half of the time."""
    group = rng.choice(scene.groups)
    colour, shape, answer = group.colour, group.shape, "yes"
    if rng.random() < 0.5:
        # Near misses keep one attribute of a present group, so "no" cannot be read off a single attribute. The
        # result is absent because the one group with that shape (or colour) has another colour (or shape).
        answer = "no"
        if rng.random() < 0.5:
            colour = rng.choice([other for other in sorted(COLOURS) if other != colour])
        else:
            shape = rng.choice([other for other in SHAPES if other != shape])
    article = "an" if colour[0] in "aeiou" else "a"
    return f"is there {article} {colour} {shape}?", answer


# Writers by question type; each draws its group and wording from the `rng` it is given.
QUESTION_WRITERS: dict[str, Callable[[Scene, random.Random], tuple[str, str]]] = {
    "colour": ask_colour,
    "shape": ask_shape,
    "count": ask_count,
    "position": ask_position,
    "size": ask_size,
    "exists": ask_exists,
}
QUESTION_TYPES = tuple(QUESTION_WRITERS)
# Chat turns are questions, or "caption": `CAPTION_PROMPT` answered with the full description of the scene.
CHAT_TURN_TYPES = QUESTION_TYPES + ("caption",)


def _check_types(types: Iterable[str] | None, known: tuple[str, ...], argument: str) -> list[str]:
    types = [types] if isinstance(types, str) else types  # a single type, not its letters
    types = list(known if types is None else dict.fromkeys(types))
    unknown = [name for name in types if name not in known]
    if unknown or not types:
        raise ValueError(f"`{argument}` must be a non-empty list of {list(known)}, got {types}.")
    return types


def write_questions(
    scene: Scene, rng: random.Random, question_types: Iterable[str] | None = None
) -> list[dict[str, str]]:
    """
    One true question of each type about `scene`, as `{"question", "answer", "type"}` dicts in the order of the types.

    Answers are one or two words: a colour, a shape, a number word (`"zero"` to `"three"`), a position ("top left",
    "centre", or a line such as "left column" for a group of several objects), `"small"` / `"large"`, or
    `"yes"` / `"no"` (each half of the time; "no" questions are near misses such as a present shape in another
    colour).

    Args:
        scene (`Scene`): What to ask about.
        rng (`random.Random`): Which group each question is about, and its wording.
        question_types (`Iterable[str]`, *optional*):
            Types to ask, among `QUESTION_TYPES` (`colour`, `shape`, `count`, `position`, `size`, `exists`);
            defaults to all of them.

    Example:

    ```python
    >>> import random
    >>> from vlbridge.data.synthetic import ObjectGroup, Scene
    >>> from vlbridge.data.synthetic_vqa import write_questions
    >>> circles = ObjectGroup("circle", "red", "small", ((0, 0), (1, 0)))
    >>> scene = Scene((circles, ObjectGroup("square", "blue", "large", ((1, 2),))))
    >>> for qa in write_questions(scene, random.Random(3)):
    ...     print(f"{qa['type']}: {qa['question']} {qa['answer']}")
    colour: what colour are the circles? red
    shape: what shape are the red objects? circle
    count: how many circles are there? two
    position: where are the red objects? left column
    size: is the blue square small or large? large
    exists: is there a red cross? no
    ```
    """
    types = _check_types(question_types, QUESTION_TYPES, "question_types")
    pairs = [(name, *QUESTION_WRITERS[name](scene, rng)) for name in types]
    return [{"question": question, "answer": answer, "type": name} for name, question, answer in pairs]


def _words(text: str) -> list[str]:
    """Words and punctuation as `build_word_tokenizer`'s whitespace pre-tokenizer splits them."""
    return re.findall(r"\w+|[^\w\s]+", text)


def vqa_vocabulary() -> list[str]:
    """
    Every word (and punctuation mark) of the questions and answers of `make_synthetic_vqa`, for
    `build_word_tokenizer`; `chat_vocabulary()` adds the captions and chat prompts.

    Example:

    ```python
    >>> from vlbridge.data import build_word_tokenizer
    >>> from vlbridge.data.synthetic_vqa import vqa_vocabulary
    >>> tokenizer = build_word_tokenizer(vqa_vocabulary())
    >>> tokenizer.unk_token_id in tokenizer("where are the red circles? left column").input_ids
    False
    ```
    """
    question_words = "what colour shape is are the object objects how many there where small or large a an ?".split()
    regions = [word for row in CELL_NAMES for name in row for word in name.split()]
    regions += list(ROW_NAMES) + list(COLUMN_NAMES) + ["row", "column"]
    answers = ["yes", "no", *NUMBER_WORDS, *SIZES, *sorted(COLOURS), *SHAPES, *regions]
    return list(dict.fromkeys(question_words + answers + list(PLURALS.values())))


def chat_vocabulary() -> list[str]:
    """
    Every word of `make_synthetic_chat` conversations: `vqa_vocabulary()`, `caption_vocabulary()` and the prompts.

    Example:

    ```python
    >>> from vlbridge.data.synthetic import caption_vocabulary
    >>> from vlbridge.data.synthetic_vqa import chat_vocabulary, vqa_vocabulary
    >>> set(vqa_vocabulary()) | set(caption_vocabulary()) < set(chat_vocabulary())
    True
    ```
    """
    prompts = _words(CAPTION_PROMPT) + _words(SYSTEM_PROMPT)
    return list(dict.fromkeys(vqa_vocabulary() + caption_vocabulary() + prompts))


# ---------------------------------------------------------------------------------------------------------------
# Chat messages
# ---------------------------------------------------------------------------------------------------------------


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def to_messages(turns: Sequence[tuple[str, str]], system_prompt: str | None = None) -> list[dict]:
    """
    A conversation about one image in the chat format of transformers and TRL: alternating `user` / `assistant`
    messages whose `content` is a list of `{"type": "text", "text": ...}` entries, with one `{"type": "image"}`
    entry before the first question (pass the image in the dataset's `images` column, as TRL's `SFTTrainer` expects).

    Args:
        turns (`Sequence[tuple[str, str]]`): The `(question, answer)` of each turn, at least one.
        system_prompt (`str`, *optional*): Text of a leading `system` message; none by default.

    Example:

    ```python
    >>> from vlbridge.data.synthetic_vqa import to_messages
    >>> messages = to_messages([("what colour is the circle?", "red"), ("how many circles are there?", "two")])
    >>> [(m["role"], [entry.get("text", "<image>") for entry in m["content"]]) for m in messages]
    [('user', ['<image>', 'what colour is the circle?']), ('assistant', ['red']),
     ('user', ['how many circles are there?']), ('assistant', ['two'])]
    ```
    """
    if not turns:
        raise ValueError("`turns` must hold at least one (question, answer) pair.")
    messages = [] if system_prompt is None else [{"role": "system", "content": [_text(system_prompt)]}]
    for index, (question, answer) in enumerate(turns):
        # One image per conversation, shown before the first question: later turns refer back to it.
        image = [{"type": "image"}] if index == 0 else []
        messages.append({"role": "user", "content": image + [_text(question)]})
        messages.append({"role": "assistant", "content": [_text(answer)]})
    return messages


# ---------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------


def vqa_features() -> Features:
    """The `datasets.Features` of `make_synthetic_vqa` splits (see its docstring for what each column holds)."""
    datasets = require_datasets()
    string = datasets.Value("string")
    columns = {"image": datasets.Image(), "question": string, "answer": string, "question_type": string}
    columns.update(image_id=datasets.Value("int64"), objects=synthetic_features()["objects"])
    return datasets.Features(columns)


def chat_features() -> Features:
    """The `datasets.Features` of `make_synthetic_chat` splits (see its docstring for what each column holds)."""
    datasets = require_datasets()
    # The chat schema of the local loaders; image entries store `text` as None (Arrow gives every entry of a list
    # the same fields).
    columns = dict(_chat_features())
    columns.update(turn_types=datasets.List(datasets.Value("string")), image_id=datasets.Value("int64"))
    columns.update(objects=synthetic_features()["objects"])
    return datasets.Features(columns)


def _scene_rows(
    num_images_per_split: dict[str, int] | None, image_size: int, seed: int, max_objects: int
) -> dict[str, dict[str, list]]:
    """Encoded image, `image_id` and `objects` of each image of `make_synthetic_image_text`, per split."""
    datasets = require_datasets()
    # Reusing the caption data (with its default `captions_per_image`) reuses its scene sampling, the disjointness
    # of splits and the stability of evaluation splits, and gives byte-identical images for the same arguments.
    data = make_synthetic_image_text(num_images_per_split, image_size=image_size, seed=seed, max_objects=max_objects)
    rows = {}
    for name, split in data.items():
        split = split.cast_column("image", datasets.Image(decode=False))
        first = [row for row, style in enumerate(split["caption_style"]) if style == "full"]  # one per image
        rows[name] = split.select(first).select_columns(["image", "image_id", "objects"])[:]
    return rows


def make_synthetic_vqa(
    num_images_per_split: dict[str, int] | None = None,
    image_size: int = 64,
    seed: int = 0,
    questions_per_image: int = 3,
    max_objects: int = 4,
    question_types: Iterable[str] | None = None,
) -> DatasetDict:
    """
    A deterministic VQA dataset of coloured shapes: **one row per (image, question)**, with short closed-vocabulary
    answers that are true of the image by construction.

    Columns:
        - `image` (`datasets.Image()`): the image `make_synthetic_image_text` draws with the same `seed`,
          `image_size` and `max_objects`, byte for byte.
        - `question` (`string`), `answer` (`string`): over the words of `vqa_vocabulary()`.
        - `question_type` (`string`): one of `QUESTION_TYPES` (see `write_questions`).
        - `image_id` (`int64`) and `objects`: as in `make_synthetic_image_text`; `Scene.from_objects` rebuilds the
          scene.

    Args:
        num_images_per_split (`dict[str, int]`, *optional*):
            Number of images per split; defaults to `{"train": 1000, "validation": 100, "test": 100}`.
        image_size (`int`, *optional*, defaults to 64):
            Image width and height in pixels (at least 24).
        seed (`int`, *optional*, defaults to 0):
            The same seed gives identical rows. Questions draw from their own random stream per split, so changing
            `questions_per_image` or `question_types` never changes the images.
        questions_per_image (`int`, *optional*, defaults to 3):
            Questions per image, each of a different type drawn at random (1 to the number of types).
        max_objects (`int`, *optional*, defaults to 4):
            The most objects in an image (1 to 9).
        question_types (`Iterable[str]`, *optional*):
            Types to ask, among `QUESTION_TYPES`; defaults to all.

    Returns:
        `datasets.DatasetDict`: the requested splits, no scene shared between splits or within one.

    Example:

    ```python
    >>> from vlbridge.data import make_synthetic_vqa
    >>> data = make_synthetic_vqa({"train": 8, "test": 2}, questions_per_image=2)
    >>> data["train"].num_rows, data["test"][0]["image_id"]
    (16, 8)
    >>> row = data["train"][2]
    >>> row["question"], row["answer"], row["question_type"]
    ('what colour is the circle?', 'green', 'colour')
    ```
    """
    types = _check_types(question_types, QUESTION_TYPES, "question_types")
    if not 1 <= questions_per_image <= len(types):
        raise ValueError(
            f"`questions_per_image` must be between 1 and {len(types)} (one question per type), "
            f"got {questions_per_image}; pass more `question_types` or ask fewer questions."
        )
    datasets, features = require_datasets(), vqa_features()
    splits = {}
    for name, scenes in _scene_rows(num_images_per_split, image_size, seed, max_objects).items():
        rng = random.Random(f"vlbridge-synthetic-vqa:{seed}:{name}")
        columns: dict[str, list] = {key: [] for key in features}
        for image, image_id, objects in zip(scenes["image"], scenes["image_id"], scenes["objects"]):
            for qa in write_questions(Scene.from_objects(objects), rng, rng.sample(types, questions_per_image)):
                columns["image"].append(image)
                columns["question"].append(qa["question"])
                columns["answer"].append(qa["answer"])
                columns["question_type"].append(qa["type"])
                columns["image_id"].append(image_id)
                columns["objects"].append(objects)
        splits[name] = datasets.Dataset.from_dict(columns, features=features)
    return datasets.DatasetDict(splits)


def make_synthetic_chat(
    num_images_per_split: dict[str, int] | None = None,
    image_size: int = 64,
    seed: int = 0,
    turns: int | tuple[int, int] = (1, 3),
    max_objects: int = 4,
    turn_types: Iterable[str] | None = None,
    system_prompt: bool | str = False,
) -> DatasetDict:
    """
    A deterministic multi-turn chat dataset about coloured shapes: **one row per image**, with a conversation that
    mixes questions (see `write_questions`) and captioning ("describe the image." -> the full description).

    Columns:
        - `images` (list of `datasets.Image()`): the one image, as TRL's `SFTTrainer` expects for vision datasets;
          the same image `make_synthetic_image_text` and `make_synthetic_vqa` draw with the same arguments.
        - `messages`: the conversation from `to_messages`: `user` / `assistant` turns (after an optional `system`
          message) whose `content` lists `{"type": "text", "text": ...}` entries, and one `{"type": "image"}` entry
          (stored with `text` None) before the first question.
        - `turn_types` (list of `string`): the type of each turn, among `CHAT_TURN_TYPES`.
        - `image_id` (`int64`) and `objects`: as in `make_synthetic_image_text`.

    Args:
        num_images_per_split (`dict[str, int]`, *optional*):
            Number of images (conversations) per split; defaults to `{"train": 1000, "validation": 100, "test": 100}`.
        image_size (`int`, *optional*, defaults to 64):
            Image width and height in pixels (at least 24).
        seed (`int`, *optional*, defaults to 0):
            The same seed gives identical rows; conversations draw from their own random stream per split.
        turns (`int` or `tuple[int, int]`, *optional*, defaults to `(1, 3)`):
            Turns per conversation, drawn uniformly between the two bounds (inclusive), each of a different type.
        max_objects (`int`, *optional*, defaults to 4):
            The most objects in an image (1 to 9).
        turn_types (`Iterable[str]`, *optional*):
            Types of turn, among `CHAT_TURN_TYPES` (the question types and `"caption"`); defaults to all.
        system_prompt (`bool` or `str`, *optional*, defaults to `False`):
            Start every conversation with a `system` message: `True` for `SYSTEM_PROMPT` (whose words are in
            `chat_vocabulary()`), or the message text.

    Returns:
        `datasets.DatasetDict`: the requested splits, no scene shared between splits or within one.

    Example:

    ```python
    >>> from vlbridge.data import make_synthetic_chat
    >>> data = make_synthetic_chat({"train": 4}, turns=2, turn_types=["caption", "count"])
    >>> row = data["train"][0]
    >>> [message["role"] for message in row["messages"]], len(row["images"]), sorted(row["turn_types"])
    (['user', 'assistant', 'user', 'assistant'], 1, ['caption', 'count'])
    ```
    """
    types = _check_types(turn_types, CHAT_TURN_TYPES, "turn_types")
    low, high = (turns, turns) if isinstance(turns, int) else tuple(turns)
    if not 1 <= low <= high <= len(types):
        raise ValueError(
            f"`turns` must be a number or (min, max) range between 1 and {len(types)} (one turn per type), "
            f"got {turns}; pass more `turn_types` or ask for fewer turns."
        )
    prompt = (SYSTEM_PROMPT if system_prompt is True else system_prompt) or None
    datasets, features = require_datasets(), chat_features()
    splits = {}
    for name, scenes in _scene_rows(num_images_per_split, image_size, seed, max_objects).items():
        rng = random.Random(f"vlbridge-synthetic-chat:{seed}:{name}")
        columns: dict[str, list] = {key: [] for key in features}
        for image, image_id, objects in zip(scenes["image"], scenes["image_id"], scenes["objects"]):
            scene = Scene.from_objects(objects)
            kinds = rng.sample(types, rng.randint(low, high))
            pairs = [
                (CAPTION_PROMPT, describe_full(scene)) if kind == "caption" else QUESTION_WRITERS[kind](scene, rng)
                for kind in kinds
            ]
            columns["images"].append([image])
            columns["messages"].append(to_messages(pairs, prompt))
            columns["turn_types"].append(kinds)
            columns["image_id"].append(image_id)
            columns["objects"].append(objects)
        splits[name] = datasets.Dataset.from_dict(columns, features=features)
    return datasets.DatasetDict(splits)


__all__ = [
    "CAPTION_PROMPT",
    "CHAT_TURN_TYPES",
    "QUESTION_TYPES",
    "QUESTION_WRITERS",
    "SYSTEM_PROMPT",
    "chat_features",
    "chat_vocabulary",
    "make_synthetic_chat",
    "make_synthetic_vqa",
    "to_messages",
    "vqa_features",
    "vqa_vocabulary",
    "write_questions",
]
