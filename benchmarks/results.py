"""The results store: an append-only JSONL file that many processes may write at once.

Each row is written with one `write` on a file opened O_APPEND while holding an exclusive
`flock`, then fsync'ed: concurrent writers never interleave or lose rows, and a crash
leaves either the whole line or none of it. A write that fails (a full disk: ENOSPC, or a
short write) is undone (the file is truncated back to its old size) and raised as an OSError
saying "no space left on <mount point> while writing <path>". CSV / Markdown / PNG are
exports of it.

`atomic_write_bytes` / `atomic_write_text` / `atomic_torch_save` write other files whole or
not at all: a temporary file in the same folder, fsync'ed, then `os.replace`d over the target;
on any error the temporary file is removed and the target left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable
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


def _mount_point(path: Path) -> Path:
    """The mount point holding `path` (what a user frees space on)."""
    p = Path(os.path.abspath(path))
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def disk_error(error: OSError, path: str | Path) -> OSError:
    """`error` (raised while writing `path`) as an OSError that says what happened where.

    ENOSPC / EDQUOT: "no space left on <mount point> while writing <path>"; anything else:
    "<errno text> while writing <path>". The errno is kept.
    """
    code = error.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        what = "no space left" if code == errno.ENOSPC else "disk quota exceeded"
        message = f"{what} on {_mount_point(Path(path))} while writing {path}"
    else:
        text = os.strerror(code) if code else (str(error) or type(error).__name__)
        message = f"{text} while writing {path}"
    detail = error.strerror if code and error.strerror and error.strerror != os.strerror(code) else None
    return OSError(code, message + (f" ({detail})" if detail else ""))


def append_row(path: str | Path, row: dict) -> None:
    """Append one JSON row atomically (locked, one write, fsync); a failed write leaves the file as it was."""
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
            try:
                written = os.write(fd, line)
                if written != len(line):  # a regular file writes short only when the disk is full
                    raise OSError(errno.ENOSPC, f"short write: {written} of {len(line)} bytes")
                os.fsync(fd)
            except BaseException as e:
                with contextlib.suppress(OSError):  # no half row stays behind
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                if isinstance(e, OSError):
                    raise disk_error(e, path) from e
                raise
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _atomic_write(path: str | Path, write: Callable) -> None:
    """Call `write(binary file)` on a temp file beside `path`, fsync, then `os.replace` it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = _os_error_in(e)
        if cause is not None:
            raise disk_error(cause, path) from e
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _os_error_in(e: BaseException) -> OSError | None:
    """`e` if it is an OSError, else the OSError it wraps (torch.save turns a failed write into a RuntimeError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _write_all(f, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(f.fileno(), view)
        if not n:
            raise OSError(errno.ENOSPC, f"write returned 0 with {len(view)} bytes left")
        view = view[n:]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (temp file, fsync, os.replace); ENOSPC says where."""
    _atomic_write(path, lambda f: _write_all(f, bytes(data)))


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """`atomic_write_bytes` of `text` encoded."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_csv(path: str | Path, rows: list[dict], columns: tuple | list | None = None) -> None:
    """`rows` as CSV, whole or not at all. columns: these first, in this order (keys outside them are left
    out); None: every key of every row, in the order first seen."""
    import csv
    import io

    fields = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def atomic_torch_save(obj, path: str | Path) -> None:
    """`torch.save(obj, path)` whole or not at all (temp file, fsync, os.replace); ENOSPC says where."""
    import torch

    _atomic_write(path, lambda f: torch.save(obj, f))


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
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            warnings.warn(f"{path}:{i} is not a complete JSON row; skipped", stacklevel=2)
            continue
        if not isinstance(row, dict):
            warnings.warn(f"{path}:{i} is JSON but not a row object (got {type(row).__name__}); skipped",
                          stacklevel=2)
            continue
        rows.append(row)
    return rows
