"""Any folder of videos, or of frame-image folders (SkyTimelapse, TaiChi-HD), with optional captions/labels.

    <root>/**/*.mp4|avi|mkv|webm|mov|...       every video file, recursively
    <root>/**/<clip>/0001.png|jpg ...          every folder holding images is one video, frames in natural order
    <root>/<dataset.csv>                        optional: columns `path` (relative to root) and any of
                                                `caption` (or `text`/`name`), `label` (int or class name), `split`

Splits: with `train_dir`/`test_dir` (e.g. sky_train / sky_test) train reads root/train_dir and
val/test read root/test_dir; with a CSV `split` column each split reads its rows (val falls
back to test rows and back); otherwise every split reads every video.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from datamodules.files import FileDatasetConfig, FileVideoDataset, Sample, require
from datamodules.video_io import IMAGE_SUFFIXES, VIDEO_SUFFIXES, natural_key

LAYOUT = """  <dataset.root>/**/*.mp4 (.avi, .mkv, .webm, .mov, .mpg, .gif, ...)   or
  <dataset.root>/**/<clip>/<frame>.png|jpg   (one folder of images per video)
  optional <dataset.root>/<dataset.csv> with columns path[, caption][, label][, split]"""

CAPTION_COLUMNS = ("caption", "text", "name")


@dataclass
class FolderConfig(FileDatasetConfig):
    name: str = "folder"
    resolution: int = 64
    csv: str | None = None  # optional table of path[, caption][, label][, split], relative to root
    train_dir: str | None = None  # subfolder read by the train split (e.g. sky_train)
    test_dir: str | None = None  # subfolder read by the val and test splits (e.g. sky_test)
    labels_from_dirs: bool = False  # without a label column: the first subfolder under the split's folder is the class


def scan_videos(folder: Path) -> list[Path]:
    """Video files and frame-image folders under `folder`, in natural order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort(key=natural_key)
        here = Path(dirpath)
        if any(Path(f).suffix.lower() in IMAGE_SUFFIXES for f in filenames):
            found.append(here)  # a frame folder; its subfolders are not searched
            dirnames.clear()
            continue
        found += [here / f for f in sorted(filenames, key=natural_key) if Path(f).suffix.lower() in VIDEO_SUFFIXES]
    return found


class FolderDataset(FileVideoDataset):
    """Videos from a folder; labels and captions from an optional CSV (or subfolder names)."""

    Config = FolderConfig
    LAYOUT = LAYOUT

    def list_samples(self) -> list[Sample]:
        cfg = self.cfg
        if cfg.csv:
            return self._from_csv(require(self.root / cfg.csv, "folder dataset CSV", "dataset.csv", LAYOUT))
        sub = cfg.train_dir if self.split == "train" else cfg.test_dir
        key = "dataset.train_dir" if self.split == "train" else "dataset.test_dir"
        base = require(self.root / sub, f"{self.split} folder", key, LAYOUT) if sub else self.root
        paths = scan_videos(base)
        if not paths:
            raise FileNotFoundError(f"no videos or frame folders under {base} (config key `dataset.root`).\n"
                                    f"Expected layout:\n{LAYOUT}")
        if not cfg.labels_from_dirs:
            return [Sample(p) for p in paths]
        classes = [p.relative_to(base).parts[0] if len(p.relative_to(base).parts) > 1 else "" for p in paths]
        self.class_names = sorted(set(classes), key=natural_key)
        return [Sample(p, self.class_names.index(c)) for p, c in zip(paths, classes)]

    def _from_csv(self, table: Path) -> list[Sample]:
        with table.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        columns = set(rows[0]) if rows else set()
        if "path" not in columns:
            raise ValueError(f"{table} (config key `dataset.csv`) needs a `path` column; has {sorted(columns)}")
        if "split" in columns:
            present = {r["split"] for r in rows}
            want = {"train": ["train"], "val": ["val", "test"], "test": ["test", "val"]}[self.split]
            pick = next((w for w in want if w in present), None)
            rows = [r for r in rows if r["split"] == pick]
        caption_col = next((c for c in CAPTION_COLUMNS if c in columns), None)
        self.has_captions = caption_col is not None
        labels = [r["label"].strip() for r in rows] if "label" in columns else None
        if labels is not None:
            if all(v.lstrip("-").isdigit() for v in labels):
                ints = [int(v) for v in labels]
                self.class_names = [str(i) for i in range(max(ints) + 1)] if ints else []
            else:
                self.class_names = sorted(set(labels), key=natural_key)
                ints = [self.class_names.index(v) for v in labels]
        return [Sample(self.root / r["path"], ints[j] if labels is not None else -1,
                       (r[caption_col].strip(),) if caption_col else ())
                for j, r in enumerate(rows)]
