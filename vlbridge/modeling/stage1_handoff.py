"""
BLIP-2's hand-offs between stages, in one place: the stage-1 Q-Former into a stage-2 VLM's bridge
([`load_qformer_into_vlm`]), a stage-2 VLM built around a stage-1 run ([`vlm_from_stage1`]), and InstructBLIP mode,
where the Q-Former's text branch comes back from stage 1 to read the instruction ([`add_qformer_instruction_input`],
with [`qformer_instruction_processor`] for the processor that feeds it).
"""

from __future__ import annotations

import os

from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging

from ..configuration import BridgeVLMConfig
from ..configuration.configuration_qformer import QFormerConfig
from ..processing import BridgeProcessor
from .modeling_bridge_vlm import BridgeVLMForConditionalGeneration
from .modeling_qformer import QFormerModel
from .modeling_qformer_pretraining import QFormerForImageTextPretraining


logger = logging.get_logger(__name__)


def load_qformer_into_vlm(vlm, qformer, include_vision_tower: bool = False):
    """
    Copies a stage-1 Q-Former into the bridge of a stage-2 [`BridgeVLMForConditionalGeneration`] /
    [`BridgeVLMModel`] (BLIP-2's stage-1 -> stage-2 hand-off), dropping the text branch when the VLM's bridge has
    none (`use_text_input=False`, BLIP-2's stage-2 layout).

    Args:
        vlm ([`BridgeVLMForConditionalGeneration`] or [`BridgeVLMModel`]):
            The VLM; its bridge must be a [`QFormerModel`] of the same shape.
        qformer ([`QFormerForImageTextPretraining`], [`QFormerModel`] or `str`):
            The stage-1 model, its `.qformer`, or a directory holding either (saved with `save_pretrained`).
        include_vision_tower (`bool`, *optional*, defaults to `False`):
            Also copy the stage-1 vision tower (when it was trained in stage 1).

    Returns:
        The `vlm`, modified in place.

    Example:

    ```python
    >>> model.qformer.save_pretrained("stage1-qformer")  # doctest: +SKIP
    >>> load_qformer_into_vlm(vlm, "stage1-qformer")  # or load_qformer_into_vlm(vlm, model)  # doctest: +SKIP
    ```
    """
    stage1 = qformer
    if isinstance(qformer, (str, os.PathLike)):
        stage1 = AutoModel.from_pretrained(qformer)
    source = stage1.qformer if isinstance(stage1, QFormerForImageTextPretraining) else stage1
    base = getattr(vlm, "model", vlm)
    bridge = base.bridge
    if not isinstance(bridge, QFormerModel) or not isinstance(source, QFormerModel):
        raise ValueError("load_qformer_into_vlm copies a QFormerModel into a VLM whose bridge is a QFormerModel.")
    try:
        _check_same_shape(source.config, bridge.config)
    except ValueError as error:
        raise ValueError(
            f"{error} Build the VLM with a bridge of the stage-1 Q-Former's sizes (vlm_from_stage1 does), or start "
            "from a saved VLM whose bridge has them."
        ) from None
    if isinstance(stage1, QFormerForImageTextPretraining):
        if stage1.config.vision_feature_layer != base.config.vision_feature_layer:
            raise ValueError(
                f"The Q-Former was trained on vision layer {stage1.config.vision_feature_layer}, the VLM feeds layer "
                f"{base.config.vision_feature_layer}: set the VLM config's vision_feature_layer to match."
            )
    elif include_vision_tower:
        raise ValueError("include_vision_tower=True needs the whole stage-1 model, not only its Q-Former.")
    wanted = bridge.state_dict().keys()
    state = {k: v for k, v in source.state_dict().items() if k in wanted}
    bridge.load_state_dict(state, strict=True)
    if include_vision_tower:
        base.vision_tower.load_state_dict(stage1.vision_tower.state_dict())
    return vlm


def _check_same_shape(source: QFormerConfig, target: QFormerConfig):
    fields = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "cross_attention_frequency",
        "encoder_hidden_size",
        "num_query_tokens",
    )
    if target.use_text_input:
        if not source.use_text_input:
            raise ValueError("The VLM's bridge has a text branch (use_text_input=True) but the Q-Former has none.")
        fields += ("vocab_size", "max_position_embeddings")
    different = {f: (getattr(source, f), getattr(target, f)) for f in fields}
    different = {f: pair for f, pair in different.items() if pair[0] != pair[1]}
    if different:
        raise ValueError(f"The Q-Former and the VLM's bridge differ in (source, bridge): {different}.")


