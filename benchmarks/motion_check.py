"""Temporal coherence of saved samples: how much each run's frames change, against real clips.

    python -m benchmarks.motion_check runs/sweep-race_curves/*            # any benchmarks.run folders
    python -m benchmarks.motion_check runs/sweep-race_curves/* out=docs/results/race-epyc/motion.csv n_real=64

Every frame of a sample can look like the data while the frames do not follow one another: the video
flickers, and a motion classifier reads the flicker as some motion (at the race's 480 s budget the shapes
evaluator calls most of VideoFusion's samples "orbit"). FVD and accuracy say *that* such a run is bad, not
*how*. This command says how: it measures `evaluation.sanity.frame_motion` (the mean absolute change between
consecutive frames, in [-1, 1] pixel units) on each run's saved samples (`samples/*.mp4`; benchmarks.run
writes `sample.num_videos` of them) and on `n_real` held-out clips (`val`) of the run's dataset passed through
the same mp4 encoding (the codec's own noise adds frame change), and prints their ratio: about 1 where samples
move like the data, 0 for static videos, several times 1 for flicker. Runs written since the check existed
also carry the same two numbers, measured before encoding, in their results row's `sample_check`
(`motion`, `real_motion`).
"""

from __future__ import annotations

import csv
import io
import json
import sys
import tempfile
from pathlib import Path

import torch

FIELDS = ("run", "method", "time_budget", "seed", "n_samples", "motion", "real_motion", "ratio", "cond_acc", "fvd")


def read_mp4(path: Path) -> torch.Tensor:
    """A video file as (C, T, H, W) in [-1, 1] (the detectors' uint8 -> float rule)."""
    from datamodules.video_io import read_video
    from evaluation.detectors import rescale

    return rescale(torch.from_numpy(read_video(path))).permute(3, 0, 1, 2)


def videos_in(folder: Path) -> torch.Tensor:
    """Every mp4 of a samples folder, (N, C, T, H, W)."""
    files = sorted(folder.glob("*.mp4"))
    if not files:
        raise SystemExit(f"error: no samples (*.mp4) under {folder}: is it a benchmarks.run folder that has "
                         "finished sampling?")
    return torch.stack([read_mp4(f) for f in files])


def real_motion(cfg, n: int) -> float:
    """Mean frame change of n held-out clips of the run's dataset after the samples' mp4 round trip."""
    from benchmarks.common import build_datamodule
    from datamodules.video_io import write_video
    from evaluation.detectors import quantize
    from evaluation.sanity import frame_motion

    ds = build_datamodule(cfg).dataset("val")
    if len(ds) == 0:
        raise SystemExit(f"error: the dataset {cfg.dataset.name!r} has no val clips to measure real motion on")
    with tempfile.TemporaryDirectory() as tmp:
        clips = []
        for i in range(min(n, len(ds))):
            path = write_video(Path(tmp) / f"{i}.mp4", quantize(ds[i]["video"][None])[0].permute(1, 2, 3, 0),
                               fps=cfg.sample.fps)
            clips.append(read_mp4(path))
    return float(frame_motion(torch.stack(clips)).mean())


def measure(run_dirs: list[Path], n_real: int = 64) -> list[dict]:
    """One row per run folder (FIELDS); the real reference is measured once per distinct dataset config."""
    from benchmarks.evaluate import _run_config
    from benchmarks.run_folder import RunFolder
    from evaluation.sanity import frame_motion

    reals: dict[str, float] = {}
    rows = []
    for run_dir in run_dirs:
        folder = RunFolder(run_dir)
        if not folder.config_path.exists():
            raise SystemExit(f"error: {folder.config_path} not found: give benchmarks.run folders")
        cfg = _run_config(run_dir, [])
        key = json.dumps({"dataset": dict(cfg.dataset), "fps": cfg.sample.fps}, sort_keys=True, default=str)
        if key not in reals:
            reals[key] = real_motion(cfg, n_real)
        samples = videos_in(folder.samples_dir)
        motion = float(frame_motion(samples).mean())
        saved = folder.stored_row() or {}
        rows.append({"run": run_dir.name, "method": cfg.method.name, "time_budget": cfg.trainer.get("time_budget"),
                     "seed": cfg.seed, "n_samples": len(samples), "motion": motion, "real_motion": reals[key],
                     "ratio": motion / reals[key] if reals[key] > 0 else float("nan"),
                     "cond_acc": saved.get("cond_acc"), "fvd": saved.get("fvd")})
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = ["| run | method | samples | frame change | real clips' | ratio | cond. acc. | FVD |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "" if r["cond_acc"] is None else f"{r['cond_acc']:.2f}"
        fvd = "" if r["fvd"] is None else f"{r['fvd']:.0f}"
        lines.append(f"| {r['run']} | {r['method']} | {r['n_samples']} | {r['motion']:.4f} | {r['real_motion']:.4f} "
                     f"| {r['ratio']:.2f} | {acc} | {fvd} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    from benchmarks.results import atomic_write_text

    argv = sys.argv[1:] if argv is None else argv
    dirs = [Path(a) for a in argv if Path(a).is_dir()]  # run folder names hold "=": test them first
    opts = dict(a.split("=", 1) for a in argv if "=" in a and not Path(a).is_dir())
    unknown = sorted(set(opts) - {"out", "n_real"})
    if unknown:
        raise SystemExit(f"error: unknown option(s) {unknown}; options: out=<csv>, n_real=<int>")
    missing = [a for a in argv if "=" not in a and not Path(a).is_dir()]
    if missing:
        raise SystemExit(f"error: {missing} are not folders: give benchmarks.run folders")
    if not dirs:
        raise SystemExit("usage: python -m benchmarks.motion_check <run folder>... [out=<csv>] [n_real=64]")
    rows = measure(sorted(dirs), int(opts.get("n_real", 64)))
    print(to_markdown(rows))
    if "out" in opts:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(opts["out"], buf.getvalue())
        print(f"wrote {opts['out']}")
    return rows


if __name__ == "__main__":
    main()
