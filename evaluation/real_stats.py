"""The real side of FVD: detector statistics of real clips, cached on disk keyed by the protocol.

The key hashes everything that changes the numbers: the dataset config (which carries
split sizes, resolution, frames, stride, root), the split, the number of clips, the clip
sampling seed, the detector's name and file sha256, and the quantisation convention. The
file `<cache_dir>/real_stats/<key>.npz` holds the Gaussian fit (float64 mean, biased
covariance, N), the protocol as JSON, and the labels / captions of the real clips in order,
so generated videos can be conditioned like the real set without decoding it again.

Real clips are `dataset.eval_clip(i, clip_seed)` for i < n_real (file datasets: one clip
per real video at a seeded random offset), sharded across DDP ranks without duplicates.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.base import VideoDataset
from evaluation.detectors import Detector
from evaluation.distributed import all_gather_objects, dist_info, shard
from evaluation.frechet import GaussianStats
from evaluation.metrics import FVD

QUANTIZATION = "x*127.5+128 clamp [0,255] uint8"  # evaluation.detectors.quantize; part of the key
CACHE_VERSION = 1


@dataclass
class RealSet:
    """Real statistics plus the conditioning of the real clips, in clip order."""

    stats: GaussianStats
    labels: list[int] | None  # None when the data is unlabelled
    texts: list[str] | None  # None when the data has no captions
    protocol: dict
    path: Path | None = None
    from_cache: bool = False


def _plain(cfg) -> dict:
    if is_dataclass(cfg):
        return asdict(cfg)
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(cfg, resolve=True)
    except ValueError:
        return dict(cfg)


def real_protocol(dataset_cfg, split: str, n_real: int, clip_seed: int, detector: Detector) -> dict:
    """Everything that determines the real statistics (hashed into the cache key)."""
    ds = _plain(dataset_cfg)
    return {"dataset": ds, "split": split, "resolution": ds.get("resolution"), "frames": ds.get("frames"),
            "stride": ds.get("stride"), "n_real": n_real, "clip_seed": clip_seed, "detector": detector.name,
            "detector_sha256": detector.sha256, "quantization": QUANTIZATION, "version": CACHE_VERSION}


def protocol_key(protocol: dict) -> str:
    return hashlib.sha256(json.dumps(protocol, sort_keys=True, default=str).encode()).hexdigest()[:24]


class EvalClips(Dataset):
    """`dataset.eval_clip(i, seed)` for the given global indices (wraps for a DataLoader)."""

    def __init__(self, dataset: VideoDataset, indices: range | list[int], seed: int) -> None:
        self.dataset, self.indices, self.seed = dataset, list(indices), seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict:
        item = self.dataset.eval_clip(self.indices[j], self.seed)
        return {"index": self.indices[j], "video": item["video"], "label": item.get("label", -1),
                "text": item.get("text")}


def _collate(items: list[dict]) -> dict:
    return {"index": torch.tensor([it["index"] for it in items]), "video": torch.stack([it["video"] for it in items]),
            "label": [it["label"] for it in items], "text": [it["text"] for it in items]}


def eval_clip_loader(dataset: VideoDataset, indices, seed: int, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Batches {"index", "video" (B, C, T, H, W) in [-1, 1], "label", "text"} of real evaluation clips."""
    return DataLoader(EvalClips(dataset, indices, seed), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=_collate)


def compute_real_set(dataset: VideoDataset, detector: Detector, n_real: int, clip_seed: int, batch_size: int,
                     num_workers: int = 0) -> tuple[GaussianStats, list[int], list[str | None]]:
    """Features of n_real real clips (sharded across ranks), their Gaussian fit and their labels / captions."""
    rank, world = dist_info()
    fvd = FVD().to(detector.device)
    mine: list[tuple[int, int, str | None]] = []
    for batch in eval_clip_loader(dataset, shard(n_real, rank, world), clip_seed, batch_size, num_workers):
        fvd.update(detector.features(batch["video"]), real=True)
        mine += list(zip(batch["index"].tolist(), batch["label"], batch["text"]))
    stats = fvd.real_stats()
    meta = sorted(m for part in all_gather_objects(mine) for m in part)  # global clip order
    return stats, [m[1] for m in meta], [m[2] for m in meta]


def load_or_compute_real_set(dataset: VideoDataset, dataset_cfg, split: str, detector: Detector, n_real: int,
                             clip_seed: int, cache_dir: str | Path | None, batch_size: int = 16,
                             num_workers: int = 0) -> RealSet:
    """The cached real statistics for this protocol, computing (and caching) them on a miss.

    n_real is capped at the split's size for procedural data that cannot repeat clips.
    cache_dir None disables the cache.
    """
    n_real = min(n_real, len(dataset)) if n_real > 0 else len(dataset)
    protocol = real_protocol(dataset_cfg, split, n_real, clip_seed, detector)
    path = Path(cache_dir) / "real_stats" / f"{protocol_key(protocol)}.npz" if cache_dir is not None else None
    if path is not None and path.exists():
        stats = GaussianStats.load(path)
        with np.load(path, allow_pickle=False) as z:
            labels = z["labels"].tolist() if "labels" in z else []
            texts = json.loads(str(z["texts"])) if "texts" in z else []
        return _real_set(stats, labels, texts, protocol, path, from_cache=True)
    stats, labels, texts = compute_real_set(dataset, detector, n_real, clip_seed, batch_size, num_workers)
    if path is not None and dist_info()[0] == 0:
        stats.save(path, protocol, extra={"labels": np.array([-1 if lbl is None else lbl for lbl in labels]),
                                          "texts": np.array(json.dumps(texts))})
    return _real_set(stats, labels, texts, protocol, path, from_cache=False)


def _real_set(stats, labels, texts, protocol, path, from_cache) -> RealSet:
    labels = [int(lbl) for lbl in labels] if labels and all(lbl is not None and lbl >= 0 for lbl in labels) else None
    texts = list(texts) if texts and all(t is not None for t in texts) else None
    return RealSet(stats, labels, texts, protocol, path, from_cache)
