"""Loads a script of examples/ or benchmarks/ as a module by its path (they are not importable packages)."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(path: Path, name: str) -> ModuleType:
    """Imports `path` as the module `name`, registered in `sys.modules` (a script's dataclasses resolve their string
    annotations through it); `unload_script(name)` removes it again."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def unload_script(name: str) -> None:
    sys.modules.pop(name, None)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, argv: list[str]) -> dict:
    """Runs `examples/<name>.py` on `argv` as its `__main__` block does (main of the parsed arguments)
    and returns the run's metrics."""
    example = load_script(EXAMPLES / f"{name}.py", f"example_{name}")
    return example.main(*example.make_parser().parse_args_and_config(argv)).metrics
