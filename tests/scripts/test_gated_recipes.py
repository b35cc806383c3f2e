"""The post-training recipes run unchanged on gated cross-attention (Flamingo, `--image_fusion gated_cross_attention`).

The same scripts as for token fusion (`vlbridge sft`, `sft_trl`, `dpo`, `lora_sft`), only `--image_fusion
gated_cross_attention --bridge perceiver` added (and small step counts): each run completes, learns where the token
tests check that, and saves a folder that loads back as a gated model. The LoRA runs list each gated block in PEFT's
`modules_to_save` (the decoder layers' hooks look the blocks up by key, so PEFT's wrapper must replace each block):
the blocks' trained copies land in the adapter and in the merged model, the language model's base weights stay as
they were, and with the adapters disabled (TRL's DPO reference) the original blocks run.

One TRL SFT run (`sft_checkpoint`) is the starting point of the DPO and LoRA SFT runs, as `dpo_builtin` and
`lora_sft_builtin` start from `sft_trl_builtin`: LoRA cannot teach a freshly initialised tiny model anything.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from helpers import spans
from safetensors.torch import load_file
from transformers import AutoProcessor, set_seed

from vlbridge import BridgeVLMForConditionalGeneration
from vlbridge.data import chat_vocabulary, make_synthetic_chat
from vlbridge.evaluation import preference_accuracy
from vlbridge.scripts.utils import VLMModelArguments, load_model_and_processor, run_script
from vlbridge.trainers.lora import LANGUAGE_MODEL_PATH


trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")

GATED = ["--image_fusion", "gated_cross_attention", "--bridge", "perceiver"]
SHORT = ["--logging_steps", "1", "--per_device_train_batch_size", "4", "--disable_tqdm", "true"]
BLOCKS = "model.gated_cross_attention."
SFT_STEPS, SFT_IMAGES = 60, 32  # the shared TRL SFT run (about 3 s)


def run(script: str, preset: str, output_dir, *argv: str):
    """`vlbridge <script> --config <preset>` on the tiny gated VLM, with the given overrides."""
    return run_script(script, ["--config", preset, "--output_dir", str(output_dir), *GATED, *SHORT, *argv])


def losses(result, key: str = "loss") -> list[float]:
    values = [entry[key] for entry in result.log_history if key in entry]
    assert values and all(math.isfinite(value) for value in values), values
    return values


def assert_falls(values: list[float], ratio: float, window: int = 5) -> None:
    first, last = sum(values[:window]) / window, sum(values[-window:]) / window
    assert last < ratio * first, (first, last, values[::5])


def initial_model(freeze: str = "finetune") -> BridgeVLMForConditionalGeneration:
    """The tiny gated VLM exactly as the scripts build it (the parser seeds with `seed: 0` first)."""
    set_seed(0)
    args = VLMModelArguments(bridge="perceiver", image_fusion="gated_cross_attention", freeze=freeze)
    return load_model_and_processor(args, chat_vocabulary())[0]


def weights(model, prefix: str = "") -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in model.state_dict().items() if name.startswith(prefix)}


def assert_gated(model) -> None:
    """A gated model: one marker per image, a gated block before each of the tiny LM's two layers, hooks in place."""
    config = model.config
    assert config.image_fusion == "gated_cross_attention" and config.num_image_tokens == 1
    blocks = model.model.gated_cross_attention
    assert blocks is not None and config.cross_attention_layers() == [0, 1] and sorted(blocks.keys()) == ["0", "1"]
    layers = model.model.language_model.layers
    assert all(layers[int(index)]._vlbridge_gated_blocks is blocks for index in blocks.keys())


def assert_changed(before: dict, after: dict, every: bool = True) -> None:
    """`every` tensor changed from `before` to `after` (else at least one)."""
    assert sorted(before) == sorted(after) and before
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged if every else len(unchanged) < len(before), unchanged


def assert_unchanged(before: dict, after: dict) -> None:
    assert sorted(before) == sorted(after) and before
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert not changed, changed


def chat_batch(processor, n: int = 4):
    """A padded chat batch from the processor, every other row with a second image (two `<image>` markers)."""
    rows = make_synthetic_chat({"train": n}, image_size=32, seed=1, turns=1)["train"]
    texts, images = [], []
    for i, row in enumerate(rows):
        messages, pictures = row["messages"], list(row["images"])
        if i % 2:  # a second image in the first user turn
            first = messages[0]
            messages = [{**first, "content": [{"type": "image"}, *first["content"]]}, *messages[1:]]
            pictures = pictures * 2
        texts.append(processor.apply_chat_template(messages, tokenize=False))
        images.append(pictures)
    return processor(images=images, text=texts, padding=True, return_tensors="pt")


