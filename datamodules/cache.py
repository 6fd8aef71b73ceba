"""A memory-mapped decode cache: uint8 clips in one `.npy`, written once, read every epoch.

Layout of `<cache_dir>/<dataset>-<key hash>/`:
    clips.npy   uint8 (N, T, R, R, 3)  np.load(..., mmap_mode="r") works on it
    status.npy  uint8 (N,)             0 = not yet decoded, 1 = stored, 2 = unreadable source
    meta.json   the key (dataset, files, resolution, frames, stride, ...) for humans

The key hash covers everything that changes the pixels, so a new resolution or file list
gets a new folder and a stale cache is never read. Entries are independent: any process
(DataLoader workers, DDP ranks on one node) may fill any entry, the status byte is written
after the clip, and a killed build resumes where it stopped (the written pages are in the
file). Files are created under a temporary name and linked into place, so concurrent
creators agree on one file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

TODO, STORED, BAD = 0, 1, 2


def key_hash(key: dict) -> str:
    """sha256 of a JSON-able key (sorted keys), first 16 hex digits."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _create_once(path: Path, shape: tuple[int, ...]) -> None:
    """Create a zero-filled .npy of `shape` at `path` unless it exists (safe against a racing creator)."""
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape).flush()  # sparse on most filesystems
        try:
            os.link(tmp, path)  # atomic, and fails if another process won the race
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


class ClipCache:
    """N uint8 clips of one shape, memory-mapped; opened lazily in each process."""

    def __init__(self, root: str | Path, name: str, key: dict, num_entries: int, clip_shape: tuple[int, ...]) -> None:
        self.dir = Path(root) / f"{name}-{key_hash(key)}"
        self.num_entries, self.clip_shape = num_entries, tuple(clip_shape)
        self.dir.mkdir(parents=True, exist_ok=True)
        _create_once(self.dir / "clips.npy", (num_entries, *self.clip_shape))
        _create_once(self.dir / "status.npy", (num_entries,))
        meta = self.dir / "meta.json"
        if not meta.exists():
            tmp = meta.with_name(f".meta.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": key, "num_entries": num_entries, "clip_shape": self.clip_shape},
                                      indent=1, default=str))
            os.replace(tmp, meta)
        self._clips: np.memmap | None = None
        self._status: np.memmap | None = None

    def _open(self) -> None:
        if self._clips is None:
            self._clips = np.load(self.dir / "clips.npy", mmap_mode="r+")
            self._status = np.load(self.dir / "status.npy", mmap_mode="r+")
            if self._clips.shape != (self.num_entries, *self.clip_shape):
                raise RuntimeError(f"decode cache {self.dir} holds {self._clips.shape}, expected "
                                   f"{(self.num_entries, *self.clip_shape)}: delete the folder to rebuild it")

    def __getstate__(self) -> dict:  # memory maps are reopened in each worker, never pickled
        return {**self.__dict__, "_clips": None, "_status": None}

    def status(self, index: int | None = None) -> np.ndarray | int:
        """One entry's status, or a copy of all of them (N,)."""
        self._open()
        return np.array(self._status) if index is None else int(self._status[index])

    def get(self, index: int) -> np.ndarray | None:
        """The stored clip (a view into the map) or None when not stored."""
        self._open()
        return self._clips[index] if self._status[index] == STORED else None

    def put(self, index: int, clip: np.ndarray) -> None:
        """Store a clip (clip_shape, uint8); the status byte goes last."""
        self._open()
        self._clips[index] = clip
        self._status[index] = STORED

    def mark_bad(self, index: int) -> None:
        self._open()
        self._status[index] = BAD

    def flush(self) -> None:
        if self._clips is not None:
            self._clips.flush()
            self._status.flush()

    def counts(self) -> dict[str, int]:
        s = self.status()
        return {"todo": int((s == TODO).sum()), "stored": int((s == STORED).sum()), "bad": int((s == BAD).sum())}
