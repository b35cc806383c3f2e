"""Convert transformers' BLIP-2 stage-1 and bare Q-Former checkpoints into vlbridge models.

`Blip2ForImageTextRetrieval` (BLIP-2's stage-1 weights, e.g. `Salesforce/blip2-itm-vit-g`) becomes a
[`QFormerForImageTextPretraining`]; `Blip2Model` and `Blip2QFormerModel` become a [`QFormerModel`]. Weights convert
by renames only:

| transformers key (`Blip2ForImageTextRetrieval`)  | `QFormerForImageTextPretraining` key                     |
| ------------------------------------------------ | -------------------------------------------------------- |
| `vision_model.*`                                 | `vision_tower.*` (the same `Blip2VisionModel`)            |
| `query_tokens`                                   | `qformer.query_tokens`                                   |
| `embeddings.{word,position}_embeddings.*`        | `qformer.embeddings.{word,position}_embeddings.*`        |
| `qformer.layernorm.*`                            | `qformer.embeddings.layernorm.*`                         |
| `qformer.encoder.layer.N.*`                      | `qformer.encoder.layer.N.*`                              |
| `vision_projection.*`, `text_projection.*`       | `vision_proj.*`, `text_proj.*`                           |
| `itm_head.*`                                     | `itm_head.*`                                             |
| (none)                                           | `lm_head.*` (ITG head, see below), `temp` (0.07)         |

The converted model computes what transformers' does: the Q-Former reads the vision tower's `last_hidden_state`, which
in `Blip2VisionModel` already went through `post_layernorm` (LAVIS' `ln_vision`, which transformers folded into the
vision model), so the stage-1 model's lack of a separate `ln_vision` changes nothing. Query and text embeddings are
concatenated before one LayerNorm and dropout in both implementations, text positions start at 0, queries take none.

What transformers' retrieval checkpoint does not hold, and what it starts as here:

- **ITG head** (`lm_head`): transformers dropped LAVIS' `Qformer.cls.predictions.*` when it converted the stage-1
  weights. `lm_head.decoder.weight` is tied to the converted word embeddings (BERT-style tying,
  `tie_word_embeddings=True`), so it is trained; the transform (`dense`, `LayerNorm`) and `decoder.bias` start fresh
  (seeded normal(0, `initializer_range`) weights, zero biases, unit LayerNorm). ITC and ITM match transformers
  exactly; captioning (`generate_captions`) and the ITG loss are untrained until the model is trained further.
- **Temperature** (`temp`): transformers' retrieval model has none (its ITC logits are plain cosines), so `temp`
  starts at `temperature_init` (0.07, BLIP-2's initial value). `forward(return_loss=False).logits_per_image` equals
  transformers' `logits_per_image / temp`; the rankings are the same.
- **`[DEC]`** (the ITG decoder start): found in the tokenizer or added to it ([`add_decoder_start_token`]); a row it
  gets beyond the source vocabulary starts as the mean of the trained rows.

Tokenizer and image processor: saved beside the model as the stage-1 folders trained here are (a [`BridgeProcessor`]
holding both, loadable with `AutoTokenizer` / `AutoImageProcessor` / `AutoProcessor`). When the source folder has no
loadable tokenizer or image processor, the model still converts, `processor` is `None`, a warning says so, and
`decoder_start_token_id` / `eos_token_id` are left `None` (ITG refuses to run until they are set).
"""

from __future__ import annotations

import os

import torch
from tokenizers import AddedToken
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    Blip2ForImageTextRetrieval,
    Blip2Model,
    Blip2QFormerModel,
)
from transformers.utils import cached_file, logging

from ..configuration.configuration_qformer_pretraining import QFormerPretrainingConfig
from ..modeling.modeling_qformer import QFormerModel
from ..modeling.modeling_qformer_pretraining import QFormerForImageTextPretraining
from ..processing import BridgeProcessor
from .bert import add_decoder_start_token
from .qformer import qformer_config_from_blip2, qformer_state_dict_from_blip2


