"""Built-in post-training data: preference pairs with exactly one hallucination, refusal chats, two-image questions and
large images with small objects; deterministic, held out by scene, and covered by the tokenizer vocabulary."""

import re

import pytest
from datasets import Image, List
from helpers import run_doctests

from vlbridge.data import (
    build_word_tokenizer,
    make_synthetic_chat,
    make_synthetic_multi_image,
    make_synthetic_preference,
    make_synthetic_safety_chat,
    make_synthetic_small_objects,
    multi_image_vocabulary,
    preference_vocabulary,
)
from vlbridge.data.synthetic import COLOURS, PLURALS, SHAPES, SIZES, Scene, describe_full, describe_positions
from vlbridge.data.synthetic_preference import CAPTION_EDITS


SINGULAR = {plural: shape for shape, plural in PLURALS.items()} | {shape: shape for shape in SHAPES}
COUNTS = {"a": 1, "one": 1, "two": 2, "three": 3}


def text(messages, role: str) -> str:
    return " ".join(e["text"] for m in messages if m["role"] == role for e in m["content"] if e["type"] == "text")


def raw(dataset):
    """Rows with undecoded images (PNG bytes), for byte-level comparisons."""
    column = "images" if "images" in dataset.column_names else "image"
    feature = List(Image(decode=False)) if column == "images" else Image(decode=False)
    return dataset.cast_column(column, feature).to_list()


def phrases(caption: str) -> list[tuple]:
    """Parse "two small red circles and a large blue square" -> [(2, "small", "red", "circle"), (1, "large", ...)]."""
    parsed = []
    for phrase in caption.split(" and "):
        count, size, colour, shape = phrase.split()
        parsed.append((COUNTS[count], size, colour, SINGULAR[shape]))
    return parsed


@pytest.fixture(scope="module")
def preference():
    return make_synthetic_preference({"train": 60, "test": 20}, image_size=32, seed=3, max_objects=4)


def test_preference_is_deterministic_and_shares_the_chat_images(preference):
    again = make_synthetic_preference({"train": 60, "test": 20}, image_size=32, seed=3, max_objects=4)
    assert all(raw(preference[split]) == raw(again[split]) for split in ("train", "test"))
    other = make_synthetic_preference({"train": 60, "test": 20}, image_size=32, seed=4, max_objects=4)
    assert raw(other["test"]) != raw(preference["test"])
    chat = make_synthetic_chat({"train": 60, "test": 20}, image_size=32, seed=3, max_objects=4)["test"]
    chat_images = {row["image_id"]: row["images"] for row in raw(chat)}
    assert all(row["images"] == chat_images[row["image_id"]] for row in raw(preference["test"]))


def test_preference_splits_never_share_a_scene(preference):
    scenes = {
        split: {describe_positions(Scene.from_objects(objects)) for objects in preference[split]["objects"]}
        for split in ("train", "test")
    }
    assert not scenes["train"] & scenes["test"] and len(scenes["test"]) == 20
    assert not set(preference["train"]["image_id"]) & set(preference["test"]["image_id"])


def test_preference_format_is_trls_conversational_preference(preference):
    row = preference["train"][0]
    assert len(row["images"]) == 1 and row["images"][0].size == (32, 32)
    assert [m["role"] for m in row["prompt"]] == ["user"]
    assert [e["type"] for e in row["prompt"][0]["content"]] == ["image", "text"]
    assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]
    assert set(preference["train"]["pair_type"]) == {"caption", "question", "absent", "present"}


def check_caption_pair(scene: Scene, chosen: str, rejected: str, edit: str) -> None:
    truth, wrong = phrases(chosen), phrases(rejected)
    assert chosen == describe_full(scene)
    shapes, colours = {g.shape for g in scene.groups}, {g.colour for g in scene.groups}
    if edit == "object":  # one extra object, of a shape and a colour the image does not show
        assert len(wrong) == len(truth) + 1
        extra = next(i for i in range(len(wrong)) if wrong[:i] + wrong[i + 1 :] == truth)
        assert wrong[extra][0] == 1 and wrong[extra][3] not in shapes and wrong[extra][2] not in colours
        return
    differing = [(a, b) for a, b in zip(truth, wrong) if a != b]
    assert len(wrong) == len(truth) and len(differing) == 1  # one object (group) changed ...
    (a, b), field = differing[0], {"count": 0, "size": 1, "colour": 2, "shape": 3}[edit]
    assert [i for i in range(4) if a[i] != b[i]] == [field]  # ... in exactly one attribute
    assert b[field] not in {"colour": colours, "shape": shapes}.get(edit, set())  # a hallucinated value
    if edit == "count":
        assert abs(a[0] - b[0]) == 1 and b[0] >= 1
    if edit in ("colour", "shape"):  # one word of the caption differs
        assert sum(x != y for x, y in zip(chosen.split(), rejected.split())) == 1


