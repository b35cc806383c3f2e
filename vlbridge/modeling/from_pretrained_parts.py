"""Build a VLM from a vision checkpoint and a language-model checkpoint saved separately (any tower, any LM)."""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging

from ..configuration import BridgeVLMConfig


logger = logging.get_logger(__name__)


def _vision_weights(vision_path: str, dtype) -> tuple[object, dict[str, torch.Tensor]]:
    """Vision config and weights from a vision-only checkpoint or the vision half of a CLIP / SigLIP checkpoint."""
    config = AutoConfig.from_pretrained(vision_path)
    full = AutoModel.from_pretrained(vision_path, dtype=dtype)
    if getattr(config, "vision_config", None) is not None and hasattr(full, "vision_model"):
        # A dual encoder (CLIPModel, SiglipModel): keep the image half.
        return config.vision_config, full.vision_model.state_dict()
    return config, full.state_dict()


def _text_weights(text_path: str, dtype):
    config = AutoConfig.from_pretrained(text_path)
    auto_class = (
        AutoModelForCausalLM if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModelForSeq2SeqLM
    )
    return config, auto_class.from_pretrained(text_path, dtype=dtype)


def _image_token(text_path: str, image_token: str) -> tuple[int, int]:
    """Id of `<image>` in the LM's tokenizer, adding it as a special token (at the end of the vocab) if missing."""
    tokenizer = AutoTokenizer.from_pretrained(text_path)
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
        new_id = tokenizer.convert_tokens_to_ids(image_token)
        logger.warning(
            f"Added {image_token!r} to the tokenizer of {text_path} as id {new_id}; build BridgeProcessor with this "
            "tokenizer, which adds it the same way."
        )
    return tokenizer.convert_tokens_to_ids(image_token), len(tokenizer)


def from_vision_text_pretrained(
    model_class,
    vision_path: str | os.PathLike,
    text_path: str | os.PathLike,
    bridge_config,
    image_token_id: int | None = None,
    image_token: str = "<image>",
    dtype: torch.dtype | None = None,
    **config_kwargs,
):
    """See [`BridgeVLMForConditionalGeneration.from_vision_text_pretrained`]."""
    vision_config, vision_state = _vision_weights(vision_path, dtype)
    text_config, text_model = _text_weights(text_path, dtype)
    if image_token_id is None:
        image_token_id, tokenizer_size = _image_token(text_path, image_token)
        if tokenizer_size > text_config.vocab_size:
            # Grow the source LM before the config is built: the config refuses an image_token_id past the
            # vocabulary. The new <image> row is never predicted: its input embedding is overwritten by image tokens.
            text_model.resize_token_embeddings(tokenizer_size)
            text_config.vocab_size = text_model.get_input_embeddings().num_embeddings
    if isinstance(bridge_config, dict):
        bridge_config = AutoConfig.for_model(**bridge_config)
    config = BridgeVLMConfig(
        vision_config=vision_config.to_dict(),
        bridge_config=bridge_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=image_token_id,
        **config_kwargs,
    )
    model = model_class(config)
    if dtype is not None:
        model.to(dtype)
        model.model.bridge.float()  # the bridge stays fp32, whatever the towers' dtype

    tower = model.model.vision_tower
    if all(k.startswith("vision_model.") for k in tower.state_dict()):  # towers that nest their transformer
        vision_state = {
            k if k.startswith("vision_model.") else f"vision_model.{k}": v for k, v in vision_state.items()
        }
    incompatible = tower.load_state_dict(vision_state, strict=False)
    if incompatible.missing_keys:
        raise ValueError(f"{vision_path} lacks vision weights {incompatible.missing_keys[:5]}...")
    base = getattr(text_model, text_model.base_model_prefix, text_model)
    incompatible = model.model.language_model.load_state_dict(base.state_dict(), strict=False)
    tied = {k.split(".", 1)[-1] for k in model.all_tied_weights_keys.values()} | {"embed_tokens.weight"}
    missing = [k for k in incompatible.missing_keys if not any(k.endswith(t) for t in tied)]
    if missing:
        raise ValueError(f"{text_path} lacks language-model weights {missing[:5]}...")
    model.lm_head.load_state_dict(text_model.get_output_embeddings().state_dict())
    model.tie_weights()
    logger.info(f"Built a VLM from {vision_path} (vision) and {text_path} (language); the bridge is new.")
    return model
