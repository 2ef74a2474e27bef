"""What people look at: token colouring, heatmaps, histograms, training figures, the explorer, the report.

Views take plain data (a `Rollout`, a history DataFrame, arrays) and import only `core`,
`io` and `tasks`; analysis results draw themselves with these (their ``.figure()``).
"""

from eetools.views.export import ExportUnavailable, save
from eetools.views.figures import calibration_figure, rl_dynamics_figure
from eetools.views.notebook import setup_notebook
from eetools.views.tokens import (
    TokenView,
    color_tokens,
    color_tokens_many,
    exit_heatmap,
    exit_histogram_figure,
    visible,
)
from eetools.views.widgets import Explorer, TokenDetails, explore, token_details

__all__ = [
    "Explorer",
    "ExportUnavailable",
    "TokenDetails",
    "TokenView",
    "calibration_figure",
    "color_tokens",
    "color_tokens_many",
    "exit_heatmap",
    "exit_histogram_figure",
    "explore",
    "rl_dynamics_figure",
    "save",
    "setup_notebook",
    "token_details",
    "visible",
]
