"""Train every stage of one method on one dataset, sample, score, and append one results row.

    python -m benchmarks.run                                  # default method on the embedded shapes data
    python -m benchmarks.run method=vdm dataset=shapes trainer.max_steps=200
    python -m benchmarks.run method=cmd dataset=ucf101 dataset.root=/data/UCF-101 scale=paper

    python -m benchmarks.run method=cmd --check               # validate, dry pass, print the plan; train nothing
    python -m benchmarks.run method=cmd scale=paper --check check_batch=2   # the dry pass at batch 2 (memory)

`run_dir=<folder>` alone resumes that run with its saved config: finished stages are loaded,
an interrupted stage continues from its `last.ckpt`. An override that would change the result
is refused (start a new run instead); a finished run is not run or appended again. A run
appends its row only once it completes, and never for a diverged or interrupted stage.
Before the first training step every config value, detector file and the results path are
checked, and a dry pass runs one loss step per stage and one sampling step. Stages that need nothing
of each other (CMD's image prior and autoencoder, then its content and motion stages) train side by
side in worker processes sharing the cores (`trainer.parallel_stages=auto|true|false`, benchmarks.stage_pool).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import sys
import time
import warnings
import zipfile
from datetime import datetime
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from benchmarks.common import build_datamodule, build_method, data_spec, git_state, library_versions, real_conditioning
from benchmarks.config import (
    SELECTORS,
    ConfigError,
    config_hash,
    load_config,
    merge_overrides,
    predates_note,
    saved_run_config,
    stage_settings,
    to_container,
)
from benchmarks.efficiency import sample_gflops
from benchmarks.results import append_row, atomic_torch_save, read_rows
from benchmarks.run_folder import RunFolder, RunFolderError, config_difference

USAGE = __doc__
RUN_DIR_ENV = "BENCHMARKS_RUN_DIR"  # rank 0 hands its run folder to the DDP workers it launches


def make_run_dir(cfg: DictConfig) -> Path:
    """cfg.run_dir, else runs_root/<method>-<dataset>-<time>; every process of a multi-process run agrees on it."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    if int(os.environ.get("LOCAL_RANK", "0")) > 0 and os.environ.get(RUN_DIR_ENV):  # a DDP worker started by rank 0
        return Path(os.environ[RUN_DIR_ENV])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:  # tasks start independently: name the folder after the job
        return Path(cfg.runs_root) / f"{cfg.method.name}-{cfg.dataset.name}-slurm{os.environ['SLURM_JOB_ID']}"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.runs_root) / f"{cfg.method.name}-{cfg.dataset.name}-{stamp}"
    path, k = base, 1
    while path.exists():  # two runs started in the same second (sweeps)
        path, k = Path(f"{base}-{k}"), k + 1
    return path


def _is_worker() -> bool:
    """A DDP worker process started by rank 0 (it follows rank 0's folder and checks)."""
    return int(os.environ.get("LOCAL_RANK", "0")) > 0 or int(os.environ.get("NODE_RANK", "0")) > 0


def resolve_run(argv: list[str]) -> tuple[DictConfig, RunFolder, bool]:
    """(config, folder, resumed) for a command line. The run folder is the source of truth:

    - `run_dir=X` of an existing run: X's saved config, plus the overrides given; an override that
      changes a result-defining key (anything but `benchmarks.config.HOW_KEYS`) is refused;
    - `run_dir=X` of a folder that holds something else: refused, nothing is overwritten;
    - otherwise a new run composed from the defaults and the overrides.
    """
    given = [a.split("=", 1)[1] for a in argv if a.startswith("run_dir=")]
    folder = RunFolder(given[-1]) if given and given[-1] else None
    if folder is None or not folder.has_run():
        if folder is not None and folder.foreign_contents() and not _is_worker():
            raise RunFolderError(
                f"run_dir={folder.path} is not empty ({', '.join(folder.foreign_contents()[:5])}) and holds no run "
                f"(no config.yaml): it is never overwritten. Give a new or empty folder, or leave run_dir out.")
        cfg = load_config(argv)
        return cfg, RunFolder(make_run_dir(cfg)), False
    saved = folder.saved_config()
    picked = {k: a.split("=", 1)[1] for a in argv for k in SELECTORS if a.startswith(k + "=")}
    held = {"method": saved.method.name, "dataset": saved.dataset.name, "scale": saved.scale}
    clash = {k: v for k, v in picked.items() if k != "dataset" and v != held[k]}
    if clash:
        raise RunFolderError(
            f"run_dir={folder.path} holds a {held['method']} run on {held['dataset']} at scale {held['scale']}, not "
            + ", ".join(f"{k}={v}" for k, v in clash.items())
            + ". It is never overwritten: leave run_dir out (or give a new folder) to start that run.")
    from benchmarks.evaluate import run_dir_dataset

    resumed, reset = saved_run_config(saved, picked.get("dataset", run_dir_dataset(folder.path, saved)), f"{folder.config_path}")
    if reset and not _is_worker():
        print(predates_note(str(folder.config_path), reset), file=sys.stderr)
    wanted = merge_overrides(resumed, [a for a in argv if a.split("=", 1)[0] not in SELECTORS], "command line")
    diff = config_difference(to_container(resumed), to_container(wanted))
    if diff:
        shown = "\n  ".join(f"{k}: {a!r} in the run folder, {b!r} asked" for k, a, b in diff[:20])
        raise RunFolderError(
            f"run_dir={folder.path} was started with a different config; resuming it with these overrides would "
            f"store a result that mixes two configs:\n  {shown}\n"
            f"Resume with `python -m benchmarks.run run_dir={folder.path}` alone, or start a new run with your "
            f"overrides and no run_dir (or a new folder).")
    wanted.run_dir = str(folder.path)
    return wanted, folder, True


