"""`tradeoff`: operating points of an exit model (threshold curve, sampled exits, base, oracle)."""

import math

import pandas as pd
import pytest
import torch

from eetools.analysis.operating_points import tradeoff


def test_threshold_curve_spans_no_exits_to_exiting_at_the_first_layer(tiny_ee):
    with torch.no_grad():
        for h in tiny_ee.heads:
            h.net[-1].bias.fill_(-5.0)  # c ~ 0.007 everywhere: below 0.5, above 1e-4
            h.net[-1].weight.zero_()
    res = tradeoff(tiny_ee, "addition", thresholds=[0.5, 1e-4], n=3, progress=False)
    df = res.df
    assert list(df.system) == ["base", "sample", "threshold", "threshold", "oracle"]
    by_t = df[df.system == "threshold"].set_index("threshold")
    base = df[df.system == "base"].iloc[0]
    assert base.layers_saved == 0.0 and by_t.loc[0.5, "layers_saved"] == 0.0
    # every token but the first (which never exits) stops at the first exitable layer
    assert by_t.loc[1e-4, "layers_saved"] > 0.8 * (1 - tiny_ee.exit_layers[0] / tiny_ee.n_layers)
    assert by_t.loc[0.5, "accuracy"] == base.accuracy  # no exits: the base model's tokens
    assert math.isnan(df[df.system == "oracle"].threshold.iloc[0])
    fig = res.figure()
    assert [t.name for t in fig.data] == ["base", "sample", "threshold", "oracle"]
    assert list(fig.data[2].text) == ["t=0.5", "t=0.0001"]


@pytest.mark.parametrize("bad", [[], [0.0], [1.5], [0.5, -0.1]])
def test_thresholds_outside_zero_one_are_refused(tiny_ee, bad):
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        tradeoff(tiny_ee, "addition", thresholds=bad, n=2, progress=False)


def test_a_model_with_adapters_also_shows_itself_at_full_depth(tiny_ee):
    """`no_exit`: the adapted weights without exits, so the adapters' own cost is not blamed on the exits."""
    from eetools.analysis.evaluation import evaluate
    from eetools.core.adapters import add_lora

    add_lora(tiny_ee, r=2)
    with torch.no_grad():  # nonzero adapters: the adapted model's greedy text is not the base model's
        for p in tiny_ee.trainable_parameters()[len(list(tiny_ee.heads.parameters())) :]:
            p.normal_(0, 0.5)
    res = tradeoff(tiny_ee, "addition", thresholds=[0.5], n=3, sample=False, progress=False)
    assert list(res.df.system) == ["base", "no_exit", "threshold", "oracle"]
    no_exit = res.df[res.df.system == "no_exit"].iloc[0]
    assert no_exit.layers_saved == 0.0
    assert [t.name for t in res.figure().data] == ["base", "no_exit", "threshold", "oracle"]
    ev = evaluate(tiny_ee, "addition", n=3, mode="off", compare=True, progress=False)
    per = ev.per_example.set_index(["system", "example"]).completion
    assert [per["model", i] for i in range(3)] == [per["no_exit", i] for i in range(3)]
    assert [per["base", i] for i in range(3)] != [per["no_exit", i] for i in range(3)], "the adapters did nothing"
    assert list(ev.histogram.columns) == ["model", "base", "no_exit", "oracle"]


def test_best_threshold_is_chosen_on_the_validation_split(tiny_ee):
    import pandas as pd

    from eetools.analysis.operating_points import Tradeoff

    df = pd.DataFrame(
        {
            "system": ["base", "threshold", "threshold", "threshold", "oracle"],
            "threshold": [float("nan"), 0.5, 0.3, 0.1, float("nan")],
            "accuracy": [1.0, 1.0, 0.99, 0.95, 1.0],
            "layers_saved": [0.0, 0.3, 0.4, 0.5, 0.6],
        }
    )
    points = Tradeoff(df=df, task="addition")
    assert points.best_threshold(0.01) == 0.3 and points.best_threshold(0.0) == 0.5
    assert points.best_threshold(0.1) == 0.1
    assert Tradeoff(df=df.assign(accuracy=[1.0, 0.5, 0.5, 0.5, 1.0]), task="addition").best_threshold(0.01) is None
    with pytest.raises(ValueError, match="max_drop"):
        points.best_threshold(-0.01)
    res = tradeoff(tiny_ee, "addition", thresholds=[0.5], n=3, sample=False, split="validation", progress=False)
    assert res.split == "validation" and "validation split" in res.figure().layout.title.text
    with pytest.raises(ValueError, match="split must be"):
        tradeoff(tiny_ee, "addition", thresholds=[0.5], n=3, split="train", progress=False)


