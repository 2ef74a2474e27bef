"""`eetools reproduce --quick` builds a report that a real browser renders (integration tier)."""

import shutil
import subprocess

import pytest

from eetools.io.models import shipped_model_dir

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


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
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
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
