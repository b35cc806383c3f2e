"""Convert transformers' BLIP (v1) checkpoints into vlbridge's BLIP MED models.

| transformers                 | vlbridge                                     | e.g. (Hub)                            |
| ---------------------------- | -------------------------------------------- | ------------------------------------- |
| BlipForImageTextRetrieval    | `BlipMEDForImageTextPretraining`, no decoder | Salesforce/blip-itm-base-coco         |
| BlipForConditionalGeneration | `BlipMEDForImageTextPretraining`, no encoder | Salesforce/blip-image-captioning-base |
| BlipForQuestionAnswering     | `BlipMEDForQuestionAnswering`                | Salesforce/blip-vqa-base              |

Weights convert by one rename, `vision_model.*` -> `vision_tower.*` (the same `BlipVisionModel`); `text_encoder.*`
(`BlipTextModel` without pooler), `text_decoder.*` (`BlipTextLMHeadModel`), `vision_proj`, `text_proj` and `itm_head`
keep their names. The converted configs reproduce what transformers computes:

- `enc_token_id=None`: the encoder reads the first question / caption token as given, as transformers does (BLIP put
  `[ENC]` there; transformers' checkpoints run with the tokenizer's `[CLS]`).
- `decoder_start_token_id` = the source's `text_config.bos_token_id` (`[DEC]`), `eos_token_id` = its `sep_token_id`
  (`[SEP]`), `pad_token_id` its pad id; `label_smoothing` = its `text_config.label_smoothing` (transformers' decoder
  loss), `share_encoder_decoder=False` (released fine-tuned weights do not share), no momentum distillation.
- Loss weights of the parts the source lacks are 0: a retrieval model has no decoder (`itg_weight=0`), a captioner
  no encoder (`itc_weight=itm_weight=0`).

One difference, on purpose: the converted VQA model's answer decoder does not read question padding, where
transformers' does (its BLIP text cross-attention drops the mask; see `vlbridge.modeling.modeling_blip_vqa`). Questions
of one length, e.g. one at a time, give transformers' numbers exactly; in a padded batch each question gets the answer
transformers gives it alone.

What transformers' checkpoints do not hold, and what it starts as (seeded, so converting twice writes the same
files): the ITC temperature `temp` (transformers' retrieval model returns plain cosines) starts at
`temperature_init` (0.07), so `logits_per_image * temp` are transformers' cosines and rankings are unchanged; any
other weight of the target model the source lacks is listed in a warning. Nothing the source holds is dropped.

Tokenizer and image processor: saved beside the model as transformers' `BlipProcessor` (BERT tokenizer with `[DEC]`
/ `[ENC]`, `BlipImageProcessor`), loadable with `AutoProcessor`, `AutoTokenizer`, `AutoImageProcessor`. A source
without them converts with a warning and `processor=None`.
"""

from __future__ import annotations

import os

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipProcessor,
)
from transformers.utils import logging

from ..configuration.configuration_blip_med import BlipMEDConfig
from ..modeling.modeling_blip_med import BlipMEDForImageTextPretraining
from ..modeling.modeling_blip_vqa import BlipMEDForQuestionAnswering
from .blip2_retrieval import _check_source, _has_tokenizer_files, _load_source


logger = logging.get_logger(__name__)

# Architecture -> (transformers class, vlbridge class, the BlipMEDConfig settings that architecture fixes).
SOURCES = {
    "BlipForImageTextRetrieval": (
        BlipForImageTextRetrieval,
        BlipMEDForImageTextPretraining,
        {"with_text_encoder": True, "with_text_decoder": False, "itg_weight": 0.0},
    ),
    "BlipForConditionalGeneration": (
        BlipForConditionalGeneration,
        BlipMEDForImageTextPretraining,
        {"with_text_encoder": False, "with_text_decoder": True, "itc_weight": 0.0, "itm_weight": 0.0},
    ),
    "BlipForQuestionAnswering": (
        BlipForQuestionAnswering,
        BlipMEDForQuestionAnswering,
        {"with_text_encoder": True, "with_text_decoder": True},
    ),
}
# Parameters transformers' checkpoints lack start from this seed, so that converting twice writes the same files.
INIT_SEED = 0
# What the vlbridge models hold that transformers' BLIP never had (the ITC temperature): expected, reported at info.
KNOWN_FRESH = {"temp": "the ITC temperature (transformers' BLIP returns plain cosines) starts at temperature_init"}


