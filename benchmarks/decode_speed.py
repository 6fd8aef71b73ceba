"""Clips per second: raw PyAV decode vs the datamodule's decode path vs its memory-mapped cache.

    python -m benchmarks.decode_speed                          # synthetic UCF-like files (320x240, 25 fps)
    python -m benchmarks.decode_speed --root /data/clips --frames 16 --resolution 64 --out results/decode_speed.csv

All modes read the same clips (the `val` split's deterministic offsets) of the same files:
  raw     open + seek + decode + `frame.to_ndarray(format="rgb24")`: the plainest PyAV code
  raw_reformatter  the same, converting through one reused VideoReformatter (as the datamodule
          does): the least any loader must do
  decode  `dataset[i]` with the cache off: seek, nearest-frame selection, crop, antialiased resize, [-1, 1]
  cached  `dataset[i]` reading the decode cache (built first; its build time is reported too)
The modes take turns, one pass over the files each, for at least `--seconds` per source; the
rate is files / median pass time. One CSV row per (source, mode).
torch runs one thread by default, as in a DataLoader worker (`--torch-threads`).
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
import warnings
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from datamodules.clips import ClipTiming
from datamodules.files import CorruptVideoWarning
from datamodules.folder import FolderDataset
from datamodules.video_io import write_video


def synthetic_videos(folder: Path, n: int, suffix: str, frames: int = 75, size: tuple[int, int] = (240, 320)) -> None:
    """n videos of a drifting smooth texture (compresses like real footage, unlike flat test patterns)."""
    rng = np.random.default_rng(0)
    h, w = size
    for k in range(n):
        noise = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3)).astype(np.float32)
        texture = np.kron(noise, np.ones((8, 8, 1), np.float32))  # blocky, then smoothed by a box filter
        texture = (texture + np.roll(texture, 4, 0) + np.roll(texture, 4, 1) + np.roll(texture, 4, (0, 1))) / 4
        video = np.stack([np.roll(texture, (t * 2, t * 3), (0, 1))[:h, :w] for t in range(frames)])
        write_video(folder / f"v{k:03d}{suffix}", video.astype(np.uint8), fps=25)


def raw_clip(path: Path, start: float, step: float, frames: int, threads: int, reuse: bool = False) -> np.ndarray:
    """The plainest PyAV code for one clip: seek, decode forward, convert the frames on the step grid.

    reuse: convert through one VideoReformatter (what the datamodule does) instead of
    `frame.to_ndarray(format="rgb24")`, which sets up a new converter for every frame.
    """
    rgb = VideoReformatter() if reuse else None
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if threads != 1:
            stream.thread_type = "AUTO"
        stream.thread_count = threads
        tb, t0 = float(stream.time_base), float((stream.start_time or 0) * stream.time_base)
        if start > 0:
            container.seek(int((t0 + start) / tb), stream=stream)
        out, k = [], 0
        for frame in container.decode(stream):
            t = frame.pts * tb - t0
            if t + 1e-6 >= start + k * step:
                out.append(rgb.reformat(frame, format="rgb24").to_ndarray() if reuse
                           else frame.to_ndarray(format="rgb24"))
                k += 1
                if k == frames:
                    break
    return np.stack(out)


def interleaved(modes: dict, n: int, seconds: float, min_passes: int = 3) -> dict[str, list[float]]:
    """Seconds per pass over items 0..n-1 for each mode, the modes taking turns pass by pass
    (so load from other processes hits them alike), until `seconds` have passed in all."""
    passes = {name: [] for name in modes}
    begin = time.perf_counter()
    while len(passes[next(iter(modes))]) < min_passes or time.perf_counter() - begin < seconds:
        for name, fn in modes.items():
            t = time.perf_counter()
            for i in range(n):
                fn(i)
            passes[name].append(time.perf_counter() - t)
    return passes


def run(root: Path, label: str, args, cache_dir: Path) -> list[dict]:
    cfg = FolderDataset.Config(root=str(root), frames=args.frames, stride=args.stride, resolution=args.resolution,
                               cache_dir=str(cache_dir), decode_threads=args.threads)
    ds = FolderDataset(cfg, "val")
    cached = FolderDataset(FolderDataset.Config(**{**cfg.__dict__, "cache": True}), "val")
    n = len(ds)
    starts = []
    for i in range(n):  # the same clip the val split decodes
        info = ds.infos[i]
        timing = ClipTiming.of(cfg.frames, cfg.stride, cfg.fps, info.fps)
        starts.append((timing.start(ds._uniform(cfg.seed, i), info), timing.step))

    begin = time.perf_counter()
    cached.build_cache(progress=False)
    build_s = time.perf_counter() - begin
    raw = lambda i: raw_clip(ds.samples[i].path, *starts[i], cfg.frames, args.threads)  # noqa: E731
    raw_reuse = lambda i: raw_clip(ds.samples[i].path, *starts[i], cfg.frames, args.threads, reuse=True)  # noqa: E731
    passes = interleaved({"raw": raw, "raw_reformatter": raw_reuse, "decode": ds.__getitem__,
                          "cached": cached.__getitem__}, n, args.seconds)
    rows = [{"mode": name, "clips": n * len(p), "seconds": sum(p), "pass_s": float(np.median(p))}
            for name, p in passes.items()]
    rows.append({"mode": "cache_build", "clips": n, "seconds": build_s, "pass_s": build_s})
    raw_rate, raw_best = n / rows[0]["pass_s"], n / rows[1]["pass_s"]
    for r in rows:
        r["clips_per_s"] = n / r["pass_s"]  # median pass: robust to other processes' load
        r["speed_vs_raw"] = r["clips_per_s"] / raw_rate
        r["speed_vs_raw_reformatter"] = r["clips_per_s"] / raw_best
        r.update(source=label, files=n, frames=cfg.frames, stride=cfg.stride, resolution=cfg.resolution,
                 source_size=f"{ds.infos[0].width}x{ds.infos[0].height}")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=None, help="a folder of videos (default: synthetic UCF-like files)")
    p.add_argument("--files", type=int, default=12, help="synthetic files per format")
    p.add_argument("--formats", default=".avi,.mp4", help="synthetic formats: .avi (MPEG-4 part 2, as UCF-101), .mp4")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="FFmpeg decode threads (0: FFmpeg picks)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads (DataLoader workers use 1)")
    p.add_argument("--seconds", type=float, default=6.0, help="minimum measuring time per source")
    p.add_argument("--out", type=Path, default=Path("results/decode_speed.csv"))
    args = p.parse_args(argv)

    warnings.simplefilter("ignore", CorruptVideoWarning)
    torch.set_num_threads(args.torch_threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.root is not None:
            rows += run(args.root, str(args.root), args, tmp / "cache")
        else:
            for suffix in args.formats.split(","):
                folder = tmp / suffix.strip(".")
                folder.mkdir()
                synthetic_videos(folder, args.files, suffix)
                rows += run(folder, f"synthetic{suffix}", args, tmp / "cache")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["source", "mode", "clips", "seconds", "pass_s", "clips_per_s", "speed_vs_raw",
              "speed_vs_raw_reformatter", "files", "frames",
              "stride", "resolution", "source_size"]
    with args.out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    for r in rows:
        print(f"{r['source']:>14} {r['mode']:>15}: {r['clips_per_s']:8.1f} clips/s  ({r['speed_vs_raw']:.2f}x raw, "
              f"{r['speed_vs_raw_reformatter']:.2f}x raw_reformatter)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
