"""language_model_lora_config: adapters on the language model only (never the vision tower or the bridge, whose layers
share names with it), the bridge trained iff asked, adapters that save, load and merge into a plain vlbridge model,
and safety / helpfulness LoRA SFT through TRL's SFTTrainer."""

import copy
import re

import pytest
import torch
from helpers import assert_only_adapters_changed, make_model, make_processor, run_doctests
from script_loader import EXAMPLES, run_example
from tiny import make_images, sft_config

from vlbridge import BridgeVLMForConditionalGeneration
from vlbridge.data import make_synthetic_safety_chat
from vlbridge.trainers import language_model_lora_config
from vlbridge.trainers.lora import language_model_linear_names, language_model_target_regex


peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_targets(peft_model) -> list[str]:
    """Paths (relative to the vlbridge model) of the modules that got LoRA layers."""
    names = {name.rsplit(".lora_A", 1)[0] for name, _ in peft_model.named_parameters() if ".lora_A." in name}
    return sorted(name.removeprefix("base_model.model.") for name in names)


def inputs(processor, n: int = 2, seed: int = 0):
    texts = [f"{processor.tokenizer.bos_token}user: <image>\nwhat colour is the circle?\nassistant: red"] * n
    return processor(images=make_images(n, seed=seed), text=texts, return_tensors="pt")


