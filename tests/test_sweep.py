"""Sweeps: spec parsing, resume after an interruption, failure isolation, parallel real runs."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from benchmarks import sweep
from benchmarks.config import CONFIG_DIR, ConfigError
from benchmarks.results import read_rows

REPO = Path(__file__).resolve().parent.parent
# A stand-in for benchmarks.run: resolves the config like it, logs its start, sleeps, appends a row (or fails).
FAKE_RUN = textwrap.dedent("""
    import os, sys, time
    from benchmarks.config import config_hash, load_config
    from benchmarks.results import append_row
    cfg = load_config(sys.argv[1:])
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(config_hash(cfg) + "\\n")
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    if cfg.seed == 13:
        sys.exit(3)
    append_row(cfg.results, {"method": cfg.method.name, "seed": cfg.seed, "tag": cfg.tag,
                             "config_sha256": config_hash(cfg), "run_dir": cfg.run_dir})
""")


def _spec(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "mysweep.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def _extra(tmp_path: Path) -> list[str]:
    return ["scale=test", f"runs_root={tmp_path / 'runs'}", f"results={tmp_path / 'results.jsonl'}",
            f"cache_dir={tmp_path / 'cache'}"]


@pytest.fixture
def fake(tmp_path, monkeypatch) -> list[str]:
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "started.log"))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    return [sys.executable, str(script)]


def test_grid_list_and_seeds_make_the_product(tmp_path):
    spec = sweep.load_sweep(str(_spec(tmp_path, """
        base: [method=vdm]
        grid: {sample.guidance: [0.0, 2], sample.steps: [5]}
        list: [[trainer.max_steps=3], {optim.lr: 0.001}]
        seeds: [0, 1]
    """)))
    assert spec.name == "mysweep" and spec.base == ["method=vdm"] and len(spec.variants) == 2 * 2 * 1 * 2
    assert ["trainer.max_steps=3", "sample.guidance=0.0", "sample.steps=5", "seed=1"] in spec.variants
    assert ["optim.lr=0.001", "sample.guidance=2", "sample.steps=5", "seed=0"] in spec.variants
    jobs = sweep.plan(spec, _extra(tmp_path))
    assert len({j.config_sha256 for j in jobs}) == 8 and len({j.run_dir for j in jobs}) == 8
    assert all("tag=mysweep" in j.overrides and not j.error for j in jobs)


def test_spec_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="valid keys"):
        sweep.load_sweep(str(_spec(tmp_path, "grids: {seed: [0]}\n")))
    with pytest.raises(ConfigError, match="choose one of"):
        sweep.load_sweep("no_such_sweep")
    with pytest.raises(ConfigError, match="run_dir cannot be set"):
        sweep.plan(sweep.load_sweep(str(_spec(tmp_path, "seeds: [0, 1]\n"))), ["run_dir=x"])


@pytest.mark.parametrize("path", sorted((CONFIG_DIR / "sweep").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_sweep_file_resolves_every_job(path, tmp_path):
    jobs = sweep.plan(sweep.load_sweep(path.stem), _extra(tmp_path))
    assert jobs and all(not j.error for j in jobs), [j.error for j in jobs if j.error]
    # at the sweep's own scale (not the test scale above, which may merge variants), no job is another's config
    own = sweep.plan(sweep.load_sweep(path.stem), [e for e in _extra(tmp_path) if not e.startswith("scale=")])
    hashes = [j.config_sha256 for j in own]
    assert len(set(hashes)) == len(hashes), [j.name for j in own if hashes.count(j.config_sha256) > 1]


def test_jobs_with_the_same_config_run_once(tmp_path, fake):
    path = _spec(tmp_path, "base: [method=vdm]\nlist: [[], [seed=0], [seed=1]]\n")  # seed=0 is the default
    counts = sweep.run_sweep(sweep.load_sweep(str(path)), _extra(tmp_path), command=fake)
    assert counts["ran"] == 2 and len(read_rows(tmp_path / "results.jsonl")) == 2


def test_an_interrupted_sweep_runs_only_the_missing_jobs(tmp_path, fake, monkeypatch):
    path = _spec(tmp_path, "base: [method=vdm]\nseeds: [0, 1, 2, 3]\n")
    code = ("import sys; from benchmarks import sweep; "
            f"sweep.run_sweep(sweep.load_sweep({str(path)!r}), {_extra(tmp_path)!r}, command={fake!r})")
    monkeypatch.setenv("FAKE_SLEEP", "1.5")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = tmp_path / "results.jsonl"
    try:
        deadline = time.time() + 120
        while len(read_rows(results)) < 2 and time.time() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its running job die together
        proc.wait()
    done = {r["config_sha256"] for r in read_rows(results)}
    assert len(done) == 2
    started_before = (tmp_path / "started.log").read_text().split()

    monkeypatch.setenv("FAKE_SLEEP", "0")
    counts = sweep.run_sweep(sweep.load_sweep(str(path)), _extra(tmp_path), command=fake)
    assert counts == {"total": 4, "skipped": 2, "ran": 2, "failed": 0}
    started_now = (tmp_path / "started.log").read_text().split()[len(started_before):]
    assert len(started_now) == 2 and not set(started_now) & done
    rows = read_rows(results)
    assert len(rows) == 4 and {r["seed"] for r in rows} == {0, 1, 2, 3} and {r["tag"] for r in rows} == {"mysweep"}
    assert sweep.run_sweep(sweep.load_sweep(str(path)), _extra(tmp_path), command=fake)["ran"] == 0


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path, fake):
    path = _spec(tmp_path, """
        base: [method=vdm]
        seeds: [0, 13, 1]
        list: [[], [trainer.max_stpes=3]]
    """)
    counts = sweep.run_sweep(sweep.load_sweep(str(path)), _extra(tmp_path), jobs=2, command=fake)
    assert counts == {"total": 6, "skipped": 0, "ran": 3, "failed": 4}  # seed 13 fails; the typo'd 3 never start
    assert sorted(r["seed"] for r in read_rows(tmp_path / "results.jsonl")) == [0, 1]
    failures = read_rows(sweep.failures_path(tmp_path / "results.jsonl"))
    assert len(failures) == 4 and all(f["status"] == "failed" for f in failures)
    crashed = [f for f in failures if f["returncode"] == 3]
    assert len(crashed) == 1 and "seed=13" in crashed[0]["job"] and Path(crashed[0]["log"]).exists()
    assert sum("trainer.max_steps" in f["reason"] for f in failures) == 3  # the config error names the right key


def test_a_real_sweep_runs_benchmarks_run_in_parallel_and_resumes(tmp_path):
    path = _spec(tmp_path, "base: [method=vdm]\ngrid: {sample.guidance: [0.0, 2.0]}\n")
    cmd = [sys.executable, "-m", "benchmarks.sweep", f"sweep={path}", "--jobs", "2", *_extra(tmp_path)]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    rows = read_rows(tmp_path / "results.jsonl")
    assert sorted(r["guidance"] for r in rows) == [0.0, 2.0] and {r["tag"] for r in rows} == {"mysweep"}
    for r in rows:  # each job ran in its own sweep folder with its samples
        assert Path(r["run_dir"]).parent.name == "sweep-mysweep" and (Path(r["run_dir"]) / "samples").is_dir()
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "2 already done, 0 to run" in again.stdout
    assert len(read_rows(tmp_path / "results.jsonl")) == 2
