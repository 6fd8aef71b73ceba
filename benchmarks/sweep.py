"""Run a grid of `benchmarks.run` jobs from configs/sweep/<name>.yaml; resumable and failure-tolerant.

    python -m benchmarks.sweep sweep=vdm_guidance                 # every job not yet in the results store
    python -m benchmarks.sweep sweep=vdm_guidance --jobs 2        # two jobs at a time, each its own process
    python -m benchmarks.sweep sweep=vdm_guidance --dry-run       # list the jobs and which are done
    python -m benchmarks.sweep sweep=vdm_guidance scale=test      # extra overrides apply to every job

A sweep file holds (every key optional except that there must be at least one job):
    description: one line
    base: [method=vdm, scale=tiny]            # overrides shared by every job (list of key=value or a mapping)
    grid: {sample.guidance: [0, 1, 3]}        # cartesian product of the listed values
    list: [[method=vdm], {method: cmd}]       # explicit variants, each crossed with the grid
    seeds: [0, 1, 2]                          # shorthand for grid key `seed`
Each job is one `python -m benchmarks.run <overrides>` subprocess in its own run folder
(<runs_root>/sweep-<name>/<job>), tagged `tag=<name>`. A job whose config hash already has a row
in the results store is skipped, so re-running an interrupted sweep runs only what is missing,
and a job killed mid-training resumes from its checkpoints. A failed job is appended to
<results>.failures.jsonl (the leaderboard never reads it) and the sweep goes on.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from benchmarks.config import CONFIG_DIR, ConfigError, RunConfig, config_hash, load_config
from benchmarks.results import append_row, read_rows

USAGE = __doc__
REPO = Path(__file__).resolve().parent.parent
SPEC_KEYS = ("description", "base", "grid", "list", "seeds")


@dataclass
class Job:
    """One run of a sweep: its overrides, where it runs, and the config hash that marks it done."""

    name: str  # the varying overrides, readable
    overrides: list[str]  # the full override list given to benchmarks.run
    config_sha256: str = ""
    results: str = ""
    run_dir: str = ""
    error: str = ""  # a config error found while planning (the job is not started)


@dataclass
class SweepSpec:
    name: str
    description: str = ""
    base: list[str] = field(default_factory=list)
    variants: list[list[str]] = field(default_factory=lambda: [[]])  # list entries x grid points


def _value(v) -> str:
    """A YAML value as it must appear on the right of `key=value`."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, list | tuple | dict):
        return json.dumps(v)
    return str(v)


def _overrides(node, where: str) -> list[str]:
    """A list of `key=value` strings, or a mapping {key: value}, as override strings."""
    if node is None:
        return []
    node = OmegaConf.to_container(node) if isinstance(node, DictConfig | ListConfig) else node
    if isinstance(node, dict):
        return [f"{k}={_value(v)}" for k, v in node.items()]
    if isinstance(node, list) and all(isinstance(x, str) and "=" in x for x in node):
        return list(node)
    raise ConfigError(f"{where} must be a list of 'key=value' strings or a mapping of key: value, got {node!r}")


