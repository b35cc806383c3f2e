"""OpenFlamingo's reference modules (`open_flamingo/src/helpers.py`) for parity tests, loaded without the package.

`import open_flamingo` runs its `__init__`, which imports `open_clip` (and through it the model factory) at top
level; the Perceiver Resampler and gated cross-attention blocks in `helpers.py` need only torch, `einops` and
`einops_exts`. So the file is loaded on its own, by path, and a test that needs it is skipped (with the reason) when
the package or those two dependencies are not installed. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest


_MODULE_NAME = "_openflamingo_reference_helpers"


def load_openflamingo_helpers() -> ModuleType:
    """
    OpenFlamingo's `open_flamingo.src.helpers` module (`PerceiverResampler`, `GatedCrossAttentionBlock`, ...), or
    `pytest.skip` with the reason when it cannot be loaded.

    The package's `__init__.py` is never executed: its folder is located with `importlib.util.find_spec` (which does
    not run it) and `src/helpers.py` is loaded by file path, once per process.
    """
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME]
    for dependency in ("einops", "einops_exts"):
        if importlib.util.find_spec(dependency) is None:
            pytest.skip(
                f"OpenFlamingo reference: `{dependency}` is not installed (pip install open_flamingo {dependency})"
            )
    spec = importlib.util.find_spec("open_flamingo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("OpenFlamingo reference: the `open_flamingo` package is not installed (pip install open_flamingo)")
    path = Path(list(spec.submodule_search_locations)[0]) / "src" / "helpers.py"
    if not path.is_file():
        pytest.skip(f"OpenFlamingo reference: {path} not found in the installed `open_flamingo` package")
    module_spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ImportError as error:
        pytest.skip(f"OpenFlamingo reference: loading {path} failed: {error}")
    sys.modules[_MODULE_NAME] = module
    return module


__all__ = ["load_openflamingo_helpers"]
