"""Score a trained run, a checkpoint, or any folder of generated videos with the evaluation protocol.

    python -m benchmarks.evaluate run=runs/vdm-shapes-20261121-101500             # a run folder (its config)
    python -m benchmarks.evaluate checkpoint=path/final.pt method=vdm dataset=shapes
    python -m benchmarks.evaluate samples_dir=my_model_videos/ dataset=ucf101 eval.paths.i3d_torchscript=/w/i3d.pt \
        eval.detector=i3d_torchscript eval.is_detector=c3d_torchscript
    ... append=true      also append the row to the results store (`results=`, default results/results.jsonl)
    ... loop_short=true  loop videos shorter than dataset.frames (else an error); the row counts them: looped_videos
    ... resize=true      centre-crop and resize videos whose size is not dataset.resolution (else an error)

A samples folder holds videos (mp4 / gif / avi / ...) or frame folders. Generated videos are
scored as they are: the first `dataset.frames` consecutive frames of each (`dataset.stride` and
`dataset.fps` describe how real clips are cut from the dataset's videos and are not applied to
them), decoded (`datamodules.video_io`) to uint8, so nothing is re-quantised. They must have at
least `dataset.frames` frames and be `dataset.resolution` pixels square, the size the real clips
are scored at; anything else is an error naming the file, unless `loop_short=true` /
`resize=true` says otherwise. Files that cannot be decoded are skipped with a warning naming
them; the row reports `unreadable_videos` (count) and `unreadable_files` (the first 10).
A file named like `012-<class name>.mp4` (how benchmarks.run writes samples)
counts as conditioned on that class; captions come from `captions.json` ({file name or stem:
caption}) in the folder, or `captions=<file>`. Any `eval.*` key of the run config applies.
Prints the metrics and protocol fields as JSON.
"""

from __future__ import annotations

import itertools
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

USAGE = __doc__
OWN_KEYS = ("run", "checkpoint", "samples_dir", "captions", "append", "loop_short", "resize")
SHOW_FILES = 10  # unreadable files named in the row (all are counted)


class SamplesError(ValueError):
    """A generated video that cannot be scored as the protocol asks (too short, wrong size)."""


@dataclass
class FolderReport:
    """What `folder_batches` did to the files of a samples folder."""

    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of files that could not be decoded
    looped: list[str] = field(default_factory=list)  # files shorter than dataset.frames, looped (loop_short=true)
    resized: list[str] = field(default_factory=list)  # files not dataset.resolution square, resized (resize=true)


