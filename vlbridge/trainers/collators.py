"""Collators that turn dataset rows into model batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..processing.image_utils import to_rgb_image


@dataclass
class ImageTextCollator:
    r"""
    Batches `{"image", "caption", "image_id"}` rows for stage-1 (image-text) pretraining.

    Captions are tokenized with BOS first (it becomes the ITG decoder start token inside the model) and EOS last, so
    the caption decoder learns where to stop; they are padded to the longest in the batch and truncated to
    `max_length` only after EOS is placed, so a long caption still ends with EOS.

    Args:
        image_processor ([`BaseImageProcessor`]):
            The vision tower's image processor.
        tokenizer ([`PreTrainedTokenizerBase`]):
            The Q-Former's tokenizer (must have `eos_token_id` and `pad_token_id`).
        max_length (`int`, *optional*, defaults to 32):
            Longest caption in tokens, BOS and EOS included (LAVIS uses 32).
        image_column, text_column, id_column (`str`, *optional*):
            Column names; defaults `"image"`, `"caption"`, `"image_id"`. Rows without an id get their position.

    Example:

    ```python
    >>> from PIL import Image
    >>> from transformers import CLIPImageProcessor
    >>> from vlbridge.data import build_word_tokenizer
    >>> from vlbridge.trainers import ImageTextCollator
    >>> collator = ImageTextCollator(
    ...     CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    ...     build_word_tokenizer(["a", "red", "circle"]),
    ... )
    >>> batch = collator([{"image": Image.new("RGB", (40, 40)), "caption": "a red circle", "image_id": 7}])
    >>> batch["input_ids"].tolist(), batch["image_ids"].tolist(), tuple(batch["pixel_values"].shape)
    ([[2, 5, 6, 7, 3]], [7], (1, 3, 32, 32))
    ```
    """

    image_processor: Any
    tokenizer: Any
    max_length: int = 32
    image_column: str = "image"
    text_column: str = "caption"
    id_column: str = "image_id"

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Captions as the model trains on them: BOS ... EOS, right-padded; `input_ids` and `attention_mask`."""
        ids = [self.tokenizer(text).input_ids[: self.max_length - 1] + [self.tokenizer.eos_token_id] for text in texts]
        length = max(len(seq) for seq in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([seq + [pad] * (length - len(seq)) for seq in ids])  # (B, T)
        attention_mask = torch.tensor([[1] * len(seq) + [0] * (length - len(seq)) for seq in ids])
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [to_rgb_image(row[self.image_column]) for row in rows]
        text = self.tokenize([row[self.text_column] for row in rows])
        image_ids = torch.tensor([row.get(self.id_column, i) for i, row in enumerate(rows)])
        pixel_values = self.image_processor(images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, **text, "image_ids": image_ids}
