"""The comparison itself: every method trained for the same wall-clock budget and scored by one protocol.

    python -m benchmarks.race                          # configs/sweep/race.yaml: the six methods on shapes (tiny), 240 s
                                                       # of training each, seeds 0 and 1, 128 generated videos per run
    python -m benchmarks.race budgets=120,240,480      # + budget curves (the budgets other than the main one: first seed)
    python -m benchmarks.race sweep=race_curves        # curves at 120, 240, 480 s with both seeds at the largest
    python -m benchmarks.race sweep=race_curves stop_by=05:45   # start no run that would end after 05:45; resume later
    python -m benchmarks.race methods=vdm,dvdm budget=20 seeds=0 scale=test out=/tmp/race   # a quick look
    python -m benchmarks.race --dry-run                # the jobs and which are done
    python -m benchmarks.race --summary-only           # rewrite the tables and plots from the results store

Race keys (every other key=value is an override for every job, as for benchmarks.sweep):
    sweep=race           the contenders: configs/sweep/<name>.yaml or a path, a benchmarks.sweep file: `base`
                         overrides (its `trainer.time_budget` is the main budget), one `list` entry or `grid`
                         point per contender (`method=<m>` and its own overrides), `seeds`
    methods=a,b          only the contenders of these methods
    budget=S             the main budget in seconds of training per run: every seed runs it
    budgets=S1,S2,...    the budgets of the curves (default: the main one only); the others run the first seed
    seeds=0,1            instead of the file's seeds
    references=true      also score every task's floor and ceiling (default true; false to skip)
    out=DIR              where the tables and plots go (default docs/results/race)
    stop_by=HH:MM        start no run that would not finish by then (local time; +M for M minutes from now): its
                         expected wall time is its budget plus the longest overhead (wall - training seconds) a
                         finished run of the same method showed in the store, else twice the budget plus 2 min.
                         The race then writes its summary and stops; the same command resumes it later
    mixed_machines=true  allow new runs into a store whose race rows another kind of machine made (refused by
                         default: a wall-clock budget buys different steps on different CPUs; the kind is the
                         rows' `machine` note: CPU model, cores, bf16 units)
--jobs N runs N jobs at a time (default 1: a wall-clock race wants the machine to itself).

Each job is one `benchmarks.run` with `trainer.time_budget=<S>`: the run's stages share S seconds in
proportion to their preset steps x the seconds per step its dry pass measured, and each stage stops
when its share is spent (benchmarks.run.train_stages); its row records `train_seconds`, `time_budget`,
`budget_ratio` and `within_budget` (±10%). The jobs are a benchmarks.sweep (tagged with the sweep's
name): resumable (done jobs, by config hash, are skipped; a killed job resumes from its checkpoints),
and a failing job is recorded beside the store and the race goes on; its contender shows as "failed"
with the error.

References (`references=true`), per task, scored exactly like generated videos at the same n_gen
against the same real statistics (`reference_row`):
    floor:static-frame   the first frame of a held-out (val) clip repeated for every frame: for image-to-video
                         tasks the conditioning frame itself (val clip i), for class tasks a val clip of the
                         class generated video i is conditioned on, otherwise val clip i
    ceiling:real-val     held-out (val) clips themselves, with their own labels and captions
The first frames of image-to-video methods come from the same val clips (evaluation.protocol); their FVD
reference is `eval.real_split` (train), as for every method.

Outputs under out=: race.md (one table per task: contender, budget, seeds, measured training seconds
against the budget, every metric as mean ± std over seeds, sampling seconds per video, time to 0.8
conditional accuracy, status or error; the references below), race.csv (the same, one line per
contender and budget), runs.csv (every field of every row, benchmarks.leaderboard's CSV), curves.png
(FVD and conditional accuracy against training seconds, one line per contender), cost.png (the same
against sampling seconds per video) and per_class.png (conditional accuracy per conditioning class at the
main budget, a heatmap of race.md's per-class table: which motions each method gets).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from benchmarks import leaderboard as lb
from benchmarks import sweep
from benchmarks.config import ConfigError, load_config
from benchmarks.leaderboard import LOWER_IS_BETTER, METRICS, Entry, row_task
from benchmarks.results import append_row, atomic_write_text, read_rows

USAGE = __doc__
DEFAULT_BUDGET = 240.0
DEFAULT_OUT = "docs/results/race"
ACCURACY_THRESHOLD = 0.8
BUDGET_TOLERANCE = 0.10  # as benchmarks.run.BUDGET_TOLERANCE (not imported: that imports torch and Lightning)
FLOOR, CEILING = "floor:static-frame", "ceiling:real-val"
RACE_KEYS = ("sweep", "methods", "budget", "budgets", "seeds", "references", "out", "stop_by", "mixed_machines")


# --- the jobs -----------------------------------------------------------------------------------------


@dataclass
class Contender:
    """One method (with its own overrides) of the race."""

    overrides: list[str]
    base_method: str = "cmd"  # the race's base `method=` (or the default) when the contender names none

    @property
    def method(self) -> str:
        picked = [o.split("=", 1)[1] for o in self.overrides if o.startswith("method=")]
        return picked[-1] if picked else self.base_method

    @property
    def label(self) -> str:
        rest = [o for o in self.overrides if not o.startswith("method=")]
        return self.method + (f" [{sweep._slug(rest)}]" if rest else "")


@dataclass
class RaceJob:
    contender: Contender
    budget: float
    seed: int
    job: sweep.Job


@dataclass
class Race:
    name: str
    base: list[str]
    contenders: list[Contender]
    budget: float  # the main budget: every seed
    budgets: list[float]
    seeds: list[int]
    extra: list[str] = field(default_factory=list)
    jobs: list[RaceJob] = field(default_factory=list)

    @property
    def results(self) -> str:
        return next((j.job.results for j in self.jobs), "results/results.jsonl")


def _number(text: str, key: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{key}={text!r}: give seconds as a number") from None
    if not value > 0 or not math.isfinite(value):
        raise ConfigError(f"{key}={text!r}: a budget must be a positive number of seconds")
    return value


def _budget_text(b: float) -> str:
    return f"{b:g}"


def load_race(name: str = "race", *, methods: list[str] | None = None, budget: float | None = None,
              budgets: list[float] | None = None, seeds: list[int] | None = None,
              extra: list[str] | None = None) -> Race:
    """The race's contenders, budgets and seeds from a sweep file, with the command line's choices on top."""
    spec = sweep.load_sweep(name)
    extra = list(extra or [])
    if any(o.startswith("trainer.time_budget=") for o in extra):
        raise ConfigError("give the race's budget as budget=<seconds> (budgets=a,b,c for curves), "
                          "not trainer.time_budget")
    base = [o for o in spec.base if not o.startswith(("trainer.time_budget=", "seed="))]
    base_budget = [_number(o.split("=", 1)[1], "trainer.time_budget") for o in spec.base
                   if o.startswith("trainer.time_budget=")]
    base_method = ([o.split("=", 1)[1] for o in spec.base if o.startswith("method=")] or ["cmd"])[-1]
    contenders: list[Contender] = []
    file_seeds: list[int] = [int(o.split("=", 1)[1]) for o in spec.base if o.startswith("seed=")][-1:]
    file_budgets: list[float] = []
    for variant in spec.variants:
        rest = []
        for o in variant:
            key, value = o.split("=", 1)
            if key == "seed":
                file_seeds.append(int(value))
            elif key == "trainer.time_budget":
                file_budgets.append(_number(value, key))
            else:
                rest.append(o)
        if rest not in [c.overrides for c in contenders]:
            contenders.append(Contender(rest, base_method))
    if methods:
        unknown = set(methods) - {c.method for c in contenders}
        if unknown:
            raise ConfigError(f"methods={','.join(methods)}: {sorted(unknown)} not among the contenders of "
                              f"{spec.name} ({', '.join(c.label for c in contenders)})")
        contenders = [c for c in contenders if c.method in methods]
    main_budget = budget or (base_budget[-1] if base_budget else max(file_budgets) if file_budgets else DEFAULT_BUDGET)
    all_budgets = list(dict.fromkeys(budgets or file_budgets or [main_budget]))
    if main_budget not in all_budgets:
        all_budgets.append(main_budget)
    seeds = list(dict.fromkeys(seeds if seeds is not None else file_seeds or [0]))
    race = Race(spec.name, base, contenders, main_budget, sorted(all_budgets), seeds, extra)
    variants, meta = [], []
    for b in [main_budget] + [b for b in race.budgets if b != main_budget]:
        for s in seeds if b == main_budget else seeds[:1]:
            for c in contenders:
                variants.append([*c.overrides, f"trainer.time_budget={_budget_text(b)}", f"seed={s}"])
                meta.append((c, b, s))
    planned = sweep.plan(sweep.SweepSpec(spec.name, spec.description, base, variants), extra)
    race.jobs = [RaceJob(c, b, s, j) for (c, b, s), j in zip(meta, planned, strict=True)]
    return race


# --- running ------------------------------------------------------------------------------------------


def machine_kind(note: dict | None) -> tuple | None:
    """What makes two machines' wall-clock budgets comparable: (CPU model, cores, bf16 units), from a row's
    `machine` note (None for rows without one)."""
    if not note:
        return None
    return (note.get("cpu_model"), note.get("cpus"), note.get("fast_bf16"))


def this_machine_kind() -> tuple:
    from benchmarks import machine

    return machine_kind({"cpu_model": machine.cpu_model(), "cpus": machine.cpu_count(), "fast_bf16": machine.fast_bf16()})


def check_machine(race: Race, here: tuple) -> None:
    """Refuse to add runs made on this machine to a race whose finished runs another kind of machine made."""
    planned = {rj.job.config_sha256 for rj in race.jobs}
    rows = read_rows(race.results) if Path(race.results).exists() else []
    kinds = {machine_kind(r.get("machine")) for r in rows if r.get("config_sha256") in planned} - {None}
    other = sorted(map(str, kinds - {here}))
    if other:
        raise ConfigError(f"the race's finished runs in {race.results} were made on another kind of machine "
                          f"({'; '.join(other)}) than this one ({here}): a wall-clock budget buys a different number "
                          f"of steps there. Give the race a store of its own (results=<new .jsonl> out=<new folder>), "
                          f"or mixed_machines=true to mix them anyway")


def parse_stop_by(text: str, now: float | None = None) -> float:
    """`HH:MM` (the next such local time) or `+M` (minutes from now) as a Unix time."""
    now = time.time() if now is None else now
    try:
        if text.startswith("+"):
            return now + 60 * float(text[1:])
        hours, minutes = (int(v) for v in text.split(":"))
        moment = datetime.fromtimestamp(now).replace(hour=hours, minute=minutes, second=0, microsecond=0)
    except ValueError:
        raise ConfigError(f"stop_by={text!r}: give a local time HH:MM (e.g. 05:50) or +M minutes (e.g. +90)") from None
    stamp = moment.timestamp()
    return stamp if stamp > now else stamp + 24 * 3600


def expected_wall(rj: RaceJob, rows: list[dict]) -> float:
    """A run's expected wall seconds: its budget plus the longest overhead (sampling, scoring, start-up) a
    finished run of the same method showed in the store; twice the budget plus 2 minutes when none did."""
    overheads = [r["wall_seconds"] - r["train_seconds"] for r in rows if r.get("method") == rj.contender.method
                 and isinstance(r.get("wall_seconds"), int | float) and isinstance(r.get("train_seconds"), int | float)]
    return rj.budget + (max(overheads) if overheads else rj.budget + 120.0)


def run_jobs(race: Race, *, jobs: int = 1, command: list[str] | None = None, stop_by: float | None = None) -> dict:
    """Run the race's missing jobs (sweep machinery: resumable, failures recorded beside the store) under a
    progress bar; with `stop_by` (a Unix time) start none that would not finish by then. Returns {total,
    skipped, ran, failed, left}."""
    from tqdm.auto import tqdm

    command = command or [sys.executable, "-m", "benchmarks.run"]
    spec = sweep.SweepSpec(race.name)
    valid = [rj for rj in race.jobs if not rj.job.error]
    done = sweep.completed_hashes({rj.job.results for rj in valid})
    todo, seen = [], set()
    for rj in valid:
        if rj.job.config_sha256 not in done and rj.job.config_sha256 not in seen:
            todo.append(rj)
            seen.add(rj.job.config_sha256)
    invalid = [rj for rj in race.jobs if rj.job.error]
    for rj in invalid:
        print(f"  config error in {rj.contender.label} (budget {_budget_text(rj.budget)} s, seed {rj.seed}): "
              f"{rj.job.error}")
        sweep.record_failure(spec, rj.job, None, f"config error: {rj.job.error}", None)
    print(f"race {race.name}: {len(race.contenders)} contenders x budgets {', '.join(map(_budget_text, race.budgets))} s"
          f" (seeds {', '.join(map(str, race.seeds))} at {_budget_text(race.budget)} s): {len(race.jobs)} runs, "
          f"{len(valid) - len(todo)} already done, {len(todo)} to run")
    if jobs > 1 and todo:
        print(f"  note: {jobs} jobs at a time share the machine: their training seconds buy fewer steps")
    env = sweep._child_env(jobs)
    running: dict[subprocess.Popen, tuple[RaceJob, Path]] = {}
    queue = list(todo)
    ran = failed = 0
    left: list[RaceJob] = []
    bar = tqdm(total=len(todo), desc=f"race {race.name}", unit="run", dynamic_ncols=True, disable=not todo)
    previous = signal.signal(signal.SIGTERM, sweep._raise_interrupt)
    try:
        while queue or running:
            while queue and len(running) < max(1, jobs):
                rj = queue.pop(0)
                if stop_by is not None and time.time() + expected_wall(rj, read_rows(race.results) if
                                                                       Path(race.results).exists() else []) > stop_by:
                    left = [rj, *queue]
                    queue.clear()
                    bar.write(f"  stop_by: {len(left)} run(s) would not finish in time; re-run the same command "
                              f"to resume")
                    break
                proc, log = sweep._start(rj.job, command, env)
                running[proc] = (rj, log)
                bar.set_postfix_str(f"{rj.contender.label} {_budget_text(rj.budget)}s seed {rj.seed}")
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                rj, log = running.pop(proc)
                ran += 1
                row = _row_of(rj.job)
                if proc.returncode == 0 and row is not None:
                    bar.write(f"  {rj.contender.label} {_budget_text(rj.budget)} s seed {rj.seed}: {_brief(row)}")
                else:
                    failed += 1
                    reason = f"exit code {proc.returncode}" if proc.returncode else "exited 0 but wrote no results row"
                    sweep.record_failure(spec, rj.job, proc.returncode, reason, log)
                    bar.write(f"  {rj.contender.label} {_budget_text(rj.budget)} s seed {rj.seed}: FAILED ({reason}): "
                              f"{error_of({'reason': reason, 'log_tail': _tail(log)})}; log {log}")
                bar.update(1)
    except KeyboardInterrupt:
        for proc in running:
            proc.send_signal(signal.SIGINT)  # Lightning stops gracefully; the checkpoints stay for a resume
        for proc in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        bar.close()
        print(f"race {race.name} interrupted; re-run the same command to resume")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    bar.close()
    return {"total": len(race.jobs), "skipped": len(valid) - len(todo), "ran": ran, "failed": failed + len(invalid),
            "left": len(left)}


def _row_of(job: sweep.Job) -> dict | None:
    rows = [r for r in read_rows(job.results) if r.get("config_sha256") == job.config_sha256
            and r.get("status", "ok") != "failed"]
    return rows[-1] if rows else None


def _tail(log: Path | None) -> str:
    if log is None or not Path(log).exists():
        return ""
    return "\n".join(Path(log).read_text(errors="replace").splitlines()[-20:])


def _brief(row: dict) -> str:
    scores = " ".join(f"{k}={row[k]:.3g}" for k in METRICS if isinstance(row.get(k), int | float))
    budget = ""
    if row.get("time_budget"):
        budget = f" ({row['budget_ratio'] - 1:+.0%}{'' if row.get('within_budget') else ', OUTSIDE ±10%'})"
    status = "" if row.get("status", "ok") == "ok" else f" [{row['status']}]"
    return f"train {row.get('train_seconds', 0):.0f} s{budget}, {scores}{status}"


def error_of(failure: dict) -> str:
    """The error a failed job ended with, in one line: its log's last `error: ...` line, else its last exception
    line, else the recorded reason."""
    lines = [ln.strip() for ln in str(failure.get("log_tail") or "").splitlines() if ln.strip()]
    for pick in (lambda ln: ln.startswith("error:"), lambda ln: ln.split(":", 1)[0].endswith(("Error", "Exception"))):
        found = [ln for ln in lines if pick(ln)]
        if found:
            return found[-1].removeprefix("error:").strip()[:300]
    return str(failure.get("reason") or "failed")[:300]


# --- references: the floor and the ceiling ------------------------------------------------------------


def reference_hash(cfg, kind: str, task: str) -> str:
    """What determines a reference row: its kind, the task, the dataset and the evaluation protocol."""
    from benchmarks.config import HOW_KEYS, to_container, without_keys

    ecfg = without_keys(to_container(cfg.eval), tuple(k.split(".", 1)[1] for k in HOW_KEYS if k.startswith("eval.")))
    key = {"reference": kind, "task": task, "dataset": to_container(cfg.dataset), "eval": ecfg, "scale": cfg.scale}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def reference_videos(kind: str, task: str, dm, cfg, n: int, real_labels: list[int] | None):
    """Batches (videos (B, C, T, H, W) in [-1, 1], labels | None, captions | None) of a reference, n videos.

    ceiling: val clip i as it is, with its label and caption. floor: a val clip's first frame repeated T times;
    which clip: image-to-video tasks val clip i (the conditioning frame), class tasks a val clip of the class
    generated video i is conditioned on (`real_labels[i]`, the i-th of that class in turn), otherwise val clip i.
    """
    import torch

    from evaluation.protocol import FIRST_FRAME_SPLIT, dataset_labels

    val = dm.dataset(FIRST_FRAME_SPLIT)
    if len(val) == 0:
        raise ValueError(f"the {FIRST_FRAME_SPLIT} split is empty: no held-out clips for the references")
    seed = cfg.eval.clip_seed
    fetch = lambda i: val.eval_clip(i % len(val), seed)  # noqa: E731  (val clip i, as the protocol numbers them)
    picks = list(range(n))
    if kind == FLOOR and "class" in task.split("+") and "image" not in task.split("+") and real_labels:
        pool = dataset_labels(val)  # labels in dataset order, without decoding
        if pool is not None:
            fetch = val.__getitem__  # noqa: E731  (item i of the split: any held-out clip of the class will do)
        else:
            pool = [val.eval_clip(i, seed)["label"] for i in range(len(val))]
        by_class: dict[int, list[int]] = {}
        for i, lbl in enumerate(pool):
            by_class.setdefault(int(lbl), []).append(i)
        used: dict[int, int] = {}
        picks = []
        for i in range(n):
            lbl = int(real_labels[i % len(real_labels)])
            clips = by_class.get(lbl) or [i % len(val)]
            picks.append(clips[used.get(lbl, 0) % len(clips)])
            used[lbl] = used.get(lbl, 0) + 1
    bs = max(1, int(cfg.eval.batch_size))
    for start in range(0, n, bs):
        items = [fetch(i) for i in picks[start:start + bs]]
        videos = torch.stack([it["video"] for it in items])
        if kind == FLOOR:
            videos = videos[:, :, :1].expand_as(videos).contiguous()
        labels = torch.tensor([it["label"] for it in items]) if all(it.get("label", -1) >= 0 for it in items) else None
        texts = [it["text"] for it in items] if all(it.get("text") is not None for it in items) else None
        yield videos, labels, texts


def reference_row(kind: str, task: str, cfg, tag: str = "") -> dict:
    """Score one reference (FLOOR or CEILING) for `task` like generated videos under cfg's protocol; the row."""
    import torch

    from benchmarks.common import build_datamodule, git_state, library_versions
    from benchmarks.config import to_container
    from evaluation.protocol import FIRST_FRAME_SPLIT, drawn_labels, load_detectors, real_set

    dm = build_datamodule(cfg)
    dm.setup("fit")
    ecfg, n = cfg.eval, int(cfg.eval.num_samples)
    real_labels = None
    if kind == FLOOR and "class" in task.split("+") and dm.num_classes:  # the labels generated videos get
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        det = load_detectors(ecfg, ["fvd"], device)["fvd"]
        real = real_set(ecfg, dm, det, cfg.cache_dir)
        drawn = drawn_labels(real, dm.dataset(ecfg.real_split), ecfg, n)
        real_labels = drawn if drawn is not None else real.labels
    from evaluation.protocol import evaluate_videos

    t0 = time.perf_counter()
    metrics = evaluate_videos(reference_videos(kind, task, dm, cfg, n, real_labels), dm, cfg)
    image = "image" in task.split("+")
    what = ("the first frame of a held-out clip repeated for every frame" if kind == FLOOR
            else "held-out clips scored as if generated")
    row = {"method": kind, "reference": kind.split(":")[0], "description": what, "dataset": cfg.dataset.name,
           "scale": cfg.scale, "tag": tag, "seed": None, "task": task, **metrics,
           "sampler": None, "steps": None, "guidance": None, "eta": None, "eval_seed": None,
           "stride": cfg.dataset.stride, "source_split": FIRST_FRAME_SPLIT,
           "train_seconds": 0.0, "sample_seconds_per_video": None,
           "reference_seconds": time.perf_counter() - t0, "status": "ok",
           "config_sha256": reference_hash(cfg, kind, task), "run_dir": None,
           "time": datetime.now().isoformat(timespec="seconds"), **git_state(), "versions": library_versions(),
           "config": {"method": {"name": kind}, "dataset": to_container(cfg.dataset), "eval": to_container(cfg.eval),
                      "scale": cfg.scale}}
    row["task"] = task  # evaluate_videos knows no method: the reference stands for this task
    if image:
        row["first_frame_split"] = FIRST_FRAME_SPLIT
    return row


