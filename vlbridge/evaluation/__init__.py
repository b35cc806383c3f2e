"""
Evaluation of trained models: held-out generation (captions with CIDEr / BLEU-4, answers with VQA accuracy),
few-shot captioning with in-context examples (Flamingo),
preference accuracy of chosen over rejected answers, stage-1 retrieval and ITM, and the metric tables runs print.
The metrics themselves are `evaluate` modules in `vlbridge.metrics`.
"""

from .few_shot import evaluate_few_shot, few_shot_prompts
from .generation import evaluate_generation
from .preference import preference_accuracy, preference_answer_accuracy, preference_log_probs
from .retrieval import ImageTextRetriever, retrieval_metrics, retrieve
from .retrieval_index import EmbeddingIndex
from .stage1 import evaluate_stage1
from .tables import format_metric_table


__all__ = [
    "EmbeddingIndex",
    "ImageTextRetriever",
    "evaluate_few_shot",
    "evaluate_generation",
    "evaluate_stage1",
    "few_shot_prompts",
    "format_metric_table",
    "preference_accuracy",
    "preference_answer_accuracy",
    "preference_log_probs",
    "retrieval_metrics",
    "retrieve",
]