def _flag(value: str, key: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes"):
        return True
    if v in ("0", "false", "no", ""):
        return False
    raise SystemExit(f"error: {key}={value!r}: want true or false")


def _split_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    own, rest = {}, []
    for a in argv:
        key = a.split("=", 1)[0]
        if key in OWN_KEYS and "=" in a:
            own[key] = a.split("=", 1)[1]
        else:
            rest.append(a)
    return own, rest


def _run_config(run_dir: Path, overrides: list[str]):
    """A run folder's saved config with `overrides` on top (validated by the same schemas)."""
    from benchmarks.config import merge_overrides, predates_note, saved_run_config
    from benchmarks.run_folder import RunFolder

    folder = RunFolder(run_dir)
    saved = folder.saved_config()
    cfg, reset = saved_run_config(saved, run_dir_dataset(run_dir, saved), str(folder.config_path))
    if reset:
        print(predates_note(str(folder.config_path), reset), file=sys.stderr)
    return merge_overrides(cfg, [o for o in overrides if o.split("=")[0] not in ("method", "dataset", "scale")],
                           "command line")


def run_dir_dataset(run_dir: Path, saved) -> str:
    """The dataset config file a run used (its dataset.name unless a same-named file is missing)."""
    from benchmarks.config import CONFIG_DIR

    name = saved.dataset.name
    return name if (CONFIG_DIR / "dataset" / f"{name}.yaml").exists() else "shapes"


def evaluate_checkpoint(cfg, checkpoint: Path | None, run_dir: Path | None) -> dict:
    from benchmarks.common import build_datamodule, build_method, data_spec
    from benchmarks.efficiency import sample_gflops
    from benchmarks.run_folder import RunFolder
    from evaluation.protocol import evaluate_method

    dm = build_datamodule(cfg)
    method = build_method(cfg, data_spec(cfg, dm))
    path = checkpoint if checkpoint is not None else RunFolder(run_dir).final_checkpoint(method.stages)
    method.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    if torch.cuda.is_available():
        method = method.cuda()
    out = evaluate_method(method, dm, cfg)
    return {"method": cfg.method.name, "dataset": cfg.dataset.name, "checkpoint": str(path), **out,
            "gflops_per_video": sample_gflops(cfg, dm)}  # of these sampler settings (a re-evaluation may change them)


def _label_of(name: str, class_names: list[str]) -> int | None:
    """`012-left.mp4` -> index of "left" in class_names (None when the name carries no known class)."""
    stem = Path(name).stem
    parts = stem.split("-", 1)
    if len(parts) == 2 and parts[0].isdigit() and parts[1] in class_names:
        return class_names.index(parts[1])
    return None


def folder_batches(folder: Path, cfg, class_names: list[str], captions: dict[str, str], batch_size: int,
                   report: FolderReport, *, loop_short: bool = False, resize: bool = False):
    """Yield (uint8 videos (B, 3, T, R, R), labels | None, captions | None) from a samples folder.

    Each video's first `dataset.frames` frames, every frame (no dataset.stride: generated videos
    are scored as they are). A shorter video raises SamplesError unless `loop_short` (then it is
    looped and listed in `report.looped`); a video not `dataset.resolution` square raises unless
    `resize` (centre crop + antialiased resize, listed in `report.resized`). Undecodable files are
    skipped and listed in `report.unreadable`.
    """
    from datamodules.clips import crop_resize, loop_frames
    from datamodules.folder import scan_videos
    from datamodules.video_io import DecodeError, read_clip

    files = scan_videos(folder)
    if not files:
        raise SystemExit(f"error: no videos or frame folders found under {folder}")
    frames, res = cfg.dataset.frames, cfg.dataset.resolution
    buf: list[tuple[torch.Tensor, int | None, str | None]] = []

    def flush():
        videos = torch.stack([b[0] for b in buf])
        labels = [b[1] for b in buf]
        texts = [b[2] for b in buf]
        lab = torch.tensor(labels) if all(x is not None for x in labels) else None
        txt = texts if all(x is not None for x in texts) else None
        buf.clear()
        return videos, lab, txt

    for f in files:
        try:
            clip = read_clip(f, frames)  # uint8 (T', H, W, 3): the first `frames` frames, T' <= frames
        except DecodeError as e:
            report.unreadable.append((str(f), f"{type(e).__name__}: {e}"))
            continue
        if len(clip) == 0:
            report.unreadable.append((str(f), "no frames"))
            continue
        if len(clip) < frames:
            if not loop_short:
                raise SamplesError(
                    f"{f} has {len(clip)} frames; the evaluation scores dataset.frames={frames} frames per video "
                    f"(generated videos are read frame by frame, dataset.stride does not apply). Generate "
                    f"{frames}-frame videos, set dataset.frames={len(clip)} (real clips are cut to match), or pass "
                    f"loop_short=true to loop short videos (the row then records looped_videos)")
            clip = loop_frames(clip, frames)
            report.looped.append(str(f))
        h, w = clip.shape[1:3]
        if (h, w) != (res, res):
            if not resize:
                hint = f"Set dataset.resolution={h}" if h == w else "Make the videos square"
                raise SamplesError(
                    f"{f} is {w}x{h} pixels; real clips are scored at dataset.resolution={res} ({res}x{res}). "
                    f"{hint} so both sides are scored at the same size, or pass resize=true to "
                    f"centre-crop and resize the generated videos to {res}x{res}")
            clip = crop_resize(clip, res)
            report.resized.append(str(f))
        clip = torch.as_tensor(clip)  # (T, R, R, 3) uint8
        rel = str(f.relative_to(folder))
        caption = captions.get(rel, captions.get(f.name, captions.get(f.stem)))
        buf.append((clip.permute(3, 0, 1, 2).contiguous(), _label_of(f.name, class_names), caption))
        if len(buf) == batch_size:
            yield flush()
    if buf:
        yield flush()


def evaluate_folder(cfg, folder: Path, captions_file: Path | None, *, loop_short: bool = False,
                    resize: bool = False) -> dict:
    from benchmarks.common import build_datamodule
    from evaluation.protocol import evaluate_videos

    if not folder.is_dir():
        raise SystemExit(f"error: samples_dir={folder} is not a folder")
    captions_file = captions_file or (folder / "captions.json" if (folder / "captions.json").exists() else None)
    captions = json.loads(Path(captions_file).read_text()) if captions_file else {}
    dm = build_datamodule(cfg)
    report = FolderReport()
    batches = folder_batches(folder, cfg, dm.class_names, captions, cfg.eval.batch_size, report,
                             loop_short=loop_short, resize=resize)
    first = next(batches, None)  # decode the first batch before the real statistics: a bad folder fails fast
    out = evaluate_videos(itertools.chain([first] if first is not None else [], batches), dm, cfg)
    if report.unreadable:
        from datamodules.files import CorruptVideoWarning

        more = f" and {len(report.unreadable) - 3} more" if len(report.unreadable) > 3 else ""
        warnings.warn(f"{len(report.unreadable)} files under {folder} could not be decoded and were not scored: "
                      f"{'; '.join(f'{p} ({why})' for p, why in report.unreadable[:3])}{more}", CorruptVideoWarning, stacklevel=2)
    return {"method": f"folder:{folder.name}", "dataset": cfg.dataset.name, "samples_dir": str(folder),
            "unreadable_videos": len(report.unreadable),
            "unreadable_files": [p for p, _ in report.unreadable[:SHOW_FILES]],
            "looped_videos": len(report.looped), "resized_videos": len(report.resized), **out}


def _reevaluated_config(stored: dict, cfg) -> dict:
    """The config a re-evaluation's numbers belong to. Overrides that change them (`sample.guidance=5`) make it
    another experiment: the row then holds the overridden config and its hash, so the leaderboard gives it its own
    line (with the setting as a column) and a sweep job of that config finds it. Keys the stored config lacks
    (added to the schema after the run) do not count: re-scoring an old run still replaces its row."""
    from benchmarks.config import config_hash, to_container
    from benchmarks.run_folder import config_difference

    if not isinstance(stored.get("config"), dict):
        return {}
    wanted = to_container(cfg)
    if not any(old != "<absent>" for _, old, _ in config_difference(stored["config"], wanted)):
        return {}
    return {"config": wanted, "config_sha256": config_hash(wanted)}


def _reevaluated_cost(row: dict, cfg) -> dict:
    """A re-evaluation under another config: the run's sampler fields and its sampling seconds per video belong to
    the run's settings, so the row takes this config's settings and the evaluation's own seconds per video
    (`gflops_per_video` comes from the evaluation row)."""
    from benchmarks.run import sampling_fields

    return {**sampling_fields(cfg), "sample_seconds_per_video": row.get("eval_sample_seconds_per_video")}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return {}
    from benchmarks.config import ConfigError, load_config, to_container
    from benchmarks.run_folder import RunFolder

    own, rest = _split_args(argv)
    sources = [k for k in ("run", "checkpoint", "samples_dir") if k in own]
    if len(sources) != 1:
        raise SystemExit("error: give exactly one of run=<run folder>, checkpoint=<final.pt>, samples_dir=<folder>")
    try:
        if "run" in own:
            run_dir = Path(own["run"])
            if not RunFolder(run_dir).has_run():
                raise SystemExit(f"error: {RunFolder(run_dir).config_path} not found: run= wants a benchmarks.run folder")
            cfg = _run_config(run_dir, rest)
            row = evaluate_checkpoint(cfg, None, run_dir)
        elif "checkpoint" in own:
            ckpt = Path(own["checkpoint"])
            run_dir = ckpt.parents[2] if len(ckpt.parents) > 2 else None
            saved_run = run_dir is not None and RunFolder(run_dir).has_run()
            cfg = _run_config(run_dir, rest) if saved_run else load_config(rest)
            row = evaluate_checkpoint(cfg, ckpt, None)
        else:
            cfg = load_config(rest)
            row = evaluate_folder(cfg, Path(own["samples_dir"]), Path(own["captions"]) if "captions" in own else None,
                                  loop_short=_flag(own.get("loop_short", "false"), "loop_short"),
                                  resize=_flag(own.get("resize", "false"), "resize"))
    except (ConfigError, SamplesError) as e:
        raise SystemExit(f"error: {e}") from None
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    if _flag(own.get("append", "false"), "append"):
        from benchmarks.results import append_row

        extra = {"source": "benchmarks.evaluate", "eval_config": to_container(cfg.eval)}
        stored = RunFolder(own["run"]).stored_row() if "run" in own else None
        if stored is not None:  # a re-evaluation: the run's own fields, the new scores; it replaces the run's row
            from datetime import datetime

            changed = _reevaluated_config(stored, cfg)
            row = {**stored, **row, **extra, **changed, **(_reevaluated_cost(row, cfg) if changed else {}),
                   "reevaluation_of": stored.get("run_dir", own["run"]), "time": datetime.now().isoformat(timespec="seconds")}
        append_row(cfg.results, {**row, **extra})
    print(json.dumps(row, indent=2, default=str))
    return row


if __name__ == "__main__":
    main()
