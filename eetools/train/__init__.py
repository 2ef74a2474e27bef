"""Training exit models: calibration by self-distillation, RL with RLOO, pretraining the tiny reasoner.

`tune_readout` trains a tuned lens as the exit readout. All share one loop (`eetools.train.loop.TrainLoop`: resume, guards, gradient averaging,
checkpoints, progress) and one checkpoint format (`eetools.train.state.RunFiles`); each
method module holds its step (batch, loss, backward) and a short driver.

Imports `core`, `io` and `tasks`, never `analysis` or `views` (plot a run's history with
`eetools.views.calibration_figure` / `rl_dynamics_figure`).
"""

from eetools.train.calibration import CalibrationConfig, CalibrationResult, calibrate
from eetools.train.rl import RLConfig, RLResult, SweepResult, run_sweep, train_rl
from eetools.train.tune_readout import TuneReadoutConfig, TuneReadoutResult, tune_readout

__all__ = [
    "CalibrationConfig",
    "CalibrationResult",
    "RLConfig",
    "RLResult",
    "SweepResult",
    "calibrate",
    "run_sweep",
    "train_rl",
    "tune_readout",
    "TuneReadoutConfig",
    "TuneReadoutResult",
]
