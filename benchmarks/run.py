"""Train every stage of one method on one dataset, sample, score, and append one results row.

    python -m benchmarks.run                                  # default method on the embedded shapes data
    python -m benchmarks.run method=vdm dataset=shapes trainer.max_steps=200
    python -m benchmarks.run method=cmd dataset=ucf101 dataset.root=/data/UCF-101 scale=paper

Re-running with `run_dir=<folder>` resumes: finished stages are loaded, an interrupted
stage continues from its `last.ckpt`. A run appends its row only once it completes.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
import warnings
import zipfile
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from benchmarks.common import build_datamodule, build_method, data_spec, git_state, library_versions, real_conditioning
from benchmarks.config import ConfigError, config_hash, load_config, stage_settings, to_container
from benchmarks.efficiency import sample_gflops
from benchmarks.results import append_row

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
    if stage not in shared:
        return None
    key = {"stage": stage, "module": method.shared_stage_config(stage), "dataset": to_container(cfg.dataset),
           "train": settings, "precision": cfg.trainer.precision, "seed": cfg.seed}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cfg.cache_dir) / "shared_stages" / f"{stage}-{digest}.pt"


def train_stages(cfg: DictConfig, method, dm, run_dir: Path) -> dict:
    """Train (or load) every stage in order; returns per-stage records."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.trainer.states import TrainerStatus

    from lightning_modules.system import EMA, StageSystem

    records = {}
    for stage in method.stages:
        settings = stage_settings(cfg, stage)
        stage_dir = run_dir / "checkpoints" / stage
        final = stage_dir / "final.pt"
        shared = getattr(method, "shared_stages", {})
        cache = shared_stage_cache(cfg, method, stage, settings)
        rec = {"steps": settings["max_steps"], "params": method.num_parameters(stage), "source": "trained"}
        if final.exists():
            method.load_state_dict(torch.load(final, map_location="cpu", weights_only=True))
            records[stage] = {**rec, **json.loads((stage_dir / "record.json").read_text()), "source": "run folder"}
            print(f"[{stage}] already trained in {stage_dir}; loaded")
            continue
        if cache is not None and cache.exists():
            getattr(method, shared[stage]).load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
            records[stage] = {**rec, "seconds": 0.0, "source": f"cache {cache}"}
            print(f"[{stage}] loaded shared weights from {cache}")
            _save_stage(method, stage_dir, records[stage])
            continue
        if hasattr(method, "on_stage_start"):
            method.on_stage_start(stage)
        L.seed_everything(cfg.seed + 1000 * method.stages.index(stage), workers=True, verbose=False)
        system = StageSystem(method, stage, lr=settings["lr"], betas=tuple(settings["betas"]),
                             weight_decay=cfg.optim.weight_decay, warmup_steps=cfg.optim.warmup_steps)
        every = max(1, min(settings["max_steps"], cfg.trainer.checkpoint_every_n_steps))
        callbacks = [ModelCheckpoint(dirpath=str(stage_dir), save_last=True, save_top_k=0, every_n_train_steps=every)]
        if settings["ema_decay"] > 0:
            callbacks.append(EMA(settings["ema_decay"], cfg.optim.ema_start_step))
        trainer = _trainer(cfg, stage, settings["max_steps"], run_dir, callbacks)
        loader = dm.loader_for("train", shuffle=True, drop_last=True, batch_size=settings["batch_size"], seed=cfg.seed)
        if cfg.trainer.strategy == "ddp_spawn":
            _drop_generators(loader)
        last = _usable_checkpoint(stage_dir / "last.ckpt")
        print(f"[{stage}] training {rec['params'] / 1e6:.2f}M parameters for {settings['max_steps']} steps"
              + (f" (resuming from {last})" if last.exists() else ""))
        t0 = time.perf_counter()
        trainer.fit(system, train_dataloaders=loader, ckpt_path=str(last) if last.exists() else None)
        seconds = time.perf_counter() - t0
        # under ddp_spawn the loop counters stay in the workers; only weights, state and metrics come back
        steps_done = settings["max_steps"] if cfg.trainer.strategy == "ddp_spawn" else trainer.global_step
        if trainer.state.status != TrainerStatus.FINISHED or steps_done < settings["max_steps"]:
            raise RuntimeError(f"stage {stage!r} stopped at step {trainer.global_step} of {settings['max_steps']} "
                               f"(interrupted?); re-run with run_dir={run_dir} to resume")
        loss = trainer.callback_metrics.get(f"{stage}/loss")
        records[stage] = {**rec, "seconds": seconds, "step_seconds": seconds / max(1, settings["max_steps"]),
                          "final_loss": float(loss) if loss is not None else None}
        if trainer.is_global_zero:
            _save_stage(method, stage_dir, records[stage])
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                _atomic_save(getattr(method, shared[stage]).state_dict(), cache)
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


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _save_stage(method, stage_dir: Path, record: dict) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / f"record.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(record, default=str))
    os.replace(tmp, stage_dir / "record.json")
    _atomic_save(method.state_dict(), stage_dir / "final.pt")  # written last: its presence marks the stage done


def sample_videos(cfg: DictConfig, method, dm, n: int, seed: int) -> tuple[torch.Tensor, object, float]:
    """n videos (n, C, T, H, W) conditioned like the real val set; returns (videos, cond, seconds per video)."""
    from tqdm.auto import tqdm

    cond = real_conditioning(dm, n, "val", first_frame=method.image_to_video)
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


