"""`python -m benchmarks.report`: the comparison page, built from real `scale=test` runs and checked in a real
browser (Debian's chromium, headless, driven over the DevTools protocol): no console error, every video
decoded, every image loaded; plus the sample labels (what each video was conditioned on).

chromium is required, not optional: `.ci/run` installs it (apt-get install -y chromium). Set
REPORT_SCREENSHOT=/some/file.png to keep a copy of the page's screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from benchmarks import report, run
from benchmarks.config import load_config
from evaluation.grid import conditioning_kinds, conditioning_records
from methods import METHODS
from methods.base import Conditioning

CLASSES = ["left", "right", "up", "down"]
CAPTIONS = ["a red cross moves up on a gray background", "a blue square moves left on a white background",
            "a magenta circle moves up on a gray background"]


# --- labels: what a sample was conditioned on ---------------------------------------------------------


def test_conditioning_kinds_of_every_method_config():
    for name in sorted(METHODS):
        kinds = conditioning_kinds(load_config([f"method={name}", "scale=test"]).method)
        assert kinds == ("class",), (name, kinds)  # every method ships class-conditional
    assert conditioning_kinds({"motion": {"conditioning": "class+text"}, "prior": {"conditioning": "none"}}) == (
        "class", "text")
    assert conditioning_kinds({"conditioning": "none"}) == ()


def _write(tmp_path, conditioning, first_frame=False, monkeypatch=None):
    """write_samples on 3 random videos; returns (conditioning.json, the captions the grid was drawn with)."""
    import evaluation.grid as grid

    drawn = {}
    real_save = grid.save_grid

    def spy(videos, path, **kw):
        drawn["captions"] = kw.get("captions")
        return real_save(videos, path, **kw)

    monkeypatch.setattr(grid, "save_grid", spy)
    g = torch.Generator().manual_seed(0)
    videos = torch.rand(3, 3, 4, 16, 16, generator=g) * 2 - 1
    cond = Conditioning(label=torch.tensor([2, 0, 2]), text=list(CAPTIONS),
                        first_frame=videos[:, :, 0] if first_frame else None)
    out = tmp_path / conditioning / "samples"
    png = run.write_samples(videos, cond, out, 4, CLASSES, conditioning=conditioning)
    assert png.stat().st_size > 0 and len(list(out.glob("*.mp4"))) == 3
    return json.loads((out / "conditioning.json").read_text()), drawn["captions"]


def test_grid_and_manifest_label_each_sample_with_what_it_was_conditioned_on(tmp_path, monkeypatch):
    manifest, captions = _write(tmp_path, "class", monkeypatch=monkeypatch)
    assert [v["conditioned_on"] for v in manifest["videos"]] == ["up", "left", "up"] == captions
    assert [v["file"] for v in manifest["videos"]] == ["000-up.mp4", "001-left.mp4", "002-up.mp4"]
    assert all(v["text"] is None for v in manifest["videos"])  # the caption it never saw is not its label

    manifest, captions = _write(tmp_path, "text", monkeypatch=monkeypatch)
    assert captions == [f'"{c}"' for c in CAPTIONS] and all(v["class"] is None for v in manifest["videos"])

    manifest, captions = _write(tmp_path, "none", monkeypatch=monkeypatch)
    assert captions == ["nothing (unconditional)"] * 3

    manifest, captions = _write(tmp_path, "class+text", first_frame=True, monkeypatch=monkeypatch)
    assert captions[1] == f'left + "{CAPTIONS[1]}" + first frame of val clip 1'
    assert manifest["image_to_video"] is True

    assert conditioning_records(1, ("class",), labels=[7], class_names=CLASSES)[0]["conditioned_on"] == "class 7"


def test_write_samples_reads_the_conditioning_from_the_run_folders_config(tmp_path):
    from omegaconf import OmegaConf

    from benchmarks.run_folder import RunFolder

    RunFolder(tmp_path / "run").save_config(OmegaConf.create({"method": {"motion": {"conditioning": "text"}}}))
    videos = torch.zeros(2, 3, 4, 16, 16)
    run.write_samples(videos, Conditioning(label=torch.tensor([0, 1]), text=CAPTIONS[:2]), tmp_path / "run" / "samples",
                      4, CLASSES)
    manifest = json.loads((tmp_path / "run" / "samples" / "conditioning.json").read_text())
    assert manifest["conditioning"] == ["text"] and manifest["videos"][1]["conditioned_on"] == f'"{CAPTIONS[1]}"'


# --- the page, from real runs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A results store of two scale=test runs (vdm, cmd), a leaderboard PNG and an efficiency CSV beside it."""
    from benchmarks import leaderboard

    root = tmp_path_factory.mktemp("store")
    results = root / "results" / "results.jsonl"
    rows = {}
    for method in ("vdm", "cmd"):
        rows[method] = run.main(["scale=test", f"method={method}", f"runs_root={root / 'runs'}",
                                 f"results={results}", f"cache_dir={root / 'cache'}"])
    leaderboard.main(["--results", str(results), "--format", "png", "--out", str(results.parent / "board.png")])
    (results.parent / "efficiency").mkdir()
    (results.parent / "efficiency" / "efficiency.csv").write_text(
        "method,params,sample_gflops,sample_seconds\ncmd,118000,0.041234567,0.2191\nvdm,56300,0.28912345,0.2623\n")
    return results, rows


def _sources(index: Path) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]*)"', index.read_text())


