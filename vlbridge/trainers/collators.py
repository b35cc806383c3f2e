"""
The collators that turn dataset rows into model batches, one per stage: `ImageTextCollator` (stage 1: image,
caption and image id for ITC / ITM / ITG), `CaptionCollator` (stage 2: image-caption pairs) and `ChatCollator`
(SFT: chat conversations).

The two language-model collators build batches that [`BridgeVLMForConditionalGeneration`] takes as they are, for a
decoder-only language model (OPT, Llama, ...) or an encoder-decoder one (T5), and both hold to the same label rules:
loss is computed only on the text the model must write (the caption, the assistant's answers), never on image tokens,
BOS, prompts, system or user turns, or padding. Padding is masked by position, never by token id, so a tokenizer whose
pad, BOS and EOS tokens are the same token (OPT, Llama without a pad token) still gets its final EOS trained.
Truncation never cuts an image (that would misalign `pixel_values` with the `<image>` tokens) and never leaves a sample
with nothing to learn: both raise with the `max_length` that works. Every other truncation is counted in
`num_truncated` and warned about once.

Images go into `pixel_values` in placeholder order. With an any-res processor ([`BridgeAnyResImageProcessor`]) the
batch also carries `image_sizes`, and each image takes its own number of `<image>` tokens (its tiles x the bridge's
tokens per tile); `from_model` checks that the processor tiles exactly as the model counts.

With a [`~vlbridge.data.feature_cache.VisionFeatureCache`] (`vision_features=`), the collators put the frozen
vision tower's cached features in the batch as `vision_features` (any-res: with `image_sizes`) instead of
`pixel_values`, in the same order, and the image processor never computes pixels: each image is only hashed to find
its features. Everything else in the batch is what it would be without the cache.

With the HF [`Trainer`], pass `remove_unused_columns=False`: the collators read the raw `image` / `images` /
`messages` columns, which the model's `forward` does not name.
"""

from __future__ import annotations

import copy
import random
import re
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import torch
from transformers.utils import logging

from ..processing.image_utils import to_rgb_image


