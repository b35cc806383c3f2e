"""Local data: chat records, WebDataset-style tar shards, streaming, and the skipped-images report and callback."""

import io
import json
import logging
import tarfile
from types import SimpleNamespace

import datasets
import pytest
from helpers import run_docstring_examples
from PIL import Image, ImageFile

from vlbridge.data import (
    LoadReport,
    SkippedImagesCallback,
    load_image_text_folder,
    load_image_text_jsonl,
    load_image_text_shards,
    normalize_messages,
)


def png_bytes(colour, size=(6, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_jsonl(path, lines):
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def write_tar(path, members, mode="w"):
    with tarfile.open(path, mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


IMAGE, TEXT = {"type": "image"}, lambda text: {"type": "text", "text": text}


@pytest.fixture
def images(tmp_path):
    """Good, corrupt (text renamed .png, truncated PNG) image files; `missing.png` is never written."""
    (tmp_path / "red.png").write_bytes(png_bytes("red"))
    (tmp_path / "blue.png").write_bytes(png_bytes("blue"))
    (tmp_path / "text.png").write_text("this is a text file, renamed")
    (tmp_path / "truncated.png").write_bytes(png_bytes("green")[:40])
    return tmp_path


@pytest.fixture
def decode_calls(monkeypatch):
    """Counts full image decodes (`ImageFile.load`), the expensive step streaming must put off."""
    calls = []
    load = ImageFile.ImageFile.load

    def counting_load(self):
        calls.append(self)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    return calls


@pytest.mark.parametrize("name", ["vlbridge.data.local", "vlbridge.data.shards"])
def test_docstring_examples(name):
    run_docstring_examples(name)


# ------------------------------------------------------------------------------------------ chat messages


def test_string_content_with_placeholders_becomes_entries_in_order():
    messages = [
        {"role": "system", "content": "Answer briefly."},
        user("<image>\nWhat colour?"),
        assistant("Red."),
        user("Compare <image> and <image>."),
        assistant([TEXT("Same.")]),
    ]
    assert normalize_messages(messages) == [
        {"role": "system", "content": [TEXT("Answer briefly.")]},
        {"role": "user", "content": [IMAGE, TEXT("What colour?")]},
        {"role": "assistant", "content": [TEXT("Red.")]},
        {"role": "user", "content": [TEXT("Compare"), IMAGE, TEXT("and"), IMAGE, TEXT(".")]},
        {"role": "assistant", "content": [TEXT("Same.")]},
    ]
    # Entry lists are kept, reduced to type/text; other message keys are dropped; the input is not modified.
    entries = [user([{"type": "image", "index": 0}, TEXT("  spaced  ")]) | {"name": "x"}]
    assert normalize_messages(entries) == [{"role": "user", "content": [IMAGE, TEXT("  spaced  ")]}]
    assert entries[0]["content"][0] == {"type": "image", "index": 0}


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty list"),
        ([assistant("hi")], "message 0 has role 'assistant' after the start"),
        ([user("a"), user("b")], "message 1 has role 'user' after user"),
        ([user("a"), assistant("b"), {"role": "system", "content": "c"}], "message 2 has role 'system'"),
        ([{"role": "tool", "content": "a"}], "roles are"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([user([{"type": "video"}])], "content entries are"),
        ([user([TEXT("look: <image>")])], "text entry holds '<image>'"),
        ([user([{"type": "image", "path": "a.png"}])], "record's `images`"),
        ([user(42)], "string or a list"),
    ],
)
def test_malformed_chats_raise_naming_the_message(messages, match):
    with pytest.raises(ValueError, match=match):
        normalize_messages(messages)


def test_jsonl_chats_load_as_images_and_messages(images, caplog):
    lines = [
        {"image": "red.png", "messages": [user("<image>\nWhat colour?"), assistant("Red.")]},
        {"images": ["red.png", "blue.png"], "messages": [user([IMAGE, IMAGE, TEXT("Same?")]), assistant("No.")]},
        {"images": ["red.png", "missing.png"], "messages": [user("<image><image>Same?"), assistant("?")]},
        {"images": ["text.png"], "messages": [user("<image>"), assistant("?")]},
        {"messages": [user("No image here."), assistant("Fine.")]},
    ]
    with caplog.at_level(logging.WARNING):
        dataset, report = load_image_text_jsonl(write_jsonl(images / "chat.jsonl", lines), return_report=True)
    assert dataset.column_names == ["images", "messages"] and dataset.num_rows == 3
    assert [len(row) for row in dataset["images"]] == [1, 2, 0]
    assert dataset[1]["images"][1].getpixel((0, 0)) == (0, 0, 255)
    first = dataset[0]["messages"]
    assert [entry["type"] for entry in first[0]["content"]] == ["image", "text"]
    assert first[0]["content"][1]["text"] == "What colour?" and first[1]["content"][0]["text"] == "Red."
    assert report.missing == ["missing.png"] and list(report.corrupt) == ["text.png"]
    assert (report.num_rows, report.num_images, report.skipped_rows) == (3, 2, 2)
    assert "Skipped 2 of 4 images" in caplog.text

    # The format TRL's SFTTrainer fills images into.
    data_utils = pytest.importorskip("trl.data_utils")
    filled = data_utils.prepare_multimodal_messages(dataset[1]["messages"], dataset[1]["images"])
    assert [entry["image"].size for entry in filled[0]["content"][:2]] == [(6, 6), (6, 6)]


def test_folder_metadata_takes_chat_records(images):
    lines = [{"file_name": "blue.png", "messages": [user("<image>\nColour?"), assistant("Blue.")]}]
    write_jsonl(images / "metadata.jsonl", lines)
    row = load_image_text_folder(images)[0]
    assert row["images"][0].getpixel((0, 0)) == (0, 0, 255) and row["messages"][1]["role"] == "assistant"


@pytest.mark.parametrize("streaming", [False, True])
def test_image_count_mismatch_and_bad_chats_name_the_line(images, streaming):
    good = {"image": "red.png", "messages": [user("<image>\nWhat?"), assistant("Red.")]}
    cases = [
        ({"images": ["red.png", "blue.png"], "messages": [user("<image> one image"), assistant("?")]}, "1 image entr"),
        ({"image": "red.png", "messages": [user("no image"), assistant("?")]}, "0 image entries .* 1 images"),
        ({"image": "red.png", "messages": [user("<image>"), user("again")]}, "message 1 has role 'user'"),
        ({"images": [3], "messages": [user("<image>")]}, "a path or a list of paths"),
        ({"image": "red.png", "caption": "a caption line"}, "mixes captions and chats"),
    ]
    for bad, match in cases:
        path = write_jsonl(images / "chat.jsonl", [good, bad, good])
        with pytest.raises(ValueError, match=f"Line 2 of .*chat.jsonl.*{match}"):
            load_image_text_jsonl(path, streaming=streaming)


# ------------------------------------------------------------------------------------------ tar shards


@pytest.fixture
def caption_shards(tmp_path):
    write_tar(
        tmp_path / "shard-000.tar",
        {
            "000001.png": png_bytes("red"),
            "000001.txt": b"a red square",
            "000002.png": b"not a png at all",  # corrupt member
            "000002.txt": b"garbage",
            "000003.png": png_bytes("blue"),
            "000003.json": json.dumps({"captions": ["a blue square", "blue"], "image_id": 7}).encode(),
        },
    )
    write_tar(
        tmp_path / "shard-001.tar.gz",
        {"a/000004.txt": b"a caption whose image is not there", "a/000005.png": png_bytes("green")},
        mode="w:gz",
    )
    return tmp_path


@pytest.mark.parametrize("streaming", [False, True])
def test_shards_skip_and_count_bad_samples(caption_shards, streaming, caplog):
    pattern = [caption_shards / "shard-000.tar", caption_shards / "shard-001.tar.gz"]
    with caplog.at_level(logging.WARNING):
        dataset, report = load_image_text_shards(pattern, streaming=streaming, return_report=True)
        rows = list(dataset)
    assert isinstance(dataset, datasets.IterableDataset if streaming else datasets.Dataset)
    assert [row["caption"] for row in rows] == ["a red square", "a blue square", "blue"]
    assert rows[1]["image"].getpixel((0, 0)) == (0, 0, 255) and [row["image_id"] for row in rows[1:]] == [7, 7]
    assert rows[0]["image_id"] == 2**40  # shard 0, position 0: no id given
    assert list(report.corrupt) == ["shard-000.tar:000002.png"] and report.missing == ["shard-001.tar.gz:a/000004"]
    assert (
        list(report.invalid) == ["shard-001.tar.gz:a/000005"]
        and "no caption" in report.invalid["shard-001.tar.gz:a/000005"]
    )
    assert (report.num_skipped, report.num_rows, report.num_images, report.passes) == (3, 3, 2, 1)
    assert "End of pass 1" in caplog.text and "Skipped 3 of 5 images" in caplog.text
    if streaming:
        # `datasets` calls the generator once per shard; passes still span all shards, and count afresh.
        assert len(list(dataset.take(1))) == 1 and report.passes == 1
        assert len(list(dataset.shuffle(seed=1, buffer_size=2))) == 3
        assert (report.passes, report.num_skipped, report.num_rows) == (2, 3, 3)


def test_one_corrupt_member_counts_one(caption_shards):
    dataset, report = load_image_text_shards(caption_shards / "shard-000.tar", return_report=True)
    assert dataset.num_rows == 3 and report.num_skipped == 1 and report.skipped_rows == 1
    assert "UnidentifiedImageError" in report.corrupt["shard-000.tar:000002.png"]
    assert "BytesIO" not in report.summary()


def test_shard_patterns_and_missing_shards(caption_shards):
    for pattern in (caption_shards / "shard-*.tar*", str(caption_shards / "shard-{000..000}.tar")):
        assert load_image_text_shards(pattern).num_rows >= 3
    with pytest.raises(FileNotFoundError, match="shard-009.tar"):
        load_image_text_shards([caption_shards / "shard-000.tar", caption_shards / "shard-009.tar"])
    with pytest.raises(FileNotFoundError):
        load_image_text_shards(str(caption_shards / "nothing-*.tar"))


def test_truncated_shard_keeps_what_came_before_and_reads_the_next(tmp_path):
    members = {
        f"{index:04d}.{ext}": data for index in range(3) for ext, data in [("png", png_bytes("red")), ("txt", b"r")]
    }
    whole = write_tar(tmp_path / "whole.tar", members).read_bytes()
    # Each member is a 512-byte header and one 512-byte block of data: cut inside the data of 0001.png.
    (tmp_path / "a.tar").write_bytes(whole[: 2 * 1024 + 512 + 50])
    write_tar(tmp_path / "b.tar", {"0100.png": png_bytes("blue"), "0100.txt": b"after"})
    dataset, report = load_image_text_shards([tmp_path / "a.tar", tmp_path / "b.tar"], return_report=True)
    assert list(dataset["caption"]) == ["r", "after"]
    assert list(report.invalid) == ["a.tar (from 0001)"] and "shard unreadable" in report.invalid["a.tar (from 0001)"]


def test_chat_shards_pair_numbered_images_with_entries(tmp_path):
    chat = {"messages": [user("<image><image>Which is red?"), assistant("The first.")]}
    write_tar(
        tmp_path / "chat.tar",
        {
            "s1.0.png": png_bytes("red"),
            "s1.1.png": png_bytes("blue"),
            "s1.json": json.dumps(chat).encode(),
            "s1.seg.png": png_bytes("green"),  # not one of the sample's images
            "._s1.0.png": b"macOS resource fork",
            "s2.png": png_bytes("red"),  # one image for two image entries
            "s2.json": json.dumps(chat).encode(),
            "s3.png": png_bytes("red"),
            "s3.json": b"{not json",
        },
    )
    stream, report = load_image_text_shards(tmp_path / "chat.tar", streaming=True, return_report=True)
    rows = list(stream)
    assert len(rows) == 1 and [image.getpixel((0, 0)) for image in rows[0]["images"]] == [(255, 0, 0), (0, 0, 255)]
    assert [entry["type"] for entry in rows[0]["messages"][0]["content"]] == ["image", "image", "text"]
    assert (
        report.invalid.keys() == {"chat.tar:s2", "chat.tar:s3"}
        and "1 image files for 2" in report.invalid["chat.tar:s2"]
    )


# ------------------------------------------------------------------------------------------ streaming


@pytest.fixture
def folder(images):
    lines = [
        {"file_name": "red.png", "text": "a red square"},
        {"file_name": "text.png", "text": "garbage"},
        {"file_name": "blue.png", "captions": ["a blue square", "blue"], "image_id": 5},
        {"file_name": "truncated.png", "text": "cut short"},
        {"file_name": "missing.png", "text": "never written"},
        {"file_name": "missing.png", "text": "listed twice"},
    ]
    write_jsonl(images / "metadata.jsonl", lines)
    return images


def test_streaming_folder_yields_good_rows_and_reports_bad_ones_after_each_pass(folder, caplog):
    stream, report = load_image_text_folder(folder, streaming=True, return_report=True)
    eager = load_image_text_folder(folder)
    assert report.passes == 0 and report.num_skipped == 0
    with caplog.at_level(logging.WARNING):
        rows = list(stream)
    assert [row["caption"] for row in rows] == list(eager["caption"]) == ["a red square", "a blue square", "blue"]
    assert [row["image_id"] for row in rows] == list(eager["image_id"]) == [6, 5, 5]
    assert rows[0]["image"].getpixel((0, 0)) == (255, 0, 0)
    assert report.missing == ["missing.png"] and sorted(report.corrupt) == ["text.png", "truncated.png"]
    assert (report.num_skipped, report.num_rows, report.num_images, report.skipped_rows) == (3, 3, 2, 4)
    assert "End of pass 1 over the data: Skipped 3 of 5 images" in caplog.text
    # A second pass (epoch) counts afresh, so the same bad files are not counted twice.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert len(list(stream.shuffle(seed=0, buffer_size=2))) == 3
    assert report.passes == 2 and report.num_skipped == 3 and "End of pass 2" in caplog.text


def test_streaming_does_not_decode_before_iteration(folder, decode_calls):
    stream = load_image_text_folder(folder, streaming=True)
    assert isinstance(stream, datasets.IterableDataset) and not decode_calls
    first = next(iter(stream))
    assert first["caption"] == "a red square" and len(decode_calls) <= 3  # red (checked, then decoded), maybe blue
    before = len(decode_calls)
    assert load_image_text_folder(folder).num_rows == 3
    # Without streaming every image is checked up front: red and blue decode (the broken files fail when opened).
    assert len(decode_calls) - before == 2


def test_streaming_jsonl_chats_and_unverified_streams(images):
    lines = [
        {"image": "red.png", "messages": [user("<image>What?"), assistant("Red.")]},
        {"image": "missing.png", "messages": [user("<image>What?"), assistant("?")]},
    ]
    stream, report = load_image_text_jsonl(write_jsonl(images / "c.jsonl", lines), streaming=True, return_report=True)
    assert [len(row["images"]) for row in stream] == [1] and report.missing == ["missing.png"]
    assert report.skipped_rows == 1
    path = write_jsonl(images / "p.jsonl", [{"image": "red.png", "text": "r"}, {"image": "missing.png", "text": "m"}])
    stream, report = load_image_text_jsonl(path, streaming=True, verify_images=False, return_report=True)
    assert [row["caption"] for row in stream] == ["r"] and report.missing == ["missing.png"]


# ------------------------------------------------------------------------------------------ Trainer callback


def test_callback_logs_the_count_and_warns_when_it_grows(caplog):
    train, evaluation = LoadReport("train.jsonl", num_images=8), LoadReport("eval.jsonl", num_images=2)
    callback = SkippedImagesCallback(train, evaluation)
    state = SimpleNamespace(log_history=[], global_step=0)
    with caplog.at_level(logging.WARNING):
        callback.on_train_begin(SimpleNamespace(dataloader_num_workers=2), state, None)
    assert "dataloader_num_workers=2" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        state.global_step, state.log_history = 10, [{"loss": 2.0, "step": 10}]
        logs = {"loss": 2.0}
        callback.on_log(None, state, None, logs=logs)
        assert logs["skipped_images"] == 0 and state.log_history[-1]["skipped_images"] == 0 and not caplog.text
        train._skip("a.png", "missing")
        evaluation._skip("b.png", "OSError: truncated")
        state.global_step = 20
        state.log_history.append({"loss": 1.0, "step": 20})
        callback.on_log(None, state, None, logs=(logs := {"loss": 1.0}))
    assert logs["skipped_images"] == 2 and state.log_history[-1]["skipped_images"] == 2
    assert "2 more images skipped (2 in all)" in caplog.text and "a.png" in caplog.text and "b.png" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        callback.on_log(None, state, None, logs={})  # same count: no new warning
        assert not caplog.text
        callback.on_train_end(None, state, None)
    assert caplog.text.count("At the end of training: Skipped 1 of") == 2
    with pytest.raises(ValueError, match="LoadReport"):
        SkippedImagesCallback()
