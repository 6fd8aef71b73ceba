"""UCF-101 in its official layout: 101 action classes, three train/test folds.

    <root>/UCF-101/<Class>/v_<Class>_gXX_cYY.avi      (root may also be the UCF-101 folder itself)
    <root>/ucfTrainTestlist/{classInd.txt, trainlist0N.txt, testlist0N.txt}

Labels follow classInd.txt (1-based there, 0-based here); captions are the class name in
words, "a video of apply eye makeup", for text-conditioned methods.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from datamodules.files import FileDatasetConfig, FileVideoDataset, Sample, require

LAYOUT = """  <dataset.root>/UCF-101/<Class>/v_<Class>_gXX_cYY.avi   (or dataset.root=<...>/UCF-101 itself)
  <dataset.root>/ucfTrainTestlist/classInd.txt, trainlist01.txt .. trainlist03.txt, testlist01.txt .. testlist03.txt
  (the split folder may also sit beside UCF-101/ or be given as dataset.splits_dir)"""

SPLIT_MODES = ("fold", "train", "test", "all")


@dataclass
class UCF101Config(FileDatasetConfig):
    name: str = "ucf101"
    resolution: int = 64
    fold: int = 1  # official split 1, 2 or 3
    split_mode: str = "fold"  # fold: train -> trainlist0N, val/test -> testlist0N; train|test|all: every split reads it
    splits_dir: str | None = None  # the ucfTrainTestlist folder; null: looked up under / beside the root
    caption_template: str = "a video of {}"  # {} = the class name in words ("apply eye makeup")


def class_words(name: str) -> str:
    """'ApplyEyeMakeup' -> 'apply eye makeup'."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).lower()


class UCF101Dataset(FileVideoDataset):
    """UCF-101 clips with class labels and class-name captions."""

    Config = UCF101Config
    LAYOUT = LAYOUT
    has_captions = True

    def list_samples(self) -> list[Sample]:
        cfg = self.cfg
        if cfg.fold not in (1, 2, 3):
            raise ValueError(f"dataset.fold must be 1, 2 or 3, got {cfg.fold}")
        if cfg.split_mode not in SPLIT_MODES:
            raise ValueError(f"dataset.split_mode must be one of {SPLIT_MODES}, got {cfg.split_mode!r}")
        videos = self.root / "UCF-101" if (self.root / "UCF-101").is_dir() else self.root
        if cfg.splits_dir:
            lists = require(Path(cfg.splits_dir).expanduser(), "UCF-101 split folder", "dataset.splits_dir", LAYOUT)
        else:
            candidates = [d / "ucfTrainTestlist" for d in (self.root, videos, self.root.parent)]
            lists = next((p for p in candidates if p.is_dir()), candidates[0])
        class_ind = require(lists / "classInd.txt", "UCF-101 class index", "dataset.root / dataset.splits_dir", LAYOUT)
        self.class_names = [line.split()[1] for line in class_ind.read_text().splitlines() if line.strip()]
        label_of = {c.lower(): i for i, c in enumerate(self.class_names)}

        mode = cfg.split_mode if cfg.split_mode != "fold" else ("train" if self.split == "train" else "test")
        kinds = ("train", "test") if mode == "all" else (mode,)
        samples, listings = [], {}
        for kind in kinds:
            listing = require(lists / f"{kind}list0{cfg.fold}.txt", f"UCF-101 {kind} list (fold {cfg.fold})",
                              "dataset.root / dataset.splits_dir / dataset.fold", LAYOUT)
            for line in listing.read_text().splitlines():
                if not line.strip():
                    continue
                rel = line.split()[0].replace("\\", "/")
                cls = rel.split("/")[0]
                if cls.lower() not in label_of:
                    raise ValueError(f"{listing}: class {cls!r} of {rel!r} is not in {class_ind}")
                label = label_of[cls.lower()]
                caption = cfg.caption_template.format(class_words(self.class_names[label]))
                samples.append(Sample(_resolve_case(videos, rel, listings), label, (caption,)))
        return samples


def _resolve_case(videos: Path, rel: str, listings: dict[Path, dict[str, str]]) -> Path:
    """videos/rel, matching names case-insensitively when needed (the lists write 'HandStandPushups'
    where the folder says 'HandstandPushups'); `listings` memoises folder contents."""
    path = videos / rel
    if path.exists():
        return path
    parts, cur = rel.split("/"), videos
    for part in parts:
        if not (cur / part).exists():
            if cur not in listings:
                listings[cur] = {p.name.lower(): p.name for p in cur.iterdir()} if cur.is_dir() else {}
            part = listings[cur].get(part.lower(), part)
        cur = cur / part
    return cur
