"""Saving/loading exit heads: round trip, wrong model, corrupt files, atomic writes."""

import json
import os

import pytest
import torch

import eetools
from eetools.io.checkpoints import CheckpointError, load_state, save_state, save_tensors
from eetools.io.exit_checkpoint import save_exit_model
from eetools.io.models import load_exit_model


def _without_hashes(folder):
    """Make `folder` an exit-model checkpoint as written before the weight files' sha256 were recorded."""
    cfg = json.loads((folder / "exit_config.json").read_text())
    del cfg["sha256"]
    (folder / "exit_config.json").write_text(json.dumps(cfg))


def test_round_trip_is_bit_exact(tiny_ee, tmp_path):
    with torch.no_grad():
        for p in tiny_ee.heads.parameters():
            p.add_(torch.randn_like(p))
    save_exit_model(tiny_ee, tmp_path / "ck")
    again = load_exit_model(tmp_path / "ck", model=tiny_ee.model)
    assert again.exit_layers == tiny_ee.exit_layers and again.head_kind == tiny_ee.head_kind
    for (n, a), (_, b) in zip(tiny_ee.heads.state_dict().items(), again.heads.state_dict().items()):
        assert torch.equal(a, b), n
    assert not list(tmp_path.glob("ck/.*tmp")), "temporary files left behind"


def test_round_trip_with_lora_adapters(tiny_ee, tmp_path):
    from eetools.core.adapters import add_lora

    params = add_lora(tiny_ee, r=2, alpha=4)
    tiny_ee.lora_config = {"r": 2, "alpha": 4}
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn_like(p))
    toks = tiny_ee.model.to_tokens(["Q: 1+2\n"], prepend_bos=True)
    want = tiny_ee.prescribed_forward(toks, torch.full_like(toks, 4)).logprobs
    save_exit_model(tiny_ee, tmp_path / "ck")
    fresh = eetools.load_model(tiny_ee.model.cfg.model_name)
    fresh.cfg.default_prepend_bos = True
    again = load_exit_model(tmp_path / "ck", model=fresh)
    got = again.prescribed_forward(toks, torch.full_like(toks, 4)).logprobs
    torch.testing.assert_close(got, want)


def test_checkpoint_for_another_model_is_refused(tiny_folders, tmp_path):
    q = eetools.attach_exit_heads(eetools.load_model(tiny_folders["qwen3"]), layers=[1, 2])
    save_exit_model(q, tmp_path / "q")
    other = eetools.load_model(tiny_folders["gpt2"])
    with pytest.raises(CheckpointError, match="belongs to .*Qwen3.*not to .*GPT2"):
        load_exit_model(tmp_path / "q", model=other)