def contender_tasks(race: Race) -> tuple[dict[str, str], dict[str, object]]:
    """({contender label: its task}, {task: the config its references are scored under}): the race's base
    overrides and command line with the method of the task's first contender, without the contenders' own
    overrides (the dataset and evaluation protocol every contender shares)."""
    from evaluation.grid import task_of
    from methods import METHODS

    tasks: dict[str, str] = {}
    configs: dict[str, object] = {}
    for rj in race.jobs:
        if rj.job.error or rj.contender.label in tasks:
            continue
        cfg = load_config([o for o in rj.job.overrides if not o.startswith("run_dir=")])
        task = task_of(cfg.method, METHODS[cfg.method.name].image_to_video)
        tasks[rj.contender.label] = task
        if task not in configs:
            configs[task] = load_config([*race.base, f"method={rj.contender.method}", *race.extra, f"tag={race.name}"])
    return tasks, configs


def reference_hashes(race: Race) -> dict[tuple[str, str], str]:
    """{(kind, task): the reference row's hash} for every task of the race."""
    return {(kind, task): reference_hash(cfg, kind, task) for task, cfg in contender_tasks(race)[1].items()
            for kind in (FLOOR, CEILING)}


def run_references(race: Race) -> dict:
    """The floor and ceiling rows of every task of the race, appended to its store unless already there."""
    done = sweep.completed_hashes({race.results})
    counts = {"ran": 0, "skipped": 0, "failed": 0}
    for task, cfg in contender_tasks(race)[1].items():
        for kind in (FLOOR, CEILING):
            h = reference_hash(cfg, kind, task)
            if h in done:
                counts["skipped"] += 1
                continue
            try:
                row = reference_row(kind, task, cfg, race.name)
            except Exception as e:  # a reference that cannot be scored is reported, the race goes on
                counts["failed"] += 1
                append_row(sweep.failures_path(race.results), {
                    "status": "failed", "sweep": race.name, "job": f"{kind} ({task})", "reference": kind, "task": task,
                    "config_sha256": h, "reason": f"{type(e).__name__}: {e}", "log_tail": f"error: {type(e).__name__}: {e}",
                    "time": datetime.now().isoformat(timespec="seconds")})
                print(f"  reference {kind} ({task}) FAILED: {type(e).__name__}: {e}")
                continue
            append_row(race.results, row)
            counts["ran"] += 1
            print(f"  reference {kind} ({task}): " + " ".join(
                f"{k}={row[k]:.3g}" for k in METRICS if isinstance(row.get(k), int | float)))
    return counts


