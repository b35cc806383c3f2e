"""The noisy "web" captions CapFilt is measured on: the share, the two kinds, and that every wrong caption is wrong."""

import pytest

from vlbridge.data import make_synthetic_image_text
from vlbridge.data.synthetic import COLOURS, PLURALS, SHAPES
from vlbridge.data.synthetic_noisy import add_caption_noise


SHAPE_WORDS = {*SHAPES, *PLURALS.values()}


@pytest.fixture(scope="module")
def clean():
    return make_synthetic_image_text({"train": 60}, image_size=32, captions_per_image=3, max_objects=3)["train"]


def test_the_share_and_the_kinds_are_as_asked(clean):
    web = add_caption_noise(clean, noise=0.4, seed=1)
    assert sum(web["noisy"]) == round(0.4 * len(clean)) == 72
    kinds = [kind for kind in web["noise_kind"] if kind]
    assert abs(kinds.count("swap") - kinds.count("attribute")) <= 1
    assert web["clean_caption"] == clean["caption"] and web["image_id"] == clean["image_id"]
    for row in web:
        assert (row["caption"] != row["clean_caption"]) == row["noisy"], row


def test_every_wrong_caption_is_false_for_its_image(clean):
    web = add_caption_noise(clean, noise=0.5, seed=2)
    captions_of = {}
    for row in clean:
        captions_of.setdefault(row["image_id"], set()).add(row["caption"])
    for row in web:
        if row["noise_kind"] == "swap":
            # Another scene's caption: not one of this image's own true captions.
            assert row["caption"] not in captions_of[row["image_id"]]
        elif row["noise_kind"] == "attribute":
            old, new = row["clean_caption"].split(" "), row["caption"].split(" ")
            changed = [(a, b) for a, b in zip(old, new) if a != b]
            assert len(old) == len(new) and len(changed) == 1
            word = changed[0][1]
            scene_colours = {obj["colour"] for obj in row["objects"]}
            scene_shapes = {obj["shape"] for obj in row["objects"]}
            if word in COLOURS:
                assert word not in scene_colours
            else:
                assert word in SHAPE_WORDS and word.removesuffix("es").removesuffix("s") not in scene_shapes


def test_the_same_seed_gives_the_same_noise_and_zero_noise_changes_nothing(clean):
    assert add_caption_noise(clean, 0.3, seed=5)["caption"] == add_caption_noise(clean, 0.3, seed=5)["caption"]
    assert add_caption_noise(clean, 0.3, seed=5)["caption"] != add_caption_noise(clean, 0.3, seed=6)["caption"]
    assert add_caption_noise(clean, 0.0)["caption"] == clean["caption"]
    only_swaps = add_caption_noise(clean, 0.2, kinds=("swap",))
    assert set(only_swaps["noise_kind"]) == {"", "swap"}


@pytest.mark.parametrize(
    "kwargs,message",
    [({"noise": 1.5}, r"\[0, 1\]"), ({"noise": 0.2, "kinds": ("typo",)}, "kinds must be among")],
)
def test_bad_arguments_name_the_fix(clean, kwargs, message):
    with pytest.raises(ValueError, match=message):
        add_caption_noise(clean, **kwargs)
    with pytest.raises(ValueError, match="needs the columns"):
        add_caption_noise(clean.remove_columns("objects"), noise=0.1)
