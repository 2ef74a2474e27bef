"""eetools: early-exit transformers for externalised reasoning, on TransformerLens bridges.

The public API, in the order of the method:

>>> import eetools as ee
>>> model = ee.load_model()                       # the shipped tiny reasoner (offline)
>>> ee_model = ee.attach_exit_heads(model)        # exit heads as hooks
>>> rollout = ee_model.generate("Q: 12+34\\n", max_new_tokens=40, seed=0)
>>> rollout.exit_layers, rollout.compute
"""

from __future__ import annotations

from importlib import import_module

from eetools import tasks
from eetools.models import load_model

__version__ = "0.1.0"

_LAZY = {
    "attach_exit_heads": "eetools.exits",
    "EarlyExitModel": "eetools.exits",
    "TeacherOutput": "eetools.exits",
    "PrescribedOutput": "eetools.exits",
    "Rollout": "eetools.rollout",
    "load_exit_model": "eetools.exit_checkpoint",
    "calibrate": "eetools.calibration",
    "train_rl": "eetools.rl",
    "evaluate": "eetools.evaluation",
    "tradeoff": "eetools.operating_points",
    "viz": "eetools.viz",
    "judges": "eetools.judges",
    "probes": "eetools.probes",
    "calibration": "eetools.calibration",
    "widgets": "eetools.widgets",
    "figures": "eetools.figures",
    "paths": "eetools.paths",
    "run_sweep": "eetools.rl",
    "explore": "eetools.widgets",
}


def __getattr__(name: str):
    """Import submodules on first use (importing TransformerLens takes seconds)."""
    if name in _LAZY:
        mod = import_module(_LAZY[name])
        return mod if mod.__name__.endswith("." + name) else getattr(mod, name)
    raise AttributeError(f"module 'eetools' has no attribute {name!r}")


__all__ = ["load_model", "tasks", *_LAZY]
