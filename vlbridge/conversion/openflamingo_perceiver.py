"""Rename OpenFlamingo's `PerceiverResampler` weights to [`PerceiverResamplerModel`] keys.

The blocks are the same (see `vlbridge.modeling.modeling_perceiver`); only the names differ, and OpenFlamingo's fused
key / value projection is split in two:

| OpenFlamingo key (after `prefix`)      | `PerceiverResamplerModel` key                        |
| -------------------------------------- | ---------------------------------------------------- |
| `latents`                              | `latents`                                            |
| `frame_embs`                           | `media_time_embeddings` (`num_frames` = its rows)    |
| `layers.{i}.0.norm_media.*`            | `layers.{i}.image_layernorm.*`                       |
| `layers.{i}.0.norm_latents.*`          | `layers.{i}.latents_layernorm.*`                     |
| `layers.{i}.0.to_q.weight`             | `layers.{i}.attention.q_proj.weight`                 |
| `layers.{i}.0.to_kv.weight`            | rows split in halves: `...k_proj.weight`, `...v_proj.weight` |
| `layers.{i}.0.to_out.weight`           | `layers.{i}.attention.o_proj.weight`                 |
| `layers.{i}.1.0.*` (feed-forward norm) | `layers.{i}.post_attention_layernorm.*`              |
| `layers.{i}.1.1.weight`, `1.3.weight`  | `layers.{i}.mlp.fc1.weight`, `mlp.fc2.weight`        |
| `norm.*`                               | `layernorm.*`                                        |

OpenFlamingo's `media_time_embs` (over the index of a medium in a sample) has no counterpart, since each medium is
resampled on its own: a state dict holding it raises. OpenFlamingo has no input projection, so the target config has
`encoder_hidden_size == hidden_size`, `hidden_act="gelu"` (its `nn.GELU`) and `ff_mult` = its `ff_mult`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch


# OpenFlamingo name (after `layers.{i}.`) -> ours; `to_kv` is split separately.
_LAYER_KEYS = {
    "0.norm_media.weight": "image_layernorm.weight",
    "0.norm_media.bias": "image_layernorm.bias",
    "0.norm_latents.weight": "latents_layernorm.weight",
    "0.norm_latents.bias": "latents_layernorm.bias",
    "0.to_q.weight": "attention.q_proj.weight",
    "0.to_out.weight": "attention.o_proj.weight",
    "1.0.weight": "post_attention_layernorm.weight",
    "1.0.bias": "post_attention_layernorm.bias",
    "1.1.weight": "mlp.fc1.weight",
    "1.3.weight": "mlp.fc2.weight",
}
_TOP_KEYS = {
    "latents": "latents",
    "frame_embs": "media_time_embeddings",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def openflamingo_perceiver_state_dict(
    state_dict: Mapping[str, torch.Tensor], prefix: str = "perceiver."
) -> dict[str, torch.Tensor]:
    """
    Rename the Perceiver Resampler weights of an OpenFlamingo state dict to [`PerceiverResamplerModel`] keys.

    Keys outside `prefix` (vision encoder, language model, gated cross-attention, ...) are ignored; keys inside it
    that the Perceiver does not know, and `media_time_embs`, raise a `ValueError`, so nothing is dropped silently.

    Args:
        state_dict (`Mapping[str, torch.Tensor]`):
            State dict of an OpenFlamingo `Flamingo` model (`perceiver.*`) or of a bare `PerceiverResampler` (then
            `prefix=""`).
        prefix (`str`, *optional*, defaults to `"perceiver."`):
            Prefix of the Perceiver's keys in `state_dict`.

    Returns:
        `dict[str, torch.Tensor]`: the `PerceiverResamplerModel` state dict. Renamed tensors are the same objects;
        `to_kv` is split into two views (`k_proj`, `v_proj`) of the original tensor.

    Example:

    ```python
    >>> import torch
    >>> from vlbridge.conversion.openflamingo_perceiver import openflamingo_perceiver_state_dict
    >>> converted = openflamingo_perceiver_state_dict(
    ...     {"perceiver.latents": torch.zeros(4, 8), "perceiver.layers.0.0.to_kv.weight": torch.zeros(32, 8)}
    ... )
    >>> {key: tuple(tensor.shape) for key, tensor in converted.items()}
    {'latents': (4, 8), 'layers.0.attention.k_proj.weight': (16, 8), 'layers.0.attention.v_proj.weight': (16, 8)}
    ```"""
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        layer = _LAYER.match(name)
        if name in _TOP_KEYS:
            converted[_TOP_KEYS[name]] = tensor
        elif layer is not None and layer.group(2) == "0.to_kv.weight":
            # `to_kv(x).chunk(2, dim=-1)`: the first half of the output rows are the keys, the second the values.
            key_weight, value_weight = tensor.chunk(2, dim=0)
            converted[f"layers.{layer.group(1)}.attention.k_proj.weight"] = key_weight
            converted[f"layers.{layer.group(1)}.attention.v_proj.weight"] = value_weight
        elif layer is not None and layer.group(2) in _LAYER_KEYS:
            converted[f"layers.{layer.group(1)}.{_LAYER_KEYS[layer.group(2)]}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        media = [key for key in unknown if key.endswith("media_time_embs")]
        hint = (
            f" {media[0]!r} embeds a medium's index among the media of a sample; vlbridge resamples each medium on "
            "its own and has no such table."
            if media
            else ""
        )
        raise ValueError(
            f"{len(unknown)} key(s) under prefix {prefix!r} are not OpenFlamingo Perceiver weights, e.g. "
            f"{unknown[:5]}.{hint} Pass the prefix of the Perceiver's keys (`'perceiver.'` for a Flamingo model, `''` "
            "for a bare PerceiverResampler)."
        )
    return converted


__all__ = ["openflamingo_perceiver_state_dict"]
