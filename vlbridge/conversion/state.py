"""Strict weight copying for the converters: what did not fit is named, with the fix."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def load_state_strict(target: nn.Module, state: Mapping[str, torch.Tensor], source: str, part: str, hint: str) -> None:
    """
    `target.load_state_dict(state)`, strict, raising a `ValueError` that lists the missing, unexpected and
    mismatched keys of `part` of the `source` checkpoint (a few of each), followed by `hint`.
    """
    wanted = target.state_dict()
    missing, unexpected = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
    mismatched = [
        f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}"
        for key, value in wanted.items()
        if key in state and state[key].shape != value.shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"The {source} checkpoint's {part} does not fit the converted model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shapes (checkpoint vs model) {mismatched[:5]}. {hint}"
        )
    target.load_state_dict(state)


__all__ = ["load_state_strict"]
