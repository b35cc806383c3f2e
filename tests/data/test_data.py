"""Built-in synthetic image-text data and the local image-text loaders."""

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict

import datasets
import numpy as np
import pytest
from helpers import TESTS, run_docstring_examples
from PIL import Image

from vlbridge.data import (
    Scene,
    build_word_tokenizer,
    caption_vocabulary,
    explode_captions,
    group_captions,
    load_image_text_folder,
    load_image_text_jsonl,
    make_synthetic_image_text,
)
from vlbridge.data.shapes import caption_words, draw_shape, shape_captions
from vlbridge.data.synthetic import COLOURS, PLURALS, SHAPES, describe_full


SPLITS = {"train": 120, "validation": 30, "test": 30}
COUNT = {"a": 1, "one": 1, "two": 2, "three": 3}
NOUNS = {**{shape: shape for shape in SHAPES}, **{plural: shape for shape, plural in PLURALS.items()}}


@pytest.fixture(scope="module")
def data():
    return make_synthetic_image_text(SPLITS, seed=0, captions_per_image=4)


def raw_images(split):
    """PNG bytes per row, without decoding."""
    return [item["bytes"] for item in split.cast_column("image", datasets.Image(decode=False))["image"]]


def fingerprint(dataset_dict) -> str:
    digest = hashlib.sha256()
    for name, split in dataset_dict.items():
        digest.update(name.encode())
        for image, caption in zip(raw_images(split), split["caption"]):
            digest.update(image + caption.encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ determinism and splits


def test_same_seed_gives_identical_bytes_and_captions_other_seed_differs(data):
    again = make_synthetic_image_text(SPLITS, seed=0, captions_per_image=4)
    for name in SPLITS:
        assert raw_images(again[name]) == raw_images(data[name])
        assert list(again[name]["caption"]) == list(data[name]["caption"])
        assert again[name]["objects"] == data[name]["objects"]
    other = make_synthetic_image_text(SPLITS, seed=1, captions_per_image=4)
    assert raw_images(other["train"]) != raw_images(data["train"])
    assert list(other["train"]["caption"]) != list(data["train"]["caption"])


def test_determinism_does_not_depend_on_the_hash_seed():
    code = (
        "from test_data import fingerprint; from vlbridge.data import make_synthetic_image_text; "
        "print(fingerprint(make_synthetic_image_text({'train': 6, 'test': 3})))"
    )
    env = {
        **os.environ,
        "PYTHONHASHSEED": "12345",
        "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), str(TESTS)]),
    }
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == fingerprint(make_synthetic_image_text({"train": 6, "test": 3}))


def test_splits_never_share_an_image(data):
    ids = {name: set(split["image_id"]) for name, split in data.items()}
    assert [len(ids[name]) for name in SPLITS] == list(SPLITS.values())
    assert sorted(set.union(*ids.values())) == list(range(sum(SPLITS.values())))  # unique across splits
    images = {name: set(raw_images(split)) for name, split in data.items()}
    assert sum(len(found) for found in images.values()) == len(set.union(*images.values()))
    scenes = {name: {str(objects) for objects in split["objects"]} for name, split in data.items()}
    assert not (scenes["train"] & scenes["test"]) and not (scenes["train"] & scenes["validation"])


def test_evaluation_splits_do_not_depend_on_the_train_size(data):
    bigger = make_synthetic_image_text({**SPLITS, "train": 200}, seed=0, captions_per_image=4)
    assert raw_images(bigger["test"]) == raw_images(data["test"])
    assert list(bigger["test"]["caption"]) == list(data["test"]["caption"])


def test_features_and_layout(data):
    features = data["train"].features
    assert isinstance(features["image"], datasets.Image)
    assert features["caption"] == datasets.Value("string") and features["image_id"] == datasets.Value("int64")
    assert set(features["objects"].feature) == {"shape", "colour", "size", "position", "bbox"}
    row = data["train"][0]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (64, 64) and row["image"].mode == "RGB"
    assert make_synthetic_image_text({"test": 2}, image_size=40)["test"][0]["image"].size == (40, 40)


def test_group_and_explode_captions_round_trip(data):
    images = group_captions(data["test"])
    assert images.num_rows == SPLITS["test"] and isinstance(images.features["image"], datasets.Image)
    assert all(len(captions) == 4 for captions in images["captions"])
    assert explode_captions(images).to_dict() == data["test"].to_dict()


# ------------------------------------------------------------------------------------------ captions


def test_several_distinct_captions_per_image_within_the_vocabulary(data):
    tokenizer = build_word_tokenizer(caption_vocabulary())
    vocabulary = set(caption_vocabulary())
    for split in data.values():
        for captions, styles in zip(*group_captions(split).select_columns(["captions", "caption_styles"])[:].values()):
            assert len(captions) == 4 and len(set(captions)) == 4 and styles[0] == "full"
            for caption in captions:
                assert set(caption.split()) <= vocabulary, caption
                assert tokenizer.unk_token_id not in tokenizer(caption).input_ids, caption
    styles = Counter(data["train"]["caption_style"])
    assert {"full", "positions", "relation", "counts", "attributes"} <= set(styles)


def cell(position: str) -> tuple[int, int]:
    """(row, column) from a position name, read independently of the generator's tables."""
    row = 0 if "top" in position else 2 if "bottom" in position else 1
    return row, 0 if "left" in position else 2 if "right" in position else 1


def in_region(position: str, region: str) -> bool:
    row, column = cell(position)
    if region.endswith(" row"):
        return row == ["top", "middle", "bottom"].index(region.split()[0])
    if region.endswith(" column"):
        return column == ["left", "middle", "right"].index(region.split()[0])
    return (row, column) == cell(region)


def holds(relation: str, first: list[str], second: list[str]) -> bool:
    axis, sign = {"left of": (1, -1), "right of": (1, 1), "above": (0, -1), "below": (0, 1)}[relation]
    return all(sign * (cell(a)[axis] - cell(b)[axis]) > 0 for a in first for b in second)


OBJECT = r"(a|one|two|three) (?:(small|large) )?(?:(\w+) )?(\w+)"
REGION = r"(?:in the|at the|on the) (top left|top right|bottom left|bottom right|\w+ row|\w+ column|\w+)"


def check_caption(style: str, caption: str, objects: list[dict]) -> None:
    """Parse a caption with regular expressions and check every statement against the structured objects."""
    kinds = Counter((o["shape"], o["colour"], o["size"]) for o in objects)
    where = defaultdict(list)
    for o in objects:
        where[o["shape"]].append(o["position"])
    if style in ("full", "picture", "positions", "counts"):
        body = caption.removeprefix("a picture of ").removeprefix("there is ").removeprefix("there are ")
        pattern = OBJECT + (" " + REGION if style == "positions" else "")
        phrases = body.split(" and ")
        assert len(phrases) == len(kinds), caption
        for phrase in phrases:
            match = re.fullmatch(pattern, phrase)
            assert match, (style, caption)
            count, size, colour, noun = match.group(1, 2, 3, 4)
            shape = NOUNS[noun]
            kind = next(k for k in kinds if k[0] == shape)
            assert (colour, COUNT[count]) == (kind[1], kinds[kind]), caption
            assert size in (None, kind[2]) and (size is not None) == (style != "counts"), caption
            if style == "positions":
                assert all(in_region(position, match.group(5)) for position in where[shape]), caption
    elif style == "relation":
        match = re.fullmatch(f"{OBJECT} (left of|right of|above|below) {OBJECT}", caption)
        assert match, caption
        first, second = NOUNS[match.group(4)], NOUNS[match.group(9)]
        assert holds(match.group(5), where[first], where[second]), caption
    elif style == "attributes":
        for phrase in re.findall(r"the (\w+) (?:is|are) (small|large) and (\w+)", caption):
            kind = next(k for k in kinds if k[0] == NOUNS[phrase[0]])
            assert (kind[2], kind[1]) == phrase[1:], caption
            assert (phrase[0] == kind[0]) == (kinds[kind] == 1), caption
        assert len(caption.split(" and ")) == 2 * len(kinds)
    else:
        raise AssertionError(f"unknown caption style {style}")


def test_captions_agree_with_the_structured_objects(data):
    for split in data.values():
        for row in split.select_columns(["caption", "caption_style", "objects"]):
            check_caption(row["caption_style"], row["caption"], row["objects"])


def test_scene_rebuilds_from_its_objects(data):
    for row in data["test"].select_columns(["caption", "caption_style", "objects"]):
        if row["caption_style"] == "full":
            assert describe_full(Scene.from_objects(row["objects"])) == row["caption"]


# ------------------------------------------------------------------------------------------ images


def test_images_show_exactly_the_described_colours_sizes_and_positions(data):
    images = group_captions(data["validation"])
    for image, objects in zip(images["image"], images["objects"]):
        pixels = np.asarray(image)
        colours = {tuple(c) for c in pixels.reshape(-1, 3)}
        assert colours == {(255, 255, 255)} | {COLOURS[o["colour"]] for o in objects}
        cell_size = image.size[0] / 3
        for obj in objects:
            x0, y0, x1, y1 = obj["bbox"]
            ys, xs = np.nonzero((pixels[y0:y1, x0:x1] == COLOURS[obj["colour"]]).all(-1))
            # The drawn shape spans its box, and the box is small or large relative to a grid cell.
            assert xs.max() - xs.min() + 1 >= 0.8 * (x1 - x0) and ys.max() - ys.min() + 1 >= 0.8 * (y1 - y0)
            assert (x1 - x0) <= 0.45 * cell_size if obj["size"] == "small" else (x1 - x0) >= 0.6 * cell_size
            assert cell(obj["position"]) == (int((y0 + y1) / 2 // cell_size), int((x0 + x1) / 2 // cell_size))


def test_palette_colours_look_like_their_names():
    hue = {
        "red": lambda r, g, b: r > 2 * g and r > 2 * b,
        "green": lambda r, g, b: g > 2 * r and g > 2 * b,
        "blue": lambda r, g, b: b > 2 * r and b > 2 * g,
        "yellow": lambda r, g, b: min(r, g) > 3 * b,
        "purple": lambda r, g, b: min(r, b) > 2 * g,
        "orange": lambda r, g, b: r > g > 2 * b and r - g > 60,
        "pink": lambda r, g, b: r > 200 and min(g, b) > 100 and b > g,
        "black": lambda r, g, b: max(r, g, b) < 60,
    }
    assert set(COLOURS) == set(hue) and len(SHAPES) >= 4
    assert all(hue[name](*rgb) for name, rgb in COLOURS.items())


def test_images_with_different_captions_differ(data):
    images = group_captions(data["train"])
    by_caption = {}
    for image, captions in zip(images["image"], images["captions"]):
        by_caption.setdefault(captions[0], np.asarray(image))
    arrays = list(by_caption.values())
    assert len(arrays) > 50
    assert all(not np.array_equal(a, b) for i, a in enumerate(arrays) for b in arrays[i + 1 :])


def test_generating_2000_images_is_fast():
    start = time.perf_counter()
    data = make_synthetic_image_text({"train": 2000}, captions_per_image=3)
    assert data["train"].num_rows == 6000
    assert time.perf_counter() - start < 20


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="captions_per_image"):
        make_synthetic_image_text({"test": 1}, captions_per_image=9)
    with pytest.raises(ValueError, match="image_size"):
        make_synthetic_image_text({"test": 1}, image_size=8)
    with pytest.raises(ValueError, match="max_objects"):
        make_synthetic_image_text({"train": 1000}, max_objects=1)  # only 864 single-object scenes exist


def test_demo_shape_helpers_still_work():
    pairs = shape_captions(3, seed=0)
    assert [caption for _, caption in pairs] == [caption for _, caption in shape_captions(3, seed=0)]
    assert all(set(caption.split()) <= set(caption_words()) for _, caption in pairs)
    assert draw_shape("circle", "red").size == (32, 32)


@pytest.mark.parametrize("name", ["vlbridge.data.synthetic", "vlbridge.data.local"])
def test_docstring_examples(name):
    run_docstring_examples(name)


# ------------------------------------------------------------------------------------------ local data


def write_png(path, colour):
    Image.new("RGB", (6, 6), colour).save(path)


@pytest.fixture
def folder(tmp_path):
    write_png(tmp_path / "red.png", "red")
    (tmp_path / "sub").mkdir()
    write_png(tmp_path / "sub" / "blue.png", "blue")
    (tmp_path / "corrupt.png").write_bytes(b"this is not a png at all")
    truncated = tmp_path / "red.png"
    (tmp_path / "truncated.png").write_bytes(truncated.read_bytes()[:40])
    lines = [
        {"file_name": "red.png", "text": "a red square", "image_id": 10},
        {"file_name": "sub/blue.png", "caption": ["a blue square", "blue"]},
        {"file_name": "corrupt.png", "text": "garbage"},
        {"file_name": "truncated.png", "text": "cut short"},
        {"file_name": "missing.png", "text": "never written"},
        {"file_name": "red.png", "text": "red"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    return tmp_path


def test_folder_loader_skips_counts_and_reports_bad_images(folder, caplog):
    with caplog.at_level(logging.WARNING):
        dataset, report = load_image_text_folder(folder, return_report=True)
    assert list(dataset["caption"]) == ["a red square", "a blue square", "blue", "red"]
    assert list(dataset["image_id"]) == [10, 11, 11, 10]
    assert dataset[1]["image"].getpixel((0, 0)) == (0, 0, 255)
    assert report.missing == ["missing.png"] and sorted(report.corrupt) == ["corrupt.png", "truncated.png"]
    assert (report.num_skipped, report.skipped_rows, report.num_rows, report.num_images) == (3, 3, 4, 2)
    warning = " ".join(record.getMessage() for record in caplog.records if record.levelno == logging.WARNING)
    assert "Skipped 3 of 5 images" in warning
    assert all(name in warning for name in ("missing.png", "corrupt.png", "truncated.png"))
    synthetic = make_synthetic_image_text({"test": 1})["test"].features
    assert all(dataset.features[column] == synthetic[column] for column in ("image", "caption", "image_id"))
    assert load_image_text_folder(folder).num_rows == 4  # without the report


def test_folder_loader_without_verification_only_skips_missing_files(folder):
    dataset, report = load_image_text_folder(folder, verify_images=False, return_report=True)
    assert report.missing == ["missing.png"] and not report.corrupt and dataset.num_rows == 6


def test_folder_loader_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        load_image_text_folder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png"}\n')
    with pytest.raises(ValueError, match="Line 2 .* no caption"):
        load_image_text_folder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="Line 1 .* not valid JSON"):
        load_image_text_folder(tmp_path)


def test_jsonl_loader_reads_relative_and_absolute_paths_and_counts_bad_images(tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    write_png(images / "green.png", "green")
    write_png(tmp_path / "white.png", "white")
    (images / "broken.png").write_bytes(os.urandom(64))
    lines = [
        {"image": "images/green.png", "caption": "a green square"},
        {"image": str(tmp_path / "white.png"), "caption": "a white square"},
        {"image": "images/broken.png", "caption": "noise"},
        {"image": "images/nowhere.png", "caption": "gone"},
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    with caplog.at_level(logging.WARNING):
        dataset, report = load_image_text_jsonl(tmp_path / "pairs.jsonl", return_report=True)
    assert list(dataset["caption"]) == ["a green square", "a white square"] and list(dataset["image_id"]) == [0, 1]
    assert dataset[0]["image"].getpixel((0, 0)) == (0, 128, 0)
    assert report.missing == ["images/nowhere.png"] and list(report.corrupt) == ["images/broken.png"]
    assert "Skipped 2 of 4 images" in caplog.text

    custom = tmp_path / "custom.jsonl"
    custom.write_text(json.dumps({"img": "images/green.png", "sentence": "green"}))
    dataset = load_image_text_jsonl(custom, image_key="img", caption_key="sentence")
    assert list(dataset["caption"]) == ["green"]
    with pytest.raises(FileNotFoundError):
        load_image_text_jsonl(tmp_path / "nope.jsonl")
