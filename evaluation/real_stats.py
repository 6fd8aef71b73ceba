"""The real side of FVD: detector statistics of real clips, cached on disk keyed by the protocol.

The key hashes everything that changes the numbers: the dataset config (which carries
split sizes, resolution, frames, stride, root), the split, the number of clips, the clip
sampling seed, the detector's name and file sha256, the quantisation convention, and
(`dataset_content`) what the config does not pin down:

    content        file datasets: every kept file in dataset order (path under the root, size or
                   frame-folder entries, mtime, label, captions) and the skipped files by kind;
                   procedural data (shapes): its config is its content, plus its generator's code
    decoder        PyAV and FFmpeg library versions, Pillow's (frame folders), for file datasets
    preprocessing  sha256 of the source of the code between the file and the detector: the
                   dataset's class hierarchy, datamodules.clips / video_io (decode, crop, resize),
                   and the detector's modules (quantise, resize, network)

The file `<cache_dir>/real_stats/<key>.npz` holds the Gaussian fit (float64 mean, biased
covariance, N), the protocol as JSON, and the labels / captions of the real clips in order,
so generated videos can be conditioned like the real set without decoding it again.

Under DDP rank 0 alone fingerprints the data, looks for the file and loads it, and broadcasts
the protocol and what it found (or that it found nothing) to every rank: the ranks agree even
when each node has its own cache folder or data copy, and a miss is computed by all ranks together.

Real clips are `dataset.eval_clip(i, clip_seed)` for i < n_real (file datasets: one clip
per real video at a seeded random offset), sharded across DDP ranks without duplicates; with
`eval.real_selection=stylegan-v`, StyleGAN-V's clips instead (`evaluation.stylegan_v`, options in the key).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import sys
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.base import VideoDataset
from evaluation.detectors import Detector
from evaluation.distributed import all_gather_objects, broadcast_from_rank0, dist_info, shard
from evaluation.frechet import GaussianStats
from evaluation.metrics import FVD

QUANTIZATION = "x*127.5+128 clamp [0,255] uint8"  # evaluation.detectors.quantize; part of the key
CACHE_VERSION = 2  # 2: the key covers the dataset's content, the decoder and the preprocessing code
PROJECT_PACKAGES = ("datamodules", "evaluation", "methods")  # whose source counts as preprocessing code
PREPROCESSING_MODULES = ("datamodules.clips", "datamodules.video_io")  # decode, crop / resize, clip timing


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


def _sha256(parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def _stamp(path: Path) -> list:
    """[size, mtime_ns] of a file; for a folder of frames, [name, size, mtime_ns] of each entry by name."""
    try:
        if path.is_dir():
            with os.scandir(path) as it:
                entries = sorted((e.name, st.st_size, st.st_mtime_ns) for e in it for st in (e.stat(),))
            return [list(e) for e in entries]
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError as e:  # gone since the dataset listed it: part of the fingerprint too
        return [f"{type(e).__name__}"]


def _rel(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return str(path.relative_to(root))
        except ValueError:
            pass
    return str(path)


def dataset_content(dataset) -> dict:
    """A fingerprint of what `dataset` holds, beyond its config (part of the real-statistics key).

    File datasets (a `samples` list of objects with a `.path`, as datamodules.files.FileVideoDataset):
    sha256 over the kept files in dataset order (the order fixes which file each eval clip comes
    from), each as path under `dataset.root`, size and mtime (frame folders: every entry's name,
    size and mtime), label and captions; plus the skipped files by kind (`skip_paths`, when the
    dataset has it, else `skip_counts`). A file that is replaced, touched, added or removed changes
    the key. Procedural data: only its generator's code (its config, already in the key, is its content).
    """
    samples = getattr(dataset, "samples", None)
    if samples is None or not all(hasattr(s, "path") for s in samples[:1]):
        return {"kind": "procedural", "class": f"{type(dataset).__module__}.{type(dataset).__qualname__}"}
    root = getattr(dataset, "root", None)
    root = Path(root) if root is not None else None
    files = ([_rel(Path(s.path), root), _stamp(Path(s.path)), getattr(s, "label", None),
              list(getattr(s, "captions", ()) or ())] for s in samples)
    skipped = getattr(dataset, "skip_paths", None)
    if skipped is None:
        skipped = getattr(dataset, "skip_counts", None)
    else:
        skipped = {kind: sorted(_rel(Path(p), root) for p in paths) for kind, paths in skipped.items()}
    return {"kind": "files", "n_files": len(samples), "files_sha256": _sha256(files),
            "skipped_sha256": _sha256([skipped])}


def decoder_versions() -> dict:
    """The versions of the libraries that turn files into pixels: PyAV, FFmpeg's libraries, Pillow."""
    out: dict = {}
    try:
        import av

        out["av"] = av.__version__
        out["ffmpeg"] = getattr(av, "ffmpeg_version_info", None)
        out["libraries"] = {k: ".".join(map(str, v)) for k, v in sorted(getattr(av, "library_versions", {}).items())}
    except ImportError:
        out["av"] = None
    try:
        import PIL

        out["pillow"] = PIL.__version__
    except ImportError:
        out["pillow"] = None
    return out


