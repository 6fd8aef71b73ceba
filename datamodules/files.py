"""The shared base of every file-backed dataset: index, validation, clip sampling, faults, cache.

A subclass only lists its samples (`list_samples`: path, label, captions) and names its
classes; everything else is here, so UCF-101, WebVid, MSR-VTT and plain folders sample,
skip and cache clips the same way.

Randomness
    train      temporal offset, crop position (`random_crop`), flip (`flip`) and caption come
               from torch's global RNG, which the DataLoader seeds per worker and epoch.
    val/test   deterministic: offset from (dataset.seed, index), centre crop, first caption.
    eval_clip  `eval_clip(i, seed)`: the i-th real clip for evaluation, "one clip per real
               video at a random temporal offset", a pure function of (seed, i), so ranks
               can shard it and reruns agree.

Faults (never crash a run on one bad file)
    missing    listed files that do not exist: dropped at setup, counted.
    unreadable found at setup by the validation probe (`validate`, cached in an index file)
               or while decoding in `__getitem__`: the item is replaced by the next good
               index (deterministic), a warning is issued once per file, and it is counted.
    short      shorter than one clip ((frames - 1) * stride + 1 source frames): skipped and
               counted, with one `ShortVideoWarning` per split naming the first few files and
               the count; `dataset.loop_short=true` loops them (repeated frames) instead.
Every fault is recorded per file: `skip_paths` lists the files of each kind, and
`VideoDataModule.skipped_files()` / `short_files()` merge them over splits (a bad file read by
two splits counts once).
Counts found inside DataLoader worker processes reach the main process through a shared
byte array (one flag per video, `multiprocessing.RawArray`, inherited by forked and
pickled to spawned workers), so `skipped` and `skip_counts` read in the main process
include them. Each DDP rank counts its own shard; reduce across ranks if you need a total.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.base import DatasetConfig, VideoDataset
from datamodules.cache import BAD, ClipCache, key_hash
from datamodules.clips import ClipTiming, crop_resize, loop_frames, to_item_video
from datamodules.video_io import DecodeError, VideoInfo, probe, read_clip

OK, UNREADABLE, SHORT = 0, 1, 2  # per-video flags
MAX_SUBSTITUTES = 64  # consecutive bad videos tolerated before an item gives up


class CorruptVideoWarning(UserWarning):
    """A video file could not be decoded and was skipped."""


class ShortVideoWarning(UserWarning):
    """Videos shorter than one clip were skipped (set dataset.loop_short=true to loop them)."""


SHOW_FILES = 3  # files named in a fault warning


class _Skip(Exception):
    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class FileDatasetConfig(DatasetConfig):
    fps: float | None = None  # resample clips to this many frames per second; null: every `stride`-th source frame
    loop_short: bool = False  # loop videos shorter than one clip instead of skipping them
    random_crop: bool = False  # training crops at a random position (else centre); evaluation always centres
    flip: bool = False  # random horizontal flip in training
    validate: bool = True  # probe every file at setup (cached index): unreadable/short files are dropped and counted
    cache: bool = False  # decode once into a memory-mapped uint8 cache (centre crop, `cache_clips` fixed offsets)
    cache_dir: str = "cache/clips"  # decode cache and probe index live here
    cache_clips: int = 1  # clips cached per video, at evenly spaced temporal offsets; training picks one at random
    decode_threads: int = 1  # FFmpeg threads per decoding process; 0: FFmpeg picks (helps for HD, few workers)
    folder_fps: float = 25.0  # playback rate of folders of frame images (they carry no clock)
    max_videos: int | None = None  # keep a seeded random subset of this many videos (smoke runs)
    seed: int = 0  # subset, val/test offsets


@dataclass
class Sample:
    path: Path  # a video file or a folder of frame images
    label: int = -1
    captions: tuple[str, ...] = field(default_factory=tuple)


def require(path: Path | None, what: str, key: str, layout: str) -> Path:
    """`path` if it exists, else a FileNotFoundError naming it, the config key and the expected layout."""
    if path is None:
        raise FileNotFoundError(f"{key} is not set: point it at the {what}.\nExpected layout:\n{layout}")
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} (config key `{key}`).\nExpected layout:\n{layout}")
    return path


class FileVideoDataset(VideoDataset):
    """Clips decoded from files with PyAV; subclasses implement `list_samples`."""

    Config = FileDatasetConfig
    LAYOUT = ""  # the expected files under dataset.root, quoted in error messages

    def __init__(self, cfg: FileDatasetConfig, split: str = "train") -> None:
        super().__init__(cfg, split)
        if cfg.channels != 3:
            raise ValueError(f"dataset.channels must be 3 for {cfg.name} (RGB video), got {cfg.channels}")
        if cfg.frames < 1 or cfg.stride < 1 or cfg.cache_clips < 1:
            raise ValueError("dataset.frames, dataset.stride and dataset.cache_clips must be >= 1")
        self.root = require(Path(cfg.root).expanduser() if cfg.root else None, f"{cfg.name} data folder",
                            "dataset.root", self.LAYOUT)
        samples = self.list_samples()
        if cfg.max_videos is not None and cfg.max_videos < len(samples):
            keep = np.random.default_rng(cfg.seed).permutation(len(samples))[: cfg.max_videos]
            samples = [samples[i] for i in sorted(keep)]
        present = [s for s in samples if s.path.exists()]
        self._counts = {"missing": len(samples) - len(present), "unreadable": 0, "short": 0}
        # the files behind the setup counts (files found bad later are flagged in `_flags`)
        self._paths: dict[str, list[str]] = {"missing": [str(s.path) for s in samples if not s.path.exists()],
                                             "unreadable": [], "short": []}
        self.infos: list[VideoInfo] | None = None
        if cfg.validate:
            present, self.infos = self._validate(present)
        if not present:
            raise FileNotFoundError(f"{cfg.name} split {split!r}: no readable videos under {self.root} "
                                    f"({self._counts}).\nExpected layout:\n{self.LAYOUT}")
        self.samples = present
        self._flags = mp.RawArray("b", len(present))  # per-video fault flags shared with DataLoader workers
        self._eval_orders: dict[int, np.ndarray] = {}
        self._cache = self._make_cache() if cfg.cache else None
        if self._counts["missing"] or self._counts["unreadable"]:
            warnings.warn(f"{cfg.name} {split}: skipping {self._counts['missing']} missing and "
                          f"{self._counts['unreadable']} unreadable files of {len(samples)}", CorruptVideoWarning,
                          stacklevel=2)

    def __getstate__(self) -> dict:
        # Spawned DataLoader workers / ddp_spawn ranks receive the shared flags themselves; any
        # other pickle or deepcopy gets a private copy (counts then stay with that copy).
        state = self.__dict__.copy()
        if mp.context.get_spawning_popen() is None:
            state["_flags"] = bytes(self._flags)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["_flags"], bytes):
            flags = mp.RawArray("b", len(state["_flags"]))
            flags[:] = np.frombuffer(state["_flags"], dtype=np.int8).tolist()
            state["_flags"] = flags
        self.__dict__.update(state)

    # ------------------------------------------------------------------------------ subclass API

    def list_samples(self) -> list[Sample]:
        """Every video of this split (existing or not: missing files are counted by the base)."""
        raise NotImplementedError

    # --------------------------------------------------------------------------------- contract

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        if self.split == "train":
            u = torch.rand(5).tolist()  # offset, crop y, crop x, flip, caption
            return self._item(index, u[0], (u[1], u[2]) if self.cfg.random_crop else (0.5, 0.5),
                              flip=self.cfg.flip and u[3] < 0.5, caption=u[4])
        return self._item(index, self._uniform(self.cfg.seed, index), (0.5, 0.5), flip=False, caption=None)

    def eval_clip(self, index: int, seed: int) -> dict:
        """The index-th real clip of the evaluation set for `seed` (decoded, never from the cache).

        Videos are visited in a seeded random order, one clip each at a seeded random
        temporal offset, centre crop, first caption; index >= len(self) starts another round
        with fresh offsets. A pure function of (seed, index): shard it across ranks freely.
        """
        order = self._eval_orders.get(seed)
        if order is None:
            order = self._eval_orders[seed] = np.random.default_rng([seed, 0x5EED]).permutation(len(self))
        n = len(self)
        video, round_ = int(order[index % n]), index // n
        return self._item(video, self._uniform(seed, video, round_), (0.5, 0.5), flip=False, caption=None,
                          use_cache=False)

    @property
    def skip_counts(self) -> dict[str, int]:
        """missing / unreadable / short videos, including those found in worker processes."""
        flags = np.frombuffer(self._flags, dtype=np.int8)
        return {"missing": self._counts["missing"],
                "unreadable": self._counts["unreadable"] + int((flags == UNREADABLE).sum()),
                "short": self._counts["short"] + int((flags == SHORT).sum())}

    @property
    def skip_paths(self) -> dict[str, list[str]]:
        """The files behind `skip_counts`: missing / unreadable / short paths, including worker finds."""
        flags = np.frombuffer(self._flags, dtype=np.int8)
        found = {kind: [str(self.samples[i].path) for i in np.flatnonzero(flags == flag)]
                 for kind, flag in (("unreadable", UNREADABLE), ("short", SHORT))}
        return {"missing": list(self._paths["missing"]), "unreadable": self._paths["unreadable"] + found["unreadable"],
                "short": self._paths["short"] + found["short"]}

    @property
    def skipped(self) -> int:
        c = self.skip_counts
        return c["missing"] + c["unreadable"]

    def _clip_frames(self) -> int:
        """Source frames one clip spans at `dataset.stride` (what a shorter video lacks)."""
        return (self.cfg.frames - 1) * self.cfg.stride + 1

    # ----------------------------------------------------------------------------------- items

    @staticmethod
    def _uniform(*keys: int) -> float:
        return float(np.random.default_rng([*keys, 0xC11]).random())

    def _item(self, index: int, offset: float, crop: tuple[float, float], *, flip: bool,
              caption: float | None, use_cache: bool = True) -> dict:
        n = len(self)
        for attempt in range(min(n, MAX_SUBSTITUTES)):
            i = (index + attempt) % n  # a bad video is replaced by the next good one, deterministically
            if self._flags[i] != OK:
                continue
            try:
                clip = self._cached_clip(i, offset) if use_cache and self._cache else self._decode(i, offset, crop)
            except _Skip as e:
                self._flag(i, e.reason, str(e))
                continue
            s = self.samples[i]
            text = None
            if s.captions:
                text = s.captions[0] if caption is None else s.captions[int(caption * len(s.captions))]
            return {"video": to_item_video(clip, flip), "label": s.label, "text": text}
        raise RuntimeError(f"{self.cfg.name}: {min(n, MAX_SUBSTITUTES)} consecutive videos from index {index} are "
                           f"unreadable ({self.skip_counts}); check the data under {self.root}")

    def _flag(self, i: int, reason: int, message: str) -> None:
        if self._flags[i] == OK and reason == UNREADABLE:  # another worker may have warned already
            warnings.warn(f"skipping unreadable video {self.samples[i].path}: {message}", CorruptVideoWarning,
                          stacklevel=3)
        if reason == SHORT and not self._paths["short"] and not (np.frombuffer(self._flags, np.int8) == SHORT).any():
            # the first short video of this split (setup found none): one warning, later ones are only counted
            warnings.warn(f"{self.cfg.name} {self.split}: skipping video {self.samples[i].path} ({message}); further "
                          f"short videos are skipped without a warning and counted (`skip_counts`); set "
                          f"dataset.loop_short=true to loop short videos instead", ShortVideoWarning, stacklevel=3)
        self._flags[i] = reason

    def _decode(self, i: int, offset: float, crop: tuple[float, float]):
        """uint8 (T, R, R, 3) clip of video i starting at fraction `offset` of its valid start range."""
        cfg, path = self.cfg, self.samples[i].path
        try:
            info = self.infos[i] if self.infos is not None else probe(path, folder_fps=cfg.folder_fps)
            timing = ClipTiming.of(cfg.frames, cfg.stride, cfg.fps, info.fps)
            short = not timing.fits(info)
            if short and not cfg.loop_short:
                raise _Skip(SHORT, self._short_message(info))
            start = timing.start(offset, info)
            kw = {"step": timing.step, "threads": cfg.decode_threads, "folder_fps": cfg.folder_fps}
            frames = read_clip(path, cfg.frames, start=start, **kw)
            if len(frames) < cfg.frames and start > 0:  # the header overstated the length: retry from the start
                frames = read_clip(path, cfg.frames, start=0.0, **kw)
        except DecodeError as e:
            raise _Skip(UNREADABLE, f"{type(e).__name__}: {e}") from None
        if len(frames) < cfg.frames:
            if not (cfg.loop_short and len(frames)):
                raise _Skip(UNREADABLE if not short else SHORT,
                            f"decoded {len(frames)} of {cfg.frames} frames (header says {info.num_frames})")
            frames = loop_frames(frames, cfg.frames)
        return crop_resize(frames, cfg.resolution, crop)

    # ------------------------------------------------------------------------------ validation

    def _validate(self, samples: list[Sample]) -> tuple[list[Sample], list[VideoInfo]]:
        """Probe every file (cached by path, size and mtime); drop unreadable and, unless looped, short ones."""
        cfg = self.cfg
        index_key = key_hash({"root": str(self.root.resolve()), "format": 2})
        index_path = Path(cfg.cache_dir) / "index" / f"{cfg.name}-{index_key}.json"
        try:
            index = json.loads(index_path.read_text()) if index_path.exists() else {}
        except (OSError, ValueError):
            index = {}

        def stamp(p: Path) -> list:
            st = p.stat()
            return [len(os.listdir(p)) if p.is_dir() else st.st_size, st.st_mtime_ns, cfg.folder_fps]

        def entry(s: Sample) -> list:
            key = str(s.path)
            st = stamp(s.path)
            if key in index and index[key][:3] == st:
                return index[key]
            try:
                info = probe(s.path, folder_fps=cfg.folder_fps)
                return [*st, info.num_frames, info.fps, info.width, info.height, info.duration]
            except DecodeError as e:
                return [*st, f"{type(e).__name__}: {e}"]

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            entries = list(_progress(pool.map(entry, samples), len(samples), f"probing {cfg.name} {self.split}"))
        changed = any(index.get(str(s.path)) != e for s, e in zip(samples, entries))
        if changed:
            index.update({str(s.path): e for s, e in zip(samples, entries)})
            index_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = index_path.with_name(f".{index_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(index))
            os.replace(tmp, index_path)

        kept, infos = [], []
        short: list[str] = []
        for s, e in zip(samples, entries):
            if len(e) == 4:  # stamp + error message
                self._counts["unreadable"] += 1
                self._paths["unreadable"].append(str(s.path))
                warnings.warn(f"skipping unreadable video {s.path}: {e[3]}", CorruptVideoWarning, stacklevel=3)
                continue
            info = VideoInfo(*e[3:])
            if not (cfg.loop_short or ClipTiming.of(cfg.frames, cfg.stride, cfg.fps, info.fps).fits(info)):
                short.append(f"{s.path} ({self._short_message(info)})")
                self._paths["short"].append(str(s.path))
                continue
            kept.append(s)
            infos.append(info)
        self._counts["short"] = len(short)
        if short:
            more = f" and {len(short) - SHOW_FILES} more" if len(short) > SHOW_FILES else ""
            warnings.warn(f"{cfg.name} {self.split}: skipping {len(short)} of {len(samples)} videos shorter than one "
                          f"clip: {'; '.join(short[:SHOW_FILES])}{more}. Set dataset.loop_short=true to loop short "
                          f"videos (repeated frames) instead", ShortVideoWarning, stacklevel=3)
        return kept, infos

    def _short_message(self, info: VideoInfo) -> str:
        cfg = self.cfg
        if cfg.fps:
            return (f"{info.duration:.2f} s long, one clip of {cfg.frames} frames at dataset.fps={cfg.fps:g} "
                    f"needs {(cfg.frames - 1) / cfg.fps + 1 / info.fps:.2f} s")
        return (f"{info.num_frames} frames, one clip of dataset.frames={cfg.frames} at dataset.stride={cfg.stride} "
                f"needs {self._clip_frames()}")

    # ----------------------------------------------------------------------------------- cache

    def _cache_key(self) -> dict:
        cfg = self.cfg
        return {"dataset": cfg.name, "root": str(self.root.resolve()),
                "files": key_hash({"files": [str(s.path.relative_to(self.root)) if s.path.is_relative_to(self.root)
                                             else str(s.path) for s in self.samples]}),
                "resolution": cfg.resolution, "frames": cfg.frames, "stride": cfg.stride, "fps": cfg.fps,
                "loop_short": cfg.loop_short, "clips_per_video": cfg.cache_clips, "folder_fps": cfg.folder_fps}

    def _make_cache(self) -> ClipCache:
        cfg = self.cfg
        return ClipCache(cfg.cache_dir, cfg.name, self._cache_key(),
                         len(self.samples) * cfg.cache_clips, (cfg.frames, cfg.resolution, cfg.resolution, 3))

    def _cached_clip(self, i: int, offset: float):
        """Clip of video i from the cache (filling the entry on first use): slot int(offset * cache_clips)."""
        k_clips = self.cfg.cache_clips
        slot = min(int(offset * k_clips), k_clips - 1) if self.split == "train" else 0
        entry = i * k_clips + slot
        clip = self._cache.get(entry)
        if clip is not None:
            return torch.from_numpy(np.array(clip))  # copy out of the map
        if self._cache.status(entry) == BAD:
            raise _Skip(UNREADABLE, f"marked unreadable in the decode cache {self._cache.dir}")
        try:
            clip = self._decode(i, (slot + 0.5) / k_clips, (0.5, 0.5))
        except _Skip as e:
            if e.reason == UNREADABLE:
                self._cache.mark_bad(entry)
            raise
        self._cache.put(entry, clip.numpy())
        return clip

    def build_cache(self, num_workers: int = 0, progress: bool = True) -> dict[str, int]:
        """Decode every entry not yet cached (progress bar; safe to interrupt and rerun). Returns the counts."""
        if self._cache is None:
            raise ValueError(f"dataset.cache is false for {self.cfg.name}: set dataset.cache=true to build a cache")
        todo = np.flatnonzero(self._cache.status() == 0)
        loader = DataLoader(_CacheFiller(self, todo), batch_size=None, num_workers=num_workers)
        for n_done, _ in enumerate(_progress(loader, len(todo), f"caching {self.cfg.name} {self.split}"
                                             if progress else None)):
            if n_done % 256 == 0:
                self._cache.flush()
        self._cache.flush()
        return self._cache.counts()


class _CacheFiller(Dataset):
    """Decodes cache entries in DataLoader workers; they write to the shared map and return nothing."""

    def __init__(self, ds: FileVideoDataset, entries: np.ndarray) -> None:
        self.ds, self.entries = ds, entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, j: int) -> int:
        entry = int(self.entries[j])
        k_clips = self.ds.cfg.cache_clips
        i, slot = divmod(entry, k_clips)
        try:
            clip = self.ds._decode(i, (slot + 0.5) / k_clips, (0.5, 0.5))
        except _Skip as e:
            if e.reason == UNREADABLE:
                self.ds._cache.mark_bad(entry)
            self.ds._flag(i, e.reason, str(e))
            return 0
        self.ds._cache.put(entry, clip.numpy())
        return 1


def _progress(it, total: int, desc: str | None):
    """tqdm over `it` when there is enough to show (and a description), else `it` itself."""
    if desc is None or total < 64:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, unit="video")
