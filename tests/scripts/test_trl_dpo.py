"""TRL's DPOTrainer with a vlbridge model, BridgeProcessor and language_model_lora_config, unchanged.

What a user needs (documented in examples/dpo.py): a conversational preference dataset with `images`, `prompt` (a user
message with an image entry), `chosen` and `rejected` (`vlbridge.data.make_synthetic_preference`), `peft_config` from
`language_model_lora_config`, no `ref_model` (the reference is the adapter-disabled model), `max_length=None` or a
length that keeps every prompt whole, and `precompute_ref_log_probs=False` (TRL refuses it for vision data).
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_only_adapters_changed, make_model, make_processor
from script_loader import EXAMPLES, run_example
from tiny import TRL_CPU_ARGS, sft_config

from vlbridge import BridgeVLMForConditionalGeneration
from vlbridge.data import make_synthetic_preference, make_synthetic_safety_chat
from vlbridge.evaluation import preference_accuracy, preference_answer_accuracy, preference_log_probs
from vlbridge.trainers import language_model_lora_config


trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")


def dpo_config(tmp_path, **kwargs):
    # bf16 and gradient checkpointing (TRL's defaults) also work on CPU; off here because they only slow a tiny model.
    defaults = dict(per_device_train_batch_size=4, **TRL_CPU_ARGS, logging_steps=1, seed=0, disable_tqdm=True)
    return trl.DPOConfig(str(tmp_path), **{**defaults, **kwargs})


@pytest.fixture(scope="module")
def preference_data():
    return make_synthetic_preference({"train": 16, "test": 8}, image_size=32, max_objects=2)


@pytest.mark.parametrize("train_bridge", [True, False])
def test_dpo_trains_adapters_only(tmp_path, preference_data, train_bridge):
    model = make_model("llama")
    model.freeze("finetune")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = language_model_lora_config(model, r=4, alpha=8, train_bridge=train_bridge)
    trainer = trl.DPOTrainer(
        model=model,
        args=dpo_config(tmp_path, max_steps=3, learning_rate=1e-2),
        train_dataset=preference_data["train"],
        processing_class=make_processor(),
        peft_config=config,
    )
    assert isinstance(trainer.model, peft.PeftModel) and trainer.ref_model is None
    trainer.train()
    # LM, vision tower and original bridge bit-unchanged; LoRA B changed; bridge copies exist and changed iff asked.
    assert_only_adapters_changed(before, trainer.model, bridge_trained=train_bridge)


def test_reference_is_the_adapter_disabled_model_and_adapters_reload(tmp_path, preference_data):
    processor = make_processor()
    model = make_model("llama")
    original = copy.deepcopy(model).eval()
    trainer = trl.DPOTrainer(
        model=model,
        args=dpo_config(tmp_path, max_steps=3, learning_rate=1e-2),
        train_dataset=preference_data["train"],
        processing_class=processor,
        peft_config=language_model_lora_config(model, r=4, alpha=8),
    )
    trainer.train()
    policy = trainer.model
    held_out = preference_data["test"]
    batch = trainer.data_collator([dict(held_out[i]) for i in range(held_out.num_rows)])
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(policy, batch)
    # TRL's reference log-probs are the untrained model's, and preference_log_probs builds TRL's sequences.
    chosen, rejected = preference_log_probs(original, processor, held_out)
    torch.testing.assert_close(ref_chosen, chosen, rtol=0, atol=1e-3)
    torch.testing.assert_close(ref_rejected, rejected, rtol=0, atol=1e-3)
    with policy.disable_adapter():
        disabled = preference_log_probs(policy, processor, held_out)
    assert torch.equal(disabled[0], chosen) and torch.equal(disabled[1], rejected)
    trained = preference_log_probs(policy, processor, held_out)
    assert not torch.equal(trained[0], chosen)

    trainer.save_model(str(tmp_path / "adapter"))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "adapter")
    reloaded = preference_log_probs(loaded, processor, held_out)
    assert torch.equal(reloaded[0], trained[0]) and torch.equal(reloaded[1], trained[1])
    merged = loaded.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    merged_again = BridgeVLMForConditionalGeneration.from_pretrained(tmp_path / "merged")
    for ours, theirs in zip(preference_log_probs(merged_again, processor, held_out), trained):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_dpo_teaches_a_rarely_refusing_model_to_refuse_absent_objects(tmp_path):
    """An SFT model that saw few refusals prefers a made-up answer about an absent object; 40 LoRA DPO steps make it
    prefer "there is no star in the image." on held-out scenes (measured: accuracy 0.28 -> 1.0)."""
    processor = make_processor()
    model = make_model("llama")
    model.freeze("finetune")
    chat = make_synthetic_safety_chat({"train": 64}, image_size=32, max_objects=2, turns=1, refusal_rate=0.1)
    sft_args = sft_config(
        tmp_path / "sft",
        per_device_train_batch_size=16,
        seed=0,
        max_steps=60,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        disable_tqdm=True,
    )
    sft_data = chat["train"].select_columns(["messages", "images"])
    trl.SFTTrainer(model=model, args=sft_args, train_dataset=sft_data, processing_class=processor).train()

    pairs = make_synthetic_preference(
        {"train": 64, "test": 32}, image_size=32, max_objects=2, pair_types=["absent"], pairs_per_image=1
    )
    before = preference_accuracy(model, processor, pairs["test"])
    args = dpo_config(
        tmp_path / "dpo", per_device_train_batch_size=8, max_steps=40, learning_rate=5e-3, lr_scheduler_type="constant"
    )
    trainer = trl.DPOTrainer(
        model=model,
        args=args,
        train_dataset=pairs["train"],
        processing_class=processor,
        peft_config=language_model_lora_config(model, r=8, alpha=16),
    )
    trainer.train()
    after = preference_accuracy(trainer.model, processor, pairs["test"])
    assert before["accuracy"] < 0.5 and after["accuracy"] >= 0.9, (before, after)
    assert after["margin"] > before["margin"] + 10


class Sayer(torch.nn.Module):
    """A stand-in for a VLM whose `generate` says given answers, one per row, in order."""

    config = SimpleNamespace(is_encoder_decoder=False)

    def __init__(self, tokenizer, answers):
        super().__init__()
        self.tokenizer, self.answers = tokenizer, list(answers)

    def generate(self, input_ids, **kwargs):
        batch, self.answers = self.answers[: len(input_ids)], self.answers[len(input_ids) :]
        new = self.tokenizer(batch, padding=True, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return torch.cat([input_ids, new], dim=1)


def test_answer_accuracy_scores_what_the_model_says(preference_data):
    processor, pairs = make_processor(), preference_data["test"]
    # Says the chosen answer on caption pairs and the rejected one elsewhere: accuracy counts the captions only.
    said = [
        row[key][0]["content"][0]["text"]
        for row in pairs
        for key in (["chosen"] if row["pair_type"] == "caption" else ["rejected"])
    ]
    result = preference_answer_accuracy(Sayer(processor.tokenizer, said), processor, pairs, group_by="pair_type")
    captions = sum(kind == "caption" for kind in pairs["pair_type"])
    assert 0 < captions < len(pairs) and result["num_pairs"] == len(pairs)
    assert result["accuracy"] == pytest.approx(captions / len(pairs))
    assert result["groups"]["caption"]["accuracy"] == 1.0
    assert all(group["accuracy"] == 0.0 for kind, group in result["groups"].items() if kind != "caption")
    assert [text.replace(" .", ".") for text in result["predictions"]] == said  # a word-level tokenizer's spacing
    two_turns = dict(pairs[0], prompt=pairs[0]["prompt"] * 2)
    with pytest.raises(ValueError, match="one user turn"):
        preference_answer_accuracy(Sayer(processor.tokenizer, said), processor, [two_turns])


def test_dpo_example_saves_an_adapter_and_a_merged_model(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    argv = ["--config", str(EXAMPLES / "configs" / "dpo_builtin.yaml"), "--output_dir", str(tmp_path)]
    argv += ["--model_name_or_path", "none", "--max_steps", "2", "--per_device_train_batch_size", "4"]
    argv += [
        "--num_train_images",
        "8",
        "--num_eval_images",
        "4",
        "--sft_num_train_images",
        "8",
        "--disable_tqdm",
        "true",
    ]
    metrics = run_example("dpo", argv)
    assert 0 <= metrics["accuracy_after"] <= 1 and metrics["held_out_pairs"] > 0
    assert {"accuracy_after_caption", "accuracy_after_question", "accuracy_after_absent"} & set(metrics)
    assert 0 <= metrics["answer_accuracy_before"] <= 1 and 0 <= metrics["answer_accuracy_after"] <= 1
    config = peft.PeftConfig.from_pretrained(tmp_path / "adapter")
    assert config.modules_to_save == ["model.bridge", "model.language_projection"]
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    processor = AutoProcessor.from_pretrained(tmp_path / "merged")
    assert type(merged) is BridgeVLMForConditionalGeneration
    assert processor.num_image_tokens == merged.config.num_image_tokens


def test_presets_add_the_chosen_nll_and_a_flag_overrides_a_list():
    from vlbridge.scripts.dpo import make_parser

    for preset in ("dpo_sft", "dpo_builtin", "dpo_safety"):
        _, args, _ = make_parser().parse_args_and_config(["--config", preset])
        assert args.loss_type == ["sigmoid", "sft"] and args.loss_weights == [1.0, 1.0]
    override = ["--config", "dpo_sft", "--loss_type", "sigmoid", "--loss_weights", "1"]
    _, args, _ = make_parser().parse_args_and_config(override)
    assert args.loss_type == ["sigmoid"] and args.loss_weights == [1.0]
