"""The reproduction report on a hand-made output folder: quick-run banner, headers, durations, one template, full width.

The browser check of a real `reproduce --quick` report is `tests/integration/test_report_browser.py`.
"""

from __future__ import annotations

import json
import re

import pandas as pd
import plotly.graph_objects as go
import pytest
from plotly.subplots import make_subplots

from eetools import pipeline
from eetools.views.report import TEMPLATE, build_report, format_duration, styled_figure


def _figure_layouts(html: str) -> list[dict]:
    """The layout object of every ``Plotly.newPlot(id, data, layout, config)`` call in a report."""
    decoder = json.JSONDecoder()
    layouts = []
    for m in re.finditer(r'Plotly\.newPlot\(\s*"[^"]+",\s*', html):
        _, end = decoder.raw_decode(html, m.end())  # data
        rest = html[end:].lstrip()
        assert rest.startswith(",")
        layout, _ = decoder.raw_decode(rest[1:].lstrip())
        layouts.append(layout)
    return layouts


def _reproduce_folder(tmp_path, *, quick: bool):
    out = tmp_path / "run"
    (out / "calibrated").mkdir(parents=True)
    pd.DataFrame(
        {
            "task": ["addition"],
            "system": ["calibrated"],
            "n": [24],
            "accuracy": [0.125],
            "mean_score": [0.125],
            "compute": [0.7],
            "layers_saved": [0.3],
            "coherence_reasoning": [0.9],
        }
    ).to_csv(out / "evaluation.csv", index=False)
    sub = make_subplots(rows=1, cols=2, subplot_titles=("accuracy", "compute"))
    sub.add_trace(go.Scatter(x=[0, 1], y=[0, 1]), row=1, col=1)
    sub.update_layout(title="RL dynamics", template="plotly_dark", width=660, height=350)
    sub.write_json(out / "fig2_left.json")
    go.Figure(go.Bar(x=[1], y=[1]), layout=dict(title="Fig. 3", width=500)).write_json(out / "fig3.json")
    go.Figure(go.Bar(x=[1], y=[1])).write_json(out / "calibrated" / "fig4.json")  # default "plotly" template
    for name in ("calibrated", "rl"):
        (out / f"fig2_right_{name}.html").write_text("<div>tokens</div>")
    config = {"quick": quick, "calib_steps": 12, "n_seeds": 2, "rl_steps": 2, "eval_n": 24}
    timings = {"calibration_s": 725.3, "rl_s": 42.2, "eval_s": 3.21, "total_s": 3770.0}
    (out / "summary.json").write_text(json.dumps({"config": config, "timings": timings}))
    return out


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.42, "0.4 s"), (42.2, "42 s"), (725.3, "12 min 5 s"), (3770, "1 h 2 min"), (float("nan"), "–")],
)
def test_durations_read_as_minutes_and_seconds(seconds, text):
    assert format_duration(seconds) == text


def test_quick_run_report_has_a_banner_and_a_title_that_says_so(tmp_path):
    html = pipeline.write_report(_reproduce_folder(tmp_path, quick=True)).read_text()
    assert 'class="banner" role="alert"' in html
    assert "not a reproduction" in html and "12 steps" in html and "24 examples" in html
    assert "<h1>eetools: quick smoke run" in html


def test_full_run_report_has_no_banner(tmp_path):
    html = pipeline.write_report(_reproduce_folder(tmp_path, quick=False)).read_text()
    assert 'class="banner"' not in html and "<h1>eetools: reproduction of Pavlova et al. (2026)</h1>" in html


def test_report_headers_and_run_times_are_readable(tmp_path):
    html = pipeline.write_report(_reproduce_folder(tmp_path, quick=False)).read_text()
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", html)
    assert "coherence of the reasoning" in headers and "layers saved" in headers
    assert not [h for h in headers if "_" in h], headers
    assert "12 min 5 s" in html and "1 h 2 min" in html and "calibration_s" not in html


def test_every_report_figure_uses_one_template_and_the_full_width(tmp_path):
    html = pipeline.write_report(_reproduce_folder(tmp_path, quick=False)).read_text()
    layouts = _figure_layouts(html)
    assert len(layouts) == 3
    dark = go.layout.Template(pio_template("plotly_dark")).layout.paper_bgcolor
    white = go.layout.Template(pio_template(TEMPLATE)).layout
    for layout in layouts:
        assert "width" not in layout and layout["autosize"] is True
        assert layout["template"]["layout"]["paper_bgcolor"] == white.paper_bgcolor != dark
        assert layout["template"]["layout"]["plot_bgcolor"] == white.plot_bgcolor == "white"
    assert html.count("* plotly.js v") == 1, "plotly.js inlined once"


def pio_template(name):
    import plotly.io as pio

    return pio.templates[name]


def test_titles_sit_above_subplot_titles():
    fig = make_subplots(rows=1, cols=3, subplot_titles=("a", "b", "c"))
    fig.update_layout(title="a long title that used to be centred over the subplot titles", height=350)
    styled = styled_figure(fig)
    assert styled.layout.title.yref == "container" and styled.layout.title.yanchor == "top"
    assert styled.layout.margin.t >= 100, "no room for both the title and the subplot titles"
    assert styled.layout.height == 350 and styled.layout.template.layout.plot_bgcolor == "white"


def test_banner_text_is_escaped(tmp_path):
    html = build_report([], tmp_path / "r.html", banner=("<b>x</b>", "<script>y</script>")).read_text()
    assert "<script>y" not in html and "&lt;b&gt;x" in html


def test_report_help_says_it_needs_a_reproduce_folder(capsys):
    from eetools.cli import main

    with pytest.raises(SystemExit) as e:
        main(["report", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "output folder of `eetools reproduce`" in text and "evaluation.csv" in text


def test_text_columns_align_left_and_numbers_right(tmp_path):
    html = pipeline.write_report(_reproduce_folder(tmp_path, quick=False)).read_text()
    assert '<td class="text">calibrated</td>' in html and '<td class="num">0.125</td>' in html
