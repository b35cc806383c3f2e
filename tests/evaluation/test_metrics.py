"""Recall@K: the pure functions and the local `evaluate` module."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import run_docstring_examples

from vlbridge.metrics import (
    best_relevant_rank,
    image_text_recall,
    load_metric,
    metric_path,
    recall_at_k,
    recall_at_k_from_rankings,
)


def reference_recall(scores, relevant, ks):
    """Brute force: a stable descending sort (ties by index), then look for a relevant candidate in the top k."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), axis=1, kind="stable")
    return {f"r{k}": float(np.mean([bool(set(row[:k]) & set(rel)) for row, rel in zip(order, relevant)])) for k in ks}


def test_perfect_ranking_is_one_and_reversed_ranking_is_zero_at_one():
    scores = np.eye(6) + np.arange(6)[None, :] * 0.01  # the diagonal wins
    relevant = [[i] for i in range(6)]
    assert recall_at_k(scores, relevant) == {"r1": 1.0, "r5": 1.0, "r10": 1.0}
    reversed_scores = -np.eye(6)  # the relevant candidate is always ranked last
    assert recall_at_k(reversed_scores, relevant, ks=(1, 5, 6)) == {"r1": 0.0, "r5": 0.0, "r6": 1.0}


def test_hand_computed_cases_with_several_relevant_items():
    scores = np.array(
        [
            [0.1, 0.9, 0.8, 0.7],  # relevant {2, 3}: best is 2 at rank 1
            [0.9, 0.1, 0.2, 0.3],  # relevant {1}: rank 3
            [0.5, 0.6, 0.7, 0.8],  # relevant {0, 3}: 3 at rank 0
        ]
    )
    relevant = [{2, 3}, [1], (0, 3)]
    assert best_relevant_rank(scores, relevant).tolist() == [1, 3, 0]
    assert recall_at_k(scores, relevant, ks=(1, 2, 3, 4)) == {"r1": 1 / 3, "r2": 2 / 3, "r3": 2 / 3, "r4": 1.0}


def test_k_larger_than_the_number_of_candidates_covers_them_all():
    scores = np.array([[0.3, 0.2, 0.1]])
    assert recall_at_k(scores, [[2]], ks=(1, 10, 100)) == {"r1": 0.0, "r10": 1.0, "r100": 1.0}


def test_ties_rank_the_lower_index_first():
    scores = np.zeros((3, 4))
    assert best_relevant_rank(scores, [[0], [2], [3, 1]]).tolist() == [0, 2, 1]
    assert recall_at_k(scores, [[0], [2], [3, 1]], ks=(1, 2)) == {"r1": 1 / 3, "r2": 2 / 3}


def test_matches_a_brute_force_reference_on_random_scores_and_torch_inputs():
    generator = np.random.default_rng(0)
    scores = generator.integers(0, 6, size=(40, 30)).astype(np.float32)  # many ties
    relevant = [set(generator.choice(30, size=generator.integers(1, 4), replace=False).tolist()) for _ in range(40)]
    ks = (1, 3, 5, 10, 50)
    expected = reference_recall(scores, relevant, ks)
    assert recall_at_k(scores, relevant, ks) == expected
    assert recall_at_k(torch.from_numpy(scores).to(torch.bfloat16), relevant, ks) == expected
    assert recall_at_k(torch.from_numpy(scores).double().requires_grad_(), relevant, ks) == expected
    rankings = np.argsort(-scores, axis=1, kind="stable").tolist()
    assert recall_at_k_from_rankings(rankings, relevant, ks) == expected


def test_rankings_may_be_truncated_and_duplicates_count_once():
    assert recall_at_k_from_rankings([[3, 3, 1], [0]], [[1], [2]], ks=(1, 2, 3)) == {"r1": 0.0, "r2": 0.5, "r3": 0.5}


def test_image_text_recall_uses_every_caption_of_an_image():
    # 2 images, 4 texts: texts 0-2 describe image 0, text 3 describes image 1.
    scores = np.array([[0.1, 0.2, 0.9, 0.3], [0.8, 0.1, 0.1, 0.7]])
    result = image_text_recall(scores, text_to_image=[0, 0, 0, 1], ks=(1, 2))
    # i2t: image 0 ranks text 2 first (hit); image 1 ranks text 0 first (miss), text 3 second.
    # t2i: text 0 -> image 1 first (miss); text 1 -> image 0 (hit); text 2 -> image 0 (hit); text 3 -> image 1 (hit).
    expected = {"i2t_r1": 0.5, "i2t_r2": 1.0, "t2i_r1": 0.75, "t2i_r2": 1.0}
    assert {key: value for key, value in result.items() if key != "r_mean"} == expected
    assert result["r_mean"] == pytest.approx(np.mean(list(expected.values())))
    assert set(image_text_recall(scores, [0, 0, 0, 1])) == {
        "i2t_r1",
        "i2t_r5",
        "i2t_r10",
        "t2i_r1",
        "t2i_r5",
        "t2i_r10",
        "r_mean",
    }


def test_bad_inputs_raise_clear_errors():
    scores = np.zeros((2, 3))
    with pytest.raises(ValueError, match="no relevant candidate"):
        recall_at_k(scores, [[0], []])
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(scores, [[0], [3]])
    with pytest.raises(ValueError, match="2 queries"):
        recall_at_k(scores, [[0]])
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(np.array([[np.nan, 0.0]]), [[0]])
    with pytest.raises(ValueError, match="positive"):
        recall_at_k(scores, [[0], [1]], ks=(0,))
    with pytest.raises(ValueError, match="no text"):
        image_text_recall(scores, [0, 0, 0])


def test_evaluate_load_works_with_the_network_cut_off():
    # Every offline switch on, and a dead proxy so that any attempt to reach the Hub would fail loudly.
    offline = {"HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proxy = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    code = (
        "import evaluate; from vlbridge.metrics import metric_path; "
        "print(evaluate.load(metric_path('recall')).compute(predictions=[[0.1, 0.9], [0.2, 0.1], [0.0, 0.5]], "
        "references=[[1], [1], [0, 1]], ks=[1]))"
    )
    env = {**os.environ, **offline, **proxy}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == str({"r1": 2 / 3})


def test_evaluate_module_matches_the_function_in_both_configurations():
    import evaluate

    generator = np.random.default_rng(1)
    scores = generator.normal(size=(12, 20))
    relevant = [generator.choice(20, size=2, replace=False).tolist() for _ in range(12)]
    metric = evaluate.load(metric_path("recall"))
    metric.add_batch(predictions=scores[:5].tolist(), references=relevant[:5])
    metric.add_batch(predictions=scores[5:].tolist(), references=relevant[5:])
    assert metric.compute(ks=[1, 5, 10]) == recall_at_k(scores, relevant)
    assert load_metric("recall").compute(predictions=scores, references=relevant, ks=[2]) == recall_at_k(
        scores, relevant, ks=(2,)
    )
    rankings = np.argsort(-scores, axis=1, kind="stable")[:, :10].tolist()
    ranked = load_metric("recall", "ranking").compute(predictions=rankings, references=relevant, ks=[1, 5, 10])
    assert ranked == recall_at_k(scores, relevant)


def test_unknown_metric_names_the_choices():
    with pytest.raises(ValueError, match="recall"):
        load_metric("bleu")


@pytest.mark.parametrize("name", ["vlbridge.metrics", "vlbridge.metrics.retrieval_recall"])
def test_docstring_examples(name):
    run_docstring_examples(name)