def check_question_pair(scene: Scene, question: str, chosen: str, rejected: str, edit: str) -> None:
    kinds = {
        "colour": set(COLOURS),
        "shape": set(SHAPES),
        "size": set(SIZES),
        "exists": {"yes", "no"},
        "count": {"zero", "one", "two", "three"},
    }
    assert chosen != rejected
    if edit in kinds:
        assert {chosen, rejected} <= kinds[edit]
    if edit == "colour":  # "what colour are the circles?"
        shape = SINGULAR[question.split()[-1].rstrip("?")]
        assert chosen == next(g.colour for g in scene.groups if g.shape == shape)
    if edit == "shape":  # "what shape is the red object?"
        colour = question.split()[-2]
        assert chosen == next(g.shape for g in scene.groups if g.colour == colour)


def test_every_rejected_answer_has_exactly_one_thing_wrong(preference):
    edits = set()
    for row in preference["train"].to_list() + preference["test"].to_list():
        scene, edit = Scene.from_objects(row["objects"]), row["edit"]
        question = text(row["prompt"], "user")
        chosen, rejected = text(row["chosen"], "assistant"), text(row["rejected"], "assistant")
        edits.add((row["pair_type"], edit))
        if row["pair_type"] == "caption":
            assert question == "describe the image." and edit in CAPTION_EDITS
            check_caption_pair(scene, chosen, rejected, edit)
        elif row["pair_type"] == "question":
            check_question_pair(scene, question, chosen, rejected, edit)
        elif row["pair_type"] == "absent":  # "what colour is the star?" -> "there is no star in the image."
            noun = re.fullmatch(r"there is no (.+) in the image\.", chosen).group(1)
            assert noun in question and rejected in set(COLOURS) | set(SHAPES)
            absent = noun.split()[0]
            assert absent not in {g.shape for g in scene.groups} | {g.colour for g in scene.groups}
        else:  # "present": the right answer against a denial that the asked-about object is there
            assert row["pair_type"] == "present" and edit == "denial"
            noun = re.fullmatch(r"there is no (.+) in the image\.", rejected).group(1)
            if question.startswith("what colour"):  # "what colour are the circles?" -> "there is no circle ..."
                assert noun == SINGULAR[question.split()[-1].rstrip("?")] and chosen in COLOURS
                assert chosen == next(g.colour for g in scene.groups if g.shape == noun)
            else:  # "what shape is the red object?" -> "there is no red object in the image."
                colour = question.split()[-2]
                assert noun == f"{colour} object"
                assert chosen == next(g.shape for g in scene.groups if g.colour == colour)
    assert {edit for kind, edit in edits if kind == "caption"} == set(CAPTION_EDITS)
    assert ("present", "denial") in edits and ("absent", "absent") in edits


def test_pair_and_question_types_are_chosen_and_checked():
    data = make_synthetic_preference({"train": 6}, pair_types=["question"], question_types=["size"])["train"]
    assert set(data["edit"]) == {"size"} and data.num_rows == 12
    with pytest.raises(ValueError, match="pair_types"):
        make_synthetic_preference({"train": 1}, pair_types=["captions"])
    with pytest.raises(ValueError, match="question_types"):
        make_synthetic_preference({"train": 1}, question_types=["colours"])


def test_safety_chat_refuses_only_absent_objects():
    data = make_synthetic_safety_chat({"train": 20}, image_size=32, turns=2, refusal_rate=0.5)["train"]
    refusals = 0
    for row in data.to_list():
        scene = Scene.from_objects(row["objects"])
        answers = [text([m], "assistant") for m in row["messages"] if m["role"] == "assistant"]
        for kind, answer in zip(row["turn_types"], answers):
            refused = answer.startswith("there is no ")
            assert refused == (kind == "absent")
            if refused:
                refusals += 1
                assert answer.split()[3] not in {g.shape for g in scene.groups} | {g.colour for g in scene.groups}
    assert 10 <= refusals <= 30


