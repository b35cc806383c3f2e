"""Initialise a Q-Former from a BERT checkpoint, as LAVIS' `Blip2Base.init_Qformer` does from bert-base-uncased.

| BERT key                                             | `QFormerModel` key                                  |
| ---------------------------------------------------- | --------------------------------------------------- |
| `embeddings.word_embeddings.weight`                  | same (first rows; extra rows such as `[DEC]` new)    |
| `embeddings.position_embeddings.weight`              | same, plus `token_type_embeddings[0]` (see below)   |
| `embeddings.LayerNorm.*`                             | `embeddings.layernorm.*`                            |
| `encoder.layer.N.attention.self.{query,key,value}.*` | `encoder.layer.N.attention.attention.*`             |
| `encoder.layer.N.attention.output.*`                 | same                                                |
| `encoder.layer.N.{intermediate,output}.*`            | same, and copied into `{intermediate,output}_query` |
| (none)                                               | `crossattention.*`, `query_tokens`: new             |
| `cls.predictions.transform.*`, `.bias`               | stage-1 `lm_head.{dense,LayerNorm}`, `decoder.bias` |

BERT adds `token_type_embeddings[0]` to every token, while the Q-Former (like LAVIS') has no token types. LAVIS
drops it; folding it into the position embeddings instead keeps BERT's function exactly (every text token takes one
position embedding, queries take none), so a text-only Q-Former pass equals `BertModel`'s output.

Tokenizer: BLIP-2 adds `[DEC]` as the BOS token of bert-base-uncased's tokenizer and uses it as the ITG decoder start
([`add_decoder_start_token`]); build the Q-Former with `vocab_size=len(tokenizer)`.
"""

from __future__ import annotations

import os
import re

import torch
from transformers import AutoModelForMaskedLM, BertConfig, PreTrainedModel
from transformers.utils import logging

from ..configuration.configuration_qformer import QFormerConfig
from ..configuration.configuration_qformer_pretraining import QFormerPretrainingConfig
from .qformer import _SHARED_CONFIG_FIELDS


logger = logging.get_logger(__name__)

# BertConfig fields that QFormerConfig has under the same name and meaning: BLIP-2's shared fields less the
# vocabulary (a [DEC] row may be added) and the cross-attention ones, which BERT does not have.
_SHARED_FIELDS = tuple(
    name
    for name in _SHARED_CONFIG_FIELDS
    if name not in ("vocab_size", "cross_attention_frequency", "encoder_hidden_size")
)
_LAYER_RENAMES = (
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.self\."), r"encoder.layer.\1.attention.attention."),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.output\."), r"encoder.layer.\1.attention.output."),
    (re.compile(r"^encoder\.layer\.(\d+)\.(intermediate|output)\."), r"encoder.layer.\1.\2."),
)
_FEED_FORWARD = re.compile(r"^encoder\.layer\.\d+\.(intermediate|output)\.")


def add_decoder_start_token(tokenizer, token: str = "[DEC]") -> int:
    """
    Adds BLIP-2's ITG decoder start token to a (BERT) tokenizer as its BOS token and returns its id, to pass as
    `decoder_start_token_id`. Resize the model's embeddings to `len(tokenizer)` afterwards (or build with it).

    Example:

    ```python
    >>> from tokenizers import Tokenizer, models
    >>> from transformers import PreTrainedTokenizerFast
    >>> from vlbridge.conversion.bert import add_decoder_start_token
    >>> vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "a": 4}
    >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")))
    >>> add_decoder_start_token(tokenizer), len(tokenizer)
    (5, 6)
    ```
    """
    tokenizer.add_special_tokens({"bos_token": token})
    return tokenizer.convert_tokens_to_ids(token)


