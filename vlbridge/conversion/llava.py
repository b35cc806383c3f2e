"""Turn a transformers LLaVA-1.5 checkpoint directory into a vlbridge checkpoint (processor included).

LLaVA-1.5 is exactly a vlbridge VLM: its vision tower, an [`MLPProjectorModel`] bridge (2 linear layers with GELU,
the same `linear_1` / `linear_2` keys as LLaVA's `multi_modal_projector`) that ends at the language model's width,
so no language projection (`use_language_projection=False`), and the language model split into its base model and
`lm_head`. LLaVA's `vision_feature_layer` becomes vlbridge's, and its feature selection the bridge's
`drop_cls_token` ("default" drops the CLS feature, "full" keeps it).
"""

from __future__ import annotations

import os

import torch
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration
from transformers.utils import logging

from ..configuration import BridgeVLMConfig, MLPProjectorConfig
from ..configuration.configuration_bridge_vlm import VISION_PREFIX_TOKENS, check_vision_feature_layer
from ..modeling import BridgeVLMForConditionalGeneration
from ..processing import BridgeProcessor
from .state import load_state_strict


logger = logging.get_logger(__name__)

SOURCE_MODEL_TYPE = "llava"
# LLaVA's `vision_feature_select_strategy` -> whether the MLP projector drops the first (CLS) feature.
DROP_CLS_BY_STRATEGY = {"default": True, "full": False}


def _check_source_config(source_config) -> None:
    """Raises a `ValueError` naming the fix for a LLaVA config vlbridge cannot express exactly."""
    layer = source_config.vision_feature_layer
    vision_config = source_config.vision_config
    if isinstance(layer, (list, tuple)):
        raise ValueError(
            f"This LLaVA checkpoint concatenates the vision hidden states of layers {list(layer)} "
            "(vision_feature_layer is a list), but a vlbridge VLM feeds its bridge one hidden state "
            "(BridgeVLMConfig.vision_feature_layer is an int): it cannot be converted exactly. Convert a checkpoint "
            "with a single vision_feature_layer (LLaVA-1.5 uses -2)."
        )
    try:
        check_vision_feature_layer(layer, vision_config)
    except ValueError as error:
        raise ValueError(f"The LLaVA config's vision_feature_layer is out of range: {error}") from error
    strategy = source_config.vision_feature_select_strategy
    if strategy not in DROP_CLS_BY_STRATEGY:
        raise ValueError(
            f"Unknown LLaVA vision_feature_select_strategy {strategy!r}: vlbridge converts "
            f"{sorted(DROP_CLS_BY_STRATEGY)}."
        )
    if DROP_CLS_BY_STRATEGY[strategy] and VISION_PREFIX_TOKENS.get(vision_config.model_type) == 0:
        raise ValueError(
            f"This LLaVA checkpoint drops the first feature of its vision tower ('default' feature selection), but "
            f"'{vision_config.model_type}' has no CLS token, so that feature is a patch; vlbridge drops only a CLS "
            "token (MLPProjectorConfig.drop_cls_token) and cannot express it. Such a checkpoint is usually meant to "
            "use vision_feature_select_strategy='full': fix its config.json, or convert it as it was trained."
        )


def llava_config_to_vlbridge(source_config) -> BridgeVLMConfig:
    """
    The [`BridgeVLMConfig`] of a transformers `LlavaConfig`: same vision tower and language model, an MLP projector
    bridge equal to LLaVA's `multi_modal_projector`, no language projection.

    Args:
        source_config (`LlavaConfig`): The LLaVA-1.5 config.

    Raises:
        `ValueError`: for a config vlbridge cannot express exactly (a list of vision feature layers, a layer out of
        range for the vision tower, a CLS drop on a tower without CLS).

    Example:

    ```python
    >>> from transformers import LlavaConfig
    >>> from vlbridge.conversion.llava import llava_config_to_vlbridge
    >>> config = llava_config_to_vlbridge(LlavaConfig(
    ...     vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
    ...                    "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
    ...     text_config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    ...                  "num_attention_heads": 4, "vocab_size": 100},
    ...     image_token_index=99,
    ... ))
    >>> config.num_image_tokens, config.use_language_projection, config.bridge_config.drop_cls_token
    (16, False, True)
    ```
    """
    _check_source_config(source_config)
    text_config = source_config.text_config
    bridge_config = MLPProjectorConfig(
        hidden_size=text_config.hidden_size,
        num_layers=2,
        hidden_act=source_config.projector_hidden_act,
        drop_cls_token=DROP_CLS_BY_STRATEGY[source_config.vision_feature_select_strategy],
        bias=bool(getattr(source_config, "multimodal_projector_bias", True)),
    )
    return BridgeVLMConfig(
        vision_config=source_config.vision_config.to_dict(),
        bridge_config=bridge_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=source_config.image_token_index,
        vision_feature_layer=source_config.vision_feature_layer,
        use_language_projection=False,
        tie_word_embeddings=bool(getattr(source_config, "tie_word_embeddings", False)),
    )


