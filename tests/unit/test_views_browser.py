"""Every view rendered by a real browser (headless Chromium): plotly draws, tooltips open, model text stays text.

Each page carries a small script that checks the DOM after load and writes a JSON verdict into
``<pre id="ee-result">``; `chromium --dump-dom` returns it. Skipped where Chromium is absent.
The widget UI needs a Jupyter frontend (its widget manager), so here it is the explorer's static
form that renders; `test_widgets.py` drives the widget callbacks.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from eetools import views
from eetools.views.lens_grid import LensGrid
from tests.unit.test_viz import SCRIPT, _rollout

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=15000",  # virtual: spent only while the page waits
]

# after load: every tooltip hidden, then the focused token's shown; no script inside a view; texts of svg labels
CHECK = """<pre id="ee-result"></pre><script>
window.addEventListener('load', async () => {
  const toks = [...document.querySelectorAll('.ee-tok')];
  const shown = t => getComputedStyle(t.querySelector('.ee-tip')).display;
  const before = toks.map(shown);
  let after = [], tries = 0;
  // focus can land before a headless window has focus itself: focus again after a frame until :focus applies
  while (toks.length && tries < 20) {
    tries += 1; window.focus(); toks[1].focus(); after = toks.map(shown);
    if (document.activeElement === toks[1] && after[1] === 'block') break;
    await new Promise(done => requestAnimationFrame(() => setTimeout(done, 50)));
  }
  const figs = [...document.querySelectorAll('.plotly-graph-div')].map(d => d.querySelectorAll('.main-svg').length);
  const svgText = [...document.querySelectorAll('svg text')].map(t => t.textContent);
  const tipText = toks.length ? toks[1].querySelector('.ee-tip').textContent : '';
  // with the sheet live, the point on a token is its mask (empty title: no native tooltip on top of the rich one)
  const masked = toks.map(t => { const r = t.getBoundingClientRect();
    return document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2)?.className === 'ee-mask'; });
  document.querySelectorAll('style').forEach(s => s.remove());  // as a sanitizer would
  const unmasked = toks.map(t => { const r = t.getBoundingClientRect();
    const el = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
    return el === t && getComputedStyle(t.querySelector('.ee-tip')).display === 'none' && t.title.length > 0; });
  document.getElementById('ee-result').textContent = JSON.stringify({
    before, after, tries, focused: document.activeElement === toks[1], figs, svgText, tipText, masked, unmasked, n: toks.length,
    scripts: document.querySelectorAll('.eetools-tokens script, .ee-tip script, svg script').length,
    bold: document.querySelectorAll('svg text b, svg text tspan[style*="bold"]').length,
  });
});
</script>"""


def _render(page: str, tmp_path, shot: str | None = None) -> dict:
    """Load `page` (a full HTML document) in headless Chromium; the verdict of `CHECK`."""
    path = tmp_path / "page.html"
    path.write_text(page.replace("</body>", CHECK + "</body>"), encoding="utf-8")
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    for _ in range(2):  # on a loaded machine the page's load can outlast the virtual-time budget: once more
        run = subprocess.run([*cmd, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
        found = re.search(r'<pre id="ee-result">(.*?)</pre>', run.stdout, flags=re.S)
        if found and found.group(1):
            break
    assert found and found.group(1), f"the page's check did not run: {run.stderr[-500:]}"
    if shot:
        png = tmp_path / shot
        subprocess.run(
            [*cmd, "--window-size=1200,900", f"--screenshot={png}", path.as_uri()], capture_output=True, timeout=120
        )
        assert png.exists() and png.stat().st_size > 5_000, "no screenshot"
    return json.loads(html.unescape(found.group(1)))


def _figures_page(figs) -> str:
    """One document with every figure, plotly.js inlined once (no network)."""
    divs = [f.to_html(full_html=False, include_plotlyjs=i == 0, div_id=f"fig{i}") for i, f in enumerate(figs)]
    return '<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>' + "".join(divs) + "</body></html>"


def _tokens_page(*token_views) -> str:
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
        + "".join(map(str, token_views))
        + "</body></html>"
    )


def _grid(name: str) -> LensGrid:
    layers = [1, 2, 3, 4]
    probs = np.array([[[l / 5, 0.05]] * 3 for l in layers])
    tops = np.array([[["<b>", "\n"], ["a", "b"], ["&amp;", " x"]] for _ in layers], dtype=object)
    frozen = np.zeros((4, 3), dtype=bool)
    frozen[2:, 1] = True
    return LensGrid(layers, ["x", SCRIPT, "z"], tops, probs, probs[..., 0], 4, np.array([4, 2, 4]), frozen, name)


def test_token_views_show_rich_tooltips_and_keep_model_text_inert(tmp_path):
    r = _rollout([["a", SCRIPT, "b"], ["c", "d"]], [[4, 2, 1], [3, 4]])
    tops = [[("x", 0.5), ("<i>y</i>", 0.25)]] * 3
    page = _tokens_page(
        views.color_tokens(r, readouts=tops, selected=2, title="calibrated"),
        views.color_tokens_many(r, names=["calibrated", "rl"]),
        views.exit_diff(r, _rollout([["a", "Q", "b", SCRIPT]], [[4, 1, 3, 2]]), names=("calibrated", "rl")),
    )
    out = _render(page, tmp_path, shot="tokens.png")
    assert out["n"] == 3 + 5 + 7 and out["scripts"] == 0
    assert set(out["before"]) == {"none"}  # every tooltip hidden until hovered or focused
    assert out["after"][1] == "block" and out["after"].count("block") == 1, (out["focused"], out["tries"], out["after"])
    assert SCRIPT in out["tipText"] and "lens top-2 at layer 2" in out["tipText"] and "<i>y</i>" in out["tipText"]
    # the first view's tokens (in the viewport): masked with the sheet; without it, the native title shows instead
    assert all(out["masked"][:3]) and all(out["unmasked"][:3]), (out["masked"][:3], out["unmasked"][:3])


def test_plotly_views_render_with_titles_and_literal_model_text(tmp_path):
    import torch

    from eetools.views.widgets import TokenDetails

    r = _rollout([["a", "<b>", "c"]], [[4, 2, 1]])
    lens = pd.DataFrame([{"layer": l, "top1": "a", "p_top1": 0.5, "p_token": l / 4} for l in (1, 2, 3, 4)])
    details = TokenDetails("<b>", 2, pd.Series([1.0, 0.0], index=["2", "none"]), lens, [("a", 0.9)])
    history = pd.DataFrame(
        {
            "step": [0, 1],
            "loss": [1.0, 0.5],
            "kl": [0.5, 0.2],
            "exit_nll": [0.5, 0.3],
            "student_compute": [1.0, 0.9],
            "target_compute": [0.8, 0.8],
        }
    )
    rl = pd.DataFrame(
        [{"run": k, "step": s, "accuracy": 0.5, "compute": 0.9, "coherence": 1.0} for k in range(2) for s in range(3)]
    )
    figs = [
        views.exit_heatmap([r, r], 0, names=["calibrated", "rl"]),
        views.exit_histogram_figure({"a": torch.tensor([0.1, 0.2, 0.3, 0.4])}, [1, 2, 3], 4),
        _grid("calibrated").figure(),
        views.compare_lens_grids([_grid("calibrated"), _grid("rl")]),
        details.figure(),
        views.calibration_figure(history),
        views.rl_dynamics_figure(rl),
    ]
    out = _render(_figures_page(figs), tmp_path, shot="figures.png")
    assert len(out["figs"]) == len(figs) and all(n >= 1 for n in out["figs"]), out["figs"]
    texts = out["svgText"]
    assert {"calibrated", "rl"} <= set(texts)  # panels named by model, not "sequence 0" twice
    assert "<b>" in texts and out["bold"] == 0  # a token "<b>" is shown as text, not markup
    assert "&amp;" in texts  # and "&amp;" stays those five characters
    assert "final (4)" in texts and "L1" in texts


def test_the_explorer_static_view_renders(tmp_path, tiny_ee):
    ex = views.Explorer({"calibrated": tiny_ee, "rl": tiny_ee}, "addition", n_examples=1, max_new_tokens=5)
    page = '<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>' + ex.to_html(t=1) + "</body></html>"
    out = _render(page, tmp_path)
    n = sum(int(r.mask[0].sum()) for r in ex.rollouts.values())
    assert out["n"] == 2 * n  # each model's colouring, then the diff's two rows
    assert "lens top-5" in out["tipText"] and out["scripts"] == 0