def load_sweep(name_or_path: str) -> SweepSpec:
    """Parse configs/sweep/<name>.yaml (or a path to a YAML file) into a SweepSpec."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / "sweep" / f"{name_or_path}.yaml"
    if not path.exists():
        choices = sorted(p.stem for p in (CONFIG_DIR / "sweep").glob("*.yaml"))
        raise ConfigError(f"no sweep file {path}; choose one of: {', '.join(choices) or '(none)'}")
    raw = OmegaConf.load(path)
    unknown = set(raw.keys()) - set(SPEC_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; valid keys: {', '.join(SPEC_KEYS)}")
    grid = OmegaConf.to_container(raw.grid) if raw.get("grid") is not None else {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path}: grid must map each key to a non-empty list of values")
    if raw.get("seeds") is not None:
        if "seed" in grid:
            raise ConfigError(f"{path}: give seeds either as `seeds:` or as grid key `seed`, not both")
        grid["seed"] = list(raw.seeds)
    entries = raw.get("list")
    listed = [_overrides(e, f"{path}: list[{i}]") for i, e in enumerate(entries)] if entries else [[]]
    points = [[f"{k}={_value(v)}" for k, v in zip(grid, combo, strict=True)]
              for combo in itertools.product(*grid.values())]
    return SweepSpec(name=path.stem, description=str(raw.get("description") or ""),
                     base=_overrides(raw.get("base"), f"{path}: base"),
                     variants=[entry + point for entry in listed for point in points])


def _slug(overrides: list[str]) -> str:
    short = [f"{k.split('.')[-1]}={v}" for k, v in (o.split("=", 1) for o in overrides)]
    text = ",".join(short) or "base"
    return re.sub(r"[^A-Za-z0-9=.,_+-]", "_", text)[:80]


def plan(spec: SweepSpec, extra: list[str]) -> list[Job]:
    """Resolve every job's config (a typo fails here, naming the key) and its run folder and hash."""
    jobs = []
    for variant in spec.variants:
        overrides = [*spec.base, *variant, *extra, f"tag={spec.name}"]
        job = Job(name=" ".join(variant) or "(base)", overrides=overrides)
        try:
            cfg = load_config(overrides)
        except ConfigError as e:
            job.error = str(e)
            given = [o.split("=", 1)[1] for o in overrides if o.startswith("results=")]
            job.results = given[-1] if given else RunConfig.results  # where its failure is recorded
            jobs.append(job)
            continue
        if cfg.run_dir:
            raise ConfigError("run_dir cannot be set in a sweep: each job gets its own folder under runs_root")
        job.config_sha256, job.results = config_hash(cfg), cfg.results
        job.run_dir = str(Path(cfg.runs_root) / f"sweep-{spec.name}" / f"{_slug(variant)}-{job.config_sha256[:8]}")
        job.overrides.append(f"run_dir={job.run_dir}")
        jobs.append(job)
    return jobs


def completed_hashes(results_paths: set[str]) -> set[str]:
    """Config hashes that already have a (successful) row in the results store(s)."""
    done = set()
    for path in results_paths:
        done |= {r.get("config_sha256") for r in read_rows(path) if r.get("status", "ok") != "failed"}
    return done


def failures_path(results: str | Path) -> Path:
    """Where failed jobs are recorded: next to the results store, never in it."""
    results = Path(results)
    return results.with_name(results.stem + ".failures.jsonl")


def record_failure(spec: SweepSpec, job: Job, returncode: int | None, reason: str, log: Path | None) -> None:
    tail = ""
    if log is not None and log.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    append_row(failures_path(job.results), {
        "status": "failed", "sweep": spec.name, "job": job.name, "overrides": job.overrides,
        "config_sha256": job.config_sha256, "run_dir": job.run_dir, "returncode": returncode, "reason": reason,
        "log": str(log) if log else None, "log_tail": tail, "time": datetime.now().isoformat(timespec="seconds")})


