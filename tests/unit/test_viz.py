"""`eetools.views.tokens` on hand-built rollouts: escaping, determinism, whitespace, hover text, figures.

No model is needed: `_rollout` builds a small `Rollout` from token strings and exit layers.
"""

from __future__ import annotations

import ast
import html
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from eetools.core.rollout import Rollout
from eetools.views import tokens as viz

L = 4
LAYERS = [1, 2, 3]
PROMPT = ["Q", ":", " 12", "+", "34", "\n"]


def _rollout(
    gen: list[list[str]], exits: list[list[int]] | None = None, *, c: float = 0.5, meta: dict | None = None
) -> Rollout:
    """A rollout of `len(gen)` sequences with generated tokens `gen` and exit layers `exits`.

    Every head's conditional exit probability is `c`; padding exits are `L` (no exit).
    """
    b, n = len(gen), max((len(g) for g in gen), default=0)
    exits = exits if exits is not None else [[L] * len(g) for g in gen]
    mask = torch.zeros(b, n, dtype=torch.bool)
    exit_layers = torch.full((b, n), L, dtype=torch.long)
    for i, (g, e) in enumerate(zip(gen, exits)):
        mask[i, : len(g)] = True
        exit_layers[i, : len(e)] = torch.tensor(e, dtype=torch.long)
    p = len(PROMPT)
    return Rollout(
        prompts=["".join(PROMPT)] * b,
        prompt_tokens=torch.arange(p).repeat(b, 1),
        prompt_mask=torch.ones(b, p, dtype=torch.long),
        tokens=torch.arange(n).repeat(b, 1),
        mask=mask,
        exit_layers=exit_layers,
        token_logprobs=-0.125 * torch.ones(b, n),
        exit_logprobs=torch.zeros(b, n),
        exit_probs=torch.full((b, n, len(LAYERS)), c),
        text=["".join(g) for g in gen],
        str_tokens=[list(g) for g in gen],
        prompt_str_tokens=[list(PROMPT)] * b,
        n_layers=L,
        layers=list(LAYERS),
        meta=meta or {},
    )


