"""eetools: early-exit transformers for externalised reasoning, on TransformerLens bridges.

The public API, in the order of the method (README.md has the map):

>>> import eetools as ee
>>> model = ee.load_model()                       # the shipped tiny reasoner (offline)
>>> ee_model = ee.attach_exit_heads(model)        # exit heads as hooks
>>> rollout = ee_model.generate("Q: 12+34\\n", max_new_tokens=40, seed=0)
>>> rollout.exit_layers, rollout.compute

Layers, each importing only those before it: `core` (the mechanism), `io` (files),
`tasks` (data and verifiers), `train`, `views`, `analysis`; `pipeline` and `cli` on top.
Names are imported on first use (TransformerLens takes seconds to import); the block under
``TYPE_CHECKING`` shows IDEs and type checkers where each comes from.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> module that defines it (a module itself where the name is a subpackage)
_EXPORTS = {
    # the mechanism
    "attach_exit_heads": "eetools.core.model",
    "EarlyExitModel": "eetools.core.model",
    "TeacherOutput": "eetools.core.model",
    "PrescribedOutput": "eetools.core.model",
    "Rollout": "eetools.core.rollout",
    "ExitRule": "eetools.core.rule",
    # files
    "load_model": "eetools.io.models",
    "load_exit_model": "eetools.io.models",
    "save_exit_model": "eetools.io.exit_checkpoint",
    # training
    "calibrate": "eetools.train.calibration",
    "CalibrationConfig": "eetools.train.calibration",
    "train_rl": "eetools.train.rl",
    "RLConfig": "eetools.train.rl",
    "run_sweep": "eetools.train.rl",
    # measuring and looking
    "evaluate": "eetools.analysis.evaluation",
    "tradeoff": "eetools.analysis.operating_points",
    "explore": "eetools.views.widgets",
    # namespaces
    "core": "eetools.core",
    "io": "eetools.io",
    "tasks": "eetools.tasks",
    "train": "eetools.train",
    "analysis": "eetools.analysis",
    "views": "eetools.views",
    "probes": "eetools.analysis.probes",
    "judges": "eetools.analysis.judges",
}

if TYPE_CHECKING:
    from eetools import analysis, core, io, tasks, train, views
    from eetools.analysis import judges, probes
    from eetools.analysis.evaluation import evaluate
    from eetools.analysis.operating_points import tradeoff
    from eetools.core.model import EarlyExitModel, PrescribedOutput, TeacherOutput, attach_exit_heads
    from eetools.core.rollout import Rollout
    from eetools.core.rule import ExitRule
    from eetools.io.exit_checkpoint import save_exit_model
    from eetools.io.models import load_exit_model, load_model
    from eetools.train.calibration import CalibrationConfig, calibrate
    from eetools.train.rl import RLConfig, run_sweep, train_rl
    from eetools.views.widgets import explore


def __getattr__(name: str):
    """Import a public name's module on first use, then keep the name here."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'eetools' has no attribute {name!r}")
    mod = import_module(_EXPORTS[name])
    value = mod if mod.__name__.rsplit(".", 1)[-1] == name else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "analysis",
    "attach_exit_heads",
    "calibrate",
    "CalibrationConfig",
    "core",
    "EarlyExitModel",
    "evaluate",
    "ExitRule",
    "explore",
    "io",
    "judges",
    "load_exit_model",
    "load_model",
    "PrescribedOutput",
    "probes",
    "RLConfig",
    "Rollout",
    "run_sweep",
    "save_exit_model",
    "tasks",
    "TeacherOutput",
    "tradeoff",
    "train",
    "train_rl",
    "views",
]
