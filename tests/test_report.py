"""`python -m benchmarks.report`: the comparison page, built from real `scale=test` runs and checked in a real
browser (Debian's chromium, headless, driven over the DevTools protocol): no console error, every video
decoded, every image loaded; plus the sample labels (what each video was conditioned on).

chromium is required, not optional: `.ci/run` installs it (apt-get install -y chromium). Set
REPORT_SCREENSHOT=/some/file.png to keep a copy of the page's screenshot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from benchmarks import report, run
from benchmarks.browser import BrowserError, Chromium, settled
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


def test_report_in_a_real_browser(store, tmp_path):
    results, _ = store
    built = report.main(["--results", str(results), "--out", str(tmp_path / "built")]).parent
    moved = tmp_path / "elsewhere" / "report"  # opened from another place: only relative paths work
    shutil.copytree(built, moved)
    t0 = time.monotonic()
    try:
        browser = Chromium(tmp_path)
    except BrowserError as e:  # required, never skipped
        pytest.fail(str(e))
    try:
        # the checker sees failures: a missing video, a file that is not a video, a missing image
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "junk.mp4").write_bytes(b"not a video at all" * 100)
        (bad / "index.html").write_text('<!doctype html><video src="missing.mp4" muted preload="auto"></video>'
                                        '<video src="junk.mp4" muted preload="auto"></video><img src="missing.png">')
        state = browser.load(bad / "index.html", settled, timeout=30)
        assert [v["error"] is not None for v in state["videos"]] == [True, True], state
        assert state["images"][0]["width"] == 0 and browser.errors(), (state, browser.errors())

        state = browser.load(moved / "index.html", settled)
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
    # the command line's own check: the same page, loaded and photographed by `--screenshot`
    cli = tmp_path / "cli.png"
    report.main(["--results", str(results), "--out", str(tmp_path / "built"), "--screenshot", str(cli)])
    assert cli.stat().st_size > 10_000 and cli.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="did not load cleanly"):  # and it fails on a broken page
        next((tmp_path / "built").rglob("*.mp4")).unlink()
        report.check_in_browser(tmp_path / "built" / "index.html", tmp_path / "broken.png")
