"""WebVid-10M (or -2M): stock-footage clips with their alt-text captions.

    <root>/results_10M_train.csv, results_10M_val.csv    columns: videoid, contentUrl, duration, page_dir, name
    <root>/<page_dir>/<videoid>.mp4

Rows whose video was never downloaded (common: links rot) are counted as missing and skipped.
At 10M files a setup probe of every file is slow, so `validate` defaults to false here:
unreadable files are then found, skipped and counted while training.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from datamodules.files import FileDatasetConfig, FileVideoDataset, Sample, require

LAYOUT = """  <dataset.root>/<dataset.train_csv>  e.g. results_10M_train.csv
                                      (columns videoid, contentUrl, duration, page_dir, name)
  <dataset.root>/<dataset.val_csv>    e.g. results_10M_val.csv
  <dataset.root>/<page_dir>/<videoid>.mp4"""

COLUMNS = ("videoid", "page_dir", "name")


@dataclass
class WebVidConfig(FileDatasetConfig):
    name: str = "webvid"
    resolution: int = 64
    train_csv: str = "results_10M_train.csv"  # relative to root, or absolute
    val_csv: str = "results_10M_val.csv"  # read by the val and test splits
    video_dir: str | None = None  # where <page_dir>/<videoid>.mp4 live; null: the root
    video_ext: str = ".mp4"
    validate: bool = False  # probing 10M files at setup takes hours; faults are still skipped and counted


class WebVidDataset(FileVideoDataset):
    """WebVid clips; `text` is the `name` column."""

    Config = WebVidConfig
    LAYOUT = LAYOUT
    has_captions = True

    def list_samples(self) -> list[Sample]:
        cfg = self.cfg
        name, key = (cfg.train_csv, "dataset.train_csv") if self.split == "train" else (cfg.val_csv, "dataset.val_csv")
        table = require(self.root / Path(name).expanduser(), f"WebVid {self.split} CSV", key, LAYOUT)
        videos = self.root / cfg.video_dir if cfg.video_dir else self.root
        samples = []
        with table.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            absent = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if absent:
                raise ValueError(f"{table} lacks columns {absent} (config key `{key}`); has {reader.fieldnames}.\n"
                                 f"Expected layout:\n{LAYOUT}")
            for row in reader:
                path = videos / row["page_dir"] / f"{row['videoid']}{cfg.video_ext}"
                samples.append(Sample(path, -1, (row["name"].strip(),)))
        return samples
