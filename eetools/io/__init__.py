"""Files: loading models and tokenizers, atomic checkpoints, exit-model checkpoints, shipped data paths.

Imports only `eetools.core`.
"""

from eetools.io.exit_checkpoint import save_exit_model
from eetools.io.models import load_exit_model, load_model
from eetools.io.paths import data_dir

__all__ = ["data_dir", "load_exit_model", "load_model", "save_exit_model"]
