"""Training: staged freezing, collators, and the stage-1 trainer."""

from ..modeling.freezing import FREEZE_STAGES, FreezingMixin
from .collators import ImageTextCollator
from .generative_eval import evaluate_generation
from .lora import language_model_lora_config
from .preference_eval import preference_accuracy, preference_answer_accuracy, preference_log_probs
from .stage1_config import Stage1Config
from .stage1_eval import evaluate_stage1
from .stage1_trainer import Stage1Trainer
from .vlm_collators import CaptionCollator, ChatCollator


__all__ = [
    "FREEZE_STAGES",
    "CaptionCollator",
    "ChatCollator",
    "FreezingMixin",
    "ImageTextCollator",
    "Stage1Config",
    "Stage1Trainer",
    "evaluate_generation",
    "evaluate_stage1",
    "language_model_lora_config",
    "preference_accuracy",
    "preference_answer_accuracy",
    "preference_log_probs",
]