logger = logging.get_logger(__name__)

DECODER_START_TOKEN = "[DEC]"
IMAGE_TOKEN = "<image>"
# Parameters transformers' checkpoint lacks start from this seed, so that converting twice writes the same files.
INIT_SEED = 0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
QFORMER_SOURCES = {"Blip2Model": Blip2Model, "Blip2QFormerModel": Blip2QFormerModel}


def _architecture(config) -> str | None:
    return (getattr(config, "architectures", None) or [None])[0]


def _load_source(model_class, src_dir, dtype: torch.dtype | None):
    """`model_class.from_pretrained`, refusing a folder whose weights do not match its config: transformers would only
    warn and initialise a missing weight at random, or drop an unexpected one."""
    model, info = model_class.from_pretrained(
        src_dir, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True
    )
    problems = []
    for name, what in (
        ("missing_keys", "missing from the weights"),
        ("unexpected_keys", "in the weights but not in the config's model"),
        ("mismatched_keys", "of a shape the config does not give"),
    ):
        keys = sorted(str(key) for key in info.get(name) or ())
        if keys:
            problems.append(f"{len(keys)} key(s) {what}: {keys[:5]}")
    if problems:
        raise ValueError(
            f"The weights in {src_dir} do not match its config ({model_class.__name__}): "
            + "; ".join(problems)
            + ". Re-save the checkpoint with transformers' `save_pretrained` from a model built with this config."
        )
    return model.eval()


def _check_source(config, accepted: tuple[str, ...], function: str) -> str:
    """The folder's architecture, or a `ValueError` naming what `function` takes."""
    architecture = _architecture(config)
    if architecture is None and config.model_type == "blip_2_qformer":
        architecture = "Blip2QFormerModel"
    if architecture not in accepted:
        raise ValueError(
            f"The checkpoint holds a '{config.model_type}' model ({architecture or 'no architecture'}); {function} "
            f"takes {', '.join(accepted)} checkpoints. `vlbridge.conversion.convert_checkpoint` picks the converter "
            "of any architecture vlbridge converts."
        )
    return architecture


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer and image processor of a retrieval checkpoint
# ---------------------------------------------------------------------------------------------------------------------


def _has_tokenizer_files(src_dir) -> bool:
    # Without them AutoTokenizer does not fail: it falls back to an empty GPT-2 tokenizer.
    return any(
        cached_file(src_dir, name, _raise_exceptions_for_missing_entries=False) is not None for name in TOKENIZER_FILES
    )


def _load_processing(src_dir):
    """`(tokenizer, image_processor)`; a part that cannot be loaded is `None`, with a warning."""
    parts = []
    for name, auto in (("tokenizer", AutoTokenizer), ("image processor", AutoImageProcessor)):
        try:
            if name == "tokenizer" and not _has_tokenizer_files(src_dir):
                raise OSError(f"none of {', '.join(TOKENIZER_FILES)}")
            parts.append(auto.from_pretrained(src_dir))
        except (OSError, ValueError, TypeError, KeyError) as error:
            parts.append(None)
            fix = " and set config.decoder_start_token_id / eos_token_id (BERT's [DEC], [SEP]) before ITG"
            logger.warning(
                f"No processor converted: {src_dir} has no loadable {name} ({type(error).__name__}: {error}). The "
                f"model converts without it; save the stage-1 processor beside it yourself"
                f"{fix if name == 'tokenizer' else ''}."
            )
    return tuple(parts)


def _check_tokenizer_fits(tokenizer, vocab_size: int) -> None:
    """Every id the tokenizer gives text has a trained embedding row: `<image>` (which stage-1 models never read) and
    `[DEC]` (which may be new) aside."""
    skipped = {str(getattr(tokenizer, "image_token", None) or IMAGE_TOKEN), DECODER_START_TOKEN}
    too_large = sorted(
        (index, token)
        for token, index in tokenizer.get_vocab().items()
        if index >= vocab_size and token not in skipped
    )
    if too_large:
        raise ValueError(
            f"The tokenizer beside the checkpoint has ids the Q-Former's {vocab_size} word embeddings do not cover, "
            f"e.g. {too_large[:5]}: it is not the tokenizer this checkpoint was trained with. Save the right one "
            "(bert-base-uncased plus [DEC] for BLIP-2) in the folder, or remove it to convert without a processor."
        )


