"""The command line, called in-process with a few steps on a tiny random model."""

import dataclasses

import pandas as pd
import pytest

from eetools.cli import field_docs, main, make_parser
from eetools.train.calibration import CalibrationConfig


def test_help_text_comes_from_field_docstrings(capsys):
    docs = field_docs(CalibrationConfig)
    assert "KL" in docs["kl_factor"]
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    parser = make_parser()
    helps = {a.dest: a.help for a in parser._subparsers._group_actions[0].choices["calibrate"]._actions}
    assert docs["kl_factor"] in helps["kl_factor"]


def test_calibrate_rl_evaluate_round_trip(tiny_folders, tmp_path, capsys):
    model = str(tiny_folders["qwen3"])
    cal = tmp_path / "cal"
    assert (
        main(
            [
                "calibrate",
                "--model",
                model,
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--lora-r",
                "2",
                "--out",
                str(cal),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (cal / "model" / "heads.safetensors").exists() and (cal / "calibration_history.csv").exists()
    assert (cal / "fig4.json").exists()
    rl = tmp_path / "rl"
    assert (
        main(
            [
                "rl",
                "--from",
                str(cal / "model"),
                "--steps",
                "1",
                "--k",
                "2",
                "--prompts-per-step",
                "1",
                "--max-new-tokens",
                "4",
                "--eval-every",
                "0",
                "--out",
                str(rl),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (rl / "rl_history.csv").exists()
    assert (
        main(
            ["evaluate", "--exit-model", str(rl / "model"), "--n", "2", "--out", str(tmp_path / "ev"), "--no-progress"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "accuracy" in out and "oracle" in out
    assert (
        main(
            [
                "evaluate",
                "--exit-model",
                str(rl / "model"),
                "--n",
                "2",
                "--mode",
                "threshold",
                "--threshold",
                "1",
                "--out",
                str(tmp_path / "ev1"),
                "--no-progress",
            ]
        )
        == 0
    )
    ev1 = pd.read_csv(tmp_path / "ev1" / "evaluation.csv").set_index("system")
    assert ev1.loc["model", "layers_saved"] == 0  # c >= 1 never holds: no token exits
    assert (
        main(
            [
                "evaluate",
                "--exit-model",
                str(rl / "model"),
                "--mode",
                "threshold",
                "--threshold",
                "0",
                "--out",
                str(tmp_path / "ev1"),
                "--no-progress",
            ]
        )
        == 2
    )
    tr = tmp_path / "tr"
    assert (
        main(
            [
                "tradeoff",
                "--exit-model",
                str(rl / "model"),
                "--n",
                "2",
                "--thresholds",
                "0.5",
                "0.1",
                "--out",
                str(tr),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (tr / "tradeoff.csv").exists() and (tr / "tradeoff.json").exists()
    assert "threshold" in capsys.readouterr().out
    assert "sample" in set(pd.read_csv(tr / "tradeoff.csv").system)
    assert (
        main(
            [
                "tradeoff",
                "--exit-model",
                str(rl / "model"),
                "--n",
                "2",
                "--thresholds",
                "0.5",
                "--no-sample",
                "--confidence",
                "0.9999",
                "--out",
                str(tr),
                "--no-progress",
            ]
        )
        == 0
    )
    systems = list(pd.read_csv(tr / "tradeoff.csv").system)
    assert "sample" not in systems and systems.count("confidence") == 1
    assert "confidence    0.9999" in capsys.readouterr().out  # printed as given, not rounded to 1.000
    capsys.readouterr()
    assert (
        main(
            [
                "tradeoff",
                "--exit-model",
                str(rl / "model"),
                "--n",
                "2",
                "--thresholds",
                "1",
                "--no-sample",
                "--split",
                "validation",
                "--max-drop",
                "0",
                "--out",
                str(tr),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        "validation split: the threshold saving the most layers within 0 of the base model's accuracy is 1.0"
        in capsys.readouterr().out
    )  # c >= 1 never holds: no exit, the base model's accuracy
    assert (
        main(
            [
                "tradeoff",
                "--exit-model",
                str(rl / "model"),
                "--n",
                "2",
                "--thresholds",
                "2",
                "--out",
                str(tr),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "in (0, 1]" in capsys.readouterr().err
    assert (
        main(
            [
                "evaluate",
                "--exit-model",
                str(rl / "model"),
                "--n",
                "2",
                "--mode",
                "threshold",
                "--threshold",
                "1",
                "0.5",
                "1",
                "--out",
                str(tmp_path / "ev2"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "evaluate",
                "--exit-model",
                str(rl / "model"),
                "--n",
                "2",
                "--mode",
                "threshold",
                "--threshold",
                "0.5",
                "0.5",
                "--out",
                str(tmp_path / "ev2"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "3 exitable layers" in capsys.readouterr().err


def test_config_file_sets_options_and_flags_override(tiny_folders, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[calibrate]\nsteps = 1\nbatch_size = 2\nlora = false\nunknown_key = 3\n")
    with pytest.warns(UserWarning, match="unknown_key"):
        assert (
            main(
                [
                    "calibrate",
                    "--model",
                    str(tiny_folders["gpt2"]),
                    "--config",
                    str(cfg),
                    "--out",
                    str(tmp_path / "o"),
                    "--no-progress",
                ]
            )
            == 0
        )
    import pandas as pd

    assert len(pd.read_csv(tmp_path / "o" / "calibration_history.csv")) == 1


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["calibrate", "--layers", "0", "9"], "out of range"),
        (["calibrate", "--kl-factor", "-1"], "kl_factor"),
        (["calibrate", "--config", "/nonexistent.toml"], "does not exist"),
        (["rl", "--from", "/nowhere"], "not an exit-model checkpoint"),
        (["calibrate", "--model", "no-such-model-anywhere"], "not a local folder"),
        (["report", "--out", "/tmp/eetools-empty-report-dir"], "lacks"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(argv, needle, tiny_folders, capsys):
    if argv[0] == "calibrate" and "--model" not in argv:
        argv = argv + ["--model", str(tiny_folders["qwen3"])]
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_yaml_config(tiny_folders, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("calibrate:\n  steps: 1\n  batch_size: 2\n  lora: false\n")
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(tiny_folders["qwen3"]),
                "--config",
                str(cfg),
                "--out",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        == 0
    )


def test_reproduce_rl_options_reach_its_config(monkeypatch, tmp_path):
    """``--no-rl-train-adapters``, ``--rl-lr`` and ``--rl-head-lr`` reach the reproduce config, also in its quick version."""
    from eetools import pipeline

    seen = []
    monkeypatch.setattr(pipeline, "reproduce", lambda cfg, out, **kw: (seen.append(cfg), "ok")[1])
    assert main(["reproduce", "--no-rl-train-adapters", "--out", str(tmp_path)]) == 0
    assert main(["reproduce", "--out", str(tmp_path)]) == 0
    assert [c.rl_train_adapters for c in seen] == [False, True]
    assert pipeline._quick(dataclasses.replace(seen[0], quick=True)).rl_train_adapters is False
    # slower adapters than heads (docs/experiments.md, "Slower adapters")
    assert main(["reproduce", "--rl-lr", "2.5e-4", "--rl-head-lr", "1e-3", "--out", str(tmp_path)]) == 0
    assert (seen[-1].rl_lr, seen[-1].rl_head_lr) == (2.5e-4, 1e-3) and seen[1].rl_lr == 1e-3
    quick = pipeline._quick(dataclasses.replace(seen[-1], quick=True))
    assert (quick.rl_lr, quick.rl_head_lr) == (2.5e-4, 1e-3)
