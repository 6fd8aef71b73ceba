"""The evaluation protocol end to end: real-statistics cache, evaluate_method, DDP sharding, the callback, the CLI."""

from __future__ import annotations

import json
import os
import socket
import zlib

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from datamodules.base import VideoDataModule
from datamodules.shapes import BACKGROUNDS, COLORS, MOTION_PHRASES, MOTIONS, SHAPES, ShapesConfig, render
from evaluation.config import EvalConfig
from evaluation.detectors import load_detector
from evaluation.distributed import shard
from evaluation.protocol import evaluate_method, plan
from evaluation.real_stats import load_or_compute_real_set
from methods.base import VideoGenerator

FRAMES, RES = 16, 32


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on a shared CPU
    yield
    torch.set_num_threads(threads)


def small_shapes() -> ShapesConfig:
    return ShapesConfig(frames=FRAMES, resolution=RES, train_size=48, val_size=16, test_size=16)


def run_cfg(tmp_path, **eval_kw) -> OmegaConf:
    ecfg = EvalConfig(**{"num_samples": 20, "num_real": 40, "batch_size": 8, **eval_kw})
    return OmegaConf.create({"eval": OmegaConf.structured(ecfg), "seed": 0, "cache_dir": str(tmp_path / "cache"),
                             "trainer": {"precision": "32-true"}, "method": {"name": "oracle"},
                             "sample": {"steps": 3, "guidance": 1.5, "eta": 0.0}})


class ShapesOracle(VideoGenerator):
    """Renders the clip its caption describes (position and size from a hash of the caption): a near-perfect,
    generator-independent model, so every sharding of the same indices yields the same videos."""

    stages = ("none",)

    def __init__(self) -> None:
        super().__init__(data=None)
        self.dummy = nn.Parameter(torch.zeros(()))

    @staticmethod
    def attributes(text: str) -> dict:
        words = text.split()
        phrase = " ".join(words[3:-4])
        motion = next(MOTIONS.index(m) for m, p in MOTION_PHRASES.items() if p == phrase)
        u = torch.rand(7, generator=torch.Generator().manual_seed(zlib.crc32(text.encode()))).tolist()
        return {"label": motion, "shape": SHAPES.index(words[2]), "color": list(COLORS).index(words[1]),
                "background": list(BACKGROUNDS).index(words[-2]), "size": 0.16 + 0.08 * u[0], "x": u[1], "y": u[2],
                "phase": u[3], "angle": u[4], "grad_angle": 6.28 * u[5], "speed": 0.8 + 0.4 * u[6]}

    @torch.no_grad()
    def sample(self, n, cond, *, steps, guidance, generator=None, eta=0.0):
        return torch.stack([render(self.attributes(t), FRAMES, RES) for t in cond.text])

    def reconstruct(self, video):
        return video.clone()


def test_shards_cover_every_index_once():
    for n in (7, 20, 33):
        for world in (1, 2, 3, 4):
            got = [i for r in range(world) for i in shard(n, r, world)]
            assert got == list(range(n))


def test_real_stats_cache_is_keyed_by_protocol(tmp_path):
    dm = VideoDataModule(small_shapes())
    det = load_detector("shapes")
    ds = dm.dataset("train")
    first = load_or_compute_real_set(ds, dm.dataset_cfg, "train", det, 24, 0, tmp_path, batch_size=8)
    files = list((tmp_path / "real_stats").glob("*.npz"))
    assert not first.from_cache and len(files) == 1 and first.stats.n == 24
    again = load_or_compute_real_set(ds, dm.dataset_cfg, "train", det, 24, 0, tmp_path, batch_size=8)
    assert again.from_cache and (again.stats.mu == first.stats.mu).all() and again.labels == first.labels
    assert again.texts == first.texts and len(first.texts) == 24
    assert first.labels == [ds[i]["label"] for i in range(24)]  # conditioning follows the real clips in order
    other = load_or_compute_real_set(ds, dm.dataset_cfg, "train", det, 16, 0, tmp_path, batch_size=8)
    assert not other.from_cache and len(list((tmp_path / "real_stats").glob("*.npz"))) == 2
    resized = VideoDataModule(ShapesConfig(**{**vars(small_shapes()), "resolution": 64}))
    moved = load_or_compute_real_set(resized.dataset("train"), resized.dataset_cfg, "train", det, 16, 0, tmp_path,
                                     batch_size=8)
    assert not moved.from_cache and moved.protocol["resolution"] == 64


def test_plan_skips_what_does_not_apply():
    dm = VideoDataModule(small_shapes())
    metrics, skipped = plan(EvalConfig(), dm, has_autoencoder=False)
    assert "rfvd" in skipped and "rfvd" not in metrics and {"fvd", "is", "clipsim", "cond_acc"} <= set(metrics)
    with pytest.raises(ValueError, match="unknown metric"):
        plan(EvalConfig(metrics=["fvd", "kid"]), dm)


def test_evaluate_method_scores_an_oracle_and_records_the_protocol(tmp_path):
    dm = VideoDataModule(small_shapes())
    out = evaluate_method(ShapesOracle(), dm, run_cfg(tmp_path))
    assert out["cond_acc"] == 1.0  # the oracle renders the conditioned motion
    per_class, confusion = out["cond_acc_per_class"], out["cond_confusion"]
    assert list(per_class) == list(dm.class_names) == confusion["rows"] == confusion["columns"][:-1]
    counts = torch.tensor(confusion["counts"])
    assert counts.shape == (len(MOTIONS), len(MOTIONS) + 1) and int(counts.sum()) == out["n_gen"]
    assert all(a in (1.0, None) for a in per_class.values()) and int(counts.trace()) == out["n_gen"]
    assert out["clipsim"] > 0.5
    assert out["rfvd"] == pytest.approx(0.0, abs=1e-6) and out["n_rec"] == 20  # identity "autoencoder"
    assert 0 < out["fvd"] and 1 < out["is"] <= len(MOTIONS)
    det = load_detector("shapes")
    assert out["detector"] == "shapes" and out["detector_sha256"] == det.sha256 == out["is_detector_sha256"]
    assert (out["n_gen"], out["n_real"], out["frames"], out["resolution"]) == (20, 40, FRAMES, RES)
    assert (out["covariance"], out["steps"], out["guidance"], out["eval_seed"]) == ("biased", 3, 1.5, 0)
    assert out["skipped_metrics"] == {} and out["real_stats_cached"] is False
    again = evaluate_method(ShapesOracle(), dm, run_cfg(tmp_path))
    assert again["real_stats_cached"] is True and again["fvd"] == pytest.approx(out["fvd"], rel=1e-9)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, tmp: str) -> None:
    from pathlib import Path

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = evaluate_method(ShapesOracle(), VideoDataModule(small_shapes()), run_cfg(Path(tmp) / "ddp", num_samples=21))
        if rank == 0:
            (Path(tmp) / "ddp.json").write_text(json.dumps(out))
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_ddp_evaluation_equals_one_process(tmp_path):
    """21 videos over 2 ranks (10 + 11: no padding duplicates); real statistics computed sharded too."""
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert ddp["eval_world_size"] == 2 and ddp["n_gen"] == 21 and ddp["real_stats_cached"] is False
    # the same 21 generated videos (the oracle ignores the generator) and the same 40 real clips
    single = evaluate_method(ShapesOracle(), VideoDataModule(small_shapes()), run_cfg(tmp_path / "one", num_samples=21))
    assert single["eval_world_size"] == 1
    for key in ("fvd", "is", "is_std", "cond_acc", "clipsim", "rfvd"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-6, abs=1e-9), key
