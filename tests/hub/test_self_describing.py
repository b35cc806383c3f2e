"""Self-describing checkpoints: whatever stage saved it, a checkpoint carries its config (`architectures`,
`auto_map`), processor and chat template, and a model card naming the stage, the data and the metrics; it loads with
the Auto classes in a fresh process after `import vlbridge`, and with `trust_remote_code=True` without that import."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import run_docstring_examples
from tiny import (
    make_images,
    make_tokenizer,
    stage1_config,
    vlm_config,
)
from transformers import CLIPImageProcessor, Trainer, TrainingArguments

import vlbridge
from vlbridge import BridgeProcessor, BridgeVLMForConditionalGeneration, QFormerForImageTextPretraining
from vlbridge.data import make_synthetic_image_text
from vlbridge.hub import add_auto_map, describe_checkpoint, write_model_card
from vlbridge.modeling.saving import AUTO_MAP_FILE
from vlbridge.scripts.utils import finish_training
from vlbridge.trainers import CaptionCollator


pytestmark = pytest.mark.usefixtures("single_thread")


def image_processor(size: int = 32) -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def save_stage1(folder) -> None:
    """A tiny stage-1 model saved as examples/stage1.py saves it, then described."""
    torch.manual_seed(0)
    config = stage1_config()
    model = QFormerForImageTextPretraining(config)
    model.save_pretrained(folder)
    processor = BridgeProcessor(image_processor(), make_tokenizer(), num_image_tokens=4)
    describe_checkpoint(
        folder,
        stage="stage1",
        data="32 built-in scenes.",
        metrics={"i2t_r1": 0.625, "samples": ["not a scalar"]},
        processor=processor,
        base_models="someone/vit-tiny",
    )


def train_vlm(folder) -> tuple[dict, dict]:
    """A tiny VLM trained 2 steps with the HF Trainer on built-in captions and saved by `finish_training`."""
    torch.manual_seed(0)
    model = BridgeVLMForConditionalGeneration(vlm_config("clip", "qformer", "llama"))
    processor = BridgeProcessor(image_processor(), make_tokenizer(), num_image_tokens=model.config.num_image_tokens)
    data = make_synthetic_image_text({"train": 8}, image_size=32, captions_per_image=1, max_objects=1)["train"]
    args = TrainingArguments(
        output_dir=str(folder / "run"),
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    collator = CaptionCollator.from_model(model, processor)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    metrics = finish_training(trainer, trainer.train(), processor, str(folder / "vlm"), metrics={"cider": 0.25})
    inputs = processor(images=make_images(1), text="<image> a red circle", return_tensors="pt")
    model.eval()
    with torch.no_grad():
        torch.save({"inputs": dict(inputs), "logits": model(**inputs).logits}, folder / "expected.pt")
    return metrics, {"chat_template": processor.chat_template}


def front_matter(card: str) -> str:
    match = re.match(r"---\n(.*?)\n---\n", card, flags=re.S)
    assert match, card[:300]
    return match.group(1)


def run_fresh(script: str, env: dict | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    assert result.returncode == 0 and "FRESH-OK" in result.stdout, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("self_describing")
    save_stage1(root / "stage1")
    metrics, extra = train_vlm(root)
    return root, metrics, extra


def test_every_checkpoint_carries_config_processor_and_card(checkpoints):
    root, metrics, saved = checkpoints
    assert set(metrics) == {"train_loss", "final_loss", "cider"}
    expected = {
        "stage1": (
            "QFormerForImageTextPretraining",
            {"AutoConfig", "AutoModel", "AutoModelForPreTraining", "AutoModelForZeroShotImageClassification"},
        ),
        "vlm": ("BridgeVLMForConditionalGeneration", {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}),
    }
    for name, (architecture, auto_classes) in expected.items():
        folder = root / name
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == [architecture]
        assert set(config["auto_map"]) == auto_classes | {"AutoProcessor"}
        assert all(ref.startswith("vlbridge_auto.") for ref in config["auto_map"].values())
        shim = (folder / AUTO_MAP_FILE).read_text()
        assert re.search(r"^\s*from vlbridge import \*", shim, flags=re.M), shim
        assert all(ref.split(".")[1] in vlbridge.__all__ for ref in config["auto_map"].values())
        for required in ("model.safetensors", "processor_config.json", "chat_template.jinja", "tokenizer.json"):
            assert (folder / required).is_file(), (name, required)
    assert (root / "vlm" / "chat_template.jinja").read_text() == saved["chat_template"]


def test_model_cards_name_stage_data_and_metrics(checkpoints):
    root, metrics, _ = checkpoints
    card = (root / "stage1" / "README.md").read_text()
    meta = front_matter(card)
    assert "library_name: vlbridge" in meta and "pipeline_tag: zero-shot-image-classification" in meta
    assert "- stage1" in meta and "base_model: someone/vit-tiny" in meta
    assert "**Training stage:** `stage1`. BLIP-2 stage 1" in card and "32 built-in scenes." in card
    assert "| i2t_r1 | 0.625 |" in card and "not a scalar" not in card
    assert "| qformer |" in card and "AutoModelForPreTraining.from_pretrained(" in card

    card = (root / "vlm" / "README.md").read_text()
    meta = front_matter(card)
    assert "pipeline_tag: image-text-to-text" in meta and "- stage2" in meta and "- vlbridge_qformer" in meta
    # finish_training: the stage from the caption collator, the data from the training set, the losses and extras.
    assert "**Training stage:** `stage2`. BLIP-2 stage 2" in card
    assert "8 training examples (columns: `image`, `caption`" in card
    assert f"| final_loss | {metrics['final_loss']:.4g} |" in card and "| cider | 0.25 |" in card
    assert "AutoModelForImageTextToText.from_pretrained(" in card and "trust_remote_code=True" in card


def test_loads_with_auto_classes_in_a_fresh_process_after_import(checkpoints):
    root, _, _ = checkpoints
    run_fresh(
        f"""
        import torch, vlbridge
        from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
        stage1, vlm = {str(root / "stage1")!r}, {str(root / "vlm")!r}
        assert type(AutoConfig.from_pretrained(stage1)).__name__ == "QFormerPretrainingConfig"
        assert type(AutoModel.from_pretrained(stage1)).__name__ == "QFormerForImageTextPretraining"
        assert type(AutoProcessor.from_pretrained(stage1)).__name__ == "BridgeProcessor"
        assert type(AutoConfig.from_pretrained(vlm)).__name__ == "BridgeVLMConfig"
        assert type(AutoModel.from_pretrained(vlm)).__name__ == "BridgeVLMModel"
        model = AutoModelForImageTextToText.from_pretrained(vlm).eval()
        processor = AutoProcessor.from_pretrained(vlm)
        assert type(model).__name__ == "BridgeVLMForConditionalGeneration", type(model)
        assert type(processor).__name__ == "BridgeProcessor" and "assistant" in processor.chat_template
        saved = torch.load({str(root / "expected.pt")!r})
        # Same weights (bit-exact save / load is tested in test_checkpoints.py); another process may place them
        # at other alignments, where CPU kernels can sum in another order: the last bit of a logit may differ.
        with torch.no_grad():
            torch.testing.assert_close(model(**saved["inputs"]).logits, saved["logits"], rtol=1e-5, atol=1e-6)
        print("FRESH-OK")
        """
    )


def test_loads_through_auto_map_without_importing_vlbridge(checkpoints, tmp_path):
    root, _, _ = checkpoints
    run_fresh(
        f"""
        import sys
        from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
        stage1, vlm = {str(root / "stage1")!r}, {str(root / "vlm")!r}
        assert "vlbridge" not in sys.modules
        model = AutoModelForImageTextToText.from_pretrained(vlm, trust_remote_code=True)
        assert type(model).__module__.startswith("vlbridge."), type(model)  # the installed package, not a copy
        assert type(model).__name__ == "BridgeVLMForConditionalGeneration"
        assert type(AutoProcessor.from_pretrained(vlm, trust_remote_code=True)).__name__ == "BridgeProcessor"
        assert type(AutoModel.from_pretrained(stage1, trust_remote_code=True)).__name__ == (
            "QFormerForImageTextPretraining"
        )
        print("FRESH-OK")
        """,
        env={"HF_MODULES_CACHE": str(tmp_path / "modules")},
    )


def test_adapter_and_foreign_checkpoints_get_a_card_but_no_auto_map(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "b/m"}))
    assert add_auto_map(tmp_path) == {}
    card = write_model_card(tmp_path, stage="dpo", data="", metrics=None, datasets=["someone/prefs"]).read_text()
    assert "PEFT adapter (`LORA`) for `b/m`" in card and "PeftModel.from_pretrained" in card
    assert "- someone/prefs" in front_matter(card) and "preference optimisation (DPO)" in card
    assert "No metrics were measured" in card and "Not recorded." in card
    assert not (tmp_path / AUTO_MAP_FILE).exists()


def test_hub_docstring_examples():
    run_docstring_examples("vlbridge.modeling.saving")


def save_plainly(folder, model, processor_first: bool) -> None:
    """A tiny model and processor written with nothing but their `save_pretrained`, in either order."""
    processor = BridgeProcessor(image_processor(), make_tokenizer(), num_image_tokens=4)
    first, second = (processor, model) if processor_first else (model, processor)
    first.save_pretrained(folder)
    second.save_pretrained(folder)


@pytest.fixture(scope="module")
def plain_saves(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain_saves")
    torch.manual_seed(0)
    # The VLM's processor is saved after the model, the stage-1 model's before: the folder describes itself either way.
    save_plainly(root / "vlm", BridgeVLMForConditionalGeneration(vlm_config("clip", "qformer", "llama")), False)
    config = stage1_config()
    save_plainly(root / "stage1", QFormerForImageTextPretraining(config), True)
    return root


def run_without_vlbridge(script: str, tmp_path) -> str:
    """`script` in a fresh process that has not imported vlbridge, stdin closed (no interactive trust prompt)."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path)},
    )
    assert result.returncode == 0 and "FRESH-OK" in result.stdout, result.stderr[-3000:]
    return result.stdout