# --- the summary --------------------------------------------------------------------------------------


def time_to_accuracy(points, threshold: float = ACCURACY_THRESHOLD) -> tuple[float | None, str]:
    """Training seconds at which conditional accuracy first reaches `threshold`, from (seconds, accuracy) points
    (one per budget): linearly interpolated between the two budgets around the first crossing
    ("interpolated"); the smallest budget's seconds when it already reaches it ("at or before"); None when no
    budget reaches it ("not reached") or there is nothing to go on ("no data")."""
    pts = sorted((float(x), float(y)) for x, y in points if x is not None and y is not None)
    if not pts:
        return None, "no data"
    if pts[0][1] >= threshold:
        return pts[0][0], "at or before"
    for (x1, y1), (x2, y2) in zip(pts, pts[1:], strict=False):
        if y1 < threshold <= y2:
            return x1 + (threshold - y1) * (x2 - x1) / (y2 - y1), "interpolated"
    return None, "not reached"


def format_time_to(value: float | None, how: str) -> str:
    if how == "no data":
        return ""
    if value is None:
        return "not reached"
    return (f"≤ {value:.0f} s" if how == "at or before" else f"{value:.0f} s")


@dataclass
class Line:
    """One line of the race table: a contender at one budget (its seeds aggregated), or a reference."""

    label: str
    method: str
    task: str | None
    budget: float | None
    entry: Entry | None  # the successful rows
    failures: list[dict] = field(default_factory=list)
    degenerate: list[dict] = field(default_factory=list)
    missing: int = 0  # planned runs with neither a row nor a recorded failure (not run yet)
    time_to: str = ""

    @property
    def rows(self) -> list[dict]:
        return self.entry.rows if self.entry is not None else []

    def stat(self, key: str):
        return self.entry.stat(key) if self.entry is not None else None

    @property
    def reference(self) -> bool:
        return self.budget is None

    @property
    def outside(self) -> list[dict]:
        return [r for r in self.rows if r.get("time_budget") and not r.get("within_budget")]

    def budget_cell(self) -> str:
        ratios = [r["budget_ratio"] - 1 for r in self.rows if isinstance(r.get("budget_ratio"), int | float)]
        if not ratios:
            return ""
        spread = f"{min(ratios):+.0%}" if len(ratios) == 1 else f"{min(ratios):+.0%} to {max(ratios):+.0%}"
        return spread + (f" OUTSIDE ±{BUDGET_TOLERANCE:.0%}" if self.outside else " ok")

    def status(self) -> str:
        parts = []
        if self.failures:
            parts.append("failed: " + "; ".join(dict.fromkeys(error_of(f) for f in self.failures)))
        if self.degenerate:
            parts.append("degenerate samples: " + "; ".join(
                dict.fromkeys(", ".join(r.get("flags") or []) for r in self.degenerate)))
        if self.missing:
            parts.append(f"{self.missing} run(s) not done yet")
        return " | ".join(parts) if parts else "ok"


