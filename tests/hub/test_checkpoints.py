"""Checkpoints: fresh-process round trip, push_to_hub with the network patched, VLMs built from two checkpoints."""

import json
import logging
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi
from tiny import BOS_ID, IMAGE_ID, make_images, make_tokenizer, text_config, vision_config, vlm_config
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPModel,
    SiglipImageProcessor,
)

from vlbridge import BridgeProcessor, BridgeVLMForConditionalGeneration, QFormerConfig


def tiny_model_and_processor():
    torch.manual_seed(0)
    model = BridgeVLMForConditionalGeneration(vlm_config("clip", "qformer", "llama")).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = BridgeProcessor(image_processor, make_tokenizer(), num_image_tokens=model.config.num_image_tokens)
    return model, processor


def test_auto_classes_registered_on_import():
    config = vlm_config()
    assert type(AutoConfig.for_model("vlbridge")).__name__ == "BridgeVLMConfig"
    assert type(AutoModel.from_config(config)).__name__ == "BridgeVLMModel"
    assert type(AutoModel.from_config(config.bridge_config)).__name__ == "QFormerModel"
    assert type(AutoModelForImageTextToText.from_config(config)) is BridgeVLMForConditionalGeneration


def test_round_trip_in_a_fresh_process(tmp_path):
    model, processor = tiny_model_and_processor()
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    inputs = processor(
        images=make_images(2),
        text=["<image> a red circle", "<image> two blue squares"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.save({"inputs": dict(inputs), "logits": expected}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch, vlbridge
        from transformers import AutoModelForImageTextToText, AutoProcessor
        model = AutoModelForImageTextToText.from_pretrained({str(tmp_path / "ckpt")!r}).eval()
        processor = AutoProcessor.from_pretrained({str(tmp_path / "ckpt")!r})
        saved = torch.load({str(tmp_path / "expected.pt")!r})
        assert type(processor).__name__ == "BridgeProcessor", type(processor)
        with torch.no_grad():
            logits = model(**saved["inputs"]).logits
        assert torch.equal(logits, saved["logits"]), (logits - saved["logits"]).abs().max()
        print("FRESH-PROCESS-OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "FRESH-PROCESS-OK" in result.stdout, result.stderr[-3000:]


def test_push_to_hub_commits_everything_and_loads_back(tmp_path):
    model, processor = tiny_model_and_processor()
    remote = tmp_path / "remote"
    commits = []

    def fake_create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def fake_create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        commits.append((repo_id, commit_message, sorted(op.path_in_repo for op in operations)))
        for op in operations:  # materialise the commit as the remote repo would hold it
            target = remote / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(op.path_or_fileobj, target)
        return SimpleNamespace(commit_url="https://example.invalid/commit", oid="0" * 40)

    with (
        mock.patch.object(HfApi, "create_repo", fake_create_repo),
        mock.patch.object(HfApi, "create_commit", fake_create_commit),
    ):
        model.push_to_hub("someone/tiny-vlm", processor=processor, card_details="Trained on nothing yet.")

    assert len(commits) == 1, "model, processor and card go up in one commit"
    repo_id, _, files = commits[0]
    assert repo_id == "someone/tiny-vlm"
    for required in (
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "chat_template.jinja",
        "README.md",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert required in files, (required, files)
    card = (remote / "README.md").read_text()
    assert "Q-Former" in card and "llama" in card and "Trained on nothing yet." in card
    assert "library_name: transformers" in card and "image-text-to-text" in card
    assert json.loads((remote / "config.json").read_text())["model_type"] == "vlbridge"

    loaded = AutoModelForImageTextToText.from_pretrained(remote).eval()
    loaded_processor = AutoProcessor.from_pretrained(remote)
    assert loaded_processor.chat_template == processor.chat_template
    assert loaded_processor.num_image_tokens == processor.num_image_tokens
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_from_vision_text_pretrained(tmp_path):
    torch.manual_seed(0)
    clip_config = AutoConfig.for_model(
        "clip",
        vision_config=vision_config("clip").to_dict(),
        text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99
        ),
        projection_dim=16,
    )
    clip = CLIPModel(clip_config).eval()
    clip.save_pretrained(tmp_path / "clip")
    lm = AutoModelForCausalLM.from_config(text_config("opt")).eval()
    lm.save_pretrained(tmp_path / "opt")
    make_tokenizer().save_pretrained(tmp_path / "opt")

    model = BridgeVLMForConditionalGeneration.from_vision_text_pretrained(
        tmp_path / "clip",
        tmp_path / "opt",
        QFormerConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_query_tokens=4
        ),
    ).eval()
    assert model.config.image_token_id == IMAGE_ID  # found in the LM's tokenizer
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours = model.model.vision_tower(pixel_values).last_hidden_state
        theirs = clip.vision_model(pixel_values).last_hidden_state
        torch.testing.assert_close(ours, theirs)
        text = torch.tensor([[BOS_ID, 12, 13, 14]])
        torch.testing.assert_close(model(input_ids=text).logits, lm(input_ids=text).logits)
    out = model(input_ids=torch.tensor([[BOS_ID] + [IMAGE_ID] * 4 + [12]]), pixel_values=pixel_values)
    assert out.logits.shape[:2] == (1, 6)


def test_from_vision_text_pretrained_adds_image_token(tmp_path):
    tokenizer = make_tokenizer(image_token=False)  # a language model whose tokenizer has no <image>
    assert "<image>" not in tokenizer.get_vocab()
    lm = AutoModelForCausalLM.from_config(text_config("llama", vocab_size=len(tokenizer))).eval()
    lm.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    AutoModel.from_config(vision_config("siglip")).save_pretrained(tmp_path / "siglip")

    model = BridgeVLMForConditionalGeneration.from_vision_text_pretrained(
        tmp_path / "siglip", tmp_path / "llama", {"model_type": "vlbridge_mlp", "hidden_size": 32}
    )
    assert model.config.image_token_id == len(tokenizer)  # appended after the existing vocabulary
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) + 1
    assert model.config.text_config.vocab_size == len(tokenizer) + 1
    assert model.config.num_image_tokens == 16  # SigLIP: 4x4 patches, no CLS
    ids = torch.tensor([[BOS_ID] + [model.config.image_token_id] * 16 + [12]])
    assert model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32)).logits.shape == (1, 18, len(tokenizer) + 1)


