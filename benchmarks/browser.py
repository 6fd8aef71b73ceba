"""Headless chromium, the system's, driven over the DevTools protocol: loads a page, waits until every video
decoded a frame (or failed) and every image finished, gathers console errors and takes full-page screenshots.

Used by `benchmarks.report --screenshot` and by the report's browser test. Needs Debian's `chromium`
(`apt-get install -y chromium`) and `websocket-client`; nothing is fetched from the network.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

PAGE_STATE = """JSON.stringify({
  videos: [...document.querySelectorAll('video')].map(v => ({src: v.getAttribute('src'), readyState: v.readyState,
    error: v.error ? v.error.code + ': ' + v.error.message : null, width: v.videoWidth,
    decoded: v.webkitDecodedFrameCount, label: (v.parentElement.querySelector('figcaption') || {}).textContent})),
  images: [...document.images].map(i => ({src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth})),
  height: document.documentElement.scrollHeight, width: document.documentElement.scrollWidth})"""


class BrowserError(RuntimeError):
    """chromium (or websocket-client) is missing or did not start; the message says how to fix it."""


class Chromium:
    """Headless chromium (the system's) driven over the DevTools protocol with websocket-client."""

    def __init__(self, workdir: Path):
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if exe is None:
            raise BrowserError("chromium is not installed: install it with "
                               "`apt-get update && apt-get install -y chromium` (.ci/run does)")
        try:
            import websocket
        except ImportError:
            raise BrowserError("websocket-client is missing: pip install websocket-client (or -e '.[dev]')") from None
        profile = workdir / "chromium-profile"
        self.log = workdir / "chromium.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--no-default-browser-check", "--mute-audio", "--autoplay-policy=no-user-gesture-required",
                 "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1400,1000", "about:blank"],
                stdout=subprocess.DEVNULL, stderr=log)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise BrowserError(f"chromium did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        while True:
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
            pages = [t for t in targets if t.get("type") == "page"]
            if pages or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.events: list[dict] = []
        self.next_id = 0
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def evaluate(self, expression: str):
        return json.loads(self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"]["value"])

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen since the last navigation."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif e.get("method") == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:500])
            elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out

    def load(self, path: Path, settled, timeout: float = 60.0) -> dict:
        """Open file://path, wait for its load event and then until settled(state); returns the last state."""
        self.events.clear()
        self.call("Page.navigate", url=path.resolve().as_uri())
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            if time.monotonic() > deadline:
                raise BrowserError(f"{path} never fired its load event")
            self.call("Runtime.evaluate", expression="1")  # gathers the events that arrived meanwhile
            time.sleep(0.1)
        while True:
            state = self.evaluate(PAGE_STATE)
            if settled(state) or time.monotonic() > deadline:
                return state
            time.sleep(0.2)

    def screenshot(self, path: Path, width: int, height: int) -> None:
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def settled(state: dict) -> bool:
    """Every video decoded a frame or failed, every image finished loading."""
    return (all(v["error"] or (v["readyState"] >= 2 and v["decoded"] > 0) for v in state["videos"])
            and all(i["complete"] for i in state["images"]))


def capture(index: Path, png: Path, *, timeout: float = 120.0, max_height: int = 16000) -> dict:
    """Load `index` in headless chromium, wait until it settled, save a full-page screenshot to `png`; returns
    {"videos", "images", "width", "height", "errors"} (the page state and its console errors)."""
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="report-browser-"))
    browser = Chromium(workdir)
    try:
        state = browser.load(Path(index), settled, timeout=timeout)
        state["errors"] = browser.errors()
        browser.screenshot(png, min(state["width"], 4000), min(state["height"], max_height))
    finally:
        browser.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return state
