"""What every recipe shares: the presets shipped with the package, and the result a recipe's `run` returns."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def preset_names() -> list[str]:
    """
    The names of the YAML presets shipped in `vlbridge/recipes/presets/`, which `--config NAME` accepts.

    Example:

    ```python
    >>> from vlbridge.recipes.common import preset_names
    >>> "sft_builtin" in preset_names() and "demo" in preset_names()
    True
    ```
    """
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def resolve_preset(config: str | os.PathLike) -> Path:
    """
    The YAML file `--config` names: an existing path, else a preset shipped with the package, by name with or without
    `.yaml` (`"sft_builtin"`, `"sft_builtin.yaml"`, `"examples/configs/sft_builtin.yaml"` from another folder).

    Args:
        config (`str` or `os.PathLike`): A path, or a preset name.

    Returns:
        `Path`: The file to read.

    Example:

    ```python
    >>> from vlbridge.recipes.common import resolve_preset
    >>> resolve_preset("pretrain_qformer_builtin").name
    'pretrain_qformer_builtin.yaml'
    >>> resolve_preset("no_such_preset")
    Traceback (most recent call last):
    ...
    FileNotFoundError: --config 'no_such_preset' is neither a file nor a preset shipped with vlbridge ...
    ```
    """
    path = Path(config)
    if path.is_file():
        return path
    shipped = PRESETS_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(
        f"--config {str(config)!r} is neither a file nor a preset shipped with vlbridge (presets: "
        f"{', '.join(preset_names())})."
    )


@dataclass
class RecipeResult:
    """
    What a recipe's `run` returns; its `main` returns only `metrics`.

    Args:
        metrics (`dict[str, float]`): The metrics the run printed (training losses, held-out scores).
        output_dir (`str`): The saved model the next stage starts from (for LoRA recipes, the merged model).
        log_history (`list[dict]`): The trainer's `state.log_history` (losses per logging step, then a summary).
    """

    metrics: dict
    output_dir: str
    log_history: list[dict] = field(default_factory=list)


__all__ = ["PRESETS_DIR", "RecipeResult", "preset_names", "resolve_preset"]
