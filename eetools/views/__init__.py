"""What people look at: token colouring, heatmaps, the logit-lens grid, model comparisons, the explorer, the report.

Views take plain data (a `Rollout`, a `LensGrid`, a history DataFrame, arrays) and import only
`core`, `io` and `tasks`; analysis results draw themselves with these (their ``.figure()``).
The few views that read a model (`lens_grid`, `exit_readouts`, the explorer) compute through
`eetools.core.lens`/`eetools.core.readouts` first and then draw plain data.
"""

from eetools.views.compare import exit_diff
from eetools.views.export import ExportUnavailable, save
from eetools.views.figures import calibration_figure, rl_dynamics_figure
from eetools.views.lens_grid import LensGrid, compare_lens_grids, exit_readouts, lens_grid, lens_grid_text
from eetools.views.notebook import setup_notebook
from eetools.views.tokens import (
    TokenView,
    color_tokens,
    color_tokens_many,
    exit_heatmap,
    exit_histogram_figure,
    fmt_prob,
    visible,
)
from eetools.views.widgets import Explorer, TokenDetails, explore, token_details

__all__ = [
    "Explorer",
    "ExportUnavailable",
    "LensGrid",
    "TokenDetails",
    "TokenView",
    "calibration_figure",
    "color_tokens",
    "color_tokens_many",
    "compare_lens_grids",
    "exit_diff",
    "exit_heatmap",
    "exit_histogram_figure",
    "exit_readouts",
    "explore",
    "fmt_prob",
    "lens_grid",
    "lens_grid_text",
    "rl_dynamics_figure",
    "save",
    "setup_notebook",
    "token_details",
    "visible",
]