def _entry(rows: list[dict]) -> Entry | None:
    return Entry(rows, {}, lb.protocol(rows[0])) if rows else None


def race_lines(race: Race, rows: list[dict], failures: list[dict]) -> list[Line]:
    """The race table's lines from the store's rows and the recorded failures of the race's jobs: one per
    contender and budget, then every task's floor and ceiling."""
    tasks, _ = contender_tasks(race)
    kept = lb.select(rows, include_degenerate=True)
    by_hash: dict[str, list[dict]] = {}
    for r in kept:
        by_hash.setdefault(str(r.get("config_sha256")), []).append(r)
    failed_by_hash: dict[str, dict] = {}
    for f in failures:
        failed_by_hash[str(f.get("config_sha256"))] = f  # the latest failure of each job
    lines = []
    for c in race.contenders:
        for b in race.budgets:
            mine = [rj for rj in race.jobs if rj.contender is c and rj.budget == b]
            if not mine:
                continue
            ok, bad, failed, missing = [], [], [], 0
            for rj in mine:
                got = by_hash.get(rj.job.config_sha256, [])
                if got:
                    row = got[-1]
                    (ok if row.get("status", "ok") == "ok" else bad).append(row)
                elif rj.job.error:
                    failed.append({"reason": f"config error: {rj.job.error}", "log_tail": f"error: {rj.job.error}"})
                elif rj.job.config_sha256 in failed_by_hash:
                    failed.append(failed_by_hash[rj.job.config_sha256])
                else:
                    missing += 1
            task = row_task(ok[0]) if ok else tasks.get(c.label)
            lines.append(Line(c.label, c.method, task, b, _entry(ok), failed, bad, missing))
    for (kind, task), h in reference_hashes(race).items():
        refs = by_hash.get(h, [])
        fails = [failed_by_hash[h]] if h in failed_by_hash and not refs else []
        if refs or fails:
            lines.append(Line(kind, kind, task, None, _entry(refs[-1:]), fails))
    for c in race.contenders:  # time to 0.8 accuracy, per contender over its budgets
        mine = [ln for ln in lines if ln.label == c.label and not ln.reference]
        points = []
        for ln in mine:
            acc, secs = ln.stat("cond_acc"), ln.stat("train_seconds")
            if acc is not None:
                points.append((secs[0] if secs else ln.budget, acc[0]))
        cell = format_time_to(*time_to_accuracy(points))
        for ln in mine:
            ln.time_to = cell
    return lines


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _metric_cols(lines: list[Line]) -> list[str]:
    return [m for m in METRICS if any(ln.stat(m) is not None for ln in lines)]