def test_save_pretrained_writes_the_self_describing_folder(plain_saves):
    for name, auto in (("vlm", "AutoModelForImageTextToText"), ("stage1", "AutoModelForPreTraining")):
        folder = plain_saves / name
        config = json.loads((folder / "config.json").read_text())
        assert {"AutoConfig", "AutoModel", auto, "AutoProcessor"} <= set(config["auto_map"]), config["auto_map"]
        processor_config = json.loads((folder / "processor_config.json").read_text())
        assert processor_config["auto_map"] == {"AutoProcessor": "vlbridge_auto.BridgeProcessor"}
        assert "pip install vlbridge" in (folder / AUTO_MAP_FILE).read_text()
        card = (folder / "README.md").read_text()
        assert "library_name: vlbridge" in front_matter(card) and "**Training stage:** not recorded." in card


def test_plain_save_loads_with_trust_remote_code_without_importing_vlbridge(plain_saves, tmp_path):
    # Before processor_config.json had its own `auto_map`, AutoProcessor fell back to the bare tokenizer here.
    run_without_vlbridge(
        f"""
        import sys
        from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
        vlm, stage1 = {str(plain_saves / "vlm")!r}, {str(plain_saves / "stage1")!r}
        for folder in (vlm, stage1):
            processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
            assert type(processor).__name__ == "BridgeProcessor", type(processor)
        model = AutoModelForImageTextToText.from_pretrained(vlm, trust_remote_code=True)
        assert type(model).__name__ == "BridgeVLMForConditionalGeneration" and type(model).__module__.startswith("vlb")
        assert type(AutoModel.from_pretrained(stage1, trust_remote_code=True)).__name__ == (
            "QFormerForImageTextPretraining"
        )
        print("FRESH-OK")
        """,
        tmp_path,
    )


def test_plain_save_without_vlbridge_or_trust_remote_code_refuses(plain_saves, tmp_path):
    # Neither a bare tokenizer in place of the processor nor transformers' "out of date" message: an error that
    # names trust_remote_code; and where vlbridge is not installed, the shim names `pip install vlbridge`.
    run_without_vlbridge(
        f"""
        import sys
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
        vlm = {str(plain_saves / "vlm")!r}
        for auto in (AutoProcessor, AutoModelForImageTextToText, AutoConfig):
            try:
                loaded = auto.from_pretrained(vlm)
            except ValueError as error:
                assert "trust_remote_code=True" in str(error) and "out of date" not in str(error), error
            else:
                raise AssertionError(f"{{auto.__name__}} loaded {{type(loaded).__name__}}")
        assert "vlbridge" not in sys.modules
        sys.modules["vlbridge"] = None  # as if vlbridge were not installed
        try:
            AutoProcessor.from_pretrained(vlm, trust_remote_code=True)
        except ImportError as error:
            assert "pip install vlbridge" in str(error) and "import vlbridge" in str(error), error
        else:
            raise AssertionError("loaded without vlbridge")
        print("FRESH-OK")
        """,
        tmp_path,
    )
