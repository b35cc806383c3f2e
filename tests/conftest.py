import os
import sys


# Tests never reach the Hub; the helpers in tiny.py build everything in-process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def single_thread():
    """Tiny models on 2 shared cores: intra-op threads only add contention (10x slower when the box is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