def assert_logits_aligned(model, processor) -> torch.Tensor:
    """Logits one-to-one with input_ids (TRL's shifted log-prob gather relies on it); returns them."""
    batch = chat_batch(processor)
    markers = (batch["input_ids"] == model.config.image_token_id).sum(-1)
    assert markers.tolist() == [1, 2, 1, 2] and batch["pixel_values"].shape[0] == 6
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
    return logits


def trl_collate(model, processor, rows, directory):
    """`rows` (`messages` + `images`) collated by TRL's SFTTrainer as the SFT scripts configure it (no training)."""
    args = trl.SFTConfig(
        str(directory),
        assistant_only_loss=True,
        max_length=None,
        use_cpu=True,
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=processor)
    return trainer.data_collator([rows[i] for i in range(len(rows))])


# ---------------------------------------------------------------------------------------------------------------------
# Full SFT: `vlbridge sft` (HF Trainer + ChatCollator) and `vlbridge sft_trl` (TRL's SFTTrainer)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    """A TRL SFT run of the gated tiny VLM (all but the vision tower train): the start of the LoRA runs."""
    output_dir = tmp_path_factory.mktemp("gated_sft_trl")
    argv = ["--max_steps", str(SFT_STEPS), "--num_train_images", str(SFT_IMAGES), "--learning_rate", "3e-3"]
    result = run("sft_trl", "sft_trl_builtin", output_dir, *argv, "--lr_scheduler_type", "constant")
    return result, output_dir


def check_full_sft_checkpoint(output_dir, freeze: str):
    """Loads the saved run; the gated blocks trained from the scripts' initial model, the frozen parts did not."""
    model = BridgeVLMForConditionalGeneration.from_pretrained(output_dir).eval()
    processor = AutoProcessor.from_pretrained(output_dir)
    assert_gated(model)
    assert processor.num_image_tokens == 1
    start = initial_model(freeze)
    # The frozen vision tower is bit-identical: `initial_model` is the model the script started from.
    assert_unchanged(weights(start, "model.vision_tower."), weights(model, "model.vision_tower."))
    assert_changed(weights(start, BLOCKS), weights(model, BLOCKS))  # every tensor of every gated block trained
    assert_changed(weights(start, "model.bridge."), weights(model, "model.bridge."), every=False)
    frozen_lm = weights(start, LANGUAGE_MODEL_PATH + ".") | weights(start, "lm_head.")
    trained_lm = weights(model, LANGUAGE_MODEL_PATH + ".") | weights(model, "lm_head.")
    if freeze == "stage2":  # Flamingo's recipe: the language model stays exactly as it was
        assert_unchanged(frozen_lm, trained_lm)
    else:
        assert_changed(frozen_lm, trained_lm, every=False)
    gates = [block.attention_gate.item() for block in model.model.gated_cross_attention.values()]
    assert all(gate != 0 for gate in gates), gates  # no longer the identity: the text reads the images
    assert_logits_aligned(model, processor)
    return model, processor


@pytest.mark.parametrize("freeze", ["finetune", "stage2"])
def test_sft_trains_the_gated_model_and_saves_a_gated_checkpoint(tmp_path, freeze):
    argv = ["--max_steps", "40", "--num_train_images", "16", "--learning_rate", "3e-3", "--freeze", freeze]
    result = run("sft", "sft_builtin", tmp_path, *argv, "--lr_scheduler_type", "constant")
    values = losses(result)
    # Mean of the first / last 5 steps, measured: finetune 3.81 -> 1.37 (0.36x); stage2 (the LM frozen, the bridge and
    # the blocks train) 4.24 -> 3.53 (0.83x).
    assert_falls(values, 0.65 if freeze == "finetune" else 0.92)
    assert math.isfinite(result.metrics["final_loss"]) and result.output_dir == str(tmp_path)
    check_full_sft_checkpoint(tmp_path, freeze)