def _copy_weights(target: nn.Module, state: dict[str, torch.Tensor], part: str) -> None:
    hint = "Convert the model with the config its weights were saved with (llava_config_to_vlbridge(source.config))."
    load_state_strict(target, state, "LLaVA", part, hint)


def load_llava_weights(model: BridgeVLMForConditionalGeneration, source: LlavaForConditionalGeneration) -> None:
    """
    Copies a `LlavaForConditionalGeneration`'s weights into a VLM built from [`llava_config_to_vlbridge`]: vision
    tower as is, `multi_modal_projector.linear_{1,2}` into `bridge.linear_{1,2}`, the language model and `lm_head`.

    Args:
        model ([`BridgeVLMForConditionalGeneration`]): The VLM, built from the LLaVA config.
        source (`LlavaForConditionalGeneration`): The LLaVA-1.5 model.

    Raises:
        `ValueError`: when a part's weights do not fit (missing, unexpected or differently shaped keys).

    Example:

    ```python
    >>> source = LlavaForConditionalGeneration.from_pretrained("llava-hf/llava-1.5-7b-hf")  # doctest: +SKIP
    >>> model = BridgeVLMForConditionalGeneration(llava_config_to_vlbridge(source.config))  # doctest: +SKIP
    >>> load_llava_weights(model, source)  # doctest: +SKIP
    ```
    """
    if getattr(model.model, "language_projection", None) is not None:
        raise ValueError(
            "LLaVA has no language projection after its projector: build the VLM with "
            "llava_config_to_vlbridge(source.config) (use_language_projection=False)."
        )
    base = source.model
    _copy_weights(model.model.vision_tower, base.vision_tower.state_dict(), "vision tower")
    _copy_weights(model.model.bridge, base.multi_modal_projector.state_dict(), "multi_modal_projector")
    _copy_weights(model.model.language_model, base.language_model.state_dict(), "language model")
    _copy_weights(model.lm_head, source.lm_head.state_dict(), "lm_head")


def _source_image_tokens(source_processor) -> tuple[int, tuple[int, ...]] | None:
    """How many `<image>` tokens the LLaVA processor gives one image, and the `(height, width)` of its pixel values
    (None if it cannot say, e.g. without `patch_size`)."""
    try:
        out = source_processor(
            images=Image.new("RGB", (64, 64)), text=source_processor.image_token, return_tensors="pt"
        )
    except (TypeError, ValueError, AttributeError, KeyError):
        return None
    return int((out["input_ids"] == source_processor.image_token_id).sum()), tuple(out["pixel_values"].shape[-2:])


