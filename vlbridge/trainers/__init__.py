"""Training: the stage-1 trainer and its config, the collators of every stage (interleaved sequences included), LoRA
helpers, the LM text warm-up."""

from .collators import CaptionCollator, ChatCollator, ImageTextCollator
from .interleaved import InterleavedCollator
from .lora import LoraArguments, language_model_lora_config
from .stage1_config import Stage1Config
from .stage1_trainer import Stage1Trainer
from .text_warmup import caption_context_texts, train_language_model_on_text


__all__ = [
    "CaptionCollator",
    "ChatCollator",
    "ImageTextCollator",
    "InterleavedCollator",
    "LoraArguments",
    "Stage1Config",
    "Stage1Trainer",
    "caption_context_texts",
    "language_model_lora_config",
    "train_language_model_on_text",
]
