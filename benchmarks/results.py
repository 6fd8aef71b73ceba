"""The results store: an append-only JSONL file that many processes may write at once.

Each row is written with one `write` on a file opened O_APPEND while holding an exclusive
`flock`, then fsync'ed: concurrent writers never interleave or lose rows, and a crash
leaves either the whole line or none of it. CSV / Markdown / PNG are exports of it.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import warnings
from pathlib import Path


def _clean(value):
    """JSON-safe: NaN/inf become None, tuples lists, unknown objects strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if hasattr(value, "item"):
        return _clean(value.item())
    return str(value)


def append_row(path: str | Path, row: dict) -> None:
    """Append one JSON row atomically (locked, one write, fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(_clean(row), sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # an old crash left a partial line: start a new one
                line = b"\n" + line
            written = os.write(fd, line)
            if written != len(line):  # cannot happen for regular files short of a full disk
                raise OSError(f"short write to {path}: {written} of {len(line)} bytes")
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def read_rows(path: str | Path) -> list[dict]:
    """Every complete row; a malformed line (e.g. from an old crash) is reported and skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        data = f.read()
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    for i, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{i} is not a complete JSON row; skipped", stacklevel=2)
    return rows
