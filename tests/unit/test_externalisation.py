"""Externalisation measures: probes and answer depth on arrays, the result's statistics and figure,
`measure` and the resumable experiment on a tiny random model."""

import numpy as np
import pandas as pd
import pytest

from eetools.analysis.externalisation import (
    ExternalisationResult,
    answer_depth,
    measure,
    probe_accuracy,
    style_accuracy,
)
from eetools.tasks.steps import StepsTask


def test_probe_accuracy_finds_a_linear_signal_and_not_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    noise = rng.normal(size=(300, 3, 8))
    signal = noise.copy()
    signal[:, 2, 0] += 4 * y  # layer 2 carries the label
    acc = probe_accuracy(signal, y)
    assert acc.shape == (3,) and acc[2] > 0.9 and acc[0] < 0.7
    with pytest.raises(ValueError, match="need >= 10 examples"):
        probe_accuracy(signal[:5], y[:5])


def test_answer_depth_reads_the_answer_digits_rows_only():
    comps = ["1+2+0=3\nA: 3\n", "A: 12\n", "no answer"]
    rows = []
    for seq, text in enumerate(comps):
        for ch in [*text, "<eos>"]:
            rows.append({"seq": seq, "token": ch, "oracle_layer": 7 if ch.isdigit() else 1})
    df = pd.DataFrame(rows)
    # answer digit rows get 7; for "A: 12" both digits: 7; the line "1+2+0=3" digits are not the answer
    depth = answer_depth(df, comps, 8)
    assert depth[0] == 7 and depth[1] == 7 and np.isnan(depth[2])
    df.loc[(df["seq"] == 1) & (df.index == df[df["seq"] == 1].index[4]), "oracle_layer"] = 3  # "2" of "12"
    assert answer_depth(df, comps, 8)[1] == 5
    # multi-character tokens (another tokenizer): "12" as one token, "A: " as one
    merged = pd.DataFrame({"seq": [0, 0, 0, 0], "token": ["A: ", "12", "\n", "<eos>"], "oracle_layer": [1, 6, 2, 1]})
    assert answer_depth(merged, ["A: 12\n"], 8)[0] == 6


def _history():
    rows = []
    for cond, base in (("lam0", 0.2), ("mean-cost", 0.5)):
        for seed in range(3):
            for step in (0, 4):
                rows.append({"condition": cond, "seed": seed, "step": step, "verbosity": base + step * 0.01 * seed})
    return pd.DataFrame(rows)


def test_summary_and_contrasts_by_hand():
    res = ExternalisationResult(_history())
    s = res.summary(["verbosity"]).set_index("condition")
    x = np.array([0.2, 0.24, 0.28])
    assert s.loc["lam0", "verbosity"] == pytest.approx(x.mean())
    assert s.loc["lam0", "verbosity_se"] == pytest.approx(x.std(ddof=1) / np.sqrt(3))
    assert s.loc["lam0", "seeds"] == 3 and s.loc["lam0", "step"] == 4
    c = res.contrasts(measures=["verbosity"]).iloc[0]
    assert c["diff"] == pytest.approx(0.3) and c["lo"] < 0.3 < c["hi"]
    assert c["reference"] == "lam0"


def test_figure_has_runs_bands_and_means_per_condition():
    fig = ExternalisationResult(_history()).figure(["verbosity"])
    means = [t for t in fig.data if t.mode == "lines+markers"]
    assert [t.name for t in means] == ["task reward only (lam 0)", "exit RL, mean cost"]
    assert len([t for t in fig.data if t.mode == "lines"]) == 6  # one light line per run
    with pytest.raises(ValueError, match="lacks columns"):
        ExternalisationResult(pd.DataFrame({"step": [0]}))


def test_measure_on_a_tiny_model_gives_every_measure_in_range(tiny_ee):
    row = measure(tiny_ee, StepsTask(2, 2), n_eval=4, n_probe=20)
    for key in ("accuracy", "layers_saved", "verbosity", "terse_share", "probe_carry", "probe_digit"):
        assert 0.0 <= row[key] <= 1.0, key
    assert row["blocks_per_answer"] >= 0 and row["n_eval"] == 4
    with pytest.raises(ValueError, match="steps task"):
        measure(tiny_ee, "addition")
    acc = style_accuracy(tiny_ee, StepsTask(2, 2), n=3)
    assert set(acc["style"]) == {"terse", "written", "free"} and set(acc["digits"]) == {"2", "all"}
    assert (acc.loc[acc["style"] == "terse", "terse"] == 1.0).all()  # forced terse: no column line


def test_experiment_resumes_and_refuses_bad_settings(tiny_ee, tmp_path):
    from eetools.analysis.externalisation_run import ExternalisationConfig, run_externalisation
    from eetools.io.exit_checkpoint import save_exit_model

    save_exit_model(tiny_ee, tmp_path / "start")
    cfg = ExternalisationConfig(
        exit_model=str(tmp_path / "start"),
        seeds=[0, 1],
        steps=1,
        measure_every=1,
        prompts_per_step=1,
        k=2,
        n_eval=2,
        n_probe=12,
    )
    res = run_externalisation(cfg, tmp_path / "out", progress=False)
    h = res.history
    assert len(h) == 3 * 2 * 2 and set(h["step"]) == {0, 1}
    assert (tmp_path / "out" / "contrasts.csv").exists() and (tmp_path / "out" / "figure.json").exists()
    again = run_externalisation(cfg, tmp_path / "out", progress=False)  # everything done: nothing reruns
    pd.testing.assert_frame_equal(again.history, pd.read_csv(tmp_path / "out" / "history.csv"))
    with pytest.raises(ValueError, match="multiple of measure_every"):
        run_externalisation(ExternalisationConfig(steps=3, measure_every=2), tmp_path / "x", progress=False)


def test_cli_refuses_bad_externalisation_settings_with_status_2(tmp_path, capsys):
    from eetools.cli import main

    assert main(["externalisation", "--steps", "3", "--measure-every", "2", "--out", str(tmp_path / "a")]) == 2
    assert "multiple of measure_every" in capsys.readouterr().err
    assert main(["externalisation", "--task", "addition", "--out", str(tmp_path / "t")]) == 2
    assert "steps-task variant" in capsys.readouterr().err and not (tmp_path / "t").exists()
    assert main(["externalisation", "--conditions", "lam1", "--out", str(tmp_path / "b")]) == 2
    assert "conditions" in capsys.readouterr().err
    assert main(["rl", "--exit-cost", "sum", "--out", str(tmp_path / "c")]) == 2
    assert "exit_cost" in capsys.readouterr().err.replace("-", "_")
