"""
The collator of interleaved image-text sequences (OpenFlamingo's pretraining layout), such as the rows of
`vlbridge.data.make_synthetic_interleaved` / `interleave_pairs`: `"<image>caption<|endofchunk|><image>caption..."`
with one image per `<image>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import logging

from ..data.tokenizer import END_OF_CHUNK_TOKEN
from ..processing.image_utils import to_rgb_image
from .collators import IGNORE_INDEX, IMAGE_KEYS, _VLMCollator


logger = logging.get_logger(__name__)


@dataclass
class InterleavedCollator(_VLMCollator):
    r"""
    Batches `{"text", "images"}` rows of interleaved sequences for a decoder-only VLM, either fusion: each `<image>` of
    the text stands for the next image of `images` (the processor expands it into the model's placeholders, or keeps
    it one marker with gated cross-attention).

    Each sample is `[BOS] text [EOS]`, right-padded. Labels follow OpenFlamingo (`train_utils.py`): -100 on padding,
    on every image token and on BOS; every other token carries loss, so the model learns the captions, to end a chunk
    with `<|endofchunk|>` and the sequence with EOS.

    With `max_length`, a sequence that is too long keeps its first whole chunks only (up to and including the last
    `<|endofchunk|>` that fits) together with their images, so no image is cut and `pixel_values` keep matching the
    image tokens; `num_truncated` counts such samples. A sample whose first chunk alone does not fit raises, naming
    the `max_length` that works.

    Args:
        processor ([`BridgeProcessor`]):
            The model's processor; its tokenizer needs an EOS token and must read `end_of_chunk_token` as one token
            (`build_word_tokenizer(..., end_of_chunk_token=True)`, or `tokenizer.add_special_tokens`).
        max_length (`int`, *optional*):
            Longest sequence in tokens, image tokens included; None (default) never truncates.
        pad_to_multiple_of (`int`, *optional*):
            Pad the batch to a multiple of this length.
        text_column (`str`, *optional*, defaults to `"text"`):
            Column of the interleaved text.
        images_column (`str`, *optional*, defaults to `"images"`):
            Column of the images (PIL images or undecoded `datasets.Image` cells), in `<image>` order.
        end_of_chunk_token (`str`, *optional*, defaults to `"<|endofchunk|>"`):
            The token that ends each chunk (where truncation may cut).

    Example:

    ```python
    >>> from PIL import Image
    >>> from transformers import SiglipImageProcessorPil
    >>> from vlbridge.data import build_word_tokenizer
    >>> from vlbridge.processing import BridgeProcessor
    >>> from vlbridge.trainers import InterleavedCollator
    >>> tokenizer = build_word_tokenizer(["a", "red", "circle"], end_of_chunk_token=True)  # <|endofchunk|> is 8
    >>> image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    >>> processor = BridgeProcessor(image_processor, tokenizer, num_image_tokens=1)  # gated cross-attention: 1 marker
    >>> text = "<image>a red circle<|endofchunk|><image>a circle<|endofchunk|>"
    >>> batch = InterleavedCollator(processor)([{"text": text, "images": [Image.new("RGB", (8, 8))] * 2}])
    >>> batch["input_ids"].tolist()
    [[2, 4, 5, 6, 7, 8, 4, 5, 7, 8, 3]]
    >>> batch["labels"].tolist()
    [[-100, -100, 5, 6, 7, 8, -100, 5, 7, 8, 3]]
    >>> tuple(batch["pixel_values"].shape)
    (2, 3, 32, 32)
    ```
    """

    text_column: str = "text"
    images_column: str = "images"
    end_of_chunk_token: str = END_OF_CHUNK_TOKEN

    def __post_init__(self):
        super().__post_init__()
        if self.vision_features is not None:
            raise ValueError(
                "InterleavedCollator does not read a vision-feature cache: drop vision_features (the images of "
                "interleaved sequences go through the image processor), or train on single captions."
            )
        if self.is_encoder_decoder:
            raise ValueError(
                "InterleavedCollator builds one decoder-only sequence per sample (OpenFlamingo); this model's "
                "language model is an encoder-decoder: train it on single captions with CaptionCollator."
            )
        tokenizer = self.processor.tokenizer
        ids = tokenizer(self.end_of_chunk_token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise ValueError(
                f"The tokenizer reads {self.end_of_chunk_token!r} as {ids}, not as one token of its own: add it "
                f"(`tokenizer.add_special_tokens({{'additional_special_tokens': [{self.end_of_chunk_token!r}]}})` and "
                "resize the model's embeddings, or `build_word_tokenizer(..., end_of_chunk_token=True)`)."
            )
        self.end_of_chunk_token_id = ids[0]

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts, images = [], []
        for index, row in enumerate(rows):
            text, row_images = row[self.text_column], list(row[self.images_column] or [])
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"Row {index} has no text in {self.text_column!r} (got {text!r}).")
            texts.append(text)
            images.append([to_rgb_image(image) for image in row_images])
        # The processor checks that every sample has one image per <image> and expands the placeholders.
        out = self.processor(images=images, text=texts, images_kwargs={"return_tensors": "pt"})
        counts = self._image_token_counts(out, [len(row_images) for row_images in images])
        bos, eos = self.processor.tokenizer.bos_token_id, self.processor.tokenizer.eos_token_id
        image_token_id = self.processor.image_token_id
        input_ids, labels, kept_images = [], [], []
        for index, ids in enumerate(out["input_ids"]):
            ids = self._append_eos(list(ids))
            ids, num_images = self._truncate_chunks(index, ids, counts[index])
            row_labels = [IGNORE_INDEX if token == image_token_id else token for token in ids]
            if bos is not None and ids[0] == bos:
                row_labels[0] = IGNORE_INDEX
            input_ids.append(ids)
            labels.append(row_labels)
            kept_images.append(num_images)
        # Any id does for padding: positions, not ids, keep it out of attention and loss.
        pad_id = self.processor.tokenizer.pad_token_id
        batch = {
            "input_ids": self._pad(input_ids, eos if pad_id is None else pad_id),
            "attention_mask": self._pad([[1] * len(ids) for ids in input_ids], 0),
            "labels": self._pad(labels, IGNORE_INDEX),
        }
        # pixel_values (num_images, C, H, W): every sample's images in order, those of dropped chunks left out.
        keep, start = [], 0
        for given, kept in zip((len(row_images) for row_images in images), kept_images):
            keep += range(start, start + kept)
            start += given
        for key in IMAGE_KEYS:
            if out.get(key) is not None:
                batch[key] = out[key] if len(keep) == start else out[key][keep]
        return batch

    def _image_token_counts(self, out, images_per_sample: list[int]) -> list[list[int]]:
        """Image tokens of each image of each sample (the processor's count: one marker with gated cross-attention,
        `num_image_tokens` with token fusion, times the tiles with any-res)."""
        sizes = out.get("image_sizes")
        tiles = self.processor.num_tiles(sizes.tolist()) if sizes is not None else [1] * sum(images_per_sample)
        per_image = [count * self.processor.num_image_tokens for count in tiles]
        counts, start = [], 0
        for num_images in images_per_sample:
            counts.append(per_image[start : start + num_images])
            start += num_images
        return counts

    def _truncate_chunks(self, index: int, ids: list[int], counts: list[int]) -> tuple[list[int], int]:
        """The sequence cut after its last whole chunk within `max_length`, and how many images it keeps."""
        limit = self.max_length
        if limit is None or len(ids) <= limit:
            return ids, len(counts)
        ends = [position for position, token in enumerate(ids) if token == self.end_of_chunk_token_id]
        fitting = [end for end in ends if end < limit]
        if not fitting:
            needed = ends[0] + 1 if ends else len(ids)
            raise ValueError(
                f"Sample {index} ({len(ids)} tokens) does not fit max_length={limit}, and its first chunk alone "
                f"takes {needed} tokens: truncation keeps whole chunks, so that no image is cut. Pass "
                f"max_length>={needed}, or shorten the sample's first chunk."
            )
        self.num_truncated += 1
        logger.warning_once(
            f"InterleavedCollator dropped the last chunks of sample(s) longer than max_length={limit}, with their "
            "images; `collator.num_truncated` counts them. Raise max_length to keep whole sequences."
        )
        ids = ids[: fitting[-1] + 1]
        image_tokens, num_images = sum(token == self.processor.image_token_id for token in ids), 0
        while num_images < len(counts) and sum(counts[: num_images + 1]) <= image_tokens:
            num_images += 1
        return ids, num_images


__all__ = ["InterleavedCollator"]
