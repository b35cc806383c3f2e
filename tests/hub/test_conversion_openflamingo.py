"""OpenFlamingo checkpoints convert exactly: OpenFlamingo's own `Flamingo` (its `FlamingoLMMixin` wrapping a tiny
transformers Llama / OPT, its Perceiver Resampler, random non-zero gates) and the converted vlbridge model give the
same logits (1e-4) on interleaved inputs with one and two images per sample and the same greedy tokens; the key
mapping and every refusal of a checkpoint that does not fit are tested on their own."""

import logging
from types import SimpleNamespace

import pytest
import torch
from helpers import run_docstring_examples
from openflamingo_reference import load_openflamingo_package
from tiny import WORDS, make_images, text_config, vision_config
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
)

from vlbridge import BridgeVLMForConditionalGeneration
from vlbridge.conversion import convert_checkpoint, convert_openflamingo_checkpoint
from vlbridge.conversion.openflamingo import (
    load_openflamingo_state_dict,
    openflamingo_gated_cross_attention_state_dict,
)


VISION_WIDTH = 32  # the tiny CLIP's hidden size: OpenFlamingo's vis_dim, the Perceiver's width
PERCEIVER = dict(num_latents=4, perceiver_depth=2, perceiver_num_heads=4, perceiver_head_dim=8)
# family -> (OpenFlamingo's decoder_layers_attr_name, depth, cross_attn_every_n_layers, open_clip ln_post on tokens,
#            checkpoint layout). Llama: untied head, no pad token (OpenFlamingo adds <PAD>), a full DDP state dict;
#            OPT: tied head, pad token, what OpenFlamingo's training script saves.
FAMILIES = {
    "llama": ("model.layers", 2, 1, False, "full"),
    "opt": ("model.decoder.layers", 4, 2, True, "trainable"),
}
TEXTS_ONE = ["<image> a red circle <|endofchunk|>", "<image> two blue squares next to the"]
TEXTS_TWO = [
    "<image> a red circle <|endofchunk|> <image> a",
    "<image> the green star <|endofchunk|> <image> two",
]
TEXTS_MIXED = ["<image> a red circle above the blue", "<image> a red star <|endofchunk|> <image> a green"]


