"""Pretraining: reproducible from a seed, resumable bit for bit, config changes refused."""

import pytest
import torch

from eetools.io.checkpoints import load_tensors
from eetools.train.pretrain import PretrainConfig, pretrain

TINY = dict(
    steps=4,
    n_layers=2,
    d_model=32,
    n_heads=2,
    n_kv_heads=1,
    d_mlp=64,
    n_ctx=512,
    checkpoint_every=2,
    batch_sizes={"addition": 4, "tom": 2},
    threads=1,
)


def test_resume_after_interruption_is_bit_identical(tmp_path, monkeypatch):
    full = pretrain(PretrainConfig(out=str(tmp_path / "a"), **TINY), progress=False)
    # interrupt run b after its first checkpoint (step 2), then rerun: it resumes
    import eetools.train.pretrain as P

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


def test_init_continues_from_a_model_and_refuses_another_shape(tmp_path):
    first = pretrain(PretrainConfig(out=str(tmp_path / "a"), **{**TINY, "steps": 2}), progress=False)
    cont = pretrain(PretrainConfig(out=str(tmp_path / "b"), init=str(first), **{**TINY, "steps": 2}), progress=False)
    assert not torch.equal(
        load_tensors(first / "model.safetensors")["model.embed_tokens.weight"],
        load_tensors(cont / "model.safetensors")["model.embed_tokens.weight"],
    )
    with pytest.raises(ValueError, match="--n-layers"):  # deeper than the init: would half-load silently
        pretrain(PretrainConfig(out=str(tmp_path / "c"), init=str(first), **{**TINY, "n_layers": 3}), progress=False)
    with pytest.raises(ValueError, match="--d-model"):
        pretrain(PretrainConfig(out=str(tmp_path / "d"), init=str(first), **{**TINY, "d_mlp": 48}), progress=False)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        pretrain(PretrainConfig(out=str(tmp_path / "e"), init=str(tmp_path), **TINY), progress=False)


def test_grow_adds_identity_blocks_that_keep_the_function(tmp_path):
    from transformers import Qwen3ForCausalLM

    first = pretrain(PretrainConfig(out=str(tmp_path / "a"), **{**TINY, "steps": 2}), progress=False)
    grown_cfg = PretrainConfig(
        out=str(tmp_path / "g"), init=str(first), grow=True, **{**TINY, "steps": 1, "n_layers": 3}
    )
    import eetools.train.pretrain as P

    old = Qwen3ForCausalLM.from_pretrained(first).eval()
    new = Qwen3ForCausalLM._from_config(P.model_config(grown_cfg, P.build_tokenizer())).eval()
    P._load_init(new, first, grow=True)
    ids = torch.randint(3, 30, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(new(ids).logits, old(ids).logits, rtol=0, atol=1e-5)
    assert new.config.num_hidden_layers == 3
    # training then moves the grown model away from the old function
    out = pretrain(grown_cfg, progress=False)
    assert Qwen3ForCausalLM.from_pretrained(out).config.num_hidden_layers == 3
    with pytest.raises(ValueError, match="can only grow"):
        P.grow_blocks(load_tensors(first / "model.safetensors"), 2, 1)
