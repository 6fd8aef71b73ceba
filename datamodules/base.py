"""The dataset contract and the one `VideoDataModule` that wraps any registered dataset."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.batch import collate_items

SPLITS = ("train", "val", "test")


@dataclass
class DatasetConfig:
    """Fields every dataset understands; a dataset subclasses this for its own keys."""

    name: str = "shapes"
    root: str | None = None  # where the data lives (unused by the embedded shapes data)
    frames: int = 16  # frames per clip
    resolution: int = 32  # square side length after shorter-side resize + centre crop
    stride: int = 1  # keep every `stride`-th source frame
    channels: int = 3


@dataclass
class LoaderConfig:
    batch_size: int = 16
    num_workers: int = 0  # 0 keeps CPU runs simple; raise on a GPU box
    eval_batch_size: int = 16
    pin_memory: bool = False


class VideoDataset(Dataset):
    """Base of every dataset: items are `{"video": (C, T, H, W) float in [-1, 1], "label": int, "text": str|None}`.

    label is -1 for unlabelled data; text is None for data without captions.
    """

    Config: type[DatasetConfig] = DatasetConfig

    def __init__(self, cfg: DatasetConfig, split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        self.cfg = cfg
        self.split = split

    #: class names indexed by label; empty for unlabelled data
    class_names: list[str] = []
    #: whether items carry captions
    has_captions: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def skipped(self) -> int:
        """How many source files this split skipped as missing or unreadable."""
        return 0

    @property
    def skip_paths(self) -> dict[str, list[str]]:
        """The files this split skipped, by kind: {"missing": [...], "unreadable": [...], "short": [...]}."""
        return {"missing": [], "unreadable": [], "short": []}

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        raise NotImplementedError

    def eval_clip(self, index: int, seed: int) -> dict:
        """The index-th real clip of the evaluation set for `seed`, a pure function of (index, seed).

        File datasets override it: one clip per real video, in a seeded order, at a seeded random
        temporal offset. Procedural data is already a function of the index.
        """
        return self[index % len(self)]


def _with_frames(cfg: DatasetConfig, frames: int) -> DatasetConfig:
    """A copy of a dataset config (dataclass or OmegaConf node) with another clip length."""
    if dataclasses.is_dataclass(cfg):
        return dataclasses.replace(cfg, frames=frames)
    from omegaconf import OmegaConf

    out = OmegaConf.create(OmegaConf.to_container(cfg)) if not OmegaConf.is_config(cfg) else cfg.copy()
    out.frames = frames
    return out


class VideoDataModule(L.LightningDataModule):
    """Wraps any registered dataset; yields `VideoBatch` for training and evaluation."""

    def __init__(self, dataset_cfg: DatasetConfig, loader: LoaderConfig | None = None,
                 train_frames: int | None = None) -> None:
        """train_frames: frames per item of the training loader (`loader_for("train")`), when a method trains
        on longer items than it is evaluated on (PVDM: the previous clip and the clip); None: dataset.frames.
        Everything else (`dataset(split)`: the real evaluation set, conditioning) keeps dataset.frames."""
        super().__init__()
        from datamodules import DATASETS  # the registry imports the dataset modules

        if dataset_cfg.name not in DATASETS:
            raise ValueError(f"unknown dataset {dataset_cfg.name!r}; registered: {sorted(DATASETS)}")
        if train_frames is not None and train_frames < 1:
            raise ValueError(f"train_frames must be >= 1, got {train_frames}")
        self.dataset_cfg = dataset_cfg
        self.loader = loader or LoaderConfig()
        self.train_frames = None if train_frames in (None, dataset_cfg.frames) else train_frames
        self._cls = DATASETS[dataset_cfg.name]
        self._datasets: dict[str, VideoDataset] = {}

    def dataset(self, split: str = "train", frames: int | None = None) -> VideoDataset:
        """The split's dataset of dataset.frames-long items, or of `frames`-long items (same clips, longer)."""
        key = split if frames in (None, self.dataset_cfg.frames) else f"{split}@{frames}"
        if key not in self._datasets:
            cfg = self.dataset_cfg if key == split else _with_frames(self.dataset_cfg, frames)
            self._datasets[key] = self._cls(cfg, split)
        return self._datasets[key]

    def prepare_data(self) -> None:
        """Once per node before setup: a dataset with a decode cache fills it (progress bar, resumable)."""
        if getattr(self.dataset_cfg, "cache", False):
            self.dataset("train", self.train_frames).build_cache(num_workers=self.loader.num_workers)

    def setup(self, stage: str | None = None) -> None:
        self.dataset("train")

    def train_dataloader(self) -> DataLoader:
        return self.loader_for("train", shuffle=True, drop_last=True)

    def loader_for(self, split: str, *, shuffle: bool = False, drop_last: bool = False,
                   batch_size: int | None = None, seed: int = 0) -> DataLoader:
        ds = self.dataset(split, self.train_frames if split == "train" else None)
        bs = batch_size or (self.loader.batch_size if split == "train" else self.loader.eval_batch_size)
        if drop_last and len(ds) < bs:
            raise ValueError(f"dataset {self.dataset_cfg.name!r} split {split!r} has {len(ds)} clips, "
                             f"fewer than one batch of {bs}: lower data.batch_size")
        g = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=bs, shuffle=shuffle, drop_last=drop_last, collate_fn=collate_items,
                          num_workers=self.loader.num_workers, pin_memory=self.loader.pin_memory,
                          persistent_workers=self.loader.num_workers > 0, generator=g)

    # ---------------------------------------------------------------- faults, per file over splits
    # A file listed by two splits (UCF-101's "all" mode, WebVid's val and test) counts once.
    # Only splits built so far (`dataset(split)`) are looked at.

    def skip_report(self) -> dict[str, list[str]]:
        """Unique sorted paths of the missing, unreadable and (dropped) short files of every built split."""
        out: dict[str, set[str]] = {"missing": set(), "unreadable": set(), "short": set()}
        for ds in self._datasets.values():
            for kind, paths in ds.skip_paths.items():
                out.setdefault(kind, set()).update(paths)
        return {kind: sorted(paths) for kind, paths in out.items()}

    def skipped_files(self) -> list[str]:
        """Unique sorted paths of the files skipped as missing or unreadable (corrupt) in any built split."""
        report = self.skip_report()
        return sorted(set(report["missing"]) | set(report["unreadable"]))

    @property
    def skipped_videos(self) -> int:
        """How many distinct files were skipped as missing or unreadable: `len(skipped_files())`."""
        return len(self.skipped_files())

    def short_files(self) -> list[str]:
        """Unique sorted paths of the videos dropped as shorter than one clip (none with dataset.loop_short=true)."""
        return self.skip_report()["short"]

    @property
    def short_videos(self) -> int:
        """How many distinct videos were dropped as shorter than one clip: `len(short_files())`."""
        return len(self.short_files())

    @property
    def num_classes(self) -> int:
        return self.dataset("train").num_classes

    @property
    def has_captions(self) -> bool:
        return self.dataset("train").has_captions

    @property
    def class_names(self) -> list[str]:
        return self.dataset("train").class_names
