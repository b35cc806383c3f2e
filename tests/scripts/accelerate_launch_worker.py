"""Runs an example script as `__main__` and records what each optimizer step trained on; for
`test_accelerate_launch.py`, not a test module itself.

    python tests/scripts/accelerate_launch_worker.py RECORD.json examples/sft.py --config ... --output_dir ...
    accelerate launch --config_file examples/accelerate/ddp_cpu.yaml tests/scripts/accelerate_launch_worker.py \
        RECORD.json examples/sft.py --config ... --output_dir ...

The script runs unchanged (`runpy`, with `sys.argv` set to its own command line). The only addition is a wrapper
around `Trainer.training_step` that, for every micro-batch, gathers over the processes (rank-major, the order in which
a global batch is split) one fingerprint per row and each process's count of loss targets. The main process writes
them to RECORD.json with the Trainer's world size, the process group's backend and the device type, so that the test
can check that the runs it compares really ran as launched and saw the same rows at every step.
"""

from __future__ import annotations

import json
import os
import runpy
import sys

import torch
import torch.distributed as dist
from transformers import Trainer


def row_fingerprints(inputs: dict) -> torch.Tensor:
    """One integer per row that tells rows apart whatever their padding: a position-weighted sum of the non-padding
    token ids (`attention_mask` chooses them), plus the rounded sum of the row's pixels."""
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    # Left or right padding: index the kept tokens 1, 2, ... from the row's first real token.
    positions = mask.long().cumsum(-1) * mask.long()
    text = (input_ids.long() * positions * 7919 + input_ids.long()).masked_fill(~mask, 0).sum(-1)
    pixels = inputs["pixel_values"].flatten(1).double().sum(-1).mul(1000).round().long()
    return text * 1_000_003 + pixels


def loss_targets(inputs: dict) -> torch.Tensor:
    """The process's count of loss targets: label tokens a causal LM predicts (`labels[:, 1:] != -100`), or for the
    stage-1 batch (no `labels`) the ITG targets, the caption tokens after the first."""
    if "labels" in inputs:
        return inputs["labels"][:, 1:].ne(-100).sum().reshape(1)
    return inputs["attention_mask"][:, 1:].sum().reshape(1)


def main() -> None:
    record_path, script, *script_argv = sys.argv[1:]
    steps: list[dict] = []
    run: dict = {"world_size": None, "backend": None, "device": None}
    training_step = Trainer.training_step

    def recording_training_step(self, model, inputs, num_items_in_batch=None):
        if model.training:
            fingerprints = self.accelerator.gather(row_fingerprints(inputs).to(self.args.device))
            targets = self.accelerator.gather(loss_targets(inputs).to(self.args.device))
            steps.append({"rows": fingerprints.tolist(), "targets": targets.tolist()})
            run["world_size"] = self.args.world_size
            run["backend"] = dist.get_backend() if dist.is_initialized() else None
            run["device"] = self.args.device.type
        return training_step(self, model, inputs, num_items_in_batch)

    Trainer.training_step = recording_training_step
    sys.argv = [script, *script_argv]
    runpy.run_path(script, run_name="__main__")
    # The recipe has closed the process group by now; RANK is what the launcher gave this process.
    if int(os.environ.get("RANK", "0")) == 0:
        with open(record_path, "w") as file:
            json.dump({**run, "steps": steps}, file)


if __name__ == "__main__":
    main()