def make_tokenizer(with_pad: bool) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with BOS, with or without a pad token, and without <image> (OpenFlamingo adds it)."""
    vocab = {word: i for i, word in enumerate(dict.fromkeys(["<pad>", "<unk>", "<s>", "</s>", *WORDS]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>" if with_pad else None,
    )


def perturb(module: nn.Module, scale: float = 0.1) -> None:
    """Random weights everywhere (a wrong mapping cannot hide behind LayerNorm ones / zeros)."""
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * scale)


def save_backbones(directory, family: str) -> tuple[str, str]:
    """The tiny language model (with its tokenizer) and CLIP vision model (with its image processor) OpenFlamingo
    is built from, saved as their releases would be; returns `(vision_path, text_path)`."""
    _, depth, _, _, _ = FAMILIES[family]
    tokenizer = make_tokenizer(with_pad=family != "llama")
    config = text_config(family, vocab_size=len(tokenizer))
    config.num_hidden_layers = depth
    language_model = AutoModelForCausalLM.from_config(config)
    perturb(language_model, 0.3)
    text_path, vision_path = directory / f"{family}-lm", directory / "clip"
    language_model.save_pretrained(text_path)
    tokenizer.save_pretrained(text_path)
    if not vision_path.exists():
        tower = CLIPVisionModel(vision_config("clip", hidden_size=VISION_WIDTH))  # 32 px, patch 8: CLS + 16 patches
        perturb(tower)  # post_layernorm too, so that applying it or not shows
        tower.save_pretrained(vision_path)
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
            vision_path
        )
    return str(vision_path), str(text_path)


class OpenClipStyleVisual(nn.Module):
    """What `Flamingo` calls as `vision_encoder.visual`: open_clip's `VisionTransformer` with `output_tokens=True`,
    returning `(pooled, tokens)`, the tokens being the last layer's patches (CLS dropped), after `ln_post` from
    open_clip 2.23 on (`post_layernorm`), before it until then. Built on the same CLIP tower the converted model loads.
    """

    def __init__(self, tower: CLIPVisionModel, post_layernorm: bool):
        super().__init__()
        self.tower, self.post_layernorm = tower, post_layernorm

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.tower(pixel_values=pixel_values).last_hidden_state  # (N, 1 + P, D)
        if self.post_layernorm:
            # transformers 5.24 flattened `CLIPVisionModel.vision_model` into the model itself.
            hidden = getattr(self.tower, "vision_model", self.tower).post_layernorm(hidden)
        return hidden[:, 0], hidden[:, 1:]


def build_openflamingo(vision_path: str, text_path: str, family: str, seed: int = 0):
    """OpenFlamingo's model as `factory.create_model_and_transforms` builds it (open_clip aside), with a small
    Perceiver and every trained weight random, gates included; returns `(flamingo, tokenizer)`."""
    reference = load_openflamingo_package()
    layers_attr, _, every, post_layernorm, _ = FAMILIES[family]
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(text_path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    lang_encoder = AutoModelForCausalLM.from_pretrained(text_path)
    reference.utils.extend_instance(lang_encoder, reference.flamingo_lm.FlamingoLMMixin)
    lang_encoder.set_decoder_layers_attr_name(layers_attr)
    lang_encoder.resize_token_embeddings(len(tokenizer))
    visual = OpenClipStyleVisual(CLIPVisionModel.from_pretrained(vision_path), post_layernorm)
    flamingo = reference.flamingo.Flamingo(
        SimpleNamespace(visual=visual),
        lang_encoder,
        tokenizer.encode("<|endofchunk|>")[-1],
        tokenizer.encode("<image>")[-1],
        vis_dim=VISION_WIDTH,
        cross_attn_every_n_layers=every,
    )
    flamingo.perceiver = reference.helpers.PerceiverResampler(
        dim=VISION_WIDTH, depth=2, dim_head=8, heads=4, num_latents=4
    )
    perturb(flamingo.perceiver)
    perturb(lang_encoder.gated_cross_attn_layers)
    perturb(lang_encoder.get_input_embeddings())
    with torch.no_grad():
        for block in lang_encoder.gated_cross_attn_layers:
            if block is not None:  # tanh(gate) well away from 0: the blocks change the logits
                block.attn_gate.fill_(float(torch.empty(1).uniform_(0.5, 1.5)) * (-1) ** int(torch.randint(2, ())))
                block.ff_gate.fill_(float(torch.empty(1).uniform_(0.5, 1.5)))
    return flamingo.eval(), tokenizer


def trainable_state_dict(flamingo) -> dict[str, torch.Tensor]:
    """The state OpenFlamingo's training script saves: everything but the frozen parameters (the input embeddings
    always stay), without the duplicate names under `old_decoder_blocks` / `gated_cross_attn_layers` and without the
    vision encoder; so the blocks appear as `<decoder layers>.{i}.gated_cross_attn_layer.*`."""
    flamingo.requires_grad_(False)
    flamingo.perceiver.requires_grad_(True)
    flamingo.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    flamingo.lang_encoder.get_input_embeddings().requires_grad_(True)
    state = flamingo.state_dict()
    for name, param in flamingo.named_parameters():
        if "embed" not in name and not param.requires_grad:
            state.pop(name, None)
    duplicates = ("lang_encoder.old_decoder_blocks", "lang_encoder.gated_cross_attn_layers", "vision_encoder")
    return {key: value for key, value in state.items() if not key.startswith(duplicates)}


def save_checkpoint(flamingo, directory, layout: str):
    """`full`: `Flamingo.state_dict()` of a DDP run, nested as a training checkpoint; `trainable`: as released."""
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "full":
        state = {f"module.{key}": value for key, value in flamingo.state_dict().items()}
        checkpoint = {"model_state_dict": state, "epoch": 2}
    else:
        checkpoint = trainable_state_dict(flamingo)
    path = directory / "checkpoint.pt"
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def converted(request, tmp_path_factory):
    """OpenFlamingo's model for a family, its checkpoint, and the conversion of that checkpoint."""
    family = request.param
    _, _, every, post_layernorm, layout = FAMILIES[family]
    root = tmp_path_factory.mktemp(f"openflamingo-{family}")
    vision_path, text_path = save_backbones(root, family)
    flamingo, tokenizer = build_openflamingo(vision_path, text_path, family)
    checkpoint = save_checkpoint(flamingo, root / "release", layout)
    model, processor = convert_openflamingo_checkpoint(
        checkpoint,
        vision_path,
        text_path,
        root / "converted",
        cross_attention_every_n_layers=every,
        vision_feature_post_layernorm=post_layernorm,
        **PERCEIVER,
    )
    return SimpleNamespace(
        family=family, flamingo=flamingo, tokenizer=tokenizer, model=model, processor=processor, root=root
    )


