"""Built-in grounded data: the chat format, deterministic images, unique referring expressions, and targets that
match the pixels actually drawn."""

import re

import numpy as np
import pytest

from vlbridge.data.synthetic import COLOURS
from vlbridge.data.synthetic_grounding import GROUNDING_TASKS, QUADRANTS, make_synthetic_grounding
from vlbridge.processing import parse_coordinates


SIZE = 64


@pytest.fixture(scope="module")
def grounding():
    return make_synthetic_grounding(30, seed=3, image_size=SIZE, max_objects=3, return_report=True)


def named_object(question: str, objects: list[dict]) -> list[dict]:
    """The objects a referring expression ("the (small) red square") fits."""
    match = re.search(r"(?:is|at|holds) the (?:(small|large) )?(\w+) (\w+)", question)
    size, colour, shape = match.groups()
    return [o for o in objects if (o["colour"], o["shape"]) == (colour, shape) and size in (None, o["size"])]


def colour_pixels(image, colour: str) -> np.ndarray:
    """`(rows, columns)` of every pixel of an exact palette colour (shapes are drawn without anti-aliasing)."""
    return np.nonzero(np.all(np.asarray(image) == np.array(COLOURS[colour], dtype=np.uint8), axis=-1))


def test_rows_are_single_turn_chats_with_targets(grounding):
    data, report = grounding
    assert set(data["task"]) == set(GROUNDING_TASKS)
    assert data.num_rows == report.num_rows == 30 * len(GROUNDING_TASKS) - sum(report.skipped.values())
    for row in data.select(range(10)):
        user, assistant = row["messages"]
        assert [entry["type"] for entry in user["content"]] == ["image", "text"]
        assert assistant["content"][0]["text"] == row["answer"]
        assert len(row["images"]) == 1 and row["images"][0].size == (SIZE, SIZE)
        assert row["target_box"] in row["target_boxes"]
        box, point = row["target_box"], row["target_point"]
        assert point == [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]


def test_answers_hold_the_targets(grounding):
    data, _ = grounding
    for row in data:
        parsed = parse_coordinates(row["answer"])
        assert parsed.num_invalid == parsed.num_clipped == 0
        if row["task"] == "rec":
            assert np.allclose(parsed.boxes, [row["target_box"]], atol=5e-4)
        elif row["task"] == "point":
            assert np.allclose(parsed.points, [row["target_point"]], atol=5e-4)
        elif row["task"] == "grounded_caption":
            assert np.allclose(parsed.boxes, row["target_boxes"], atol=5e-4)
            assert len(parsed.boxes) == len(row["objects"])
        elif row["task"] == "region_caption":
            region = parse_coordinates(row["messages"][0]["content"][1]["text"]).boxes
            assert np.allclose(region, [row["target_box"]], atol=5e-4)
            (obj,) = [o for o in row["objects"] if np.allclose(np.divide(o["bbox"], SIZE), row["target_box"])]
            assert row["answer"] == f"a {obj['size']} {obj['colour']} {obj['shape']}"
        else:
            assert row["answer"] in {name for line in QUADRANTS for name in line}


def test_referring_expressions_name_one_object_and_its_box(grounding):
    data, _ = grounding
    referring = data.filter(lambda task: task in ("rec", "point", "quadrant"), input_columns="task")
    assert referring.num_rows > 30
    for row in referring:
        (obj,) = named_object(row["messages"][0]["content"][1]["text"], row["objects"])
        assert sum((o["colour"], o["shape"]) == (obj["colour"], obj["shape"]) for o in row["objects"]) == 1
        assert np.allclose(np.divide(obj["bbox"], SIZE), row["target_box"])


def test_boxes_are_tight_around_the_drawn_pixels(grounding):
    data, _ = grounding
    for row in data.filter(lambda task: task == "rec", input_columns="task"):
        (obj,) = named_object(row["messages"][0]["content"][1]["text"], row["objects"])
        # Groups differ in colour, so the pixels of this colour are this object's.
        rows, columns = colour_pixels(row["images"][0], obj["colour"])
        x0, y0, x1, y1 = np.multiply(row["target_box"], SIZE)
        assert (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1) == (x0, y0, x1, y1)


def test_quadrant_answers_hold_the_whole_object(grounding):
    data, report = grounding
    quadrant = data.filter(lambda task: task == "quadrant", input_columns="task")
    assert quadrant.num_rows + report.skipped["quadrant"] == 30
    for row in quadrant:
        (obj,) = named_object(row["messages"][0]["content"][1]["text"], row["objects"])
        rows, columns = colour_pixels(row["images"][0], obj["colour"])
        bottom, right = row["answer"].split()
        assert (rows >= SIZE / 2).all() if bottom == "bottom" else (rows < SIZE / 2).all()
        assert (columns >= SIZE / 2).all() if right == "right" else (columns < SIZE / 2).all()


def test_deterministic_by_seed_and_images_do_not_depend_on_the_tasks():
    first = make_synthetic_grounding(5, seed=11)
    assert first.to_dict() == make_synthetic_grounding(5, seed=11).to_dict()
    held_out = make_synthetic_grounding(5, seed=12)
    assert first["answer"] != held_out["answer"]
    rec_only = make_synthetic_grounding(5, tasks=["rec"], seed=11)
    images = first.filter(lambda task: task == "rec", input_columns="task")
    assert [np.asarray(r["images"][0]).tobytes() for r in images] == [
        np.asarray(r["images"][0]).tobytes() for r in rec_only
    ]


@pytest.mark.parametrize("low, high", [(1, 1), (2, 2)])
def test_one_and_two_object_scenes(low, high):
    data, report = make_synthetic_grounding(
        10, tasks=["grounded_caption"], seed=0, max_objects=high, min_objects=low, return_report=True
    )
    assert {len(objects) for objects in data["objects"]} == {high}
    assert data.num_rows == 10
    if high == 1:
        assert report.redrawn == {"no_unique_object": 0, "too_few_objects": 0}


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="tasks"):
        make_synthetic_grounding(2, tasks=["detection"])
    with pytest.raises(ValueError, match="min_objects"):
        make_synthetic_grounding(2, max_objects=1, min_objects=2)
