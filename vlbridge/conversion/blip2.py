"""Turn a transformers BLIP-2 / InstructBLIP checkpoint directory into a vlbridge checkpoint (processor included)."""

from __future__ import annotations

import os

import torch
from transformers import (
    AutoConfig,
    AutoProcessor,
    Blip2ForConditionalGeneration,
    InstructBlipForConditionalGeneration,
)
from transformers.utils import logging

from ..configuration import BridgeVLMConfig
from ..modeling import BridgeVLMForConditionalGeneration
from ..processing import BridgeProcessor
from .qformer import qformer_config_from_blip2, qformer_state_dict_from_blip2


logger = logging.get_logger(__name__)

SOURCE_CLASSES = {"blip-2": Blip2ForConditionalGeneration, "instructblip": InstructBlipForConditionalGeneration}


def _vlbridge_config(source_config) -> BridgeVLMConfig:
    is_instruct = source_config.model_type == "instructblip"
    if source_config.image_token_index is None:
        raise ValueError(
            "This checkpoint predates image-token expansion (image_token_index is None). Load it with transformers, "
            "add '<image>' to its tokenizer, set config.image_token_index, save it, and convert that directory."
        )
    qformer_config = qformer_config_from_blip2(
        source_config, source_config.num_query_tokens, use_text_input=is_instruct
    )
    return BridgeVLMConfig(
        vision_config=source_config.vision_config.to_dict(),
        bridge_config=qformer_config.to_dict(),
        text_config=source_config.text_config.to_dict(),
        image_token_id=source_config.image_token_index,
        use_qformer_text_input=is_instruct,
        tie_word_embeddings=bool(getattr(source_config.text_config, "tie_word_embeddings", True)),
    )


def _load_language_model(model: BridgeVLMForConditionalGeneration, source_lm) -> None:
    """Copies a `...ForCausalLM` / `...ForConditionalGeneration` into the base LM plus `lm_head`."""
    base = getattr(source_lm, source_lm.base_model_prefix, source_lm)
    target = model.model.language_model
    wanted = target.state_dict().keys()
    state = {k: v for k, v in base.state_dict().items() if k in wanted}
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ValueError(f"The source language model lacks {missing[:5]}; is it the architecture its config names?")
    target.load_state_dict(state)
    model.lm_head.load_state_dict(source_lm.get_output_embeddings().state_dict())


def _convert_processor(src_dir, num_image_tokens: int) -> BridgeProcessor | None:
    try:
        source = AutoProcessor.from_pretrained(src_dir)
    except (OSError, ValueError) as error:
        logger.warning(f"No processor converted: {src_dir} has no loadable BLIP-2 processor ({error}).")
        return None
    return BridgeProcessor(
        image_processor=source.image_processor,
        tokenizer=source.tokenizer,
        qformer_tokenizer=getattr(source, "qformer_tokenizer", None),
        num_image_tokens=num_image_tokens,
    )


def convert_blip2_checkpoint(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[BridgeVLMForConditionalGeneration, BridgeProcessor | None]:
    r"""
    Converts a transformers `Blip2ForConditionalGeneration` or `InstructBlipForConditionalGeneration` checkpoint
    into a [`BridgeVLMForConditionalGeneration`] with a Q-Former bridge, and its processor into a
    [`BridgeProcessor`]. Logits and greedy generations match transformers' for the same inputs.

    The vision tower stays transformers' BLIP-2 vision model, the Q-Former's weights are renamed into
    [`QFormerModel`], the language model is split into its base model and `lm_head`. Prompts now carry their
    image explicitly: write `"<image>Question: ... Answer:"` where BLIP-2's processor prepended the image.

    Args:
        src_dir (`str` or `os.PathLike`):
            Directory (or Hub id) of the transformers checkpoint.
        dst_dir (`str` or `os.PathLike`, *optional*):
            Where to save the converted model and processor; nothing is saved when `None`.
        dtype (`torch.dtype`, *optional*):
            Dtype to load the source in; the Q-Former stays fp32.

    Returns:
        `(model, processor)`; `processor` is `None` when `src_dir` holds none.

    Example:

    ```python
    >>> from vlbridge.conversion import convert_blip2_checkpoint
    >>> model, processor = convert_blip2_checkpoint("blip2-opt-2.7b", "blip2-opt-2.7b-vlbridge")  # doctest: +SKIP
    ```
    """
    source_config = AutoConfig.from_pretrained(src_dir)
    if source_config.model_type not in SOURCE_CLASSES:
        raise ValueError(
            f"{src_dir} holds a '{source_config.model_type}' model; convert_blip2_checkpoint takes "
            f"{sorted(SOURCE_CLASSES)} checkpoints."
        )
    source = SOURCE_CLASSES[source_config.model_type].from_pretrained(src_dir, dtype=dtype).eval()
    config = _vlbridge_config(source.config)
    model = BridgeVLMForConditionalGeneration(config).to(source.language_model.dtype)
    model.model.bridge.float()

    model.model.vision_tower.load_state_dict(source.vision_model.state_dict())
    model.model.bridge.load_state_dict(qformer_state_dict_from_blip2(source.state_dict()))
    model.model.language_projection.load_state_dict(source.language_projection.state_dict())
    _load_language_model(model, source.language_model)
    model.tie_weights()
    model.eval()

    processor = _convert_processor(src_dir, config.num_image_tokens)
    if dst_dir is not None:
        model.save_pretrained(dst_dir)
        if processor is not None:
            processor.save_pretrained(dst_dir)
        logger.info(f"Converted {source_config.model_type} checkpoint {src_dir} -> {dst_dir}")
    return model, processor


__all__ = ["convert_blip2_checkpoint"]
