"""A self-contained HTML report of a reproduction: figures, coloured rollouts, a results table.

Plotly's JavaScript is inlined once, so the file opens offline in any browser. Every figure is
drawn with one template (`TEMPLATE`), stretches to the page width, and gets room for its title,
subplot titles and axis labels; tables get readable headers; a banner says when the numbers come
from a smoke run rather than a full reproduction.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

__all__ = ["TEMPLATE", "build_report", "format_duration", "readable_header", "styled_figure"]

TEMPLATE = "plotly_white"
_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #eee;padding-bottom:4px}
.banner{background:#fff3cd;border:2px solid #e0a800;border-radius:6px;padding:12px 16px;margin:1em 0;color:#5c4400}
.banner strong{display:block;font-size:1.1em;margin-bottom:4px}
.figure{width:100%;overflow:hidden}
.tbl{border-collapse:collapse;min-width:50%;max-width:100%;font-variant-numeric:tabular-nums}
.tbl th{background:#f4f4f6;text-align:right;vertical-align:bottom;font-weight:600;padding:6px 10px;
  white-space:normal;border-bottom:2px solid #ccc}
.tbl td{padding:4px 10px;border-bottom:1px solid #e4e4e4;text-align:right}
.tbl th:first-child,.tbl td:first-child,.tbl th.text,.tbl td.text{text-align:left}
.eetools-tokens{overflow-wrap:anywhere}
"""


def format_duration(seconds: float) -> str:
    """A duration for people: ``"0.4 s"``, ``"42 s"``, ``"12 min 5 s"``, ``"1 h 2 min"``."""
    s = float(seconds)
    if s != s or s < 0:
        return "–"
    if s < 10:
        return f"{s:.1f} s"
    s = round(s)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    if h:
        return f"{h} h {m} min"
    return f"{m} min {sec} s" if m else f"{sec} s"


def readable_header(column: str, labels: Mapping[str, str] | None = None) -> str:
    """A column name as a table header: `labels` first, else underscores become spaces."""
    return (labels or {}).get(column, column.replace("_", " "))


def styled_figure(fig, *, height: int | None = None):
    """A copy of `fig` in the report's look: `TEMPLATE`, full width, room for titles and labels.

    The fixed ``width`` of the figure is dropped (the page decides), the title sits at the left
    above the subplot titles, and axes grow their margins to fit tick labels (``automargin``).
    """
    import plotly.graph_objects as go

    fig = go.Figure(fig)
    has_subplot_titles = any(
        getattr(a, "xref", None) == "paper" and getattr(a, "yref", None) == "paper" and (a.y or 0) >= 1
        for a in fig.layout.annotations
    )
    top = 30 + (45 if fig.layout.title.text else 0) + (30 if has_subplot_titles else 0)
    fig.update_layout(
        template=TEMPLATE,
        width=None,
        autosize=True,
        height=height or fig.layout.height or 450,
        # the title in the top margin, from the left edge: it can neither clip nor cover subplot titles
        title=dict(x=0, xanchor="left", xref="container", y=1, yanchor="top", yref="container", pad=dict(t=12, l=12)),
        margin=dict(t=top, l=70, r=30, b=80),
    )
    fig.update_xaxes(automargin=True)
    fig.update_yaxes(automargin=True)
    return fig


def _table(df: pd.DataFrame, labels: Mapping[str, str] | None) -> str:
    kind = {c: "num" if pd.api.types.is_numeric_dtype(df[c]) else "text" for c in df.columns}
    head = "".join(f'<th class="{kind[c]}">{html.escape(readable_header(c, labels))}</th>' for c in df.columns)
    rows = []
    for rec in df.itertuples(index=False):
        cells = []
        for c, v in zip(df.columns, rec):
            text = f"{v:.3f}" if isinstance(v, float) else str(v)
            cells.append(f'<td class="{kind[c]}">{html.escape(text)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="tbl"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def build_report(
    sections: Sequence[tuple[str, object]],
    path: str | Path,
    *,
    title: str = "eetools report",
    banner: tuple[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> Path:
    """Write `sections` (heading, content) to a standalone HTML file.

    Content may be a plotly Figure (restyled by `styled_figure`), a pandas DataFrame (headers
    from `labels`, else `readable_header`), an object with `_repr_html_` (e.g.
    `eetools.views.tokens.TokenView`) or a string (escaped, shown as a paragraph).

    Args:
        banner: ``(headline, explanation)`` shown in a box under the title, e.g. for a smoke run
            whose numbers must not be read as results.
        labels: table headers by column name.
    """
    import plotly.io as pio

    parts, first_fig = [], True
    if banner is not None:
        parts.append(
            f'<div class="banner" role="alert"><strong>{html.escape(banner[0])}</strong>{html.escape(banner[1])}</div>'
        )
    for i, (heading, content) in enumerate(sections):
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if hasattr(content, "to_plotly_json"):
            fig_html = pio.to_html(
                styled_figure(content),
                include_plotlyjs="inline" if first_fig else False,
                include_mathjax=False,
                full_html=False,
                div_id=f"fig{i}",
                default_width="100%",
                config={"displaylogo": False, "responsive": True},
            )
            parts.append(f'<div class="figure">{fig_html}</div>')
            first_fig = False
        elif isinstance(content, pd.DataFrame):
            parts.append(_table(content, labels))
        elif hasattr(content, "_repr_html_"):
            parts.append(content._repr_html_())
        else:
            parts.append(f"<p>{html.escape(str(content))}</p>")
    doc = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
        f"</head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(path)
    return path
