"""Built-in VQA and multi-turn chat data: answers true of the scene, balance, determinism, splits, chat format."""

import re
from collections import Counter

import datasets
import pytest
from PIL import Image
from test_data import cell, check_caption, raw_images
from transformers import SiglipImageProcessorPil

from vlbridge.data import (
    build_word_tokenizer,
    chat_vocabulary,
    make_synthetic_chat,
    make_synthetic_image_text,
    make_synthetic_vqa,
    vqa_vocabulary,
)
from vlbridge.data.synthetic import PLURALS, SHAPES
from vlbridge.data.synthetic_vqa import CAPTION_PROMPT, QUESTION_TYPES, SYSTEM_PROMPT
from vlbridge.processing import BridgeProcessor


SPLITS = {"train": 200, "validation": 30, "test": 30}
NUMBERS = ["zero", "one", "two", "three"]
SINGULAR = {**{shape: shape for shape in SHAPES}, **{plural: shape for shape, plural in PLURALS.items()}}


@pytest.fixture(scope="module")
def vqa():
    return make_synthetic_vqa(SPLITS, seed=0, questions_per_image=3)


@pytest.fixture(scope="module")
def chat():
    return make_synthetic_chat(SPLITS, seed=0)


def turns_of(messages: list[dict]) -> list[tuple[str, str]]:
    """(question, answer) pairs of a conversation, read from its text entries."""
    texts = [" ".join(entry["text"] for entry in m["content"] if entry["type"] == "text") for m in messages]
    roles = [m["role"] for m in messages]
    start = 1 if roles[0] == "system" else 0
    return list(zip(texts[start::2], texts[start + 1 :: 2]))


# ------------------------------------------------------------------------------------------ an independent checker


def referred(noun: str, objects: list[dict]) -> list[dict]:
    """The objects a noun phrase names: "circle(s)", "red object(s)" or "red circle(s)"."""
    words = noun.split()
    colour = words[0] if len(words) == 2 else None
    shape = None if words[-1] in ("object", "objects") else SINGULAR[words[-1]]
    return [o for o in objects if colour in (None, o["colour"]) and shape in (None, o["shape"])]


def the_one_group(verb: str, noun: str, objects: list[dict]) -> list[dict]:
    """The objects of an unambiguous reference, checking number agreement ("is the circle" names one object)."""
    found = referred(noun, objects)
    assert found and len({(o["shape"], o["colour"], o["size"]) for o in found}) == 1, noun
    plural = noun.endswith("s") and noun.split()[-1] not in SHAPES
    assert (verb == "are") == plural == (len(found) > 1), (verb, noun, len(found))
    return found


def region(found: list[dict]) -> str:
    """The smallest named region holding the objects, from their positions alone."""
    if len(found) == 1:
        return found[0]["position"]
    rows, columns = {cell(o["position"])[0] for o in found}, {cell(o["position"])[1] for o in found}
    if len(rows) == 1:
        return ["top", "middle", "bottom"][rows.pop()] + " row"
    assert len(columns) == 1, found
    return ["left", "middle", "right"][columns.pop()] + " column"


def true_answer(question: str, objects: list[dict]) -> tuple[str, str]:
    """(type, answer) of a question, parsed with regular expressions and answered from the `objects` column."""
    if match := re.fullmatch(r"what colour (is|are) the (\w+)\?", question):
        return "colour", the_one_group(*match.groups(), objects)[0]["colour"]
    if match := re.fullmatch(r"what shape (is|are) the (\w+ objects?)\?", question):
        return "shape", the_one_group(*match.groups(), objects)[0]["shape"]
    if match := re.fullmatch(r"how many (\w+ objects|\w+) are there\?", question):
        noun = match.group(1)
        assert noun.endswith("objects") or noun in PLURALS.values(), question
        return "count", NUMBERS[len(referred(noun, objects))]
    if match := re.fullmatch(r"where (is|are) the ((?:\w+ )?\w+)\?", question):
        return "position", region(the_one_group(*match.groups(), objects))
    if match := re.fullmatch(r"(is|are) the ((?:\w+ )?\w+) small or large\?", question):
        return "size", the_one_group(*match.groups(), objects)[0]["size"]
    if match := re.fullmatch(r"is there (a|an) (\w+) (\w+)\?", question):
        article, colour, shape = match.groups()
        assert article == ("an" if colour[0] in "aeiou" else "a"), question
        return "exists", "yes" if referred(f"{colour} {shape}", objects) else "no"
    raise AssertionError(f"unparsed question {question!r}")


