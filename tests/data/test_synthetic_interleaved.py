"""Interleaved (image, caption) sequences: text and images line up, every pair is used once, splits stay apart, and
`<|endofchunk|>` is an opt-in token that leaves existing tokenizers' ids alone."""

import pytest
from datasets import Dataset

from vlbridge.data import (
    END_OF_CHUNK_TOKEN,
    build_word_tokenizer,
    caption_vocabulary,
    interleave_pairs,
    make_synthetic_image_text,
    make_synthetic_interleaved,
)
from vlbridge.data.synthetic import Scene, describe_positions


SPLITS = {"train": 30, "test": 10}


@pytest.fixture(scope="module")
def data():
    return make_synthetic_interleaved(SPLITS, num_pairs=4, image_size=32, captions_per_image=3, max_objects=2)


def chunks(text: str) -> list[str]:
    """The captions of a sequence's text, checking that each chunk is `<image>caption<|endofchunk|>`."""
    assert text.endswith(END_OF_CHUNK_TOKEN)
    parts = text.split(END_OF_CHUNK_TOKEN)[:-1]
    assert all(part.startswith("<image>") and part.count("<image>") == 1 for part in parts), text
    return [part[len("<image>") :] for part in parts]


def test_text_and_images_line_up(data):
    pairs = make_synthetic_image_text(SPLITS, image_size=32, captions_per_image=3, max_objects=2)
    for name in SPLITS:
        caption_of = {(row["image_id"], row["caption"]) for row in pairs[name]}
        image_of = {row["image_id"]: row["image"].tobytes() for row in pairs[name]}
        for row in data[name]:
            assert 1 <= len(row["images"]) <= 4
            assert chunks(row["text"]) == row["captions"]
            assert len(row["images"]) == len(row["captions"]) == len(row["image_ids"]) == row["text"].count("<image>")
            assert len(set(row["image_ids"])) == len(row["image_ids"])  # no image twice in one sequence
            for image, caption, image_id in zip(row["images"], row["captions"], row["image_ids"]):
                # Each chunk's caption is a true caption of the image shown in that chunk.
                assert (image_id, caption) in caption_of
                assert image.tobytes() == image_of[image_id]


def test_every_pair_once_and_splits_disjoint(data):
    pairs = make_synthetic_image_text(SPLITS, image_size=32, captions_per_image=3, max_objects=2)
    ids = {}
    for name in SPLITS:
        used = sorted((i, c) for row in data[name] for i, c in zip(row["image_ids"], row["captions"]))
        assert used == sorted(zip(pairs[name]["image_id"], pairs[name]["caption"]))
        # 3 rounds (one caption of every image each) of 8 sequences, the last of each round shorter.
        assert data[name].num_rows == 3 * -(-SPLITS[name] // 4)
        ids[name] = {image_id for row in data[name] for image_id in row["image_ids"]}
    assert not ids["train"] & ids["test"]
    # No scene in two splits (a scene's positions caption names it, jitter aside).
    scenes = {name: {describe_positions(Scene.from_objects(o)) for o in pairs[name]["objects"]} for name in SPLITS}
    assert not scenes["train"] & scenes["test"]


def test_growing_train_keeps_the_test_split(data):
    bigger = make_synthetic_interleaved(
        {"train": 50, "test": 10}, num_pairs=4, image_size=32, captions_per_image=3, max_objects=2
    )
    # The same sequences of the same images (ids are numbered from the first split, so they move with train's size).
    assert bigger["test"]["text"] == data["test"]["text"]
    for row, old in zip(bigger["test"], data["test"]):
        assert [image.tobytes() for image in row["images"]] == [image.tobytes() for image in old["images"]]


def test_interleave_pairs_checks_its_input():
    pairs = Dataset.from_dict({"image": [None, None], "caption": ["a red circle", "a blue <image> star"]})
    with pytest.raises(ValueError, match="holds '<image>'"):
        interleave_pairs(pairs, num_pairs=2)
    with pytest.raises(ValueError, match="num_pairs"):
        interleave_pairs(pairs, num_pairs=0)


def test_end_of_chunk_token_is_opt_in_and_keeps_ids():
    words = caption_vocabulary()
    plain = build_word_tokenizer(words)
    chunked = build_word_tokenizer(words, end_of_chunk_token=True)
    assert len(chunked) == len(plain) + 1
    assert {token: chunked.convert_tokens_to_ids(token) for token in plain.get_vocab()} == plain.get_vocab()
    assert chunked.end_of_chunk_token == END_OF_CHUNK_TOKEN and chunked.end_of_chunk_token_id == len(plain)
    ids = chunked("<image>a red circle<|endofchunk|><image>").input_ids
    assert ids[1] == ids[-1] == chunked.image_token_id and ids[-2] == chunked.end_of_chunk_token_id
    assert chunked.unk_token_id not in ids
    # Without the option the string is no token of its own: nothing changes for existing callers.
    assert plain.unk_token_id in plain("<|endofchunk|>", add_special_tokens=False).input_ids