def test_processor_after_from_vision_text_pretrained_warns_only_when_true(tmp_path, caplog):
    """The README's sequence: the model adds <image> to the LM's vocabulary, then the processor is built from a
    fresh copy of the same tokenizer, which adds it again, under the same id."""
    make_tokenizer(image_token=False).save_pretrained(tmp_path / "llama")
    lm = AutoModelForCausalLM.from_config(text_config("llama", vocab_size=len(make_tokenizer(image_token=False))))
    lm.save_pretrained(tmp_path / "llama")
    AutoModel.from_config(vision_config("siglip")).save_pretrained(tmp_path / "siglip")
    model = BridgeVLMForConditionalGeneration.from_vision_text_pretrained(
        tmp_path / "siglip",
        tmp_path / "llama",
        {
            "model_type": "vlbridge_qformer",
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "num_query_tokens": 4,
        },
    ).eval()
    image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})

    def build_processor(**kwargs):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            processor = BridgeProcessor(
                image_processor,
                AutoTokenizer.from_pretrained(tmp_path / "llama"),
                num_image_tokens=model.config.num_image_tokens,
                **kwargs,
            )
        return processor, [r.getMessage() for r in caplog.records if "resize_token_embeddings" in r.getMessage()]

    processor, warnings = build_processor(image_token_id=model.config.image_token_id)
    assert not warnings  # the model already has <image>, under the id the processor gives it
    assert processor.image_token_id == model.config.image_token_id
    inputs = processor(images=make_images(1), text="<image> red", return_tensors="pt")
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]
    # Saved and reloaded, the processor's tokenizer holds <image> already: still no warning.
    processor.save_pretrained(tmp_path / "processor")
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        assert BridgeProcessor.from_pretrained(tmp_path / "processor").image_token_id == model.config.image_token_id
    assert "resize_token_embeddings" not in caplog.text

    # Not told the model's id, the processor cannot know, and the warning is true in general.
    assert build_processor()[1]
    with pytest.raises(ValueError, match="config.image_token_id"):
        build_processor(image_token_id=model.config.image_token_id - 1)
