"""Score a trained run, a checkpoint, or any folder of generated videos with the evaluation protocol.

    python -m benchmarks.evaluate run=runs/vdm-shapes-20261121-101500             # a run folder (its config)
    python -m benchmarks.evaluate checkpoint=path/final.pt method=vdm dataset=shapes
    python -m benchmarks.evaluate samples_dir=my_model_videos/ dataset=ucf101 eval.paths.i3d_torchscript=/w/i3d.pt \
        eval.detector=i3d_torchscript eval.is_detector=c3d_torchscript
    ... append=true      also append the row to the results store (`results=`, default results/results.jsonl)

A samples folder holds videos (mp4 / gif / avi / ...) or frame folders; each is decoded
(`datamodules.video_io`), centre-cropped and resized to the dataset's resolution, and its
first `dataset.frames` frames (every `dataset.stride`-th) are scored as uint8, so nothing is
re-quantised. A file named like `012-<class name>.mp4` (how benchmarks.run writes samples)
counts as conditioned on that class; captions come from `captions.json` ({file name or stem:
caption}) in the folder, or `captions=<file>`. Any `eval.*` key of the run config applies.
Prints the metrics and protocol fields as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

USAGE = __doc__
OWN_KEYS = ("run", "checkpoint", "samples_dir", "captions", "append")


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
    from omegaconf import OmegaConf

    from benchmarks.config import load_config

    saved = OmegaConf.load(run_dir / "config.yaml")
    cfg = load_config([f"method={saved.method.name}", f"dataset={run_dir_dataset(run_dir, saved)}",
                       f"scale={saved.scale}"])
    cfg = OmegaConf.merge(cfg, saved)
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([o for o in overrides if o.split("=")[0] not in
                                                         ("method", "dataset", "scale")]))


def run_dir_dataset(run_dir: Path, saved) -> str:
    """The dataset config file a run used (its dataset.name unless a same-named file is missing)."""
    from benchmarks.config import CONFIG_DIR

    name = saved.dataset.name
    return name if (CONFIG_DIR / "dataset" / f"{name}.yaml").exists() else "shapes"


def _final_checkpoint(run_dir: Path, method) -> Path:
    """The last stage's final.pt: the whole method's state dict after its last stage (EMA weights)."""
    for stage in reversed(method.stages):
        path = run_dir / "checkpoints" / stage / "final.pt"
        if path.exists():
            return path
    raise FileNotFoundError(f"no checkpoints/<stage>/final.pt under {run_dir}: is the run finished?")


def evaluate_checkpoint(cfg, checkpoint: Path | None, run_dir: Path | None) -> dict:
    from benchmarks.common import build_datamodule, build_method, data_spec
    from evaluation.protocol import evaluate_method

    dm = build_datamodule(cfg)
    method = build_method(cfg, data_spec(cfg, dm))
    path = checkpoint if checkpoint is not None else _final_checkpoint(run_dir, method)
    method.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    if torch.cuda.is_available():
        method = method.cuda()
    out = evaluate_method(method, dm, cfg)
    return {"method": cfg.method.name, "dataset": cfg.dataset.name, "checkpoint": str(path), **out}


def _label_of(name: str, class_names: list[str]) -> int | None:
    """`012-left.mp4` -> index of "left" in class_names (None when the name carries no known class)."""
    stem = Path(name).stem
    parts = stem.split("-", 1)
    if len(parts) == 2 and parts[0].isdigit() and parts[1] in class_names:
        return class_names.index(parts[1])
    return None


def folder_batches(folder: Path, cfg, class_names: list[str], captions: dict[str, str], batch_size: int,
                   skipped: list[str]):
    """Yield (uint8 videos (B, 3, T, R, R), labels | None, captions | None) from a samples folder."""
    from datamodules.clips import crop_resize, loop_frames
    from datamodules.folder import scan_videos
    from datamodules.video_io import DecodeError, read_clip

    files = scan_videos(folder)
    if not files:
        raise SystemExit(f"error: no videos or frame folders found under {folder}")
    frames, res, stride = cfg.dataset.frames, cfg.dataset.resolution, cfg.dataset.stride
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
            clip = read_clip(f, frames, stride=stride)  # uint8 (T', H, W, 3)
        except DecodeError as e:
            skipped.append(f"{f}: {e}")
            continue
        if len(clip) == 0:
            skipped.append(f"{f}: no frames")
            continue
        clip = crop_resize(loop_frames(clip, frames) if len(clip) < frames else clip, res)  # (T, R, R, 3)
        rel = str(f.relative_to(folder))
        caption = captions.get(rel, captions.get(f.name, captions.get(f.stem)))
        buf.append((clip.permute(3, 0, 1, 2).contiguous(), _label_of(f.name, class_names), caption))
        if len(buf) == batch_size:
            yield flush()
    if buf:
        yield flush()


def evaluate_folder(cfg, folder: Path, captions_file: Path | None) -> dict:
    from benchmarks.common import build_datamodule
    from evaluation.protocol import evaluate_videos

    if not folder.is_dir():
        raise SystemExit(f"error: samples_dir={folder} is not a folder")
    captions_file = captions_file or (folder / "captions.json" if (folder / "captions.json").exists() else None)
    captions = json.loads(Path(captions_file).read_text()) if captions_file else {}
    dm = build_datamodule(cfg)
    skipped: list[str] = []
    batches = folder_batches(folder, cfg, dm.class_names, captions, cfg.eval.batch_size, skipped)
    out = evaluate_videos(batches, dm, cfg)
    return {"method": f"folder:{folder.name}", "dataset": cfg.dataset.name, "samples_dir": str(folder),
            "unreadable_videos": len(skipped), **out}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return {}
    from benchmarks.config import ConfigError, load_config, to_container

    own, rest = _split_args(argv)
    sources = [k for k in ("run", "checkpoint", "samples_dir") if k in own]
    if len(sources) != 1:
        raise SystemExit("error: give exactly one of run=<run folder>, checkpoint=<final.pt>, samples_dir=<folder>")
    try:
        if "run" in own:
            run_dir = Path(own["run"])
            if not (run_dir / "config.yaml").exists():
                raise SystemExit(f"error: {run_dir / 'config.yaml'} not found: run= wants a benchmarks.run folder")
            cfg = _run_config(run_dir, rest)
            row = evaluate_checkpoint(cfg, None, run_dir)
        elif "checkpoint" in own:
            ckpt = Path(own["checkpoint"])
            run_dir = ckpt.parents[2] if len(ckpt.parents) > 2 else None
            saved_run = run_dir is not None and (run_dir / "config.yaml").exists()
            cfg = _run_config(run_dir, rest) if saved_run else load_config(rest)
            row = evaluate_checkpoint(cfg, ckpt, None)
        else:
            cfg = load_config(rest)
            row = evaluate_folder(cfg, Path(own["samples_dir"]), Path(own["captions"]) if "captions" in own else None)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    if own.get("append", "false").lower() in ("1", "true", "yes"):
        from benchmarks.results import append_row

        append_row(cfg.results, {**row, "source": "benchmarks.evaluate", "eval_config": to_container(cfg.eval)})
    print(json.dumps(row, indent=2, default=str))
    return row


if __name__ == "__main__":
    main()
