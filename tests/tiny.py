"""Tiny configs, tokenizers and images built in-process, so that no test downloads anything."""

from __future__ import annotations

import numpy as np
from PIL import Image
from transformers import AutoConfig

from vlbridge import BridgeVLMConfig, QFormerPretrainingConfig
from vlbridge.data import build_word_tokenizer


WORDS = (
    "a an the of and is are in on left right above below next to with what how many colour color shape "
    "red green blue yellow white black purple orange circle circles square squares triangle triangles star "
    "small large big one two three four picture image photo shows there describe question answer user "
    "assistant system : ? . , yes no"
).split()
PAD_ID, UNK_ID, BOS_ID, EOS_ID, IMAGE_ID = range(5)
VOCAB_SIZE = 96  # >= len(SPECIAL_TOKENS) + len(WORDS), rounded up


def make_tokenizer(padding_side: str = "right", add_bos: bool = True, image_token: bool = True):
    """A word-level tokenizer over a fixed vocabulary with `<image>` as a special token (unless told otherwise)."""
    tokenizer = build_word_tokenizer(WORDS, padding_side=padding_side, add_bos=add_bos, image_token=image_token)
    assert len(tokenizer) <= VOCAB_SIZE
    return tokenizer


def vision_config(kind: str = "clip", image_size: int = 32, patch_size: int = 8, hidden_size: int = 32):
    model_type = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}[kind]
    return AutoConfig.for_model(
        model_type,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )


def text_config(kind: str = "opt", hidden_size: int = 32, vocab_size: int = VOCAB_SIZE):
    common = dict(vocab_size=vocab_size, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    if kind == "opt":
        return AutoConfig.for_model(
            "opt",
            hidden_size=hidden_size,
            word_embed_proj_dim=hidden_size,
            ffn_dim=2 * hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            **common,
        )
    if kind == "llama":
        return AutoConfig.for_model(
            "llama",
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **common,
        )
    if kind == "t5":
        return AutoConfig.for_model(
            "t5",
            d_model=hidden_size,
            d_kv=8,
            d_ff=2 * hidden_size,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=PAD_ID,
            **common,
        )
    raise ValueError(kind)


def bridge_config(kind: str = "qformer", hidden_size: int = 32, **overrides):
    if kind == "qformer":
        kwargs = dict(
            model_type="vlbridge_qformer",
            hidden_size=hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=2 * hidden_size,
            num_query_tokens=4,
            vocab_size=VOCAB_SIZE,
            max_position_embeddings=64,
        )
    elif kind == "perceiver":
        kwargs = dict(
            model_type="vlbridge_perceiver",
            hidden_size=hidden_size,
            num_latents=4,
            num_hidden_layers=2,
            num_attention_heads=4,
            head_dim=8,
        )
    elif kind == "mlp":
        kwargs = dict(model_type="vlbridge_mlp", hidden_size=hidden_size, drop_cls_token=True)
    else:
        raise ValueError(kind)
    kwargs.update(overrides)
    return AutoConfig.for_model(**kwargs)


def vlm_config(vision: str = "clip", bridge: str = "qformer", text: str = "opt", **kwargs) -> BridgeVLMConfig:
    # SigLIP has no CLS token for the MLP projector to drop.
    bridge_overrides = {"drop_cls_token": False} if (bridge == "mlp" and vision == "siglip") else {}
    return BridgeVLMConfig(
        vision_config=vision_config(vision),
        bridge_config=bridge_config(bridge, **bridge_overrides),
        text_config=text_config(text),
        image_token_id=IMAGE_ID,
        **kwargs,
    )


def stage1_config(**kwargs) -> QFormerPretrainingConfig:
    """A tiny stage-1 config on the tiny tokenizer's ids ([DEC] is the last id of the vocabulary)."""
    defaults = dict(
        vision_config=vision_config(),
        qformer_config=bridge_config("qformer"),
        embed_dim=16,
        decoder_start_token_id=VOCAB_SIZE - 1,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
    )
    return QFormerPretrainingConfig(**{**defaults, **kwargs})


# The TrainingArguments every TRL test on CPU shares: TRL's own truncation off (`max_length=None`, so no image token
# is ever cut), no mixed precision or checkpointing, nothing saved or reported.
TRL_CPU_ARGS = dict(
    max_length=None,
    use_cpu=True,
    report_to="none",
    bf16=False,
    gradient_checkpointing=False,
    save_strategy="no",
)


def sft_config(output_dir, **kwargs):
    """TRL's `SFTConfig` for a tiny CPU run: `TRL_CPU_ARGS`, loss on the assistant's answers only, batch 4."""
    import trl

    return trl.SFTConfig(
        str(output_dir), **{"per_device_train_batch_size": 4, "assistant_only_loss": True, **TRL_CPU_ARGS, **kwargs}
    )


def make_images(n: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
