"""Datasets that all yield the same item type, and the VideoDataModule that wraps them."""

from datamodules.base import DatasetConfig, LoaderConfig, VideoDataModule, VideoDataset
from datamodules.batch import VideoBatch, collate_items
from datamodules.folder import FolderDataset
from datamodules.msrvtt import MSRVTTDataset
from datamodules.shapes import ShapesDataset
from datamodules.ucf101 import UCF101Dataset
from datamodules.webvid import WebVidDataset

# A plain dict of explicit imports: adding a dataset is one import and one line here.
DATASETS: dict[str, type[VideoDataset]] = {
    "shapes": ShapesDataset,
    "ucf101": UCF101Dataset,
    "webvid": WebVidDataset,
    "msrvtt": MSRVTTDataset,
    "folder": FolderDataset,
}

__all__ = ["DATASETS", "DatasetConfig", "LoaderConfig", "VideoBatch", "VideoDataModule", "VideoDataset",
           "collate_items"]
