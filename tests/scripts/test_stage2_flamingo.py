"""`vlbridge stage2 --interleaved_pairs N` (the `stage2_flamingo_builtin` preset): the gated tiny VLM trains on
interleaved sequences, its loss is finite and falls, and the run reports few-shot CIDEr and saves a folder that loads
with its `<|endofchunk|>` tokenizer."""

import math

import pytest
from transformers import AutoModelForImageTextToText, AutoProcessor

import vlbridge  # noqa: F401  (registers the vlbridge classes with the Auto* factories)
from vlbridge.scripts.stage2 import make_parser
from vlbridge.scripts.utils import run_script


pytestmark = pytest.mark.usefixtures("single_thread")


def test_preset_is_flamingo():
    script_args, training_args, model_args = make_parser().parse_args_and_config(
        ["--config", "stage2_flamingo_builtin"]
    )
    assert (model_args.bridge, model_args.image_fusion, model_args.freeze) == (
        "perceiver",
        "gated_cross_attention",
        "stage2",
    )
    assert script_args.interleaved_pairs > 0 and script_args.eval_shots == [0, 2, 4]


def test_interleaved_stage2_learns_and_reports_few_shot_cider(tmp_path):
    argv = ["--config", "stage2_flamingo_builtin", "--output_dir", str(tmp_path), "--interleaved_pairs", "3"]
    argv += ["--num_train_images", "16", "--num_eval_images", "3", "--lm_text_steps", "0", "--eval_shots", "0", "2"]
    argv += [
        "--max_steps",
        "30",
        "--learning_rate",
        "0.01",
        "--warmup_steps",
        "0",
        "--logging_steps",
        "1",
        "--disable_tqdm",
        "true",
    ]
    argv += ["--eval_max_new_tokens", "4"]
    result = run_script("stage2", argv)
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    assert len(losses) == 30 and all(math.isfinite(loss) for loss in losses), losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    assert {"cider_0shot", "cider_2shot"} <= set(result.metrics)

    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert model.config.image_fusion == "gated_cross_attention" and processor.num_image_tokens == 1
    assert processor.tokenizer.convert_tokens_to_ids("<|endofchunk|>") == len(processor.tokenizer) - 1
