"""Per-layer exit thresholds: a token exits at the first layer whose head reaches that layer's threshold."""

import math

import pytest
import torch

import eetools
import eetools.analysis.evaluation


def _constant_heads(ee, probs):
    """Head i gives ``c = probs[i]`` whatever it reads."""
    with torch.no_grad():
        for h, p in zip(ee.heads, probs):
            h.net[-1].weight.zero_()
            h.net[-1].bias.fill_(math.log(p / (1 - p)))


@pytest.mark.parametrize(
    "thresholds, layer", [((0.5, 0.5, 0.5), 2), ((0.2, 0.7, 0.95), 1), ((0.4, 0.7, 0.85), 3), ((0.4, 0.7, 0.95), 4)]
)
def test_a_token_exits_at_the_first_layer_reaching_its_own_threshold(tiny_ee, thresholds, layer):
    _constant_heads(tiny_ee, [0.3, 0.6, 0.9])
    for skip in ("mask", "compute"):
        r = tiny_ee.generate(
            ["Q: 12+34\n", "Q: 5+6\n"], 8, mode="threshold", threshold=thresholds, temperature=0, seed=0, skip=skip
        )
        later = r.mask.clone()
        later[:, 0] = False  # the first token is predicted from the prompt, which never exits
        assert set(r.exit_layers[later].tolist()) == {layer}


def test_one_threshold_per_layer_equal_to_a_single_one_gives_the_same_rollout(tiny_ee):
    one = tiny_ee.generate("Q: 12+34\n", 10, mode="threshold", threshold=0.45, temperature=0, seed=0)
    each = tiny_ee.generate("Q: 12+34\n", 10, mode="threshold", threshold=[0.45] * 3, temperature=0, seed=0)
    assert one.exit_layers.tolist() == each.exit_layers.tolist() and one.text == each.text


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ((0.5, 0.5), ValueError, "2 values but the model has 3 exitable layers"),
        ((0.5, 0.0, 0.5), ValueError, r"in \(0, 1\]"),
        ("high", TypeError, "one per exitable layer"),
    ],
)
def test_bad_per_layer_thresholds_are_refused(tiny_ee, bad, error, match):
    with pytest.raises(error, match=match):
        tiny_ee.generate("Q: 1+2\n", 4, mode="threshold", threshold=bad)
    with pytest.raises(error, match=match):
        eetools.analysis.evaluation.evaluate(tiny_ee, "addition", n=2, mode="threshold", threshold=bad, progress=False)
