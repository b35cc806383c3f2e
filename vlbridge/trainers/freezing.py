"""Kept so that `from vlbridge.trainers.freezing import ...` keeps working: staged freezing is a method of the models
and lives with them, in `vlbridge.modeling.freezing` (the model core imports nothing from the training layer)."""

from ..modeling.freezing import COMPONENTS, FREEZE_STAGES, FreezingMixin


__all__ = ["COMPONENTS", "FREEZE_STAGES", "FreezingMixin"]
