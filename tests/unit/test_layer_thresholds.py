"""Per-layer exit thresholds: generation honours them, and `fit_thresholds` searches them on validation."""

import math

import pandas as pd
import pytest
import torch

import eetools
import eetools.evaluation
from eetools.layer_thresholds import fit_thresholds


def _constant_heads(ee, probs):
    """Head i gives ``c = probs[i]`` whatever it reads."""
    with torch.no_grad():
        for h, p in zip(ee.heads, probs):
            h.net[-1].weight.zero_()
            h.net[-1].bias.fill_(math.log(p / (1 - p)))


@pytest.mark.parametrize("thresholds, layer", [((0.5, 0.5, 0.5), 2), ((0.2, 0.7, 0.95), 1), ((0.4, 0.7, 0.85), 3),
                                               ((0.4, 0.7, 0.95), 4)])
def test_a_token_exits_at_the_first_layer_reaching_its_own_threshold(tiny_ee, thresholds, layer):
    _constant_heads(tiny_ee, [0.3, 0.6, 0.9])
    for skip in ("mask", "compute"):
        r = tiny_ee.generate(["Q: 12+34\n", "Q: 5+6\n"], 8, mode="threshold", threshold=thresholds, temperature=0,
                             seed=0, skip=skip)
        later = r.mask.clone()
        later[:, 0] = False  # the first token is predicted from the prompt, which never exits
        assert set(r.exit_layers[later].tolist()) == {layer}


def test_one_threshold_per_layer_equal_to_a_single_one_gives_the_same_rollout(tiny_ee):
    one = tiny_ee.generate("Q: 12+34\n", 10, mode="threshold", threshold=0.45, temperature=0, seed=0)
    each = tiny_ee.generate("Q: 12+34\n", 10, mode="threshold", threshold=[0.45] * 3, temperature=0, seed=0)
    assert one.exit_layers.tolist() == each.exit_layers.tolist() and one.text == each.text


@pytest.mark.parametrize("bad, error, match", [((0.5, 0.5), ValueError, "2 values but the model has 3 exitable layers"),
                                               ((0.5, 0.0, 0.5), ValueError, r"in \(0, 1\]"),
                                               ("high", TypeError, "one per exitable layer")])
def test_bad_per_layer_thresholds_are_refused(tiny_ee, bad, error, match):
    with pytest.raises(error, match=match):
        tiny_ee.generate("Q: 1+2\n", 4, mode="threshold", threshold=bad)
    with pytest.raises(error, match=match):
        eetools.evaluation.evaluate(tiny_ee, "addition", n=2, mode="threshold", threshold=bad, progress=False)


class _Synthetic:
    """A stand-in for `evaluate` on 100 examples: each layer's threshold trades layers saved for answers.

    Lowering layer 0 one grid step saves 4 points at no cost, layer 1 saves 5 points for 3 answers,
    layer 2 saves 1 point for 1 answer; base accuracy is 100 %.
    """

    grid = (0.9, 0.7, 0.5, 0.3)

    def __init__(self):
        self.calls = []

    def __call__(self, ee_model, task, *, examples, threshold, compare, **kw):
        self.calls.append(tuple(threshold))
        steps = [self.grid.index(t) for t in threshold]
        saved = 0.04 * steps[0] + 0.05 * steps[1] + 0.01 * steps[2]
        wrong = 3 * steps[1] + steps[2]
        rows = [{"system": "model", "accuracy": (len(examples) - wrong) / len(examples), "layers_saved": saved}]
        if compare:
            rows.append({"system": "base", "accuracy": 1.0, "layers_saved": 0.0})
        return type("E", (), {"summary": pd.DataFrame(rows)})()


class _Model:
    exit_layers = [1, 2, 3]


def test_fit_spends_the_accuracy_budget_on_the_cheapest_layers(monkeypatch):
    fake = _Synthetic()
    monkeypatch.setattr(eetools.evaluation, "evaluate", fake)
    fit = fit_thresholds(_Model(), "addition", n=100, max_drop=0.05, grid=fake.grid, progress=False)
    # one threshold for all: 0.7 costs 4 answers for 10 points; 0.5 would cost 8
    assert fit.uniform == 0.7 and fit.base_accuracy == 1.0 and fit.floor == pytest.approx(0.95)
    # per layer: layer 0 all the way down (free), then layer 1 one step (3 answers), layer 2 two steps (2 answers)
    assert fit.thresholds == (0.3, 0.7, 0.5)
    assert fit.accuracy == pytest.approx(0.95) and fit.layers_saved == pytest.approx(0.12 + 0.05 + 0.02)
    assert fit.layers_saved > 0.10  # more than the best single threshold saves
    uni = fit.path[fit.path.stage == "uniform"]
    assert [t[0] for t in uni.thresholds] == [0.9, 0.7, 0.5]  # stops at the first uniform point below the floor
    assert fit.path.kept.sum() >= 3 and (fit.path[fit.path.kept].accuracy >= fit.floor - 1e-9).all()
    assert len(fake.calls) == len(set(fake.calls))  # no point measured twice
    names = [t.name for t in fit.figure().data]
    assert names == ["one threshold", "greedy steps tried", "greedy path", "fitted"]


def test_fit_says_when_no_threshold_keeps_the_floor(monkeypatch):
    fake = _Synthetic()
    fake.grid = (0.5, 0.3)

    def worse(*a, **kw):  # every point half the answers below the base model
        e = fake(*a, **kw)
        e.summary.loc[e.summary.system == "model", "accuracy"] -= 0.5
        return e

    monkeypatch.setattr(eetools.evaluation, "evaluate", worse)
    fit = fit_thresholds(_Model(), "addition", n=100, max_drop=0.01, grid=fake.grid, progress=False)
    assert fit.thresholds is None and fit.uniform is None and math.isnan(fit.accuracy)
    assert "none keeps the floor" in fit._repr_html_()
    with pytest.raises(ValueError, match="max_drop"):
        fit_thresholds(_Model(), "addition", max_drop=-0.1, progress=False)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        fit_thresholds(_Model(), "addition", grid=(0.5, 1.5), progress=False)


def test_fitted_thresholds_reproduce_their_validation_point(tiny_ee):
    fit = fit_thresholds(tiny_ee, "addition", n=4, grid=(0.9, 0.5, 0.1), progress=False)
    assert fit.thresholds is not None and len(fit.thresholds) == 3 and fit.layers == [1, 2, 3]
    assert fit.accuracy >= fit.floor
    ev = eetools.evaluation.evaluate(tiny_ee, "addition", examples=eetools.tasks.get("addition").validation_split(4),
                                     mode="threshold", threshold=fit.thresholds, compare=False, progress=False)
    row = ev.summary.iloc[0]
    assert row.accuracy == fit.accuracy and row.layers_saved == pytest.approx(fit.layers_saved)
    assert fit.layers_saved == max(fit.path[fit.path.accuracy >= fit.floor].layers_saved)
