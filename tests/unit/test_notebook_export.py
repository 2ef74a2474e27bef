"""Plotly figures survive static export: the committed notebooks, converted with nbconvert to HTML, draw them offline.

No execution: the committed outputs are read and exported as ``jupyter nbconvert --to html`` does.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import plotly.graph_objects as go
import plotly.io as pio
import pytest

from eetools.views.browser import dump_dom, find_chromium
from eetools.views.notebook import RENDERER, setup_notebook

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))
PLOTLY_JSON = "application/vnd.plotly.v1+json"
PLOTLYJS = "* plotly.js v"  # the banner at the top of the inlined library
# nbconvert's own template links require.js and MathJax for markdown; plotly must not add a CDN of its own
CDN = re.compile(r"<script[^>]*\ssrc=[\"'][^\"']*plot\.?ly", re.IGNORECASE)


@pytest.fixture
def restore_renderer():
    before = pio.renderers.default
    yield
    pio.renderers.default = before


def test_setup_notebook_stores_json_and_offline_html(restore_renderer):
    assert setup_notebook() is None and pio.renderers.default == f"plotly_mimetype+{RENDERER}"
    bundle = pio.renderers._build_mime_bundle(go.Figure(go.Bar(y=[1, 2])).to_dict())
    assert PLOTLY_JSON in bundle, "JupyterLab's JSON is kept"
    html = bundle["text/html"]
    assert "Plotly.newPlot" in html and PLOTLYJS not in html, "the figure HTML relies on plotly.js loaded once"
    assert "http" not in html, "nothing from a CDN (plotly.js or MathJax)"


def test_setup_notebook_twice_does_not_embed_plotlyjs_again(restore_renderer):
    setup_notebook()
    pio.renderers._activate_pending_renderers()  # what the first figure display does
    assert not pio.renderers._to_activate
    setup_notebook()
    assert not pio.renderers._to_activate, "a second call would display plotly.js again"


def _outputs(nb):
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_exports_its_figures_to_html(path):
    from nbconvert import HTMLExporter

    nb = nbformat.read(path, as_version=4)
    outputs = _outputs(nb)
    figures = [o for o in outputs if PLOTLY_JSON in o.get("data", {})]
    for o in figures:
        assert "Plotly.newPlot" in o["data"].get("text/html", ""), f"{path.name}: a figure without an HTML fallback"
    for o in figures:
        assert "http" not in o["data"]["text/html"], f"{path.name}: a figure loads something from the network"
    html, _ = HTMLExporter().from_notebook_node(nb)
    assert not CDN.search(html), f"{path.name}: plotly.js from a CDN"
    if not figures:
        assert PLOTLYJS not in html, f"{path.name}: plotly.js embedded without a figure"
        return
    assert html.count(PLOTLYJS) == 1, f"{path.name}: plotly.js must be inlined exactly once"
    assert html.index(PLOTLYJS) < html.index("Plotly.newPlot"), f"{path.name}: a figure drawn before plotly.js loads"
    assert html.count("Plotly.newPlot") >= len(figures)
    # every figure's div is in the page with the script that draws it
    for div_id in re.findall(r'Plotly\.newPlot\(\s*"([^"]+)"', html):
        assert f'id="{div_id}"' in html, f"{path.name}: figure {div_id} has no div"


@pytest.mark.slow
@pytest.mark.skipif(find_chromium() is None, reason="Chromium is not installed (apt-get install chromium)")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_exported_notebook_draws_every_figure_in_chromium(path, tmp_path):
    """Offline (nbconvert's CDN scripts do not load here), each figure becomes one drawn plotly SVG container."""
    from nbconvert import HTMLExporter

    nb = nbformat.read(path, as_version=4)
    n = sum(PLOTLY_JSON in o.get("data", {}) for o in _outputs(nb))
    if not n:
        pytest.skip(f"{path.name} has no plotly figure")
    page = tmp_path / "nb.html"
    page.write_text(HTMLExporter().from_notebook_node(nb)[0], encoding="utf-8")
    dom, err = dump_dom(page)
    drawn = len(re.findall(r'<div class="[^"<>]*\bsvg-container\b', dom))
    assert drawn == n, f"{path.name}: drew {drawn} of {n} figures"
    assert "Uncaught" not in err, f"{path.name}: JavaScript error: {err[-400:]}"