def vlm_from_stage1(stage1, text_config, image_token_id: int, **config_kwargs):
    """
    A stage-2 [`BridgeVLMForConditionalGeneration`] around a stage-1 model's vision tower and Q-Former (BLIP-2's
    hand-off: the Q-Former reads the features it was trained on), with a language model built from `text_config`.
    The Q-Former's text branch is dropped (`use_text_input=False`), as in BLIP-2's stage 2.

    Args:
        stage1 ([`QFormerForImageTextPretraining`] or `str`): The stage-1 model or its directory.
        text_config (`dict` or [`PretrainedConfig`]): The language model's config (a fresh, randomly initialised LM).
        image_token_id (`int`): Id of the image placeholder token in the language model's tokenizer.
        config_kwargs: Other [`BridgeVLMConfig`] arguments.

    Example:

    ```python
    >>> text_config = {"model_type": "llama", "vocab_size": 64, "hidden_size": 64}  # doctest: +SKIP
    >>> vlm = vlm_from_stage1("outputs/stage1-builtin", text_config, image_token_id=4)  # doctest: +SKIP
    ```
    """
    if isinstance(stage1, (str, os.PathLike)):
        stage1 = QFormerForImageTextPretraining.from_pretrained(stage1)
    bridge_config = {**stage1.config.qformer_config.to_dict(), "use_text_input": False}
    config = BridgeVLMConfig(
        vision_config=stage1.config.vision_config.to_dict(),
        bridge_config=bridge_config,
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=getattr(stage1.config, "vision_feature_layer", None),
        **config_kwargs,
    )
    return load_qformer_into_vlm(BridgeVLMForConditionalGeneration(config), stage1, include_vision_tower=True)


def add_qformer_instruction_input(vlm, stage1):
    """
    InstructBLIP mode for a BLIP-2 VLM: a copy of `vlm` whose Q-Former also reads the instruction
    (`use_qformer_text_input=True`). Every weight of `vlm` carries over (a stage-2 or SFT model keeps what it
    learned); the Q-Former's text branch, which BLIP-2's stage 2 drops (word and position embeddings, the text
    feed-forward blocks), comes back from the stage-1 model, as InstructBLIP starts its Q-Former from BLIP-2's. Pair
    the model with a processor whose `qformer_tokenizer` is the stage-1 tokenizer.

    Args:
        vlm ([`BridgeVLMForConditionalGeneration`]): A VLM whose bridge is a Q-Former without text branch.
        stage1 ([`QFormerForImageTextPretraining`] or `str`): The stage-1 model its Q-Former came from (or its folder).

    Returns:
        [`BridgeVLMForConditionalGeneration`]: the new model, on `vlm`'s device and dtype, in `vlm`'s train / eval
        mode; freeze it as the next stage needs.

    Example:

    ```python
    >>> from vlbridge.modeling import add_qformer_instruction_input  # doctest: +SKIP
    >>> instruct = add_qformer_instruction_input(vlm, "outputs/stage1-builtin")  # doctest: +SKIP
    >>> instruct.config.use_qformer_text_input  # doctest: +SKIP
    True
    ```
    """
    if isinstance(stage1, (str, os.PathLike)):
        stage1 = QFormerForImageTextPretraining.from_pretrained(stage1)
    bridge = vlm.model.bridge
    if not isinstance(bridge, QFormerModel):
        raise ValueError(f"InstructBLIP mode needs a Q-Former bridge, this VLM has {type(bridge).__name__}.")
    if vlm.config.use_qformer_text_input:
        raise ValueError("This VLM's Q-Former already reads the instruction (use_qformer_text_input=True).")
    config = vlm.config.__class__.from_dict(vlm.config.to_dict())
    config.bridge_config.use_text_input = True
    config.use_qformer_text_input = True
    _check_same_shape(stage1.qformer.config, config.bridge_config)

    instruct = type(vlm)(config).to(device=vlm.device, dtype=vlm.dtype)
    missing, unexpected = instruct.load_state_dict(vlm.state_dict(), strict=False)
    prefix = "model.bridge."
    if unexpected or any(not key.startswith(prefix) for key in missing):
        raise ValueError(f"The VLM's weights do not fit its InstructBLIP copy: missing {missing}, extra {unexpected}.")
    # The keys the copy misses are exactly the text branch; the stage-1 Q-Former has them under the same names.
    source = stage1.qformer.state_dict()
    text_branch = {key: source[key.removeprefix(prefix)] for key in missing}
    instruct.load_state_dict(text_branch, strict=False)
    logger.info(f"InstructBLIP mode: {len(text_branch)} text-branch tensors of the Q-Former from stage 1.")
    return instruct.train(vlm.training)


def qformer_instruction_processor(processor: BridgeProcessor, stage1_directory: str | os.PathLike) -> BridgeProcessor:
    """
    The processor of a VLM in InstructBLIP mode: `processor` with the stage-1 tokenizer (saved beside the stage-1
    model) as its `qformer_tokenizer`, so that the instruction reaches the Q-Former in the words it was trained on.

    Args:
        processor ([`BridgeProcessor`]): The VLM's processor.
        stage1_directory (`str` or `os.PathLike`): The stage-1 run, with its tokenizer.

    Example:

    ```python
    >>> instruct = add_qformer_instruction_input(vlm, "outputs/stage1")  # doctest: +SKIP
    >>> processor = qformer_instruction_processor(processor, "outputs/stage1")  # doctest: +SKIP
    ```
    """
    return BridgeProcessor(
        processor.image_processor,
        processor.tokenizer,
        qformer_tokenizer=AutoTokenizer.from_pretrained(stage1_directory),
        chat_template=processor.chat_template,
        image_token=processor.image_token,
        num_image_tokens=processor.num_image_tokens,
    )


__all__ = [
    "add_qformer_instruction_input",
    "load_qformer_into_vlm",
    "qformer_instruction_processor",
    "vlm_from_stage1",
]