logger = logging.get_logger(__name__)


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
        vision_features ([`~vlbridge.data.feature_cache.VisionFeatureCache`], *optional*):
            A cache of the frozen vision tower's features: the batch holds `vision_features` `(B, P, Dv)` instead of
            `pixel_values`, and the image processor is not run.

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
    vision_features: Any = None

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Captions as the model trains on them: BOS ... EOS, right-padded; `input_ids` and `attention_mask`."""
        eos = self.tokenizer.eos_token_id
        ids = []
        for text in texts:
            tokens = self.tokenizer(text).input_ids
            # A tokenizer that ends every text with EOS itself (BERT's [SEP] in a converted BLIP-2 checkpoint) gets
            # one EOS, not two; the cut keeps EOS last either way.
            if tokens[-1:] == [eos]:
                tokens = tokens[:-1]
            ids.append(tokens[: self.max_length - 1] + [eos])
        length = max(len(seq) for seq in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([seq + [pad] * (length - len(seq)) for seq in ids])  # (B, T)
        attention_mask = torch.tensor([[1] * len(seq) + [0] * (length - len(seq)) for seq in ids])
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [to_rgb_image(row[self.image_column]) for row in rows]
        text = self.tokenize([row[self.text_column] for row in rows])
        image_ids = torch.tensor([row.get(self.id_column, i) for i, row in enumerate(rows)])
        if self.vision_features is not None:
            names = [f"batch row {i} (image_id {image_id})" for i, image_id in enumerate(image_ids.tolist())]
            return {**self.vision_features.batch_inputs(images, names), **text, "image_ids": image_ids}
        pixel_values = self.image_processor(images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, **text, "image_ids": image_ids}


IGNORE_INDEX = -100
# Processor outputs that carry images (any-res adds `image_sizes`); a batch holds each one the processor gave. With a
# vision-feature cache, `vision_features` stand for `pixel_values`.
IMAGE_KEYS = ("pixel_values", "image_sizes", "vision_features")


@dataclass
class _Example:
    """One tokenized sample, before truncation and padding."""

    # Decoder-only: the whole sequence. Encoder-decoder: the encoder input.
    input_ids: list[int]
    # Decoder-only: aligned with `input_ids`, IGNORE_INDEX where no loss. Encoder-decoder: the decoder target.
    labels: list[int]


@dataclass
class _VLMCollator:
    """Truncation, padding and Q-Former inputs shared by `CaptionCollator` and `ChatCollator`."""

    processor: Any
    _: KW_ONLY
    is_encoder_decoder: bool = False
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    qformer_max_length: int | None = None
    vision_features: Any = None
    num_truncated: int = field(default=0, init=False, repr=False)

    def __post_init__(self):
        tokenizer = self.processor.tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"{type(self).__name__} needs a tokenizer with an EOS token (the model learns to stop on it): set "
                "`processor.tokenizer.eos_token`."
            )
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be a positive integer or None, got {self.max_length}.")

    @classmethod
    def from_model(cls, model, processor, **kwargs):
        """
        Build the collator for `model`: `is_encoder_decoder` comes from its config, and the processor is checked to
        expand each image into as many tokens, with the same id, as the model expects (and, with any-res, to tile
        images with the model's `image_grid_pinpoints` and tile size).

        Args:
            model ([`BridgeVLMForConditionalGeneration`]): The model to train (or its [`BridgeVLMConfig`]).
            processor ([`BridgeProcessor`]): Its processor.
            kwargs: The collator's other arguments.
        """
        config = getattr(model, "config", model)
        expected = (config.num_image_tokens, config.image_token_id)
        if (processor.num_image_tokens, processor.image_token_id) != expected:
            raise ValueError(
                f"The processor expands an image into {processor.num_image_tokens} tokens of id "
                f"{processor.image_token_id}, the model expects {expected[0]} of id {expected[1]}: build the "
                "processor with num_image_tokens=config.num_image_tokens and the tokenizer whose image token is "
                "config.image_token_id."
            )
        _check_anyres(config, processor)
        return cls(processor, is_encoder_decoder=bool(config.is_encoder_decoder), **kwargs)

    # ----------------------------------------------------------------------------------------------------------------
    # Truncation
    # ----------------------------------------------------------------------------------------------------------------

    def _truncate(self, index: int, example: _Example) -> _Example:
        """Cut `example` to `max_length` from the end; raise if that would cut an image or every target token."""
        limit = self.max_length
        if limit is None:
            return example
        ids, labels = example.input_ids, example.labels
        image_positions = [j for j, token in enumerate(ids) if token == self.processor.image_token_id]
        # Decoder-only: where the first token with loss sits. Encoder-decoder: the target is a sequence of its own.
        first_target = (
            0 if self.is_encoder_decoder else next(j for j, label in enumerate(labels) if label != IGNORE_INDEX)
        )
        # The shortest limit that keeps every image and at least one target token.
        needed = max(image_positions[-1] + 1 if image_positions else 1, first_target + 1)
        if image_positions and image_positions[-1] >= limit:
            raise ValueError(
                f"Truncating sample {index} ({len(ids)} tokens) to max_length={limit} would cut its image tokens "
                f"(the last one is at position {image_positions[-1]}), and the images would no longer match "
                f"pixel_values. Pass max_length>={needed}, or shorten the text before the image."
            )
        if first_target >= limit:
            raise ValueError(
                f"Truncating sample {index} ({len(ids)} tokens) to max_length={limit} would remove every token that "
                f"carries loss (the first is at position {first_target}), leaving nothing to learn from it. Pass "
                f"max_length>={needed} (better, enough for the whole answer), or shorten the prompt."
            )
        if len(ids) <= limit and len(labels) <= limit:
            return example
        self.num_truncated += 1
        logger.warning_once(
            f"{type(self).__name__} truncated sample(s) to max_length={limit} from the end, target text included; "
            "`collator.num_truncated` counts them. Raise max_length to keep whole samples."
        )
        return _Example(ids[:limit], labels[:limit])

    # ----------------------------------------------------------------------------------------------------------------
    # Batch
    # ----------------------------------------------------------------------------------------------------------------

    def _padded_length(self, rows: list[list[int]]) -> int:
        length = max(len(row) for row in rows)
        multiple = self.pad_to_multiple_of
        return -(-length // multiple) * multiple if multiple else length

    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        """Right padding, as training wants (generation pads left; see the processor)."""
        length = self._padded_length(rows)
        return torch.tensor([row + [value] * (length - len(row)) for row in rows], dtype=torch.long)  # (B, T)

    def _batch(self, examples: list[_Example], image_inputs: dict, instructions: list[str]) -> dict[str, torch.Tensor]:
        examples = [self._truncate(i, example) for i, example in enumerate(examples)]
        tokenizer = self.processor.tokenizer
        # Any id does for padding: positions, not ids, keep it out of attention and loss.
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        input_ids = [example.input_ids for example in examples]
        batch = {
            "input_ids": self._pad(input_ids, pad_id),
            "attention_mask": self._pad([[1] * len(ids) for ids in input_ids], 0),
            "labels": self._pad([example.labels for example in examples], IGNORE_INDEX),
        }
        # pixel_values (num_images, C, H, W) in placeholder order; any-res: (num_images, max_tiles, C, H, W) and
        # image_sizes (num_images, 2).
        batch.update({key: image_inputs[key] for key in IMAGE_KEYS if image_inputs.get(key) is not None})
        if self.processor.qformer_tokenizer is not None and instructions:
            batch.update(self._qformer_inputs(instructions))
        return batch

    def _qformer_inputs(self, instructions: list[str]) -> dict[str, torch.Tensor]:
        """One Q-Former row per image (the model takes them as they are when they match the image count)."""
        truncate = self.qformer_max_length is not None
        return self.processor.encode_qformer_text(
            instructions, padding=True, truncation=truncate, max_length=self.qformer_max_length, return_tensors="pt"
        )

    def _cached_images(self, images: list, names: list[str]) -> tuple[Any, dict]:
        """
        With a vision-feature cache: the batch's `vision_features` (any-res: and `image_sizes`) for `images` (flat,
        in placeholder order), and a copy of the processor that expands `<image>` as the real one does, from those
        sizes, without computing pixels.
        """
        inputs = self.vision_features.batch_inputs(images, names)
        processor = copy.copy(self.processor)
        processor.image_processor = _CachedImageProcessor(self.processor.image_processor, inputs.get("image_sizes"))
        return processor, inputs

    def _append_eos(self, ids: list[int]) -> list[int]:
        eos = self.processor.tokenizer.eos_token_id
        return ids if ids and ids[-1] == eos else ids + [eos]


@dataclass
class CaptionCollator(_VLMCollator):
    r"""
    Batches `{"image", "caption"}` rows for stage-2 generative pretraining (BLIP-2): the model learns to write the
    caption of the image, optionally after a fixed text prompt such as `"a photo of"`.

    Decoder-only language model: each sample is `[BOS] <image tokens> prompt caption [EOS]`, right-padded. `labels`
    copy `input_ids` on the caption and the final EOS, and are -100 on BOS, image tokens, prompt and padding. The text
    is tokenized in one piece (caption positions are found from character offsets), so the caption's tokens are the
    ones the model sees, word boundaries included.

    Encoder-decoder language model (T5, as BLIP-2 FlanT5): the encoder gets `<image tokens> prompt` (tokenized with
    the tokenizer's special tokens), and `labels` hold the caption and EOS for the decoder, padded with -100; the model
    builds `decoder_input_ids` from them. With `prefix_lm=True`, the paper's prefix language modelling: each caption
    is split at a random word, the first part joins the encoder input after the prompt and the decoder learns the
    rest. The number of words moved to the encoder is uniform between 0 and all but one, so plain captioning (as at
    inference) stays in the mix. LAVIS's public code does not split, so it is off by default.

    A caption cut by `max_length` loses its EOS too: the model never learns to stop in mid-sentence.

    InstructBLIP models (a processor with a `qformer_tokenizer`): the Q-Former gets the prompt, the caption never
    (it would leak the target into the image tokens).

    Args:
        processor ([`BridgeProcessor`]):
            The model's processor; its tokenizer must be a fast tokenizer (character offsets) with an EOS token.
        is_encoder_decoder (`bool`, *optional*, defaults to `False`):
            `model.config.is_encoder_decoder`; [`CaptionCollator.from_model`] reads it for you.
        max_length (`int`, *optional*):
            Longest sequence in tokens (decoder-only: image tokens included; encoder-decoder: encoder input and
            target each). Truncation cuts the caption from the end; it raises instead if it would cut an image or the
            whole caption. None (default) never truncates.
        pad_to_multiple_of (`int`, *optional*):
            Pad the batch to a multiple of this length (tensor cores like multiples of 8).
        qformer_max_length (`int`, *optional*):
            Truncate the Q-Former's text to this many tokens (InstructBLIP uses 128); None never truncates.
        image_column (`str`, *optional*, defaults to `"image"`):
            Column of the image: a PIL image, an undecoded `datasets.Image` cell, or a one-image list.
        text_column (`str`, *optional*, defaults to `"caption"`):
            Column of the caption.
        prompt (`str`, *optional*, defaults to `""`):
            Text between the image and the caption, without loss (BLIP-2 fine-tunes OPT with `"a photo of"`).
        prefix_lm (`bool`, *optional*, defaults to `False`):
            Encoder-decoder only: BLIP-2's prefix language modelling (see above).
        seed (`int`, *optional*):
            Seed of the prefix-LM split, for reproducible batches.
        vision_features ([`~vlbridge.data.feature_cache.VisionFeatureCache`], *optional*):
            A cache of the frozen vision tower's features: the batch holds `vision_features` instead of
            `pixel_values` (see the module's docstring).

    Example:

    ```python
    >>> from PIL import Image
    >>> from transformers import SiglipImageProcessorPil
    >>> from vlbridge.data import build_word_tokenizer
    >>> from vlbridge.processing import BridgeProcessor
    >>> from vlbridge.trainers import CaptionCollator
    >>> tokenizer = build_word_tokenizer(["a", "photo", "of", "red", "circle"])  # <image> is id 4, </s> 3
    >>> image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    >>> processor = BridgeProcessor(image_processor, tokenizer, num_image_tokens=2)
    >>> collator = CaptionCollator(processor, prompt="a photo of")
    >>> batch = collator([{"image": Image.new("RGB", (40, 40)), "caption": "a red circle"}])
    >>> batch["input_ids"].tolist()
    [[2, 4, 4, 5, 6, 7, 5, 8, 9, 3]]
    >>> batch["labels"].tolist()
    [[-100, -100, -100, -100, -100, -100, 5, 8, 9, 3]]
    >>> tuple(batch["pixel_values"].shape)
    (1, 3, 32, 32)
    ```
    """

    image_column: str = "image"
    text_column: str = "caption"
    prompt: str = ""
    prefix_lm: bool = False
    seed: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.prefix_lm and not self.is_encoder_decoder:
            raise ValueError(
                "prefix_lm=True is BLIP-2's objective for encoder-decoder language models (the caption's prefix goes "
                "to the encoder); with a decoder-only model use prompt= for text without loss."
            )
        self._rng = random.Random(self.seed)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [self._image(row, i) for i, row in enumerate(rows)]
        captions = [self._caption(row, i) for i, row in enumerate(rows)]
        prompt = self.prompt.strip()
        # How an image missing from a vision-feature cache is named.
        names = [
            f"batch row {i}" + (f" (image_id {row['image_id']})" if "image_id" in row else "")
            for i, row in enumerate(rows)
        ]
        if self.is_encoder_decoder:
            image_inputs, examples = self._encoder_decoder(images, captions, prompt, names)
        else:
            image_inputs, examples = self._decoder_only(images, captions, prompt, names)
        return self._batch(examples, image_inputs, [self.processor.qformer_text(prompt)] * len(rows))

    def _image(self, row: dict[str, Any], index: int):
        image = row[self.image_column]
        if isinstance(image, (list, tuple)):
            if len(image) != 1:
                raise ValueError(
                    f"Row {index} has {len(image)} images in {self.image_column!r}: {type(self).__name__} takes "
                    "exactly one image per caption. Multi-image captions are not supported yet; use ChatCollator with "
                    "one {'type': 'image'} entry per image."
                )
            image = image[0]
        if image is None:
            raise ValueError(f"Row {index} has no image in {self.image_column!r}.")
        return to_rgb_image(image)

    def _caption(self, row: dict[str, Any], index: int) -> str:
        caption = row[self.text_column]
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(
                f"Row {index} has no caption in {self.text_column!r} (got {caption!r}): filter out rows without "
                "text, an empty target would train the model to stop at once."
            )
        return caption.strip()

    def _process(self, images: list, texts: list[str], names: list[str], **kwargs):
        processor, image_inputs = self.processor, None
        if self.vision_features is not None:
            processor, image_inputs = self._cached_images(images, names)
        out = processor(
            images=[[image] for image in images], text=texts, images_kwargs={"return_tensors": "pt"}, **kwargs
        )
        return image_inputs or {key: out[key] for key in IMAGE_KEYS if key in out}, out

    def _decoder_only(self, images: list, captions: list[str], prompt: str, names: list[str]):
        image_token, eos = self.processor.image_token, self.processor.tokenizer.eos_token_id
        texts = [" ".join(part for part in (image_token, prompt, caption) if part) for caption in captions]
        image_inputs, out = self._process(
            images, texts, names, return_offsets_mapping=True, return_text_replacement_offsets=True
        )
        examples = []
        for i, (text, caption) in enumerate(zip(texts, captions)):
            start = len(text) - len(caption)  # where the caption starts, before the image token is expanded
            # Placeholder expansion before the caption shifts it right; `new_span` ends are in expanded coordinates.
            shift = max(
                (r["new_span"][1] - r["span"][1] for r in out["text_replacement_offsets"][i] if r["span"][1] <= start),
                default=0,
            )
            start += shift
            ids = list(out["input_ids"][i])
            # A token carries loss if it covers caption characters; zero-width tokens (a BOS the tokenizer adds)
            # cover none.
            labels = [
                token if begin < end and end > start else IGNORE_INDEX
                for token, (begin, end) in zip(ids, out["offset_mapping"][i])
            ]
            if ids[-1] == eos:
                labels[-1] = eos  # the tokenizer ends sequences with EOS itself (zero-width): train it
            else:
                ids, labels = ids + [eos], labels + [eos]
            examples.append(_Example(ids, labels))
        return image_inputs, examples

    def _encoder_decoder(self, images: list, captions: list[str], prompt: str, names: list[str]):
        image_token = self.processor.image_token
        splits = [self._split(caption) if self.prefix_lm else ("", caption) for caption in captions]
        texts = [" ".join(part for part in (image_token, prompt, prefix) if part) for prefix, _ in splits]
        image_inputs, out = self._process(images, texts, names)
        targets = self.processor.tokenizer([suffix for _, suffix in splits], add_special_tokens=False)["input_ids"]
        examples = [
            _Example(list(ids), self._append_eos(list(target))) for ids, target in zip(out["input_ids"], targets)
        ]
        return image_inputs, examples

    def _split(self, caption: str) -> tuple[str, str]:
        """Prefix-LM split: the first k words (k uniform in [0, words - 1]) to the encoder, the rest to the decoder."""
        starts = [match.start() for match in re.finditer(r"\S+", caption)]
        k = self._rng.randrange(len(starts))
        return caption[: starts[k]].strip(), caption[starts[k] :]


@dataclass
class ChatCollator(_VLMCollator):
    r"""
    Batches `{"messages", "images"}` rows (the chat format of transformers and TRL, e.g. `make_synthetic_chat`) for
    supervised fine-tuning: the model learns to write the assistant's turns.

    Conversations are rendered with the processor's chat template and tokenized in one piece; `labels` are taken from
    the template's assistant-token mask (`{% generation %}` blocks), so they hold exactly the assistant's answers, in
    every turn of a multi-turn conversation. The end-of-turn token is trained when the template writes it inside the
    generation block, as [`default_chat_template`] does with EOS: the model must learn where an answer stops. Role
    headers (`"assistant: "`), system and user turns, BOS, image tokens and padding are -100.

    Encoder-decoder language model (T5): one pass of the decoder writes one answer, so the decoder learns the
    **last** assistant turn (its tokens as the template renders them, end-of-turn included) and the encoder gets
    everything before it, earlier answers as context. The conversation must end with an assistant turn.

    Images come from `images_column`, one per `{"type": "image"}` entry, in order; any number per sample (zero
    included), in any message of any turn, works, since the processor checks the count sample by sample and the model
    takes images in placeholder order.

    InstructBLIP models (a processor with a `qformer_tokenizer`): each image's Q-Former text is the text of the user
    message that holds the image (InstructBLIP's instruction), one row per image. In a multi-turn conversation that is
    the first question about the image; later questions are left out, since they follow earlier answers and could
    reveal them to the image tokens, which come first (`BridgeProcessor.qformer_instructions`, which the processor's
    `apply_chat_template` uses too).

    Truncation (`max_length`) cuts from the end. It raises instead of cutting an image or every assistant token of a
    sample; a sample without any assistant token (no assistant turn, or a template without `{% generation %}`) raises
    too, so no sample ever trains on nothing.

    Args:
        processor ([`BridgeProcessor`]):
            The model's processor, with a chat template that marks assistant turns with `{% generation %}` (the
            default one does) and a fast tokenizer.
        is_encoder_decoder (`bool`, *optional*, defaults to `False`):
            `model.config.is_encoder_decoder`; [`ChatCollator.from_model`] reads it for you.
        max_length (`int`, *optional*):
            Longest sequence in tokens (encoder-decoder: encoder input and target each); None never truncates.
        pad_to_multiple_of (`int`, *optional*):
            Pad the batch to a multiple of this length.
        qformer_max_length (`int`, *optional*):
            Truncate the Q-Former's text to this many tokens; None never truncates.
        messages_column (`str`, *optional*, defaults to `"messages"`):
            Column of the conversation.
        images_column (`str`, *optional*, defaults to `"images"`):
            Column of the images: a list (possibly empty), or a single image. Rows without the column have none.
        chat_template (`str`, *optional*):
            A chat template to use instead of the processor's.
        vision_features ([`~vlbridge.data.feature_cache.VisionFeatureCache`], *optional*):
            A cache of the frozen vision tower's features: the batch holds `vision_features` instead of
            `pixel_values` (see the module's docstring).

    Example:

    ```python
    >>> from PIL import Image
    >>> from transformers import SiglipImageProcessorPil
    >>> from vlbridge.data import build_word_tokenizer
    >>> from vlbridge.processing import BridgeProcessor
    >>> from vlbridge.trainers import ChatCollator
    >>> tokenizer = build_word_tokenizer(["user", "assistant", ":", "what", "colour", "?", "red"])
    >>> image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    >>> collator = ChatCollator(BridgeProcessor(image_processor, tokenizer, num_image_tokens=2))
    >>> messages = [
    ...     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]},
    ...     {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ... ]
    >>> batch = collator([{"messages": messages, "images": [Image.new("RGB", (40, 40))]}])
    >>> tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    ['<s>', 'user', ':', '<image>', '<image>', 'what', 'colour', '?', 'assistant', ':', 'red', '</s>']
    >>> batch["labels"].tolist()
    [[-100, -100, -100, -100, -100, -100, -100, -100, -100, -100, 11, 3]]
    ```
    """

    messages_column: str = "messages"
    images_column: str = "images"
    chat_template: str | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        conversations = [row[self.messages_column] for row in rows]
        images = [self._images(row) for row in rows]
        processor_kwargs: dict[str, Any] = {"images_kwargs": {"return_tensors": "pt"}}
        processor, cached = self.processor, None
        if any(images):
            processor_kwargs["images"] = images
            if self.vision_features is not None:
                names = [f"batch row {i} image {j}" for i, row in enumerate(images) for j in range(len(row))]
                processor, cached = self._cached_images([image for row in images for image in row], names)
        out = processor.apply_chat_template(
            conversations,
            chat_template=self.chat_template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            processor_kwargs=processor_kwargs,
        )
        examples = [
            self._example(i, conversation, list(ids), list(mask))
            for i, (conversation, ids, mask) in enumerate(zip(conversations, out["input_ids"], out["assistant_masks"]))
        ]
        instructions = [text for messages in conversations for text in self.processor.qformer_instructions(messages)]
        return self._batch(examples, cached or {key: out.get(key) for key in IMAGE_KEYS}, instructions)

    def _images(self, row: dict[str, Any]) -> list:
        images = row.get(self.images_column)
        if images is None:
            return []
        if not isinstance(images, (list, tuple)):
            images = [images]
        return [to_rgb_image(image) for image in images]

    def _example(self, index: int, conversation: list[dict], ids: list[int], mask: list[int]) -> _Example:
        if not any(mask):
            if not any(message.get("role") == "assistant" for message in conversation):
                raise ValueError(
                    f"Sample {index} has no assistant message, so no token would carry loss: drop it from the "
                    "training data, or add the answer as an assistant message."
                )
            raise ValueError(
                f"The chat template marked no assistant token in sample {index}: {type(self).__name__} takes the "
                "labels from `{% generation %}` ... `{% endgeneration %}` blocks around each assistant message. Use "
                "a template that has them (BridgeProcessor's default one does)."
            )
        if not self.is_encoder_decoder:
            return _Example(ids, [token if marked else IGNORE_INDEX for token, marked in zip(ids, mask)])
        if conversation[-1].get("role") != "assistant":
            raise ValueError(
                f"Sample {index} ends with a {conversation[-1].get('role')!r} message: with an encoder-decoder model "
                "the decoder learns the last assistant turn, so the conversation must end with one."
            )
        end = max(j for j, marked in enumerate(mask) if marked) + 1
        start = end
        while start > 0 and mask[start - 1]:
            start -= 1
        return _Example(ids[:start], ids[start:end])


class _CachedImageProcessor:
    """
    Stands for the image processor when a batch's vision features come from a cache: called by the processor, it
    returns no pixels, only each image's size with any-res (from which `<image>` is expanded into the image's tiles);
    everything else (`image_grid_pinpoints`, `get_number_of_image_patches`, ...) is the real image processor's.
    """

    def __init__(self, image_processor, image_sizes: torch.Tensor | None):
        self._image_processor = image_processor
        self._image_sizes = image_sizes

    def __call__(self, images, **kwargs) -> dict:
        return {} if self._image_sizes is None else {"image_sizes": self._image_sizes}

    def __getattr__(self, name: str):
        if name == "_image_processor":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self._image_processor, name)


def _check_anyres(config, processor) -> None:
    """The processor must tile images (any-res) exactly as the model counts tiles, or not at all when it does not."""
    model_pinpoints = getattr(config, "image_grid_pinpoints", None)
    image_processor = processor.image_processor
    anyres = getattr(processor, "is_anyres", False)
    processor_pinpoints = getattr(image_processor, "image_grid_pinpoints", None) if anyres else None
    if model_pinpoints is None and processor_pinpoints is None:
        return
    tile_size = getattr(getattr(image_processor, "size", None), "height", None)
    if processor_pinpoints is None or model_pinpoints is None:
        which = "the model" if processor_pinpoints is None else "the processor"
        raise ValueError(
            f"Only {which} uses any-res tiling: build the processor with BridgeAnyResImageProcessor("
            "image_grid_pinpoints=config.image_grid_pinpoints) for an any-res model, and a single-view image "
            "processor for a model with image_grid_pinpoints=None."
        )
    same_pinpoints = [list(p) for p in processor_pinpoints] == [list(p) for p in model_pinpoints]
    if not same_pinpoints or tile_size != config.anyres_tile_size:
        raise ValueError(
            f"The processor tiles images with image_grid_pinpoints={processor_pinpoints} and tile size {tile_size}, "
            f"the model counts tiles with {model_pinpoints} and {config.anyres_tile_size}: build the image processor "
            "with the config's image_grid_pinpoints and size={'height': S, 'width': S}, S the vision image_size."
        )


__all__ = ["ImageTextCollator", "CaptionCollator", "ChatCollator"]