# ------------------------------------------------------------------------------------------ VQA


def test_every_answer_is_true_of_the_objects(vqa):
    for split in vqa.values():
        for row in split.select_columns(["question", "answer", "question_type", "objects"]):
            assert true_answer(row["question"], row["objects"]) == (row["question_type"], row["answer"]), row
            assert 1 <= len(row["answer"].split()) <= 2


def test_question_types_and_answers_are_balanced(vqa):
    train = vqa["train"]
    types = Counter(train["question_type"])
    assert set(types) == set(QUESTION_TYPES)
    mean = train.num_rows / len(QUESTION_TYPES)
    assert all(0.7 * mean <= n <= 1.3 * mean for n in types.values()), types
    answers = {kind: Counter() for kind in QUESTION_TYPES}
    for kind, answer in zip(train["question_type"], train["answer"]):
        answers[kind][answer] += 1
    assert abs(answers["exists"]["yes"] / sum(answers["exists"].values()) - 0.5) <= 0.15, answers["exists"]
    assert set(answers["count"]) == set(NUMBERS) and set(answers["size"]) == {"small", "large"}
    assert len(answers["colour"]) >= 6 and len(answers["shape"]) >= 5 and len(answers["position"]) >= 10
    # Questions of one image are of distinct types.
    per_image = Counter(zip(train["image_id"], train["question_type"]))
    assert set(per_image.values()) == {1} and len(set(train["image_id"])) == SPLITS["train"]


def test_same_seed_gives_identical_rows_other_seed_differs(vqa):
    again = make_synthetic_vqa(SPLITS, seed=0, questions_per_image=3)
    for name in SPLITS:
        assert raw_images(again[name]) == raw_images(vqa[name])
        assert again[name].remove_columns("image").to_dict() == vqa[name].remove_columns("image").to_dict()
    other = make_synthetic_vqa({"train": 50}, seed=1)["train"]
    assert raw_images(other) != raw_images(vqa["train"])[: other.num_rows]
    assert list(other["question"]) != list(vqa["train"]["question"])[: other.num_rows]


def test_splits_are_disjoint_and_share_the_caption_datas_scenes(vqa):
    scenes = {name: {str(objects) for objects in split["objects"]} for name, split in vqa.items()}
    assert [len(found) for found in scenes.values()] == list(SPLITS.values())
    assert not (scenes["train"] & scenes["test"]) and not (scenes["train"] & scenes["validation"])
    assert not (scenes["test"] & scenes["validation"])
    captions = make_synthetic_image_text(SPLITS, seed=0)
    for name in SPLITS:
        by_id = dict(zip(captions[name]["image_id"], raw_images(captions[name])))
        assert {i: by_id[i] for i in vqa[name]["image_id"]} == by_id  # every image, byte for byte
        assert dict(zip(vqa[name]["image_id"], raw_images(vqa[name]))) == by_id


def test_every_word_is_in_the_vocabulary(vqa, chat):
    words, tokenizer = set(vqa_vocabulary()), build_word_tokenizer(vqa_vocabulary())
    texts = list(vqa["train"]["question"]) + list(vqa["train"]["answer"])
    for text in texts:
        assert set(re.findall(r"\w+|[^\w\s]+", text)) <= words, text
    assert tokenizer.unk_token_id not in {i for ids in tokenizer(texts).input_ids for i in ids}
    tokenizer = build_word_tokenizer(chat_vocabulary())
    texts = [text for messages in chat["train"]["messages"] for pair in turns_of(messages) for text in pair]
    assert tokenizer.unk_token_id not in {i for ids in tokenizer(texts + [SYSTEM_PROMPT]).input_ids for i in ids}


