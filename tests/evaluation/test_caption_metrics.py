"""CIDEr-D, BLEU, VQA accuracy: cross-checks against pycocoevalcap, hand-computed VQAv2 cases, `evaluate` modules."""

import configparser
import fnmatch
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, run_docstring_examples

from vlbridge.metrics import (
    bleu,
    cider_d,
    load_metric,
    metric_path,
    normalize_vqa_answer,
    tokenize_caption,
    vqa_accuracy,
)
from vlbridge.metrics.caption_metrics import _cider_d_scores


# Ten images with 2-5 raw references each: punctuation and capitals for the tokenizer, candidates that repeat words
# (which CIDEr-D's clipping must not reward), and an empty and a one-word candidate.
PREDICTIONS = [
    "A man riding a wave on top of a surfboard.",
    "a dog a dog a dog a dog",
    "",
    "a",
    "A red double-decker bus driving down a city street.",
    "Two giraffes standing next to a tree",
    "a man's laptop on a desk, isn't it?",
    "a kitchen with a stove and a refrigerator",
    "A train on the tracks at a station",
    "people people people people",
]
REFERENCES = [
    ["A man riding a wave on a surfboard.", "A surfer rides a large wave in the ocean.", "A person riding a wave."],
    [
        "A dog catching a frisbee in the park.",
        "A brown dog jumps for a frisbee.",
        "The dog is playing with a frisbee on the grass.",
        "A dog leaps in the air.",
    ],
    ["Two cats sleeping on a red couch.", "A pair of cats asleep on a sofa."],
    ["A plate of food with broccoli and carrots.", "A dinner plate with meat, broccoli and carrots.", "A plate."],
    [
        "A red double-decker bus on a street.",
        "A big red bus driving down the road.",
        "A double decker bus drives through the city.",
        "A red bus parked by the curb.",
        "A tour bus on a busy street.",
    ],
    ["Two giraffes standing near a tall tree.", "A couple of giraffes eating leaves from a tree.", "Giraffes."],
    ["A laptop computer sitting on top of a wooden desk.", "A man's laptop and a cup of coffee on a desk."],
    ["A kitchen with a stove, a sink and a refrigerator.", "A small kitchen with white appliances."],
    ["A train pulling into a train station.", "A passenger train stopped at the station.", "A train on the tracks"],
    ["People walking down a busy street.", "A crowd of people on a sidewalk."],
]


def coco_inputs(predictions, references, tokenize=True):
    """The `gts` / `res` dictionaries pycocoevalcap's scorers take (captions already tokenised, as in COCOEvalCap)."""
    prepare = tokenize_caption if tokenize else (lambda caption: caption)
    gts = {index: [prepare(ref) for ref in refs] for index, refs in enumerate(references)}
    res = {index: [prepare(prediction)] for index, prediction in enumerate(predictions)}
    return gts, res


def random_corpus(seed=0, num_images=25):
    """Captions over a 12-word vocabulary, so that n-grams of every order repeat across images and references."""
    generator = np.random.default_rng(seed)
    vocabulary = "a dog cat on the red grass sofa runs sits two big".split()

    def caption(low, high):
        return " ".join(generator.choice(vocabulary, size=generator.integers(low, high + 1)))

    predictions = [caption(0, 10) for _ in range(num_images)]
    references = [[caption(1, 12) for _ in range(generator.integers(1, 6))] for _ in range(num_images)]
    return predictions, references


def test_cider_d_matches_pycocoevalcap():
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap (in the `test` extra) is needed for the cross-check")
    from pycocoevalcap.cider.cider import Cider

    gts, res = coco_inputs(PREDICTIONS, REFERENCES)
    expected, expected_per_image = Cider().compute_score(gts, res)
    assert cider_d(PREDICTIONS, REFERENCES) == pytest.approx(expected, abs=1e-6)
    np.testing.assert_allclose(_cider_d_scores(PREDICTIONS, REFERENCES), expected_per_image, rtol=0, atol=1e-6)
    # Pre-tokenised input with `tokenize=False` is only split on whitespace, as pycocoevalcap does.
    tokenised = [res[index][0] for index in range(len(PREDICTIONS))]
    assert cider_d(tokenised, [gts[index] for index in range(len(REFERENCES))], tokenize=False) == pytest.approx(
        expected, abs=1e-6
    )

    predictions, references = random_corpus()
    expected, expected_per_image = Cider().compute_score(*coco_inputs(predictions, references, tokenize=False))
    np.testing.assert_allclose(
        _cider_d_scores(predictions, references, tokenize=False), expected_per_image, rtol=0, atol=1e-6
    )


