"""Save any view to a file, the format chosen by the suffix: standalone HTML, PNG, SVG (and PDF, JPEG, WebP).

A view is a plotly figure, anything with a ``.figure()`` (analysis results, `TokenDetails`), or
HTML: an object with ``to_html()`` (`TokenView`) or ``_repr_html_()``.

- ``.html``: one file that opens offline (plotly.js inlined, no CDN, no MathJax).
- ``.png`` ``.svg`` ``.pdf`` ``.jpg`` ``.webp`` of a figure: plotly's kaleido, which drives the system
  Chromium (``pip install "eetools[export]"``).
- ``.png`` of an HTML view: a headless Chromium screenshot of the whole page, uncropped.

    ee.views.save(ee.views.color_tokens(rollout), "tokens.png")
    ee.views.save(ee.views.exit_heatmap(rollout), "heatmap.svg")
"""

from __future__ import annotations

import contextlib
import html as html_lib
import os
from pathlib import Path

from eetools.views.browser import INSTALL_HINT, BrowserUnavailable, find_chromium, screenshot_html

__all__ = ["ExportUnavailable", "save", "FIGURE_FORMATS", "HTML_FORMATS"]

FIGURE_FORMATS = (".html", ".png", ".svg", ".pdf", ".jpg", ".jpeg", ".webp")
HTML_FORMATS = (".html", ".png")
KALEIDO_HINT = 'pip install "eetools[export]" (kaleido)'


class ExportUnavailable(RuntimeError):
    """The tool a format needs (kaleido, a Chromium browser) is missing; the message says how to get it."""


def save(view, path: str | Path, *, width: int | None = None, height: int | None = None, scale: float = 2.0) -> Path:
    """Write `view` to `path` in the format its suffix names; returns the path.

    Args:
        view: a plotly figure, an object with ``.figure()``, ``.to_html()`` or ``_repr_html_()``.
        path: ``*.html``, ``*.png`` or ``*.svg`` (figures also ``*.pdf``, ``*.jpg``, ``*.webp``).
        width, height: picture size in CSS pixels (default: the figure's own layout size, else
            plotly's 700 x 500; an HTML view is 900 wide and as tall as its content).
        scale: device pixels per CSS pixel for raster formats.

    Raises:
        ValueError: an unknown suffix, a format the view cannot take (SVG of HTML), or a value that
            is not a view.
        ExportUnavailable: kaleido or Chromium, needed for pictures, is missing.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        raise ValueError(
            f"save: {path} is a folder; give a file path in it, e.g. {path / ('view' + (suffix or '.html'))}"
        )
    if type(view).__module__.startswith("ipywidgets"):
        raise ValueError(
            f"save: a live ipywidgets {type(view).__name__} (e.g. the explorer's UI) cannot be saved; save its static "
            "view instead: ee.views.save(ee.views.explore(model, static=True), 'explorer.html'), or one of its views"
        )
    fig = _as_figure(view)
    if fig is None:
        doc = _as_document(view)
        if doc is None:
            raise ValueError(
                f"save: cannot export a {type(view).__name__}; pass a plotly figure, an object with .figure(), "
                ".to_html() or ._repr_html_()"
            )
        if suffix not in HTML_FORMATS:
            raise ValueError(
                f"save: an HTML view ({type(view).__name__}) is saved as {' or '.join(HTML_FORMATS)}, "
                f"not {suffix or 'a path without suffix'}: {path}"
            )
    elif suffix not in FIGURE_FORMATS:
        raise ValueError(f"save: unknown format {suffix or '(no suffix)'} for {path}; use one of {FIGURE_FORMATS}")
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if fig is None and suffix == ".html":
            tmp.write_text(doc, encoding="utf-8")
        elif fig is None:
            try:
                screenshot_html(doc, tmp, width=width or 900, scale=scale)
            except BrowserUnavailable as e:
                raise ExportUnavailable(f"save {path.name}: {e}") from None
        elif suffix == ".html":
            fig.write_html(tmp, include_plotlyjs=True, include_mathjax=False, full_html=True)
        else:
            _write_image(fig, tmp, suffix, width, height, scale)
        tmp.replace(path)
    except OSError as e:  # a read-only place, a file where a folder should be, a full disk
        why = (
            "a file stands where the path needs a folder"
            if isinstance(e, (FileExistsError, NotADirectoryError))
            else e.strerror or str(e)
        )
        where = f" ({e.filename})" if e.filename and Path(e.filename) not in (path, tmp) else ""
        raise OSError(f"save: cannot write {path}: {why}{where}; choose a writable location") from e
    finally:
        with contextlib.suppress(OSError):  # no temporary file where its folder could not be made
            tmp.unlink(missing_ok=True)
    return path


def _as_figure(view):
    """The plotly figure of `view`, or None when it is not one and has no ``.figure()``."""
    if hasattr(view, "to_plotly_json"):
        return view
    make = getattr(view, "figure", None)
    if callable(make):
        fig = make()
        if hasattr(fig, "to_plotly_json"):
            return fig
    return None


def _as_document(view) -> str | None:
    """A standalone HTML document of an HTML view, or None."""
    if callable(getattr(view, "to_html", None)):
        doc = view.to_html()
        if isinstance(doc, str):
            return doc
    if callable(getattr(view, "_repr_html_", None)):
        title = html_lib.escape(type(view).__name__)
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title></head>\n'
            f"<body>\n{view._repr_html_()}\n</body></html>\n"
        )
    return None


def _write_image(fig, path: Path, suffix: str, width, height, scale) -> None:
    """A static picture of a plotly figure through kaleido and the system browser."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        raise ExportUnavailable(
            f"save {path.name.removesuffix('.tmp')}: {suffix} needs kaleido: {KALEIDO_HINT}"
        ) from None
    if find_chromium() is None and not _kaleido_has_browser():
        raise ExportUnavailable(
            f"save {path.name.removesuffix('.tmp')}: {suffix} needs a Chromium browser for kaleido: {INSTALL_HINT}"
        )
    fmt = {".jpg": "jpeg"}.get(suffix, suffix[1:])
    browser = find_chromium()
    old = os.environ.get("BROWSER_PATH")
    if browser and not old:
        os.environ["BROWSER_PATH"] = browser  # kaleido (choreographer) reads it; restored below
    try:
        fig.write_image(path, format=fmt, width=width, height=height, scale=scale)
    finally:
        if browser and not old:
            os.environ.pop("BROWSER_PATH", None)


def _kaleido_has_browser() -> bool:
    """Whether kaleido's own browser finder (which includes a Chrome it downloaded itself) sees one."""
    try:
        from choreographer.browsers.chromium import Chromium

        return Chromium.find_browser(skip_local=False) is not None
    except Exception:  # noqa: BLE001 a missing or changed private helper just means "not found"
        return False