def test_changing_questions_keeps_the_images(vqa):
    fewer = make_synthetic_vqa({"test": 30}, seed=0, questions_per_image=1, question_types="exists")["test"]
    assert set(fewer["question_type"]) == {"exists"} and fewer.num_rows == 30
    assert fewer["objects"] == vqa["test"]["objects"][::3]


# ------------------------------------------------------------------------------------------ chat


def test_messages_have_the_trl_chat_format(chat):
    features = chat["train"].features
    assert isinstance(features["images"], datasets.List) and isinstance(features["images"].feature, datasets.Image)
    lengths = Counter()
    for row in chat["train"]:
        messages, images = row["messages"], row["images"]
        assert len(images) == 1 and isinstance(images[0], Image.Image) and images[0].size == (64, 64)
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        entries = [(i, entry) for i, m in enumerate(messages) for entry in m["content"]]
        image_entries = [(i, entry) for i, entry in entries if entry["type"] == "image"]
        assert [i for i, _ in image_entries] == [0] and messages[0]["content"][0]["type"] == "image"
        assert len(image_entries) == len(images)
        assert all(entry["text"] if entry["type"] == "text" else entry["type"] == "image" for _, entry in entries)
        assert len(row["turn_types"]) == len(messages) // 2 == len(set(row["turn_types"]))
        lengths[len(row["turn_types"])] += 1
    assert set(lengths) == {1, 2, 3} and min(lengths.values()) > 0.2 * chat["train"].num_rows


def test_chat_answers_are_true_and_mix_questions_with_captions(chat):
    kinds = Counter()
    for split in chat.values():
        for row in split.select_columns(["messages", "turn_types", "objects"]):
            for kind, (question, answer) in zip(row["turn_types"], turns_of(row["messages"])):
                kinds[kind] += 1
                if kind == "caption":
                    assert question == CAPTION_PROMPT
                    check_caption("full", answer, row["objects"])
                else:
                    assert true_answer(question, row["objects"]) == (kind, answer)
    assert set(kinds) == set(QUESTION_TYPES) | {"caption"} and min(kinds.values()) > 0.5 * max(kinds.values())


def test_system_prompt_and_fixed_turns(chat):
    with_system = make_synthetic_chat({"test": 30}, seed=0, system_prompt=True)["test"]
    for plain, prompted in zip(chat["test"]["messages"], with_system["messages"]):
        assert prompted[0] == {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}
        assert prompted[1:] == plain
    custom = make_synthetic_chat({"test": 2}, system_prompt="be brief.", turns=3)["test"]
    assert all(m[0]["content"][0]["text"] == "be brief." and len(m) == 7 for m in custom["messages"])


def test_rows_feed_trl_and_the_bridge_processor(chat):
    trl_data_utils = pytest.importorskip("trl.data_utils")
    tokenizer = build_word_tokenizer(chat_vocabulary() + ["user", "assistant", ":"])
    processor = BridgeProcessor(
        SiglipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer, num_image_tokens=3
    )
    rows = chat["test"].select(range(4))
    for row in rows:
        filled = trl_data_utils.prepare_multimodal_messages(row["messages"], images=row["images"])
        assert filled[0]["content"][0]["image"] is row["images"][0]
    texts = [processor.apply_chat_template(messages) for messages in rows["messages"]]
    inputs = processor(images=list(rows["images"]), text=texts, padding=True, return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == 4 and (inputs["input_ids"] == tokenizer.image_token_id).sum() == 12
    assert tokenizer.unk_token_id not in inputs["input_ids"]


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="questions_per_image"):
        make_synthetic_vqa({"test": 1}, questions_per_image=7)
    with pytest.raises(ValueError, match="question_types"):
        make_synthetic_vqa({"test": 1}, question_types=["color"])
    with pytest.raises(ValueError, match="turns"):
        make_synthetic_chat({"test": 1}, turns=(2, 1))
    with pytest.raises(ValueError, match="turn_types"):
        make_synthetic_chat({"test": 1}, turn_types=[])
