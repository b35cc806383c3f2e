"""The example scripts run end to end on tiny overrides of their presets and leave a checkpoint that loads."""

import json
import math

import pytest
from helpers import save_tiny_stage1
from script_loader import EXAMPLES, load_script, run_example
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

import vlbridge  # noqa: F401  (registers the vlbridge model and processor classes with the Auto* factories)


pytestmark = pytest.mark.usefixtures("single_thread")


def load_example(name: str):
    return load_script(EXAMPLES / f"{name}.py", f"example_{name}")


@pytest.mark.parametrize("name", ["sft", "sft_trl"])
def test_sft_example_trains_and_saves_a_loadable_checkpoint(tmp_path, name):
    pytest.importorskip("trl")
    preset = EXAMPLES / "configs" / f"{name}_builtin.yaml"
    argv = ["--config", str(preset), "--output_dir", str(tmp_path), "--max_steps", "3", "--logging_steps", "1"]
    metrics = run_example(name, [*argv, "--num_train_images", "8", "--per_device_train_batch_size", "4"])
    assert math.isfinite(metrics["final_loss"]) and math.isfinite(metrics["train_loss"]), metrics

    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(model, vlbridge.BridgeVLMForConditionalGeneration)
    assert processor.num_image_tokens == model.config.num_image_tokens


@pytest.mark.parametrize("dataset", ["builtin", "folder"])
def test_stage1_example_runs_on_builtin_and_local_data(tmp_path, dataset):
    preset = EXAMPLES / "configs" / "stage1_builtin.yaml"
    argv = ["--config", str(preset), "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--k_test", "4"]
    argv += ["--num_train_images", "32", "--num_eval_images", "8", "--vision_layers", "1", "--disable_tqdm", "true"]
    if dataset == "folder":
        from vlbridge.data import make_synthetic_image_text

        folder = tmp_path / "images"
        folder.mkdir()
        rows = make_synthetic_image_text({"train": 40}, image_size=48, captions_per_image=1, max_objects=2)["train"]
        with open(folder / "metadata.jsonl", "w") as file:
            for i, row in enumerate(rows):
                row["image"].save(folder / f"{i}.png")
                file.write(json.dumps({"file_name": f"{i}.png", "text": row["caption"]}) + "\n")
        argv += ["--dataset", str(folder), "--eval_fraction", "0.2"]
    metrics = run_example("stage1", argv)
    assert {"i2t_r1", "t2i_r1", "itm_accuracy", "itg_exact"} <= set(metrics)
    assert (tmp_path / "out" / "stage1_metrics.json").is_file()
    assert AutoModel.from_pretrained(tmp_path / "out").config.model_type == "vlbridge_qformer_pretraining"


@pytest.mark.parametrize("stage1", [None, "bridge", "around"])
def test_stage2_example_trains_evaluates_and_takes_a_stage1_qformer(tmp_path, stage1):
    import torch

    preset = EXAMPLES / "configs" / "stage2_builtin.yaml"
    argv = ["--config", str(preset), "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--logging_steps", "1"]
    argv += ["--num_train_images", "8", "--num_eval_images", "4", "--per_device_train_batch_size", "4"]
    argv += ["--eval_max_new_tokens", "4", "--disable_tqdm", "true"]
    if stage1:
        save_tiny_stage1(tmp_path / "stage1", with_processor=stage1 == "around")
        # "language-model" freezes the bridge, so after training it must still hold exactly the stage-1 weights.
        argv += ["--freeze", "language-model"]
        if stage1 == "bridge":
            argv += ["--stage1_checkpoint", str(tmp_path / "stage1")]
        else:  # the VLM built around the stage-1 ViT, Q-Former and image processor
            argv += ["--from_stage1", str(tmp_path / "stage1"), "--lm_text_steps", "2"]
    metrics = run_example("stage2", argv)
    assert math.isfinite(metrics["train_loss"]) and "cider" in metrics and "bleu4" in metrics, metrics

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert isinstance(model, vlbridge.BridgeVLMForConditionalGeneration)
    if stage1:
        source = AutoModel.from_pretrained(tmp_path / "stage1").qformer.state_dict()
        bridge_state = model.model.bridge.state_dict()
        assert bridge_state.keys() <= source.keys()
        for name, tensor in bridge_state.items():
            torch.testing.assert_close(tensor, source[name], rtol=0, atol=0, msg=name)
    if stage1 == "around":
        vision = AutoModel.from_pretrained(tmp_path / "stage1").vision_tower.state_dict()
        for name, tensor in model.model.vision_tower.state_dict().items():
            torch.testing.assert_close(tensor, vision[name], rtol=0, atol=0, msg=name)


def test_language_model_text_warm_up_trains_only_the_language_model(tmp_path):
    import torch
    from transformers import TrainingArguments

    from vlbridge.data import chat_vocabulary, make_synthetic_image_text
    from vlbridge.scripts.utils import VLMModelArguments, load_model_and_processor
    from vlbridge.trainers import train_language_model_on_text

    torch.manual_seed(0)
    model, processor = load_model_and_processor(VLMModelArguments(freeze="stage2"), chat_vocabulary())
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    trainable = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    captions = make_synthetic_image_text({"train": 64}, image_size=32, captions_per_image=1)["train"]["caption"]
    args = TrainingArguments(
        str(tmp_path),
        max_steps=30,
        learning_rate=3e-3,
        per_device_train_batch_size=16,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    loss = train_language_model_on_text(model, processor.tokenizer, captions, args)
    assert loss < 0.6 * torch.log(torch.tensor(float(len(processor.tokenizer)))).item()  # far below uniform
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == trainable[name], name  # the caller's freezing stage is back
    assert not any(
        not torch.equal(p, before[n])
        for n, p in model.named_parameters()
        if n.startswith(("model.bridge.", "model.vision_tower."))
    )
    assert any(
        not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith("model.language_model.")
    )