def _trainer(cfg: DictConfig, stage: str, steps: int, run_dir: Path, callbacks: list):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    strategy = cfg.trainer.strategy
    if strategy in ("ddp", "ddp_spawn") and cfg.trainer.devices not in (1, "1"):
        from lightning.pytorch.strategies import DDPStrategy

        # stages train a subset of a method's parameters; some (e.g. a null embedding) see no gradient on a rank
        strategy = DDPStrategy(find_unused_parameters=True, start_method="spawn" if strategy == "ddp_spawn" else "popen")
    return L.Trainer(
        max_steps=steps, max_epochs=-1, accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes, strategy=strategy, precision=cfg.trainer.precision,
        gradient_clip_val=cfg.trainer.gradient_clip_val or None, accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        log_every_n_steps=cfg.trainer.log_every_n_steps, deterministic=cfg.trainer.deterministic,
        enable_progress_bar=cfg.trainer.progress_bar, enable_model_summary=False, num_sanity_val_steps=0,
        logger=TensorBoardLogger(str(run_dir), name="tensorboard", version=stage), callbacks=callbacks,
        use_distributed_sampler=True,
    )


def shared_stage_cache(cfg: DictConfig, method, stage: str, settings: dict) -> Path | None:
    """Where a shared stage's weights (e.g. the image prior) are cached, keyed by what determines them."""
    shared = getattr(method, "shared_stages", {})
    if stage not in shared or cfg.trainer.get("time_budget"):  # under a time budget every stage is paid for
        return None
    key = {"stage": stage, "module": method.shared_stage_config(stage), "dataset": to_container(cfg.dataset),
           "train": settings, "precision": cfg.trainer.precision, "seed": cfg.seed}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cfg.cache_dir) / "shared_stages" / f"{stage}-{digest}.pt"


def stage_status(cfg: DictConfig, method, folder: RunFolder) -> dict[str, str]:
    """{stage: "done" (final.pt in the run folder) | "cached" (shared weights exist) | "train"}."""
    out = {}
    for stage in method.stages:
        cache = shared_stage_cache(cfg, method, stage, stage_settings(cfg, stage))
        out[stage] = ("done" if folder.stage_done(stage) else "cached" if cache is not None and cache.exists()
                      else "train")
    return out


def _checkpoint_seconds(path: Path) -> float:
    """Training seconds a stage's last.ckpt has accumulated over earlier attempts (0 without one)."""
    if not path.exists():
        return 0.0
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return float(ckpt.get("train_seconds", 0.0))


def _checkpoint_step(path: Path) -> int | None:
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("global_step")


