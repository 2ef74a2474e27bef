"""`eetools reproduce --model NAME` (eetools.real_pipeline) end to end on a tiny random model: every stage's
outputs, resuming, the paired RL-vs-control contrast, and shipping a run's models with their recipes."""

import json

import numpy as np
import pandas as pd
import pytest

from eetools.real_pipeline import RealReproduceConfig, reproduce_real, rl_contrast


def test_rl_contrast_pairs_the_same_examples():
    per = pd.DataFrame(
        {
            "system": ["rl_lam0"] * 4 + ["rl_lam1.5"] * 4,
            "example": [0, 1, 2, 3, 0, 1, 2, 3],
            "compute": [1.0, 0.9, 0.8, 1.0, 0.8, 0.7, 0.7, 0.8],
            "correct": [True, False, True, True, True, False, True, False],
            "length": [10, 12, 8, 9, 12, 14, 8, 9],
        }
    )
    c = rl_contrast(per, [0.0, 1.5])
    saved = np.array([0.2, 0.2, 0.1, 0.2])  # control's compute minus RL's, example by example
    assert c["n"] == 4 and c["layers_saved"]["diff"] == pytest.approx(saved.mean())
    half = 1.96 * saved.std(ddof=1) / 2
    assert c["layers_saved"]["ci95"] == pytest.approx([saved.mean() - half, saved.mean() + half])
    assert c["accuracy"]["diff"] == pytest.approx(-0.25) and c["length"]["diff"] == pytest.approx(1.0)


def test_rl_contrast_over_seeds_averages_each_example_first_and_one_seed_picks_its_runs():
    rows = []
    for seed, (ctrl, rl) in enumerate([((1.0, 1.0), (0.8, 0.9)), ((1.0, 0.9), (0.6, 0.9))]):
        for lam, computes in ((0, ctrl), (1.5, rl)):
            for ex, c in enumerate(computes):
                rows.append({"system": f"rl_lam{lam:g}", "seed": seed, "example": ex, "compute": c, "correct": 1.0})
    rows.append({"system": "calibrated", "seed": np.nan, "example": 0, "compute": 0.5, "correct": 0.0})
    per = pd.DataFrame(rows)
    assert rl_contrast(per, [0.0, 1.5], seed=0)["layers_saved"]["diff"] == pytest.approx((0.2 + 0.1) / 2)
    assert rl_contrast(per, [0.0, 1.5], seed=1)["layers_saved"]["diff"] == pytest.approx((0.4 + 0.0) / 2)
    mean = rl_contrast(per, [0.0, 1.5])  # example 0: 1.0 - 0.7 = 0.3; example 1: 0.95 - 0.9 = 0.05
    assert mean["n"] == 2 and mean["layers_saved"]["diff"] == pytest.approx(0.175)
    assert mean["accuracy"]["diff"] == 0


def test_a_quick_run_writes_every_stage_resumes_and_ships(tiny_folders, tmp_path):
    import eetools as ee
    from eetools import real_pipeline

    cfg = RealReproduceConfig(
        model=str(tiny_folders["qwen3"]),
        task="addition",
        other_tasks=["steps-small"],
        exit_layers=[1, 2, 3],
        quick=True,
        batch_size=2,
        max_new_tokens=6,
        rl_k=2,
        rl_prompts=1,
        lams=[0.0, 1.5],
        ship_lam=None,  # the largest
    )
    out = tmp_path / "run"
    summary = json.loads(reproduce_real(cfg, out, progress=False).read_text())
    ev = pd.DataFrame(summary["evaluation"])
    assert {"base", "calibrated", "oracle", "rl_lam0", "rl_lam1.5"} <= set(ev.system)
    assert set(ev[ev.system == "calibrated"].task) == {"addition", "steps-small"}  # calibrated on both tasks
    assert set(ev[ev.system.str.startswith("rl")].task) == {"addition"}  # RL on the first
    assert summary["rl_vs_control"]["n"] == 16 and 0 <= summary["fig4_tv"] <= 1
    assert sorted(ev[ev.system == "rl_lam1.5"].seed) == [0, 1]  # every seed's RL model is evaluated
    assert set(summary["rl_vs_control_by_lam"]["lam1.5"]) == {"seed0", "mean_of_seeds"}
    history = pd.read_csv(out / "rl_history.csv")
    assert sorted(history.lam.unique()) == [0.0, 1.5] and history.run.nunique() == 4  # 2 seeds x 2 lambdas
    for name in ("fig3.json", "fig2_left_lam0.json", "fig2_left_lam1.5.json", "fig2_right_rl.html"):
        assert (out / name).stat().st_size > 0, name

    stamp = (out / "evaluation.csv").stat().st_mtime_ns
    reproduce_real(cfg, out, progress=False)  # every stage is done: nothing is recomputed
    assert (out / "evaluation.csv").stat().st_mtime_ns == stamp
    (out / "fig3.json").unlink()  # a kill between a stage's files: the stage is not done, and runs again
    reproduce_real(cfg, out, progress=False)
    assert (out / "fig3.json").stat().st_size > 0 and (out / "evaluation.csv").stat().st_mtime_ns == stamp

    data = tmp_path / "data"
    real_pipeline.ship(out, data=data)
    name = tiny_folders["qwen3"].name
    recipe = json.loads((data / "models" / f"{name}-rl" / "recipe.json").read_text())
    assert recipe["made_by"].startswith("eetools reproduce --model") and recipe["config"]["lams"] == [0.0, 1.5]
    assert (data / "results" / name / "summary.json").is_file()
    m = ee.load_exit_model(data / "models" / f"{name}-calibrated", model=ee.load_model(cfg.model))
    assert m.exit_layers == [1, 2, 3]


def test_tiny_reasoner_options_are_refused_with_model(capsys):
    from eetools.cli import main

    assert main(["reproduce", "--model", "smollm2-135m", "--rl-temperature", "0.5", "--out", "/tmp/x"]) == 2
    err = capsys.readouterr().err
    assert "only for the tiny reasoner" in err and "drop --model" in err
