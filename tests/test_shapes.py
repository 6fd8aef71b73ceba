"""The embedded shapes dataset: deterministic, disjoint splits, separable content and motion."""

import torch

from datamodules import VideoDataModule
from datamodules.shapes import MOTIONS, ShapesConfig, ShapesDataset, trajectory


def test_items_are_deterministic_and_in_range():
    cfg = ShapesConfig(frames=8, resolution=16)
    a, b = ShapesDataset(cfg, "train")[3], ShapesDataset(cfg, "train")[3]
    assert torch.equal(a["video"], b["video"]) and a["text"] == b["text"]
    assert a["video"].shape == (3, 8, 16, 16)
    assert a["video"].min() >= -1 and a["video"].max() <= 1


def test_splits_are_disjoint_and_seed_changes_data():
    cfg = ShapesConfig(frames=4, resolution=16, train_size=64, val_size=64)
    train = {ShapesDataset(cfg, "train")[i]["video"].sum().item() for i in range(64)}
    val = {ShapesDataset(cfg, "val")[i]["video"].sum().item() for i in range(64)}
    assert not train & val
    other = ShapesDataset(ShapesConfig(frames=4, resolution=16, seed=1), "train")[0]["video"]
    assert not torch.equal(other, ShapesDataset(cfg, "train")[0]["video"])


def test_caption_names_the_motion_and_labels_cover_classes():
    ds = ShapesDataset(ShapesConfig(frames=4, resolution=16), "train")
    labels = set()
    for i in range(200):
        item = ds[i]
        labels.add(item["label"])
        assert item["text"].startswith("a ") and "background" in item["text"]
    assert labels == set(range(len(MOTIONS)))


def test_motion_is_what_the_label_says():
    """The sprite's centre moves in the labelled direction (content/motion separable by construction)."""
    base = {"size": 0.2, "x": 0.3, "y": 0.3, "phase": 0.0, "speed": 1.0}
    for name, check in {"left": lambda x, y, r: x[-1] < x[0], "right": lambda x, y, r: x[-1] > x[0],
                        "up": lambda x, y, r: y[-1] < y[0], "down": lambda x, y, r: y[-1] > y[0],
                        "grow": lambda x, y, r: r[-1] > r[0], "shrink": lambda x, y, r: r[-1] < r[0]}.items():
        x, y, r = trajectory({**base, "label": MOTIONS.index(name)}, 16)
        assert check(x, y, r), name


def test_num_classes_restricts_labels_and_datamodule_batches():
    dm = VideoDataModule(ShapesConfig(frames=4, resolution=16, num_classes=3))
    dm.setup()
    batch = next(iter(dm.loader_for("train", batch_size=8)))
    assert batch.video.shape == (8, 3, 4, 16, 16)
    assert batch.label.max() < 3 and len(batch.text) == 8 and dm.num_classes == 3
    assert batch.first_frame.shape == (8, 3, 16, 16)
