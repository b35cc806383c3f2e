"""Held-out evaluation of a stage-1 model: retrieval recall both ways, ITM accuracy, exact ITG captions."""

from __future__ import annotations

import random

import torch
from tqdm.auto import tqdm

from ..data.synthetic import CAPTION_WRITERS, Scene
from ..processing.image_utils import to_rgb_image
from .retrieval import ImageTextRetriever


@torch.no_grad()
def evaluate_stage1(
    model,
    images_dataset,
    collator,
    retrieval_style: str | None = "positions",
    batch_size: int = 32,
    k_test: int = 128,
    max_new_tokens: int = 30,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    r"""
    Evaluates a stage-1 model ([`QFormerForImageTextPretraining`], [`BlipMEDForImageTextPretraining`]) on held-out
    images. A model without a text encoder or without a decoder (a BLIP captioner or matcher alone, which say so with
    `supports_matching` / `supports_captioning`) gets the metrics of the parts it has.

    - **Retrieval**: one caption per image, ITC scores re-ranked by ITM over the top `k_test`, recall at 1 / 5 / 10
      in both directions (`i2t_r1`, ..., `t2i_r10`). Built-in data (rows with an `objects` column) is retrieved with
      the `retrieval_style` caption written from the scene, whether or not it was among the image's captions: the
      "positions" caption names every object's shape, colour, size and place, so it is unique per image, where the
      shorter styles are true of several images and would make recall@1 ambiguous. Other data uses the first caption.
    - **ITM accuracy**: each image with its own caption (match) and with the caption of another, randomly chosen
      image (no match); a pair counts as right when the ITM head's argmax agrees. `itm_accuracy` over `2 N` pairs.
    - **ITG**: greedy captions; `itg_exact` is the share of images whose caption equals one of theirs exactly.

    Args:
        model ([`QFormerForImageTextPretraining`] or [`BlipMEDForImageTextPretraining`]):
            The model (evaluated in eval mode).
        images_dataset (`datasets.Dataset`):
            One row per image with `image` and `captions` (see `vlbridge.data.group_captions`), and
            `caption_styles` for `retrieval_style`.
        collator ([`ImageTextCollator`]):
            Tokenizes captions as in training and processes images.
        retrieval_style (`str`, *optional*, defaults to `"positions"`):
            Which caption writer of `vlbridge.data.synthetic.CAPTION_WRITERS` gives the retrieval caption of built-in
            data; `None` uses each image's first caption.

    Returns:
        `dict[str, float]` with the metrics above.
    """
    model.eval()
    rows = [images_dataset[i] for i in range(len(images_dataset))]
    texts = [retrieval_caption(row, retrieval_style) for row in rows]
    images = [to_rgb_image(row["image"]) for row in rows]
    pixel_values = torch.cat(
        [
            collator.image_processor(images[i : i + batch_size], return_tensors="pt")["pixel_values"]
            for i in range(0, len(images), batch_size)
        ]
    )  # (N, C, H, W)
    device = next(model.parameters()).device
    pixel_values = pixel_values.to(device)

    matching, captioning = getattr(model, "supports_matching", True), getattr(model, "supports_captioning", True)
    metrics = {}
    if matching:
        retriever = ImageTextRetriever(model, batch_size=batch_size, k_test=k_test, progress=progress)
        metrics.update(retriever.retrieve(pixel_values, collator.tokenize(texts), list(range(len(rows)))).metrics)

    rng = random.Random(seed)
    others = [rng.choice([j for j in range(len(rows)) if j != i]) for i in range(len(rows))]
    correct, generated = 0, []
    tokenizer = collator.tokenizer
    for start in tqdm(range(0, len(rows), batch_size), desc="ITM / ITG", disable=not progress):
        stop = min(start + batch_size, len(rows))
        pairs = ((range(start, stop), 1), ([others[i] for i in range(start, stop)], 0)) if matching else ()
        embeds = model.get_vision_features(pixel_values[start:stop]) if matching else None
        for caption_indices, label in pairs:
            text = {k: v.to(device) for k, v in collator.tokenize([texts[j] for j in caption_indices]).items()}
            logits = model.compute_itm_logits(embeds, text["input_ids"], text["attention_mask"])
            correct += int((logits.argmax(-1) == label).sum())
        if captioning:
            ids = model.generate_captions(pixel_values[start:stop], max_new_tokens=max_new_tokens)
            generated += tokenizer.batch_decode(ids, skip_special_tokens=True)
    if matching:
        metrics["itm_accuracy"] = correct / (2 * len(rows))
    if captioning:
        exact = sum(caption.strip() in row["captions"] for caption, row in zip(generated, rows))
        metrics["itg_exact"] = exact / len(rows)
    metrics["samples"] = [(row["captions"][0], caption.strip()) for row, caption in zip(rows[:8], generated[:8])]
    return metrics


def retrieval_caption(row: dict, style: str | None = "positions") -> str:
    """The caption an image is retrieved with: the `style` caption of its scene for built-in data, else its first."""
    if style is None or not row.get("objects"):
        return row["captions"][0]
    if style not in CAPTION_WRITERS:
        raise ValueError(f"Unknown caption style {style!r}; choose one of {sorted(CAPTION_WRITERS)}.")
    return CAPTION_WRITERS[style](Scene.from_objects(row["objects"])) or row["captions"][0]
