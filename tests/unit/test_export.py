"""`ee.views.save`: any view to standalone HTML, PNG or SVG; the layer colour scale; clear errors when a tool is missing.

Pictures need the system Chromium (kaleido drives it for figures; HTML views are screenshotted);
those tests skip with a reason where it is absent.
"""

from __future__ import annotations

import re
import struct
import sys

import numpy as np
import plotly.graph_objects as go
import pytest

from eetools.views import browser, export, save
from eetools.views import tokens as viz
from eetools.views.export import ExportUnavailable
from tests.unit.test_viz import LAYERS, L, _rollout

CHROMIUM = browser.find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
try:
    import kaleido  # noqa: F401

    KALEIDO = True
except ImportError:
    KALEIDO = False
needs_kaleido = pytest.mark.skipif(not KALEIDO, reason='kaleido is not installed (pip install "eetools[export]")')


def _fig() -> go.Figure:
    return go.Figure(go.Bar(x=["a", "b"], y=[1, 2]), layout=dict(title="t", width=400, height=300))


def _png_size(path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_figure_html_is_standalone_and_offline(tmp_path):
    out = save(_fig(), tmp_path / "f.html")
    text = out.read_text()
    assert "* plotly.js v" in text and "Plotly.newPlot" in text, "plotly.js not inlined"
    assert not re.search(r"<script[^>]*\ssrc=", text), "an external script (CDN)"
    assert not list(tmp_path.glob("*.tmp")), "temporary file left behind"


def test_token_view_html_is_its_document(tmp_path):
    view = viz.color_tokens(_rollout([["a", "b"]], [[1, L]]))
    assert save(view, tmp_path / "t.html").read_text() == view.to_html()


def test_objects_with_figure_method_are_figures(tmp_path):
    class Result:
        def figure(self):
            return _fig()

    assert "Plotly.newPlot" in save(Result(), tmp_path / "r.html").read_text()


@pytest.mark.parametrize(
    ("view", "name", "match"),
    [
        (_fig(), "f.gif", "unknown format .gif"),
        (_fig(), "f", "unknown format"),
        (viz.TokenView("<div>x</div>"), "t.svg", "HTML view .* not .svg"),
        (42, "x.png", "cannot export a int"),
    ],
)
def test_bad_requests_are_one_line_value_errors(tmp_path, view, name, match):
    with pytest.raises(ValueError, match=match) as e:
        save(view, tmp_path / name)
    assert "\n" not in str(e.value)
    assert not any(tmp_path.iterdir()), "nothing is written on a bad request"


def test_missing_kaleido_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kaleido", None)  # import kaleido -> ImportError
    with pytest.raises(ExportUnavailable, match=r"needs kaleido: pip install \"eetools\[export\]\"") as e:
        save(_fig(), tmp_path / "f.png")
    assert "\n" not in str(e.value) and not any(tmp_path.iterdir())


@needs_kaleido
def test_missing_browser_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "find_chromium", lambda: None)
    monkeypatch.setattr(browser, "find_chromium", lambda: None)
    monkeypatch.setattr(export, "_kaleido_has_browser", lambda: False)
    with pytest.raises(ExportUnavailable, match="needs a Chromium browser.*apt-get install chromium"):
        save(_fig(), tmp_path / "f.svg")
    with pytest.raises(ExportUnavailable, match="no Chromium/Chrome browser found.*BROWSER_PATH"):
        save(viz.TokenView("<div>x</div>"), tmp_path / "t.png")
    assert not any(tmp_path.iterdir())


@needs_kaleido
@needs_chromium
def test_figure_png_and_svg_through_kaleido(tmp_path):
    png = save(_fig(), tmp_path / "f.png", scale=1)
    assert _png_size(png) == (400, 300)
    svg = save(_fig(), tmp_path / "f.svg").read_text()
    assert svg.lstrip().startswith(("<svg", "<?xml")) and "main-svg" in svg


@needs_chromium
def test_token_view_png_is_uncropped(tmp_path):
    """The screenshot is as tall as the content: 40 sequences make a picture several times taller than 2."""
    short = _rollout([["a", "b"]] * 2, [[1, L]] * 2)
    tall = _rollout([["a", "b"]] * 40, [[1, L]] * 40)
    w1, h1 = _png_size(save(viz.color_tokens_many(short), tmp_path / "s.png", scale=1))
    w2, h2 = _png_size(save(viz.color_tokens_many(tall, max_sequences=40), tmp_path / "t.png", scale=1))
    assert w1 == w2 == 900
    assert h2 > 8 * h1 and h2 > 2000, (h1, h2)  # a fixed window would have cut the tall one


def _lab(rgb: str) -> np.ndarray:
    """CIE L*a*b* (D65) of a ``#rrggbb`` colour."""
    c = np.array([int(rgb[i : i + 2], 16) for i in (1, 3, 5)]) / 255
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = m @ c / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


@pytest.mark.parametrize("n_layers", [3, 4, 8, 12, 28, 37])
def test_adjacent_layers_have_distinguishable_colours(n_layers):
    """CIE76 distance >= 10 between neighbouring exitable layers (2.3 is just noticeable), >= 30 to full depth."""
    layers = list(range(1, n_layers))
    colours = [viz._color(l, layers, n_layers)[0] for l in layers]
    full = _lab(viz._color(n_layers, layers, n_layers)[0])
    gaps = [np.linalg.norm(_lab(a) - _lab(b)) for a, b in zip(colours, colours[1:])]
    assert min(gaps) >= 10, f"neighbouring layers too alike: {min(gaps):.1f} at {int(np.argmin(gaps))}"
    assert min(np.linalg.norm(_lab(c) - full) for c in colours) >= 30
    assert len(set(colours)) == len(colours)


def test_legend_colours_follow_the_scale():
    r = _rollout([["a"]], [[LAYERS[0]]])
    legend = viz.color_tokens(r).fragment
    for l in LAYERS:
        assert viz._color(l, LAYERS, L)[0] in legend
