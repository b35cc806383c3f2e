"""
The tiny models the training scripts build in code when no checkpoint is given: a CLIP-style ViT, a bridge and a
Llama of width 64, over a word-level tokenizer of the built-in data (everything in-process, nothing downloaded).
"""

from __future__ import annotations

from ..configuration import BridgeVLMConfig


TINY_BRIDGES = {
    "qformer": {
        "model_type": "vlbridge_qformer",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "num_query_tokens": 8,
        "use_text_input": False,
    },
    "perceiver": {
        "model_type": "vlbridge_perceiver",
        "hidden_size": 64,
        "num_latents": 8,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "head_dim": 16,
    },
    "mlp": {"model_type": "vlbridge_mlp", "hidden_size": 64, "drop_cls_token": True},
}


def tiny_text_config(tokenizer) -> dict:
    """
    The training scripts' tiny language model: a 2-layer Llama of width 64 over `tokenizer`'s vocabulary.

    Args:
        tokenizer ([`PreTrainedTokenizerBase`]): Gives the vocabulary size and the pad / BOS / EOS ids.

    Example:

    ```python
    >>> from vlbridge.data import build_word_tokenizer
    >>> from vlbridge.scripts.tiny import tiny_text_config
    >>> config = tiny_text_config(build_word_tokenizer(["a", "red", "circle"]))
    >>> config["model_type"], config["hidden_size"], config["num_hidden_layers"]
    ('llama', 64, 2)
    ```
    """
    return {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


# The tiny VLM's gated cross-attention (Flamingo fusion): a block before each of the tiny LM's 2 layers, heads of
# width 16 as the LM's own.
TINY_CROSS_ATTENTION = {
    "cross_attention_every_n_layers": 1,
    "cross_attention_num_heads": 4,
    "cross_attention_head_dim": 16,
}


def tiny_vlm(bridge: str, tokenizer, image_fusion: str = "tokens"):
    """
    A randomly initialised tiny [`BridgeVLMForConditionalGeneration`]: a 2-layer CLIP-style ViT on 32-px images
    (patches of 8), the `bridge` of [`TINY_BRIDGES`] and the [`tiny_text_config`] Llama.

    Args:
        bridge (`str`): `"qformer"`, `"perceiver"` or `"mlp"`.
        tokenizer ([`PreTrainedTokenizerBase`]): Must have an image token (`vlbridge.data.build_word_tokenizer`).
        image_fusion (`str`, *optional*, defaults to `"tokens"`): `"tokens"` (placeholders) or
            `"gated_cross_attention"` (Flamingo: [`TINY_CROSS_ATTENTION`] blocks before the LM's layers).

    Example:

    ```python
    >>> from vlbridge.data import build_word_tokenizer
    >>> from vlbridge.scripts.tiny import tiny_vlm
    >>> model = tiny_vlm("perceiver", build_word_tokenizer(["a", "red", "circle"]))
    >>> model.config.num_image_tokens
    8
    ```
    """
    from ..modeling import BridgeVLMForConditionalGeneration

    if bridge not in TINY_BRIDGES:
        raise ValueError(f"Unknown bridge {bridge!r}; choose one of {sorted(TINY_BRIDGES)}.")
    config = BridgeVLMConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        bridge_config=TINY_BRIDGES[bridge],
        text_config=tiny_text_config(tokenizer),
        image_token_id=tokenizer.image_token_id,
        image_fusion=image_fusion,
        **(TINY_CROSS_ATTENTION if image_fusion == "gated_cross_attention" else {}),
    )
    return BridgeVLMForConditionalGeneration(config)


__all__ = ["TINY_BRIDGES", "TINY_CROSS_ATTENTION", "tiny_text_config", "tiny_vlm"]
