"""
Few-shot captioning (Flamingo / OpenFlamingo's evaluation): `k` in-context (image, caption) examples before each
held-out query image, `"<image>caption<|endofchunk|>" * k + "<image>"`, greedy captions scored with CIDEr-D.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.synthetic import group_captions
from ..data.tokenizer import END_OF_CHUNK_TOKEN
from ..metrics.caption_metrics import cider_d
from ..processing.image_utils import to_rgb_image


def few_shot_prompts(
    num_queries: int,
    support_data,
    shots: int,
    image_token: str = "<image>",
    end_of_chunk_token: str = END_OF_CHUNK_TOKEN,
    seed: int = 0,
    max_shots: int | None = None,
) -> tuple[list[str], list[list[int]]]:
    """
    The few-shot prompt of each query, and which support rows its in-context examples are.

    Each query `i` draws `max_shots` examples from `support_data` with `random.Random(f"{seed}:{i}")`, among
    distinct images (by `image_id` when the column exists; a random caption of each), and its `shots`-shot prompt takes
    the first `shots` of them: the examples a query gets do not depend on the batch size, and a 2-shot prompt is the
    start of the 4-shot one of the same query, so shot counts differ only in how many examples come first.

    Args:
        num_queries (`int`): Query images.
        support_data (`datasets.Dataset`): The in-context examples' pool, one row per (image, `caption`) pair.
        shots (`int`): In-context examples per prompt.
        image_token (`str`, *optional*, defaults to `"<image>"`): The processor's image token.
        end_of_chunk_token (`str`, *optional*, defaults to `"<|endofchunk|>"`): Ends each example's chunk.
        seed (`int`, *optional*, defaults to 0): Seed of the draw.
        max_shots (`int`, *optional*): Examples drawn per query (defaults to `shots`); give the largest shot count
            evaluated to make prompts nested across shot counts.

    Returns:
        `tuple[list[str], list[list[int]]]`: the prompt of each query, and its examples' rows of `support_data`
        (in prompt order; the query's own image comes after them).

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from vlbridge.evaluation.few_shot import few_shot_prompts
    >>> support = Dataset.from_dict({"caption": ["a red circle", "a blue star", "two squares"], "image_id": [0, 1, 2]})
    >>> prompts, rows = few_shot_prompts(1, support, shots=2, seed=0)
    >>> prompts[0] == "".join(f"<image>{support[r]['caption']}<|endofchunk|>" for r in rows[0]) + "<image>"
    True
    >>> few_shot_prompts(2, support, shots=0)
    (['<image>', '<image>'], [[], []])
    ```
    """
    max_shots = shots if max_shots is None else max_shots
    if not 0 <= shots <= max_shots:
        raise ValueError(f"`shots` must be between 0 and max_shots={max_shots}, got {shots}.")
    groups: dict[Any, list[int]] = {}
    if max_shots > 0:
        if "caption" not in support_data.column_names:
            raise ValueError(f"`support_data` needs a `caption` column; it has {support_data.column_names}.")
        ids = support_data["image_id"] if "image_id" in support_data.column_names else range(support_data.num_rows)
        for row, image_id in enumerate(ids):
            groups.setdefault(image_id, []).append(row)
        if len(groups) < max_shots:
            raise ValueError(f"{max_shots} in-context examples need as many support images; there are {len(groups)}.")
    captions = support_data["caption"] if max_shots > 0 else []
    keys = list(groups)
    prompts, examples = [], []
    for query in range(num_queries):
        rng = random.Random(f"vlbridge-few-shot:{seed}:{query}")
        rows = [rng.choice(groups[key]) for key in rng.sample(keys, max_shots)][:shots]
        chunks = [f"{image_token}{captions[row].strip()}{end_of_chunk_token}" for row in rows]
        prompts.append("".join(chunks) + image_token)
        examples.append(rows)
    return prompts, examples


def evaluate_few_shot(
    model,
    processor,
    query_data,
    support_data,
    shots: Iterable[int] = (0, 2, 4),
    seed: int = 0,
    batch_size: int = 16,
    max_new_tokens: int = 30,
    end_of_chunk_token: str = END_OF_CHUNK_TOKEN,
    progress: bool = True,
    return_predictions: bool = False,
    **generate_kwargs,
):
    """
    Held-out few-shot captioning: for each shot count `k`, every query image is captioned greedily after `k`
    in-context examples from `support_data`, `"<image>caption<|endofchunk|>" * k + "<image>"` (the layout
    [`InterleavedCollator`] trains on), and the captions are scored with CIDEr-D against the query's references.

    The examples come from [`few_shot_prompts`] (fixed `seed`, distinct images, nested across shot counts: the
    2-shot examples of a query are the first two of its 4-shot ones). Generation stops at `<|endofchunk|>` (the end of
    a chunk, OpenFlamingo's stop token) or EOS, and only the new tokens are decoded, special tokens skipped. Batches
    are left-padded, so batching does not change the captions.

    Args:
        model ([`BridgeVLMForConditionalGeneration`]):
            A decoder-only VLM, either fusion; put in eval mode (and back in train mode afterwards if it was).
        processor ([`BridgeProcessor`]):
            Its processor; its tokenizer must read `end_of_chunk_token` as one token.
        query_data (`datasets.Dataset`):
            The held-out images: `image` and `captions` (references), or `image` / `caption` / `image_id` pairs,
            merged per image as in [`evaluate_generation`].
        support_data (`datasets.Dataset`):
            The in-context examples' pool (usually the training split): `image`, `caption`, optionally `image_id`.
            It should share no image with `query_data`.
        shots (`Iterable[int]`, *optional*, defaults to `(0, 2, 4)`):
            The shot counts to evaluate.
        seed (`int`, *optional*, defaults to 0):
            Seed of the examples' draw.
        batch_size (`int`, *optional*, defaults to 16):
            Queries per `generate` call.
        max_new_tokens (`int`, *optional*, defaults to 30):
            Most tokens generated per query.
        end_of_chunk_token (`str`, *optional*, defaults to `"<|endofchunk|>"`):
            Ends each in-context example, and generation.
        progress (`bool`, *optional*, defaults to `True`):
            Show a tqdm progress bar (one step per batch, over all shot counts).
        return_predictions (`bool`, *optional*, defaults to `False`):
            Also return the captions: `(scores, {shots: [caption of each query]})`.
        generate_kwargs:
            Passed to `model.generate`; decoding is greedy unless they say otherwise.

    Returns:
        `dict[int, float]`: CIDEr-D per shot count (and the predictions with `return_predictions=True`).

    Example:

    ```python
    >>> from vlbridge.data import make_synthetic_image_text
    >>> from vlbridge.evaluation import evaluate_few_shot
    >>> data = make_synthetic_image_text({"train": 100, "test": 50}, image_size=32)
    >>> evaluate_few_shot(model, processor, data["test"], data["train"], shots=(0, 4))  # doctest: +SKIP
    {0: 0.91, 4: 0.87}
    ```
    """
    shots = sorted(set(int(k) for k in shots))
    if not shots or shots[0] < 0:
        raise ValueError(f"`shots` must be non-negative shot counts, got {shots}.")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"`batch_size` and `max_new_tokens` must be positive, got {batch_size} and {max_new_tokens}.")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            "evaluate_few_shot prompts a decoder-only VLM with interleaved examples; got encoder-decoder."
        )
    tokenizer = processor.tokenizer
    chunk_ids = tokenizer(end_of_chunk_token, add_special_tokens=False)["input_ids"]
    if len(chunk_ids) != 1 or chunk_ids[0] == tokenizer.unk_token_id:
        raise ValueError(
            f"The tokenizer reads {end_of_chunk_token!r} as {chunk_ids}, not one token: use the tokenizer the model "
            "was trained with on interleaved sequences (`build_word_tokenizer(..., end_of_chunk_token=True)`)."
        )
    if "captions" not in query_data.column_names:
        if "image_id" in query_data.column_names:
            query_data = group_captions(query_data)
            references = [list(captions) for captions in query_data["captions"]]
        else:
            references = [[caption] for caption in query_data["caption"]]
    else:
        references = [list(captions) for captions in query_data["captions"]]
    if not references:
        raise ValueError("`query_data` is empty: there is nothing to evaluate.")
    stop = [chunk_ids[0]] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens, "eos_token_id": stop, **generate_kwargs}
    if tokenizer.pad_token_id is not None:
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)

    num_queries, batches = len(references), -(-len(references) // batch_size)
    bar = tqdm(total=batches * len(shots), desc="few-shot captions", disable=not progress)
    scores, predictions = {}, {}
    try:
        for k in shots:
            prompts, examples = few_shot_prompts(
                num_queries, support_data, k, processor.image_token, end_of_chunk_token, seed, max_shots=shots[-1]
            )
            predictions[k] = _generate(
                model, processor, query_data, support_data, prompts, examples, batch_size, kwargs, bar
            )
            scores[k] = cider_d(predictions[k], references)
    finally:
        bar.close()
    return (scores, predictions) if return_predictions else scores


@torch.no_grad()
def _generate(model, processor, query_data, support_data, prompts, examples, batch_size, kwargs, bar) -> list[str]:
    """Greedy captions of the queries after their examples: each sample's images are its examples', then its own."""
    was_training = model.training
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    predictions: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            stop = min(start + batch_size, len(prompts))
            queries = query_data[start:stop]["image"]
            images = [
                [to_rgb_image(support_data[row]["image"]) for row in examples[index]] + [to_rgb_image(query)]
                for index, query in zip(range(start, stop), queries)
            ]
            inputs = processor(
                images=images, text=prompts[start:stop], padding=True, padding_side="left", return_tensors="pt"
            ).to(device)
            ids = model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1] :]
            predictions.extend(
                text.strip() for text in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
            )
            bar.update(1)
    finally:
        model.train(was_training)
    return predictions


__all__ = ["evaluate_few_shot", "few_shot_prompts"]