def perturb_adapters(peft_model, seed: int = 0) -> None:
    """Non-zero LoRA B (PEFT starts it at zero) and a changed bridge copy, so that the adapters change the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("text", ["llama", "opt"])
def test_regex_matches_only_language_model_projections(text):
    model = make_model(text)
    config = language_model_lora_config(model)
    targets = lora_targets(peft.get_peft_model(model, config))
    expected = [
        name
        for name, module in make_model(text).named_modules()
        if name.startswith("model.language_model.") and isinstance(module, torch.nn.Linear)
    ]
    assert targets == sorted(expected) and targets
    # OPT's projections are named like CLIP's (q_proj ... fc2): plain suffixes would adapt the vision tower as well.
    suffixes = peft.get_peft_model(make_model(text), peft.LoraConfig(target_modules=["q_proj"]))
    assert any(name.startswith("model.vision_tower.") for name in lora_targets(suffixes))


@pytest.mark.parametrize("name", ["vlbridge.trainers.lora", "vlbridge.evaluation.preference"])
def test_docstring_examples(name):
    result = run_doctests(name)
    assert result.attempted > 0 and result.failed == 0


def test_target_projections_subset_and_regex():
    model = make_model("llama")
    assert language_model_linear_names(model) == LLAMA
    config = language_model_lora_config(model, r=4, alpha=8, target_projections=["q_proj", "v_proj"])
    assert config.target_modules == language_model_target_regex(["q_proj", "v_proj"])
    assert (config.r, config.lora_alpha, config.task_type) == (4, 8, "CAUSAL_LM")
    targets = lora_targets(peft.get_peft_model(model, config))
    assert len(targets) == 4 and all(
        re.search(r"language_model\.layers\.\d\.self_attn\.[qv]_proj$", t) for t in targets
    )


def test_bad_targets_and_models_raise_clear_errors():
    model = make_model("llama")
    with pytest.raises(ValueError, match=r"\['fc1'\] not found.*'q_proj'"):
        language_model_lora_config(model, target_projections=["q_proj", "fc1"])
    with pytest.raises(ValueError, match="non-empty"):
        language_model_lora_config(model, target_projections=[])
    with pytest.raises(TypeError, match=r"list of layer names, e.g. \['q_proj'\]"):
        language_model_lora_config(model, target_projections="q_proj")
    with pytest.raises(TypeError, match="expects a vlbridge BridgeVLMForConditionalGeneration"):
        language_model_lora_config(model.model.language_model)
    wrapped = peft.get_peft_model(model, language_model_lora_config(model))
    with pytest.raises(TypeError, match="get_base_model"):
        language_model_lora_config(wrapped)


@pytest.mark.parametrize("train_bridge", [True, False])
def test_only_adapters_and_bridge_train(train_bridge):
    model = make_model("llama")
    model.freeze("full-finetune")  # whatever was trainable before, PEFT decides now
    peft_model = peft.get_peft_model(model, language_model_lora_config(model, train_bridge=train_bridge))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    lora = [name for name in trainable if ".lora_" in name]
    bridge = [name for name in trainable if ".modules_to_save.default." in name]
    assert lora and all(".model.language_model." in name for name in lora)
    assert sorted(set(trainable) - set(lora)) == sorted(bridge)
    copies = {name.split(".modules_to_save.")[0].removeprefix("base_model.model.") for name in bridge}
    assert copies == ({"model.bridge", "model.language_projection"} if train_bridge else set())


def test_adapters_save_load_and_merge_into_a_plain_model(tmp_path):
    processor = make_processor()
    base = make_model("llama").eval()
    peft_model = peft.get_peft_model(copy.deepcopy(base), language_model_lora_config(base, r=4)).eval()
    perturb_adapters(peft_model)
    batch = inputs(processor)
    with torch.no_grad():
        adapted = peft_model(**batch).logits
        assert not torch.allclose(adapted, base(**batch).logits)
        peft_model.save_pretrained(tmp_path / "adapter")
        # The adapter folder holds the LoRA matrices and the trained bridge / projection copies, not the base.
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
        assert torch.equal(loaded(**batch).logits, adapted)
        merged = loaded.merge_and_unload()
        assert type(merged) is BridgeVLMForConditionalGeneration
        assert not any("lora_" in name or "modules_to_save" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(**batch).logits, adapted, rtol=1e-5, atol=1e-5)
        merged.save_pretrained(tmp_path / "merged")
        reloaded = BridgeVLMForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
        assert torch.equal(reloaded(**batch).logits, merged(**batch).logits)


def make_head_ready_model(seed: int = 0) -> BridgeVLMForConditionalGeneration:
    """The tiny test VLM with its LM head at the scale of a trained one. A freshly initialised head (std 0.02 over a
    32-wide RMS-normalised hidden state) caps every logit near 0.6, so no adapter on the layers below can make the
    output distribution anything but flat: LoRA, like any post-training, needs a trained model to start from."""
    model = make_model("llama", seed=seed)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed))
    return model


def test_safety_lora_sft_trains_adapters_only(tmp_path):
    trl = pytest.importorskip("trl")
    processor = make_processor()
    model = make_head_ready_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = make_synthetic_safety_chat({"train": 16}, image_size=32, max_objects=2, turns=2, refusal_rate=0.5)
    assert any("absent" in kinds for kinds in data["train"]["turn_types"])
    args = sft_config(tmp_path, logging_steps=1, seed=0, max_steps=20, learning_rate=1e-2, disable_tqdm=True)
    dataset = data["train"].select_columns(["messages", "images"])
    config = language_model_lora_config(model, r=4, alpha=8)
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=processor, peft_config=config
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4]), losses  # measured: 5.05 -> about 1.2
    assert_only_adapters_changed(before, trainer.model, bridge_trained=True)


def test_lora_sft_example_saves_an_adapter_and_a_merged_model(tmp_path):
    pytest.importorskip("trl")
    from transformers import AutoModelForImageTextToText

    argv = ["--config", str(EXAMPLES / "configs" / "sft_trl_builtin.yaml"), "--output_dir", str(tmp_path)]
    argv += ["--model_name_or_path", "none", "--max_steps", "2", "--per_device_train_batch_size", "4"]
    argv += ["--num_train_images", "8", "--num_preference_images", "12", "--disable_tqdm", "true"]
    metrics = run_example("lora_sft", argv)
    assert 0 <= metrics["accuracy_after"] <= 1
    assert {"accuracy_after_absent", "accuracy_after_present", "accuracy_after_question"} <= set(metrics)
    assert peft.PeftConfig.from_pretrained(tmp_path / "adapter").modules_to_save == [
        "model.bridge",
        "model.language_projection",
    ]
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")) is BridgeVLMForConditionalGeneration


def test_safety_preset_keeps_captions_and_feeds_the_dpo_preset():
    from vlbridge.scripts import dpo, lora_sft

    script_args, args, model_args = lora_sft.make_parser().parse_args_and_config(["--config", "lora_sft_stage2"])
    assert script_args.caption_rate > 0 and script_args.refusal_rate > 0 and script_args.train_bridge
    assert script_args.max_turns == 1  # InstructBLIP mode: the Q-Former reads a chat's first question only
    data, _, dpo_model = dpo.make_parser().parse_args_and_config(["--config", "dpo_safety"])
    assert dpo_model.model_name_or_path == f"{args.output_dir}/merged"
    assert set(data.pair_types.split(",")) == {"caption", "question", "absent", "present"}