def _check_finite(method, where: str) -> None:
    bad = [name for name, p in method.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RuntimeError(f"{where}: {len(bad)} parameter tensors hold non-finite values (first: {bad[0]}); "
                           "nothing is sampled or stored from these weights")


BUDGET_TOLERANCE = 0.10  # a budgeted run's measured training seconds should be within ±10% of trainer.time_budget
# a budgeted stage's step cap, x the steps its allowance buys at the dry pass's speed (a sanity bound: time stops it)
BUDGET_STEP_HEADROOM = 10.0


def budget_allowance(budget: float, spent: float, estimates: list[float]) -> float:
    """Seconds the next stage may train under a time budget: what is left of the budget (`budget - spent`),
    shared with the stages after it in proportion to `estimates` (the next stage's first: its preset steps x
    measured seconds per step). Overruns and savings of earlier stages carry over to the later ones, so the
    last stage ends the run at the budget."""
    left = max(0.0, budget - spent)
    total = sum(estimates)
    return left * (estimates[0] / total if total > 0 else 1.0 / len(estimates))


def budget_fields(budget: float | None, train_seconds: float) -> dict:
    """The results row's record of a time budget: the budget, measured / budget, and whether within ±10%."""
    if not budget:
        return {}
    ratio = train_seconds / budget
    return {"time_budget": float(budget), "budget_ratio": ratio, "within_budget": abs(ratio - 1) <= BUDGET_TOLERANCE}


def _stage_estimates(cfg: DictConfig, method, plan) -> dict[str, tuple[float, float | None]]:
    """{stage: (predicted seconds at its preset steps, seconds per step or None)} from the dry pass's plan;
    without a plan (or a measurement) every step is assumed to cost the same."""
    measured = {s.stage: s for s in getattr(plan, "stages", [])}
    out = {}
    for stage in method.stages:
        sp = measured.get(stage)
        if sp is not None and sp.step_seconds:
            out[stage] = (sp.estimate, sp.estimate / max(1, sp.steps))
        else:
            out[stage] = (float(stage_settings(cfg, stage)["max_steps"]), None)
    return out


class TimeBudget(Callback):
    """Stops a stage at `deadline` (a time.perf_counter() value, set just before `fit`): after the batch at which
    the next batch would end further past the deadline than this one ends before it (batch time smoothed over the
    last few: data, step, optimiser, EMA, logging). Rank 0 decides and every rank follows, as Lightning's Timer.
    A module-level class, so ddp_spawn can pickle it."""

    def __init__(self, deadline: float = float("inf")) -> None:
        self.deadline, self.stopped = deadline, False
        self._last: float | None = None
        self._step: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            d = now - self._last
            self._step = d if self._step is None else 0.7 * self._step + 0.3 * d
        self._last = now
        if bool(trainer.strategy.broadcast(now + 0.5 * (self._step or 0.0) >= self.deadline)):
            trainer.should_stop, self.stopped = True, True


def _warm_up_training_imports() -> None:
    """Pay the process's one-time costs of a first training step before a time budget's clock runs: the modules
    the first optimiser step, gradient clipping and the TensorBoard logger import lazily (seconds on a loaded
    CPU, the same for every method: not training)."""
    import lightning.pytorch.loggers.tensorboard  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401

    p = torch.zeros(2, requires_grad=True)
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.ones(2)
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    opt.step()


def load_stage_weights(method, folder: RunFolder, stage: str) -> dict:
    """Load a trained stage's weights into `method` by the keys the stage writes (`stage_state_keys`; keys no
    stage writes come along too), so stages trained side by side compose; returns the stage's record."""
    state, saved = folder.load_stage(stage)
    others = set().union(*(method.stage_state_keys(s) for s in method.stages if s != stage))
    mine = method.stage_state_keys(stage)
    method.load_state_dict({k: v for k, v in state.items() if k in mine or k not in others}, strict=False)
    return saved


def train_stages(cfg: DictConfig, method, dm, folder: RunFolder, plan=None, only: str | None = None,
                 extra_callbacks: tuple | list = ()) -> dict:
    """Train (or load) every stage in order; returns per-stage records.

    With `trainer.parallel_stages` on (benchmarks.stage_pool.parallel_cpus), stages that need nothing of each
    other train side by side in worker processes first, each through this function with `only` (train that
    stage after loading the stages it needs; "" loads what is trained or cached and trains nothing) and
    `extra_callbacks`; every stage is then loaded from the folder.

    With `trainer.time_budget` (seconds, every stage together) a stage trains until its allowance is spent
    (`budget_allowance`: the rest of the budget shared by the stages still to train in proportion to their
    preset steps x the dry pass's seconds per step, `plan` from benchmarks.preflight.dry_pass), capped at
    BUDGET_STEP_HEADROOM x the steps that allowance buys; its record holds the steps it ran. Shared stages
    are not taken from the cache then (every method pays for its image prior within its budget).
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.trainer.states import TrainerStatus

    from benchmarks.stage_pool import ancestors, parallel_cpus, parallel_mode, stage_graph, train_side_by_side
    from lightning_modules.system import EMA, LRSchedule, StageSystem

    records = {}
    budget = cfg.trainer.get("time_budget")
    estimates = _stage_estimates(cfg, method, plan) if budget else {}
    if budget and not all(folder.stage_done(s) for s in method.stages):
        _warm_up_training_imports()
    if only is None and not _is_worker():
        status = stage_status(cfg, method, folder)
        if "cached" in status.values():  # shared weights into the folder first: then every worker loads them
            train_stages(cfg, method, dm, folder, only="")
        todo = [s for s in method.stages if not folder.stage_done(s)]
        cpus = parallel_cpus(cfg, method, todo, None if plan is None else plan.train_estimate)
        if cpus:
            print(f"training {', '.join(todo)} in worker processes, independent stages side by side on {cpus} "
                  f"threads (trainer.parallel_stages={parallel_mode(cfg.trainer.parallel_stages)}; logs in "
                  "checkpoints/<stage>/worker.log)")
            pool = train_side_by_side(cfg, method, folder, cpus, {s: stage_settings(cfg, s)["max_steps"] for s in todo})
            earlier = folder.state().get("parallel_training", {}).get("wall_seconds", 0.0)
            folder.update_state(parallel_training={**pool, "wall_seconds": earlier + pool["wall_seconds"]})
    # a worker (only=<stage>) loads the stages its stage needs, and trains that one
    needed = ancestors(stage_graph(method), only) if only else None
    for stage in method.stages:
        if needed is not None and stage != only and stage not in needed:
            continue
        settings = stage_settings(cfg, stage)
        shared = getattr(method, "shared_stages", {})
        cache = shared_stage_cache(cfg, method, stage, settings)
        rec = {"steps": settings["max_steps"], "params": method.num_parameters(stage), "source": "trained"}
        if folder.stage_done(stage):
            saved = load_stage_weights(method, folder, stage)
            _check_finite(method, f"{folder.final(stage)}")
            if saved.get("parallel") and not saved.get("composed") and only is None and not _is_worker():
                # trained side by side, its final.pt holds the stages beside it untrained: rewrite it as a
                # sequential run leaves it (every stage up to it trained), the whole method that evaluate,
                # the probes and a resume load from the last stage's file
                saved = {**saved, "composed": True}
                folder.save_stage(stage, method.state_dict(), saved)
            records[stage] = {**rec, **saved, "source": "run folder"}
            print(f"[{stage}] already trained in {folder.stage_dir(stage)}; loaded")
            continue
        if cache is not None and cache.exists():
            getattr(method, shared[stage]).load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
            _check_finite(method, f"shared weights {cache}")
            records[stage] = {**rec, "seconds": 0.0, "source": f"cache {cache}"}
            print(f"[{stage}] loaded shared weights from {cache}")
            if not _is_worker():
                folder.save_stage(stage, method.state_dict(), records[stage])
            continue
        if only is not None and stage != only:  # a worker trains its own stage only
            continue
        if hasattr(method, "on_stage_start"):
            method.on_stage_start(stage)
        L.seed_everything(cfg.seed + 1000 * method.stages.index(stage), workers=True, verbose=False)
        timer, allowance = None, None
        if budget:
            todo = [s for s in method.stages[method.stages.index(stage):] if not folder.stage_done(s)]
            spent = sum(r.get("seconds") or 0.0 for r in records.values())
            allowance = budget_allowance(float(budget), spent, [estimates[s][0] for s in todo])
            per_step = estimates[stage][1]
            cap = max(1, math.ceil(BUDGET_STEP_HEADROOM * allowance / per_step)) if per_step else 10**7
            settings["max_steps"] = rec["steps"] = cap
            timer = TimeBudget()
        schedule = LRSchedule(cfg.optim.warmup_steps, settings["max_steps"], cfg.optim.get("lr_decay", "none"),
                              float(cfg.optim.get("lr_decay_start", 0.0)))  # max_steps: the budget's cap, if any
        system = StageSystem(method, stage, lr=settings["lr"], betas=tuple(settings["betas"]),
                             weight_decay=cfg.optim.weight_decay, compile=bool(cfg.trainer.compile), schedule=schedule)
        every = max(1, min(settings["max_steps"], cfg.trainer.checkpoint_every_n_steps))
        callbacks = [ModelCheckpoint(dirpath=str(folder.stage_dir(stage)), save_last=True, save_top_k=0,
                                     every_n_train_steps=every)]
        if settings["ema_decay"] > 0:
            callbacks.append(EMA(settings["ema_decay"], cfg.optim.ema_start_step))
        if timer is not None:
            callbacks.append(timer)
        callbacks.extend(extra_callbacks)
        loader = dm.loader_for("train", shuffle=True, drop_last=True, batch_size=settings["batch_size"], seed=cfg.seed)
        if cfg.trainer.strategy == "ddp_spawn":
            _drop_generators(loader)
        last = _usable_checkpoint(folder.last_checkpoint(stage))
        before = _checkpoint_seconds(last)
        trainer = _trainer(cfg, stage, settings["max_steps"], folder.path, callbacks)
        print(f"[{stage}] training {rec['params'] / 1e6:.2f}M parameters for "
              + (f"{allowance:.1f} s of the {float(budget):.0f} s budget (at most {settings['max_steps']} steps)"
                 if budget else f"{settings['max_steps']} steps")
              + (f" (resuming from {last}, {before:.0f} s trained before)" if last.exists() else ""))
        encodings = method.encoding_cache.stats() if method.encoding_cache is not None else None
        t0 = time.perf_counter()
        if timer is not None:  # the clock of the stage's allowance, which a decaying learning rate follows too
            timer.deadline = schedule.deadline = t0 + allowance - before
            schedule.allowance = allowance
        trainer.fit(system, train_dataloaders=loader, ckpt_path=str(last) if last.exists() else None)
        seconds = before + time.perf_counter() - t0  # accumulated over every attempt (kept in last.ckpt)
        # under ddp_spawn the loop counters stay in the workers; only weights, state and metrics come back
        steps_done = settings["max_steps"] if cfg.trainer.strategy == "ddp_spawn" else trainer.global_step
        on_time = timer is not None and timer.stopped
        if trainer.state.status != TrainerStatus.FINISHED or (steps_done < settings["max_steps"] and not on_time):
            raise RuntimeError(f"stage {stage!r} stopped at step {trainer.global_step} of {settings['max_steps']} "
                               f"(interrupted?); re-run with run_dir={folder.path} to resume")
        _check_finite(method, f"stage {stage!r} after training")
        loss = trainer.callback_metrics.get(f"{stage}/loss")
        if budget:  # the steps it ran, and what it was allowed
            rec.update(steps=steps_done, step_cap=settings["max_steps"], allowance_seconds=allowance,
                       stopped_on="time" if on_time else "steps")
        now = method.encoding_cache.stats() if encodings is not None else None
        if now is not None and any(now[k] != encodings[k] for k in ("hits", "misses", "not_on_cpu")):
            got = rec["encoding_cache"] = {**now, **{k: now[k] - encodings[k]
                                                     for k in ("hits", "misses", "not_kept", "not_on_cpu")}}
            print(f"[{stage}] encoding cache: {got['misses']} clips encoded, {got['hits']} read back ({now['rows']} "
                  f"kept, {now['mb']} MiB)" + (f"; {got['not_on_cpu']} not on the CPU, not cached" if got["not_on_cpu"] else ""))
        for cb in extra_callbacks:  # e.g. a stage worker's thread counts over time
            rec.update(cb.record() if hasattr(cb, "record") else {})
        records[stage] = {**rec, "seconds": seconds, "step_seconds": seconds / max(1, rec["steps"]),
                          "final_loss": float(loss) if loss is not None else None}
        if trainer.is_global_zero:
            folder.save_stage(stage, method.state_dict(), records[stage])
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_torch_save(getattr(method, shared[stage]).state_dict(), cache)
        for p in method.parameters():
            p.requires_grad_(True)
    return records


def _drop_generators(loader) -> None:
    """ddp_spawn pickles the loader, and a torch.Generator fails to unpickle in the workers (torch 2.13,
    file-descriptor sharing); Lightning's DistributedSampler (seeded by L.seed_everything) shuffles there instead."""
    loader.generator = None
    if hasattr(loader.sampler, "generator"):
        loader.sampler.generator = None


def _usable_checkpoint(path: Path) -> Path:
    """`path`, or a renamed-away `path` when a kill left it truncated (the stage then restarts from scratch)."""
    if path.exists() and not zipfile.is_zipfile(path):
        bad = path.with_name(path.name + ".corrupt")
        os.replace(path, bad)
        warnings.warn(f"{path} is not a complete checkpoint (interrupted write?); moved to {bad}", stacklevel=2)
    return path


def compile_sampler(cfg: DictConfig, method, dm) -> list[str]:
    """torch.compile the networks `method.sample` calls (found by a one-step sample of one video)."""
    from methods.speed import compile_called

    cond = real_conditioning(dm, 1, "val", first_frame=method.image_to_video).to(method.device)
    method.eval()
    with torch.no_grad(), torch.autocast(method.device.type, dtype=torch.bfloat16,
                                         enabled=cfg.trainer.precision.startswith("bf16")):
        roots = compile_called(method, lambda: method.sample(1, cond, steps=1, guidance=cfg.sample.guidance,
                                                               eta=cfg.sample.eta))
    print(f"trainer.compile: compiled {', '.join(roots)} for sampling")
    return roots


def sample_videos(cfg: DictConfig, method, dm, n: int, seed: int) -> tuple[torch.Tensor, object, float]:
    """n videos (n, C, T, H, W) conditioned like the real val set; returns (videos, cond, seconds per video)."""
    from tqdm.auto import tqdm

    # val clip i (held out): the clip evaluation.protocol gives image-to-video sample i its first frame from
    cond = real_conditioning(dm, n, "val", first_frame=method.image_to_video, clip_seed=cfg.eval.clip_seed)
    method.eval()
    device = method.device
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    bs = cfg.sample.batch_size
    autocast = cfg.trainer.precision.startswith("bf16")
    t0 = time.perf_counter()
    for start in tqdm(range(0, n, bs), desc="sampling", disable=not cfg.trainer.progress_bar):
        c = cond.slice(start, min(n, start + bs)).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out.append(method.sample(len(c) or min(bs, n - start), c, steps=cfg.sample.steps,
                                     guidance=cfg.sample.guidance, generator=g, eta=cfg.sample.eta).float().cpu())
    seconds = (time.perf_counter() - t0) / max(1, n)
    return torch.cat(out), cond, seconds


def write_samples(videos: torch.Tensor, cond, out_dir: Path, fps: int, class_names: list[str],
                  conditioning: str | None = None) -> Path:
    """samples/<NNN>[-<class>].mp4 (libx264 yuv420p), samples/conditioning.json and a PNG grid (one row per
    video, 8 frames across), each video labelled with what it was conditioned on.

    Video i was sampled with `cond` row i (real val clip i's label, caption and, for image-to-video, first
    frame), but a method only sees what its config conditions on: `conditioning` ("class", "text",
    "class+text", "none"; default: the `conditioning` values of the run folder's saved config, see
    `evaluation.grid.conditioning_kinds`) picks which of label / caption a label shows; the first frame
    counts when `cond.first_frame` is set. conditioning.json lists, per file, its clip, class index and what
    it was conditioned on (`benchmarks.report` labels its videos with it).
    """
    from benchmarks.results import atomic_write_text
    from datamodules.video_io import write_video
    from evaluation.detectors import quantize
    from evaluation.grid import conditioning_kinds, conditioning_records, save_grid

    if conditioning is not None:
        kinds = conditioning_kinds({"conditioning": conditioning})
    elif RunFolder(out_dir.parent).has_run():  # benchmarks.run saves the config before training
        kinds = conditioning_kinds(to_container(RunFolder(out_dir.parent).saved_config()).get("method", {}))
    else:  # no config to ask: the label if there is one, else the caption
        kinds = ("class",) if cond.label is not None else ("text",) if cond.text is not None else ()
    out_dir.mkdir(parents=True, exist_ok=True)
    u8 = quantize(videos)  # (N, C, T, H, W) uint8, the evaluator's own rounding: one rule in the project
    records = conditioning_records(len(u8), kinds, labels=None if cond.label is None else cond.label.tolist(),
                                   texts=cond.text, image_to_video=cond.first_frame is not None,
                                   class_names=class_names or ())
    for i, (v, rec) in enumerate(zip(u8, records, strict=True)):
        name = f"{i:03d}"
        if cond.label is not None and class_names:
            name += "-" + str(class_names[int(cond.label[i])]).replace("/", "_")
        rec["file"] = f"{name}.mp4"
        write_video(out_dir / rec["file"], v.permute(1, 2, 3, 0).numpy(), fps=fps)
    atomic_write_text(out_dir / "conditioning.json", json.dumps(
        {"conditioning": list(kinds), "image_to_video": cond.first_frame is not None, "videos": records},
        indent=2, sort_keys=True) + "\n")
    return save_grid(u8, out_dir / "grid.png", captions=[r["conditioned_on"] for r in records])


def val_motion(dm, n: int = 16) -> float | None:
    """Mean frame-to-frame difference of the first n val clips (does the data move?)."""
    from evaluation.sanity import frame_motion

    ds = dm.dataset("val")
    if len(ds) == 0:
        return None
    videos = torch.stack([ds[i]["video"] for i in range(min(n, len(ds)))])
    return float(frame_motion(videos).mean())


def _finished(folder: RunFolder, cfg: DictConfig) -> dict | None:
    """The stored row of a finished run (its row is in the store), else None."""
    if folder.row_appended():
        return folder.stored_row() or {}
    stored = folder.stored_row()  # a crash between appending the row and recording it
    if stored and any(r.get("run_dir") == str(folder.path) and r.get("config_sha256") == stored.get("config_sha256")
                      for r in read_rows(cfg.results)):
        folder.update_state(row_appended=True, results=str(cfg.results))
        return stored
    return None


def preflight(cfg: DictConfig, method, dm, folder: RunFolder, check_batch: int | None = None):
    """Every check that can run before training (see benchmarks.preflight); returns the plan.

    check_batch: run the dry pass at this batch size at most (a paper preset's batch may not fit a CPU's
    memory); the time estimate is then extrapolated linearly to the configured batch.
    """
    from benchmarks.preflight import check_writable, dry_pass, open_detectors

    check_writable(cfg.results, "results")
    open_detectors(cfg, dm, method)
    return dry_pass(cfg, method, dm, stage_status(cfg, method, folder), max_batch=check_batch)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return {}
    check_only = "--check" in argv or "dry_run=true" in argv
    argv = [a for a in argv if a not in ("--check", "dry_run=true", "dry_run=false")]
    check_batch = [a.split("=", 1)[1] for a in argv if a.startswith("check_batch=")]
    argv = [a for a in argv if not a.startswith("check_batch=")]
    if check_batch and not (check_batch[-1].isdigit() and int(check_batch[-1]) > 0):
        raise SystemExit(f"error: check_batch={check_batch[-1]}: give a positive batch size for the dry pass")
    from benchmarks.preflight import validate_config

    try:
        cfg, folder, resumed = resolve_run(argv)
        validate_config(cfg)
    except (ConfigError, RunFolderError) as e:
        raise SystemExit(f"error: {e}") from None
    if resumed and not check_only and not _is_worker():
        row = _finished(folder, cfg)
        if row is not None:
            print(f"run {folder.path} is finished and its row is in {folder.state().get('results', cfg.results)}: "
                  "nothing to do, no row appended.\nTo score it again and append a row marked as a re-evaluation: "
                  f"python -m benchmarks.evaluate run={folder.path} append=true")
            return row
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*predict_dataloader.*|.*val_dataloader.*")
    import lightning as L

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    t_start = time.perf_counter()
    try:
        dm = build_datamodule(cfg)
        dm.setup("fit")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    method = build_method(cfg, data_spec(cfg, dm))
    print(f"run folder: {folder.path}\nmethod {cfg.method.name} ({method.num_parameters() / 1e6:.2f}M parameters), "
          f"dataset {cfg.dataset.name} ({len(dm.dataset('train'))} train clips), scale {cfg.scale}")
    try:
        plan = preflight(cfg, method, dm, folder, int(check_batch[-1]) if check_batch else None)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(plan.table())
    if check_only:
        print("--check: nothing was trained or written")
        return {"plan": plan, "config": cfg}
    is_zero = not _is_worker()
    from benchmarks.machine import machine_note

    # this machine's bf16 matmul speed now (2.5 s; 0.5 s at scale=test), beside every time in the row; rank 0 only
    # (it alone writes the row, and two ranks probing at once would each measure half the machine)
    machine = machine_note(seconds_budget=0.5 if cfg.scale == "test" else 2.5) if is_zero else {}
    if is_zero:
        print(f"machine: {machine['bf16_matmul_gflops']:.0f} GFLOP/s bf16 matmul ({machine['cpus']} CPUs, "
              f"{machine['cpu_model']})")
    cfg.run_dir = str(folder.path)
    if is_zero:
        folder.save_config(cfg)
    os.environ[RUN_DIR_ENV] = str(folder.path)
    from benchmarks.stage_pool import StageWorkerError
    from lightning_modules.system import DivergenceError

    try:
        stages = train_stages(cfg, method, dm, folder, plan)
    except StageWorkerError as e:
        if is_zero:
            folder.update_state(failed=str(e).splitlines()[0])
        raise SystemExit(f"error: {e}\nNo row was stored.") from None
    except DivergenceError as e:
        stage = next(s for s in method.stages if not folder.stage_done(s))
        last = folder.last_checkpoint(stage)
        kept = (f"The last good checkpoint is kept: {last} (step {_checkpoint_step(last)}); a resume with the same "
                "config would diverge again." if last.exists() else
                f"No checkpoint of this stage was written before it (trainer.checkpoint_every_n_steps="
                f"{cfg.trainer.checkpoint_every_n_steps}).")
        if is_zero:
            folder.update_state(failed=f"{e} {kept}")
        raise SystemExit(f"error: {e} {kept} No row was stored.") from None
    _check_finite(method, "before sampling")
    if cfg.trainer.compile:
        compile_sampler(cfg, method, dm)

    metrics: dict = {}
    sample_seconds, check = None, None
    if is_zero:
        from evaluation.sanity import check_samples

        n = cfg.sample.num_videos
        videos, cond, sample_seconds = sample_videos(cfg, method, dm, n, cfg.seed)
        check = check_samples(videos, val_motion(dm))
        grid = write_samples(videos, cond, folder.samples_dir, cfg.sample.fps, dm.class_names)
        _log_grid(folder.path, grid)
        print(f"wrote {n} samples and {grid} ({sample_seconds:.2f} s per video)")
    if cfg.eval.metrics:
        from evaluation.protocol import evaluate_run

        metrics = evaluate_run(cfg, method, dm, folder.path)
    wall = time.perf_counter() - t_start
    row = results_row(cfg, method, dm, stages, metrics, sample_seconds, wall, folder.path)
    row.update(machine_fields(machine, row["train_seconds"], cfg.trainer.precision))
    if check is not None:
        row.update(status=check["status"], flags=check["flags"], sample_check=check)
    row["resumed"] = resumed
    row["check_estimate_seconds"] = plan.train_estimate
    if is_zero:
        folder.write_metrics(row)
        append_row(cfg.results, row)
        folder.update_state(row_appended=True, results=str(cfg.results), config_sha256=row["config_sha256"])
        print(summary_line(row))
    return row


def _log_grid(run_dir: Path, grid: Path) -> None:
    """The sample grid as an image in TensorBoard (add_video is silently broken with moviepy 2)."""
    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(RunFolder(run_dir).tensorboard_dir / "samples")) as w:
        w.add_image("samples/grid", np.asarray(Image.open(grid).convert("RGB")), dataformats="HWC")


