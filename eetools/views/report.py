"""A self-contained HTML report of a reproduction: figures, coloured rollouts, a results table.

Plotly's JavaScript is inlined once, so the file opens offline in any browser.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import pandas as pd


def build_report(sections: Sequence[tuple[str, object]], path: str | Path, *, title: str = "eetools report") -> Path:
    """Write `sections` (heading, content) to a standalone HTML file.

    Content may be a plotly Figure, a pandas DataFrame, an object with `_repr_html_`
    (e.g. `eetools.views.tokens.TokenView`) or a string (escaped, shown as a paragraph).
    """
    import plotly.io as pio

    parts, first_fig = [], True
    for i, (heading, content) in enumerate(sections):
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if hasattr(content, "to_plotly_json"):
            parts.append(
                pio.to_html(
                    content,
                    include_plotlyjs="inline" if first_fig else False,
                    full_html=False,
                    div_id=f"fig{i}",
                    config={"displaylogo": False},
                )
            )
            first_fig = False
        elif isinstance(content, pd.DataFrame):
            parts.append(content.to_html(float_format=lambda v: f"{v:.3f}", index=False, border=0, classes="tbl"))
        elif hasattr(content, "_repr_html_"):
            parts.append(content._repr_html_())
        else:
            parts.append(f"<p>{html.escape(str(content))}</p>")
    doc = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        ".tbl{border-collapse:collapse}.tbl td,.tbl th{padding:4px 10px;border-bottom:1px solid #ddd}</style>"
        f"</head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(path)
    return path