def test_the_confidence_baseline_is_evaluated_on_the_same_weights(tiny_ee):
    """``confidence=[t]`` adds rows of the parameter-free baseline, labelled and drawn apart from the heads' curve."""
    res = tradeoff(tiny_ee, "addition", thresholds=[0.5], confidence=[1e-6, 1.0], n=3, sample=False, progress=False)
    df = res.df
    assert list(df.system) == ["base", "threshold", "confidence", "confidence", "oracle"]
    conf = df[df.system == "confidence"].set_index("threshold")
    # any readout's top probability is >= 1e-6: every token but the first exits at the first layer
    assert conf.loc[1e-6, "layers_saved"] > 0.8 * (1 - tiny_ee.exit_layers[0] / tiny_ee.n_layers)
    assert conf.loc[1.0, "layers_saved"] == 0.0  # a random model's readout is never certain
    assert conf.loc[1.0, "accuracy"] == df[df.system == "base"].accuracy.iloc[0]
    assert res.best_threshold(1.0) == 0.5, "best_threshold picks among the model's own thresholds only"
    fig = res.figure()
    assert [t.name for t in fig.data] == ["base", "threshold", "confidence", "oracle"]
    assert list(fig.data[2].text) == ["t=1e-06", "t=1"]
    assert (fig.data[1].textposition, fig.data[2].textposition) == ("top center", "bottom center"), "labels collide"
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        tradeoff(tiny_ee, "addition", thresholds=[0.5], confidence=[0.0], n=2, progress=False)


def test_rollouts_kept_makes_each_rollout_once_and_gives_the_same_results(tiny_ee, monkeypatch):
    """Inside `rollouts_kept`, evaluating the same model the same way again reuses its rollouts (the same
    tables as without it); other seeds and other models make their own, but with ``one_base`` every model's
    base rollouts are shared; outside it nothing is kept."""
    import eetools
    from eetools.analysis import evaluation
    from eetools.analysis.evaluation import evaluate, rollouts_kept

    made = []
    make = evaluation._make_all
    monkeypatch.setattr(evaluation, "_make_all", lambda m, *a: made.append((id(m), a[1].mode, a[-3])) or make(m, *a))
    plain = evaluate(tiny_ee, "addition", n=3, seed=1, progress=False)
    assert len(made) == 2  # the model's sampled exits and the base model
    other = eetools.attach_exit_heads(tiny_ee.model, layers=[1, 2, 3])
    with rollouts_kept(one_base=True):
        first = evaluate(tiny_ee, "addition", n=3, seed=1, progress=False)
        again = tradeoff(tiny_ee, "addition", thresholds=[0.5], n=3, seed=1, progress=False)
        evaluate(tiny_ee, "addition", n=3, seed=2, progress=False)  # another seed: its own sampled exits
        evaluate(other, "addition", n=3, seed=1, progress=False)  # another model: its own, but the same base
    # first's two, the threshold point, seed 2's sampled exits (greedy with no exits: any seed), the other model's
    assert len(made) == 2 + 2 + 1 + 1 + 1
    pd.testing.assert_frame_equal(first.summary, plain.summary)
    kept = again.df.set_index("system")
    for system in ("base", "oracle"):
        assert kept.loc[system, "accuracy"] == plain.summary.set_index("system").loc[system, "accuracy"]
    assert kept.loc["sample", "layers_saved"] == plain.summary.set_index("system").loc["model", "layers_saved"]
    evaluate(tiny_ee, "addition", n=3, seed=1, progress=False)
    assert len(made) == 7 + 2  # outside the context every rollout is made again
