"""A method's independent training stages side by side, each in a worker process with its share of the cores.

A method says which stages need which (`VideoGenerator.stage_requires`): CMD's image prior and autoencoder
need nothing, its content stage both, its motion stage the autoencoder. With `trainer.parallel_stages` on,
`benchmarks.run` starts every stage whose requirements are trained, each as

    python -m benchmarks.stage_pool <run_dir> <stage> threads=<n>

with the cores split between the stages running (`thread_shares`); when one ends and no stage becomes ready,
the ones still running take its cores between two steps (the parent writes the new count to the stage's
`threads` file, `ShareCores` reads it). Why: small networks may use a second core poorly, and then two
stages on one core each train more per second than one stage on both. Measured on 2 cores (README, "Stages
side by side"): in an eight-step benchmark CMD's stages stepped only 1.36-1.81x faster on two threads than on
one (`OMP_NUM_THREADS=1 python -m benchmarks.utilisation methods=cmd sample=false` against the same without
it), inside whole runs 1.75-1.89x, so the default run trained 1.07-1.15x faster side by side; its FVD was
worse in all three pairs, so `trainer.parallel_stages` is off by default.

A worker trains its stage with `benchmarks.run.train_stages` into the run folder, as a sequential run
would (checkpoints, resume, the stage's record); the parent then loads each stage's weights by the keys that
stage writes (`VideoGenerator.stage_state_keys`), so stages trained side by side compose. A worker's output
goes to `checkpoints/<stage>/worker.log`; a failed worker stops the others (their last.ckpt stays: a
resume continues them) and its log's tail is in the error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.callbacks import Callback

AUTO_MIN_SECONDS = 60.0  # trainer.parallel_stages=auto: a worker's start (~7 s of imports) must be small against this
POLL_SECONDS = 0.5


class StageWorkerError(RuntimeError):
    """A stage's worker process failed; the message holds its exit code, log path and the log's last lines."""


def stage_graph(method) -> dict[str, tuple[str, ...]]:
    """{stage: the stages it needs} of a method, in its stage order."""
    return {s: method.stage_requires(s) for s in method.stages}


def ancestors(requires: dict[str, tuple[str, ...]], stage: str) -> set[str]:
    """Every stage `stage` needs, directly or through another."""
    out, todo = set(), list(requires[stage])
    while todo:
        s = todo.pop()
        if s not in out:
            out.add(s)
            todo.extend(requires[s])
    return out


def side_by_side(requires: dict[str, tuple[str, ...]], todo: list[str]) -> list[tuple[str, str]]:
    """Pairs of stages still to train that neither needs the other (empty: the stages form a chain)."""
    return [(a, b) for i, a in enumerate(todo) for b in todo[i + 1:]
            if a not in ancestors(requires, b) and b not in ancestors(requires, a)]


def ready_stages(requires: dict[str, tuple[str, ...]], done: set[str], running: set[str]) -> list[str]:
    """Stages not trained nor running whose requirements are all trained, in the method's stage order."""
    return [s for s, need in requires.items() if s not in done and s not in running and set(need) <= done]