def _seconds_cell(stat: tuple[float, float, int] | None) -> str:
    """Measured training seconds as whole seconds (1308, not 1.31e+03), with the std over seeds."""
    return lb._fmt(stat and (round(stat[0]), *stat[1:]), digits=6)


def to_markdown(race: Race, lines: list[Line]) -> str:
    """race.md: one table per task; the budget check, the protocol and what differs below."""
    out = [f"## Race `{race.name}`: equal training budgets", "",
           f"Budgets {', '.join(_budget_text(b) + ' s' for b in race.budgets)} of training per run (seeds "
           f"{', '.join(map(str, race.seeds))} at {_budget_text(race.budget)} s"
           + (", the first seed at the others" if len(race.budgets) > 1 else "") + "). "
           f"`train s` is the measured training time (mean ± std over seeds), `vs budget` its distance from the budget "
           f"(±{BUDGET_TOLERANCE:.0%} allowed); metrics are mean ± sample std over seeds; `time to "
           f"{ACCURACY_THRESHOLD}` is the training time at which conditional accuracy reaches {ACCURACY_THRESHOLD}, "
           "interpolated linearly between budgets. The references are scored like generated videos.", ""]
    tasks = sorted({ln.task or "" for ln in lines})
    for task in tasks:
        group = [ln for ln in lines if (ln.task or "") == task]
        metrics = _metric_cols(group)
        header = ["contender", "budget s", "seeds", "train s", "vs budget", *metrics, "sample s/video",
                  f"time to {ACCURACY_THRESHOLD} acc", "status"]
        out += [f"### task: {task or 'unknown (no successful run)'}", "",
                "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for ln in group:
            seeds = len({r.get("seed") for r in ln.rows}) if ln.rows else 0
            cells = [ln.label, "-" if ln.reference else _budget_text(ln.budget), "-" if ln.reference else str(seeds),
                     _seconds_cell(ln.stat("train_seconds")) if not ln.reference else "-", ln.budget_cell()]
            cells += [lb._fmt(ln.stat(m)) for m in metrics]
            cells += [lb._fmt(ln.stat("sample_seconds_per_video"), 3), ln.time_to, ln.status()]
            out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        out.append("")
        entries = [ln.entry for ln in group if ln.entry is not None]
        notes = []
        for m in metrics:
            cols = lb.metric_columns(entries, m)
            if len(cols) > 1:
                notes.append(f"`{m}` was measured under different protocols (not comparable): {lb.protocol_note(cols)}")
        if entries:
            common = {k: v for k, v in entries[0].protocol.items() if all(e.protocol.get(k) == v for e in entries)}
            keys = ("task", "n_gen", "n_real", "real_split", "first_frame_split", "frames", "resolution", "stride",
                    "detector", "eval_protocol", "covariance")
            out.append("Protocol: " + ", ".join(f"{k}={lb._short(common[k])}" for k in keys if k in common) + ".")
        out += [f"Note: {n}" for n in notes]
        out.append("")
        out += per_class_table(group, race.budget)
    outside = [(ln, r) for ln in lines for r in ln.outside]
    if outside:
        out.append(f"**Outside the budget (±{BUDGET_TOLERANCE:.0%})**: " + "; ".join(
            f"{ln.label} at {_budget_text(ln.budget)} s, seed {r.get('seed')}: {r['train_seconds']:.0f} s "
            f"({r['budget_ratio'] - 1:+.0%})" for ln, r in outside) + ".")
    else:
        out.append(f"Every run's training time is within ±{BUDGET_TOLERANCE:.0%} of its budget.")
    out.append("")
    out.append(machines_note([r for ln in lines if not ln.reference for r in ln.rows]))
    failed = [ln for ln in lines if ln.failures]
    if failed:
        out.append("")
        out.append("**Failed**: " + "; ".join(f"{ln.label}" + ("" if ln.reference else f" at {_budget_text(ln.budget)} s")
                                             + f": {error_of(ln.failures[-1])}" for ln in failed)
                   + f" (logs and details: `{sweep.failures_path(race.results)}`).")
    return "\n".join(out).rstrip() + "\n"


def per_class(lines: list[Line], budget: float) -> tuple[list[str], list[tuple[str, list[float | None]]]]:
    """(classes, [(label, accuracy per class)]): each contender's conditional accuracy per conditioning class at
    `budget` (mean over its seeds' `cond_acc_per_class`), then the references'; ([], []) when no row has them."""
    chosen = [ln for ln in lines if (ln.reference or ln.budget == budget)
              and any(isinstance(r.get("cond_acc_per_class"), dict) for r in ln.rows)]
    # the dataset's class order is the confusion's (the store sorts a row's keys, so the dict's is alphabetical)
    ordered = [c for ln in chosen for r in ln.rows for c in (r.get("cond_confusion") or {}).get("rows", [])]
    classes = list(dict.fromkeys(ordered + [c for ln in chosen for r in ln.rows
                                            for c in (r.get("cond_acc_per_class") or {})]))
    table = []
    for ln in chosen:
        cells = []
        for c in classes:
            values = [r["cond_acc_per_class"][c] for r in ln.rows if isinstance(r.get("cond_acc_per_class"), dict)
                      and isinstance(r["cond_acc_per_class"].get(c), int | float)]
            cells.append(sum(values) / len(values) if values else None)
        table.append((ln.label + (f" ({ln.task})" if ln.reference else ""), cells))
    return classes, table


def per_class_table(lines: list[Line], budget: float) -> list[str]:
    """Markdown lines of `per_class`: *which* classes (motions, on shapes) each method gets."""
    classes, table = per_class(lines, budget)
    if not table:
        return []
    out = [f"Per-class conditional accuracy at {_budget_text(budget)} s (mean over seeds; references as scored):", "",
           "| contender | " + " | ".join(classes) + " |", "|" + "---|" * (len(classes) + 1)]
    out += ["| " + " | ".join([_cell(label), *("-" if v is None else f"{v:.2f}" for v in cells)]) + " |"
            for label, cells in table]
    return [*out, ""]


def plot_per_class(lines: list[Line], budget: float):
    """A heatmap of `per_class` (contenders and references x classes), or None without per-class rows."""
    classes, table = per_class(lines, budget)
    if not table:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([[np.nan if v is None else v for v in cells] for _, cells in table], dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(classes) + 2.5, 0.9 + 0.38 * len(table)))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(table)), [label for label, _ in table], fontsize=8)
    for i, j in np.ndindex(values.shape):
        if not np.isnan(values[i, j]):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if values[i, j] > 0.6 else "white")
    ax.set_title(f"conditional accuracy per class at {_budget_text(budget)} s of training")
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    return fig


