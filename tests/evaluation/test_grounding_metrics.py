"""Grounding metrics: IoU, REC accuracy and mean IoU, pointing accuracy, invalid answers, the `evaluate` module, and
region-caption CIDEr through the `cider` module, with hand-computed values."""

import pytest

from vlbridge.data.synthetic_grounding import make_synthetic_grounding
from vlbridge.metrics import box_iou, cider_d, load_metric, point_accuracy, rec_accuracy


@pytest.mark.parametrize(
    "a, b, iou",
    [
        ([0, 0, 1, 1], [0, 0, 1, 1], 1.0),
        ([0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1], 0.0),  # touching corners
        ([0, 0, 0.5, 1], [0.25, 0, 0.75, 1], 1 / 3),  # 0.25 shared of 0.75
        ([0, 0, 0.4, 0.4], [0.1, 0.1, 0.3, 0.3], 0.25),  # nested: 0.04 / 0.16
        ([0.2, 0.2, 0.2, 0.5], [0, 0, 1, 1], 0.0),  # empty box
        ([0.3, 0.3, 0.3, 0.3], [0.3, 0.3, 0.3, 0.3], 0.0),  # both empty
    ],
)
def test_box_iou_hand_computed(a, b, iou):
    assert box_iou(a, b) == pytest.approx(iou)
    assert box_iou(b, a) == pytest.approx(iou)


def test_rec_accuracy_hand_computed():
    references = [[0.0, 0.0, 0.5, 1.0]] * 5
    predictions = [
        "[0.000, 0.000, 0.500, 1.000]",  # IoU 1
        "it is <box>[0.25, 0, 0.75, 1]</box>",  # IoU 1/3: a miss at 0.5
        "[0.0, 0.0, 0.5, 0.5] and [0.0, 0.0, 0.5, 1.0]",  # the first box counts: IoU 0.5, a hit (>=)
        "on the left",  # no box: invalid, IoU 0
        "[0.5, 0.5]",  # a point where a box is expected: invalid
    ]
    scores = rec_accuracy(predictions, references)
    assert scores == pytest.approx(
        {"accuracy": 2 / 5, "mean_iou": (1 + 1 / 3 + 0.5) / 5, "invalid_rate": 2 / 5, "clipped_rate": 0.0}
    )
    assert rec_accuracy(predictions, references, iou_threshold=0.3)["accuracy"] == pytest.approx(3 / 5)


def test_clipped_answers_are_scored_after_clipping_and_counted():
    scores = rec_accuracy(["[-0.2, 0.0, 0.5, 1.4]", "[0, 0, 0.5, 1]"], [[0.0, 0.0, 0.5, 1.0]] * 2)
    assert scores == {"accuracy": 1.0, "mean_iou": 1.0, "invalid_rate": 0.0, "clipped_rate": 0.5}


def test_point_accuracy_hand_computed():
    references = [[0.2, 0.2, 0.6, 0.6]] * 5
    predictions = ["[0.4, 0.4]", "[0.6, 0.2]", "[0.7, 0.4]", "[0.2, 0.2, 0.6, 0.6]", "nothing"]
    # inside, on the corner (inside), outside, a box where a point is expected (invalid), no coordinates (invalid)
    assert point_accuracy(predictions, references) == {"accuracy": 0.4, "invalid_rate": 0.4, "clipped_rate": 0.0}


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="2 predictions for 1"):
        rec_accuracy(["a", "b"], [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="target box"):
        rec_accuracy(["a"], [[0.5, 0, 0.2, 1]])
    with pytest.raises(ValueError, match="target box"):
        point_accuracy(["a"], [[0.5, 0.5]])
    with pytest.raises(TypeError, match="generated strings"):
        rec_accuracy("[0, 0, 1, 1]", [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="at least one"):
        point_accuracy([], [])


def test_evaluate_module_matches_the_functions():
    predictions = ["[0.1, 0.1, 0.5, 0.5]", "[0.2, 0.2, 0.6, 0.6]", "none", "[0.3, 0.3]"]
    references = [[0.1, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0], [0.2, 0.2, 0.4, 0.4]]
    rec = load_metric("grounding")
    rec.add_batch(predictions=predictions[:2], references=references[:2])
    rec.add_batch(predictions=predictions[2:], references=references[2:])
    assert rec.compute() == rec_accuracy(predictions, references)
    assert load_metric("grounding", "rec").compute(
        predictions=predictions, references=references, iou_threshold=0.2
    ) == rec_accuracy(predictions, references, iou_threshold=0.2)
    assert load_metric("grounding", "point").compute(predictions=predictions, references=references) == (
        point_accuracy(predictions, references)
    )
    with pytest.raises(ValueError, match="Unknown grounding configuration"):
        load_metric("grounding", "detection")


def test_perfect_answers_on_the_built_in_data_score_one():
    data = make_synthetic_grounding(12, seed=5)
    for task, metric in (("rec", rec_accuracy), ("point", point_accuracy)):
        rows = data.filter(lambda name, task=task: name == task, input_columns="task")
        scores = metric(rows["answer"], rows["target_box"])
        assert scores["accuracy"] == 1.0 and scores["invalid_rate"] == 0.0
    # Region captions: text, scored with the `cider` module against the row's answer.
    regions = data.filter(lambda name: name == "region_caption", input_columns="task")
    references = [[answer] for answer in regions["answer"]]
    cider = load_metric("cider").compute(predictions=regions["answer"], references=references)
    assert cider == {"cider": cider_d(regions["answer"], references)}
    assert cider["cider"] > 0


def test_the_module_is_shipped_as_package_data():
    import configparser
    import fnmatch
    from pathlib import Path

    from helpers import ROOT

    from vlbridge.metrics import metric_path

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    patterns = config["options.package_data"]["vlbridge.metrics"].split()
    relative = Path(metric_path("grounding")).relative_to(ROOT / "vlbridge" / "metrics") / "grounding.py"
    assert any(fnmatch.fnmatch(relative.as_posix(), pattern) for pattern in patterns)
