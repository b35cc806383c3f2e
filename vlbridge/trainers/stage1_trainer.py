"""The HF Trainer for BLIP-2 stage-1 pretraining: exact gradient accumulation, every sub-loss logged."""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer
from transformers.utils import logging

from ..modeling.stage1_accumulation import build_accumulation_window
from ..modeling.stage1_losses import world_info


logger = logging.get_logger(__name__)


class Stage1Trainer(Trainer):
    r"""
    [`Trainer`] for [`QFormerForImageTextPretraining`]: the loss is `loss_itc + loss_itm + loss_itg`, and each
    sub-loss is logged beside it (`loss_itc`, `loss_itm`, `loss_itg`, `itm_accuracy`, `temperature`; with an `eval_`
    prefix in evaluation), averaged over the steps since the last log and over processes.

    ITC and ITM compare every caption with every image of the batch, so plain gradient accumulation would train on
    a smaller batch than it claims. With `gradient_accumulation_steps > 1` the micro-batches of each optimizer step
    form one accumulation window (see `vlbridge.modeling.stage1_accumulation`): the accumulated loss and gradients
    equal those of a single batch of `per_device_train_batch_size * gradient_accumulation_steps` (exactly with
    dropout off and a frozen vision tower). ITM negatives are sampled with one seed drawn per optimizer step, so runs
    with and without accumulation draw the same negatives. Micro-batches of one window must have equal sizes.

    Args:
        model ([`QFormerForImageTextPretraining`]):
            The stage-1 model.
        args ([`Stage1Config`]):
            Training arguments.
        kwargs:
            Everything else [`Trainer`] takes (`train_dataset`, `eval_dataset`, `data_collator`, ...).

    Example:

    ```python
    >>> trainer = Stage1Trainer(model=model, args=Stage1Config("out"), train_dataset=ds,  # doctest: +SKIP
    ...                         data_collator=ImageTextCollator(image_processor, tokenizer))
    >>> trainer.train()  # doctest: +SKIP
    ```
    """

    _tag_names = ["vlbridge", "blip-2", "stage-1"]
    LOGGED_KEYS = ("loss_itc", "loss_itm", "loss_itg", "itm_accuracy", "temperature")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._window_batches: list[dict] = []
        self._window = None
        self._window_seed = None
        self._window_position = 0

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        # One ITM sampling seed per optimizer step, drawn at the same point whatever the accumulation.
        self._window_seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        self._window_batches, self._window, self._window_position = list(batch_samples), None, 0
        return batch_samples, num_items_in_batch

    def _accumulation_window(self, model, inputs):
        """The window for this micro-batch, built by a no-grad pre-pass at the window's first micro-batch."""
        if len(self._window_batches) < 2:
            return None
        if world_info()[1] > 1:
            logger.warning_once(
                "Gradient accumulation with several processes accumulates per micro-batch: ITC / ITM then see one "
                "micro-batch per process, not the whole accumulated batch."
            )
            return None
        # The Trainer runs the window's micro-batches in order, one compute_loss call each.
        index, self._window_position = self._window_position, self._window_position + 1
        if self._window is None:
            batches = [self._prepare_inputs(batch) for batch in self._window_batches]
            if len({batch["input_ids"].shape[0] for batch in batches}) > 1:
                return None  # micro-batches of unequal size (a short last window): plain accumulation
            model = self.accelerator.unwrap_model(model)
            self._window = build_accumulation_window(model, batches, self._window_seed)
        self._window.index = index
        return self._window

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        window = self._accumulation_window(model, inputs) if model.training else None
        # A window's micro-batch returns its exact share of the window's loss: no further division.
        self.loss_is_scaled_for_ga = True if window is not None else None
        extra = {"accumulation_window": window} if window is not None else {}
        if model.training and self._window_seed is not None:
            extra["sampling_seed"] = self._window_seed
        if model.training:
            extra["itm_negative_hardness"] = self.itm_negative_hardness()
        outputs = model(**inputs, **extra)
        mode = "train" if model.training else "eval"
        if model.training:
            self._metrics[mode]["itm_negative_hardness"].append(extra["itm_negative_hardness"])
        for key in self.LOGGED_KEYS:
            value = outputs.get(key) if hasattr(outputs, "get") else None
            if value is not None:
                value = torch.as_tensor(value, device=self.args.device).detach().float().reshape(1)
                self._metrics[mode][key].append(self.accelerator.gather_for_metrics(value).mean().item())
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def itm_negative_hardness(self) -> float:
        """1 (LAVIS' hard negatives) after `args.itm_hard_negative_warmup_ratio` of training, a linear ramp from 0
        (uniformly drawn negatives) before."""
        ratio = getattr(self.args, "itm_hard_negative_warmup_ratio", 0.0)
        warmup_steps = ratio * self.state.max_steps
        return 1.0 if warmup_steps <= 0 else min(1.0, self.state.global_step / warmup_steps)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for key, values in self._metrics[mode].items():
            if values:
                logs[f"{prefix}{key}"] = sum(values) / len(values)
        self._metrics[mode].clear()
        super().log(logs, start_time)