def machines_note(rows: list[dict]) -> str:
    """Which machines made the rows, each with the matmul probe range of the precision it trained in (bf16
    where it has bf16 units, else fp32): a wall-clock budget means something only for one kind of machine."""
    kinds: dict[tuple, list[dict]] = {}
    for r in rows:
        kinds.setdefault(machine_kind(r.get("machine")) or ("unknown",), []).append(r)
    if not kinds:
        return "Machine: no finished run yet."
    parts = []
    for kind, mine in kinds.items():
        known = len(kind) == 3
        name = (f"{kind[0]}, {kind[1]} cores, " + ("bf16 units" if kind[2] else "no bf16 units")) if known \
            else "not recorded"
        precision = "fp32" if known and kind[2] is False else "bf16"
        probes = []
        for r in mine:
            note = r.get("machine") or {}
            probe = note.get(f"{precision}_matmul_gflops", r.get(f"{precision}_matmul_gflops"))
            probes += [probe] if isinstance(probe, int | float) else []
        span = f"{min(probes):.0f}-{max(probes):.0f}" if probes and min(probes) != max(probes) else \
            f"{probes[0]:.0f}" if probes else "?"
        parts.append(f"{name} ({len(mine)} runs; {precision} matmul probe {span} GFLOP/s)")
    head = "Machine: " if len(parts) == 1 else "**Machines (mixed: the budgets are not comparable across them)**: "
    return head + "; ".join(parts) + "."


