import os
import sys


# Tests never reach the Hub; the helpers in tiny.py build everything in-process. tests/ itself is on the import path
# (`pythonpath` in pyproject.toml), so tiny, helpers and script_loader import as top-level modules from every folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402
import torch  # noqa: E402


# The packages whose releases the supported window (setup.cfg) spans: printed first, so every run (CI runs the suite
# at both ends of the window) says what it was tested on.
WINDOW_PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "evaluate",
    "huggingface_hub",
    "safetensors",
    "tokenizers",
    "numpy",
    "pillow",
    "matplotlib",
    "pyyaml",
)


def tested_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "missing"

    return ", ".join(f"{name} {installed(name)}" for name in WINDOW_PACKAGES)


def pytest_sessionstart(session):
    # Written at session start rather than in `pytest_report_header`, which `-q` (the README's command) hides.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"vlbridge tested on: python {sys.version.split()[0]}, {tested_versions()}")


@pytest.fixture
def single_thread():
    """Tiny models on 2 shared cores: intra-op threads only add contention (10x slower when the box is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