def test_corrupt_truncated_and_mismatched_files(tiny_ee, tmp_path):
    save_exit_model(tiny_ee, tmp_path / "ck")
    heads = tmp_path / "ck" / "heads.safetensors"
    data = heads.read_bytes()
    heads.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="heads.safetensors"):
        load_exit_model(tmp_path / "ck", model=tiny_ee.model)
    heads.write_bytes(b"")
    with pytest.raises(CheckpointError, match="heads.safetensors"):
        load_exit_model(tmp_path / "ck", model=tiny_ee.model)
    save_tensors({"0.net.0.weight": torch.zeros(3)}, heads)
    with pytest.raises(CheckpointError, match="heads.safetensors does not match the sha256"):
        load_exit_model(tmp_path / "ck", model=tiny_ee.model)
    _without_hashes(tmp_path / "ck")  # an older checkpoint: the keys are checked
    with pytest.raises(CheckpointError, match="missing keys"):
        load_exit_model(tmp_path / "ck", model=tiny_ee.model)
    (tmp_path / "ck" / "exit_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="exit_config.json"):
        load_exit_model(tmp_path / "ck", model=tiny_ee.model)
    with pytest.raises(CheckpointError, match="not an exit-model checkpoint"):
        load_exit_model(tmp_path / "nowhere", model=tiny_ee.model)


def test_atomic_write_keeps_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    save_tensors({"a": torch.ones(2)}, path)
    import eetools.io.checkpoints as ck

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_file", broken)
    with pytest.raises(KeyboardInterrupt):
        save_tensors({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(ck.load_tensors(path)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_a_checkpoint_of_several_files_is_written_all_or_nothing(tmp_path, monkeypatch):
    """`staged_checkpoint`: a crash while writing leaves the old checkpoint; one while moving is completed."""
    import eetools.io.checkpoints as ck

    folder = tmp_path / "run"

    def write(stage, v):
        ck.save_tensors({"w": torch.full((2,), float(v))}, stage / "model" / "w.safetensors")
        ck.save_json({"v": v}, stage / "state.json")
        ck.save_json({"step": v}, stage / "trainer.json")

    def read():
        return (
            float(ck.load_tensors(folder / "model" / "w.safetensors")["w"][0]),
            ck.load_json(folder / "state.json")["v"],
            ck.load_json(folder / "trainer.json")["step"],
        )

    with ck.staged_checkpoint(folder) as stage:
        write(stage, 1)
    assert read() == (1.0, 1, 1) and sorted(os.listdir(folder)) == ["model", "state.json", "trainer.json"]
    # a crash while writing the parts: the previous checkpoint is whole, the partial one discarded
    with pytest.raises(KeyboardInterrupt):
        with ck.staged_checkpoint(folder) as stage:
            ck.save_tensors({"w": torch.full((2,), 2.0)}, stage / "model" / "w.safetensors")
            raise KeyboardInterrupt
    assert read() == (1.0, 1, 1)
    ck.recover_checkpoint(folder)
    assert read() == (1.0, 1, 1) and not (folder / ck.STAGING).exists()
    # a crash while moving the parts in, after the weights: the folder mixes old and new until recovery
    real, moved = os.replace, []

    def crash_after_one(src, dst):
        if moved:
            raise KeyboardInterrupt
        moved.append(src)
        real(src, dst)

    with pytest.raises(KeyboardInterrupt):
        with ck.staged_checkpoint(folder) as stage:
            write(stage, 2)
            monkeypatch.setattr(ck.os, "replace", crash_after_one)
    monkeypatch.undo()
    assert read() == (2.0, 1, 1), "the crash should have left a mix to recover from"
    ck.recover_checkpoint(folder)  # what the next save and every resume do first
    assert read() == (2.0, 2, 2) and not (folder / ck.STAGING).exists()
    with pytest.raises(ck.CheckpointError, match="trainer.json"):
        with ck.staged_checkpoint(folder) as stage:
            ck.save_json({"v": 3}, stage / "state.json")


def test_nested_state_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_state({"optimizer": opt.state_dict(), "step": 3}, tmp_path)
    back = load_state(tmp_path)
    assert back["step"] == 3
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.1)
    opt2.load_state_dict(back["optimizer"])
    assert json.dumps(opt2.state_dict()["param_groups"]) == json.dumps(opt.state_dict()["param_groups"])
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(v, opt2.state_dict()["state"][0][k])


def test_resuming_a_run_folder_of_another_base_model_is_refused(tiny_folders, build_tiny, tmp_path):
    """A run folder left by an earlier version of the base model (same shapes, other weights) is not resumed."""
    first = eetools.attach_exit_heads(eetools.load_model(tiny_folders["qwen3"]), layers=[1, 2])
    eetools.calibrate(
        first,
        "addition",
        steps=1,
        batch_size=2,
        exit_samples=1,
        lora=False,
        progress=False,
        checkpoint_dir=tmp_path / "run",
    )
    retrained = build_tiny(tmp_path / "retrained", "qwen3", seed=1)  # same architecture and shapes
    second = eetools.attach_exit_heads(eetools.load_model(retrained), layers=[1, 2])
    with pytest.raises(CheckpointError, match="belongs to .*not to .*differ in unembed_sha256"):
        eetools.calibrate(
            second,
            "addition",
            steps=2,
            batch_size=2,
            exit_samples=1,
            lora=False,
            progress=False,
            checkpoint_dir=tmp_path / "run",
        )


def test_heads_saved_in_float32_load_on_a_bfloat16_copy_of_the_same_model(tiny_folders, build_tiny, tmp_path):
    """`--dtype bfloat16` with float32 checkpoints (the shipped ones): the same model in another dtype is accepted."""
    from eetools.core.adapters import add_lora

    ee = eetools.attach_exit_heads(eetools.load_model(tiny_folders["qwen3"]), layers=[1, 2])
    add_lora(ee, r=2)
    save_exit_model(ee, tmp_path / "ck")
    half = load_exit_model(tmp_path / "ck", model=eetools.load_model(tiny_folders["qwen3"], dtype=torch.bfloat16))
    for a, b in zip(ee.trainable_parameters(), half.trainable_parameters()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)
    assert half.generate("Q: 1+2\n", 4, seed=0).tokens.shape == (1, 4)
    # another model with the same shapes is still refused in bfloat16
    other = eetools.load_model(build_tiny(tmp_path / "other", "qwen3", seed=1), dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match="differ in unembed_sha256"):
        load_exit_model(tmp_path / "ck", model=other)
    # a checkpoint written before the probe existed: refused across dtypes, saying what to do
    cfg = json.loads((tmp_path / "ck" / "exit_config.json").read_text())
    del cfg["base_model"]["unembed_probe"], cfg["base_model"]["dtype"]
    (tmp_path / "ck" / "exit_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="load the base model in float32, or re-save"):
        load_exit_model(tmp_path / "ck", model=eetools.load_model(tiny_folders["qwen3"], dtype=torch.bfloat16))
    assert load_exit_model(tmp_path / "ck", model=eetools.load_model(tiny_folders["qwen3"])).exit_layers == [1, 2]


def test_nothing_in_the_package_unpickles():
    """Checkpoints are safetensors and JSON only: loading a file can never run code (RELIABILITY.md)."""
    import re
    from pathlib import Path

    package = Path(eetools.__file__).parent
    pattern = re.compile(r"\btorch\.load\(|\bimport pickle\b|\bpickle\.loads?\(|\bimport dill\b|\bjoblib\.load\(")
    offenders = [
        f"{p.relative_to(package)}:{i}"
        for p in sorted(package.rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == [], f"pickle-based loading in {offenders}"


def test_heads_or_adapters_that_do_not_fit_the_model_are_named(tiny_ee, tmp_path):
    """Strict loading: extra keys, wrong shapes, other exit layers and adapter mismatches each say what differs."""
    from eetools.core.adapters import add_lora
    from eetools.io.checkpoints import load_tensors
    from eetools.io.exit_checkpoint import load_weights_into

    save_exit_model(tiny_ee, tmp_path / "ck")
    _without_hashes(tmp_path / "ck")  # the files are rewritten below: only their contents are checked
    heads = tmp_path / "ck" / "heads.safetensors"
    good = load_tensors(heads)
    save_tensors({**good, "9.net.0.weight": torch.zeros(1)}, heads)
    with pytest.raises(CheckpointError, match=r"unexpected keys \['9.net.0.weight'\]"):
        load_weights_into(tiny_ee, tmp_path / "ck")
    save_tensors({**good, "0.net.0.bias": torch.zeros(3)}, heads)
    with pytest.raises(CheckpointError, match=r"shape mismatch \['0.net.0.bias: \(3,\)"):
        load_weights_into(tiny_ee, tmp_path / "ck")
    save_tensors(good, heads)
    other = eetools.attach_exit_heads(tiny_ee.model, layers=[1, 3])
    with pytest.raises(CheckpointError, match=r"exit layers \[1, 2, 3\] \(mlp heads\); the model has \[1, 3\]"):
        load_weights_into(other, tmp_path / "ck")
    add_lora(tiny_ee, r=2)  # the model now has adapters, the checkpoint none
    with pytest.raises(CheckpointError, match="has no LoRA adapters but the model has some"):
        load_weights_into(tiny_ee, tmp_path / "ck")
    save_exit_model(tiny_ee, tmp_path / "lora")
    _without_hashes(tmp_path / "lora")
    state = load_tensors(tmp_path / "lora" / "adapters.safetensors")
    name = sorted(state)[0]
    save_tensors({**state, name: torch.zeros(1, 1)}, tmp_path / "lora" / "adapters.safetensors")
    with pytest.raises(CheckpointError, match=f"{name} has shape \\(1, 1\\)"):
        load_weights_into(tiny_ee, tmp_path / "lora")


def test_a_changed_weight_file_is_refused_naming_it_and_old_checkpoints_still_load(tiny_ee, tmp_path):
    """Issue 31 item 10: the last 4,000 bytes of heads.safetensors overwritten (a head turned NaN) loaded silently."""
    from eetools.core.adapters import add_lora
    from eetools.io.exit_checkpoint import load_weights_into

    add_lora(tiny_ee, r=2)
    save_exit_model(tiny_ee, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "exit_config.json").read_text())
    assert set(cfg["sha256"]) == {"heads.safetensors", "adapters.safetensors"}
    for name in ("heads.safetensors", "adapters.safetensors"):
        path = tmp_path / "ck" / name
        good = path.read_bytes()
        n = min(4000, len(good) // 4)
        path.write_bytes(good[:-n] + b"\xff" * n)  # the header intact: the tensors read, as NaN
        with pytest.raises(CheckpointError, match=f"{name} does not match the sha256 in .*exit_config.json"):
            load_weights_into(tiny_ee, tmp_path / "ck")
        path.write_bytes(good)
    load_weights_into(tiny_ee, tmp_path / "ck")
    _without_hashes(tmp_path / "ck")  # written before the hashes were recorded (the shipped data/models/*)
    load_weights_into(tiny_ee, tmp_path / "ck")


def test_checkpoint_files_are_written_with_the_umask_mode(tiny_ee, tmp_path):
    """Issue 31 item 11: files meant to be shared came out 0600 (tempfile.mkstemp's mode)."""
    old = os.umask(0o022)
    try:
        save_exit_model(tiny_ee, tmp_path / "a")
        os.umask(0o027)
        save_exit_model(tiny_ee, tmp_path / "b")
    finally:
        os.umask(old)
    for folder, mode in (("a", 0o644), ("b", 0o640)):
        for f in (tmp_path / folder).iterdir():
            assert f.stat().st_mode & 0o777 == mode, (f, oct(f.stat().st_mode))
