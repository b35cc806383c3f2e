"""Helpers for scripts that run under `torchrun` / `accelerate launch`."""

from __future__ import annotations

import gc

import torch.distributed as dist


def close_process_group() -> None:
    """
    Ends a script's process group cleanly; call it last, after dropping the trainer and the model.

    The Trainer leaves the process group up. Left to interpreter exit, gloo's teardown now and then aborts
    ("terminate called without an active exception") or deadlocks: a gloo thread still freeing the tensors of the
    last collective needs the GIL that the exiting main thread holds (pytorch#190489). The barrier waits until every
    process is past its last collective; the group then goes while Python is fully alive. A no-op in one process.

    Example:

    ```python
    >>> from vlbridge.trainers.distributed import close_process_group
    >>> close_process_group()  # nothing to close in a single process
    ```
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    gc.collect()  # the DDP wrapper's buffers must go before the group
    dist.destroy_process_group()