def write_samples(videos: torch.Tensor, cond, out_dir: Path, fps: int, class_names: list[str]) -> Path:
    """samples/<i>.mp4 (libx264 yuv420p) and a PNG grid (one row per video, 8 frames across)."""
    from datamodules.video_io import write_video
    from evaluation.detectors import quantize
    from evaluation.grid import save_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    u8 = quantize(videos)  # (N, C, T, H, W) uint8, the evaluator's own rounding: one rule in the project
    for i, v in enumerate(u8):
        name = f"{i:03d}"
        if cond.label is not None and class_names:
            name += f"-{class_names[int(cond.label[i])]}"
        write_video(out_dir / f"{name}.mp4", v.permute(1, 2, 3, 0).numpy(), fps=fps)
    captions = cond.text if cond.text is not None else (
        [class_names[int(lbl)] for lbl in cond.label] if cond.label is not None and class_names else None)
    return save_grid(u8, out_dir / "grid.png", captions=captions)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return {}
    try:
        cfg = load_config(argv)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*predict_dataloader.*|.*val_dataloader.*")
    import lightning as L

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir = make_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    OmegaConf.save(cfg, run_dir / "config.yaml")
    t_start = time.perf_counter()
    try:
        dm = build_datamodule(cfg)
        dm.setup("fit")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    method = build_method(cfg, data_spec(cfg, dm))
    print(f"run folder: {run_dir}\nmethod {cfg.method.name} ({method.num_parameters() / 1e6:.2f}M parameters), "
          f"dataset {cfg.dataset.name} ({len(dm.dataset('train'))} train clips), scale {cfg.scale}")
    stages = train_stages(cfg, method, dm, run_dir)

    is_zero = int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0
    metrics: dict = {}
    sample_seconds = None
    if is_zero:
        n = cfg.sample.num_videos
        videos, cond, sample_seconds = sample_videos(cfg, method, dm, n, cfg.seed)
        grid = write_samples(videos, cond, run_dir / "samples", cfg.sample.fps, dm.class_names)
        _log_grid(run_dir, grid)
        print(f"wrote {n} samples and {grid} ({sample_seconds:.2f} s per video)")
    if cfg.eval.metrics:
        from evaluation.protocol import evaluate_run

        metrics = evaluate_run(cfg, method, dm, run_dir)
    wall = time.perf_counter() - t_start
    row = results_row(cfg, method, dm, stages, metrics, sample_seconds, wall, run_dir)
    if is_zero:
        (run_dir / "metrics.json").write_text(json.dumps(row, indent=2, default=str))
        append_row(cfg.results, row)
        print(summary_line(row))
    return row


def _log_grid(run_dir: Path, grid: Path) -> None:
    """The sample grid as an image in TensorBoard (add_video is silently broken with moviepy 2)."""
    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir / "tensorboard" / "samples")) as w:
        w.add_image("samples/grid", np.asarray(Image.open(grid).convert("RGB")), dataformats="HWC")


def results_row(cfg, method, dm, stages: dict, metrics: dict, sample_seconds, wall: float, run_dir: Path) -> dict:
    ds = cfg.dataset
    return {
        "method": cfg.method.name, "dataset": ds.name, "scale": cfg.scale, "tag": cfg.tag, "seed": cfg.seed,
        "resolution": ds.resolution, "frames": ds.frames, "stride": ds.stride,
        "sampler": cfg.method.diffusion.sampler if "diffusion" in cfg.method else None,
        "steps": cfg.sample.steps, "guidance": cfg.sample.guidance, "eta": cfg.sample.eta,
        # a method's own per-model sampler settings (e.g. CMD's content/motion steps and guidance) override the above
        "method_sampling": to_container(cfg.method.sampling) if "sampling" in cfg.method else None,
        "ema": cfg.optim.ema_decay > 0, "ema_decay": cfg.optim.ema_decay, "precision": cfg.trainer.precision,
        "params": method.num_parameters(), "stage_params": {s: r["params"] for s, r in stages.items()},
        "train_seconds": sum(r.get("seconds", 0.0) for r in stages.values()),
        "stage_seconds": {s: r.get("seconds") for s, r in stages.items()},
        "stage_steps": {s: r["steps"] for s, r in stages.items()},
        "sample_seconds_per_video": sample_seconds, "wall_seconds": wall,
        "gflops_per_video": sample_gflops(cfg, dm),  # every sampling step and the decoder (benchmarks.efficiency)
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "skipped_videos": sum(dm.dataset(s).skipped for s in dm._datasets),
        **metrics,
        "config_sha256": config_hash(cfg), "run_dir": str(run_dir), "time": datetime.now().isoformat(timespec="seconds"),
        **git_state(), "versions": library_versions(), "config": to_container(cfg),
    }


def summary_line(row: dict) -> str:
    keys = [k for k in ("fvd", "is", "clipsim", "cond_acc", "rfvd") if row.get(k) is not None]
    scores = " ".join(f"{k}={row[k]:.3g}" for k in keys) or "no metrics (eval.metrics is empty)"
    return (f"{row['method']} on {row['dataset']}: {scores} | train {row['train_seconds']:.0f}s, "
            f"sampling {row['sample_seconds_per_video'] or 0:.2f}s/video, wall {row['wall_seconds']:.0f}s | {row['run_dir']}")


if __name__ == "__main__":
    main()
