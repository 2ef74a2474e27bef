"""Measuring exit models: evaluation, operating points, judges, probes, the paper's figures, externalisation.

(`eetools.analysis.externalisation`: the steps-task experiment, imported on its own.)
Results are dataclasses holding DataFrames, each with a ``.figure()`` drawn by `eetools.views`.
"""

from eetools.analysis import judges, probes
from eetools.analysis.evaluation import Evaluation, coherence_by_kl_factor, evaluate
from eetools.analysis.figures import exit_distribution_vs_target, exit_histogram_by_class
from eetools.analysis.operating_points import Tradeoff, tradeoff

__all__ = [
    "Evaluation",
    "Tradeoff",
    "coherence_by_kl_factor",
    "evaluate",
    "exit_distribution_vs_target",
    "exit_histogram_by_class",
    "judges",
    "probes",
    "tradeoff",
]