def _load_bert(bert) -> tuple[BertConfig, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """BERT config, encoder state dict (no `bert.` prefix) and MLM-head state dict (empty when there is none)."""
    if isinstance(bert, (str, os.PathLike)):
        # The masked-LM class reads a bare BertModel checkpoint as well as one with its MLM head; the loading info
        # tells which it was.
        model, info = AutoModelForMaskedLM.from_pretrained(bert, output_loading_info=True)
        has_head = not any(k.startswith("cls.") for k in info["missing_keys"])
    elif isinstance(bert, PreTrainedModel):
        model, has_head = bert, hasattr(bert, "cls")
    else:
        raise TypeError(f"bert must be a checkpoint directory, a Hub id or a BERT model, got {type(bert)}.")
    if model.config.model_type != "bert":
        raise ValueError(f"Expected a BERT checkpoint, got model_type={model.config.model_type!r}.")
    encoder = getattr(model, "bert", model)
    head = {}
    if has_head:
        predictions = model.cls.predictions
        head = {f"transform.{k}": v for k, v in predictions.transform.state_dict().items()}
        head["bias"] = predictions.decoder.bias if predictions.decoder.bias is not None else predictions.bias
    return model.config, encoder.state_dict(), head


def qformer_state_dict_from_bert(bert_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """
    Renames a `BertModel` state dict to [`QFormerModel`] keys (see the module docstring), copying the feed-forward
    blocks into the query ones and folding the token-type-0 embedding into the position embeddings. Cross-attention
    and query tokens are absent: they start new.
    """
    converted = {
        "embeddings.word_embeddings.weight": bert_state["embeddings.word_embeddings.weight"],
        "embeddings.position_embeddings.weight": bert_state["embeddings.position_embeddings.weight"]
        + bert_state["embeddings.token_type_embeddings.weight"][0],
        "embeddings.layernorm.weight": bert_state["embeddings.LayerNorm.weight"],
        "embeddings.layernorm.bias": bert_state["embeddings.LayerNorm.bias"],
    }
    for key, tensor in bert_state.items():
        for pattern, replacement in _LAYER_RENAMES:
            if pattern.match(key):
                name = pattern.sub(replacement, key)
                converted[name] = tensor
                if _FEED_FORWARD.match(name):  # LAVIS: the query FFN starts as a copy of the text FFN
                    converted[re.sub(r"\.(intermediate|output)\.", r".\1_query.", name, count=1)] = tensor.clone()
                break
    return converted


def qformer_config_from_bert(
    bert_config: BertConfig,
    num_query_tokens: int,
    encoder_hidden_size: int,
    cross_attention_frequency: int = 2,
    **overrides,
) -> QFormerConfig:
    """A [`QFormerConfig`] with BERT's shape and the given queries / image width; `overrides` (e.g. `vocab_size`
    for an added `[DEC]`) may change anything that does not alter the shape of a BERT weight."""
    fields = {name: getattr(bert_config, name) for name in _SHARED_FIELDS}
    clashes = {k: (fields[k], v) for k, v in overrides.items() if k in fields and k not in _FREE_FIELDS}
    clashes = {k: pair for k, pair in clashes.items() if pair[0] != pair[1]}
    if clashes:
        raise ValueError(f"These overrides would change the shape of BERT's weights (BERT, override): {clashes}.")
    fields.update(overrides)
    fields.setdefault("vocab_size", bert_config.vocab_size)
    return QFormerConfig(
        num_query_tokens=num_query_tokens,
        encoder_hidden_size=encoder_hidden_size,
        cross_attention_frequency=cross_attention_frequency,
        use_text_input=True,
        **fields,
    )


# Fields an override may change freely (they shape no BERT weight that is copied whole).
_FREE_FIELDS = {"hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "pad_token_id"}


# Vocabulary / position tables, which may legitimately differ in length from BERT's.
_RESIZABLE = ("word_embeddings.weight", "position_embeddings.weight", "decoder.bias")


def _load_into(model, converted: dict[str, torch.Tensor], prefix: str = ""):
    """Copies `converted` into `model`; word / position tables of another size take their first rows (new rows keep
    their normal(initializer_range) initialisation, as `resize_token_embeddings` would give them)."""
    state = model.state_dict()
    with torch.no_grad():
        for key, tensor in converted.items():
            target = state[prefix + key]
            if target.shape == tensor.shape:
                target.copy_(tensor)
            elif key.endswith(_RESIZABLE) and target.shape[1:] == tensor.shape[1:]:
                rows = min(target.shape[0], tensor.shape[0])
                target[:rows].copy_(tensor[:rows])
            else:
                raise ValueError(f"{key}: BERT has shape {tuple(tensor.shape)}, the model {tuple(target.shape)}.")


def qformer_from_bert(
    bert,
    num_query_tokens: int,
    encoder_hidden_size: int,
    cross_attention_frequency: int = 2,
    **overrides,
):
    """
    Builds a [`QFormerModel`] initialised from BERT as BLIP-2 does: embeddings, self-attention and feed-forward
    blocks from BERT (the feed-forward blocks in both the text and the query branch); cross-attention and query
    tokens new.

    Args:
        bert (`str`, `os.PathLike` or `BertModel` / `BertForMaskedLM`):
            A BERT checkpoint directory (or Hub id), or a loaded model.
        num_query_tokens (`int`):
            Number of learned queries (32 in BLIP-2).
        encoder_hidden_size (`int`):
            Width of the image features (the vision tower's hidden size).
        cross_attention_frequency (`int`, *optional*, defaults to 2):
            Layer `i` cross-attends when `i % cross_attention_frequency == 0`.
        overrides:
            Further [`QFormerConfig`] fields, e.g. `vocab_size=len(tokenizer)` after [`add_decoder_start_token`].

    Returns:
        [`QFormerModel`] (in training mode, as any freshly built model).

    Example:

    ```python
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from vlbridge.conversion.bert import qformer_from_bert
    >>> bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                             intermediate_size=64)).eval()
    >>> qformer = qformer_from_bert(bert, num_query_tokens=4, encoder_hidden_size=16).eval()
    >>> ids = torch.tensor([[2, 7, 9, 3]])
    >>> text = qformer(input_ids=ids, use_queries=False).last_hidden_state
    >>> torch.allclose(text, bert(input_ids=ids).last_hidden_state, atol=1e-5)
    True
    ```
    """
    from ..modeling.modeling_qformer import QFormerModel

    bert_config, bert_state, _ = _load_bert(bert)
    config = qformer_config_from_bert(
        bert_config, num_query_tokens, encoder_hidden_size, cross_attention_frequency, **overrides
    )
    qformer = QFormerModel(config)
    _load_into(qformer, qformer_state_dict_from_bert(bert_state))
    return qformer


def pretraining_model_from_bert(
    bert,
    vision_config=None,
    vision_path: str | os.PathLike | None = None,
    num_query_tokens: int = 32,
    cross_attention_frequency: int = 2,
    qformer_overrides: dict | None = None,
    **config_kwargs,
):
    """
    Builds a [`QFormerForImageTextPretraining`] whose Q-Former (and ITG head, when the checkpoint has BERT's MLM head)
    starts from BERT, with a vision tower from `vision_path` (pretrained) or `vision_config` (random).

    Args:
        bert (`str`, `os.PathLike` or a BERT model):
            See [`qformer_from_bert`].
        vision_config (`PreTrainedConfig` or `dict`, *optional*):
            Vision tower config, when `vision_path` is not given.
        vision_path (`str` or `os.PathLike`, *optional*):
            A vision checkpoint, or a CLIP / SigLIP one whose image half is kept.
        num_query_tokens (`int`, *optional*, defaults to 32):
            Number of learned queries.
        cross_attention_frequency (`int`, *optional*, defaults to 2):
            See [`QFormerConfig`].
        qformer_overrides (`dict`, *optional*):
            Further Q-Former fields, e.g. `{"vocab_size": len(tokenizer)}` after [`add_decoder_start_token`].
        config_kwargs:
            [`QFormerPretrainingConfig`] fields (`embed_dim`, `decoder_start_token_id`, `eos_token_id`, ...).
    """
    from ..modeling.from_pretrained_parts import _vision_weights
    from ..modeling.modeling_qformer_pretraining import QFormerForImageTextPretraining

    if (vision_config is None) == (vision_path is None):
        raise ValueError("Pass exactly one of vision_config (random tower) and vision_path (pretrained tower).")
    vision_state = None
    if vision_path is not None:
        vision_config, vision_state = _vision_weights(vision_path, dtype=None)
    vision_config = vision_config.to_dict() if hasattr(vision_config, "to_dict") else dict(vision_config)
    bert_config, bert_state, head = _load_bert(bert)
    qformer_config = qformer_config_from_bert(
        bert_config,
        num_query_tokens,
        vision_config["hidden_size"],
        cross_attention_frequency,
        **(qformer_overrides or {}),
    )
    config = QFormerPretrainingConfig(
        vision_config=vision_config, qformer_config=qformer_config.to_dict(), **config_kwargs
    )
    model = QFormerForImageTextPretraining(config)
    _load_into(model, qformer_state_dict_from_bert(bert_state), prefix="qformer.")
    if head:
        lm_head = {k.replace("transform.", ""): v for k, v in head.items() if k.startswith("transform.")}
        _load_into(model, {**lm_head, "decoder.bias": head["bias"]}, prefix="lm_head.")
    else:
        logger.warning("The BERT checkpoint has no MLM head: the ITG head's transform starts new.")
    if vision_state is not None:
        _load_vision(model.vision_tower, vision_state, vision_path)
    if config.use_momentum_distillation:
        model.copy_params()
    return model


def _load_vision(tower, vision_state: dict[str, torch.Tensor], vision_path):
    if all(k.startswith("vision_model.") for k in tower.state_dict()):  # towers that nest their transformer
        vision_state = {
            k if k.startswith("vision_model.") else f"vision_model.{k}": v for k, v in vision_state.items()
        }
    missing = tower.load_state_dict(vision_state, strict=False).missing_keys
    if missing:
        raise ValueError(f"{vision_path} lacks vision weights {missing[:5]}...")


__all__ = [
    "add_decoder_start_token",
    "pretraining_model_from_bert",
    "qformer_config_from_bert",
    "qformer_from_bert",
    "qformer_state_dict_from_bert",
]