def _titles(fragment: str) -> list[str]:
    """The hover texts (rich tooltips) of the token spans, as plain text: lines, tags removed, unescaped."""
    tips = re.findall(r'<span class="ee-tip"[^>]*>(.*?)</span></span>', fragment, flags=re.S)
    text = [re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", t.replace("<br>", "\n")).replace("\n", "\0")) for t in tips]
    return [html.unescape(t).replace("\0", "\n").replace(" \n ", "\n").strip() for t in text]


SCRIPT = "<script>alert(1)</script>"


def test_script_tokens_are_inert():
    r = _rollout([["a", SCRIPT, "b"]], [[L, 2, 1]])
    r.prompt_str_tokens[0] = [SCRIPT, *PROMPT]
    view = viz.color_tokens(r, title=SCRIPT)
    for out in (str(view), view.to_html()):
        assert "<script" not in out
        assert "&lt;script&gt;" in out


def test_html_is_deterministic_and_depends_on_exits():
    a = viz.color_tokens(_rollout([["x", "y", "z"]], [[L, 1, 3]]))
    b = viz.color_tokens(_rollout([["x", "y", "z"]], [[L, 1, 3]]))
    c = viz.color_tokens(_rollout([["x", "y", "z"]], [[L, 2, 3]]))
    assert str(a) == str(b) and a.to_html() == b.to_html()
    assert str(a) != str(c)
    ids = re.findall(r'id="([^"]+)"', str(a))
    assert len(ids) == 1 and re.fullmatch(r"eetools-[0-9a-f]{12}", ids[0])
    assert ids != re.findall(r'id="([^"]+)"', str(c))


def test_visible_whitespace():
    assert viz.visible(" a") == "·a"
    assert viz.visible("\t") == "→"
    assert viz.visible("\n") == "↵\n"
    assert viz.visible("a\nb", newline="") == "a↵b"
    assert viz.visible("") == "∅"
    out = str(viz.color_tokens(_rollout([[" a", "\n", "\t", "b"]])))
    assert "·a" in out and "↵\n" in out and "→" in out


def test_unicode_tokens_render_as_is():
    out = viz.color_tokens(_rollout([["é", "日本", "🙂"]])).to_html()
    assert "é" in out and "日本" in out and "🙂" in out and 'charset="utf-8"' in out


def test_legend_lists_every_layer():
    out = str(viz.color_tokens(_rollout([["a"]])))
    for l in LAYERS:
        assert f"layer {l}" in out
    assert f"full depth ({L})" in out


def test_hover_shows_exit_layer_blocks_probability_and_logprob():
    # c = 0.5 at every head: P(exit at 1) = .5, at 2 = .25, at 3 = .125, no exit = .125
    out = str(viz.color_tokens(_rollout([["a", "b", "c"]], [[L, 2, 1]])))
    hover = [t for t in _titles(out) if t.startswith("token ")]
    assert len(hover) == 3
    assert "full depth" in hover[0] and f"blocks used: {L}/{L}" in hover[0] and "exit probability: 0.125" in hover[0]
    assert "exit layer 2" in hover[1] and f"blocks used: 2/{L}" in hover[1] and "exit probability: 0.250" in hover[1]
    assert "exit layer 1" in hover[2] and "exit probability: 0.500" in hover[2]
    assert all("token log-prob: -0.125" in h for h in hover)


def test_summary_line():
    out = str(viz.color_tokens(_rollout([["a", "b"]], [[L, 2]])))
    assert "tokens: 2" in out and "compute: 0.750" in out and "layers saved: 25.0%" in out


def test_empty_rollout_renders_prompt_only():
    r = _rollout([[]])
    out = str(viz.color_tokens(r))
    assert "no generated tokens" in out and "·12" in out
    assert not [t for t in _titles(out) if t.startswith("token ")]
    fig = viz.exit_heatmap(r)
    assert np.asarray(fig.data[0].z).size == 0


def test_ten_thousand_tokens_render_each_token_once():
    """A long rollout renders every token, at a constant size per token (no per-token growth); speed is not timed here."""

    def render(n):
        r = _rollout([[f"t{k % 7} " for k in range(n)]], [[LAYERS[k % 3] if k % 4 else L for k in range(n)]])
        return str(viz.color_tokens(r))

    out, quarter = render(10_000), render(2_500)
    assert sum(t.startswith("token ") for t in _titles(out)) == 10_000
    assert len(out) < 4.2 * len(quarter), "the HTML grows faster than the number of tokens"


def test_no_network_resources():
    r = _rollout([["a", "b"], ["c"]], [[L, 1], [2]])
    for out in (viz.color_tokens(r).to_html(), viz.color_tokens_many(r).to_html()):
        assert "http" not in out
        assert "<link" not in out and "<script" not in out and "@import" not in out


def test_repr_html_and_standalone_document():
    view = viz.color_tokens(_rollout([["a"]]), title="demo")
    assert view._repr_html_() == str(view) == view.fragment
    doc = view.to_html()
    assert doc.startswith("<!DOCTYPE html>") and view.fragment in doc and "<title>demo</title>" in doc


def test_many_sequences_share_one_legend():
    r = _rollout([["a"], ["b", "c"], ["d"]], [[1], [L, 3], [2]])
    out = str(viz.color_tokens_many(r))
    assert out.count("exit layer: <span") == 1  # the legend
    assert all(f"sequence {i}" in out for i in range(3))
    out = str(viz.color_tokens_many(r, max_sequences=2))
    assert "sequence 2" not in out and "showing 2 of 3 sequences" in out


def test_heatmap_one_trace_per_sequence():
    r = _rollout([["a", "b", "c"], ["d", " e"]], [[L, 2, 1], [L, 3]])
    fig = viz.exit_heatmap(r, index=[0, 1])
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert len(heat) == 2
    assert np.asarray(heat[0].z).shape == (len(LAYERS), 3) and np.asarray(heat[1].z).shape == (len(LAYERS), 2)
    np.testing.assert_allclose(np.asarray(heat[0].z), 0.5)
    marks = [t for t in fig.data if t.type == "scatter"]
    assert list(marks[0].y) == [len(LAYERS), 1, 0]  # full row, layer 2, layer 1
    assert "·e" in fig.layout.xaxis2.ticktext
    assert fig.to_json() == viz.exit_heatmap(r, index=[0, 1]).to_json()
    # a list of rollouts, and the stick-breaking distribution
    fig = viz.exit_heatmap([r, r], index=0, value="exit_dist")
    assert len([t for t in fig.data if t.type == "heatmap"]) == 2
    np.testing.assert_allclose(np.asarray(fig.data[0].z)[:, 0], [0.5, 0.25, 0.125])
    with pytest.raises(ValueError, match="exit_prob"):
        viz.exit_heatmap(r, value="nope")


def test_histogram_bars_as_given():
    hist = {"student": torch.tensor([0.1, 0.2, 0.3, 0.4]), "target": [0.0, 0.5, 0.25, 0.25]}
    fig = viz.exit_histogram_figure(hist, LAYERS, L)
    assert [t.name for t in fig.data] == ["student", "target"] and fig.layout.barmode == "group"
    assert list(fig.data[0].x) == ["1", "2", "3", f"full ({L})"]
    for trace, values in zip(fig.data, hist.values()):
        assert sum(trace.y) == pytest.approx(float(sum(values)))
    with pytest.raises(ValueError, match="expected 4"):
        viz.exit_histogram_figure({"bad": [1.0, 2.0]}, LAYERS, L)


def test_viz_imports_no_model_code():
    tree = ast.parse(Path(viz.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m.startswith(("transformer_lens", "eetools.core.model", "transformers")) for m in names)


def test_tooltips_are_rich_hidden_without_css_and_show_topk_readouts_escaped():
    r = _rollout([["a", "b"]], [[L, 2]])
    tops = [[("x", 0.5), (SCRIPT, 0.25)], [("\n", 0.75)]]
    out = str(viz.color_tokens(r, readouts=tops, selected=1))
    assert out.count('class="ee-tip" style="display:none"') == 2  # hidden even if the <style> is stripped
    # the native title is only the fallback where <style> is stripped: a mask with an empty title covers it otherwise
    assert out.count('<span class="ee-mask" title="" style="display:none"></span>') == 2
    titles = [html.unescape(t) for t in re.findall(r'class="ee-tok"[^>]* title="([^"]*)"', out)]
    assert len(titles) == 2 and "lens top-2 at full depth (4):\n  'x' 0.500" in titles[0]
    hover = _titles(out)
    assert (
        "lens top-2 at full depth (4)" in hover[0]
        and "'x' 0.500" in hover[0]
        and "'<script>alert(1)</script>' 0.250" in hover[0]
    )
    assert "lens top-1 at layer 2" in hover[1] and "'↵' 0.750" in hover[1]
    assert "<script" not in out and "&lt;script&gt;" in out
    assert out.count("outline:2px solid") == 1 and 'data-t="1"' in out
    with pytest.raises(ValueError, match="one per token"):
        viz.color_tokens(r, readouts=tops[:1])


def test_panels_are_labelled_by_name():
    r = _rollout([["a", "b"], ["c"]], [[L, 1], [2]])
    fig = viz.exit_heatmap([r, r], 0, names=["calibrated", "rl"])
    assert [a.text for a in fig.layout.annotations] == ["calibrated", "rl"]
    assert fig.data[0].name == "calibrated"
    out = str(viz.color_tokens_many(r, names=["calibrated", "rl"]))
    assert "calibrated" in out and "sequence 0" not in out
    with pytest.raises(ValueError, match="one name per panel"):
        viz.exit_heatmap([r, r], 0, names=["only one"])


def test_exit_diff_aligns_tokens_and_counts_earlier_and_later_exits():
    from eetools.views.compare import exit_diff

    a = _rollout([["x", "y", "z", "w"]], [[L, 3, 2, L]])
    b = _rollout([["x", "y", "Q", "w", SCRIPT]], [[L, 1, 1, 3, 2]])
    out = str(exit_diff(a, b, names=("calibrated", "rl")))
    assert "calibrated vs rl" in out
    # positions 0, 1, 3 agree; there rl exits earlier at 1 (3 -> 1) and 3 (L -> 3)
    assert "3 of 5 positions have the same token" in out and "rl exits earlier at 2, later at 0" in out
    cols = re.findall(r'<span class="ee-col"[^>]*>', out)
    assert len(cols) == 5 and sum("border-bottom" in c for c in cols) == 2  # z/Q differ; 5th only in rl
    assert ">-2<" in out and ">-1<" in out
    assert "<script" not in out and "&lt;script&gt;" in out
    with pytest.raises(ValueError, match="two names"):
        exit_diff(a, b, names=("x",))
    c = _rollout([["x"]])
    c.prompts = ["other"]
    with pytest.raises(ValueError, match="different prompts"):
        exit_diff(a, c)