def blip_med_config(source_config, architecture: str) -> BlipMEDConfig:
    """The [`BlipMEDConfig`] reproducing a transformers `BlipConfig` of `architecture` (see the module docstring)."""
    text_config = source_config.text_config
    return BlipMEDConfig(
        vision_config=source_config.vision_config.to_dict(),
        text_config=text_config.to_dict(),
        embed_dim=source_config.image_text_hidden_size,
        share_encoder_decoder=False,
        use_momentum_distillation=False,
        label_smoothing=text_config.label_smoothing,
        decoder_start_token_id=text_config.bos_token_id,
        enc_token_id=None,
        pad_token_id=text_config.pad_token_id,
        eos_token_id=text_config.sep_token_id,
        initializer_range=source_config.initializer_range,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", True)),
        **SOURCES[architecture][2],
    )


def blip_med_state_dict(source_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' BLIP weights under vlbridge's names: `vision_model.*` -> `vision_tower.*`, the rest unchanged."""
    renamed = {}
    for key, value in source_state.items():
        if key.startswith("vision_model."):
            key = "vision_tower." + key[len("vision_model.") :]
        renamed[key] = value
    return renamed


def _load_weights(model: torch.nn.Module, converted: dict[str, torch.Tensor]) -> list[str]:
    """Loads `converted` into `model`; returns the model's weights the source did not hold. Any source weight the
    model has no place for is a conversion bug and raises."""
    result = model.load_state_dict(converted, strict=False)
    if result.unexpected_keys:
        unexpected = sorted(result.unexpected_keys)[:5]
        raise ValueError(f"Conversion bug: {type(model).__name__} has no place for the source's {unexpected}.")
    # Tied weights (the decoder's vocabulary projection) are filled by their source, not missing.
    tied = set(model.get_expanded_tied_weights_keys(all_submodels=True))
    return sorted(key for key in result.missing_keys if key not in tied)


def _report_fresh(fresh: list[str], architecture: str) -> None:
    known = [key for key in fresh if key in KNOWN_FRESH]
    for key in known:
        logger.info(f"{key}: {KNOWN_FRESH[key]} ({architecture} does not hold it).")
    others = [key for key in fresh if key not in KNOWN_FRESH]
    if others:
        logger.warning(
            f"{len(others)} weight(s) of the converted model are not in the {architecture} checkpoint and start fresh "
            f"(seeded): {others[:8]}{' ...' if len(others) > 8 else ''}. Train them before relying on what they feed."
        )


def _cast(model: torch.nn.Module, dtype: torch.dtype | None) -> None:
    """Casts the converted model to the source's load dtype, keeping the modules the model keeps in fp32 in fp32."""
    if dtype is None or dtype == torch.float32:
        return
    model.to(dtype)
    keep = getattr(model, "_keep_in_fp32_modules_strict", None) or getattr(model, "_keep_in_fp32_modules", None)
    for name in keep or ():
        part = getattr(model, name, None)
        if isinstance(part, torch.nn.Module):
            part.float()
        elif isinstance(part, torch.Tensor):  # a parameter or buffer of the model itself (the temperature)
            part.data = part.data.float()


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer and image processor
# ---------------------------------------------------------------------------------------------------------------------


def _load_processing(src_dir) -> tuple:
    """`(tokenizer, image_processor)` of the source; a part that cannot be loaded is `None`, with a warning."""
    parts = []
    for name, auto in (("tokenizer", AutoTokenizer), ("image processor", AutoImageProcessor)):
        try:
            if name == "tokenizer" and not _has_tokenizer_files(src_dir):
                raise OSError("no tokenizer.json, tokenizer_config.json or vocab.txt")
            parts.append(auto.from_pretrained(src_dir))
        except (OSError, ValueError, TypeError, KeyError) as error:
            parts.append(None)
            logger.warning(
                f"No processor converted: {src_dir} has no loadable {name} ({type(error).__name__}: {error}). The "
                "model converts without it; save BLIP's tokenizer and image processor beside it yourself."
            )
    return tuple(parts)


def _check_tokenizer(tokenizer, config: BlipMEDConfig) -> None:
    """The tokenizer beside the weights is the one they were trained with: every id has an embedding row, and its
    `[DEC]` (BLIP's decoder start) is the config's."""
    vocab_size = config.text_config.vocab_size
    too_large = sorted((index, token) for token, index in tokenizer.get_vocab().items() if index >= vocab_size)
    if too_large:
        raise ValueError(
            f"The tokenizer beside the checkpoint has ids the text towers' {vocab_size} word embeddings do not cover, "
            f"e.g. {too_large[:5]}: it is not the tokenizer this checkpoint was trained with. Save the right one "
            "(bert-base-uncased plus [DEC] and [ENC] for BLIP) in the folder, or remove it to convert without one."
        )
    dec = tokenizer.get_vocab().get("[DEC]")
    if dec is not None and config.decoder_start_token_id is not None and dec != config.decoder_start_token_id:
        logger.warning(
            f"The tokenizer's [DEC] is id {dec} but the checkpoint's text_config.bos_token_id (the decoder start) is "
            f"{config.decoder_start_token_id}; the converted model keeps the checkpoint's, as transformers does."
        )


def _save(dst_dir, model, processor, tokenizer, image_processor) -> None:
    # Processing files first, so that the model's save adds what it adds to them. A lone part is saved as it is.
    for part in (processor,) if processor is not None else (tokenizer, image_processor):
        if part is not None:
            part.save_pretrained(dst_dir)
    model.save_pretrained(dst_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------


def convert_blip_checkpoint(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[BlipMEDForImageTextPretraining | BlipMEDForQuestionAnswering, BlipProcessor | None]:
    r"""
    Converts a transformers BLIP (v1) checkpoint into vlbridge's BLIP MED model of its head, and saves it with
    transformers' `BlipProcessor`: `BlipForImageTextRetrieval` (ITM head, ITC projections) and
    `BlipForConditionalGeneration` (captioning decoder) become a [`BlipMEDForImageTextPretraining`] holding only those
    parts, `BlipForQuestionAnswering` a [`BlipMEDForQuestionAnswering`]. ITM logits, ITC cosines, caption and answer
    logits and generated tokens match transformers' (see the module docstring for the one difference: the VQA
    decoder does not read question padding, so a padded question is answered as transformers answers it alone).

    Args:
        src_dir (`str` or `os.PathLike`):
            Directory (or Hub id) of the transformers checkpoint.
        dst_dir (`str` or `os.PathLike`, *optional*):
            Where to save the converted model and processor; nothing is saved when `None`.
        dtype (`torch.dtype`, *optional*):
            Dtype to load the source in and to convert to.

    Returns:
        `(model, processor)`; `processor` is `None` (with a warning) when `src_dir` has no loadable tokenizer or image
        processor.

    Raises:
        `ValueError`: For another architecture (naming the accepted ones), weights that do not match the source's
            config (naming the keys), or a tokenizer the weights were not trained with.

    Example:

    ```python
    >>> import tempfile
    >>> import torch
    >>> from transformers import BlipConfig, BlipForQuestionAnswering
    >>> from vlbridge.conversion.blip import convert_blip_checkpoint
    >>> tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    >>> hf_config = BlipConfig(text_config=tiny, vision_config={**tiny, "image_size": 32, "patch_size": 8})
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     BlipForQuestionAnswering(hf_config).save_pretrained(tmp)  # no tokenizer: converts with a warning
    ...     model, processor = convert_blip_checkpoint(tmp)
    >>> type(model).__name__, processor
    ('BlipMEDForQuestionAnswering', None)
    >>> questions = torch.tensor([[101, 2054, 102]])
    >>> model.generate(torch.randn(1, 3, 32, 32), questions, max_new_tokens=3)[:, 0].tolist()  # starts with [DEC]
    [30522]
    ```

    With network access, a released checkpoint (`vlbridge convert SRC DST` does the same):

    ```python
    >>> model, processor = convert_blip_checkpoint("Salesforce/blip-vqa-base", "blip-vqa-vlbridge")  # doctest: +SKIP
    >>> inputs = processor(images=image, text="how many dogs?", return_tensors="pt")  # doctest: +SKIP
    >>> processor.batch_decode(model.generate(**inputs), skip_special_tokens=True)  # doctest: +SKIP
    ```
    """
    source_config = AutoConfig.from_pretrained(src_dir)
    architecture = _check_source(source_config, tuple(SOURCES), "convert_blip_checkpoint")
    source_class, target_class, _ = SOURCES[architecture]
    source = _load_source(source_class, src_dir, dtype)
    config = blip_med_config(source.config, architecture)

    tokenizer, image_processor = _load_processing(src_dir)
    if tokenizer is not None:
        _check_tokenizer(tokenizer, config)

    # Whatever the source lacks starts from a fixed seed, without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        model = target_class(config)
    fresh = _load_weights(model, blip_med_state_dict(source.state_dict()))
    _report_fresh(fresh, architecture)
    _cast(model, dtype)
    model.eval()

    processor = None
    if tokenizer is not None and image_processor is not None:
        processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if dst_dir is not None:
        _save(dst_dir, model, processor, tokenizer, image_processor)
        logger.info(f"Converted {architecture} checkpoint {src_dir} -> {dst_dir} ({type(model).__name__})")
    return model, processor


__all__ = ["blip_med_config", "blip_med_state_dict", "convert_blip_checkpoint"]