def inputs_for(processor, texts: list[str], images_per_text: list[int], seed: int = 0):
    """The processor's batch and OpenFlamingo's `vision_x` `(B, T_img, 1, C, H, W)` for the same images; a sample
    with fewer images than `T_img` gets a blank one that its text never reaches (OpenFlamingo needs a full tensor)."""
    images = make_images(sum(images_per_text), seed=seed)
    per_text, start = [], 0
    for count in images_per_text:
        per_text.append(images[start : start + count])
        start += count
    batch = processor(text=texts, images=per_text, padding=True, return_tensors="pt")
    most = max(images_per_text)
    vision_x = torch.zeros(len(texts), most, 1, *batch["pixel_values"].shape[1:])
    start = 0
    for row, count in enumerate(images_per_text):
        vision_x[row, :count, 0] = batch["pixel_values"][start : start + count]
        start += count
    return batch, vision_x


@torch.no_grad()
@pytest.mark.parametrize(
    "texts, images_per_text", [(TEXTS_ONE, [1, 1]), (TEXTS_TWO, [2, 2]), (TEXTS_MIXED, [1, 2])], ids=["1", "2", "1+2"]
)
def test_logits_match_openflamingo(converted, texts, images_per_text):
    batch, vision_x = inputs_for(converted.processor, texts, images_per_text)
    # The converted processor tokenizes as OpenFlamingo's tokenizer does: one <image> token per image.
    expected_ids = converted.tokenizer(texts, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected_ids["input_ids"])
    ours = converted.model(**batch).logits
    theirs = converted.flamingo(vision_x, batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
    # The images matter (the gates are open): the same text with other images gives other logits.
    other, _ = inputs_for(converted.processor, texts, images_per_text, seed=1)
    assert not torch.allclose(converted.model(**other).logits[real], ours[real], atol=1e-3)


@torch.no_grad()
def reference_greedy(flamingo, vision_x, input_ids, steps, image_token_id, end_id, pad_id):
    """Greedy decoding with OpenFlamingo, no cache: the whole sequence again at each step. `<image>` is never picked,
    as vlbridge's `generate` suppresses it (a generated marker would ask for an image that is not there)."""
    sequence, done = input_ids, torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        logits = flamingo(vision_x, sequence, attention_mask=torch.ones_like(sequence)).logits[:, -1]
        logits[:, image_token_id] = -float("inf")
        token = torch.where(done, pad_id, logits.argmax(-1))
        sequence = torch.cat([sequence, token[:, None]], dim=1)
        done |= token == end_id
        if done.all():
            break
    return sequence


@pytest.mark.parametrize("texts, images_per_text", [(TEXTS_ONE[:1], [1]), (TEXTS_TWO, [2, 2])], ids=["1", "2"])
def test_greedy_generation_matches_openflamingo(converted, texts, images_per_text):
    batch, vision_x = inputs_for(converted.processor, texts, images_per_text)
    assert bool(batch["attention_mask"].all()), "prompts of one length: no padding, so positions agree"
    ours = converted.model.generate(**batch, do_sample=False, max_new_tokens=5)
    config = converted.model.generation_config
    theirs = reference_greedy(
        converted.flamingo,
        vision_x,
        batch["input_ids"],
        5,
        converted.model.config.image_token_id,
        config.eos_token_id,
        config.pad_token_id,
    )
    assert ours.tolist() == theirs.tolist()


def test_converted_folder_reloads_exactly(converted):
    model = BridgeVLMForConditionalGeneration.from_pretrained(converted.root / "converted").eval()
    processor = AutoProcessor.from_pretrained(converted.root / "converted")
    batch, _ = inputs_for(processor, TEXTS_TWO, [2, 2])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, converted.model(**batch).logits)
    tokens = ("<|endofchunk|>", "<image>", "<PAD>" if converted.family == "llama" else "<pad>")
    assert processor.tokenizer.convert_tokens_to_ids(list(tokens)) == converted.tokenizer.convert_tokens_to_ids(
        list(tokens)
    )
    assert model.config.image_fusion == "gated_cross_attention" and model.config.num_image_tokens == 1
    assert model.config.vision_feature_select == "patches"
    assert model.generation_config.eos_token_id == converted.tokenizer.convert_tokens_to_ids("<|endofchunk|>")


