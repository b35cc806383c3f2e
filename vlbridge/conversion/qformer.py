"""Convert transformers' BLIP-2 / InstructBLIP Q-Former configs and weights into [`QFormerModel`] ones.

[`QFormerModel`] mirrors BLIP-2's parameter names, so the weights convert by renames only:

| transformers key (after `prefix`)                 | `QFormerModel` key                   |
| ------------------------------------------------- | ------------------------------------ |
| `layernorm.*` (BLIP-2)                            | `embeddings.layernorm.*`             |
| `embeddings.{word,position}_embeddings.*`, `embeddings.layernorm.*` (InstructBLIP) | same |
| `encoder.layer.N.*`                               | same                                 |
| `query_tokens` (outside `prefix`)                 | `query_tokens`                       |

BLIP-2's Q-Former in transformers 5.x owns no text embeddings; [`Blip2ForImageTextRetrieval`] keeps them at the
top level (`embeddings.word_embeddings`), which `text_embeddings_prefix="embeddings."` picks up.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..configuration.configuration_qformer import QFormerConfig


if TYPE_CHECKING:
    import torch


# Fields with the same meaning and name in `Blip2QFormerConfig` / `InstructBlipQFormerConfig` and `QFormerConfig`.
_SHARED_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "initializer_range",
    "layer_norm_eps",
    "pad_token_id",
    "cross_attention_frequency",
    "encoder_hidden_size",
)
_TEXT_EMBEDDINGS = ("word_embeddings.", "position_embeddings.")
_KEPT = re.compile(r"^(encoder\.layer\.\d+\.|embeddings\.(word_embeddings|position_embeddings|layernorm)\.)")
_NON_PERSISTENT = {"embeddings.position_ids"}


def qformer_config_from_blip2(hf_qformer_config, num_query_tokens: int, use_text_input: bool) -> QFormerConfig:
    """
    Build a [`QFormerConfig`] equal to a transformers Q-Former config.

    Args:
        hf_qformer_config (`Blip2QFormerConfig` or `InstructBlipQFormerConfig`):
            The Q-Former config; a whole `Blip2Config` / `InstructBlipConfig` is accepted too (its `qformer_config`
            is read).
        num_query_tokens (`int`):
            Number of learned queries (`Blip2Config.num_query_tokens`; 32 in every released checkpoint).
        use_text_input (`bool`):
            Build the text branch. `True` for InstructBLIP and BLIP-2 stage-1 (`Blip2ForImageTextRetrieval`)
            checkpoints, `False` for `Blip2ForConditionalGeneration` ones, which hold no text embeddings.

    Returns:
        [`QFormerConfig`]
    """
    source = getattr(hf_qformer_config, "qformer_config", hf_qformer_config)
    fields = {name: getattr(source, name) for name in _SHARED_CONFIG_FIELDS}
    return QFormerConfig(num_query_tokens=num_query_tokens, use_text_input=use_text_input, **fields)


def qformer_state_dict_from_blip2(
    state_dict: Mapping[str, torch.Tensor],
    prefix: str = "qformer.",
    query_tokens_key: str | None = "query_tokens",
    query_tokens: torch.Tensor | None = None,
    text_embeddings_prefix: str | None = None,
) -> dict[str, torch.Tensor]:
    """
    Rename the Q-Former weights of a transformers BLIP-2 / InstructBLIP state dict to [`QFormerModel`] keys.

    Keys outside `prefix` (vision tower, language model, projection, ...) are ignored; keys inside it that the
    Q-Former does not know raise a `ValueError`, so nothing is dropped silently. Load the result with
    `model.load_state_dict(converted)`; for a BLIP-2 checkpoint build the model with `use_text_input=False`
    (its Q-Former has no text branch) and every key matches.

    Args:
        state_dict (`Mapping[str, torch.Tensor]`):
            State dict of `Blip2ForConditionalGeneration`, `Blip2Model`, `Blip2ForImageTextRetrieval`,
            `InstructBlipForConditionalGeneration`, `InstructBlipModel`, or of a bare `Blip2QFormerModel` /
            `InstructBlipQFormerModel` (then `prefix=""`).
        prefix (`str`, *optional*, defaults to `"qformer."`):
            Prefix of the Q-Former's keys in `state_dict`.
        query_tokens_key (`str`, *optional*, defaults to `"query_tokens"`):
            Full key of the `(1, num_query_tokens, hidden_size)` query parameter; skipped when absent or `None`.
        query_tokens (`torch.Tensor`, *optional*):
            The query tensor, given separately (a bare Q-Former state dict holds none). Overrides
            `query_tokens_key`. A `(num_query_tokens, hidden_size)` tensor is accepted too.
        text_embeddings_prefix (`str`, *optional*):
            Prefix of text embeddings kept outside the Q-Former (`"embeddings."` for
            `Blip2ForImageTextRetrieval` / `Blip2TextModelWithProjection`).

    Returns:
        `dict[str, torch.Tensor]`: the `QFormerModel` state dict (same tensors, no copies).

    Example:

    ```python
    >>> from transformers import Blip2QFormerConfig, Blip2QFormerModel
    >>> import torch
    >>> from vlbridge.conversion import qformer_config_from_blip2, qformer_state_dict_from_blip2
    >>> from vlbridge.modeling.modeling_qformer import QFormerModel

    >>> hf_config = Blip2QFormerConfig(
    ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, encoder_hidden_size=16
    ... )
    >>> hf_qformer, queries = Blip2QFormerModel(hf_config), torch.randn(1, 4, 32)
    >>> model = QFormerModel(qformer_config_from_blip2(hf_config, num_query_tokens=4, use_text_input=False))
    >>> converted = qformer_state_dict_from_blip2(hf_qformer.state_dict(), prefix="", query_tokens=queries)
    >>> model.load_state_dict(converted)
    <All keys matched successfully>
    ```"""
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        if text_embeddings_prefix is not None and key.startswith(text_embeddings_prefix):
            name = key[len(text_embeddings_prefix) :]
            if name.startswith(_TEXT_EMBEDDINGS):
                converted[f"embeddings.{name}"] = tensor
                continue
        if key == query_tokens_key or not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name.startswith("layernorm."):  # BLIP-2 5.x: the embedding LayerNorm sits on the Q-Former itself
            converted[f"embeddings.{name}"] = tensor
        elif _KEPT.match(name):
            converted[name] = tensor
        elif name not in _NON_PERSISTENT:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{len(unknown)} key(s) under prefix {prefix!r} are not Q-Former weights, e.g. {unknown[:5]}. Pass the "
            "prefix of the Q-Former's keys (`'qformer.'` for a full BLIP-2 / InstructBLIP model, `''` for a bare "
            "Q-Former)."
        )
    if query_tokens is None and query_tokens_key is not None:
        query_tokens = state_dict.get(query_tokens_key)
    if query_tokens is not None:
        converted["query_tokens"] = query_tokens if query_tokens.dim() == 3 else query_tokens.unsqueeze(0)
    return converted


__all__ = ["qformer_config_from_blip2", "qformer_state_dict_from_blip2"]