def to_table_csv(lines: list[Line]) -> str:
    """race.csv: one line per contender and budget (and reference), the numbers unformatted."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    stats = ["train_seconds", *METRICS, "sample_seconds_per_video"]
    w.writerow(["contender", "method", "task", "budget", "seeds", "budget_ratio_min", "budget_ratio_max",
                "within_budget", *(f"{k}_{s}" for k in stats for s in ("mean", "std")), "n_gen", "n_real",
                f"time_to_{ACCURACY_THRESHOLD}", "status"])
    for ln in lines:
        ratios = [r["budget_ratio"] for r in ln.rows if isinstance(r.get("budget_ratio"), int | float)]
        row = [ln.label, ln.method, ln.task or "", "" if ln.budget is None else ln.budget,
               len({r.get("seed") for r in ln.rows}), min(ratios) if ratios else "", max(ratios) if ratios else "",
               "" if not ratios else not ln.outside]
        for k in stats:
            s = ln.stat(k)
            row += ["", ""] if s is None else [s[0], s[1]]
        row += [ln.rows[0].get("n_gen") if ln.rows else "", ln.rows[0].get("n_real") if ln.rows else "",
                ln.time_to, ln.status()]
        w.writerow(row)
    return buf.getvalue()


def _series(lines: list[Line]) -> dict[str, list[Line]]:
    out: dict[str, list[Line]] = {}
    for ln in lines:
        if not ln.reference and ln.entry is not None:
            out.setdefault(f"{ln.label} ({ln.task})", []).append(ln)
    return out


def plot_curves(lines: list[Line], x_key: str = "train_seconds"):
    """FVD and conditional accuracy against `x_key` (train_seconds: one line per contender over its budgets;
    sample_seconds_per_video: one point per contender and budget), the references as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(lines)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(sorted(series))}
    refs = [ln for ln in lines if ln.reference and ln.entry is not None]
    for ax, metric in zip(axes, ("fvd", "cond_acc"), strict=True):
        for name, pts in sorted(series.items()):
            pts = sorted((p for p in pts if p.stat(metric) and p.stat(x_key)), key=lambda p: p.stat(x_key)[0])
            if not pts:
                continue
            xs, ys = [p.stat(x_key) for p in pts], [p.stat(metric) for p in pts]
            ax.errorbar([x[0] for x in xs], [y[0] for y in ys], xerr=[x[1] for x in xs], yerr=[y[1] for y in ys],
                        marker="o", capsize=3, color=colors[name], label=name,
                        linestyle="-" if x_key == "train_seconds" else "none")
            if x_key != "train_seconds":
                for p, x, y in zip(pts, xs, ys, strict=True):
                    ax.annotate(f"{_budget_text(p.budget)} s", (x[0], y[0]), textcoords="offset points",
                                xytext=(4, 4), fontsize=7, color=colors[name])
        levels: dict[tuple[str, float], list[str]] = {}  # references at the same level share one line
        for ln in refs:
            s = ln.stat(metric)
            if s is not None:
                levels.setdefault((ln.method, round(s[0], 9)), []).append(str(ln.task))
        for (kind, level), tasks in sorted(levels.items()):
            ax.axhline(level, color="gray", linestyle="--" if kind == FLOOR else ":", linewidth=1)
            ax.annotate(f"{kind} ({', '.join(tasks)})", (0.01, level), xycoords=("axes fraction", "data"),
                        fontsize=7, color="gray", va="bottom")
        if metric == "cond_acc":
            ax.axhline(ACCURACY_THRESHOLD, color="black", linewidth=0.6, alpha=0.4)
        ax.set_xlabel("training seconds (measured)" if x_key == "train_seconds" else "sampling seconds per video")
        budgets = sorted({p.budget for pts in series.values() for p in pts if p.budget})
        if x_key != "train_seconds" or (budgets and budgets[-1] >= 2 * budgets[0]):  # budgets doubling: log axis
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log", base=2 if x_key == "train_seconds" else 10)
            ax.xaxis.set_minor_formatter(NullFormatter())
            if x_key == "train_seconds":
                ax.set_xticks(budgets, [_budget_text(b) for b in budgets])
        ax.set_ylabel(metric + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
        ax.set_title(f"{metric} vs " + ("training budget" if x_key == "train_seconds" else "sampling cost"))
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no successful runs yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def summarize(race: Race, out: str | Path) -> dict:
    """Write race.md, race.csv, runs.csv, curves.png, cost.png and (with per-class rows) per_class.png under
    `out`; returns what it found."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_rows(race.results) if Path(race.results).exists() else []
    planned = {rj.job.config_sha256 for rj in race.jobs}
    failures = [f for f in read_rows(sweep.failures_path(race.results))
                if f.get("sweep") == race.name] if sweep.failures_path(race.results).exists() else []
    lines = race_lines(race, rows, failures)
    mine = [r for ln in lines for r in ln.rows + ln.degenerate]
    atomic_write_text(out / "race.md", to_markdown(race, lines))
    atomic_write_text(out / "race.csv", to_table_csv(lines))
    atomic_write_text(out / "runs.csv", lb.to_csv(mine))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, x_key in (("curves.png", "train_seconds"), ("cost.png", "sample_seconds_per_video")):
        fig = plot_curves(lines, x_key)
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    fig = plot_per_class(lines, race.budget)
    if fig is not None:
        fig.savefig(out / "per_class.png", dpi=110)
        plt.close(fig)
    outside = [(ln.label, ln.budget, r.get("seed")) for ln in lines for r in ln.outside]
    failed = [ln.label for ln in lines if ln.failures]
    print(f"race {race.name}: wrote {out}/race.md, race.csv, runs.csv, curves.png, cost.png "
          f"({len([r for r in mine if r.get('config_sha256') in planned])} runs"
          + (f"; outside the budget: {outside}" if outside else "") + (f"; failed: {failed}" if failed else "") + ")")
    return {"lines": lines, "outside": outside, "failed": failed, "out": out}


# --- command line -------------------------------------------------------------------------------------


def run_race(argv: list[str] | None = None, *, command: list[str] | None = None) -> dict:
    """Parse the command line, run what is missing, write the summary; returns the counts and the summary."""
    argv = list(argv or [])
    jobs, dry_run, summary_only = 1, False, False
    keys: dict[str, str] = {}
    extra: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--jobs" or a.startswith("--jobs="):
            value = a.split("=", 1)[1] if "=" in a else next(it, "")
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--jobs needs a positive integer, got {value!r}")
            jobs = int(value)
        elif a == "--dry-run":
            dry_run = True
        elif a == "--summary-only":
            summary_only = True
        elif a.startswith("-"):
            raise ConfigError(f"unknown option {a!r}")
        elif a.split("=", 1)[0] in RACE_KEYS and "=" in a:
            key, value = a.split("=", 1)
            keys[key] = value
        else:
            extra.append(a)
    split = lambda key: [v for v in keys[key].split(",") if v] if keys.get(key) else None  # noqa: E731
    try:
        seeds = [int(s) for s in split("seeds")] if split("seeds") else None
    except ValueError:
        raise ConfigError(f"seeds={keys['seeds']!r}: give integers, e.g. seeds=0,1") from None
    references = keys.get("references", "true").lower()
    if references not in ("true", "false"):
        raise ConfigError(f"references={keys['references']!r}: true or false")
    race = load_race(keys.get("sweep", "race"), methods=split("methods"),
                     budget=_number(keys["budget"], "budget") if keys.get("budget") else None,
                     budgets=[_number(b, "budgets") for b in split("budgets")] if split("budgets") else None,
                     seeds=seeds, extra=extra)
    if dry_run:
        done = sweep.completed_hashes({race.results})
        for rj in race.jobs:
            state = "invalid" if rj.job.error else "done" if rj.job.config_sha256 in done else "todo"
            print(f"  [{state:7s}] {rj.contender.label:<24} budget {_budget_text(rj.budget):>5} s  seed {rj.seed}  "
                  f"-> {rj.job.run_dir or rj.job.error}")
        return {"jobs": race.jobs, "race": race}
    mixed = keys.get("mixed_machines", "false").lower()
    if mixed not in ("true", "false"):
        raise ConfigError(f"mixed_machines={keys['mixed_machines']!r}: true or false")
    stop_by = parse_stop_by(keys["stop_by"]) if keys.get("stop_by") else None
    if not summary_only and mixed == "false":
        check_machine(race, this_machine_kind())
    counts = {} if summary_only else run_jobs(race, jobs=jobs, command=command, stop_by=stop_by)
    refs = (run_references(race) if references == "true" and not summary_only and not counts.get("left")
            else {})
    summary = summarize(race, keys.get("out", DEFAULT_OUT))
    return {**counts, "references": refs, "summary": summary, "race": race}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return {}
    try:
        result = run_race(argv)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    if result.get("failed") or (result.get("references") or {}).get("failed"):
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
