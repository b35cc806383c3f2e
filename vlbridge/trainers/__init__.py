"""Training utilities: staged freezing now; trainers, collators and PEFT / TRL helpers build on it."""

from .freezing import FREEZE_STAGES, FreezingMixin


__all__ = ["FREEZE_STAGES", "FreezingMixin"]
