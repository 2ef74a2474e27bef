"""Options are checked up front, in one place (`eetools.core.options`): nonsense is refused before
anything runs, with one line naming the option; and a seed makes a fresh calibration repeatable."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from eetools import pipeline
from eetools.cli import main
from eetools.core.options import check_value, validate_config
from eetools.train import calibration, rl
from eetools.train import pretrain as pretrain_mod
from eetools.train.calibration import CalibrationConfig, calibrate
from eetools.train.pretrain import PretrainConfig
from eetools.train.rl import RLConfig, train_rl

ROOT = Path(__file__).resolve().parents[2]
NAN = float("nan")


def _never(name):
    def run(*a, **k):
        raise AssertionError(f"{name} ran before the options were checked")

    return run


@pytest.fixture()
def nothing_runs(monkeypatch):
    """Every expensive step of every command raises if it is reached."""
    from eetools.io import models

    for mod, name in [
        (pipeline, "run_calibrate"),
        (pipeline, "run_rl"),
        (pipeline, "run_evaluate"),
        (pipeline, "run_tradeoff"),
        (pipeline, "_fig3"),
        (pretrain_mod, "pretrain_step"),
        (models, "load_model"),
        (models, "load_exit_model"),
    ]:
        monkeypatch.setattr(mod, name, _never(name))


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["rl", "--temperature", "nan"], "temperature"),
        (["rl", "--lam", "nan"], "lam"),
        (["rl", "--eval-prompts", "-1"], "eval_prompts"),
        (["rl", "--checkpoint-every", "0"], "checkpoint_every"),
        (["calibrate", "--checkpoint-every", "0"], "checkpoint_every"),
        (["calibrate", "--kl-factor", "nan"], "kl_factor"),
        (["calibrate", "--one-pass-elements", "-5"], "one_pass_elements"),
        (["calibrate", "--dtype", "nonsense"], "--dtype"),
        (["calibrate", "--device", "tpu"], "--device"),
        (["calibrate", "--task", "nope"], "nope"),
        (["accuracy", "--n", "-499"], "--n"),
        (["evaluate", "--n", "0"], "--n"),
        (["tradeoff", "--max-drop", "-1"], "--max-drop"),
        (["tradeoff", "--thresholds", "nan"], "--thresholds"),
        (["pretrain", "--threads", "0"], "threads"),
        (["pretrain", "--checkpoint-every", "0"], "checkpoint_every"),
        (["reproduce", "--task", "nope"], "nope"),
        (["reproduce", "--rl-task", "nope"], "rl_task"),
        (["reproduce", "--n-seeds", "0"], "n_seeds"),
        (["reproduce", "--eval-n", "-3"], "eval_n"),
        (["reproduce", "--rl-temperature", "nan"], "rl_temperature"),
    ],
)
def test_cli_refuses_bad_options_before_running(argv, needle, nothing_runs, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"eetools {argv[0]}: error: ") and needle in err[0], err


@pytest.mark.parametrize(
    "name,text,needle",
    [
        ("c.toml", '[calibrate]\nlora = "false"\n', "lora must be true or false"),
        ("c.toml", '[calibrate]\nsteps = "ten"\n', "steps must be an integer"),
        ("c.toml", "[calibrate]\nsteps = 2.5\n", "steps must be an integer"),
        ("c.toml", "[calibrate]\nlr = nan\n", "lr must be a finite number"),
        ("c.toml", '[calibrate]\nlayers = "2"\n', "--layers[0] must be an integer"),
        ("c.toml", "[calibrate\nsteps = 1\n", "not valid TOML"),
        ("c.yaml", "calibrate: [1, 2\n", "not valid YAML"),
        ("c.yaml", "calibrate:\n  lora: 'no'\n", "lora must be true or false"),
    ],
)
def test_config_file_values_are_checked(name, text, needle, nothing_runs, tmp_path, capsys):
    cfg = tmp_path / name
    cfg.write_text(text)
    assert main(["calibrate", "--config", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_config_file_takes_command_only_options_and_names_unknown_keys(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(pipeline, "run_calibrate", lambda cfg, out, **kw: (seen.update(kw, cfg=cfg), "done")[1])
    cfg = tmp_path / "c.toml"
    cfg.write_text('stepz = 3\n[calibrate]\nlayers = [2, 4]\nmodel = "somewhere"\ntask = "tom"\nsteps = 2\n')
    with pytest.warns(UserWarning, match="stepz") as record:
        assert main(["calibrate", "--config", str(cfg), "--task", "addition", "--out", str(tmp_path / "o")]) == 0
    assert not [w for w in record if "layers" in str(w.message) or "model" in str(w.message)]
    assert seen["layers"] == [2, 4] and seen["model"] == "somewhere" and seen["cfg"].steps == 2
    assert seen["task"] == "addition"  # the command line wins over the file


def test_generate_refuses_a_temperature_that_is_not_a_finite_number(tiny_ee):
    for bad in (NAN, float("inf"), -1.0):
        with pytest.raises(ValueError, match="temperature"):
            tiny_ee.generate("Q: 1+1\n", 4, temperature=bad, seed=0)
    with pytest.raises(TypeError, match="temperature"):
        tiny_ee.generate("Q: 1+1\n", 4, temperature="hot", seed=0)


@pytest.mark.parametrize(
    "kwargs,error,needle",
    [
        ({"lam": NAN}, ValueError, "lam"),
        ({"temperature": NAN}, ValueError, "temperature"),
        ({"eval_prompts": -1}, ValueError, "eval_prompts"),
        ({"checkpoint_every": 0}, ValueError, "checkpoint_every"),
        ({"steps": -2}, ValueError, "steps"),
        ({"train_adapters": "false"}, TypeError, "train_adapters"),
    ],
)
def test_train_rl_checks_options_before_running(kwargs, error, needle, tiny_ee, monkeypatch):
    monkeypatch.setattr(rl, "rl_step", _never("rl_step"))
    monkeypatch.setattr(rl, "_evaluate_on_main", _never("an evaluation"))
    with pytest.raises(error, match=needle):
        train_rl(tiny_ee, "addition", **{"steps": 1, "eval_every": 1, "progress": False, **kwargs})


@pytest.mark.parametrize(
    "kwargs,error,needle",
    [
        ({"kl_factor": NAN}, ValueError, "kl_factor"),
        ({"lr": NAN}, ValueError, "lr"),
        ({"checkpoint_every": 0}, ValueError, "checkpoint_every"),
        ({"lora": "false"}, TypeError, "lora"),
        ({"batch_size": 2.0}, TypeError, "batch_size"),
        ({"micro_batches": 0}, ValueError, "micro_batches"),
        ({"one_pass_elements": -1}, ValueError, "one_pass_elements"),
        ({"one_pass_elements": 1e6}, TypeError, "one_pass_elements"),
    ],
)
def test_calibrate_checks_options_before_running(kwargs, error, needle, tiny_ee, monkeypatch):
    monkeypatch.setattr(calibration, "calibration_step", _never("calibration_step"))
    with pytest.raises(error, match=needle):
        calibrate(tiny_ee, "addition", **{"steps": 1, "progress": False, **kwargs})


def test_calibrate_refuses_a_mix_of_examples_and_prompts(tiny_ee, monkeypatch):
    from eetools import tasks

    monkeypatch.setattr(calibration, "calibration_step", _never("calibration_step"))
    ex = tasks.get("addition").sample(1, seed=0)[0]
    with pytest.raises(TypeError, match="mix"):
        calibrate(tiny_ee, [ex, "Q: 1+1\n"], steps=1, progress=False)
    with pytest.raises(TypeError, match="mix"):
        calibrate(tiny_ee, [3, 4], steps=1, progress=False)


def test_exit_targets_refuse_a_nan_kl_factor():
    with pytest.raises(ValueError, match="kl_factor"):
        calibration.exit_targets(torch.zeros(1, 2, 3), torch.zeros(1, 1, 2, 3), NAN)


@pytest.mark.parametrize("kwargs", [{"threads": 0}, {"checkpoint_every": 0}, {"tasks": ["nope"]}, {"lr": NAN}])
def test_pretrain_checks_options_before_running(kwargs, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain_mod, "pretrain_step", _never("pretrain_step"))
    with pytest.raises(ValueError, match=next(iter(kwargs)) if "tasks" not in kwargs else "nope"):
        pretrain_mod.pretrain(PretrainConfig(out=str(tmp_path), steps=2, **kwargs), progress=False)


@pytest.mark.parametrize("kwargs", [{"n_seeds": 0}, {"task": "nope"}, {"calib_task": "addition+nope"}])
def test_reproduce_checks_options_before_the_first_stage(kwargs, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "run_calibrate", _never("the calibration stage"))
    with pytest.raises(ValueError, match="n_seeds" if "n_seeds" in kwargs else "nope"):
        pipeline.reproduce(pipeline.ReproduceConfig(**kwargs), tmp_path, progress=False)


def test_evaluation_counts_are_checked(tiny_ee, monkeypatch):
    from eetools.analysis import evaluation

    monkeypatch.setattr(evaluation, "_generate_all", _never("generation"))
    with pytest.raises(ValueError, match="batch_size"):
        evaluation.evaluate(tiny_ee, "addition", n=2, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="n must be"):
        evaluation.evaluate(tiny_ee, "addition", n=-499, progress=False)
    with pytest.raises(ValueError, match="n must be"):
        evaluation.greedy_accuracy(tiny_ee.model, "addition", n=-499, progress=False)


def test_validate_config_types_and_limits():
    validate_config(CalibrationConfig())
    validate_config(RLConfig())
    validate_config(PretrainConfig())
    validate_config(pipeline.ReproduceConfig())
    with pytest.raises(TypeError, match="lora must be true or false"):
        validate_config(CalibrationConfig(lora=1))
    with pytest.raises(ValueError, match=r"thresholds\[1\] must be a finite number > 0 and <= 1"):
        validate_config(pipeline.ReproduceConfig(thresholds=[0.5, 1.5]))
    with pytest.raises(ValueError, match=r"batch_sizes\['tom'\] must be an integer >= 1"):
        validate_config(PretrainConfig(batch_sizes={"tom": 0}))
    with pytest.raises(ValueError, match="continuations must be one of 'reasoning', 'greedy'"):
        validate_config(CalibrationConfig(continuations="sometimes"))
    check_value("max_entropy", None, float | None, ">= 0")
    with pytest.raises(ValueError, match="max_entropy"):
        validate_config(RLConfig(max_entropy=math.inf))


def test_seeded_heads_and_adapters_start_the_same(tiny_folders):
    import eetools
    from eetools.core.adapters import add_lora

    state = torch.random.get_rng_state()
    a, b = (eetools.attach_exit_heads(eetools.load_model(tiny_folders["qwen3"]), seed=3) for _ in range(2))
    assert torch.equal(state, torch.random.get_rng_state())  # the global generator is left alone
    assert all(torch.equal(p, q) for p, q in zip(a.heads.parameters(), b.heads.parameters()))
    pa, pb = add_lora(a, r=2, seed=5), add_lora(b, r=2, seed=5)
    assert len(pa) == len(pb) and all(torch.equal(p, q) for p, q in zip(pa, pb))


def test_seed_makes_a_fresh_calibration_repeatable(tiny_folders, tmp_path):
    """Two fresh processes, the same seed: the same history (exit heads and LoRA start the same)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    histories = []
    for run in ("a", "b"):
        out = tmp_path / run
        argv = ["--model", str(tiny_folders["qwen3"]), "--steps", "2", "--batch-size", "2", "--lora-r", "2"]
        cmd = [sys.executable, "-m", "eetools.cli", "calibrate", *argv, "--seed", "0", "--out", str(out)]
        done = subprocess.run([*cmd, "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        histories.append(pd.read_csv(out / "calibration_history.csv"))
    pd.testing.assert_frame_equal(histories[0], histories[1], check_exact=True)