REFERENCE_BF16_GFLOPS = 570.0  # the quiet 2-core machine the README's first figures come from


def sampling_fields(cfg) -> dict:
    """The results row's sampler settings (a re-evaluation with other ones, `benchmarks.evaluate`, rewrites them)."""
    return {
        "sampler": cfg.method.diffusion.sampler if "diffusion" in cfg.method else None,
        "steps": cfg.sample.steps, "guidance": cfg.sample.guidance, "eta": cfg.sample.eta,
        # a method's own per-model sampler settings (e.g. CMD's content/motion steps and guidance) override the above
        "method_sampling": to_container(cfg.method.sampling) if "sampling" in cfg.method else None,
    }


def results_row(cfg, method, dm, stages: dict, metrics: dict, sample_seconds, wall: float, run_dir: Path) -> dict:
    from evaluation.grid import task_of

    ds = cfg.dataset
    # stages trained side by side (benchmarks.stage_pool) count with the wall time they took together
    # (their state.json record lost, their own seconds add up: an overestimate)
    pool = RunFolder(run_dir).state().get("parallel_training") if any(r.get("parallel") for r in stages.values()) else None
    train_seconds = (sum(r.get("seconds", 0.0) for r in stages.values() if not (pool and r.get("parallel")))
                     + (pool["wall_seconds"] if pool else 0.0))
    return {
        "method": cfg.method.name, "dataset": ds.name, "scale": cfg.scale, "tag": cfg.tag, "seed": cfg.seed,
        # what is generated from what: numbers of two tasks are never compared (benchmarks.leaderboard)
        "task": task_of(to_container(cfg.method), method.image_to_video), "image_to_video": method.image_to_video,
        "resolution": ds.resolution, "frames": ds.frames, "stride": ds.stride,
        **sampling_fields(cfg),
        "ema": cfg.optim.ema_decay > 0, "ema_decay": cfg.optim.ema_decay, "precision": cfg.trainer.precision,
        "params": method.num_parameters(), "stage_params": {s: r["params"] for s, r in stages.items()},
        "train_seconds": train_seconds, **budget_fields(cfg.trainer.get("time_budget"), train_seconds),
        "stage_seconds": {s: r.get("seconds") for s, r in stages.items()},
        "stage_steps": {s: r["steps"] for s, r in stages.items()},
        "parallel_stages": None if pool is None else {"cpus": pool["cpus"], "events": pool["events"]},
        # clips each stage encoded with its frozen encoder and read back (trainer.encoding_cache)
        "encoding_cache": {s: r["encoding_cache"] for s, r in stages.items() if r.get("encoding_cache")} or None,
        "sample_seconds_per_video": sample_seconds, "wall_seconds": wall,
        "gflops_per_video": sample_gflops(cfg, dm),  # every sampling step and the decoder (benchmarks.efficiency)
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "skipped_videos": dm.skipped_videos, "short_videos": dm.short_videos,  # distinct files, over every split
        **metrics,
        "config_sha256": config_hash(cfg), "run_dir": str(run_dir), "time": datetime.now().isoformat(timespec="seconds"),
        **git_state(), "versions": library_versions(), "config": to_container(cfg),
    }


