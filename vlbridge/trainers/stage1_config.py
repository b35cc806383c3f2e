"""Training arguments of BLIP-2 stage-1 (ITC + ITM + ITG) pretraining."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class Stage1Config(TrainingArguments):
    r"""
    [`TrainingArguments`] for [`Stage1Trainer`], with LAVIS' BLIP-2 stage-1 defaults where they fit a small run.

    > Defaults that differ from `TrainingArguments`: `learning_rate=1e-4`, `weight_decay=0.05`,
    > `adam_beta2=0.98` (BLIP-2 §3.4), `lr_scheduler_type="cosine"`, `warmup_ratio=0.05`, `logging_steps=10`,
    > `remove_unused_columns=False` (the collator needs the image and caption columns).

    Args:
        max_text_length (`int`, *optional*, defaults to 32):
            Longest caption in tokens (LAVIS: 32).
        eval_retrieval (`bool`, *optional*, defaults to `False`):
            Also report retrieval recall@1/5/10 when evaluating.
        itm_hard_negative_warmup_ratio (`float`, *optional*, defaults to 0.0):
            Share of training over which ITM negatives go from uniformly drawn (easy) to LAVIS' hard negatives, by
            ramping `itm_negative_hardness` linearly from 0 to 1. 0 keeps LAVIS' hard negatives from the first step,
            which suits a pretrained vision tower; from scratch, an ITM head that only ever sees near-duplicate
            negatives can sit on "no match" for the whole run.
    """

    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (BLIP-2: 1e-4)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (BLIP-2: 0.05)."})
    adam_beta2: float = field(default=0.98, metadata={"help": "AdamW beta2 (BLIP-2: 0.98)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of steps spent in linear warm-up."})
    logging_steps: float = field(default=10, metadata={"help": "Log every this many steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the image / caption columns for the collator."}
    )
    max_text_length: int = field(default=32, metadata={"help": "Longest caption in tokens, BOS and EOS included."})
    eval_retrieval: bool = field(default=False, metadata={"help": "Report retrieval recall@K when evaluating."})
    itm_hard_negative_warmup_ratio: float = field(
        default=0.0,
        metadata={"help": "Share of training over which ITM negatives ramp from random to hard (LAVIS: 0)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.itm_hard_negative_warmup_ratio <= 1.0:
            raise ValueError(
                f"`itm_hard_negative_warmup_ratio` must be in [0, 1], got {self.itm_hard_negative_warmup_ratio}."
            )
