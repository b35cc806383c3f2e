"""Held-out evaluation of a stage-1 model: retrieval recall both ways, ITM accuracy, exact ITG captions."""

from __future__ import annotations

import random

import torch
from tqdm.auto import tqdm

from ..modeling.retrieval import ImageTextRetriever


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
    Evaluates a [`QFormerForImageTextPretraining`] on held-out images.

    - **Retrieval**: one caption per image (the `retrieval_style` caption, which the built-in data makes unique per
      image; the first caption when the style is absent), ITC scores re-ranked by ITM over the top `k_test`, recall
      at 1 / 5 / 10 in both directions (`i2t_r1`, ..., `t2i_r10`).
    - **ITM accuracy**: each image with its own caption (match) and with the caption of another, randomly chosen
      image (no match); a pair counts as right when the ITM head's argmax agrees. `itm_accuracy` over `2 N` pairs.
    - **ITG**: greedy captions; `itg_exact` is the share of images whose caption equals one of theirs exactly.

    Args:
        model ([`QFormerForImageTextPretraining`]):
            The model (evaluated in eval mode).
        images_dataset (`datasets.Dataset`):
            One row per image with `image` and `captions` (see `vlbridge.data.group_captions`), and
            `caption_styles` for `retrieval_style`.
        collator ([`ImageTextCollator`]):
            Tokenizes captions as in training and processes images.
        retrieval_style (`str`, *optional*, defaults to `"positions"`):
            Which caption of each image to retrieve with.

    Returns:
        `dict[str, float]` with the metrics above.
    """
    model.eval()
    rows = [images_dataset[i] for i in range(len(images_dataset))]
    styles = [row.get("caption_styles") or [] for row in rows]
    texts = [
        row["captions"][style.index(retrieval_style)] if retrieval_style in style else row["captions"][0]
        for row, style in zip(rows, styles)
    ]
    images = [row["image"].convert("RGB") for row in rows]
    pixel_values = torch.cat(
        [
            collator.image_processor(images[i : i + batch_size], return_tensors="pt")["pixel_values"]
            for i in range(0, len(images), batch_size)
        ]
    )  # (N, C, H, W)
    device = next(model.parameters()).device
    pixel_values = pixel_values.to(device)

    retriever = ImageTextRetriever(model, batch_size=batch_size, k_test=k_test, progress=progress)
    metrics = dict(retriever.retrieve(pixel_values, collator.tokenize(texts), list(range(len(rows)))).metrics)

    rng = random.Random(seed)
    others = [rng.choice([j for j in range(len(rows)) if j != i]) for i in range(len(rows))]
    correct, generated = 0, []
    tokenizer = collator.tokenizer
    for start in tqdm(range(0, len(rows), batch_size), desc="ITM / ITG", disable=not progress):
        stop = min(start + batch_size, len(rows))
        embeds = model.get_vision_features(pixel_values[start:stop])
        for caption_indices, label in ((range(start, stop), 1), ([others[i] for i in range(start, stop)], 0)):
            text = {k: v.to(device) for k, v in collator.tokenize([texts[j] for j in caption_indices]).items()}
            logits = model.compute_itm_logits(embeds, text["input_ids"], text["attention_mask"])
            correct += int((logits.argmax(-1) == label).sum())
        ids = model.generate_captions(pixel_values[start:stop], max_new_tokens=max_new_tokens)
        generated += tokenizer.batch_decode(ids, skip_special_tokens=True)
    exact = sum(caption.strip() in row["captions"] for caption, row in zip(generated, rows))
    metrics.update(itm_accuracy=correct / (2 * len(rows)), itg_exact=exact / len(rows))
    metrics["samples"] = [(row["captions"][0], caption.strip()) for row, caption in zip(rows[:8], generated[:8])]
    return metrics
