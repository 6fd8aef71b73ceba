"""Helpers shared by the command-line entry points: building objects from a run config, provenance."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from datamodules.base import LoaderConfig, VideoDataModule
from methods import METHODS
from methods.base import Conditioning, DataSpec, VideoGenerator

REPO = Path(__file__).resolve().parent.parent


def chosen_methods(names: list[str] | None) -> list[str]:
    """A benchmark's `methods=a,b` (None: every registered method), refused with the registered names if unknown."""
    methods = names or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; registered: {', '.join(METHODS)}")
    return methods


def benchmark_cli(argv: list[str] | None, usage: str, parse) -> tuple[dict, list[str], list[str]] | None:
    """The start of a per-method benchmark's command line: `-h` / `--help` prints `usage` and gives None; else
    (its own options, the run-config overrides, the chosen methods) from `parse(argv) -> (opts, rest)`, whose
    opts hold `methods`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        return None
    opts, rest = parse(argv)
    return opts, rest, chosen_methods(opts["methods"])


def build_datamodule(cfg: DictConfig) -> VideoDataModule:
    loader = LoaderConfig(**cfg.data) if not isinstance(cfg.data, LoaderConfig) else cfg.data
    # a method that trains on longer items than it is evaluated on says how long (PVDM: previous clip + clip)
    method = METHODS.get(cfg.method.name) if "method" in cfg else None
    frames = getattr(method, "training_frames", None)
    if frames is None:
        return VideoDataModule(cfg.dataset, loader)
    return VideoDataModule(cfg.dataset, loader, train_frames=frames(cfg.method, cfg.dataset.frames))


def data_spec(cfg: DictConfig, dm: VideoDataModule) -> DataSpec:
    ds = cfg.dataset
    return DataSpec(channels=ds.channels, frames=ds.frames, height=ds.resolution, width=ds.resolution,
                    num_classes=dm.num_classes, captions=dm.has_captions, class_names=tuple(dm.class_names))


def build_method(cfg: DictConfig, spec: DataSpec) -> VideoGenerator:
    from omegaconf import OmegaConf

    cls = METHODS[cfg.method.name]
    method_cfg = OmegaConf.to_object(cfg.method)  # the method's own dataclass, fully typed
    method = cls(method_cfg, spec)
    trainer = cfg.get("trainer") or {}
    if trainer.get("allocator", "default") != "default":
        from methods.speed import tune_allocator

        tune_allocator(trainer.get("allocator"))
    if trainer.get("channels_last"):
        from methods.speed import to_channels_last

        to_channels_last(method)
    if trainer.get("attention"):
        from methods.speed import set_attention_kernel

        set_attention_kernel(trainer.get("attention"))
    mb = float(trainer.get("encoding_cache") or 0)
    if mb < 0:
        raise ValueError(f"trainer.encoding_cache={mb}: give the cache's size in MiB, or 0 to switch it off")
    if mb > 0:
        from methods.speed import EncodingCache

        method.encoding_cache = EncodingCache(mb)
    return method


def real_conditioning(dm: VideoDataModule, n: int, split: str = "val", first_frame: bool = False,
                      clip_seed: int | None = None) -> Conditioning:
    """Conditions drawn from the first n real clips of `split` (labels/captions as the real set has them).

    clip_seed: clip i is `eval_clip(i, clip_seed)`, the same clip the evaluation protocol conditions
    image-to-video sample i on (`evaluation.protocol.held_out_conditioning`; benchmarks.run passes
    eval.clip_seed); None: the split's item i. Image-to-video first frames come from `split`: keep it
    "val" (held out) for anything that is scored.
    """
    from evaluation.protocol import clip_conditioning

    return clip_conditioning(dm.dataset(split), range(n), clip_seed, first_frame=first_frame)


def git_state() -> dict:
    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"git_commit": run("rev-parse", "HEAD") or None, "git_dirty": bool(run("status", "--porcelain"))}


def library_versions() -> dict:
    out = {}
    for name in ("torch", "lightning", "torchmetrics", "diffusers", "av", "numpy", "scipy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out
