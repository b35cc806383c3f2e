"""
`vlbridge demo`: BLIP-2's whole recipe (stage 1, stage 2, SFT, DPO with LoRA) on the built-in data in one process,
through the training scripts themselves, and its HTML report (loss curves, held-out images with their captions and
answers, a retrieval example, the metric table).
"""

from .plots import loss_series, plot_loss_curves
from .render import REPORT_FILE, HeldOutExample, RetrievalExample, render_report


__all__ = ["REPORT_FILE", "HeldOutExample", "RetrievalExample", "loss_series", "plot_loss_curves", "render_report"]
