"""
One entry point for every released checkpoint vlbridge converts: [`convert_checkpoint`] reads the source folder's
config and hands it to the converter of its architecture.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
from transformers import AutoConfig


# Source architecture (`config.architectures[0]` of the folder) -> (module of vlbridge.conversion, function). Every
# converter takes `(src_dir, dst_dir=None, dtype=None)` and returns `(model, processor or None)`.
CONVERTERS: dict[str, tuple[str, str]] = {
    "BlipForConditionalGeneration": ("blip", "convert_blip_checkpoint"),
    "BlipForImageTextRetrieval": ("blip", "convert_blip_checkpoint"),
    "BlipForQuestionAnswering": ("blip", "convert_blip_checkpoint"),
    "Blip2ForConditionalGeneration": ("blip2", "convert_blip2_checkpoint"),
    "InstructBlipForConditionalGeneration": ("blip2", "convert_blip2_checkpoint"),
    "Blip2ForImageTextRetrieval": ("blip2_retrieval", "convert_blip2_retrieval_checkpoint"),
    "Blip2Model": ("blip2_retrieval", "convert_blip2_qformer_checkpoint"),
    "Blip2QFormerModel": ("blip2_retrieval", "convert_blip2_qformer_checkpoint"),
    "LlavaForConditionalGeneration": ("llava", "convert_llava_checkpoint"),
}
# OpenFlamingo's state dict, which has no config: `convert_openflamingo_checkpoint` takes it, with its two backbones.
OPENFLAMINGO_CHECKPOINT = "checkpoint.pt"
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
# For a config that names no architecture: the architecture its `model_type` usually saves.
DEFAULT_ARCHITECTURES = {
    "blip-2": "Blip2ForConditionalGeneration",
    "instructblip": "InstructBlipForConditionalGeneration",
    "blip_2_qformer": "Blip2QFormerModel",
    "llava": "LlavaForConditionalGeneration",
}


def _refuse_bare_state_dict(src_dir: str | os.PathLike) -> None:
    """A state dict without a config (OpenFlamingo's `checkpoint.pt`) names no architecture, nor the vision tower and
    language model it needs: say which converter takes it, rather than fail on the missing config.json."""
    path = Path(src_dir)
    weights_file = path.is_file() and path.suffix in STATE_DICT_SUFFIXES
    folder_without_config = path.is_dir() and not (path / "config.json").exists()
    if weights_file or (folder_without_config and (path / OPENFLAMINGO_CHECKPOINT).exists()):
        raise ValueError(
            f"{src_dir} is a bare state dict, without a config.json naming its architecture. An OpenFlamingo "
            "checkpoint.pt holds only the weights it trained: convert it with "
            "vlbridge.conversion.convert_openflamingo_checkpoint(checkpoint, vision_path, text_path, output_dir, "
            "cross_attention_every_n_layers=...), which also takes the vision tower and language model it was "
            "trained with."
        )


def source_architecture(src_dir: str | os.PathLike) -> str:
    """The architecture a checkpoint folder (or Hub id) holds: the first of `config.architectures`, else the usual
    one of its `model_type`; a `ValueError` lists what [`convert_checkpoint`] accepts when it converts neither."""
    _refuse_bare_state_dict(src_dir)
    config = AutoConfig.from_pretrained(src_dir)
    names = [*(getattr(config, "architectures", None) or []), DEFAULT_ARCHITECTURES.get(config.model_type, "")]
    for name in names:
        if name in CONVERTERS:
            return name
    accepted = ", ".join(sorted(CONVERTERS))
    found = ", ".join(name for name in names if name) or "no architecture"
    raise ValueError(
        f"{src_dir} holds a '{config.model_type}' checkpoint ({found}); "
        f"vlbridge converts these transformers architectures: {accepted}."
    )


def convert_checkpoint(
    src_dir: str | os.PathLike, dst_dir: str | os.PathLike | None = None, dtype: torch.dtype | None = None
):
    """
    Converts a released checkpoint into its vlbridge model and processor, whatever its family: the folder's config
    names the architecture, and the converter of that architecture ([`CONVERTERS`]) does the work (the BLIP-2 /
    InstructBLIP generation models: [`convert_blip2_checkpoint`]; BLIP's retrieval, captioning and VQA models:
    [`convert_blip_checkpoint`]). `vlbridge convert SRC DST` calls it. An OpenFlamingo `checkpoint.pt` has no config
    and needs its vision tower and language model besides: [`convert_openflamingo_checkpoint`] converts it, and this
    function says so when given one.

    Args:
        src_dir (`str` or `os.PathLike`): The transformers checkpoint, a folder or a Hub id.
        dst_dir (`str` or `os.PathLike`, *optional*): Where the converted model and processor are saved; nothing is
            saved when `None`.
        dtype (`torch.dtype`, *optional*): Dtype to load the source in; bridges stay fp32.

    Returns:
        `(model, processor)`; `processor` is `None` when the source holds none.

    Raises:
        `ValueError`: For an architecture vlbridge does not convert, listing the ones it does; for a bare state dict
        (a file, or a folder with OpenFlamingo's `checkpoint.pt` and no `config.json`), naming
        [`convert_openflamingo_checkpoint`].

    Example:

    ```python
    >>> from vlbridge.conversion import convert_checkpoint
    >>> model, processor = convert_checkpoint("Salesforce/blip2-opt-2.7b", "blip2-opt-2.7b-vlbridge")  # doctest: +SKIP
    ```
    """
    module, function = CONVERTERS[source_architecture(src_dir)]
    converter = getattr(importlib.import_module(f"{__package__}.{module}"), function)
    return converter(src_dir, dst_dir, dtype=dtype)


__all__ = ["CONVERTERS", "convert_checkpoint", "source_architecture"]