# ---------------------------------------------------------------------------------------------------------------------
# The key mapping, and each checkpoint the converter refuses (synthetic checkpoints: no OpenFlamingo needed)
# ---------------------------------------------------------------------------------------------------------------------


def block_weights(hidden: int, media: int, inner: int = 512, ff_mult: int = 4) -> dict[str, torch.Tensor]:
    """One OpenFlamingo `GatedCrossAttentionBlock`'s state dict (8 heads of 64, as `Flamingo` builds them)."""
    return {
        "attn.norm.weight": torch.randn(hidden),
        "attn.norm.bias": torch.randn(hidden),
        "attn.to_q.weight": torch.randn(inner, hidden),
        "attn.to_kv.weight": torch.randn(2 * inner, media),
        "attn.to_out.weight": torch.randn(hidden, inner),
        "attn_gate": torch.randn(1),
        "ff.0.weight": torch.randn(hidden),
        "ff.0.bias": torch.randn(hidden),
        "ff.1.weight": torch.randn(ff_mult * hidden, hidden),
        "ff.3.weight": torch.randn(hidden, ff_mult * hidden),
        "ff_gate": torch.randn(1),
    }


def perceiver_weights(width: int = VISION_WIDTH, depth: int = 2, latents: int = 4, inner: int = 32):
    """An OpenFlamingo `PerceiverResampler`'s state dict under `perceiver.`."""
    state = {"perceiver.latents": torch.randn(latents, width)}
    for i in range(depth):
        for norm in ("0.norm_media", "0.norm_latents", "1.0"):
            state[f"perceiver.layers.{i}.{norm}.weight"] = torch.randn(width)
            state[f"perceiver.layers.{i}.{norm}.bias"] = torch.randn(width)
        state[f"perceiver.layers.{i}.0.to_q.weight"] = torch.randn(inner, width)
        state[f"perceiver.layers.{i}.0.to_kv.weight"] = torch.randn(2 * inner, width)
        state[f"perceiver.layers.{i}.0.to_out.weight"] = torch.randn(width, inner)
        state[f"perceiver.layers.{i}.1.1.weight"] = torch.randn(4 * width, width)
        state[f"perceiver.layers.{i}.1.3.weight"] = torch.randn(width, 4 * width)
    state["perceiver.norm.weight"], state["perceiver.norm.bias"] = torch.randn(width), torch.randn(width)
    return state


def test_block_keys_map_to_vlbridge_names_and_to_kv_is_split():
    block = block_weights(hidden=16, media=8)
    state = {f"lang_encoder.gated_cross_attn_layers.3.{key}": value for key, value in block.items()}
    state["lang_encoder.model.layers.3.decoder_layer.mlp.up_proj.weight"] = torch.zeros(2)  # not a block: ignored
    converted = openflamingo_gated_cross_attention_state_dict(state)
    assert sorted(converted) == sorted(
        f"3.{name}"
        for name in (
            "attention_layernorm.weight",
            "attention_layernorm.bias",
            "attention.q_proj.weight",
            "attention.k_proj.weight",
            "attention.v_proj.weight",
            "attention.o_proj.weight",
            "attention_gate",
            "mlp_layernorm.weight",
            "mlp_layernorm.bias",
            "mlp.fc1.weight",
            "mlp.fc2.weight",
            "mlp_gate",
        )
    )
    assert torch.equal(converted["3.attention.k_proj.weight"], block["attn.to_kv.weight"][:512])
    assert torch.equal(converted["3.attention.v_proj.weight"], block["attn.to_kv.weight"][512:])
    assert converted["3.mlp.fc2.weight"] is block["ff.3.weight"]
    assert converted["3.mlp_gate"] is block["ff_gate"]