def convert_llava_processor(src_dir, config: BridgeVLMConfig) -> BridgeProcessor | None:
    """
    A [`BridgeProcessor`] from a LLaVA processor folder: its image processor, tokenizer, `<image>` token and chat
    template, expanding `<image>` into `config.num_image_tokens` tokens (the patch features after selection), the
    same `input_ids` LLaVA's processor makes. `None`, with a warning, when `src_dir` holds no LLaVA processor.

    Args:
        src_dir (`str` or `os.PathLike`): The LLaVA checkpoint folder (or Hub id).
        config ([`BridgeVLMConfig`]): The converted model's config.

    Example:

    ```python
    >>> processor = convert_llava_processor("llava-hf/llava-1.5-7b-hf", model.config)  # doctest: +SKIP
    ```
    """
    try:
        source = AutoProcessor.from_pretrained(src_dir)
    except (OSError, ValueError) as error:
        logger.warning(f"No processor converted: {src_dir} has no loadable LLaVA processor ({error}).")
        return None
    if getattr(source, "image_processor", None) is None or getattr(source, "tokenizer", None) is None:
        logger.warning(
            f"No processor converted: {src_dir} holds a {type(source).__name__}, not a LLaVA processor with an image "
            "processor and a tokenizer; build a BridgeProcessor(image_processor, tokenizer, "
            f"num_image_tokens={config.num_image_tokens}) yourself."
        )
        return None
    found = _source_image_tokens(source)
    if found is not None and found[0] != config.num_image_tokens:
        logger.warning(
            f"The source processor expands <image> into {found[0]} tokens, but the model gives "
            f"{config.num_image_tokens} image features per image (check its patch_size and "
            "num_additional_image_tokens); the converted processor uses the model's count."
        )
    image_size = getattr(config.vision_config, "image_size", None)
    if found is not None and isinstance(image_size, int) and found[1] != (image_size, image_size):
        logger.warning(
            f"The source image processor makes {found[1]} images, but the vision tower takes {image_size}x"
            f"{image_size}: the converted processor keeps the image processor as it is; fix its size / crop_size."
        )
    return BridgeProcessor(
        image_processor=source.image_processor,
        tokenizer=source.tokenizer,
        chat_template=getattr(source, "chat_template", None),
        image_token=getattr(source, "image_token", None),
        num_image_tokens=config.num_image_tokens,
        image_token_id=config.image_token_id,
    )


def convert_llava_checkpoint(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[BridgeVLMForConditionalGeneration, BridgeProcessor | None]:
    r"""
    Converts a transformers `LlavaForConditionalGeneration` (LLaVA-1.5, e.g. `llava-hf/llava-1.5-7b-hf`) checkpoint
    into a [`BridgeVLMForConditionalGeneration`] with an [`MLPProjectorModel`] bridge and no language projection, and
    its processor into a [`BridgeProcessor`]. Logits and greedy generations match transformers' for the same inputs
    (in fp32; in bf16 / fp16 the bridge stays fp32 where LLaVA runs its projector in the lower precision).

    Args:
        src_dir (`str` or `os.PathLike`):
            Directory (or Hub id) of the transformers checkpoint.
        dst_dir (`str` or `os.PathLike`, *optional*):
            Where to save the converted model and processor; nothing is saved when `None`.
        dtype (`torch.dtype`, *optional*):
            Dtype to load the source in; the bridge stays fp32.

    Returns:
        `(model, processor)`; `processor` is `None` (with a warning) when `src_dir` holds none.

    Raises:
        `ValueError`: for another architecture, or a LLaVA config vlbridge cannot express (see
        [`llava_config_to_vlbridge`]).

    Example:

    ```python
    >>> from vlbridge.conversion.llava import convert_llava_checkpoint
    >>> model, processor = convert_llava_checkpoint("llava-hf/llava-1.5-7b-hf", "llava-1.5-vlbridge")  # doctest: +SKIP
    ```
    """
    source_config = AutoConfig.from_pretrained(src_dir)
    if source_config.model_type != SOURCE_MODEL_TYPE:
        raise ValueError(
            f"{src_dir} holds a '{source_config.model_type}' model; convert_llava_checkpoint takes 'llava' "
            "(LlavaForConditionalGeneration) checkpoints. For any of them, use vlbridge.conversion.convert_checkpoint."
        )
    config = llava_config_to_vlbridge(source_config)  # refuses what it cannot express before loading the weights
    source = LlavaForConditionalGeneration.from_pretrained(src_dir, dtype=dtype).eval()
    model = BridgeVLMForConditionalGeneration(config).to(source.dtype)
    model.model.bridge.float()
    load_llava_weights(model, source)
    model.tie_weights()
    model.eval()

    processor = convert_llava_processor(src_dir, config)
    if dst_dir is not None:
        model.save_pretrained(dst_dir)
        if processor is not None:
            processor.save_pretrained(dst_dir)
        logger.info(f"Converted llava checkpoint {src_dir} -> {dst_dir}")
    return model, processor


__all__ = ["convert_llava_checkpoint", "convert_llava_processor", "llava_config_to_vlbridge", "load_llava_weights"]