def _module_source(name: str) -> str:
    try:
        return inspect.getsource(sys.modules.get(name) or importlib.import_module(name))
    except (ImportError, OSError, TypeError):
        return f"<no source: {name}>"


def _project_modules(types) -> set[str]:
    return {t.__module__ for t in types if t.__module__.split(".")[0] in PROJECT_PACKAGES}


def preprocessing_modules(dataset, detector: Detector | None) -> list[str]:
    """The project modules whose code sits between a stored video and the detector's features."""
    names = set(PREPROCESSING_MODULES) | _project_modules(type(dataset).__mro__)
    if detector is not None:
        names |= _project_modules(t for m in detector.modules() for t in type(m).__mro__)
    return sorted(names)


def preprocessing_sha256(dataset, detector: Detector | None) -> str:
    """sha256 of the source of `preprocessing_modules` (decode, crop, resize, quantise, detector network)."""
    return _sha256((name, _module_source(name)) for name in preprocessing_modules(dataset, detector))


def real_protocol(dataset_cfg, split: str, n_real: int, clip_seed: int, detector: Detector,
                  dataset=None, real_clips: dict | None = None) -> dict:
    """Everything that determines the real statistics (hashed into the cache key).

    With `dataset` (the split's VideoDataset) the key also covers its content, the decoder and the
    preprocessing code (see the module docstring); without it, only the config-level fields.
    `real_clips` (`evaluation.stylegan_v.RealClips.protocol()`, only when not the default seeded
    selection, so default keys stay as they were): the selection, resize and JPEG options and their code.
    """
    ds = _plain(dataset_cfg)
    out = {"dataset": ds, "split": split, "resolution": ds.get("resolution"), "frames": ds.get("frames"),
           "stride": ds.get("stride"), "n_real": n_real, "clip_seed": clip_seed, "detector": detector.name,
           "detector_sha256": detector.sha256, "quantization": QUANTIZATION, "version": CACHE_VERSION}
    if getattr(detector, "options", None):  # e.g. the I3D's BatchNorm eps: the same file, other features
        out["detector_options"] = detector.options
    if dataset is not None:
        content = dataset_content(dataset)
        out["content"] = content
        out["decoder"] = decoder_versions() if content["kind"] == "files" else None
        out["preprocessing_sha256"] = preprocessing_sha256(dataset, detector)
    if real_clips:
        out["real_clips"] = real_clips
    return out


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
                     num_workers: int = 0, real_clips=None) -> tuple[GaussianStats, list[int], list[str | None]]:
    """Features of n_real real clips (sharded across ranks), their Gaussian fit and their labels / captions.

    real_clips: an `evaluation.stylegan_v.RealClips` that is not the default (its clips replace `eval_clip`'s).
    """
    rank, world = dist_info()
    fvd = FVD().to(detector.device)
    mine: list[tuple[int, int, str | None]] = []
    indices = shard(n_real, rank, world)
    loader = (eval_clip_loader(dataset, indices, clip_seed, batch_size, num_workers) if real_clips is None
              else real_clips.loader(dataset, indices, clip_seed, batch_size, num_workers))
    for batch in loader:
        fvd.update(detector.features(batch["video"]), real=True)
        mine += list(zip(batch["index"].tolist(), batch["label"], batch["text"]))
    stats = fvd.real_stats()
    meta = sorted(m for part in all_gather_objects(mine) for m in part)  # global clip order
    return stats, [m[1] for m in meta], [m[2] for m in meta]


