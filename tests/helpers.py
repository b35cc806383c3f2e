"""Helpers shared by test modules in several folders of tests/ (importable everywhere: pytest puts tests/ on the path).

Paths, the docstring-example runner, the tiny chat VLM and its processor, a tiny BLIP-2 / InstructBLIP source
checkpoint, a tiny stage-1 checkpoint, the LoRA "only the adapters changed" check, and headless-Chromium rendering.
"""

from __future__ import annotations

import doctest
import importlib
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tiny import EOS_ID, IMAGE_ID, make_tokenizer, text_config, vlm_config
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    PreTrainedTokenizerFast,
    SiglipImageProcessorPil,
)

from vlbridge import BridgeVLMForConditionalGeneration
from vlbridge.data import build_word_tokenizer, chat_vocabulary, make_synthetic_chat
from vlbridge.processing import BridgeProcessor


TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent  # the repository


# ---------------------------------------------------------------------------------------------------------------------
# Docstring examples
# ---------------------------------------------------------------------------------------------------------------------


class MarkdownDocTestParser(doctest.DocTestParser):
    """HF docstrings fence their examples in ```python ... ```; the fences are not expected output."""

    def parse(self, string, name="<string>"):
        return super().parse(re.sub(r"^[ \t]*```.*$", "", string, flags=re.M), name)


def run_doctests(name: str) -> doctest.TestResults:
    """The `>>>` examples of module `name`, fences stripped, with ELLIPSIS and NORMALIZE_WHITESPACE."""
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder(parser=MarkdownDocTestParser()).find(module, module.__name__):
        runner.run(test)
    return runner.summarize(verbose=False)


def run_docstring_examples(name: str) -> None:
    """Module `name` has `>>>` examples, and every one of them prints what it says."""
    result = run_doctests(name)
    assert result.attempted > 0, f"{name} has no runnable example"
    assert result.failed == 0


# ---------------------------------------------------------------------------------------------------------------------
# The tiny chat VLM (CLIP + Q-Former + Llama / OPT / T5) of the collator, TRL, LoRA, pipeline and evaluation tests
# ---------------------------------------------------------------------------------------------------------------------

CHAT_WORDS = chat_vocabulary() + ["system", "user", "assistant", ":", "photo"]
NUM_IMAGE_TOKENS = 4  # image tokens per image of the tiny Q-Former (num_query_tokens)


def make_chat_tokenizer(kind: str = "llama") -> PreTrainedTokenizerFast:
    """`llama`: <s> BOS, </s> EOS, <pad>; `opt`: BOS == EOS == </s>, as OPT's; `pad_is_eos`: Llama without pad."""
    tokenizer = build_word_tokenizer(CHAT_WORDS)
    if kind == "llama":
        return tokenizer
    if kind == "pad_is_eos":
        tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    backend = Tokenizer(models.WordLevel(tokenizer.get_vocab(), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", EOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="</s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )


def make_qformer_tokenizer() -> PreTrainedTokenizerFast:
    """BERT-like: [CLS] text [SEP], over the chat words."""
    vocab = {word: i for i, word in enumerate(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + CHAT_WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def make_processor(kind: str = "llama", qformer: bool = False) -> BridgeProcessor:
    """The tiny chat VLM's processor: 32x32 SigLIP-style images, the chat tokenizer of `kind`, optionally a Q-Former
    tokenizer (InstructBLIP text)."""
    return BridgeProcessor(
        SiglipImageProcessorPil(size={"height": 32, "width": 32}),
        make_chat_tokenizer(kind),
        qformer_tokenizer=make_qformer_tokenizer() if qformer else None,
        num_image_tokens=NUM_IMAGE_TOKENS,
    )


def make_model(text: str = "llama", seed: int = 0, **kwargs) -> BridgeVLMForConditionalGeneration:
    """The tiny chat VLM: CLIP vision tower, Q-Former bridge, the `text` language model, seeded."""
    torch.manual_seed(seed)
    model = BridgeVLMForConditionalGeneration(vlm_config("clip", "qformer", text, **kwargs))
    assert model.config.num_image_tokens == NUM_IMAGE_TOKENS
    return model


def chat_rows(n: int = 6, **kwargs) -> list[dict]:
    """`n` rows of the built-in synthetic chat data, 32x32 images."""
    data = make_synthetic_chat({"train": n}, image_size=32, **kwargs)["train"]
    return [data[i] for i in range(n)]


def spans(labels: list[int]) -> list[tuple[int, int]]:
    """The `[start, end)` runs of positions that carry loss."""
    runs, start = [], None
    for j, label in enumerate(list(labels) + [-100]):
        if label != -100 and start is None:
            start = j
        elif label == -100 and start is not None:
            runs.append((start, j))
            start = None
    return runs


def decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids])


def text_of(message: dict) -> str:
    """The text entries of a chat message, joined by spaces."""
    return " ".join(entry["text"] for entry in message["content"] if entry["type"] == "text")


# ---------------------------------------------------------------------------------------------------------------------
# A tiny, random BLIP-2 / InstructBLIP checkpoint made by transformers itself (the source of a conversion)
# ---------------------------------------------------------------------------------------------------------------------

NUM_QUERY = 4
BLIP2_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
BLIP2_QFORMER = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=96,
    max_position_embeddings=64,
)