def test_safety_chat_caption_turns():
    data = make_synthetic_safety_chat({"train": 30}, image_size=32, turns=2, refusal_rate=0.3, caption_rate=0.5)
    kinds = [kind for row in data["train"]["turn_types"] for kind in row]
    assert {"absent", "caption"} <= set(kinds) and len(set(kinds)) > 2  # refusals, captions and questions
    for row in data["train"].to_list():
        turns = zip(row["turn_types"], row["messages"][0::2], row["messages"][1::2])
        for kind, question, answer in turns:
            if kind == "caption":
                assert text([question], "user") == "describe the image."
                assert text([answer], "assistant") == describe_full(Scene.from_objects(row["objects"]))
    with pytest.raises(ValueError, match="caption_rate"):
        make_synthetic_safety_chat({"train": 1}, caption_rate=1.5)


def count_of(scene: Scene, noun: str) -> int:
    """Objects of the scene a "which image has more <noun>?" question counts."""
    if noun == "objects":
        return len(scene.objects)
    return sum(g.count for g in scene.groups if noun in (PLURALS[g.shape], f"{g.colour} objects"))


def has(scene: Scene, noun: str) -> bool:
    """Whether the scene holds what "which image has a <noun>?" asks for."""
    return any(noun in (g.shape, f"{g.colour} {g.shape}") for g in scene.groups)


def test_multi_image_questions_have_the_right_answer():
    data = make_synthetic_multi_image({"train": 40, "test": 10}, image_size=32, seed=1)
    answers = []
    for row in data["train"].to_list():
        first, second = (Scene.from_objects(objects) for objects in row["objects"])
        assert len(row["images"]) == 2
        assert [entry["type"] for entry in row["messages"][0]["content"]] == ["image", "image", "text"]
        question, answer = text(row["messages"], "user"), text(row["messages"], "assistant")
        noun = re.fullmatch(r"which image has (?:more|an?) (.+)\?", question).group(1)
        if row["question_type"] == "more":
            counts = [count_of(scene, noun) for scene in (first, second)]
            assert counts[0] != counts[1]
            expected = "the second image" if counts[1] > counts[0] else "the first image"
        else:
            found = [has(scene, noun) for scene in (first, second)]
            assert found[0] != found[1]
            expected = "the first image" if found[0] else "the second image"
        assert answer == expected
        answers.append(answer)
    assert set(answers) == {"the first image", "the second image"}
    assert set(data["train"]["question_type"]) == {"more", "find"}
    keys = {
        split: {describe_positions(Scene.from_objects(o)) for pair in data[split]["objects"] for o in pair}
        for split in data
    }
    assert len(keys["train"]) == 80 and not keys["train"] & keys["test"]
    again = make_synthetic_multi_image({"train": 40, "test": 10}, image_size=32, seed=1)
    assert raw(again["test"]) == raw(data["test"])


def test_small_objects_are_small_in_large_images():
    data = make_synthetic_small_objects({"train": 12, "test": 4}, image_size=160, seed=2)
    for row in data["train"]:
        assert row["images"][0].size == (160, 160)
        assert "size" not in row["turn_types"]
        for obj in row["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            assert obj["size"] == "small" and 0.01 <= (x1 - x0) * (y1 - y0) / 160**2 <= 0.03
    again = make_synthetic_small_objects({"train": 12, "test": 4}, image_size=160, seed=2)
    assert raw(again["train"]) == raw(data["train"])
    ids = list(data["train"]["image_id"]) + list(data["test"]["image_id"])
    assert len(set(ids)) == 16


def test_vocabularies_cover_every_word():
    preference = make_synthetic_preference({"train": 30}, image_size=32)["train"]
    safety = make_synthetic_safety_chat({"train": 30}, image_size=32, turns=3)["train"]
    texts = [
        text(row[key], role)
        for row in preference.to_list()
        for key, role in (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant"))
    ]
    texts += [text(row["messages"], role) for row in safety.to_list() for role in ("user", "assistant")]
    multi = make_synthetic_multi_image({"train": 30}, image_size=32)["train"]
    small = make_synthetic_small_objects({"train": 10}, image_size=96, turns=(1, 5))["train"]
    other = [
        text(row["messages"], role)
        for rows in (multi, small)
        for row in rows.to_list()
        for role in ("user", "assistant")
    ]
    for words, samples in ((preference_vocabulary(), texts), (multi_image_vocabulary(), texts + other)):
        tokenizer = build_word_tokenizer(words)
        unknown = [t for t in samples if tokenizer.unk_token_id in tokenizer(t, add_special_tokens=False).input_ids]
        assert not unknown, unknown[:3]


@pytest.mark.parametrize("name", ["vlbridge.data.synthetic_preference", "vlbridge.data.synthetic_multi"])
def test_docstring_examples(name):
    result = run_doctests(name)
    assert result.attempted > 0 and result.failed == 0
