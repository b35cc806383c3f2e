"""The `vlbridge_auto.py` file every saved vlbridge folder carries, and the `auto_map` entries that point at it.

A folder that `save_pretrained` wrote names its classes by `model_type` and `processor_class`, which transformers
knows only after `import vlbridge`. Without that import `AutoProcessor` would fall back to the bare tokenizer and the
model load would call the architecture unknown. With `auto_map` entries pointing at `vlbridge_auto.py`, transformers
asks for `trust_remote_code=True` instead, and then loads the installed vlbridge classes: the file holds no model
code, only an import of the package, so a checkpoint never carries a stale copy of it. Its content does not depend on
the folder, so the models and the processor can each write it whatever order they are saved in. Imports no torch.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


AUTO_MAP_FILE = "vlbridge_auto.py"

_SHIM = '''"""Written by vlbridge {version}. The `auto_map` entries of this folder point here, so that
`trust_remote_code=True` loads the checkpoint in a process that has not run `import vlbridge`. There is no model
code in this file: it re-exports the classes of the installed vlbridge package (pip install vlbridge)."""

# The import sits in a try block so that transformers' own check of remote-code imports skips it and this message,
# which names both ways to load the checkpoint, is the one the user reads.
try:
    from vlbridge import *  # noqa: F403 (every public class, so one text serves every folder)
except ImportError as error:
    raise ImportError(
        "This checkpoint was saved by vlbridge and loads with its classes, which are not installed: "
        "`pip install vlbridge`, then run `import vlbridge` before loading it (or keep `trust_remote_code=True`)."
    ) from error
'''


def auto_map_entry(class_name: str) -> str:
    """The `auto_map` value for a class that `vlbridge` exports, e.g. `"vlbridge_auto.BridgeProcessor"`."""
    return f"{Path(AUTO_MAP_FILE).stem}.{class_name}"


def write_remote_code_shim(folder: str | Path) -> Path:
    """
    Writes `vlbridge_auto.py` into `folder` (the same text for every folder) and returns its path.

    Example:

    ```python
    >>> import tempfile
    >>> from vlbridge.configuration.remote_code import write_remote_code_shim
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     "from vlbridge import *" in write_remote_code_shim(tmp).read_text()
    True

    ```"""
    try:
        package_version = version("vlbridge")
    except PackageNotFoundError:  # run from a source tree that was never installed
        package_version = "(not installed)"
    path = Path(folder) / AUTO_MAP_FILE
    path.write_text(_SHIM.format(version=package_version))
    return path


def add_auto_map_entries(json_file: str | Path, entries: dict[str, str]) -> None:
    """Merges `entries` (Auto class -> class name) into the `auto_map` of a saved JSON file (config, processor)."""
    path = Path(json_file)
    content = json.loads(path.read_text())
    content["auto_map"] = {
        **content.get("auto_map", {}),
        **{auto: auto_map_entry(name) for auto, name in entries.items()},
    }
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


__all__ = ["AUTO_MAP_FILE", "add_auto_map_entries", "auto_map_entry", "write_remote_code_shim"]