def _child_env(parallel: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("BENCHMARKS_RUN_DIR", None)  # never inherit another run's folder
    if parallel > 1 and "OMP_NUM_THREADS" not in env:  # share the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    return env


def run_sweep(spec: SweepSpec, extra: list[str] | None = None, *, jobs: int = 1, dry_run: bool = False,
              command: list[str] | None = None) -> dict:
    """Run the sweep's missing jobs, `jobs` at a time; returns counts {total, skipped, ran, failed}.

    `command` is the job launcher prefix (default: this Python, `-m benchmarks.run`); the job's
    overrides are appended to it.
    """
    command = command or [sys.executable, "-m", "benchmarks.run"]
    planned = plan(spec, list(extra or []))
    done = completed_hashes({j.results for j in planned if not j.error})
    distinct: dict[str, Job] = {}  # one job per distinct config, in sweep order
    for j in planned:
        if not j.error and j.config_sha256 not in done:
            distinct.setdefault(j.config_sha256, j)
    todo = list(distinct.values())
    invalid = [j for j in planned if j.error]
    valid = {j.config_sha256 for j in planned if not j.error}
    print(f"sweep {spec.name}: {len(planned)} jobs" + (f" ({len(valid)} distinct configs)" if len(valid) <
                                                         len(planned) - len(invalid) else "")
          + f", {len(valid & done)} already done, {len(todo)} to run"
          + (f", {len(invalid)} with config errors" if invalid else "")
          + (f" ({jobs} at a time)" if jobs > 1 and todo else ""))
    if dry_run:
        for j in planned:
            state = "invalid" if j.error else "done" if j.config_sha256 in done else "todo"
            print(f"  [{state:7s}] {j.name}  -> {j.run_dir or j.error}")
        return {"total": len(planned), "skipped": len(planned) - len(todo), "ran": 0, "failed": 0}
    for j in invalid:
        print(f"  config error in job {j.name}: {j.error}")
        record_failure(spec, j, None, f"config error: {j.error}", None)

    env = _child_env(jobs)
    running: dict[subprocess.Popen, tuple[Job, Path, float]] = {}
    queue = list(todo)
    ran = failed = 0
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while queue or running:
            while queue and len(running) < max(1, jobs):
                job = queue.pop(0)
                proc, log = _start(job, command, env)
                running[proc] = (job, log, time.perf_counter())
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                job, log, t0 = running.pop(proc)
                ran += 1
                n = f"[{ran}/{len(todo)}]"
                ok = proc.returncode == 0 and job.config_sha256 in completed_hashes({job.results})
                if ok:
                    print(f"  {n} done in {time.perf_counter() - t0:.0f}s: {job.name}")
                    continue
                failed += 1
                reason = f"exit code {proc.returncode}" if proc.returncode else "exited 0 but wrote no results row"
                record_failure(spec, job, proc.returncode, reason, log)
                print(f"  {n} FAILED ({reason}): {job.name}; log {log}")
    except KeyboardInterrupt:
        for proc in running:
            proc.send_signal(signal.SIGINT)  # Lightning stops gracefully; the checkpoints stay for a resume
        for proc in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        print(f"sweep {spec.name} interrupted; re-run the same command to resume")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    failed += len(invalid)
    print(f"sweep {spec.name}: ran {ran}, failed {failed}" +
          (f" (see {failures_path(planned[0].results)})" if failed else ""))
    return {"total": len(planned), "skipped": len(planned) - len(todo) - len(invalid), "ran": ran, "failed": failed}


def _start(job: Job, command: list[str], env: dict) -> tuple[subprocess.Popen, Path]:
    """Launch one job, its output appended to <run_dir>/sweep.log."""
    from benchmarks.run_folder import RunFolder

    Path(job.run_dir).mkdir(parents=True, exist_ok=True)
    log = RunFolder(job.run_dir).sweep_log
    with open(log, "ab") as fh:
        fh.write(f"\n=== {datetime.now().isoformat(timespec='seconds')} {' '.join(job.overrides)}\n".encode())
        fh.flush()
        proc = subprocess.Popen([*command, *job.overrides], stdout=fh, stderr=subprocess.STDOUT, env=env)
    return proc, log


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return {}
    jobs, dry_run, name, extra = 1, False, None, []
    it = iter(argv)
    for a in it:
        if a == "--jobs" or a.startswith("--jobs="):
            value = a.split("=", 1)[1] if "=" in a else next(it, "")
            if not value.isdigit() or int(value) < 1:
                raise SystemExit(f"error: --jobs needs a positive integer, got {value!r}")
            jobs = int(value)
        elif a == "--dry-run":
            dry_run = True
        elif a.startswith("sweep="):
            name = a.split("=", 1)[1]
        elif a.startswith("-"):
            raise SystemExit(f"error: unknown option {a!r}\n{USAGE}")
        else:
            extra.append(a)
    if not name:
        raise SystemExit(f"error: give the sweep to run as sweep=<name>\n{USAGE}")
    try:
        spec = load_sweep(name)
        counts = run_sweep(spec, extra, jobs=jobs, dry_run=dry_run)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    if counts["failed"]:
        raise SystemExit(1)
    return counts


if __name__ == "__main__":
    main()
