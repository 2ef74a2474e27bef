"""benchmarks/estimate_memory.py: the fake-tensor memory estimate behind README's "Qwen3-4B on one 80 GB GPU" table."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
em = importlib.import_module("estimate_memory")


@pytest.fixture(scope="module")
def fake():
    return em.exit_model("test", "float32")


def test_weights_are_the_shape_parameter_bytes_each_storage_once(fake):
    # tied embedding and unembedding counted once; float32 = 4 bytes per parameter
    assert fake.weights == em.qwen3_parameter_bytes("test", torch.float32)
    assert em.qwen3_parameter_bytes("test", torch.bfloat16) * 2 == fake.weights
    assert fake.built >= fake.weights  # plus heads and buffers


def test_calibration_estimate_grows_with_tokens(fake):
    short, long = em.calibration_peak(fake, 1, 48), em.calibration_peak(fake, 1, 96)
    assert 0 < short < long


def test_estimate_equals_the_bytes_a_real_run_allocates():
    # the same step on real random weights, counted by the same meter: fake tensors lose nothing
    est = em.calibration_peak(em.exit_model("test", "float32"), 1, 48)
    real = em.calibration_peak(em.exit_model("test", "float32", fake=False), 1, 48)
    assert est == pytest.approx(real, rel=0.02), "an operation allocates differently under fake tensors"
    est_rl, decode = em.rl_peak(em.exit_model("test", "float32"), 1, 2, 8, ckpt=False)
    real_rl, _ = em.rl_peak(em.exit_model("test", "float32", fake=False), 1, 2, 8, ckpt=False)
    assert est_rl == pytest.approx(real_rl, rel=0.02)
    assert decode == em.kv_cache_bytes("test", torch.float32, 2, 8 + 8)  # prompt "Q: 0+0\n" + <bos>: 8 tokens


def test_micro_batches_lower_the_rl_estimate(fake):
    whole, _ = em.rl_peak(fake, 2, 2, 8)
    half, _ = em.rl_peak(fake, 1, 2, 8)
    assert half < whole


def test_unknown_shape_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown shape"):
        em.qwen3_config("5b")
