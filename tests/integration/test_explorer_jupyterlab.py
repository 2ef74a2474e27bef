"""The explorer widget in a real JupyterLab, driven by headless Chromium over the DevTools protocol (integration tier).

A JupyterLab server (its kernel importing this checkout) opens a notebook that builds
``explore({"calibrated": ..., "rl-lam6": ...})``; Chromium runs the cell, clicks a token and
reads the page: the controls' labels are whole, the sliders have room, clicking a token outlines
it in both models' rows and shows its details under each. Skipped without Chromium, JupyterLab or
websocket-client. Takes about a minute (JupyterLab's start and the kernel's first import).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from eetools.io.models import shipped_model_dir

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parents[2]
CELL = """import torch, eetools as ee
torch.set_num_threads(1)
cal = ee.load_exit_model("tiny-reasoner/calibrated")
rl = ee.load_exit_model("tiny-reasoner/rl-lam6")
ee.views.explore({"calibrated": cal, "rl-lam6": rl}, max_new_tokens=40)"""

MEASURE = """(() => {
  const out = document.querySelector('.jp-OutputArea');
  const labels = [...out.querySelectorAll('.widget-label')].filter(l => l.textContent);
  const tokens = [...out.querySelectorAll('.widget-button')].filter(b => b.textContent !== 'Generate');
  return {
    labels: labels.map(l => l.textContent),
    cut: labels.filter(l => l.scrollWidth > l.clientWidth + 1).map(l => l.textContent),
    tracks: [...out.querySelectorAll('.widget-hslider .slider-container')].map(s => s.getBoundingClientRect().width),
    outlined: tokens.map((b, i) => [i, getComputedStyle(b).borderTopWidth]).filter(x => x[1] !== '0px').map(x => x[0]),
    n_tokens: tokens.length,
    text: out.innerText,
  };
})()"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, secs: float, what: str):
    t0 = time.time()
    while time.time() - t0 < secs:
        value = check()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {secs:.0f} s waiting for {what}")


class _Page:
    """The smallest DevTools-protocol client: evaluate JavaScript, send keys, take a screenshot."""

    def __init__(self, url: str):
        import websocket

        self.ws, self.n = websocket.create_connection(url, timeout=120), 0

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                return msg.get("result", msg)

    def js(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        return r.get("result", {}).get("value")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_explorer_in_jupyterlab_keeps_labels_whole_and_outlines_the_clicked_token(tmp_path):
    pytest.importorskip("jupyterlab", reason="JupyterLab is not installed")
    pytest.importorskip("websocket", reason="websocket-client is not installed")
    if not (shipped_model_dir() / "config.json").exists():
        pytest.skip("shipped tiny reasoner missing")
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(CELL)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, tmp_path / "explorer.ipynb")
    env = dict(os.environ, PYTHONPATH=str(ROOT), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    lab_port, cdp_port = _free_port(), _free_port()
    lab = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--allow-root", "--no-browser", f"--port={lab_port}",
         "--ServerApp.token=", "--ServerApp.password=", f"--ServerApp.root_dir={tmp_path}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    browser = None
    try:
        base = f"http://127.0.0.1:{lab_port}"
        _wait(lambda: _ok(f"{base}/api/status"), 180, "JupyterLab to start")
        browser = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", f"--user-data-dir={tmp_path / 'profile'}",
             f"--remote-debugging-port={cdp_port}", "--window-size=1500,1700", f"{base}/lab/tree/explorer.ipynb"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        tab = _wait(lambda: _page_target(cdp_port), 60, "Chromium's DevTools")
        page = _Page(tab["webSocketDebuggerUrl"])
        idle = "!!document.querySelector('.jp-Notebook .cm-content') && document.body.innerText.includes('Idle')"
        try:
            _wait(lambda: page.js(idle), 300, "the kernel to be idle")
        except AssertionError:
            shot = page.call("Page.captureScreenshot", format="png")
            (tmp_path / "stuck.png").write_bytes(base64.b64decode(shot["data"]))
            raise AssertionError(f"{page.js('document.body.innerText.slice(0, 800)')!r}") from None
        page.js("document.querySelector('.jp-Cell .cm-content').focus()")
        for kind in ("rawKeyDown", "keyUp"):  # Shift+Enter runs the cell
            page.call(
                "Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13, modifiers=8
            )
        count = "(document.querySelector('.jp-OutputArea')?.querySelectorAll('.widget-button').length || 0) > 10"
        _wait(lambda: page.js(count), 300, "the explorer's token buttons")
        before = _wait(lambda: page.js(MEASURE), 30, "the explorer")
        assert {"example", "prompt", "mode", "temperature", "threshold", "seed", "token"} <= set(before["labels"])
        assert before["cut"] == [], f"truncated labels: {before['cut']}"
        assert len(before["tracks"]) == 2 and min(before["tracks"]) > 100, f"squashed sliders: {before['tracks']}"
        half = before["n_tokens"] // 2  # one row of buttons per model, the same length here
        assert before["outlined"] == [0, half], before["outlined"]
        page.js("[...document.querySelector('.jp-OutputArea').querySelectorAll('.widget-button')]"
                ".filter(b => b.textContent !== 'Generate')[7].click()")  # fmt: skip
        after = _wait(lambda: (m := page.js(MEASURE))["outlined"] == [7, half + 7] and m, 60, "the click to be shown")
        assert (
            "calibrated: " in after["text"]
            and "rl-lam6: " in after["text"]
            and "calibrated vs rl-lam6" in after["text"]
        )
        shot = page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        (tmp_path / "explorer.png").write_bytes(base64.b64decode(shot["data"]))
    finally:
        for proc in (browser, lab):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)


def _ok(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=5).status == 200
    except OSError:
        return False


def _page_target(port: int):
    try:
        tabs = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5))
    except OSError:
        return None
    return next((t for t in tabs if t["type"] == "page"), None)
