"""The results store under stress: concurrent writers, crashes mid-line, and runs killed mid-training."""

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import run
from benchmarks.results import append_row, read_rows

REPO = Path(__file__).resolve().parent.parent
PROCS, ROWS = 8, 50


def _writer(path: str, proc: int) -> None:
    pad = "x" * (8192 + 97 * proc)  # rows larger than PIPE_BUF, of different sizes, so interleaving would show
    for i in range(ROWS):
        append_row(path, {"proc": proc, "i": i, "pad": pad, "nested": {"value": proc * 1000 + i}})


def test_concurrent_writers_lose_no_row_and_leave_no_partial_line(tmp_path):
    path = tmp_path / "results.jsonl"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), k)) for k in range(PROCS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""  # the file ends with a complete line
    parsed = [json.loads(line) for line in lines[:-1]]  # every line is one whole row
    assert len(parsed) == PROCS * ROWS
    assert {(r["proc"], r["i"]) for r in parsed} == {(k, i) for k in range(PROCS) for i in range(ROWS)}
    for r in parsed:
        assert r["pad"] == "x" * (8192 + 97 * r["proc"]) and r["nested"]["value"] == r["proc"] * 1000 + r["i"]
    assert len(read_rows(path)) == PROCS * ROWS


def test_a_partial_line_from_a_crash_is_skipped_and_never_glued_to_the_next_row(tmp_path):
    path = tmp_path / "results.jsonl"
    append_row(path, {"run": 1})
    with open(path, "ab") as f:
        f.write(b'{"run": 2, "trunc')  # a writer died mid-line
    append_row(path, {"run": 3})
    with pytest.warns(UserWarning, match="not a complete JSON row"):
        rows = read_rows(path)
    assert [r["run"] for r in rows] == [1, 3]


def test_non_finite_numbers_are_stored_as_null(tmp_path):
    path = tmp_path / "results.jsonl"
    append_row(path, {"fvd": float("nan"), "is": float("inf"), "ok": 1.5})
    assert read_rows(path) == [{"fvd": None, "is": None, "ok": 1.5}]


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return ["scale=test", f"runs_root={tmp_path / 'runs'}", f"results={tmp_path / 'results.jsonl'}",
            f"cache_dir={tmp_path / 'cache'}", *extra]


def test_a_killed_run_leaves_no_row_and_resumes_from_its_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "killed"
    args = _args(tmp_path, "method=vdm", f"run_dir={run_dir}", "trainer.max_steps=40",
                 "trainer.checkpoint_every_n_steps=2")
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.run", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    last = run_dir / "checkpoints" / "denoiser" / "last.ckpt"
    try:
        deadline = time.time() + 240
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # mid-stage, no chance to clean up
        proc.wait()
    assert last.exists(), "the run never wrote a checkpoint"
    assert not (run_dir / "checkpoints" / "denoiser" / "final.pt").exists(), "the stage finished before the kill"
    assert not (tmp_path / "results.jsonl").exists() or read_rows(tmp_path / "results.jsonl") == []

    trained_before = torch.load(last, map_location="cpu", weights_only=False)["train_seconds"]
    assert trained_before > 0
    row = run.main(args)  # the same command again: continues from last.ckpt
    assert "resuming from" in capsys.readouterr().out
    assert row["stage_seconds"]["denoiser"] > trained_before  # the time before the kill is counted
    rows = read_rows(tmp_path / "results.jsonl")
    assert len(rows) == 1 and rows[0]["config_sha256"] == row["config_sha256"] and row["run_dir"] == str(run_dir)
    assert (run_dir / "checkpoints" / "denoiser" / "final.pt").exists()
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 40


def test_a_truncated_checkpoint_restarts_the_stage_instead_of_failing(tmp_path):
    from benchmarks.config import load_config
    from benchmarks.run_folder import RunFolder

    run_dir = tmp_path / "runs" / "truncated"
    cfg = load_config(_args(tmp_path, "method=vdm", f"run_dir={run_dir}"))
    RunFolder(run_dir).save_config(cfg)  # the run had started
    stage_dir = run_dir / "checkpoints" / "denoiser"
    stage_dir.mkdir(parents=True)
    (stage_dir / "last.ckpt").write_bytes(b"PK\x03\x04 half a checkpoint")  # a write cut short by a kill
    with pytest.warns(UserWarning, match="not a complete checkpoint"):
        row = run.main(_args(tmp_path, "method=vdm", f"run_dir={run_dir}"))
    assert (stage_dir / "last.ckpt.corrupt").exists() and (stage_dir / "final.pt").exists()
    assert len(read_rows(tmp_path / "results.jsonl")) == 1 and row["run_dir"] == str(run_dir)