def make_source(tmp_path: Path, family: str, text: str):
    """A `family` ("blip2" or "instructblip") model with the `text` language model, its weights perturbed, saved with
    its processor under `tmp_path / "source"`; returns `(model, directory)`."""
    torch.manual_seed(0)
    common = dict(
        vision_config=BLIP2_VISION,
        qformer_config=BLIP2_QFORMER,
        text_config=text_config(text).to_dict(),
        num_query_tokens=NUM_QUERY,
        image_token_index=IMAGE_ID,
    )
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    tokenizer = make_tokenizer()
    if family == "blip2":
        source = Blip2ForConditionalGeneration(Blip2Config(**common))
        processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=NUM_QUERY)
    else:
        source = InstructBlipForConditionalGeneration(InstructBlipConfig(**common))
        processor = InstructBlipProcessor(image_processor, tokenizer, make_tokenizer(), num_query_tokens=NUM_QUERY)
    for param in source.parameters():  # break the zero/one inits so a wrong mapping cannot hide
        param.data.add_(torch.randn_like(param) * 0.02)
    source_dir = tmp_path / "source"
    source.save_pretrained(source_dir)
    processor.save_pretrained(source_dir)
    return source.eval(), source_dir


# ---------------------------------------------------------------------------------------------------------------------
# A tiny stage-1 checkpoint
# ---------------------------------------------------------------------------------------------------------------------


def save_tiny_stage1(directory: Path, with_processor: bool = True) -> None:
    """A stage-1 model whose Q-Former has the tiny VLM's bridge sizes (its vision tower is CLIP-style, width 64),
    with, as the stage-1 recipe saves them, an image processor and a word-level tokenizer."""
    from transformers import CLIPImageProcessor

    from vlbridge.modeling import QFormerForImageTextPretraining, QFormerPretrainingConfig
    from vlbridge.scripts.tiny import TINY_BRIDGES

    bridge = {**TINY_BRIDGES["qformer"], "use_text_input": True, "vocab_size": 32, "max_position_embeddings": 16}
    vision = {
        "model_type": "vit",
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "image_size": 32,
        "patch_size": 8,
    }
    torch.manual_seed(1)
    config = QFormerPretrainingConfig(
        vision_config=vision,
        qformer_config=bridge,
        embed_dim=16,
        decoder_start_token_id=31,
        pad_token_id=0,
        eos_token_id=2,
    )
    QFormerForImageTextPretraining(config).save_pretrained(directory)
    if with_processor:
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
            directory
        )
        words = ["what", "colour", "shape", "is", "are", "the", "red", "blue", "circle", "square", "?"]
        build_word_tokenizer(words).save_pretrained(directory)


# ---------------------------------------------------------------------------------------------------------------------
# LoRA: only the adapters (and, when asked, the bridge) train
# ---------------------------------------------------------------------------------------------------------------------


def base_weights(peft_model) -> dict[str, torch.Tensor]:
    """The frozen base weights of a PEFT-wrapped vlbridge model, under the vlbridge model's own parameter names."""
    weights = {}
    for name, parameter in peft_model.named_parameters():
        if ".lora_" not in name and ".modules_to_save." not in name:
            key = name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")
            weights[key] = parameter
    return weights


def assert_only_adapters_changed(before: dict, peft_model, bridge_trained: bool) -> None:
    """Base weights (vision tower, language model, original bridge) bit-unchanged; every LoRA B changed from its zero
    start; the trained bridge / projection copies changed iff `bridge_trained` (they exist only then)."""
    base = base_weights(peft_model)
    assert sorted(base) == sorted(before)
    changed = [name for name, value in before.items() if not torch.equal(base[name], value)]
    assert not changed, f"base weights changed: {changed}"
    named = dict(peft_model.named_parameters())
    lora_b = [p for n, p in named.items() if ".lora_B." in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b), "a LoRA B matrix did not train"
    copies = {n: p for n, p in named.items() if ".modules_to_save.default." in n}
    assert bool(copies) == bridge_trained
    if bridge_trained:
        originals = {
            n: before[n.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")] for n in copies
        }
        assert all(not torch.equal(p, originals[n]) for n, p in copies.items() if "language_projection" in n)
        assert any(not torch.equal(p, originals[n]) for n, p in copies.items() if ".bridge." in n)


# ---------------------------------------------------------------------------------------------------------------------
# Rendering an HTML page in headless Chromium (Debian's `chromium` package)
# ---------------------------------------------------------------------------------------------------------------------


def screenshot(page: Path, out: Path, profile: Path) -> np.ndarray:
    """Renders `page` in headless Chromium (isolated profile, no network services) and returns the RGB pixels."""
    command = [
        shutil.which("chromium"),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--screenshot={out}",
        "--window-size=1200,1600",
        page.resolve().as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert out.exists(), f"chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-2000:]}"
    with Image.open(out) as image:
        return np.asarray(image.convert("RGB"))


def coloured_share(pixels: np.ndarray) -> float:
    """Share of strongly coloured pixels: plot lines and the built-in shapes, never text, borders or background."""
    spread = pixels.max(axis=-1).astype(int) - pixels.min(axis=-1).astype(int)
    return float((spread > 100).mean())