def thread_shares(running: list[str], cpus: int) -> dict[str, int]:
    """The cores split between the running stages as evenly as possible (the earlier stages get the remainder);
    every stage at least one."""
    n = len(running)
    return {s: max(1, cpus // n + (i < cpus % n)) for i, s in enumerate(running)} if n else {}


def parallel_mode(value) -> str | None:
    """trainer.parallel_stages as "auto", "on" or "off" (YAML reads on / off / yes / no as booleans, and a string
    key holds them as "True" / "False"); None for anything else."""
    v = str(value).strip().lower()
    return {"auto": "auto", "true": "on", "on": "on", "yes": "on", "false": "off", "off": "off", "no": "off"}.get(v)


def parallel_cpus(cfg, method, todo: list[str], estimate: float | None) -> int:
    """The cores to share between stages side by side for this run, or 0 to train its stages one after another.

    `trainer.parallel_stages`: off -> 0; on / auto -> the process's thread count when the method has two stages
    to train that neither needs, on CPU, one device, no time budget; auto also wants the dry
    pass's estimate (`estimate`, seconds) over AUTO_MIN_SECONDS, where a worker's start-up is small against it,
    and more than one core.
    """
    import torch

    mode = parallel_mode(cfg.trainer.get("parallel_stages", "false"))
    cpus = torch.get_num_threads()
    requires = stage_graph(method)
    usable = (mode != "off" and not cfg.trainer.get("time_budget") and method.device.type == "cpu"
              and str(cfg.trainer.devices) == "1" and cfg.trainer.num_nodes == 1 and cfg.trainer.strategy == "auto"
              and bool(side_by_side(requires, todo)))
    if mode == "auto" and (cpus < 2 or estimate is None or estimate < AUTO_MIN_SECONDS):
        return 0
    return max(2, cpus) if usable else 0  # on: side by side even on one core (then the workers take turns)


# --- the worker's side ----------------------------------------------------------------------------------------


def threads_file(folder, stage: str) -> Path:
    return folder.stage_dir(stage) / "threads"


def progress_file(folder, stage: str) -> Path:
    return folder.stage_dir(stage) / "progress.json"


class ShareCores(Callback):
    """In a worker: takes the thread count the parent writes to `threads` (checked between steps), writes the
    stage's step to `progress.json` about once a second, and records when its thread count changed."""

    def __init__(self, threads: Path, progress: Path) -> None:
        self.threads_path, self.progress_path = threads, progress
        self._mtime, self._written, self._t0 = 0.0, 0.0, time.perf_counter()
        self.history: list[tuple[float, int]] = []

    def _take_threads(self) -> None:
        import torch

        try:
            mtime = self.threads_path.stat().st_mtime
            if mtime == self._mtime:
                return
            self._mtime, n = mtime, int(self.threads_path.read_text().strip())
        except (FileNotFoundError, ValueError):  # not written yet, or caught mid-rename
            return
        if n != torch.get_num_threads() or not self.history:
            torch.set_num_threads(n)
            self.history.append((round(time.perf_counter() - self._t0, 1), n))

    def on_train_start(self, trainer, pl_module) -> None:
        self._take_threads()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._take_threads()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if now - self._written >= 1.0:
            self._written = now
            _write_progress(self.progress_path, trainer.global_step, trainer.max_steps)

    def on_train_end(self, trainer, pl_module) -> None:
        _write_progress(self.progress_path, trainer.global_step, trainer.max_steps)

    def record(self) -> dict:
        """What goes into the stage's record: trained side by side, and its thread counts over time (s, threads)."""
        return {"parallel": True, "threads": self.history}


def _write_progress(path: Path, step: int, max_steps: int) -> None:
    from benchmarks.results import atomic_write_text

    atomic_write_text(path, json.dumps({"step": int(step), "max_steps": int(max_steps)}))


def worker_main(argv: list[str]) -> None:
    """python -m benchmarks.stage_pool <run_dir> <stage> threads=<n>: train one stage of a started run."""
    import lightning as L
    import torch

    run_dir, stage, *rest = argv
    threads = int(next((a.split("=", 1)[1] for a in rest if a.startswith("threads=")), torch.get_num_threads()))
    torch.set_num_threads(threads)
    from benchmarks.common import build_datamodule, build_method, data_spec
    from benchmarks.run import resolve_run, train_stages

    cfg, folder, resumed = resolve_run([f"run_dir={run_dir}", "trainer.progress_bar=false"])
    if not resumed:
        raise SystemExit(f"error: {run_dir} holds no started run (no config.yaml); a stage worker only trains a "
                         "stage of a run that benchmarks.run started")
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the same initial weights as the parent's method
    dm = build_datamodule(cfg)
    dm.setup("fit")
    method = build_method(cfg, data_spec(cfg, dm))
    share = ShareCores(threads_file(folder, stage), progress_file(folder, stage))
    train_stages(cfg, method, dm, folder, only=stage, extra_callbacks=[share])


# --- the parent's side ----------------------------------------------------------------------------------------


@dataclass
class Worker:
    stage: str
    process: subprocess.Popen
    log: Path
    threads: int
    started: float


def _start(folder, stage: str, threads: int) -> Worker:
    from benchmarks.results import atomic_write_text

    folder.stage_dir(stage).mkdir(parents=True, exist_ok=True)
    atomic_write_text(threads_file(folder, stage), f"{threads}\n")
    log = folder.stage_dir(stage) / "worker.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.stage_pool", str(folder.path), stage,
                                 f"threads={threads}"], stdout=out, stderr=subprocess.STDOUT, env=env)
    return Worker(stage, proc, log, threads, time.perf_counter())


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _step(folder, stage: str) -> int:
    try:
        return int(json.loads(progress_file(folder, stage).read_text())["step"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def train_side_by_side(cfg, method, folder, cpus: int, max_steps: dict[str, int]) -> dict:
    """Train every stage of `method` not yet in `folder` in worker processes, side by side where the stages
    allow, sharing `cpus` threads. Returns {"wall_seconds", "events": [(s, stage, what, threads)]}; raises
    StageWorkerError when a worker fails (the others are stopped)."""
    from tqdm.auto import tqdm

    from benchmarks.results import atomic_write_text

    requires = stage_graph(method)
    done = {s for s in method.stages if folder.stage_done(s)}
    running: dict[str, Worker] = {}
    bars: dict[str, tqdm] = {}
    events: list[tuple[float, str, str, int]] = []
    show = bool(cfg.trainer.progress_bar)
    t0 = time.perf_counter()

    def note(stage: str, what: str, threads: int) -> None:
        events.append((round(time.perf_counter() - t0, 1), stage, what, threads))
        if not show:
            print(f"[{stage}] {what} ({threads} thread{'s' * (threads != 1)}) at {events[-1][0]:.0f} s")

    try:
        while len(done) < len(method.stages):
            for stage in ready_stages(requires, done, set(running))[: max(0, cpus - len(running))]:
                running[stage] = _start(folder, stage, 1)
                note(stage, "started", 1)
                if show:
                    bars[stage] = tqdm(total=max_steps[stage], desc=stage, position=len(bars), leave=True,
                                       unit="step", dynamic_ncols=True)
            if not running:
                raise StageWorkerError(f"no stage can start: {sorted(set(method.stages) - done)} wait for "
                                       "stages that are not trained (stage_requires forms a cycle?)")
            for stage, n in thread_shares(list(running), cpus).items():
                w = running[stage]
                if n != w.threads:
                    atomic_write_text(threads_file(folder, stage), f"{n}\n")
                    w.threads = n
                    note(stage, "takes the free cores", n)
            time.sleep(POLL_SECONDS)
            for stage, w in list(running.items()):
                if stage in bars:
                    bars[stage].n = _step(folder, stage)
                    bars[stage].set_postfix_str(f"{w.threads} thread{'s' * (w.threads != 1)}", refresh=True)
                code = w.process.poll()
                if code is None:
                    continue
                del running[stage]
                if code != 0 or not folder.stage_done(stage):
                    raise StageWorkerError(
                        f"stage {stage!r} failed in its worker process (exit code {code}); its log: {w.log}\n"
                        f"--- last lines ---\n{_tail(w.log)}\n--- re-run with run_dir={folder.path} to resume "
                        "(finished stages are kept), or with trainer.parallel_stages=false to train one stage at a time")
                done.add(stage)
                note(stage, f"done in {time.perf_counter() - w.started:.0f} s", w.threads)
    finally:
        for w in running.values():
            w.process.terminate()
        for w in running.values():
            try:
                w.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.process.kill()
        for bar in bars.values():
            bar.close()
    return {"wall_seconds": time.perf_counter() - t0, "cpus": cpus, "events": events}


if __name__ == "__main__":
    worker_main(sys.argv[1:])