def test_both_aliases_of_a_block_are_one_block_and_must_agree():
    block = block_weights(hidden=16, media=8)
    state = {f"lang_encoder.gated_cross_attn_layers.0.{key}": value for key, value in block.items()}
    state.update({f"lang_encoder.transformer.blocks.0.gated_cross_attn_layer.{k}": v for k, v in block.items()})
    assert len(openflamingo_gated_cross_attention_state_dict(state)) == 12
    state["lang_encoder.transformer.blocks.0.gated_cross_attn_layer.attn_gate"] = torch.ones(1) * 7
    with pytest.raises(ValueError, match="two different 'attn_gate'"):
        openflamingo_gated_cross_attention_state_dict(state)


def test_unknown_and_missing_block_keys_are_refused():
    block = block_weights(hidden=16, media=8)
    prefix = "lang_encoder.gated_cross_attn_layers.0."
    state = {f"{prefix}{key}": value for key, value in block.items()}
    with pytest.raises(ValueError, match="not OpenFlamingo GatedCrossAttentionBlock weights"):
        openflamingo_gated_cross_attention_state_dict(
            {**state, "lang_encoder.gated_cross_attn_layers.0.x": block["ff_gate"]}
        )
    del state["lang_encoder.gated_cross_attn_layers.0.ff.3.weight"]
    with pytest.raises(ValueError, match=r"lacks \['ff.3.weight'\]"):
        openflamingo_gated_cross_attention_state_dict(state)


def test_docstring_examples_run():
    run_docstring_examples("vlbridge.conversion.openflamingo")


def test_training_checkpoints_are_unwrapped(tmp_path):
    state = {
        "model_state_dict": {"module.lang_encoder._fsdp_wrapped_module.a._checkpoint_wrapped_module.b": torch.ones(1)}
    }
    torch.save(state, tmp_path / "checkpoint.pt")
    for source in (state, tmp_path / "checkpoint.pt", tmp_path):
        assert list(load_openflamingo_state_dict(source)) == ["lang_encoder.a.b"]
    with pytest.raises(ValueError, match="is a int, not a tensor"):
        load_openflamingo_state_dict({"perceiver.latents": torch.ones(1), "epoch": 3})


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """A tiny Llama (2 layers, untied head) and CLIP, saved; and a matching synthetic OpenFlamingo checkpoint with a
    block before every layer."""
    root = tmp_path_factory.mktemp("openflamingo-synthetic")
    torch.manual_seed(0)
    vision_path, text_path = save_backbones(root, "llama")
    tokenizer = make_tokenizer(with_pad=False)
    rows = len(tokenizer) + 3  # <|endofchunk|>, <image>, <PAD>
    state = perceiver_weights()
    for layer in range(2):
        for key, value in block_weights(hidden=32, media=VISION_WIDTH).items():
            state[f"lang_encoder.model.layers.{layer}.gated_cross_attn_layer.{key}"] = value
    state["lang_encoder.model.embed_tokens.weight"] = torch.randn(rows, 32)
    return SimpleNamespace(vision_path=vision_path, text_path=text_path, state=state, root=root)


def convert(backbones, state, **kwargs):
    kwargs = {"cross_attention_every_n_layers": 1, **PERCEIVER, **kwargs}
    return convert_openflamingo_checkpoint(state, backbones.vision_path, backbones.text_path, **kwargs)


