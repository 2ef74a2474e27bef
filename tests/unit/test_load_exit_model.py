"""load_exit_model: a failed load leaves the caller's bridge as it was; the base model is found by its saved path."""

import pytest
import torch

import eetools
from eetools.io.checkpoints import CheckpointError, save_tensors
from eetools.io.exit_checkpoint import save_exit_model
from eetools.io.models import load_exit_model


def test_a_failed_load_leaves_the_bridge_as_it_was(tiny_folders, arch, tiny_bridge, tmp_path):
    # a corrupt checkpoint must not leave LoRA layers behind: retrying with a good one then works
    import shutil

    from eetools.core.adapters import add_lora, lora_layers
    from eetools.io.checkpoints import load_tensors

    src = eetools.attach_exit_heads(eetools.load_model(tiny_folders[arch]), layers=[1, 2, 3])
    with torch.no_grad():
        for p in add_lora(src, r=2, alpha=4):
            p.add_(0.1 * torch.randn_like(p))
    save_exit_model(src, tmp_path / "good")
    shutil.copytree(tmp_path / "good", tmp_path / "bad_heads")
    heads = tmp_path / "bad_heads" / "heads.safetensors"
    heads.write_bytes(heads.read_bytes()[:100])
    shutil.copytree(tmp_path / "good", tmp_path / "bad_adapters")
    state = load_tensors(tmp_path / "good" / "adapters.safetensors")
    name = sorted(state)[0]
    save_tensors({**state, name: torch.zeros(1, 1)}, tmp_path / "bad_adapters" / "adapters.safetensors")
    grads = [p.requires_grad for p in tiny_bridge.parameters()]
    for bad in ("bad_heads", "bad_adapters"):
        with pytest.raises(CheckpointError):
            load_exit_model(tmp_path / bad, model=tiny_bridge)
        assert not lora_layers(eetools.attach_exit_heads(tiny_bridge, layers=[1])), bad
        assert [p.requires_grad for p in tiny_bridge.parameters()] == grads, bad
    again = load_exit_model(tmp_path / "good", model=tiny_bridge)
    fresh_bridge = eetools.load_model(tiny_folders[arch])
    fresh_bridge.cfg.default_prepend_bos = True
    fresh = load_exit_model(tmp_path / "good", model=fresh_bridge)
    assert len(lora_layers(again)) == len(lora_layers(fresh)) == len(lora_layers(src))
    toks = tiny_bridge.to_tokens(["Q: 1+2\n"], prepend_bos=True)
    got = again.prescribed_forward(toks, torch.full_like(toks, 4)).logprobs
    want = fresh.prescribed_forward(toks, torch.full_like(toks, 4)).logprobs
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("relative", [False, True])
def test_a_custom_base_is_found_by_its_saved_path_from_another_directory(tiny_folders, tmp_path, monkeypatch, relative):
    # --dtype/--device load the base first: by its saved path, not by its folder's short name
    from eetools.pipeline import run_evaluate

    folder = tiny_folders["qwen3"]
    if relative:  # saved from a model given as a path relative to the working directory
        monkeypatch.chdir(folder.parent)
    bridge = eetools.load_model(folder.name if relative else folder)
    bridge.cfg.default_prepend_bos = True
    save_exit_model(eetools.attach_exit_heads(bridge, layers=[1, 2]), tmp_path / "ck")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    ev = run_evaluate(tmp_path / "ev", exit_model=tmp_path / "ck", n=2, dtype="float32", progress=False)
    assert len(ev.summary) and (tmp_path / "ev" / "evaluation.csv").exists()
    assert load_exit_model(tmp_path / "ck").exit_layers == [1, 2]
