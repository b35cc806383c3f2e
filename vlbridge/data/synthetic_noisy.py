"""
A "web" version of the built-in image-text data: a known share of its captions made wrong, the way web alt-texts are
wrong, so that caption filtering (BLIP's CapFilt) can be measured against the truth.

Two kinds of wrong caption, as BLIP's paper describes web noise:

- `swap`: the caption of another image (a scene with other objects), i.e. a text about something else;
- `attribute`: one colour or shape word changed to one the image does not hold at all, i.e. a text that is almost
  right. A colour (or shape) absent from the whole scene makes the caption false whatever it says about positions,
  counts or relations, with no parsing of the sentence.
"""

from __future__ import annotations

import random

from .synthetic import COLOURS, PLURALS, SHAPES, require_datasets


NOISE_KINDS = ("swap", "attribute")
_SHAPE_OF_WORD = {**{shape: shape for shape in SHAPES}, **{plural: shape for shape, plural in PLURALS.items()}}


def _change_attribute(caption: str, objects: list[dict], rng: random.Random) -> str | None:
    """`caption` with one colour or shape word replaced by one absent from the scene; `None` if it has neither."""
    words = caption.split(" ")
    colours = {obj["colour"] for obj in objects}
    shapes = {obj["shape"] for obj in objects}
    candidates = [i for i, word in enumerate(words) if word in COLOURS or word in _SHAPE_OF_WORD]
    if not candidates:
        return None
    at = rng.choice(candidates)
    word = words[at]
    if word in COLOURS:
        words[at] = rng.choice(sorted(set(COLOURS) - colours))
    else:
        new_shape = rng.choice(sorted(set(SHAPES) - shapes))
        words[at] = new_shape if word in SHAPES else PLURALS[new_shape]
    return " ".join(words)


def _scene_key(objects: list[dict]) -> tuple:
    return tuple(sorted((obj["colour"], obj["shape"], obj["size"]) for obj in objects))


def _other_scene_row(scenes: list[tuple], row: int, rng: random.Random) -> int:
    """A random row showing another scene than `row`'s: a few draws nearly always find one, a scan proves none."""
    for _ in range(64):
        other = rng.randrange(len(scenes))
        if scenes[other] != scenes[row]:
            return other
    others = [other for other in range(len(scenes)) if scenes[other] != scenes[row]]
    if not others:
        raise ValueError("add_caption_noise cannot swap captions: every row shows the same scene.")
    return rng.choice(others)


def add_caption_noise(dataset, noise: float, seed: int = 0, kinds: tuple[str, ...] = NOISE_KINDS):
    """
    Makes a share `noise` of the rows of an image-text set wrong, evenly over `kinds`, and records which.

    The rows to corrupt are drawn at random (exactly `round(noise * len(dataset))` of them); a `swap` row takes the
    caption of a row of another scene (other objects), an `attribute` row gets one colour or shape word changed to
    one its image does not hold (a caption with neither word, which the built-in writers never give, is swapped
    instead). The same seed gives the same result.

    Args:
        dataset (`datasets.Dataset`): Rows with `caption`, `image_id` and `objects` (as
            [`make_synthetic_image_text`] gives them).
        noise (`float`): The share of rows made wrong, in `[0, 1]`.
        seed (`int`, *optional*, defaults to 0): Which rows, and how.
        kinds (`tuple[str, ...]`, *optional*): Among `"swap"` and `"attribute"`.

    Returns:
        `datasets.Dataset`: the rows with their (possibly wrong) `caption`, plus `clean_caption` (the true one),
        `noisy` (`bool`) and `noise_kind` (`""`, `"swap"` or `"attribute"`).

    Example:

    ```python
    >>> from vlbridge.data import make_synthetic_image_text
    >>> from vlbridge.data.synthetic_noisy import add_caption_noise
    >>> web = add_caption_noise(make_synthetic_image_text({"train": 20}, image_size=32)["train"], noise=0.4)
    >>> sum(web["noisy"]), len(web)
    (24, 60)
    ```
    """
    require_datasets()
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise is the share of rows made wrong: a number in [0, 1], got {noise}.")
    unknown = sorted(set(kinds) - set(NOISE_KINDS))
    if unknown or not kinds:
        raise ValueError(f"kinds must be among {NOISE_KINDS}, got {list(kinds)}.")
    missing = sorted({"caption", "image_id", "objects"} - set(dataset.column_names))
    if missing:
        raise ValueError(f"add_caption_noise needs the columns {missing} (as make_synthetic_image_text gives them).")
    rng = random.Random(seed)
    captions, objects = list(dataset["caption"]), list(dataset["objects"])
    scenes = [_scene_key(scene) for scene in objects]
    chosen = rng.sample(range(len(captions)), round(noise * len(captions)))
    new, kind_of = list(captions), [""] * len(captions)
    for number, row in enumerate(chosen):
        kind = kinds[number % len(kinds)]
        changed = _change_attribute(captions[row], objects[row], rng) if kind == "attribute" else None
        if changed is None:
            kind = "swap"
            changed = captions[_other_scene_row(scenes, row, rng)]
        new[row], kind_of[row] = changed, kind
    dataset = dataset.rename_column("caption", "clean_caption").add_column("caption", new)
    dataset = dataset.add_column("noisy", [bool(kind) for kind in kind_of])
    return dataset.add_column("noise_kind", kind_of)


__all__ = ["NOISE_KINDS", "add_caption_noise"]
