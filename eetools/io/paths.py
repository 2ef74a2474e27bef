"""Where eetools' shipped data lives."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """The shipped ``data/`` folder (override with ``EETOOLS_DATA``)."""
    env = os.environ.get("EETOOLS_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data"