def test_bleu_matches_pycocoevalcap():
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap (in the `test` extra) is needed for the cross-check")
    from pycocoevalcap.bleu.bleu import Bleu

    expected, _ = Bleu(4).compute_score(*coco_inputs(PREDICTIONS, REFERENCES), verbose=0)
    result = bleu(PREDICTIONS, REFERENCES)
    assert list(result) == ["bleu1", "bleu2", "bleu3", "bleu4"]
    np.testing.assert_allclose(list(result.values()), expected, rtol=0, atol=1e-6)

    predictions, references = random_corpus(seed=1)
    expected, _ = Bleu(4).compute_score(*coco_inputs(predictions, references, tokenize=False), verbose=0)
    np.testing.assert_allclose(list(bleu(predictions, references, tokenize=False).values()), expected, atol=1e-6)


def test_cider_d_does_not_reward_repetition_and_scores_empty_captions_zero():
    def score_of_image_1(caption):
        predictions = list(PREDICTIONS)
        predictions[1] = caption
        return _cider_d_scores(predictions, REFERENCES)[1]

    # Clipping caps a repeated n-gram's weight at the reference's, and the length penalty charges the extra words.
    assert score_of_image_1("a dog a dog a dog a dog") < score_of_image_1("a dog")
    assert score_of_image_1("a dog jumps for a frisbee frisbee") < score_of_image_1("a dog jumps for a frisbee")
    scores = _cider_d_scores(PREDICTIONS, REFERENCES)
    assert scores[2] == 0.0  # the empty candidate
    assert np.all(scores >= 0) and np.all(scores <= 10)


@pytest.mark.parametrize(
    ("caption", "tokens"),
    [
        ("A man's dog, running.", "a man 's dog running"),
        ("They don't know; we'll see!", "they do n't know we 'll see"),
        ("A woman can't eat; she cannot.", "a woman ca n't eat she can not"),
        ("Two dogs' toys -- ok...", "two dogs toys ok"),
        ("What? 1,000 people at $5 each, 50% off", "what 1,000 people at $ 5 each 50 % off"),
        ("An old-fashioned, red double-decker bus at 10:30", "an old-fashioned red double-decker bus at 10:30"),
        ("It\u2019s 10 o'clock", "it 's 10 o'clock"),
        ('"Quoted" `tick` x:y (bracketed)', "quoted tick x y bracketed"),
        ("  a  dog   with  spaces ", "a dog with spaces"),
        ("?!.", ""),
    ],
)
def test_tokenize_caption_follows_the_ptb_rules(caption, tokens):
    assert tokenize_caption(caption) == tokens


@pytest.mark.skipif(shutil.which("java") is None, reason="the Stanford PTB tokenizer of pycocoevalcap needs Java")
def test_tokenize_caption_matches_the_coco_ptb_tokenizer_on_plain_captions():
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap (in the `test` extra) ships the PTB tokenizer jar")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = PREDICTIONS + [ref for refs in REFERENCES for ref in refs] + ["It's 10 o'clock, isn't it? Cats & dogs!"]
    expected = PTBTokenizer().tokenize({index: [{"caption": caption}] for index, caption in enumerate(captions)})
    assert [tokenize_caption(caption) for caption in captions] == [expected[i][0] for i in range(len(captions))]


