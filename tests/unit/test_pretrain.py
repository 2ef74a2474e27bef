"""Pretraining: reproducible from a seed, resumable bit for bit, config changes refused."""

import pytest
import torch

from eetools.checkpoints import load_tensors
from eetools.pretrain import PretrainConfig, pretrain

TINY = dict(steps=4, n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, d_mlp=64, n_ctx=512, checkpoint_every=2,
            batch_sizes={"addition": 4, "tom": 2}, threads=1)


def test_resume_after_interruption_is_bit_identical(tmp_path, monkeypatch):
    full = pretrain(PretrainConfig(out=str(tmp_path / "a"), **TINY), progress=False)
    # interrupt run b after its first checkpoint (step 2), then rerun: it resumes
    import eetools.pretrain as P

    real = P.batch_for_step

    def crash(cfg, step):
        if step == 3:
            raise KeyboardInterrupt
        return real(cfg, step)

    monkeypatch.setattr(P, "batch_for_step", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain(PretrainConfig(out=str(tmp_path / "b"), **TINY), progress=False)
    monkeypatch.setattr(P, "batch_for_step", real)
    again = pretrain(PretrainConfig(out=str(tmp_path / "b"), **TINY), progress=False)
    a = load_tensors(full / "model.safetensors")
    b = load_tensors(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (again / "tokenizer.json").exists() and (again / "eetools_model.json").exists()


def test_resume_with_another_config_is_refused(tmp_path):
    pretrain(PretrainConfig(out=str(tmp_path / "a"), **TINY), progress=False)
    with pytest.raises(ValueError, match="lr"):
        pretrain(PretrainConfig(out=str(tmp_path / "a"), **{**TINY, "steps": 4}, lr=1e-3), progress=False)
