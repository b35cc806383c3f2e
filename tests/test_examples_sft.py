"""The SFT examples run end to end on tiny overrides of their presets and leave a checkpoint that loads."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForImageTextToText, AutoProcessor

import vlbridge  # noqa: F401  (registers the vlbridge model and processor classes with the Auto* factories)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.usefixtures("single_thread")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # The dataclasses of the example resolve their string annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["sft", "sft_trl"])
def test_sft_example_trains_and_saves_a_loadable_checkpoint(tmp_path, name):
    pytest.importorskip("trl")
    preset = EXAMPLES / "configs" / f"{name}_builtin.yaml"
    argv = ["--config", str(preset), "--output_dir", str(tmp_path), "--max_steps", "3", "--logging_steps", "1"]
    metrics = load_example(name).main([*argv, "--num_train_images", "8", "--per_device_train_batch_size", "4"])
    assert math.isfinite(metrics["final_loss"]) and math.isfinite(metrics["train_loss"]), metrics

    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(model, vlbridge.BridgeVLMForConditionalGeneration)
    assert processor.num_image_tokens == model.config.num_image_tokens
