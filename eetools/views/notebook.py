"""Plotly figures in notebooks that render everywhere: JupyterLab, exported HTML, nbviewer, offline.

Plotly's ``plotly_mimetype`` renderer stores only the figure's JSON, which JupyterLab draws but
``jupyter nbconvert --to html`` and static viewers show as a blank cell. `setup_notebook` makes every
figure output carry that JSON *and* an HTML fallback: a ``<div>`` plus a script calling
``Plotly.newPlot``. plotly.js itself (about 4.7 MB) is written once per notebook, inlined, as the
output of the cell that shows the first figure; nothing is loaded from a CDN (MathJax off too).

    import eetools as ee
    ee.views.setup_notebook()   # first cell of a notebook

GitHub's notebook viewer runs no JavaScript, so there the fallback stays empty; the exported HTML
and nbviewer draw it.
"""

from __future__ import annotations

__all__ = ["RENDERER", "setup_notebook"]

RENDERER = "eetools_offline"  # the name registered in plotly.io.renderers


def _offline_renderer():
    """A plotly `NotebookRenderer` that inlines plotly.js once (on activation) and never uses a CDN."""
    import plotly.io as pio
    from plotly.io._base_renderers import NotebookRenderer

    class OfflineNotebookRenderer(NotebookRenderer):
        """`NotebookRenderer` whose figure HTML loads no MathJax from a CDN (plotly's own always does)."""

        def to_mimebundle(self, fig_dict):
            html = pio.to_html(
                fig_dict,
                config=self.config,
                include_plotlyjs=False,  # the activation output defined window.Plotly
                include_mathjax=False,
                full_html=False,
                default_width="100%",
                default_height=525,
                validate=False,
            )
            return {"text/html": html}

    return OfflineNotebookRenderer(config={"displaylogo": False})


def setup_notebook() -> None:
    """Make plotly figures in this kernel store their JSON plus an offline HTML fallback.

    Sets ``plotly.io.renderers.default`` to ``"plotly_mimetype+eetools_offline"``. Calling it again
    changes nothing (plotly.js is not embedded a second time). Returns None, so a notebook cell
    ending with it shows no output.
    """
    import plotly.io as pio

    if RENDERER not in pio.renderers:
        pio.renderers[RENDERER] = _offline_renderer()
    wanted = f"plotly_mimetype+{RENDERER}"
    if pio.renderers.default != wanted:
        pio.renderers.default = wanted
