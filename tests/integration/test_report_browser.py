"""`eetools reproduce --quick` builds a report that a real browser renders (integration tier)."""

import html
import json
import re
import shutil
import subprocess

import pytest

from eetools.io.models import shipped_model_dir
from eetools.views import browser

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Run in the page once plotly drew: what sticks out of the page or of its figure, and what covers what.
LAYOUT_CHECK = """<script>
addEventListener('load', () => setTimeout(() => {
  const page = document.documentElement, W = page.clientWidth, bad = [];
  const inside = (r, b) => r.left >= b.left - 1 && r.right <= b.right + 1 && r.top >= b.top - 1 && r.bottom <= b.bottom + 1;
  const cover = (a, b) => a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
  const name = el => (el.textContent || el.className || el.tagName).toString().slice(0, 60);
  if (page.scrollWidth > W + 1) bad.push('the page scrolls sideways: ' + page.scrollWidth + ' > ' + W);
  document.querySelectorAll('h1, h2, p, table, .banner, .eetools-tokens').forEach(el => {
    if (el.getBoundingClientRect().right > W + 1) bad.push('wider than the page: ' + name(el));
  });
  const column = document.querySelector('h1').getBoundingClientRect().width;
  document.querySelectorAll('.js-plotly-plot').forEach(gd => {
    const box = gd.getBoundingClientRect();
    if (box.width < 0.95 * column) bad.push(gd.id + ' is ' + Math.round(box.width) + ' px of ' + Math.round(column));
    const texts = [...gd.querySelectorAll('text.gtitle, text.annotation-text, text[class$="title"], text.legendtext')];
    texts.forEach(t => { const r = t.getBoundingClientRect(); if (r.width && !inside(r, box)) bad.push(gd.id + ' clips ' + name(t)); });
    gd.querySelectorAll('text.gtitle').forEach(t => gd.querySelectorAll('text.annotation-text').forEach(a => {
      if (cover(t.getBoundingClientRect(), a.getBoundingClientRect())) bad.push(gd.id + ' title covers ' + name(a));
    }));
  });
  const banner = document.querySelector('.banner');
  document.body.setAttribute('data-layout', JSON.stringify({bad, banner: banner ? banner.getBoundingClientRect().height : 0}));
}, 1000));
</script>"""


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):

    if not (shipped_model_dir() / "config.json").exists():
        pytest.skip("shipped tiny reasoner missing")
    from eetools.cli import main

    out = tmp_path_factory.mktemp("reproduce")
    assert main(["reproduce", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_quick_reproduce_writes_every_figure(quick_report):
    for name in (
        "report.html",
        "evaluation.csv",
        "fig2_left.json",
        "fig3.json",
        "calibrated/fig4.json",
        "fig2_right_rl.html",
        "summary.json",
        "tradeoff.csv",
        "tradeoff_rl.json",
    ):
        assert (quick_report / name).exists(), name
    import pandas as pd

    points = pd.read_csv(quick_report / "tradeoff.csv")
    assert set(points.model) == {"calibrated", "rl"} and {"threshold", "sample", "base", "confidence", "oracle"} <= set(
        points.system
    )
    html = (quick_report / "report.html").read_text()
    # self-contained: nothing fetched from the network (plotly.js is inlined)
    import re

    assert not re.search(r"<script[^>]*\ssrc=", html), "external script"
    assert not re.search(r"<link[^>]*\shref=[\"']?https?:", html), "external stylesheet"
    assert html.count("Plotly.newPlot") >= 5 and "Operating points" in html


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(quick_report, tmp_path):
    cmd = [
        CHROMIUM,
        *browser.FLAGS,  # the flags the library's own rendering uses (eetools.views.browser)
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        (quick_report / "report.html").as_uri(),
    ]
    run = subprocess.run(cmd + ["--enable-logging=stderr", "--v=0"], capture_output=True, text=True, timeout=120)
    dom = run.stdout
    # plotly draws SVG into each figure div once its inline JavaScript ran
    assert dom.count("main-svg") >= 3, "plotly figures did not render"
    assert "Fig. 4" in dom and "Results" in dom
    assert "Uncaught" not in run.stderr, f"JavaScript errors: {run.stderr[-500:]}"
    shot = quick_report / "report.png"
    subprocess.run(
        [c for c in cmd if c != "--dump-dom"][:-1]
        + ["--window-size=1200,2400", f"--screenshot={shot}", (quick_report / "report.html").as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert shot.exists() and shot.stat().st_size > 10_000, "no screenshot"


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
@pytest.mark.parametrize("width", [1200, 800])
def test_quick_report_warns_and_nothing_overflows(quick_report, tmp_path, width):
    """The --quick banner shows; no text leaves the page or its figure; titles cover no subplot title; figures fill the column."""
    from eetools.views.browser import dump_dom

    page = tmp_path / "report.html"
    page.write_text((quick_report / "report.html").read_text().replace("</body>", LAYOUT_CHECK + "</body>"))
    dom, err = dump_dom(page, width=width, height=900)
    m = re.search(r"data-layout=\"([^\"]*)\"", dom)
    assert m, f"the layout check did not run: {err[-300:]}"
    layout = json.loads(html.unescape(m.group(1)))
    assert layout["banner"] > 20, "no visible --quick banner"
    assert "quick smoke run" in dom and "not a reproduction" in dom
    assert not layout["bad"], "\n".join(layout["bad"])
