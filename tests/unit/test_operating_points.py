"""`tradeoff`: operating points of an exit model (threshold curve, sampled exits, base, oracle)."""

import math

import pytest
import torch

from eetools.operating_points import tradeoff


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