def load_or_compute_real_set(dataset: VideoDataset, dataset_cfg, split: str, detector: Detector, n_real: int,
                             clip_seed: int, cache_dir: str | Path | None, batch_size: int = 16,
                             num_workers: int = 0, real_clips=None) -> RealSet:
    """The cached real statistics for this protocol, computing (and caching) them on a miss.

    n_real is capped at the split's size for procedural data that cannot repeat clips.
    cache_dir None disables the cache. Under DDP, rank 0 decides: it looks for the file, loads it
    and broadcasts the contents (or the miss), so every rank takes the same branch (see `cached`).
    real_clips (`evaluation.stylegan_v.RealClips`, from eval.real_selection / real_resize / real_jpeg_quality):
    None or the default = `dataset.eval_clip`; else its clips, n_real capped at the videos it can use.
    """
    if real_clips is not None and real_clips.is_default:
        real_clips = None
    if real_clips is None:
        n_real = min(n_real, len(dataset)) if n_real > 0 else len(dataset)
    else:
        n_real = len(real_clips.clips(dataset, n_real, clip_seed))
    options = real_clips.protocol() if real_clips is not None else None
    # rank 0 fingerprints the data (node-local copies may differ in mtime) and every rank uses its protocol
    protocol = broadcast_from_rank0(lambda: real_protocol(dataset_cfg, split, n_real, clip_seed, detector, dataset,
                                                          options))
    path = Path(cache_dir) / "real_stats" / f"{protocol_key(protocol)}.npz" if cache_dir is not None else None
    hit = cached(path)
    if hit is not None:
        stats, labels, texts = hit
        return _real_set(stats, labels, texts, protocol, path, from_cache=True)
    stats, labels, texts = compute_real_set(dataset, detector, n_real, clip_seed, batch_size, num_workers, real_clips)
    if path is not None and dist_info()[0] == 0:
        stats.save(path, protocol, extra={"labels": np.array([-1 if lbl is None else lbl for lbl in labels]),
                                          "texts": np.array(json.dumps(texts))})
    return _real_set(stats, labels, texts, protocol, path, from_cache=False)


def _load(path: Path) -> tuple[GaussianStats, list, list]:
    stats = GaussianStats.load(path)
    with np.load(path, allow_pickle=False) as z:
        labels = z["labels"].tolist() if "labels" in z else []
        texts = json.loads(str(z["texts"])) if "texts" in z else []
    return stats, labels, texts


def cached(path: Path | None, exists=None) -> tuple[GaussianStats, list, list] | None:
    """(stats, labels, texts) from the cache file, or None on a miss: decided and read by rank 0 only.

    Every rank calls it (a collective under DDP): rank 0 checks `exists(path)` (default
    Path.exists), loads the file and broadcasts the contents or None, so ranks whose node
    has no such file (node-local cache folders) or a stale one never disagree with rank 0 and
    never hang. An unreadable file on rank 0 counts as a miss (it is recomputed and rewritten).
    """
    exists = exists or Path.exists

    def look():
        if path is None or not exists(path):
            return None
        try:
            return _load(path)
        except (OSError, ValueError, KeyError):
            return None

    return broadcast_from_rank0(look)


def _real_set(stats, labels, texts, protocol, path, from_cache) -> RealSet:
    labels = [int(lbl) for lbl in labels] if labels and all(lbl is not None and lbl >= 0 for lbl in labels) else None
    texts = list(texts) if texts and all(t is not None for t in texts) else None
    return RealSet(stats, labels, texts, protocol, path, from_cache)
