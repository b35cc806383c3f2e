"""Staged freezing of a bridged VLM: one method, named stages, a log line per component (prismatic's habit)."""

from __future__ import annotations

from torch import nn
from transformers.utils import logging


logger = logging.get_logger(__name__)

# The VLM's components, by the attribute path under which they hold their parameters.
COMPONENTS = ("vision_tower", "bridge", "language_projection", "language_model", "lm_head")

# What trains in each stage of the recipe; everything else is frozen.
FREEZE_STAGES: dict[str, tuple[str, ...]] = {
    # BLIP-2 stage 2 / LLaVA pre-training: only the bridge and the projection learn.
    "align": ("bridge", "language_projection"),
    # Instruction tuning (LLaVA stage 2, BLIP-3 SFT): the vision tower stays frozen.
    "finetune": ("bridge", "language_projection", "language_model", "lm_head"),
    # Everything trains.
    "full-finetune": COMPONENTS,
    # Only the language model (e.g. a text warm-up, or the base for LoRA post-training).
    "language-model": ("language_model", "lm_head"),
    # Nothing trains (evaluation, or before attaching adapters).
    "frozen": (),
}


class FreezingMixin:
    """Adds [`~FreezingMixin.freeze`] to the composite VLM classes."""

    def _components(self) -> dict[str, nn.Module]:
        base = getattr(self, "model", self)
        found = {name: getattr(base, name, None) for name in COMPONENTS}
        found["lm_head"] = getattr(self, "lm_head", None)
        return {name: module for name, module in found.items() if module is not None}

    def freeze(self, stage: str) -> dict[str, int]:
        """
        Freezes the model for one named stage of the recipe and logs what trains.

        Args:
            stage (`str`):
                One of `"align"` (bridge + projection train; BLIP-2 stage 2), `"finetune"` (all but the vision
                tower; SFT), `"full-finetune"` (everything), `"language-model"` (only the LM and its head) and
                `"frozen"` (nothing).

        Returns:
            `dict[str, int]`: trainable parameters per component after freezing.

        Example:

        ```python
        >>> model.freeze("align")  # doctest: +SKIP
        {'vision_tower': 0, 'bridge': 105344, 'language_projection': 1056, 'language_model': 0, 'lm_head': 0}
        ```
        """
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
        # A frozen vision tower runs in eval mode (no dropout / drop-path), even after model.train().
        self._frozen_vision_tower = "vision_tower" not in trains
        self.train(self.training)

        counts = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in components.items()}
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        for name, module in components.items():
            size = sum(p.numel() for p in module.parameters())
            logger.info(f"[freeze:{stage}] {name}: {'trains' if counts[name] else 'frozen'} ({size:,} parameters)")
        logger.info(f"[freeze:{stage}] {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)")
        return counts

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and getattr(self, "_frozen_vision_tower", False):
            self._components()["vision_tower"].eval()
        return self
