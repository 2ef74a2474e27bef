"""The logit-lens grid and the exit-layer readouts: the maths on hand-built arrays, parity on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eetools.views.lens_grid import LensGrid, compare_lens_grids, exit_readouts, lens_grid, lens_grid_text


def _grid(exits=(4, 2), frozen=None, name="m") -> LensGrid:
    """A 4-block grid of two tokens at layers 1..4, k 2, every top-1 'a' with probability layer/10."""
    layers = [1, 2, 3, 4]
    probs = np.array([[[l / 10, 0.05]] * 2 for l in layers])
    tops = np.array([[["a", "<b>"]] * 2 for _ in layers], dtype=object)
    return LensGrid(layers, ["x", "y"], tops, probs, probs[..., 0] / 2, 4, np.array(exits), frozen, name)


def test_shapes_are_checked():
    g = _grid()
    with pytest.raises(ValueError, match="must be"):
        LensGrid(g.layers, ["x"], g.top_tokens, g.top_probs, g.p_token, 4)
    with pytest.raises(ValueError, match="ascend"):
        LensGrid([2, 1, 3, 4], g.tokens, g.top_tokens, g.top_probs, g.p_token, 4)
    with pytest.raises(ValueError, match="exit_layers"):
        LensGrid(g.layers, g.tokens, g.top_tokens, g.top_probs, g.p_token, 4, np.array([4]))


def test_exit_topk_reads_each_token_at_its_exit_layer():
    out = _grid(exits=(4, 2)).exit_topk()
    assert out[0] == [("a", pytest.approx(0.4)), ("<b>", pytest.approx(0.05))]  # full depth: the last row
    assert out[1][0] == ("a", pytest.approx(0.2))  # exited at 2


def test_figure_blanks_frozen_cells_marks_exits_and_escapes_tokens():
    frozen = np.zeros((4, 2), dtype=bool)
    frozen[2:, 1] = True  # token 1 exited at 2: layers 3, 4 frozen
    fig = _grid(frozen=frozen).figure()
    heat = fig.data[0]
    z = np.asarray(heat.z, dtype=float)
    assert np.isnan(z[2:, 1]).all() and not np.isnan(z[:, 0]).any()
    assert heat.text[3][1] == "" and heat.text[3][0] == "a"
    assert "frozen (exited at layer 2)" in heat.customdata[3][1]
    assert "'&lt;b&gt;' 0.050" in heat.customdata[0][0] and "<b>" not in heat.customdata[0][0]
    marks = fig.data[1]
    assert list(marks.x) == [0, 1] and list(marks.y) == [3, 1]  # full depth row 3, layer 2 row 1
    assert fig.layout.annotations[0].text == "m"


def test_no_exit_marker_without_exit_layers_and_comparison_titles():
    g = _grid()
    g.exit_layers = None
    assert len(g.figure().data) == 1
    fig = compare_lens_grids([_grid(name="calibrated"), _grid(name="rl")])
    assert [a.text for a in fig.layout.annotations] == ["calibrated", "rl"]
    assert len([t for t in fig.data if t.type == "heatmap"]) == 2
    with pytest.raises(ValueError, match="at least one"):
        compare_lens_grids([])


def test_replayed_exits_give_each_token_the_distribution_it_was_drawn_from(tiny_ee):
    torch.manual_seed(0)
    with torch.no_grad():
        for h in tiny_ee.heads:
            h.net[-1].bias.fill_(0.5)  # exits happen
    r = tiny_ee.generate(["Q: 1+2\n", "Q: 33+4\n"], 10, seed=0, temperature=1.0)
    assert bool((r.exit_layers[r.mask] < tiny_ee.n_layers).any()), "the test needs some exits"
    for i in range(len(r)):
        g = lens_grid(tiny_ee, r, i, k=3)
        n = int(r.mask[i].sum())
        assert g.layers == [1, 2, 3, 4] and len(g.tokens) == n
        rows = {l: k for k, l in enumerate(g.layers)}
        at_exit = np.array([g.p_token[rows[int(e)], t] for t, e in enumerate(g.exit_layers)])
        # the lens at a token's exit layer (full depth if none) is what generation sampled from
        np.testing.assert_allclose(at_exit, r.token_logprobs[i, :n].exp().numpy(), atol=1e-4, rtol=1e-3)
        for t, e in enumerate(g.exit_layers):
            assert g.frozen[:, t].tolist() == [l > e for l in g.layers]
        tops = exit_readouts(tiny_ee, r, i, k=3)
        assert len(tops) == n and all(len(x) == 3 for x in tops)
        assert [x[0][1] for x in tops] == pytest.approx(
            [float(g.top_probs[rows[int(e)], t, 0]) for t, e in enumerate(g.exit_layers)], abs=1e-5
        )


def test_text_grid_last_row_is_the_model_and_bad_input_is_refused(tiny_ee):
    bridge = tiny_ee.model
    text = "Q: 12+34\n"
    g = lens_grid_text(tiny_ee, text, k=2, name="x")
    ids = bridge.to_tokens(text)
    with torch.no_grad():
        logits = bridge(ids, return_type="logits")[0, :-1].float().softmax(-1)
    np.testing.assert_allclose(g.top_probs[-1, :, 0], logits.max(-1).values.numpy(), atol=1e-5)
    assert g.exit_layers is None and not g.frozen.any() and len(g.tokens) == ids.shape[1] - 1
    g.figure()
    with pytest.raises(ValueError, match="non-empty"):
        lens_grid_text(tiny_ee, "")
    with pytest.raises(ValueError, match="layers must"):
        lens_grid_text(tiny_ee, text, layers=[9])
    with pytest.raises(ValueError, match="k must"):
        lens_grid_text(tiny_ee, text, k=0)
    r = tiny_ee.generate("Q: 1+2\n", 4, seed=0)
    with pytest.raises(IndexError, match="out of range"):
        lens_grid(tiny_ee, r, 3)
    # without exits, a bare bridge works too
    plain = lens_grid(bridge, r, 0, exits=False)
    assert not plain.frozen.any()
