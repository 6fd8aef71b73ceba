"""Helpers shared by the command-line entry points: building objects from a run config, provenance."""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

import torch
from omegaconf import DictConfig

from datamodules.base import LoaderConfig, VideoDataModule
from methods import METHODS
from methods.base import Conditioning, DataSpec, VideoGenerator

REPO = Path(__file__).resolve().parent.parent


def build_datamodule(cfg: DictConfig) -> VideoDataModule:
    loader = LoaderConfig(**cfg.data) if not isinstance(cfg.data, LoaderConfig) else cfg.data
    return VideoDataModule(cfg.dataset, loader)


def data_spec(cfg: DictConfig, dm: VideoDataModule) -> DataSpec:
    ds = cfg.dataset
    return DataSpec(channels=ds.channels, frames=ds.frames, height=ds.resolution, width=ds.resolution,
                    num_classes=dm.num_classes, captions=dm.has_captions)


def build_method(cfg: DictConfig, spec: DataSpec) -> VideoGenerator:
    from omegaconf import OmegaConf

    cls = METHODS[cfg.method.name]
    method_cfg = OmegaConf.to_object(cfg.method)  # the method's own dataclass, fully typed
    return cls(method_cfg, spec)


def real_conditioning(dm: VideoDataModule, n: int, split: str = "val", first_frame: bool = False) -> Conditioning:
    """Conditions drawn from the first n real clips of `split` (labels/captions as the real set has them)."""
    ds = dm.dataset(split)
    items = [ds[i % len(ds)] for i in range(n)]
    label = torch.tensor([it["label"] for it in items]) if all(it.get("label", -1) >= 0 for it in items) else None
    text = [it["text"] for it in items] if all(it.get("text") is not None for it in items) else None
    ff = torch.stack([it["video"][:, 0] for it in items]) if first_frame else None
    return Conditioning(label=label, text=text, first_frame=ff)


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