def test_a_synthetic_checkpoint_converts_and_logs_what_it_loaded(backbones, caplog):
    with caplog.at_level(logging.INFO, logger="vlbridge.conversion.openflamingo"):
        model, processor = convert(backbones, backbones.state)
    assert "2 gated blocks before layers [0, 1]" in caplog.text
    embeddings = backbones.state["lang_encoder.model.embed_tokens.weight"]
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    assert "no lm_head" in caplog.text  # untied, and not in the checkpoint: its added rows are new
    # <|endofchunk|>, <image>, <PAD>: OpenFlamingo's order.
    assert processor.image_token_id == model.config.image_token_id == len(processor.tokenizer) - 2
    assert model.generation_config.eos_token_id == len(processor.tokenizer) - 3
    assert processor.tokenizer.pad_token == "<PAD>"

    head = torch.randn_like(embeddings)  # a full state dict carries the untied head, new rows included
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vlbridge.conversion.openflamingo"):
        model, _ = convert(backbones, {**backbones.state, "lang_encoder.lm_head.weight": head})
    assert torch.equal(model.lm_head.weight, head) and "lm_head (lang_encoder.lm_head.weight)" in caplog.text


def test_blocks_at_other_layers_are_refused_with_the_interval_that_fits(backbones):
    with pytest.raises(ValueError, match="pass cross_attention_every_n_layers=1"):
        convert(backbones, backbones.state, cross_attention_every_n_layers=2)
    state = {k: v for k, v in backbones.state.items() if ".layers.0.gated" not in k}  # only before layer 1
    with pytest.raises(ValueError, match="pass cross_attention_every_n_layers=2"):
        convert(backbones, state)


@pytest.mark.parametrize(
    "drop, match",
    [
        ("perceiver.", "no Perceiver weights"),
        ("gated_cross_attn_layer.", "no gated cross-attention blocks"),
        ("perceiver.layers.1.0.to_out", r"Perceiver Resampler does not fit .* missing \['layers.1.attention.o_proj"),
        ("layers.1.gated_cross_attn_layer.ff_gate", r"lacks \['ff_gate'\]"),
    ],
)
def test_missing_weights_are_refused(backbones, drop, match):
    state = {key: value for key, value in backbones.state.items() if drop not in key}
    with pytest.raises(ValueError, match=match):
        convert(backbones, state)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_latents": 8}, "num_latents=4"),
        ({"perceiver_depth": 3}, "perceiver_depth=2"),
        ({"cross_attention_num_heads": 4}, "gated cross-attention does not fit .* shapes"),
    ],
)
def test_shape_mismatches_are_refused_with_the_checkpoints_sizes(backbones, kwargs, match):
    with pytest.raises(ValueError, match=match):
        convert(backbones, backbones.state, **kwargs)


def test_embeddings_of_another_tokenizer_are_refused(backbones):
    state = {**backbones.state, "lang_encoder.model.embed_tokens.weight": torch.randn(len(make_tokenizer(False)), 32)}
    with pytest.raises(ValueError, match="ids would not line up"):
        convert(backbones, state)


def test_language_model_weights_other_than_text_paths_are_refused(backbones):
    language_model = AutoModelForCausalLM.from_pretrained(backbones.text_path)
    frozen = {}
    for key, value in language_model.state_dict().items():
        if key.startswith("model.layers."):
            index, rest = key.removeprefix("model.layers.").split(".", 1)
            frozen[f"lang_encoder.model.layers.{index}.decoder_layer.{rest}"] = value
            frozen[f"lang_encoder.old_decoder_blocks.{index}.{rest}"] = value
    convert(backbones, {**backbones.state, **frozen})  # equal to text_path's: accepted
    changed = dict(frozen)
    key = "lang_encoder.model.layers.1.decoder_layer.mlp.down_proj.weight"
    changed[key] = changed[key] + 1e-2
    with pytest.raises(ValueError, match="differ from those of"):
        convert(backbones, {**backbones.state, **changed})


def test_the_dispatcher_names_the_openflamingo_converter(backbones):
    torch.save(backbones.state, backbones.root / "checkpoint.pt")
    for source in (backbones.root / "checkpoint.pt", backbones.root):
        with pytest.raises(ValueError, match="convert_openflamingo_checkpoint"):
            convert_checkpoint(source)