def test_trl_sft_trains_the_gated_model_and_saves_a_gated_checkpoint(sft_checkpoint):
    result, output_dir = sft_checkpoint
    assert_falls(losses(result), 0.65)  # measured: 3.82 -> 1.75 (0.46x)
    # TRL computed its token accuracy from the logits shifted against input_ids: it needs them aligned.
    accuracy = losses(result, "mean_token_accuracy")
    assert sum(accuracy[-5:]) > sum(accuracy[:5])
    model, processor = check_full_sft_checkpoint(output_dir, "finetune")

    # TRL's own collation of the chats (assistant-only labels) feeds the gated model with aligned logits and loss.
    rows = make_synthetic_chat({"train": 4}, image_size=32, seed=1, turns=1)["train"].select_columns(
        ["messages", "images"]
    )
    batch = trl_collate(model, processor, rows, output_dir / "collate")
    assert (batch["input_ids"] == model.config.image_token_id).sum(-1).tolist() == [1, 1, 1, 1]
    assert all(len(spans(labels)) == 1 for labels in batch["labels"].tolist())  # the one answer of each chat
    with torch.no_grad():
        outputs = model(**batch)
    assert outputs.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(outputs.loss)


# ---------------------------------------------------------------------------------------------------------------------
# LoRA: `vlbridge dpo` and `vlbridge lora_sft` from the SFT checkpoint
# ---------------------------------------------------------------------------------------------------------------------


def check_lora_run(start_dir, output_dir, train_bridge: bool):
    """
    The adapter and the merged model of a LoRA run started from the checkpoint at `start_dir`:

    - the adapter lists each gated block in `modules_to_save` and holds their trained copies (changed from the start)
      iff `train_bridge`;
    - the merged model holds those copies, and its language model is the start plus the adapters' `B @ A` update
      (so the base weights themselves never moved), its vision tower bit-identical;
    - the adapter loaded with `peft.PeftModel.from_pretrained` on the start gives the merged model's logits (the
      hooks run the trained copies), and with adapters disabled the start's logits (the original blocks: TRL's DPO
      reference).

    Returns the start model, the merged model and their processor.
    """
    start = BridgeVLMForConditionalGeneration.from_pretrained(start_dir).eval()
    processor = AutoProcessor.from_pretrained(start_dir)
    adapter_dir, merged_dir = output_dir / "adapter", output_dir / "merged"

    config = peft.PeftConfig.from_pretrained(adapter_dir)
    blocks = [f"model.gated_cross_attention.{index}" for index in ("0", "1")]
    assert (config.modules_to_save or []) == (["model.bridge", *blocks] if train_bridge else [])
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    saved_blocks = {
        name.removeprefix("base_model.model."): tensor for name, tensor in adapter.items() if BLOCKS in name
    }
    if train_bridge:  # every tensor of every block trained through PEFT's copy
        assert_changed(weights(start, BLOCKS), saved_blocks)
    else:
        assert not saved_blocks

    merged = BridgeVLMForConditionalGeneration.from_pretrained(merged_dir).eval()
    assert_gated(merged)
    assert_unchanged(saved_blocks if train_bridge else weights(start, BLOCKS), weights(merged, BLOCKS))
    assert_unchanged(weights(start, "model.vision_tower."), weights(merged, "model.vision_tower."))
    # The language model: LoRA targets are start + scale * B @ A, everything else (norms, embeddings, head) as it was.
    scale = config.lora_alpha / config.r
    updates = {}
    for name, lora_a in adapter.items():
        if ".lora_A." in name:
            lora_b = adapter[name.replace(".lora_A.", ".lora_B.")]
            updates[name.removeprefix("base_model.model.").replace(".lora_A.", ".")] = scale * lora_b @ lora_a
    assert updates and all(re.match(re.escape(LANGUAGE_MODEL_PATH) + r"\.", name) for name in updates)
    assert any(update.abs().max() > 1e-4 for update in updates.values())
    start_lm = weights(start, LANGUAGE_MODEL_PATH + ".") | weights(start, "lm_head.")
    merged_lm = weights(merged, LANGUAGE_MODEL_PATH + ".") | weights(merged, "lm_head.")
    assert sorted(start_lm) == sorted(merged_lm)
    for name, tensor in start_lm.items():
        if name in updates:
            torch.testing.assert_close(merged_lm[name] - updates[name], tensor, rtol=0, atol=1e-5, msg=name)
        else:
            assert torch.equal(merged_lm[name], tensor), name

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(start), adapter_dir).eval()
    wrapped = loaded.get_base_model().model.gated_cross_attention
    assert all(isinstance(block, peft.utils.ModulesToSaveWrapper) for block in wrapped.values()) == train_bridge
    adapted = assert_logits_aligned(loaded, processor)
    torch.testing.assert_close(adapted, assert_logits_aligned(merged, processor), rtol=1e-4, atol=1e-4)
    with loaded.disable_adapter():
        disabled = assert_logits_aligned(loaded, processor)
    assert torch.equal(disabled, assert_logits_aligned(start, processor))
    assert not torch.allclose(adapted, disabled, atol=1e-3)
    return start, merged, processor