@pytest.mark.parametrize(
    ("answer", "normalized"),
    [
        ("Two", "2"),
        ("a dog.", "dog"),
        ("isnt", "isn't"),
        ("yes!", "yes"),
        ("The Dog", "dog"),
        ("none", "0"),
        ("Ten.", "10"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("black-and-white", "black and white"),  # "-" touching no space becomes a space
        ("hot - dog", "hot dog"),  # "-" touching a space is deleted
        ("yes, it is", "yes it is"),
        ("dont", "don't"),
        ("it's", "it's"),
        ("  an apple\n", "apple"),
        ("left/right", "left right"),
        ("5.", "5"),
    ],
)
def test_normalize_vqa_answer_follows_the_vqav2_rules(answer, normalized):
    assert normalize_vqa_answer(answer) == normalized


@pytest.mark.parametrize(
    ("agreeing", "expected"),
    # Leave-one-out over 10 annotators, k of whom gave the answer: the k subsets without one of them hold k - 1
    # matches, the 10 - k others hold k. E.g. k = 2: (2 * min(1, 1/3) + 8 * min(1, 2/3)) / 10 = 0.6.
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_vqa_accuracy_with_ten_answers_averages_the_leave_one_out_subsets(agreeing, expected):
    humans = ["Two"] * agreeing + ["three"] * (10 - agreeing)  # "Two" normalises to the predicted "2"
    assert vqa_accuracy(["2"], [humans]) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_with_few_references_and_over_questions():
    # Fewer than 3 references: matching any of them is full credit.
    assert vqa_accuracy(["A dog."], [["dog"]]) == 1.0
    assert vqa_accuracy(["cat"], [["dog", "cat"]]) == 1.0
    assert vqa_accuracy(["cat"], [["dog"]]) == 0.0
    # From 3 on the official formula applies: three unanimous references give 2/3 at most.
    assert vqa_accuracy(["dog"], [["dog", "dog", "dog"]]) == pytest.approx(2 / 3)
    # The mean over questions.
    assert vqa_accuracy(["yes", "2", "red"], [["yes"], ["two"] * 2 + ["3"] * 8, ["blue"]]) == pytest.approx(1.6 / 3)


def test_perfect_predictions_score_best_and_a_wrong_one_scores_less():
    perfect = [refs[0] for refs in REFERENCES]
    perfect_cider = cider_d(perfect, REFERENCES)
    assert perfect_cider > cider_d(PREDICTIONS, REFERENCES) > 0
    wrong = list(perfect)
    wrong[0] = "a plate of broccoli on a table"
    assert cider_d(wrong, REFERENCES) < perfect_cider
    assert bleu(wrong, REFERENCES)["bleu4"] < bleu(perfect, REFERENCES)["bleu4"] == pytest.approx(1.0)

    answers = [["2"], ["yes"] * 10, ["red", "red", "dark red"]]
    # Question 3 (3 references): leaving out either "red" leaves 1 match (1/3), leaving out "dark red" 2 (2/3).
    assert vqa_accuracy(["two", "Yes", "red"], answers) == pytest.approx((1 + 1 + 4 / 9) / 3)
    assert vqa_accuracy(["2", "yes"], answers[:2]) == 1.0
    assert vqa_accuracy(["2", "no"], answers[:2]) == 0.5


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        cider_d(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no reference caption"):
        bleu(["a"], [[]])
    with pytest.raises(TypeError, match="list of strings"):
        cider_d(["a dog"], ["a dog"])
    with pytest.raises(TypeError, match="list of strings"):
        vqa_accuracy(["yes"], ["yes"])
    with pytest.raises(ValueError, match="no reference answer"):
        vqa_accuracy(["yes"], [[]])
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy([], [])


def test_evaluate_modules_load_offline_and_match_the_functions():
    cider = load_metric("cider")
    cider.add_batch(predictions=PREDICTIONS[:4], references=REFERENCES[:4])
    cider.add_batch(predictions=PREDICTIONS[4:], references=REFERENCES[4:])
    assert cider.compute() == {"cider": cider_d(PREDICTIONS, REFERENCES)}
    pretokenised = [tokenize_caption(prediction) for prediction in PREDICTIONS]
    assert load_metric("cider").compute(predictions=pretokenised, references=REFERENCES, tokenize=False) == {
        "cider": cider_d(pretokenised, REFERENCES, tokenize=False)
    }

    assert load_metric("bleu4").compute(predictions=PREDICTIONS, references=REFERENCES) == bleu(
        PREDICTIONS, REFERENCES
    )

    predictions, answers = ["Two", "a cat", "yes"], [["2"], ["dog"], ["yes"] * 3 + ["no"] * 7]
    assert load_metric("vqa_accuracy").compute(predictions=predictions, references=answers) == {
        "vqa_accuracy": vqa_accuracy(predictions, answers)
    }


def test_every_metric_module_is_shipped_as_package_data():
    # The module folders hold no `__init__.py`, so only `package_data` puts them into a wheel.
    root = ROOT
    config = configparser.ConfigParser()
    config.read(root / "setup.cfg")
    patterns = config["options.package_data"]["vlbridge.metrics"].split()
    for name in ("recall", "cider", "bleu4", "vqa_accuracy"):
        relative = Path(metric_path(name)).relative_to(root / "vlbridge" / "metrics") / f"{name}.py"
        assert any(fnmatch.fnmatch(relative.as_posix(), pattern) for pattern in patterns), relative


def test_docstring_examples():
    run_docstring_examples("vlbridge.metrics.caption_metrics")
