"""InterleavedCollator: OpenFlamingo's labels (-100 on padding, `<image>` and BOS; loss on the captions,
`<|endofchunk|>` and EOS), one image per marker in order, chunk-wise truncation, and clear errors."""

import pytest
import torch
from PIL import Image
from transformers import SiglipImageProcessorPil

from vlbridge.data import build_word_tokenizer, caption_vocabulary, make_synthetic_interleaved
from vlbridge.processing import BridgeProcessor
from vlbridge.trainers import InterleavedCollator


def make_processor(num_image_tokens: int = 1, end_of_chunk_token: bool = True) -> BridgeProcessor:
    tokenizer = build_word_tokenizer(caption_vocabulary(), end_of_chunk_token=end_of_chunk_token)
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    return BridgeProcessor(image_processor, tokenizer, num_image_tokens=num_image_tokens)


def coloured(value: int) -> Image.Image:
    return Image.new("RGB", (32, 32), (value, 0, 0))


ROWS = [
    {"text": "<image>a red circle<|endofchunk|><image>two blue stars<|endofchunk|>", "images": [coloured(0)] * 2},
    {"text": "<image>a large green square<|endofchunk|>", "images": [coloured(255)]},
]


@pytest.mark.parametrize("num_image_tokens", [1, 3])  # gated cross-attention (one marker) and token fusion
def test_labels_follow_openflamingo(num_image_tokens):
    processor = make_processor(num_image_tokens)
    tokenizer = processor.tokenizer
    batch = InterleavedCollator(processor)(ROWS)
    image, chunk = processor.image_token_id, tokenizer.end_of_chunk_token_id
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    for ids, mask, labels, text in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], ROWS):
        length = int(mask.sum())
        ids, labels = ids.tolist(), labels.tolist()
        expected = tokenizer(text["text"].replace("<image>", "<image>" * num_image_tokens)).input_ids + [eos]
        assert ids[:length] == expected and ids[length:] == [pad] * (len(ids) - length)
        assert mask.tolist() == [1] * length + [0] * (len(ids) - length)
        for token, label in zip(ids[:length], labels[:length]):
            # -100 on BOS and every image token; loss on everything else: caption words, <|endofchunk|>, EOS.
            assert label == (-100 if token in (bos, image) else token)
        assert labels[length:] == [-100] * (len(ids) - length)
        assert chunk in labels[:length] and labels[length - 1] == eos
        assert ids.count(image) == num_image_tokens * len(text["images"])
    # Images in marker order, sample after sample.
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    reds = batch["pixel_values"][:, 0].mean((1, 2))
    assert reds[0] == reds[1] < reds[2]


def test_built_in_sequences_batch():
    processor = make_processor()
    rows = list(make_synthetic_interleaved({"train": 6}, num_pairs=3, image_size=32, captions_per_image=1)["train"])
    batch = InterleavedCollator(processor)(rows)
    assert batch["pixel_values"].shape[0] == sum(len(row["images"]) for row in rows) == 6
    markers = (batch["input_ids"] == processor.image_token_id).sum(-1).tolist()
    assert markers == [len(row["images"]) for row in rows]
    assert processor.tokenizer.unk_token_id not in batch["input_ids"].tolist()


def test_truncation_keeps_whole_chunks_and_their_images():
    processor = make_processor()
    collator = InterleavedCollator(processor, max_length=8)
    # [BOS] <image> a red circle <|endofchunk|> = 6 tokens fit; the second chunk does not.
    batch = collator([ROWS[0]])
    assert batch["input_ids"].tolist()[0][-1] == processor.tokenizer.end_of_chunk_token_id
    assert batch["input_ids"].shape[1] == 6 and batch["pixel_values"].shape[0] == 1
    assert collator.num_truncated == 1
    with pytest.raises(ValueError, match="max_length>=6"):
        InterleavedCollator(processor, max_length=4)([ROWS[0]])


def test_clear_errors():
    with pytest.raises(ValueError, match="not as one token"):
        InterleavedCollator(make_processor(end_of_chunk_token=False))
    with pytest.raises(ValueError, match="encoder-decoder"):
        InterleavedCollator(make_processor(), is_encoder_decoder=True)
    with pytest.raises(ValueError):  # two markers, one image: the processor refuses
        InterleavedCollator(make_processor())([{"text": ROWS[0]["text"], "images": [coloured(0)]}])
    assert torch.is_tensor(InterleavedCollator(make_processor())(ROWS[1:])["labels"])
