"""
The captioner and the filter of `vlbridge capfilt`: any stage-1 style model that says it can do the job. A model
declares it with two properties, `supports_captioning` (it writes captions with `generate_captions`) and
`supports_matching` (it scores image-text pairs with `get_vision_features` + `compute_itm_logits`), which vlbridge's
Q-Former stage-1 model and BLIP's MED model both have; CapFilt asks for nothing else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .inference import STAGE1_MODEL_TYPE, VLM_MODEL_TYPE, load_checkpoint


# Per role: the property that says a model can do it, the job in words, and why a model of the right kind may not.
ROLES = {
    "captioner": (
        "supports_captioning",
        "writes captions (an image-grounded text decoder and a [DEC] start token)",
        " (no text decoder, or no decoder_start_token_id, [DEC], in its config)",
    ),
    "filter": ("supports_matching", "scores image-text pairs with an ITM head", ""),
}
STAGE1_MODELS = (
    "QFormerForImageTextPretraining (vlbridge stage1, or BLIP-2's Blip2ForImageTextRetrieval after vlbridge "
    "convert), or BLIP's BlipMEDForImageTextPretraining"
)


@dataclass
class CapFiltModel:
    """
    A captioner or filter with what prepares its inputs.

    Args:
        model (`torch.nn.Module`): The model, in eval mode.
        tokenizer: Its text tokenizer.
        image_processor: Its image processor.
        processor (*optional*): The processor saved with it, if any (saved again with a fine-tuned copy).
        path (`str`): The folder it was loaded from.
    """

    model: torch.nn.Module
    tokenizer: object
    image_processor: object
    processor: object | None
    path: str


def _auto_class(config, role: str, path: str | os.PathLike):
    """The Auto class that builds the model the folder holds: the pretraining class first (AutoModel may map to a
    bare encoder), and only one that builds the class `config.architectures` names (a BLIP VQA folder must not load
    as BLIP's pretraining model)."""
    from transformers import AutoModel, AutoModelForPreTraining

    saved = config.architectures or []
    for auto in (AutoModelForPreTraining, AutoModel):
        if type(config) in auto._model_mapping and (not saved or auto._model_mapping[type(config)].__name__ in saved):
            return auto
    held = " or ".join(saved) if saved else f"{config.model_type!r} model"
    raise ValueError(
        f"--{role} {path} is a {held}, which no transformers Auto class loads as a stage-1 model: the {role} must be "
        f"a stage-1 model that {ROLES[role][1]} ({STAGE1_MODELS})."
    )


def _load_any(path: str | os.PathLike, role: str) -> CapFiltModel:
    """A model of another type than vlbridge's Q-Former and VLM, with its processor when one is saved (else its
    tokenizer and image processor)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer

    model = _auto_class(AutoConfig.from_pretrained(path), role, path).from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path) if Path(path, "processor_config.json").is_file() else None
    if not (hasattr(processor, "tokenizer") and hasattr(processor, "image_processor")):
        processor = None
    tokenizer = processor.tokenizer if processor is not None else AutoTokenizer.from_pretrained(path)
    image_processor = processor.image_processor if processor is not None else AutoImageProcessor.from_pretrained(path)
    return CapFiltModel(model, tokenizer, image_processor, processor, str(path))


def load_model(path: str | os.PathLike, role: str) -> CapFiltModel:
    """
    The model of a saved folder, checked to be able to do `role`'s job.

    A vlbridge VLM or stage-1 folder loads as every vlbridge command loads it; any other model type through the
    transformers Auto class that knows its config (`AutoModelForPreTraining`, else `AutoModel`: BLIP's MED model),
    with its tokenizer and image processor. The model must say it can do the job: `supports_captioning` for the
    captioner, `supports_matching` for the filter.

    Args:
        path (`str` or `os.PathLike`): The folder.
        role (`str`): `"captioner"` or `"filter"`.

    Returns:
        [`CapFiltModel`]

    Raises:
        `ValueError`: naming what the model is and what the role needs, when it cannot do the job.
    """
    from transformers import AutoConfig

    if not Path(path, "config.json").is_file():
        raise FileNotFoundError(f"--{role} {path} holds no config.json: pass a saved model folder ({STAGE1_MODELS}).")
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type in (STAGE1_MODEL_TYPE, VLM_MODEL_TYPE):
        checkpoint = load_checkpoint(path)
        processor = checkpoint.processor
        loaded = CapFiltModel(checkpoint.model, processor.tokenizer, processor.image_processor, processor, str(path))
    else:
        loaded = _load_any(path, role)
    attribute, job, why = ROLES[role]
    if getattr(loaded.model, attribute, None) is not True:
        name = type(loaded.model).__name__
        if hasattr(loaded.model, attribute):  # the right kind of model, without what the job needs
            raise ValueError(f"--{role} {path} is a {name} whose {attribute} is False{why}: it cannot be the {role}.")
        raise ValueError(
            f"--{role} {path} is a {name}: the {role} must be a stage-1 model that {job} ({STAGE1_MODELS})."
        )
    return loaded


__all__ = ["ROLES", "CapFiltModel", "load_model"]
