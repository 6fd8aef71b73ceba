"""MSR-VTT: 10k web videos with 20 captions each.

    <root>/MSRVTT_data.json            {"videos": [{"video_id", "split"}, ...],
                                        "sentences": [{"video_id", "caption", "sen_id"}, ...]}
    <root>/videos/all/<video_id>.mp4   (or MSRVTT_Videos/, videos/; or dataset.video_dir)
    <root>/MSRVTT_train.9k.csv, MSRVTT_JSFUSION_test.csv   optional: the standard 9k / 1k-A split

Splits: with the 9k/1k-A CSVs (split_scheme auto or 9k) train reads the 9k list and val/test
the 1k-A list; without them (or split_scheme official) train/val/test are the JSON's
train (6513) / validate (497) / test (2990). Training draws a random caption per sample,
evaluation takes the first (lowest sen_id).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from datamodules.files import FileDatasetConfig, FileVideoDataset, Sample, require

LAYOUT = """  <dataset.root>/MSRVTT_data.json   (also found under annotation/ or msrvtt_data/)
  <dataset.root>/videos/all/<video_id>.mp4   (or MSRVTT_Videos/, videos/, or dataset.video_dir)
  optional, for the 9k/1k-A split: <dataset.root>/MSRVTT_train.9k.csv, MSRVTT_JSFUSION_test.csv"""

SCHEMES = ("auto", "9k", "official")
OFFICIAL = {"train": "train", "val": "validate", "test": "test"}
SUBDIRS = ("", "annotation", "msrvtt_data")
VIDEO_DIRS = ("videos/all", "MSRVTT_Videos", "videos")


@dataclass
class MSRVTTConfig(FileDatasetConfig):
    name: str = "msrvtt"
    resolution: int = 64
    data_json: str = "MSRVTT_data.json"  # relative to root (or its annotation/ folder), or absolute
    video_dir: str | None = None  # null: the first of videos/all, MSRVTT_Videos, videos under the root
    split_scheme: str = "auto"  # auto: 9k/1k-A when both CSVs exist, else official; 9k; official
    train_csv: str = "MSRVTT_train.9k.csv"
    test_csv: str = "MSRVTT_JSFUSION_test.csv"  # the 1k-A test list; val and test both read it


class MSRVTTDataset(FileVideoDataset):
    """MSR-VTT clips with their captions (no labels)."""

    Config = MSRVTTConfig
    LAYOUT = LAYOUT
    has_captions = True

    def _find(self, name: str) -> Path | None:
        return next((self.root / d / name for d in SUBDIRS if (self.root / d / name).is_file()), None)

    def list_samples(self) -> list[Sample]:
        cfg = self.cfg
        if cfg.split_scheme not in SCHEMES:
            raise ValueError(f"dataset.split_scheme must be one of {SCHEMES}, got {cfg.split_scheme!r}")
        data = require(self._find(cfg.data_json) or self.root / cfg.data_json, "MSR-VTT annotation JSON",
                       "dataset.data_json", LAYOUT)
        meta = json.loads(data.read_text())
        captions: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for s in meta["sentences"]:
            captions[s["video_id"]].append((s.get("sen_id", 0), s["caption"].strip()))

        train_csv, test_csv = self._find(cfg.train_csv), self._find(cfg.test_csv)
        scheme = cfg.split_scheme
        if scheme == "auto":
            scheme = "9k" if train_csv and test_csv else "official"
        if scheme == "9k":
            name, key = (cfg.train_csv, "dataset.train_csv") if self.split == "train" else (cfg.test_csv,
                                                                                             "dataset.test_csv")
            table = require(self._find(name) or self.root / name, "MSR-VTT 9k/1k-A split CSV", key, LAYOUT)
            with table.open(newline="", encoding="utf-8") as f:
                ids = [row["video_id"] for row in csv.DictReader(f)]
        else:
            ids = [v["video_id"] for v in meta["videos"] if v["split"] == OFFICIAL[self.split]]

        if cfg.video_dir:
            videos = require(self.root / cfg.video_dir, "MSR-VTT video folder", "dataset.video_dir", LAYOUT)
        else:
            videos = next((self.root / d for d in VIDEO_DIRS if (self.root / d).is_dir()), None)
            if videos is None:
                raise FileNotFoundError(f"no MSR-VTT video folder under {self.root} (tried {', '.join(VIDEO_DIRS)}; "
                                        f"config key `dataset.video_dir`).\nExpected layout:\n{LAYOUT}")
        ids = list(dict.fromkeys(ids))  # 1k-A style lists may repeat a video
        return [Sample(videos / f"{vid}.mp4", -1, tuple(c for _, c in sorted(captions[vid]))) for vid in ids]