def test_report_is_self_contained_idempotent_and_labelled(store, tmp_path):
    results, rows = store
    out = tmp_path / "report"
    index = report.main(["--results", str(results), "--out", str(out)])
    page = index.read_text()
    first = index.read_bytes()
    files = sorted(p.relative_to(out) for p in out.rglob("*"))
    # every link and source is relative and inside the folder: no server, no network
    for ref in _sources(index):
        assert "://" not in ref and not ref.startswith("/"), ref
        target = (out / ref.split("#")[0]) if not ref.startswith("#") else out / "index.html"
        assert target.exists(), ref
    # the samples: a row per method, a column per class, each video labelled with its class only
    for row in rows.values():
        manifest = json.loads((Path(row["run_dir"]) / "samples" / "conditioning.json").read_text())
        for v in manifest["videos"]:
            assert v["conditioned_on"] == v["file"][4:-4] and "moves" not in v["conditioned_on"]  # "000-up.mp4" -> "up"
            assert f'samples/{v["file"]}"' in page and f"conditioned on: <b>{v['conditioned_on']}</b>" in page
        assert Path(row["run_dir"]).name in page and f"<code>{row['run_dir']}</code>" in page  # which run, where
    assert page.count("<video ") == 4 and "board.png" in page and "efficiency.csv" in page and "0.04123" in page
    assert "<th>method</th>" in page and "Protocol:" in page  # the leaderboard's table and its protocol line
    # idempotent: the same store gives the same page and the same files
    report.main(["--results", str(results), "--out", str(out)])
    assert index.read_bytes() == first and sorted(p.relative_to(out) for p in out.rglob("*")) == files
    # large stores stay small: at most --max-videos per method
    small = report.main(["--results", str(results), "--out", str(tmp_path / "small"), "--max-videos", "1",
                         "--method", "vdm,cmd", "--figures", str(results.parent / "efficiency")])
    assert small.read_text().count("<video ") == 2
    assert "efficiency.csv" in small.read_text() and "board.png" not in small.read_text()  # only the figures given
    # it never replaces a folder that is not a report
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not a report"):
        report.main(["--results", str(results), "--out", str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# --- in a real browser -----------------------------------------------------------------------------------


PAGE_STATE = """JSON.stringify({
  videos: [...document.querySelectorAll('video')].map(v => ({src: v.getAttribute('src'), readyState: v.readyState,
    error: v.error ? v.error.code + ': ' + v.error.message : null, width: v.videoWidth,
    decoded: v.webkitDecodedFrameCount, label: (v.parentElement.querySelector('figcaption') || {}).textContent})),
  images: [...document.images].map(i => ({src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth})),
  height: document.documentElement.scrollHeight, width: document.documentElement.scrollWidth})"""


class Chromium:
    """Headless chromium (the system's) driven over the DevTools protocol with websocket-client."""

    def __init__(self, workdir: Path):
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if exe is None:
            pytest.fail("chromium is not installed: this test loads the report in a real browser. "
                        "Install it with `apt-get update && apt-get install -y chromium` (.ci/run does).")
        try:
            import websocket
        except ImportError:
            pytest.fail("websocket-client is missing: pip install -e '.[dev]'")
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
                pytest.fail(f"chromium did not start: {self.log.read_text()[-2000:]}")
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
            assert time.monotonic() < deadline, f"{path} never fired its load event"
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


def _settled(state: dict) -> bool:
    """Every video decoded a frame or failed, every image finished loading."""
    return (all(v["error"] or (v["readyState"] >= 2 and v["decoded"] > 0) for v in state["videos"])
            and all(i["complete"] for i in state["images"]))


def test_report_in_a_real_browser(store, tmp_path):
    results, _ = store
    built = report.main(["--results", str(results), "--out", str(tmp_path / "built")]).parent
    moved = tmp_path / "elsewhere" / "report"  # opened from another place: only relative paths work
    shutil.copytree(built, moved)
    t0 = time.monotonic()
    browser = Chromium(tmp_path)
    try:
        # the checker sees failures: a missing video, a file that is not a video, a missing image
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "junk.mp4").write_bytes(b"not a video at all" * 100)
        (bad / "index.html").write_text('<!doctype html><video src="missing.mp4" muted preload="auto"></video>'
                                        '<video src="junk.mp4" muted preload="auto"></video><img src="missing.png">')
        state = browser.load(bad / "index.html", _settled, timeout=30)
        assert [v["error"] is not None for v in state["videos"]] == [True, True], state
        assert state["images"][0]["width"] == 0 and browser.errors(), (state, browser.errors())

        state = browser.load(moved / "index.html", _settled)
        errors = browser.errors()
        shot = tmp_path / "report.png"
        browser.screenshot(shot, min(state["width"], 4000), min(state["height"], 8000))
    finally:
        browser.close()
    seconds = time.monotonic() - t0
    if os.environ.get("REPORT_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["REPORT_SCREENSHOT"])
    assert not errors, f"console errors in the report page: {errors}"
    assert len(state["videos"]) == 4, state
    for v in state["videos"]:  # the libx264 yuv420p mp4 decoded in the browser
        assert v["error"] is None and v["readyState"] >= 2 and v["decoded"] > 0 and v["width"] == 16, v
        assert v["label"].startswith("conditioned on: ") and v["label"] != "conditioned on: ", v
    assert state["images"] and all(i["complete"] and i["width"] > 0 for i in state["images"]), state["images"]
    assert shot.stat().st_size > 10_000
    print(f"browser checks: {seconds:.1f} s, {len(state['videos'])} videos, {len(state['images'])} images")