@pytest.mark.parametrize("train_bridge", [True, False])
def test_dpo_lora_trains_the_gated_blocks_through_modules_to_save(tmp_path, sft_checkpoint, train_bridge):
    from vlbridge.scripts.dpo import PreferenceDataArguments, held_out_pairs

    _, start_dir = sft_checkpoint
    data = dict(num_train_images=8, num_eval_images=4, sft_num_train_images=SFT_IMAGES)
    argv = [f"--{key}={value}" for key, value in data.items()]
    argv += ["--model_name_or_path", str(start_dir), "--train_bridge", str(train_bridge).lower()]
    argv += ["--max_steps", "20", "--learning_rate", "5e-3", "--lr_scheduler_type", "constant"]
    # Plain DPO, as tests/scripts/test_trl_dpo.py trains: the preset's added chosen-NLL term ("sft") keeps 20 steps on
    # 16 pairs from moving the margin reliably (measured over 3 seeds: -1.4 to +0.6 with it, +3.1 to +5.5 without).
    argv += ["--loss_type", "sigmoid", "--loss_weights", "1"]
    result = run("dpo", "dpo_builtin", tmp_path, *argv)
    losses(result)
    margins = losses(result, "rewards/margins")  # the policy against the adapter-disabled reference
    assert math.isfinite(result.metrics["margin_after"]) and result.metrics["held_out_pairs"] > 0

    start, merged, processor = check_lora_run(start_dir, tmp_path, train_bridge)
    # DPO learnt its pairs: the log-prob margin of chosen over rejected widens, more pairs are won (measured over 3
    # seeds: margin 8.5 -> 11.6 to 14.0, accuracy 0.56 -> 0.62 to 0.75, both with and without train_bridge).
    train_pairs, _ = held_out_pairs(PreferenceDataArguments(**data))
    before = preference_accuracy(start, processor, train_pairs)
    after = preference_accuracy(merged, processor, train_pairs)
    assert after["margin"] > before["margin"] + 1.5 and after["accuracy"] > before["accuracy"], (before, after)
    assert sum(margins[-5:]) > sum(margins[:5]), margins  # TRL's own reward margins against the reference


def test_lora_sft_trains_the_gated_blocks_through_modules_to_save(tmp_path, sft_checkpoint):
    from vlbridge.scripts.lora_sft import LoraSFTScriptArguments, make_parser, safety_data

    _, start_dir = sft_checkpoint
    argv = ["--model_name_or_path", str(start_dir), "--num_train_images", "16", "--num_preference_images", "4"]
    argv += ["--max_steps", "20", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant"]
    result = run("lora_sft", "lora_sft_builtin", tmp_path, *argv, "--per_device_train_batch_size", "8")
    # Batches of 8 two-turn chats are noisy: measured over 3 seeds, the last 4 steps' loss is 0.71x to 0.82x the first.
    assert_falls(losses(result), 0.9, window=4)
    assert 0 <= result.metrics["accuracy_after"] <= 1 and result.output_dir == str(tmp_path / "merged")
    start, merged, processor = check_lora_run(start_dir, tmp_path, train_bridge=True)

    # The loss on all the training chats, as TRL collates them, falls (measured over 3 seeds: 4.23 -> 2.4 to 3.2).
    script_args = make_parser().parse_args_and_config(["--config", "lora_sft_builtin", *argv])[0]
    assert isinstance(script_args, LoraSFTScriptArguments)
    chats, _ = safety_data(script_args, script_args)
    batch = trl_collate(start, processor, chats, tmp_path / "collate")
    with torch.no_grad():
        before, after = start(**batch).loss.item(), merged(**batch).loss.item()
    assert after < 0.85 * before, (before, after)
