"""Everything a run can check before its first training step, in seconds.

    validate_config(cfg)                 every value: enums, ranges, metric names, counts against the world size
    check_writable(path, key)            the results store can be written
    open_detectors(cfg, dm, method)      every detector file the evaluation will need opens
    dry_pass(cfg, method, dm, ...)       one loss step per stage to train and one sampling step at batch 1,
                                         timed: the plan with an estimate of the training time

`benchmarks.run` runs all of them before training; `python -m benchmarks.run ... --check` stops
after printing the plan. An error here costs seconds; the same error after training costs
the whole budget.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from benchmarks.config import ConfigError, stage_settings
from benchmarks.config_keys import DIFFUSION_CONFIGS, UNET_CONFIGS

PRECISIONS = ("bf16-mixed", "32-true", "32", "16-mixed", "bf16-true", "64-true", "transformer-engine")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp", "deepspeed", "single_device")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
COVARIANCES = ("biased", "unbiased")


def world_size(cfg: DictConfig) -> int | None:
    """Processes the run will use, or None when Lightning decides ("auto")."""
    devices = cfg.trainer.devices
    if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        return int(devices) * int(cfg.trainer.num_nodes)
    return None


def validate_config(cfg: DictConfig) -> None:
    """Raise one ConfigError listing every invalid value (key, value, what is accepted)."""
    from evaluation.config import METRICS
    from evaluation.detectors import DETECTORS
    from methods import METHODS

    problems: list[str] = []

    def need(ok: bool, key: str, value, rule: str) -> None:
        if not ok:
            problems.append(f"{key}={value!r}: {rule}")

    def one_of(key: str, value, choices) -> None:
        need(value in choices, key, value, f"choose one of {', '.join(map(str, choices))}")

    t, o, s, e = cfg.trainer, cfg.optim, cfg.sample, cfg.eval
    need(t.max_steps > 0, "trainer.max_steps", t.max_steps, "must be a positive number of optimiser steps")
    one_of("trainer.precision", t.precision, PRECISIONS)
    one_of("trainer.accelerator", t.accelerator, ACCELERATORS)
    one_of("trainer.strategy", t.strategy, STRATEGIES)
    need(t.num_nodes >= 1, "trainer.num_nodes", t.num_nodes, "must be >= 1")
    need(t.devices == "auto" or str(t.devices).isdigit() and int(t.devices) >= 1 or isinstance(t.devices, list | tuple)
         or not isinstance(t.devices, int | str), "trainer.devices", t.devices, "a positive integer, a list or 'auto'")
    need(t.gradient_clip_val is None or t.gradient_clip_val >= 0, "trainer.gradient_clip_val", t.gradient_clip_val,
         "must be >= 0 (0 disables clipping)")
    need(t.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches", t.accumulate_grad_batches, "must be >= 1")
    need(t.checkpoint_every_n_steps >= 1, "trainer.checkpoint_every_n_steps", t.checkpoint_every_n_steps, "must be >= 1")
    need(t.log_every_n_steps >= 1, "trainer.log_every_n_steps", t.log_every_n_steps, "must be >= 1")
    need(t.time_budget is None or t.time_budget > 0, "trainer.time_budget", t.time_budget,
         "seconds of training for the whole run, > 0 (null: train every stage for its max_steps)")
    from benchmarks.stage_pool import parallel_mode

    need(parallel_mode(t.parallel_stages) is not None, "trainer.parallel_stages", t.parallel_stages,
         "choose one of auto, true (on), false (off)")
    if parallel_mode(t.parallel_stages) == "on":
        need(not t.time_budget, "trainer.parallel_stages", t.parallel_stages, "stages side by side cannot share a "
             "time budget (its stages split it one after another): set trainer.parallel_stages=auto or false")
        need(t.strategy == "auto" and str(t.devices) == "1" and t.num_nodes == 1, "trainer.parallel_stages",
             t.parallel_stages, "stages side by side run on one machine's CPU cores in one training process each: "
             "with several devices or a DDP strategy set trainer.parallel_stages=auto or false")
    need(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", list(o.betas), "two values in [0, 1)")
    need(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    need(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    need(0 <= o.ema_decay < 1, "optim.ema_decay", o.ema_decay, "in [0, 1) (0 disables EMA)")
    one_of("optim.lr_decay", o.lr_decay, ("none", "linear", "cosine"))
    need(0 <= o.lr_decay_start < 1, "optim.lr_decay_start", o.lr_decay_start, "a fraction of each stage, in [0, 1)")
    for at in DIFFUSION_CONFIGS:  # every diffusion config a method has
        gamma = OmegaConf.select(cfg, f"{at}.min_snr_gamma")
        need(gamma is None or gamma >= 0, f"{at}.min_snr_gamma", gamma, ">= 0 (0: the plain loss)")
        shift = OmegaConf.select(cfg, f"{at}.snr_shift")
        need(shift is None or shift > 0, f"{at}.snr_shift", shift, "> 0 (1: the schedule as named; 2: SNR / 4)")
    for at in UNET_CONFIGS:  # every lean UNet a method has
        unet = OmegaConf.select(cfg, at)
        levels = list(unet.get("temporal_attention") or []) if unet is not None else []
        need(all(isinstance(lv, int) and 0 <= lv < len(unet.channels) for lv in levels), f"{at}.temporal_attention",
             levels, f"levels from 0 (full resolution) to {len(unet.channels) - 1 if unet is not None else 0}")
    need(cfg.data.batch_size >= 1, "data.batch_size", cfg.data.batch_size, "must be >= 1")
    need(cfg.data.num_workers >= 0, "data.num_workers", cfg.data.num_workers, "must be >= 0")
    for stage in (s for s in METHODS[cfg.method.name].stages if s in cfg.stages):  # a stage's own overrides
        st = stage_settings(cfg, stage)
        where = f"stages.{stage}"
        need(st["max_steps"] > 0, f"{where}.max_steps", st["max_steps"], "must be a positive number of optimiser steps")
        need(st["lr"] > 0, f"{where}.lr", st["lr"], "must be > 0")
        need(st["batch_size"] >= 1, f"{where}.batch_size", st["batch_size"], "must be >= 1")
        need(0 <= st["ema_decay"] < 1, f"{where}.ema_decay", st["ema_decay"], "in [0, 1) (0 disables EMA)")
    need(s.num_videos >= 1, "sample.num_videos", s.num_videos, "must be >= 1 (the run writes its samples)")
    need(s.steps >= 1, "sample.steps", s.steps, "must be >= 1")
    need(s.batch_size >= 1, "sample.batch_size", s.batch_size, "must be >= 1")
    need(0 <= s.eta <= 1, "sample.eta", s.eta, "in [0, 1] (0 deterministic DDIM, 1 DDPM-like)")
    need(s.guidance >= 0, "sample.guidance", s.guidance, "must be >= 0")
    need(s.fps >= 1, "sample.fps", s.fps, "must be >= 1")
    unknown = [m for m in e.metrics if m not in METRICS]
    need(not unknown, "eval.metrics", list(e.metrics), f"unknown {unknown}; choose from {list(METRICS)}")
    one_of("eval.covariance", e.covariance, COVARIANCES)
    from evaluation.frechet import MATRIX_SQRTS

    one_of("eval.matrix_sqrt", e.matrix_sqrt, MATRIX_SQRTS)
    need(e.detector_options.i3d_bn_eps > 0, "eval.detector_options.i3d_bn_eps", e.detector_options.i3d_bn_eps,
         "must be > 0 (1e-3: the TF/Sonnet network; 1e-5: every codebase that runs i3d_pretrained_400.pt)")
    for key in ("detector", "is_detector", "clip_detector"):
        one_of(f"eval.{key}", getattr(e, key), tuple(DETECTORS))
    one_of("eval.real_split", e.real_split, ("train", "val", "test"))
    need(e.batch_size >= 1, "eval.batch_size", e.batch_size, "must be >= 1")
    need(e.num_real >= 2, "eval.num_real", e.num_real, "at least 2 real clips for a covariance")
    if e.metrics:
        need(e.num_samples >= 2, "eval.num_samples", e.num_samples, "at least 2 generated videos for a covariance")
        if "is" in e.metrics:
            need(e.num_samples >= e.is_splits, "eval.num_samples", e.num_samples,
                 f"the Inception Score splits the videos into eval.is_splits={e.is_splits} parts: give at least that many")
        world = world_size(cfg)
        if world is not None:
            need(e.num_samples >= world, "eval.num_samples", e.num_samples,
                 f"smaller than the {world} processes generating them (trainer.devices x trainer.num_nodes)")
    need(e.is_splits >= 1, "eval.is_splits", e.is_splits, "must be >= 1")
    need(cfg.dataset.frames >= 1 and cfg.dataset.resolution >= 1, "dataset.frames/resolution",
         (cfg.dataset.frames, cfg.dataset.resolution), "must be positive")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def check_writable(path: str | Path, key: str) -> None:
    """The file `path` (config key `key`) can be created or appended to; raise ConfigError saying why not."""
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{key}={path}: cannot create its folder {folder}: {e.strerror}") from None
    if path.exists():
        ok = path.is_file() and os.access(path, os.W_OK)
    else:
        ok = os.access(folder, os.W_OK | os.X_OK)
    if not ok:
        raise ConfigError(f"{key}={path} is not writable; give a writable path ({key}=...)")


def open_detectors(cfg: DictConfig, dm, method) -> dict:
    """Open every detector file the evaluation will use (a missing file fails here, naming the config key)."""
    from evaluation.protocol import load_detectors, plan

    if not cfg.eval.metrics:
        return {}
    metrics, _ = plan(cfg.eval, dm, method.has_autoencoder)
    return load_detectors(cfg.eval, [*metrics, "fvd"], torch.device("cpu"))


@dataclasses.dataclass
class StagePlan:
    stage: str
    status: str  # "train", "done" (in the run folder), "cached" (a shared stage's weights exist)
    steps: int
    batch_size: int
    params: int
    step_seconds: float | None = None  # forward + backward of one batch in the dry pass, frozen encoders running
    data_seconds: float = 0.0  # loading that batch (on the critical path with data.num_workers=0)
    measured_batch: int | None = None  # the dry pass's batch (check_batch may cap it)
    cached_seconds: float | None = None  # the same step reading the frozen encoders' outputs from the encoding cache
    miss_share: float = 1.0  # of the stage's encodings, the share expected to miss the cache (`miss_share`)

    @property
    def mean_step_seconds(self) -> float | None:
        """Forward + backward of one batch over the stage: encoding steps and cached steps in their expected mix."""
        if self.cached_seconds is None or not self.step_seconds:
            return self.step_seconds
        return self.cached_seconds + self.miss_share * max(0.0, self.step_seconds - self.cached_seconds)

    @property
    def estimate(self) -> float:
        """steps x seconds per step, extrapolated linearly in the batch when the dry pass used a smaller one."""
        if self.status != "train" or not self.step_seconds:
            return 0.0
        scale = self.batch_size / (self.measured_batch or self.batch_size)
        return self.steps * (self.mean_step_seconds + self.data_seconds) * scale


def miss_share(draws: int, items: int, covered: float, kept: float) -> tuple[float, float]:
    """(share of a stage's encodings that miss the encoding cache, share of the items cached after the stage).

    draws: items the stage trains on (steps x batch); items: the training set's size; covered: the share of the
    items already cached when the stage starts, the first ones of an epoch (the stage before it encoded them through
    the same frozen encoder, and every stage's loader draws the items in the same order: the run's seed); kept: the
    share of an epoch's encodings the cache can hold. A first pass over the items encodes every item not yet
    cached; later passes read back what the cache kept. An item is assumed to give the same rows every epoch (fixed
    clip windows, no random crops, as the embedded data): with random crops every step encodes, and the mean step
    is the dry pass's `step_seconds`.
    """
    if draws <= 0 or items <= 0:
        return 1.0, covered
    first = min(draws, items)
    misses = max(0.0, first - covered * items) + (draws - first) * (1.0 - kept)
    return misses / draws, min(kept, max(covered, first / items))


@dataclasses.dataclass
class Plan:
    stages: list[StagePlan]
    sample_step_seconds: float  # one sampling step at batch 1
    sample_model_steps: int  # denoiser evaluations per video (every model's steps)
    num_videos: int  # sampled for samples/ plus for evaluation
    check_seconds: float = 0.0

    @property
    def train_estimate(self) -> float:
        return sum(s.estimate for s in self.stages)

    @property
    def sample_estimate(self) -> float:
        return self.sample_step_seconds * self.sample_model_steps * self.num_videos

    def table(self) -> str:
        lines = [f"{'stage':<22}{'status':<9}{'steps':>8}{'batch':>7}{'params':>10}{'s/step':>11}{'data s':>8}"
                 f"{'estimate':>11}"]
        for s in self.stages:
            step = f"{s.mean_step_seconds:.3f}" if s.step_seconds else "-"
            if s.step_seconds and s.measured_batch != s.batch_size:
                step += f"@{s.measured_batch}"
            data = f"{s.data_seconds:.3f}" if s.step_seconds else "-"
            est = _duration(s.estimate) if s.status == "train" else "-"
            lines.append(f"{s.stage:<22}{s.status:<9}{s.steps:>8}{s.batch_size:>7}{s.params / 1e6:>9.2f}M{step:>11}"
                         f"{data:>8}{est:>11}")
        for s in self.stages:
            if s.status == "train" and s.cached_seconds is not None:
                lines.append(f"{s.stage}: {s.step_seconds:.3f} s a step encoding through its frozen encoder, "
                             f"{s.cached_seconds:.3f} s reading the encoding cache; {s.miss_share:.0%} of its steps "
                             "expected to encode (s/step above: the mix)")
        lines.append(f"training, estimated: {_duration(self.train_estimate)} (steps x (forward + backward + loading of "
                     f"one batch); optimiser and logging not included)")
        lines.append(f"sampling, rough: {_duration(self.sample_estimate)} ({self.num_videos} videos x "
                     f"{self.sample_model_steps} denoiser steps x {self.sample_step_seconds:.3f} s at batch 1)")
        lines.append(f"checks took {self.check_seconds:.1f} s")
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _one_batch(dm, batch_size: int, seed: int):
    loader = dm.loader_for("train", shuffle=False, drop_last=False, batch_size=batch_size, seed=seed)
    return next(iter(loader))


def _time_loss(method, stage: str, batch, autocast: bool, device, warm_up: bool = True) -> tuple[float, int]:
    """(seconds of one forward + backward of `stage`'s loss, calls made): the best of two calls after a warm-up
    call (the first call builds the kernels and can take 10x a step); a single call when even that one is slow.
    warm_up=False: the kernels are built already (the stage was timed before), the best of two calls (one when
    slow)."""
    trainable = {id(p) for p in method.stage_parameters(stage)}
    for p in method.parameters():
        p.requires_grad_(id(p) in trainable)
    best = float("inf")
    calls = 0
    try:
        for attempt in range(0 if warm_up else 1, 3):
            calls += 1
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = method.loss(stage, batch)["loss"]
            if not torch.isfinite(loss.detach()).all():
                raise ValueError(f"the first loss is {float(loss)} before any training: check the data and the "
                                 "method's settings")
            loss.backward()
            best = min(best, time.perf_counter() - t0)
            if best > 30.0 and (attempt == 0 or not warm_up):  # paper-scale steps on a CPU: one call is the measure
                break
            if attempt == 0:
                best = float("inf")  # the warm-up call does not count
    finally:
        for p in method.parameters():
            p.grad = None
            p.requires_grad_(True)
    return best, calls


@torch.no_grad()
def _time_sampling(cfg: DictConfig, method, dm, autocast: bool, device) -> tuple[float, int]:
    """(seconds of one 1-step sampling call at batch 1, denoiser steps per video at the configured settings)."""
    from benchmarks.common import real_conditioning

    cond = real_conditioning(dm, 1, "val", first_frame=method.image_to_video).to(device)
    sampling = getattr(getattr(method, "cfg", None), "sampling", None)  # a method's own per-model step counts
    step_fields = [f.name for f in dataclasses.fields(sampling)] if dataclasses.is_dataclass(sampling) else []
    step_fields = [f for f in step_fields if f.endswith("_steps")]
    configured = {f: getattr(sampling, f) for f in step_fields}
    model_steps = sum(v or cfg.sample.steps for v in configured.values()) if step_fields else cfg.sample.steps
    for f in step_fields:
        setattr(sampling, f, 1)
    try:
        g = torch.Generator(device=device).manual_seed(0)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            video = method.sample(1, cond, steps=1, guidance=cfg.sample.guidance, generator=g, eta=cfg.sample.eta)
        seconds = time.perf_counter() - t0
    finally:
        for f, v in configured.items():
            setattr(sampling, f, v)
    expected = (1, *method.data.video_shape) if hasattr(method, "data") else None
    if expected is not None and tuple(video.shape) != expected:
        raise ValueError(f"sampling returned shape {tuple(video.shape)}, expected {expected}")
    return seconds / max(1, len(step_fields)), model_steps


def _time_encoding(cfg: DictConfig, method, dm, stage: str, batch, plan: StagePlan, seen: tuple[int, int] | None,
                   calls: int, carried: float | None, autocast: bool) -> float | None:
    """When `stage`'s loss read a frozen encoder through the encoding cache, the timed calls after the first read
    back the first call's encodings: a step of a later epoch. Time the step again with the cache off (a first
    epoch's step: plan.step_seconds; the cached one becomes plan.cached_seconds) and set the stage's expected
    share of encoding steps (plan.miss_share). Returns what the next stage inherits: the share of the items
    cached, or None when this stage did not use the cache."""
    cache = method.encoding_cache
    if seen is None or cache.hits + cache.misses == sum(seen):
        return None
    hits, fresh = cache.hits - seen[0], cache.misses - seen[1]  # fresh == 0: an earlier stage encoded these rows
    plan.cached_seconds = plan.step_seconds
    method.encoding_cache = None
    try:
        plan.step_seconds, _ = _time_loss(method, stage, batch, autocast, method.device, warm_up=False)
    finally:
        method.encoding_cache = cache
    per_item = (hits + fresh) / calls / len(batch)
    covered = carried if carried is not None and fresh == 0 else 0.0
    row_bytes = cache.bytes / max(1, len(cache.rows))
    items = len(dm.dataset("train")) // (world_size(cfg) or 1)
    kept = min(1.0, cache.max_bytes / max(1.0, row_bytes * per_item * items)) if cache.rows else 0.0
    plan.miss_share, covered = miss_share(plan.steps * plan.batch_size, items, covered, kept)
    return covered


def dry_pass(cfg: DictConfig, method, dm, status: dict[str, str], max_batch: int | None = None) -> Plan:
    """One loss step per stage still to train and one sampling step at batch 1, timed; nothing is stored.

    status: {stage: "train" | "done" | "cached"} (what `benchmarks.run` will do with each stage).
    max_batch: cap the dry pass's batch (the estimate is then extrapolated linearly to the configured batch).
    Errors name the stage; the method is left as it was: no optimiser step, and every buffer restored (a loss
    call in training mode moves BatchNorm statistics and the PatchGAN's step counter, whose `gan.start` a run
    that had a dry pass would otherwise reach earlier than the same run resumed, or `benchmarks.probe_methods
    ae-seeds`).
    """
    was_training = method.training
    buffers = {name: b.detach().clone() for name, b in method.named_buffers()}
    try:
        return _dry_pass(cfg, method, dm, status, max_batch)
    finally:
        with torch.no_grad():
            for name, b in method.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        method.train(was_training)


def _dry_pass(cfg: DictConfig, method, dm, status: dict[str, str], max_batch: int | None) -> Plan:
    t0 = time.perf_counter()
    device = method.device
    autocast = str(cfg.trainer.precision).startswith("bf16")
    method.train()
    stages = []
    cache = getattr(method, "encoding_cache", None)
    carried = None  # the share of the items cached after the stage before, when it read the cache
    for stage in method.stages:
        st = stage_settings(cfg, stage)
        plan = StagePlan(stage, status[stage], st["max_steps"], st["batch_size"], method.num_parameters(stage))
        if plan.status == "train":
            try:
                plan.measured_batch = min(st["batch_size"], max_batch or st["batch_size"])
                t_data = time.perf_counter()
                batch = _one_batch(dm, plan.measured_batch, cfg.seed).to(device)
                plan.data_seconds = time.perf_counter() - t_data if cfg.data.num_workers == 0 else 0.0
                seen = (cache.hits, cache.misses) if cache is not None else None
                plan.step_seconds, calls = _time_loss(method, stage, batch, autocast, device)
                carried = _time_encoding(cfg, method, dm, stage, batch, plan, seen, calls, carried, autocast)
            except Exception as e:
                raise RuntimeError(f"dry pass: stage {stage!r} fails before training ({type(e).__name__}: {e}); "
                                   f"shape: dataset.resolution={cfg.dataset.resolution}, "
                                   f"dataset.frames={cfg.dataset.frames}") from e
        else:
            carried = None  # a stage loaded from disk encodes nothing in this process
        stages.append(plan)
    method.eval()
    try:
        step, model_steps = _time_sampling(cfg, method, dm, autocast, device)
    except Exception as e:
        raise RuntimeError(f"dry pass: sampling fails ({type(e).__name__}: {e})") from e
    n = cfg.sample.num_videos + (cfg.eval.num_samples if cfg.eval.metrics else 0)
    return Plan(stages, step, model_steps, n, time.perf_counter() - t0)