def _prepare_tokenizer(tokenizer) -> dict[str, int]:
    """Adds `[DEC]` (the ITG decoder start) and `<image>` (the processor's placeholder, never read by a stage-1 model)
    when missing, gives a BERT tokenizer `[SEP]` as its EOS (the stage-1 collator ends captions with EOS), and returns
    the stage-1 config's token ids."""
    if DECODER_START_TOKEN in tokenizer.get_vocab():
        decoder_start = tokenizer.convert_tokens_to_ids(DECODER_START_TOKEN)
    else:
        decoder_start = add_decoder_start_token(tokenizer, DECODER_START_TOKEN)
        logger.info(f"Added {DECODER_START_TOKEN} to the tokenizer as id {decoder_start} (the ITG decoder start).")
    if tokenizer.eos_token is None and tokenizer.sep_token is not None:
        tokenizer.eos_token = tokenizer.sep_token
    image_token = str(getattr(tokenizer, "image_token", None) or IMAGE_TOKEN)
    if image_token not in tokenizer.get_vocab():
        # Added here rather than by BridgeProcessor, whose warning asks for an embedding resize a stage-1 model does
        # not need: stage-1 models never read the image token (stage-1 folders trained here have it out of range too).
        tokenizer.add_tokens([AddedToken(image_token, normalized=False, special=True)], special_tokens=True)
    return {
        "decoder_start_token_id": decoder_start,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _pad_rows(weight: torch.Tensor, num_rows: int) -> torch.Tensor:
    """`weight` `(V, H)` grown to `(num_rows, H)`; new rows are the mean of the trained ones (deterministic)."""
    if num_rows <= weight.shape[0]:
        return weight
    extra = weight.mean(dim=0, keepdim=True).expand(num_rows - weight.shape[0], -1)  # (num_rows - V, H)
    return torch.cat([weight, extra], dim=0)


# ---------------------------------------------------------------------------------------------------------------------
# Blip2ForImageTextRetrieval -> QFormerForImageTextPretraining
# ---------------------------------------------------------------------------------------------------------------------


def _stage1_config(source_config, vocab_size: int, token_ids: dict[str, int | None]) -> QFormerPretrainingConfig:
    if not source_config.qformer_config.use_qformer_text_input:
        raise ValueError(
            "This Blip2ForImageTextRetrieval checkpoint's Q-Former has no text branch "
            "(qformer_config.use_qformer_text_input=False), so transformers itself cannot run its text pass; set it "
            "to True in config.json if the weights hold the text feed-forward blocks."
        )
    qformer_config = qformer_config_from_blip2(source_config, source_config.num_query_tokens, use_text_input=True)
    qformer_config.vocab_size = vocab_size
    return QFormerPretrainingConfig(
        vision_config=source_config.vision_config.to_dict(),
        qformer_config=qformer_config.to_dict(),
        embed_dim=source_config.image_text_hidden_size,
        initializer_range=source_config.initializer_range,
        **token_ids,
    )


def _stage1_state_dict(source: Blip2ForImageTextRetrieval, vocab_size: int) -> dict[str, torch.Tensor]:
    """The converted weights of every part transformers has (not `lm_head`'s transform, `temp`)."""
    state = source.state_dict()
    qformer = qformer_state_dict_from_blip2(state, prefix="qformer.", text_embeddings_prefix="embeddings.")
    words = "embeddings.word_embeddings.weight"
    qformer[words] = _pad_rows(qformer[words], vocab_size)
    converted = {f"qformer.{key}": value for key, value in qformer.items()}
    converted.update({f"vision_tower.{k}": v for k, v in source.vision_model.state_dict().items()})
    for source_name, name in (
        ("vision_projection", "vision_proj"),
        ("text_projection", "text_proj"),
        ("itm_head", "itm_head"),
    ):
        converted.update({f"{name}.{k}": v for k, v in getattr(source, source_name).state_dict().items()})
    return converted


def _load_stage1_weights(model: QFormerForImageTextPretraining, converted: dict[str, torch.Tensor]) -> None:
    """Loads `converted`; every model weight except the fresh ITG transform / bias and `temp` must be in it."""
    fresh = {"temp", "lm_head.dense.weight", "lm_head.dense.bias", "lm_head.LayerNorm.weight"}
    fresh |= {"lm_head.LayerNorm.bias", "lm_head.decoder.bias", "lm_head.decoder.weight"}  # decoder: tied to words
    result = model.load_state_dict(converted, strict=False)
    missing = sorted(set(result.missing_keys) - fresh)
    if missing or result.unexpected_keys:
        raise ValueError(
            f"Conversion bug: the stage-1 model lacks {result.unexpected_keys[:5]} and the source lacks {missing[:5]}."
        )


def convert_blip2_retrieval_checkpoint(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[QFormerForImageTextPretraining, BridgeProcessor | None]:
    r"""
    Converts a transformers `Blip2ForImageTextRetrieval` checkpoint (BLIP-2's stage 1, e.g.
    `Salesforce/blip2-itm-vit-g`) into a [`QFormerForImageTextPretraining`], and its BERT tokenizer and image processor
    into the stage-1 processor. ITM logits, ITC similarities and the image / text embeddings match transformers'
    (`forward(..., use_image_text_matching_head=True)` is `compute_itm_logits`; with `False`, transformers'
    `logits_per_image` is the best query's cosine of `get_image_features` and `get_text_features`).

    The ITG head and the temperature are not in transformers' checkpoint: see the module docstring for what they start
    as (the decoder is tied to the trained word embeddings; its transform and bias start fresh; `temp` is 0.07).

    Args:
        src_dir (`str` or `os.PathLike`):
            Directory (or Hub id) of the transformers checkpoint.
        dst_dir (`str` or `os.PathLike`, *optional*):
            Where to save the converted model and processor; nothing is saved when `None`.
        dtype (`torch.dtype`, *optional*):
            Dtype to load the source in; the vision tower keeps it, the Q-Former and heads stay fp32.

    Returns:
        `(model, processor)`; `processor` is `None` (with a warning) when `src_dir` has no loadable tokenizer or image
        processor.

    Raises:
        `ValueError`: For another architecture, a Q-Former without text branch, or weights that do not match the
            config (the keys are named).

    Example:

    ```python
    >>> from vlbridge.conversion.blip2_retrieval import convert_blip2_retrieval_checkpoint
    >>> model, processor = convert_blip2_retrieval_checkpoint("blip2-itm-vit-g", "itm-vlbridge")  # doctest: +SKIP
    >>> model.compute_itm_logits(model.get_vision_features(pixel_values), input_ids, attention_mask)  # doctest: +SKIP
    ```
    """
    source_config = AutoConfig.from_pretrained(src_dir)
    _check_source(source_config, ("Blip2ForImageTextRetrieval",), "convert_blip2_retrieval_checkpoint")
    source = _load_source(Blip2ForImageTextRetrieval, src_dir, dtype)

    tokenizer, image_processor = _load_processing(src_dir)
    source_vocab = source_config.qformer_config.vocab_size
    token_ids = {
        "decoder_start_token_id": None,
        "eos_token_id": None,
        "pad_token_id": source_config.qformer_config.pad_token_id,
    }
    if tokenizer is not None:
        token_ids = _prepare_tokenizer(tokenizer)
    if tokenizer is not None:
        _check_tokenizer_fits(tokenizer, source_vocab)
    vocab_size = max(source_vocab, (token_ids["decoder_start_token_id"] or 0) + 1)
    config = _stage1_config(source_config, vocab_size, token_ids)

    # The fresh ITG transform is seeded without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        model = QFormerForImageTextPretraining(config)
    _load_stage1_weights(model, _stage1_state_dict(source, vocab_size))
    model.vision_tower.to(source.vision_model.dtype)
    model.eval()
    if vocab_size > source_vocab:
        logger.warning(
            f"The Q-Former's vocabulary grew from {source_vocab} to {vocab_size} rows for {DECODER_START_TOKEN} (id "
            f"{token_ids['decoder_start_token_id']}); the new rows start as the mean of the trained ones."
        )

    processor = None
    if tokenizer is not None and image_processor is not None:
        processor = BridgeProcessor(
            image_processor, tokenizer, num_image_tokens=config.qformer_config.num_query_tokens
        )
    if dst_dir is not None:
        # Processing files first, so that the model's save adds `auto_map` to processor_config.json too. A lone
        # tokenizer or image processor is saved as it is.
        for part in (processor,) if processor is not None else (tokenizer, image_processor):
            if part is not None:
                part.save_pretrained(dst_dir)
        model.save_pretrained(dst_dir)
        logger.info(f"Converted Blip2ForImageTextRetrieval checkpoint {src_dir} -> {dst_dir}")
    return model, processor


# ---------------------------------------------------------------------------------------------------------------------
# Blip2Model / Blip2QFormerModel -> QFormerModel
# ---------------------------------------------------------------------------------------------------------------------


def _initial_queries(num_query_tokens: int, hidden_size: int, std: float) -> torch.Tensor:
    """LAVIS' initialisation of new queries, normal(0, initializer_range), seeded: `(1, Q, H)`."""
    generator = torch.Generator().manual_seed(INIT_SEED)
    return torch.randn(1, num_query_tokens, hidden_size, generator=generator) * std


def _qformer_weights(architecture: str, source, query_tokens, num_query_tokens) -> tuple[dict[str, torch.Tensor], int]:
    """The `QFormerModel` state dict of a `Blip2Model` / `Blip2QFormerModel`, and its number of queries."""
    hf_qformer_config = getattr(source.config, "qformer_config", source.config)
    state = source.state_dict()
    if architecture == "Blip2Model":
        if query_tokens is not None or num_query_tokens is not None:
            raise ValueError("A Blip2Model has its own query tokens: pass neither query_tokens nor num_query_tokens.")
        logger.warning(
            "Only the Blip2Model's Q-Former and query tokens are converted; its vision tower, language projection and "
            "language model are left out (convert a Blip2ForConditionalGeneration folder for the whole VLM)."
        )
        converted = qformer_state_dict_from_blip2(state, prefix="qformer.", query_tokens_key="query_tokens")
        num_queries = source.config.num_query_tokens
    else:
        if query_tokens is None:
            num_queries = 32 if num_query_tokens is None else num_query_tokens
            query_tokens = _initial_queries(
                num_queries, hf_qformer_config.hidden_size, hf_qformer_config.initializer_range
            )
            logger.warning(
                f"A Blip2QFormerModel holds no query tokens: the {num_queries} converted queries start at "
                "normal(0, initializer_range) (seeded) and are untrained. Pass `query_tokens=` (e.g. a Blip2Model's) "
                "to convert trained ones, or call the model with `query_embeds=` as transformers' Q-Former is called."
            )
        if query_tokens.dim() not in (2, 3) or query_tokens.shape[-1] != hf_qformer_config.hidden_size:
            raise ValueError(
                f"query_tokens must be (1, num_query_tokens, {hf_qformer_config.hidden_size}) for this Q-Former, got "
                f"{tuple(query_tokens.shape)}."
            )
        num_queries = query_tokens.shape[-2]
        converted = qformer_state_dict_from_blip2(state, prefix="", query_tokens_key=None, query_tokens=query_tokens)
    return converted, num_queries


def convert_blip2_qformer_checkpoint(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    query_tokens: torch.Tensor | None = None,
    num_query_tokens: int | None = None,
) -> tuple[QFormerModel, None]:
    r"""
    Converts the Q-Former of a transformers `Blip2Model`, or a bare `Blip2QFormerModel`, into a [`QFormerModel`]
    (fp32, no text branch). `QFormerModel(image_embeds=vision_features).image_tokens` then equals transformers'
    `Blip2Model.get_qformer_features`, and `QFormerModel(image_embeds=..., query_embeds=q)` equals
    `Blip2QFormerModel(query_embeds=q, encoder_hidden_states=...)`.

    A `Blip2Model`'s vision tower, projection and language model are left out (a warning says so):
    [`convert_blip2_checkpoint`] builds a whole VLM from a `Blip2ForConditionalGeneration` folder.

    A `Blip2QFormerModel` folder holds no query tokens (transformers passes them in as `query_embeds`). Unless
    `query_tokens` is given, the converted queries start as LAVIS initialises new ones, normal(0,
    `initializer_range`) from a fixed seed, and a warning says so: the Q-Former is ready to train, or to run with
    `query_embeds`, but its own queries are untrained.

    Args:
        src_dir (`str` or `os.PathLike`):
            Directory (or Hub id) of the transformers `Blip2Model` or `Blip2QFormerModel` checkpoint.
        dst_dir (`str` or `os.PathLike`, *optional*):
            Where to save the converted Q-Former; nothing is saved when `None`.
        dtype (`torch.dtype`, *optional*):
            Dtype to load the source in; the Q-Former is converted in fp32.
        query_tokens (`torch.Tensor` of shape `(1, num_query_tokens, hidden_size)`, *optional*):
            Trained queries for a `Blip2QFormerModel` (refused for a `Blip2Model`, which has its own).
        num_query_tokens (`int`, *optional*):
            Number of fresh queries for a `Blip2QFormerModel` without `query_tokens` (default 32, BLIP-2's).

    Returns:
        `(model, None)`: a Q-Former has no processor of its own.

    Example:

    ```python
    >>> import tempfile
    >>> import torch
    >>> from transformers import Blip2QFormerConfig, Blip2QFormerModel
    >>> from vlbridge.conversion.blip2_retrieval import convert_blip2_qformer_checkpoint
    >>> hf_config = Blip2QFormerConfig(
    ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, encoder_hidden_size=16
    ... )
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     Blip2QFormerModel(hf_config).save_pretrained(tmp)
    ...     model, _ = convert_blip2_qformer_checkpoint(tmp, query_tokens=torch.randn(1, 4, 32))
    >>> model(image_embeds=torch.randn(2, 10, 16)).image_tokens.shape
    torch.Size([2, 4, 32])
    ```
    """
    source_config = AutoConfig.from_pretrained(src_dir)
    architecture = _check_source(source_config, tuple(QFORMER_SOURCES), "convert_blip2_qformer_checkpoint")
    source = _load_source(QFORMER_SOURCES[architecture], src_dir, dtype)
    hf_qformer_config = getattr(source_config, "qformer_config", source_config)
    if hf_qformer_config.use_qformer_text_input:
        raise ValueError(
            f"This {architecture}'s Q-Former has text feed-forward blocks (use_qformer_text_input=True) but no text "
            "embeddings to read text with; convert its Blip2ForImageTextRetrieval checkpoint instead, or set "
            "use_qformer_text_input=False and re-save it to keep the query path only."
        )
    converted, num_queries = _qformer_weights(architecture, source, query_tokens, num_query_tokens)
    model = QFormerModel(qformer_config_from_blip2(hf_qformer_config, num_queries, use_text_input=False))
    model.load_state_dict({key: value.float() for key, value in converted.items()})
    model.eval()
    if dst_dir is not None:
        model.save_pretrained(dst_dir)
        logger.info(f"Converted {architecture} checkpoint {src_dir} -> {dst_dir}")
    return model, None


__all__ = ["convert_blip2_qformer_checkpoint", "convert_blip2_retrieval_checkpoint"]
