"""Staged freezing of a bridged VLM: one method, named stages, a log line per component (prismatic's habit)."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers.utils import logging


logger = logging.get_logger(__name__)

# The VLM's components, by the attribute path under which they hold their parameters.
COMPONENTS = ("vision_tower", "bridge", "language_projection", "gated_cross_attention", "language_model", "lm_head")

# What trains in each stage of the recipe; everything else is frozen. A component the model lacks is skipped: without
# a language projection (`use_language_projection=False`, LLaVA-1.5) "stage2" trains the bridge alone, as LLaVA's
# pre-training trains its projector alone.
FREEZE_STAGES: dict[str, tuple[str, ...]] = {
    # BLIP-2 stage 2 / LLaVA pre-training: only the bridge and the projection learn. Flamingo: the Perceiver and the
    # gated cross-attention blocks learn, the language model stays frozen.
    "stage2": ("bridge", "language_projection", "gated_cross_attention"),
    # Instruction tuning (LLaVA stage 2, BLIP-3 SFT): the vision tower stays frozen.
    "finetune": ("bridge", "language_projection", "gated_cross_attention", "language_model", "lm_head"),
    # Everything trains.
    "full-finetune": COMPONENTS,
    # Only the language model (e.g. a text warm-up, or the base for LoRA post-training).
    "language-model": ("language_model", "lm_head"),
    # Nothing trains (evaluation, or before attaching adapters).
    "frozen": (),
}

# Stages known under an earlier name: still accepted, with a warning naming the new one.
RENAMED_FREEZE_STAGES = {"align": "stage2"}


class FrozenVisionTowerMixin:
    """
    Keeps a frozen vision tower in eval mode (no dropout / drop-path), even after `model.train()`, as LAVIS'
    `disabled_train` does: the one place where a model's `train()` knows about freezing. A model sets
    `_frozen_vision_tower` when it freezes its tower ([`FreezingMixin.freeze`] for the VLM, the config's
    `freeze_vision_tower` for the stage-1 model).
    """

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and getattr(self, "_frozen_vision_tower", False):
            getattr(self, "model", self).vision_tower.eval()
        return self


class FreezingMixin(FrozenVisionTowerMixin):
    """Adds [`~FreezingMixin.freeze`] to the composite VLM classes."""

    def _components(self) -> dict[str, nn.Module]:
        base = getattr(self, "model", self)
        found = {name: getattr(base, name, None) for name in COMPONENTS}
        found["lm_head"] = getattr(self, "lm_head", None)
        return {name: module for name, module in found.items() if module is not None}

    def freeze(self, stage: str) -> dict[str, int]:
        """
        Freezes the model for one named stage of the recipe and logs what trains.

        Only parameters that can receive a gradient are made trainable: when the vision tower trains, its parameters
        that the bridge's features do not depend on (the pooler / head, and the layers after `vision_feature_layer`)
        stay frozen, and the log line names them.

        Args:
            stage (`str`):
                One of `"stage2"` (bridge + projection train; BLIP-2 stage 2), `"finetune"` (all but the vision
                tower; SFT), `"full-finetune"` (everything), `"language-model"` (only the LM and its head) and
                `"frozen"` (nothing).

        Returns:
            `dict[str, int]`: trainable parameters per component after freezing; a component the model lacks (the
            language projection with `use_language_projection=False`) has no entry and no log line.

        Example:

        ```python
        >>> model.freeze("stage2")  # doctest: +SKIP
        {'vision_tower': 0, 'bridge': 105344, 'language_projection': 1056, 'language_model': 0, 'lm_head': 0}
        ```
        """
        if stage in RENAMED_FREEZE_STAGES:
            warnings.warn(
                f"The freezing stage {stage!r} is now called {RENAMED_FREEZE_STAGES[stage]!r}; the old name goes in "
                "the next release.",
                FutureWarning,
                stacklevel=2,
            )
            stage = RENAMED_FREEZE_STAGES[stage]
        if stage not in FREEZE_STAGES:
            raise ValueError(f"Unknown freezing stage {stage!r}; choose one of {sorted(FREEZE_STAGES)}.")
        trains = FREEZE_STAGES[stage]
        components = self._components()
        # Freeze everything first: a tied lm_head shares its weight with the LM's input embeddings, and the last
        # requires_grad_ call on a shared tensor wins, so enable what trains only after all freezing is done.
        for module in components.values():
            module.requires_grad_(False)
        for name in trains:
            if name in components:
                components[name].requires_grad_(True)
        # Parameters no forward reaches would be counted as trainable, get no gradient, and still be saved as if
        # trained: every parameter called trainable must be able to receive a gradient.
        unreached = {"vision_tower": self._unreached_vision_parameters()} if "vision_tower" in trains else {}
        for name, parameter_names in unreached.items():
            parameters = dict(components[name].named_parameters())
            for parameter_name in parameter_names:
                parameters[parameter_name].requires_grad_(False)
        # A frozen vision tower runs in eval mode (no dropout / drop-path), even after model.train().
        self._frozen_vision_tower = "vision_tower" not in trains
        self.train(self.training)
        # The stage in force, so that a temporary change (the text warm-up of stage 2) can come back to it.
        self.freeze_stage = stage

        counts = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in components.items()}
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        for name, module in components.items():
            size = sum(p.numel() for p in module.parameters())
            line = f"[freeze:{stage}] {name}: {'trains' if counts[name] else 'frozen'} ({size:,} parameters)"
            if unreached.get(name):
                line += (
                    f"; {size - counts[name]:,} stay frozen, as the features the bridge reads "
                    f"(vision_feature_layer={self.config.vision_feature_layer}) do not depend on them: "
                    f"{', '.join(_group_names(unreached[name]))}"
                )
            logger.info(line)
        logger.info(f"[freeze:{stage}] {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)")
        return counts

    def _unreached_vision_parameters(self) -> list[str]:
        """
        Names of the vision tower's parameters that the image features fed to the bridge do not depend on.

        The bridge reads `last_hidden_state` or one entry of `hidden_states`, so the tower's pooler / head (and, for
        some towers, its post-layernorm) and every layer after `vision_feature_layer` never get a gradient. Rather
        than knowing each tower's layout, one probe image goes through the exact feature path of `forward`, and
        autograd says which parameters it reached.
        """
        base = getattr(self, "model", self)
        tower = base.vision_tower
        parameters = [(name, p) for name, p in tower.named_parameters() if p.requires_grad]
        if not parameters or any(p.device.type == "meta" for _, p in parameters):
            return []
        vision_config = self.config.vision_config
        image_size = getattr(vision_config, "image_size", None)
        if image_size is None:
            return []  # no probe size known: leave the tower as the stage says
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        num_channels = getattr(vision_config, "num_channels", 3)
        probe = torch.zeros(1, num_channels, height, width, device=parameters[0][1].device)
        # Eval mode: no dropout, and no reentrant gradient checkpointing, which would hide parameters from autograd.
        was_training = tower.training
        tower.eval()
        try:
            with torch.enable_grad():
                features = base._vision_features(probe)
                grads = torch.autograd.grad(features.float().sum(), [p for _, p in parameters], allow_unused=True)
        finally:
            tower.train(was_training)
        return [name for (name, _), grad in zip(parameters, grads) if grad is None]


def _group_names(names: list[str]) -> list[str]:
    """Parameter names shortened to their modules, e.g. `encoder.layers.1.mlp.fc1.weight` -> `encoder.layers.1`."""
    groups = []
    for name in names:
        parts = name.split(".")
        # Keep the path down to a layer index when there is one, else the parameter's module.
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        group = ".".join(parts[: index + 1] if index is not None else parts[:-1] or parts)
        if group not in groups:
            groups.append(group)
    return groups
