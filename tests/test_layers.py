"""
The layers of the package point one way. Every import of every module (at the top and inside functions) goes to its
own layer or one below; the model core (configuration, processing, modeling) imports nothing above it; no two
subpackages import each other, even through a third; and importing the models loads none of the training,
evaluation, hub, script or demo code.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "vlbridge"

# Lowest first. Subpackages on one line share a layer: `data` (the loaders) sits with the trainers, `metrics` (the
# `evaluate` modules) with the evaluation, `conversion` (released checkpoints) with the hub.
LAYERS = [
    ("configuration",),
    ("processing",),
    ("modeling",),
    ("trainers", "data"),
    ("evaluation", "metrics"),
    ("hub", "conversion"),
    ("scripts",),
    ("demo",),
    ("cli",),
]
LAYER_OF = {name: rank for rank, names in enumerate(LAYERS) for name in names}
CORE = {"configuration", "processing", "modeling"}


def _part(module: str) -> str | None:
    """The subpackage (or top-level module) of `vlbridge.<part>...`; None for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "vlbridge" else None


def _imports(path: Path) -> list[tuple[int, str]]:
    """`(line, absolute module)` of every import in `path`, top-level or inside a function, relative ones resolved."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                # `from . import name` / `from .. import name`: the names may be subpackages themselves.
                names = [f"{target}.{alias.name}" for alias in node.names] if node.module is None else [target]
                found += [(node.lineno, name) for name in names]
            else:
                found.append((node.lineno, node.module))
    return found


def _edges() -> list[tuple[str, str, str]]:
    """`(importing part, imported part, where)` for every import between two parts of vlbridge."""
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _part(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        if source is None or source == "__init__":
            continue  # the package's own __init__ is its public face and may re-export any layer
        for line, module in _imports(path):
            target = _part(module) if module.startswith("vlbridge") else None
            if module == "vlbridge":
                target = "__init__"
            if target is not None and target != source:
                edges.append((source, target, f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"))
    return edges


def test_every_part_of_the_package_has_a_layer():
    parts = {path.stem if path.is_file() else path.name for path in PACKAGE.iterdir()}
    parts = {part for part in parts if not part.startswith(("_", ".")) and part != "py"}
    parts = {part for part in parts if (PACKAGE / part).is_dir() or (PACKAGE / f"{part}.py").is_file()}
    assert parts - set(LAYER_OF) == set(), "give the new subpackage a layer in LAYERS"


def test_no_import_points_up_the_layers():
    upward = [
        where
        for source, target, where in _edges()
        if target == "__init__" or LAYER_OF.get(target, -1) > LAYER_OF[source]
    ]
    assert upward == [], "imports that point up the layers:\n" + "\n".join(upward)


def test_the_model_core_imports_nothing_above_it():
    leaks = [where for source, target, where in _edges() if source in CORE and target not in CORE]
    assert leaks == [], "\n".join(leaks)


def test_no_import_cycle_between_subpackages():
    graph: dict[str, set[str]] = {}
    for source, target, _ in _edges():
        graph.setdefault(source, set()).add(target)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a, {b})})
    assert cycles == [], f"subpackages that import each other (directly or through others): {cycles}"


def test_the_walk_finds_imports_inside_functions(tmp_path):
    # The check above is only as good as the walk: a lazy import in a function body must be seen.
    path = PACKAGE / "modeling" / "freezing.py"
    assert any(module == "warnings" for _, module in _imports(path))
    lazy = PACKAGE / "scripts" / "utils.py"
    assert any(module == "vlbridge.scripts.tiny" for _, module in _imports(lazy))


@pytest.mark.parametrize("core", ["vlbridge.modeling", "vlbridge"])
def test_importing_the_models_loads_no_training_code(core):
    script = (
        f"import sys, {core}\n"
        "above = ('trainers', 'data', 'metrics', 'evaluation', 'hub', 'conversion', 'scripts', 'demo', 'cli')\n"
        "print(sorted(m for m in sys.modules if m.startswith('vlbridge.') and m.split('.')[1] in above))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", f"`import {core}` loaded: {result.stdout.strip()}"


def test_the_lora_helper_still_imports_from_the_top_level():
    from vlbridge import language_model_lora_config
    from vlbridge.trainers.lora import language_model_lora_config as helper

    assert language_model_lora_config is helper
