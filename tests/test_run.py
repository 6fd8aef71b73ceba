"""`python -m benchmarks.run` end to end for every method at the test scale: files, row, resume."""

import json
import subprocess
import sys
from pathlib import Path

import av
import pytest

from benchmarks import run
from benchmarks.results import read_rows
from methods import METHODS

REPO = Path(__file__).resolve().parent.parent


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return ["scale=test", f"runs_root={tmp_path / 'runs'}", f"results={tmp_path / 'results.jsonl'}",
            f"cache_dir={tmp_path / 'cache'}", *extra]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_run_writes_samples_grid_config_logs_and_one_row(tmp_path, name):
    row = run.main(_args(tmp_path, f"method={name}"))
    run_dir = Path(row["run_dir"])
    mp4s = sorted((run_dir / "samples").glob("*.mp4"))
    assert len(mp4s) == 2 and (run_dir / "samples" / "grid.png").stat().st_size > 0
    with av.open(str(mp4s[0])) as c:  # playable in a browser: h264 in yuv420p
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
        assert sum(1 for _ in c.decode(video=0)) == 8
    assert (run_dir / "config.yaml").exists() and (run_dir / "metrics.json").exists()
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    for stage in METHODS[name].stages:
        assert (run_dir / "checkpoints" / stage / "final.pt").exists()
    rows = read_rows(tmp_path / "results.jsonl")
    assert len(rows) == 1 and rows[0]["method"] == name and rows[0]["config_sha256"] == row["config_sha256"]
    for key in ("resolution", "frames", "stride", "seed", "params", "train_seconds", "sample_seconds_per_video",
                "peak_rss_mb", "git_commit", "versions", "steps", "guidance", "ema"):
        assert key in rows[0], key
    # the machine's speed, probed at the start of the run, and the training time normalised by it
    gflops = rows[0]["machine"]["bf16_matmul_gflops"]
    assert gflops > 0 and rows[0]["bf16_matmul_gflops"] == gflops
    assert rows[0]["train_seconds_ref"] is None  # scale=test trains in fp32: not scaled by a bf16 speed
    bf16 = run.machine_fields(rows[0]["machine"], rows[0]["train_seconds"], "bf16-mixed")
    assert bf16["train_seconds_ref"] == pytest.approx(rows[0]["train_seconds"] * gflops / run.REFERENCE_BF16_GFLOPS)


def test_rerun_in_the_same_folder_resumes_finished_stages(tmp_path):
    first = run.main(_args(tmp_path))
    (Path(first["run_dir"]) / "state.json").unlink()  # as if the run had stopped after training
    (Path(first["run_dir"]) / "metrics.json").unlink()
    second = run.main(_args(tmp_path, f"run_dir={first['run_dir']}"))
    assert second["train_seconds"] == pytest.approx(first["train_seconds"])  # nothing retrained
    assert {s: r for s, r in second["stage_seconds"].items()} == first["stage_seconds"]
    assert len(read_rows(tmp_path / "results.jsonl")) == 2  # its row had not been recorded as appended


def test_typo_fails_fast_naming_the_key():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "method=vdm", "dataset=shapes",
                           "trainer.max_stpes=5"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "trainer.max_steps" in proc.stderr and "Traceback" not in proc.stderr


def test_results_row_is_valid_json_with_the_config(tmp_path):
    row = run.main(_args(tmp_path, "seed=3"))
    stored = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
    assert stored["config"]["seed"] == 3 and stored["seed"] == 3
