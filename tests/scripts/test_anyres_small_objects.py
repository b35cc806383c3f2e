"""examples/anyres_small_objects.py: the two variants differ only in image processing (same initial weights, the same
base view, more tiles and tokens for any-res), and a tiny run trains and scores both (no accuracy asserted)."""

import math

import pytest
import torch
from script_loader import EXAMPLES, load_script, unload_script


EXAMPLE = EXAMPLES / "anyres_small_objects.py"
CONFIG = EXAMPLE.parent / "configs" / "anyres_small_objects.yaml"

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def example():
    yield load_script(EXAMPLE, "anyres_small_objects")
    unload_script("anyres_small_objects")


def tiny_argv(tmp_path, *extra: str) -> list[str]:
    return [
        "--config",
        str(CONFIG),
        "--output_dir",
        str(tmp_path),
        "--num_train_images",
        "16",
        "--num_eval_images",
        "3",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "1",
        "--seeds",
        "0",
        *extra,
    ]


def test_variants_differ_only_in_image_processing(example, tmp_path):
    data_args, args, _ = example.make_parser().parse_args_and_config(tiny_argv(tmp_path))
    tokenizer = example.build_word_tokenizer(example.vocabulary())
    train, questions = example.load_data(data_args)
    single = example.build_model(args, tokenizer, anyres=False, seed=0)
    anyres = example.build_model(args, tokenizer, anyres=True, seed=0)
    # The preset: 24-px tiles, a 3x3 canvas (one tile per cell of the scenes' 3x3 grid).
    assert single.config.image_grid_pinpoints is None and anyres.config.image_grid_pinpoints == [[72, 72]]
    weights = anyres.state_dict()
    assert all(torch.equal(value, weights[key]) for key, value in single.state_dict().items())

    image = questions[0]["image"]
    assert image.size == (data_args.image_size, data_args.image_size)
    single_inputs = example.build_processor(single, tokenizer)(images=[image], return_tensors="pt")
    anyres_inputs = example.build_processor(anyres, tokenizer)(images=[image], return_tensors="pt")
    assert tuple(single_inputs["pixel_values"].shape) == (1, 3, 24, 24)
    assert tuple(anyres_inputs["pixel_values"].shape) == (1, 10, 3, 24, 24)  # base view + 3x3 tiles
    torch.testing.assert_close(anyres_inputs["pixel_values"][:, 0], single_inputs["pixel_values"], atol=0, rtol=0)

    # One chat through each variant's collator: the image takes 10x the tokens; the text is the same.
    batches = [
        example.ChatCollator.from_model(model, example.build_processor(model, tokenizer))([train[0]])
        for model in (single, anyres)
    ]
    image_id = tokenizer.image_token_id
    assert not any((batch["input_ids"] == tokenizer.unk_token_id).any() for batch in batches)  # role headers included
    counts = [int((batch["input_ids"] == image_id).sum()) for batch in batches]
    assert counts == [single.config.num_image_tokens, 10 * single.config.num_image_tokens]
    texts = [batch["input_ids"][batch["input_ids"] != image_id] for batch in batches]
    assert torch.equal(texts[0], texts[1]) and torch.equal(
        batches[0]["labels"][batches[0]["labels"] != -100], batches[1]["labels"][batches[1]["labels"] != -100]
    )


def test_tiny_run_trains_and_scores_both_variants(example, tmp_path, capsys):
    results = example.main(tiny_argv(tmp_path))
    assert [(r["variant"], r["seed"], r["tiles"]) for r in results] == [("single-tile", 0, 1), ("any-res", 0, 10)]
    types = set(example.SmallObjectsDataArguments.turn_types.split(","))
    for result in results:
        assert math.isfinite(result["final_loss"]) and result["train_seconds"] > 0
        assert 0.0 <= result["accuracy"] <= 1.0 and set(result["per_type"]) <= types
    assert results[1]["tokens_per_image"] == 10 * results[0]["tokens_per_image"]
    assert "| single-tile | 0 | 1 |" in capsys.readouterr().out


def test_bad_arguments_raise(example, tmp_path):
    with pytest.raises(ValueError, match="Unknown --variants"):
        example.main(tiny_argv(tmp_path, "--variants", "multi-tile"))
    with pytest.raises(ValueError, match="ROWSxCOLUMNS"):
        example.parse_grids("3by3")
