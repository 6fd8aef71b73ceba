"""A run never stores a wrong number: bad files counted once each, short clips named (or looped),
generated videos scored as they are, results lines that are not rows skipped, full disks undone.

Every test builds its own bad input: garbage bytes for corrupt videos, PyAV-written short clips,
mocked `os.write` / `torch.save` for a full disk.
"""

from __future__ import annotations

import errno
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import evaluate, results
from benchmarks import leaderboard as lb
from benchmarks.results import append_row, atomic_torch_save, atomic_write_bytes, atomic_write_text, read_rows
from datamodules import VideoDataModule
from datamodules.files import CorruptVideoWarning, ShortVideoWarning
from datamodules.folder import FolderConfig
from datamodules.shapes import ShapesConfig, ShapesDataset
from datamodules.video_io import frame_index_pattern, read_frame_index, read_video, write_video


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _video(path: Path, frames: int, size: int = 32) -> Path:
    return write_video(path, frame_index_pattern(frames, size, size), fps=25)


# ------------------------------------------------------------------------ datasets: per-file counts


@pytest.fixture
def bad_folder(tmp_path) -> Path:
    """2 good videos, 3 corrupt files (garbage, empty, truncated), 1 short video (6 frames < 15 needed)."""
    root = tmp_path / "videos"
    for name in ("a.mp4", "b.mp4"):
        _video(root / name, 30)
    (root / "garbage.mp4").write_bytes(b"\x00\x01 not a video at all " * 50)
    (root / "empty.avi").write_bytes(b"")
    good = _video(tmp_path / "whole.mp4", 30).read_bytes()
    (root / "truncated.mp4").write_bytes(good[: len(good) // 3])
    _video(root / "short.mp4", 6)
    return root


def _folder_cfg(root: Path, tmp_path: Path, **kw) -> FolderConfig:
    return FolderConfig(**{"root": str(root), "frames": 8, "resolution": 32, "stride": 2,
                           "cache_dir": str(tmp_path / "cache"), **kw})


def test_bad_files_count_once_over_splits(bad_folder, tmp_path):
    dm = VideoDataModule(_folder_cfg(bad_folder, tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per_split = [dm.dataset(s).skipped for s in ("train", "val", "test")]  # every split reads every file
    assert per_split == [3, 3, 3]  # the old row summed these: 9 for 3 files
    corrupt = sorted(str(bad_folder / n) for n in ("empty.avi", "garbage.mp4", "truncated.mp4"))
    assert dm.skipped_files() == corrupt and dm.skipped_videos == 3
    assert dm.short_files() == [str(bad_folder / "short.mp4")] and dm.short_videos == 1
    report = dm.skip_report()
    assert report["unreadable"] == corrupt and report["missing"] == [] and report["short"] == dm.short_files()


def test_shapes_datamodule_has_no_skips():
    dm = VideoDataModule(ShapesConfig())
    dm.dataset("train")
    assert dm.skipped_files() == [] and dm.skipped_videos == 0 and dm.short_files() == [] and dm.short_videos == 0


def test_short_clips_warn_once_per_split_naming_files_and_the_fix(bad_folder, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = VideoDataModule(_folder_cfg(bad_folder, tmp_path)).dataset("train")
    short = [w for w in caught if issubclass(w.category, ShortVideoWarning)]
    assert len(short) == 1
    msg = str(short[0].message)
    assert "short.mp4" in msg and "skipping 1 of 6" in msg and "dataset.loop_short=true" in msg
    assert "6 frames" in msg and "needs 15" in msg  # (8 - 1) * stride 2 + 1
    assert len(ds) == 2 and ds.skip_counts["short"] == 1


def test_short_clips_loop_when_asked(bad_folder, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm = VideoDataModule(_folder_cfg(bad_folder, tmp_path, loop_short=True))
        ds = dm.dataset("test")
    assert not [w for w in caught if issubclass(w.category, ShortVideoWarning)]
    assert len(ds) == 3 and dm.short_files() == []
    i = [s.path.name for s in ds.samples].index("short.mp4")
    x = ((ds[i]["video"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).numpy()
    idx, _ = read_frame_index(x)
    assert idx == [0, 2, 4, 0, 2, 4, 0, 2]  # 6 frames at stride 2 give 0, 2, 4; then repeated


def test_short_clips_found_while_decoding_warn_once_and_count_per_file(bad_folder, tmp_path):
    """validate=false (WebVid's default): short files are only found when read."""
    cfg = _folder_cfg(bad_folder, tmp_path, validate=False)
    dm = VideoDataModule(cfg)
    ds = dm.dataset("train")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            for i in range(len(ds)):
                assert ds[i]["video"].shape == (3, 8, 32, 32)
    short = [w for w in caught if issubclass(w.category, ShortVideoWarning)]
    assert len(short) == 1 and "short.mp4" in str(short[0].message) and "dataset.loop_short=true" in str(
        short[0].message)
    assert sum(issubclass(w.category, CorruptVideoWarning) for w in caught) == 3  # one per corrupt file
    assert dm.short_files() == [str(bad_folder / "short.mp4")]
    assert dm.skipped_videos == 3 and ds.skip_counts == {"missing": 0, "unreadable": 3, "short": 1}


# ------------------------------------------------------------------------ benchmarks.evaluate


def _shapes_folder(folder: Path, n: int = 4, frames: int | None = None, size: int | None = None) -> Path:
    """n shapes test videos named `<i>-<class>.mp4`, cut to `frames` and resized to `size` when given."""
    ds = ShapesDataset(ShapesConfig(), "test")
    for i in range(n):
        item = ds[i]
        u8 = ((item["video"] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)
        if frames is not None:
            u8 = u8[:frames]
        if size is not None:
            u8 = np.ascontiguousarray(u8.repeat(size // u8.shape[1], 1).repeat(size // u8.shape[2], 2))
        write_video(folder / f"{i:03d}-{ds.class_names[item['label']]}.mp4", u8, fps=8)
    return folder


def _score(folder: Path, tmp_path: Path, *extra: str) -> dict:
    return evaluate.main([f"samples_dir={folder}", f"cache_dir={tmp_path / 'cache'}", "eval.metrics=[is,cond_acc]",
                          "eval.num_real=16", "eval.is_splits=1", *extra])


def test_generated_videos_ignore_dataset_stride(tmp_path):
    folder = _shapes_folder(tmp_path / "gen")
    from benchmarks.config import load_config

    cfg1, cfg4 = load_config(["dataset.stride=1"]), load_config(["dataset.stride=4"])
    got = {}
    for name, cfg in (("s1", cfg1), ("s4", cfg4)):
        report = evaluate.FolderReport()
        got[name] = torch.cat([v for v, _, _ in evaluate.folder_batches(folder, cfg, [], {}, 3, report)])
        assert not report.looped and not report.resized and not report.unreadable
    files = sorted(folder.glob("*.mp4"))
    decoded = torch.stack([torch.from_numpy(read_video(f)).permute(3, 0, 1, 2) for f in files])  # every frame
    assert got["s4"].shape == (4, 3, 16, 32, 32)
    assert torch.equal(got["s4"], decoded) and torch.equal(got["s1"], decoded)

    row1, row4 = _score(folder, tmp_path, "dataset.stride=1"), _score(folder, tmp_path, "dataset.stride=4")
    assert row4["frames"] == 16 and row4["looped_videos"] == 0 and row4["n_gen"] == 4
    assert row4["is"] == row1["is"] and row4["cond_acc"] == row1["cond_acc"]  # the same frames were scored


def test_too_short_generated_videos_are_an_error_unless_looped(tmp_path):
    folder = _shapes_folder(tmp_path / "gen", frames=2)
    with pytest.raises(SystemExit, match=r"000-\S+\.mp4 has 2 frames.*dataset\.frames=16.*loop_short=true"):
        _score(folder, tmp_path)
    row = _score(folder, tmp_path, "loop_short=true")
    assert row["looped_videos"] == 4 and row["n_gen"] == 4 and row["frames"] == 16 and row["is"] > 0


def test_generated_videos_of_another_size_are_an_error_unless_resized(tmp_path):
    folder = _shapes_folder(tmp_path / "gen", n=2, size=64)
    with pytest.raises(SystemExit, match=r"is 64x64 pixels.*dataset\.resolution=32.*dataset\.resolution=64.*resize=true"):
        _score(folder, tmp_path)
    row = _score(folder, tmp_path, "resize=true")
    assert row["resized_videos"] == 2 and row["resolution"] == 32


def test_unreadable_samples_are_named(tmp_path):
    folder = _shapes_folder(tmp_path / "gen", n=2)
    bad = [folder / f"bad{i:02d}.mp4" for i in range(12)]
    for p in bad:
        p.write_bytes(os.urandom(200))
    with pytest.warns(CorruptVideoWarning, match=r"12 files under .* could not be decoded.*bad00\.mp4"):
        row = _score(folder, tmp_path)
    assert row["unreadable_videos"] == 12 and row["n_gen"] == 2
    assert row["unreadable_files"] == [str(p) for p in bad[:10]]


# ------------------------------------------------------------------------ results store: reading


def test_json_lines_that_are_not_objects_are_skipped_with_file_and_line(tmp_path):
    path = tmp_path / "results.jsonl"
    append_row(path, {"method": "vdm", "dataset": "shapes", "fvd": 10.0})
    with open(path, "a") as f:
        f.write('null\n[1, 2]\n3\n"text"\n{"method": "cm\n')
    append_row(path, {"method": "cmd", "dataset": "shapes", "fvd": 5.0})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = read_rows(path)
    assert [r["method"] for r in rows] == ["vdm", "cmd"]
    messages = [str(w.message) for w in caught]
    for line in (2, 3, 4, 5, 6):
        assert any(f"{path}:{line} " in m for m in messages), (line, messages)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = lb.main(["--results", str(path), "--format", "csv"])
    assert text.count("\n") == 3  # header + two rows


# ------------------------------------------------------------------------ results store: full disk


@pytest.fixture
def store(tmp_path) -> Path:
    path = tmp_path / "results.jsonl"
    append_row(path, {"method": "vdm", "fvd": 1.0})
    return path


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_append_row_on_a_full_disk_leaves_the_file_as_it_was(store, monkeypatch):
    before = store.read_bytes()
    real_write = os.write

    def half_then_enospc(fd, data):  # part of the line reaches the file, then the disk is full
        real_write(fd, bytes(data[:7]))
        _enospc()

    monkeypatch.setattr(os, "write", half_then_enospc)
    with pytest.raises(OSError, match=f"no space left on .* while writing {store}") as e:
        append_row(store, {"method": "cmd", "fvd": 2.0})
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC
    assert store.read_bytes() == before
    append_row(store, {"method": "cmd", "fvd": 3.0})  # the next row lands on a clean line
    assert [r["fvd"] for r in read_rows(store)] == [1.0, 3.0]


def test_append_row_short_write_is_truncated(store, monkeypatch):
    before = store.read_bytes()
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:5])))
    with pytest.raises(OSError, match=rf"no space left on .* while writing {store} \(short write: 5 of \d+ bytes\)"):
        append_row(store, {"method": "cmd", "fvd": 2.0})
    monkeypatch.undo()
    assert store.read_bytes() == before


def test_append_row_fsync_failure_is_undone_and_other_errnos_say_what(store, monkeypatch):
    before = store.read_bytes()
    calls = []

    def eio(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(OSError, match=f"{os.strerror(errno.EIO)} while writing {store}") as e:
        append_row(store, {"method": "cmd", "fvd": 2.0})
    monkeypatch.undo()
    assert e.value.errno == errno.EIO and store.read_bytes() == before


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_writes_replace_whole_files(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "sub" / "b.txt", "héllo")
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "c.pt")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub" / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], torch.arange(3))
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "sub") == []


def test_atomic_write_on_a_full_disk_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "config.yaml"
    target.write_text("old: 1\n")
    monkeypatch.setattr(os, "write", _enospc)
    with pytest.raises(OSError, match=f"no space left on .* while writing {target}") as e:
        atomic_write_text(target, "new: 2\n" * 1000)
    monkeypatch.setattr(os, "write", lambda fd, data: 0)  # a write that makes no progress
    with pytest.raises(OSError, match=f"no space left on .* while writing {target}"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC
    assert target.read_text() == "old: 1\n" and _leftovers(tmp_path) == []


def test_atomic_torch_save_on_a_full_disk(tmp_path, monkeypatch):
    target = tmp_path / "final.pt"
    torch.save({"w": torch.zeros(2)}, target)
    before = target.read_bytes()
    # torch.save itself raising ENOSPC
    monkeypatch.setattr(torch, "save", _enospc)
    with pytest.raises(OSError, match=f"no space left on .* while writing {target}"):
        atomic_torch_save({"w": torch.ones(2)}, target)
    monkeypatch.undo()
    # the file under torch.save filling up: torch turns the OSError into a RuntimeError, which is unwrapped
    real_fdopen = os.fdopen

    class Filling:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 1000:
                _enospc()
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(results.os, "fdopen", lambda fd, mode: Filling(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match=f"no space left on .* while writing {target}") as e:
        atomic_torch_save({"w": torch.ones(10_000)}, target)
    monkeypatch.undo()
    assert isinstance(e.value.__cause__, RuntimeError)
    assert target.read_bytes() == before and _leftovers(tmp_path) == []


def test_atomic_write_reraises_other_errors_unchanged_and_cleans_up(tmp_path, monkeypatch):
    class Boom(Exception):
        pass

    def boom(obj, f):
        f.write(b"partial")
        raise Boom("not a disk error")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(Boom):
        atomic_torch_save({}, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists() and _leftovers(tmp_path) == []


def test_unreadable_row_bytes_do_not_stop_reading(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"method": "vdm"}\n\xff\xfe garbage\n')
    with pytest.warns(UserWarning, match=f"{path}:2 "):
        assert read_rows(path) == [{"method": "vdm"}]
    assert json.loads(path.read_bytes().splitlines()[0]) == {"method": "vdm"}
