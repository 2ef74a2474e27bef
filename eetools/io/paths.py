"""Where eetools' shipped data lives, and whether an output folder can be written."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """The shipped ``data/`` folder (override with ``EETOOLS_DATA``)."""
    env = os.environ.get("EETOOLS_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data"


def check_writable(folder: str | os.PathLike, option: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be created or written; creates nothing.

    The nearest existing folder on its path must be a writable folder (a file there, or a
    folder without write permission, raises `ValueError` saying so). Returns `folder` as a Path.
    """
    folder = Path(folder)
    probe = folder.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(
            f"{option} {folder} cannot be created: {probe} is a file, not a folder; choose another {option}"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {folder} is not writable: no write permission on {probe}; choose another {option}")
    return folder