def machine_fields(machine: dict, train_seconds: float, precision: str = "bf16-mixed") -> dict:
    """The machine note and the training time normalised to a reference machine's bf16 matmul speed.

    `train_seconds_ref` = train_seconds x (this machine's GFLOP/s / REFERENCE_BF16_GFLOPS): the seconds the
    run would have taken on a machine of the reference speed, if its time scaled with the matmul peak
    (a first-order correction: memory-bound parts scale differently). Rows from different machines, or
    from one machine under different loads, compare on it.
    """
    gflops = machine.get("bf16_matmul_gflops") or 0.0
    bf16 = str(precision).startswith("bf16")  # the reference is a bf16 speed: an fp32 run is not scaled by it
    return {"machine": machine, "bf16_matmul_gflops": gflops,
            "train_seconds_ref": train_seconds * gflops / REFERENCE_BF16_GFLOPS if gflops > 0 and bf16 else None}


def summary_line(row: dict) -> str:
    keys = [k for k in ("fvd", "is", "clipsim", "cond_acc", "rfvd") if row.get(k) is not None]
    scores = " ".join(f"{k}={row[k]:.3g}" for k in keys) or "no metrics (eval.metrics is empty)"
    if row.get("status", "ok") != "ok":
        scores = f"{row['status'].upper()} SAMPLES ({'; '.join(row.get('flags', []))}), not a result: {scores}"
    budget = ""
    if row.get("time_budget"):
        budget = (f" of a {row['time_budget']:.0f}s budget ({row['budget_ratio'] - 1:+.0%}"
                  + ("" if row.get("within_budget") else f", OUTSIDE ±{BUDGET_TOLERANCE:.0%}") + ")")
    return (f"{row['method']} on {row['dataset']}: {scores} | train {row['train_seconds']:.0f}s{budget}, "
            f"sampling {row['sample_seconds_per_video'] or 0:.2f}s/video, wall {row['wall_seconds']:.0f}s | {row['run_dir']}")


if __name__ == "__main__":
    main()
