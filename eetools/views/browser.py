"""Headless Chromium for HTML views: find the browser, read the rendered DOM, take an uncropped screenshot.

Views that are HTML (the token colouring, the report) become pictures by letting a real browser
lay them out. Only the system's Chromium (or Chrome) is used, through its command line; nothing is
downloaded and pages are opened from local files with background networking off.

Public API:

- `find_chromium()`: the browser's path, or None (``$BROWSER_PATH`` first, then ``PATH``).
- `dump_dom(path)`: the DOM after the page's scripts ran (``--dump-dom``).
- `screenshot_html(html, png)`: the whole page as a PNG, its height measured first so nothing is cut.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["BrowserUnavailable", "find_chromium", "dump_dom", "screenshot_html"]

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
INSTALL_HINT = "install Chromium (e.g. `apt-get install chromium`) or set BROWSER_PATH to a Chrome/Chromium binary"
# offline, no first-run UI, no sandbox (containers run as root); virtual time lets scripts finish
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
_HEIGHT_ATTR = "data-eetools-height"
_MEASURE = (
    "<script>addEventListener('load', () => document.body.setAttribute("
    f"'{_HEIGHT_ATTR}', Math.ceil(document.documentElement.scrollHeight)))</script>"
)


class BrowserUnavailable(RuntimeError):
    """No Chromium/Chrome binary was found, or it failed to run."""


def find_chromium() -> str | None:
    """Path of a Chromium or Chrome binary: ``$BROWSER_PATH`` (as kaleido reads it), else the first on ``PATH``."""
    env = os.environ.get("BROWSER_PATH")
    if env:
        return env if Path(env).is_file() else shutil.which(env)
    return next((p for p in map(shutil.which, NAMES) if p), None)


def _chromium() -> str:
    path = find_chromium()
    if path is None:
        raise BrowserUnavailable(f"no Chromium/Chrome browser found: {INSTALL_HINT}")
    return path


def _run(args: list[str], profile: Path, timeout: float) -> subprocess.CompletedProcess:
    cmd = [_chromium(), *FLAGS, f"--user-data-dir={profile}", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise BrowserUnavailable(
            f"Chromium did not finish within {timeout:.0f} s: {' '.join(cmd[:1] + args[-1:])}"
        ) from e


def dump_dom(path: str | Path, *, width: int = 1200, height: int = 900, budget_ms: int = 10_000, timeout: float = 120):
    """Open a local HTML file headless and return ``(dom, stderr)`` after its scripts ran.

    Args:
        path: the HTML file.
        width, height: the window, in CSS pixels (layout depends on the width).
        budget_ms: virtual time given to the page's scripts before the DOM is read.
    """
    with tempfile.TemporaryDirectory(prefix="eetools-chromium-") as profile:
        run = _run(
            [
                f"--window-size={width},{height}",
                f"--virtual-time-budget={budget_ms}",
                "--enable-logging=stderr",
                "--v=0",
                "--dump-dom",
                Path(path).resolve().as_uri(),
            ],
            Path(profile),
            timeout,
        )
    return run.stdout, run.stderr


def screenshot_html(
    html: str, png: str | Path, *, width: int = 900, scale: float = 2.0, timeout: float = 120
) -> tuple[int, int]:
    """Render a standalone HTML document and save the whole page as a PNG, uncropped.

    The page is laid out at `width` CSS pixels, its full height is measured in a first pass, and
    the screenshot window is made that tall, so nothing below the first screen is cut off.

    Args:
        html: a full HTML document (e.g. `TokenView.to_html()`).
        png: where to write the picture.
        width: page width in CSS pixels.
        scale: device pixels per CSS pixel (2 gives a sharp picture on high-DPI screens).

    Returns:
        The page size in CSS pixels ``(width, height)``; the PNG is that times `scale`.
    """
    png = Path(png)
    with tempfile.TemporaryDirectory(prefix="eetools-shot-") as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(_with_measure(html), encoding="utf-8")
        dom, err = dump_dom(page, width=width, height=200, budget_ms=2_000, timeout=timeout)
        m = re.search(rf'{_HEIGHT_ATTR}="(\d+)"', dom)
        if not m:
            raise BrowserUnavailable(f"Chromium did not render the page (stderr: {err.strip()[-300:]!r})")
        height = max(int(m.group(1)), 1)
        png.parent.mkdir(parents=True, exist_ok=True)
        tmp_png = Path(tmp) / "shot.png"
        _run(
            [
                f"--window-size={width},{height}",
                f"--force-device-scale-factor={scale}",
                "--virtual-time-budget=2000",
                f"--screenshot={tmp_png}",
                page.as_uri(),
            ],
            Path(tmp) / "profile",
            timeout,
        )
        if not tmp_png.exists():
            raise BrowserUnavailable(f"Chromium wrote no screenshot of {png.name}")
        shutil.move(tmp_png, png)
    return width, height


def _with_measure(html: str) -> str:
    """`html` with a script that writes the page height into ``<body>`` once loaded."""
    i = html.lower().rfind("</body>")
    return html[:i] + _MEASURE + html[i:] if i >= 0 else html + _MEASURE
