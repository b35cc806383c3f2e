"""
Single-shape images captioned "a red circle": the tiny task of `vlbridge demo`.

Kept byte-for-byte stable because the README quotes the demo's numbers; the richer built-in data (several objects,
sizes, positions, several captions per image, `datasets` splits) is `vlbridge.data.synthetic`.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw


COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, colour: str, image_size: int = 32, rng: random.Random | None = None) -> Image.Image:
    """One shape of one colour on a white background, jittered in size and position by `rng`."""
    rng = rng or random.Random(0)
    image = Image.new("RGB", (image_size, image_size), "white")
    draw = ImageDraw.Draw(image)
    extent = rng.randint(image_size // 3, image_size // 2)
    x0, y0 = rng.randint(0, image_size - extent), rng.randint(0, image_size - extent)
    box = (x0, y0, x0 + extent, y0 + extent)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + extent // 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill)
    else:
        raise ValueError(f"Unknown shape {shape!r}; choose one of {SHAPES}.")
    return image


def shape_captions(num_samples: int, image_size: int = 32, seed: int = 0) -> list[tuple[Image.Image, str]]:
    """`num_samples` (image, caption) pairs such as (a red circle, "a red circle"), the same for the same seed."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(num_samples):
        shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
        pairs.append((draw_shape(shape, colour, image_size, rng), f"a {colour} {shape}"))
    return pairs


def caption_words() -> list[str]:
    """Every word of a `shape_captions` caption, for `build_word_tokenizer`."""
    return ["a", *sorted(COLOURS), *SHAPES]
