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


_PACKAGE_NAME = "_openflamingo_reference_src"


def load_openflamingo_package() -> ModuleType:
    """
    OpenFlamingo's `open_flamingo.src` package with the modules that build a Flamingo model around any transformers
    language model: `flamingo` (`Flamingo`), `flamingo_lm` (`FlamingoLMMixin`), `utils` (`extend_instance`) and
    `helpers`; or `pytest.skip` with the reason when they cannot be loaded.

    They import one another relatively (`from .helpers import ...`), so their folder is registered as a package
    under a private name whose `__init__` never runs; `open_flamingo/__init__.py` (which needs open_clip) and
    `src/factory.py` are never executed.
    """
    if _PACKAGE_NAME in sys.modules:
        return sys.modules[_PACKAGE_NAME]
    helpers = load_openflamingo_helpers()  # skips when open_flamingo, einops or einops_exts is missing
    package = ModuleType(_PACKAGE_NAME)
    package.__path__ = [str(Path(helpers.__file__).parent)]
    sys.modules[_PACKAGE_NAME] = package
    try:
        for name in ("helpers", "utils", "flamingo_lm", "flamingo"):
            setattr(package, name, importlib.import_module(f"{_PACKAGE_NAME}.{name}"))
    except ImportError as error:
        for name in [key for key in sys.modules if key == _PACKAGE_NAME or key.startswith(f"{_PACKAGE_NAME}.")]:
            del sys.modules[name]
        pytest.skip(f"OpenFlamingo reference: loading open_flamingo.src failed: {error}")
    return package


__all__ = ["load_openflamingo_helpers", "load_openflamingo_package"]
