"""The run report of `vlbridge demo`: an HTML page with PNG plots, and the metric table printed at the end of a run.

Importing this needs matplotlib (a dependency of vlbridge); `import vlbridge` alone does not import it.
"""

from .plots import loss_series, plot_loss_curves
from .render import REPORT_FILE, HeldOutExample, RetrievalExample, render_report
from .tables import format_metric_table


__all__ = [
    "REPORT_FILE",
    "HeldOutExample",
    "RetrievalExample",
    "format_metric_table",
    "loss_series",
    "plot_loss_curves",
    "render_report",
]
