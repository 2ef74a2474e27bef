"""Reliability cases of GitHub issue 31: shipping, resuming and writing outputs fail safely.

Items 10 (weight files' sha256) and 11 (file modes, history column order) are tested beside the
code they touch, in test_exit_checkpoint.py and test_loop.py.
"""

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eetools.cli import main
from eetools.io.exit_checkpoint import save_exit_model

ROOT = Path(__file__).resolve().parents[2]
RL_RUN = Path("rl") / "lam1.5_beta0.25_seed0" / "model"
RESULTS = ("evaluation.csv", "rl_history.csv", "fig3.csv", "summary.json")
CALIBRATED_RESULTS = ("fig4.csv", "calibration_history.csv")


def _cli(*argv, data: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m eetools.cli`` in a process of its own, importing this worktree's eetools."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    if data is not None:
        env["EETOOLS_DATA"] = str(data)
    return subprocess.run(
        [sys.executable, "-m", "eetools.cli", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def shipped(tmp_path):
    """A data folder holding both presets (marker files standing in for their weights)."""
    data = tmp_path / "data"
    for name in ("tiny-reasoner-calibrated", "tiny-reasoner-rl"):
        (data / "models" / name).mkdir(parents=True)
        (data / "models" / name / "marker.txt").write_text(f"old {name}")
    return data


def _reproduction(out: Path, ee, parts=("calibrated", "rl", "results")) -> Path:
    """A reproduction's output folder with some of its `parts`, as far as `ship` reads it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text('{"config": {"seed": 0}, "timings": {}}')
    if "calibrated" in parts:
        save_exit_model(ee, out / "calibrated" / "model")
    if "rl" in parts:
        save_exit_model(ee, out / RL_RUN)
    if "results" in parts:
        for name in RESULTS[:-1]:
            (out / name).write_text("a,b\n1,2\n")
        for name in CALIBRATED_RESULTS:
            (out / "calibrated").mkdir(exist_ok=True)
            (out / "calibrated" / name).write_text("a,b\n1,2\n")
    return out


@pytest.mark.parametrize("arch", ["qwen3"], indirect=True)
def test_ship_checks_everything_before_it_replaces_a_preset(tiny_ee, tmp_path, shipped):
    """Item 1: `ship` of an incomplete run folder deleted the shipped presets, then exited 2."""
    before = _tree(shipped)
    for parts in ((), ("calibrated",), ("calibrated", "results")):
        out = _reproduction(tmp_path / f"out{len(parts)}", tiny_ee, parts)
        r = _cli("ship", "--out", str(out), data=shipped)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "lacks" in r.stderr or "no summary.json" in r.stderr, r.stderr
        assert _tree(shipped) == before, f"ship changed data/ with only {parts}"
    # a corrupt RL checkpoint (a weight file whose sha256 is not the recorded one) is refused too
    bad = _reproduction(tmp_path / "bad", tiny_ee)
    heads = bad / RL_RUN / "heads.safetensors"
    heads.write_bytes(heads.read_bytes()[:-8] + b"\xff" * 8)
    r = _cli("ship", "--out", str(bad), data=shipped)
    assert r.returncode == 2 and "sha256" in r.stderr and _tree(shipped) == before, r.stderr
    full = _reproduction(tmp_path / "full", tiny_ee)
    r = _cli("ship", "--out", str(full), data=shipped)
    assert r.returncode == 0, r.stderr
    after = _tree(shipped)
    assert "models/tiny-reasoner-rl/heads.safetensors" in after and "models/tiny-reasoner-rl/marker.txt" not in after
    assert "results/fig4.csv" in after and not [p for p in shipped.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("arch", ["qwen3"], indirect=True)
def test_ship_that_fails_while_moving_puts_every_preset_back(tiny_ee, tmp_path, shipped, monkeypatch):
    """Item 1: all presets are replaced or none (a failure moving the second puts the first back)."""
    from eetools import pipeline

    full = _reproduction(tmp_path / "full", tiny_ee)
    before = _tree(shipped)
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if str(dst).endswith("tiny-reasoner-rl") and "/new/" in str(src):
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="disk full"):
        pipeline.ship(full, data=shipped)
    monkeypatch.setattr(os, "replace", real)
    assert calls and _tree(shipped) == before
    assert not [p for p in shipped.iterdir() if p.name.startswith(".")]


def _calibrate(model, out, *extra):
    argv = ["calibrate", "--model", model, "--steps", "1", "--batch-size", "2", "--lora-r", "2"]
    return main([*argv, "--out", str(out), "--no-progress", *extra])


def _rl(start, out, steps="1"):
    argv = ["rl", "--from", str(start), "--steps", steps, "--k", "2", "--prompts-per-step", "1"]
    return main([*argv, "--max-new-tokens", "4", "--eval-every", "0", "--out", str(out), "--no-progress"])


def test_resume_refuses_another_start_model_another_kind_and_fewer_steps(tiny_folders, tmp_path, capsys):
    """Item 3: a rerun into an RL run's folder with another --from, with a lower --steps, or a
    `calibrate --out` of it continued the old run."""
    model = str(tiny_folders["qwen3"])
    assert _calibrate(model, tmp_path / "cal") == 0
    shutil.copytree(tmp_path / "cal" / "model", tmp_path / "other")
    assert _rl(tmp_path / "cal" / "model", tmp_path / "rl", steps="2") == 0
    capsys.readouterr()
    assert _rl(tmp_path / "other", tmp_path / "rl", steps="3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"started from '{tmp_path / 'cal' / 'model'}'" in err[0], err
    assert f"started from '{tmp_path / 'other'}'" in err[0]
    assert _rl(tmp_path / "cal" / "model", tmp_path / "rl", steps="1") == 2
    assert "already run 2 steps, more than the 1 requested" in capsys.readouterr().err
    assert _calibrate(model, tmp_path / "rl", "--steps", "2") == 2
    assert "it is an `eetools rl` run, this is an `eetools calibrate` run" in capsys.readouterr().err
    assert _rl(tmp_path / "cal" / "model", tmp_path / "rl", steps="3") == 0  # the same run, longer: resumed


def _unwritable(tmp_path) -> list[Path]:
    """Output folders that cannot be written: under a file (for everyone), under a read-only folder (not for root)."""
    (tmp_path / "file.txt").write_text("x")
    outs = [tmp_path / "file.txt" / "sub"]
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if not os.access(ro, os.W_OK):  # root ignores permissions
        outs += [ro, ro / "sub"]
    return outs


@pytest.mark.parametrize("command", ["evaluate", "tradeoff", "calibrate"])
def test_an_unwritable_out_is_refused_before_any_work(command, tiny_folders, tmp_path, capsys, monkeypatch):
    """Item 6: with an unwritable --out, evaluate, tradeoff and calibrate did all their work, then died
    with a raw PermissionError."""
    from eetools import pipeline
    from eetools.io import models

    def work(*a, **k):
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(models, "load_exit_model", work)
    monkeypatch.setattr(pipeline, "_fresh_ee", work)
    args = {
        "evaluate": ["evaluate", "--exit-model", "x", "--n", "2"],
        "tradeoff": ["tradeoff", "--exit-model", "x", "--n", "2"],
        "calibrate": ["calibrate", "--model", str(tiny_folders["qwen3"]), "--steps", "1"],
    }[command]
    try:
        for out in _unwritable(tmp_path):
            assert main([*args, "--out", str(out), "--no-progress"]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"eetools {command}: error: --out {out}"), err
            assert "choose another --out" in err[0]
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_a_command_that_fails_validation_leaves_no_out_folder(tmp_path, capsys):
    """Item 11: a command refused for its input left an empty --out folder behind."""
    out = tmp_path / "new" / "ev"
    assert main(["evaluate", "--exit-model", str(tmp_path / "nowhere"), "--out", str(out), "--no-progress"]) == 2
    assert "not an exit-model checkpoint" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir(parents=True)  # a folder that was there before is left alone
    assert main(["evaluate", "--exit-model", str(tmp_path / "nowhere"), "--out", str(out), "--no-progress"]) == 2
    assert out.is_dir()


# issue 41, item 3: four findings of the hostile sweep of 2026-12-06, each refused up front in one line


@pytest.mark.parametrize(
    "options, message",
    [
        (["--n-heads", "3", "--n-kv-heads", "2", "--d-model", "96"], r"n_heads \(3\) must be a multiple of n_kv_heads"),
        (["--n-ctx", "4"], r"n_ctx 4 is shorter than addition's sequences .* use --n-ctx 128 or more"),
        (["--seed", "99999999999999999999999"], r"seed must be an integer below 2\*\*63"),
    ],
)
def test_pretrain_refuses_a_shape_or_number_it_cannot_use_before_training(options, message, tmp_path, capsys):
    from eetools.cli import main

    assert main(["pretrain", "--steps", "1", "--out", str(tmp_path / "p"), *options]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "p" / "checkpoint").exists()  # nothing started


def test_a_base_model_given_where_an_exit_model_is_wanted_names_the_presets(capsys):
    from eetools.cli import main
    from eetools.io.models import shipped_model_dir

    assert main(["rl", "--from", str(shipped_model_dir()), "--steps", "1", "--out", "/tmp/unused"]) == 2
    err = capsys.readouterr().err
    assert "is a base model, not an exit model" in err and "tiny-reasoner/calibrated" in err


# issue 41, item 4: the hostile sweep of the new surface (the full list: tests/README.md's contract table)


def test_resuming_a_gym_run_with_other_task_settings_is_refused(tmp_path):
    """A run on `from_reasoning_gym("leg_counting", min_animals=2)` resumed with `max_animals=9` (or another seed or
    protocol) went on silently: both are called "gym:leg_counting"."""
    pytest.importorskip("reasoning_gym")
    from eetools.tasks import from_reasoning_gym
    from eetools.train.calibration import CalibrationConfig
    from eetools.train.state import exit_run_files

    def files(task):
        return exit_run_files(tmp_path, None, CalibrationConfig(), data=task.name, data_identity=task.identity)

    a, b = from_reasoning_gym("leg_counting", min_animals=2), from_reasoning_gym("leg_counting", max_animals=9)
    saved = {"step": 1, "config": dataclasses.asdict(CalibrationConfig()), **files(a).meta}
    files(a)._check(saved)  # the same settings resume
    with pytest.raises(ValueError, match=r"its task had other settings \(saved .*min_animals=2.*now .*max_animals=9"):
        files(b)._check(saved)
    old = {k: v for k, v in saved.items() if k != "data_identity"}  # checkpoints from before: not checked
    files(b)._check(old)


@pytest.mark.parametrize(
    "name", ["gym:leg_counting:min_animals=3", "gym:leg_counting?min_animals=3", "gym:leg_counting,min_animals=3"]
)
def test_gym_dataset_options_in_a_task_name_say_where_options_go(name):
    """Options in the name gave "unknown reasoning-gym dataset 'leg_counting:min_animals=3'" and a list of 100 names."""
    from eetools import tasks

    with pytest.raises(ValueError, match=r"dataset options cannot be given in a task name; use gym:leg_counting"):
        tasks.get(name)


@pytest.mark.parametrize("lams", [[1.5], [0.0, 0.0], [0.0, 1.5, 1.5]])
def test_real_reproduce_refuses_lams_without_a_control_or_with_repeats(lams, tmp_path):
    """``--lams 1.5`` ran an hour and reported a contrast of the run with itself; ``--lams 0 0`` trained the same
    checkpoint folder twice."""
    from eetools.real_pipeline import RealReproduceConfig, reproduce_real

    with pytest.raises(ValueError, match=r"needs the control .* and at least one other lambda, each once"):
        reproduce_real(RealReproduceConfig(model="unused", task="addition", other_tasks=[], lams=lams), tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "dataset, config, message",
    [
        (
            "leg_counting",
            {"min_animals": "two"},
            "config min_animals='two' for reasoning-gym dataset 'leg_counting' must be an integer, got str",
        ),
        ("gcd", {"min_value": 1.5}, "must be an integer, got float"),  # used to pass, then fail at the first sample
        ("gcd", {"max_value": True}, "must be an integer, got bool"),
        ("basic_arithmetic", {"operators": "+"}, "must be a list, got str"),
        ("basic_arithmetic", {"operators": ("+", 1)}, "must be a list of strings"),
    ],
)
def test_a_wrong_typed_gym_config_value_is_named_with_its_field_up_front(dataset, config, message):
    from eetools.tasks.gym import from_reasoning_gym

    with pytest.raises(ValueError, match=re.escape(message)):
        from_reasoning_gym(dataset, **config)
    assert from_reasoning_gym("gcd", min_value=2, max_value=30).sample(2, "train")  # right types still work


def test_an_os_error_in_a_command_is_one_line_naming_the_file_and_the_fix(tmp_path, capsys, monkeypatch):
    import errno

    from eetools import cli

    def full(*a, **k):
        raise OSError(errno.EFBIG, "File too large", str(tmp_path / "ckpt" / "model.safetensors"))

    monkeypatch.setitem(cli._COMMANDS, "calibrate", full)
    assert main(["calibrate", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("eetools calibrate: error: File too large: ") and "model.safetensors" in err
    assert "ulimit -f" in err and "run the same command again" in err


def _plotly_strings(fig) -> list[str]:
    """Every string in a figure's JSON (titles, trace names, texts, hover texts)."""
    import json

    found = []

    def walk(o):
        if isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
        elif isinstance(o, str):
            found.append(o)

    walk(json.loads(fig.to_json()))
    return found


def test_names_and_lens_tokens_are_inert_in_plotly_labels():
    """Plotly reads titles, trace names and hover texts as pseudo-HTML (``<b>``, ``<a href>``): a grid's or
    panel's name and the explorer's lens top-1 tokens went in raw (sweep part 2), model tokens were escaped."""
    import numpy as np
    import pandas as pd

    from eetools import views
    from eetools.views.widgets import TokenDetails
    from tests.unit.test_viz import _rollout

    evil = '<a href="javascript:alert(1)"><b>x</b></a>'
    r = _rollout([[evil, "b"]], [[1, 4]])
    grid = views.LensGrid(
        layers=[1, 4],
        tokens=[evil, "b"],
        top_tokens=np.array([[[evil], ["c"]], [["d"], [evil]]], dtype=object),
        top_probs=np.full((2, 2, 1), 0.5),
        p_token=np.full((2, 2), 0.5),
        n_layers=4,
        name=evil,
    )
    details = TokenDetails(
        token=evil,
        exit_layer=1,
        exit_distribution=pd.Series([0.5, 0.5], index=["1", "none"]),
        lens=pd.DataFrame({"layer": [1, 2], "top1": [evil, "c"], "p_top1": [0.5, 0.4], "p_token": [0.1, 0.2]}),
        full_depth=[(evil, 0.5)],
    )
    figs = {
        "lens grid": grid.figure(),
        "compared lens grids": views.compare_lens_grids([grid, grid]),
        "exit heatmap": views.exit_heatmap([r, r], 0, names=[evil, "rl"]),
        "exit histogram": views.exit_histogram_figure({evil: [0.5, 0.5, 0, 0]}, [1, 2, 3], 4),
        "token details": details.figure(),
    }
    for what, fig in figs.items():
        raw = [s for s in _plotly_strings(fig) if "<a " in s or "<b>" in s]
        assert not raw, f"{what}: raw markup {raw[:2]}"
    assert "&lt;b&gt;" in grid.figure().layout.annotations[0].text


def test_saving_a_widget_a_folder_or_to_an_unwritable_place_says_what_to_do(tmp_path):
    """``save(explore(model), ...)`` said only "cannot export a VBox"; a folder as the path, or a file where a folder
    should be, gave raw IsADirectoryError / NotADirectoryError naming the temporary file (sweep part 2)."""
    from eetools import views
    from tests.unit.test_viz import _rollout

    W = pytest.importorskip("ipywidgets")
    view = views.color_tokens(_rollout([["a", "b"]], [[1, 4]]))
    with pytest.raises(ValueError, match=r"ipywidgets VBox .* cannot be saved; .*explore\(model, static=True\)"):
        views.save(W.VBox(), tmp_path / "explorer.html")
    (tmp_path / "d.html").mkdir()
    with pytest.raises(ValueError, match=r"d.html is a folder; give a file path in it, e.g. .*d.html/view.html"):
        views.save(view, tmp_path / "d.html")
    (tmp_path / "f").write_text("")
    with pytest.raises(OSError, match=r"cannot write .*f/x.html: a file stands where the path needs a folder"):
        views.save(view, tmp_path / "f" / "x.html")
    assert views.save(view, tmp_path / "new" / "deeper" / "v.html").is_file()  # missing folders are made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.html", "f", "new"]  # no temporary file left


def test_a_write_killed_before_its_rename_leaves_no_temporary_file_after_the_next_write(tmp_path):
    """kill -9 while a run wrote its final ``model/`` left ``.adapters.safetensors.XXXX.tmp`` there for good (a rerun
    wrote the file again beside it; sweep part 2). A live writer's temporary file is left alone."""
    from eetools.io.checkpoints import save_json

    target = tmp_path / "model" / "exit_config.json"
    killed = (
        "import os, signal, sys, pathlib\n"
        "from eetools.io import checkpoints\n"
        "pathlib.Path.write_text = lambda self, text: (open(self, 'w').write(text[:5]), os.kill(os.getpid(), 9))\n"
        f"checkpoints.save_json({{'a': 1}}, {str(target)!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    assert subprocess.run([sys.executable, "-c", killed], env=env).returncode == -9
    left = list(target.parent.glob(".exit_config.json.*.tmp"))
    assert len(left) == 1 and not target.exists()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = target.parent / f".exit_config.json.{sleeper.pid}.abcd.tmp"  # a writer still at work
        live.write_text("")
        save_json({"a": 2}, target)
        assert sorted(p.name for p in target.parent.iterdir()) == [live.name, "exit_config.json"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_file_size_limit_while_checkpointing_is_one_line_and_the_run_resumes(tmp_path):
    """Under ``ulimit -f`` smaller than the optimizer state, ``eetools calibrate``/``pretrain`` ended in a raw
    ``SafetensorError: ... File too large (os error 27)`` traceback (sweep part 2). Now one line naming the file and
    the fix; a file written before stays whole; a rerun without the limit runs to the end."""
    import json
    import resource

    import torch

    from eetools.io.checkpoints import CheckpointWriteError, load_tensors, save_tensors

    def run(limit=None):
        argv = ["pretrain", "--out", str(tmp_path / "p"), "--no-progress", "--steps", "2", "--checkpoint-every", "1"]
        argv += ["--n-layers", "2", "--d-model", "32", "--n-heads", "2", "--n-kv-heads", "1", "--d-mlp", "64"]
        argv += ["--batch-sizes", '{"addition": 2, "tom": 2}']
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        cap = None if limit is None else (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
        return subprocess.run(
            [sys.executable, "-m", "eetools.cli", *argv], env=env, capture_output=True, text=True, preexec_fn=cap
        )

    limited = run(limit=150_000)  # the weights fit (~100 kB), the optimizer state (~190 kB) does not
    assert limited.returncode == 2, limited.stderr[-2000:]
    assert "Traceback" not in limited.stderr
    assert re.search(r"error: cannot write .*state.safetensors: .*File too large.*ulimit -f", limited.stderr)
    assert run().returncode == 0
    assert json.loads((tmp_path / "p" / "checkpoint" / "trainer.json").read_text())["step"] == 2

    path = tmp_path / "w.safetensors"
    save_tensors({"w": torch.ones(4)}, path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, hard))
    try:
        with pytest.raises(CheckpointWriteError, match=r"cannot write .*w.safetensors: .*File too large"):
            save_tensors({"w": torch.zeros(100_000)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert load_tensors(path)["w"].tolist() == [1.0] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p", "w.safetensors"]


def test_a_ship_killed_between_its_moves_is_undone_by_the_next_ship(tmp_path):
    """A kill after a preset was moved out and before its new version moved in left the preset missing and a
    staging folder of full model copies in ``data/`` for good; the next ship puts the old version back first."""
    import json

    from eetools.pipeline import _replace_all

    data = tmp_path / "data"
    (data / "models" / "p").mkdir(parents=True)
    (data / "models" / "p" / "w.txt").write_text("old")
    stage = data / ".ship-999999999-dead"  # no such process
    (stage / "old" / "models").mkdir(parents=True)
    (stage / "new" / "models" / "p").mkdir(parents=True)
    (stage / "targets.json").write_text(json.dumps(["models/p"]))
    (data / "models" / "p").rename(stage / "old" / "models" / "p")  # where the kill came
    src = tmp_path / "q"
    src.mkdir()
    (src / "w.txt").write_text("q")
    _replace_all(data, {"models/q": src})
    assert (data / "models" / "p" / "w.txt").read_text() == "old"  # put back
    assert (data / "models" / "q" / "w.txt").read_text() == "q"
    assert not list(data.glob(".ship-*"))  # no staging folder left


def test_a_missing_preset_says_an_interrupted_ship_is_rerun(tmp_path, monkeypatch):
    from eetools.io import exit_checkpoint

    monkeypatch.setattr(exit_checkpoint, "data_dir", lambda: tmp_path)
    with pytest.raises(exit_checkpoint.CheckpointError, match="if an `eetools ship` was interrupted, run it again"):
        exit_checkpoint.resolve_checkpoint(next(iter(exit_checkpoint.PRESETS)))
