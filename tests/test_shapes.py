"""The embedded shapes dataset: deterministic, disjoint splits, separable content and motion."""

from pathlib import Path

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


# The first 64 train items of 16- and 8-frame clips must stay what they were before long clips existed: cached
# real statistics and trained runs depend on them. Their bytes are not portable (vectorised float32 sin / cos and
# fused multiply-adds round the last bit differently on AVX2, AVX-512 and AMX CPUs), so tests/data/shapes_moments.pt
# holds, per item, channel and frame, the pixel sum and its first moments along x and y (written on a machine whose
# bytes matched the earlier sha256 check: eb87ce4c... for 16x32, cf442edd... for 8x16): one sprite pixel
# moved, a colour changed or a frame mirrored shifts them by more than 0.05; last-bit rounding, by less than 1e-3.
CLIP_SHAPES = {"16x32": (16, 32), "8x16": (8, 16)}
MOMENTS = Path(__file__).parent / "data" / "shapes_moments.pt"


def _moments(videos: torch.Tensor) -> torch.Tensor:
    """(N, 3, T, 3): per item, channel and frame, sum(v), sum(v * x), sum(v * y) over pixels, in float64."""
    res = videos.shape[-1]
    coords = (torch.arange(res, dtype=torch.float64) + 0.5) / res
    v = videos.double()
    return torch.stack([v.sum((-2, -1)), (v * coords).sum((-2, -1)), (v * coords[:, None]).sum((-2, -1))], -1)


def test_clips_of_up_to_16_frames_are_unchanged():
    reference = torch.load(MOMENTS)
    for key, (frames, res) in CLIP_SHAPES.items():
        ds = ShapesDataset(ShapesConfig(frames=frames, resolution=res), "train")
        got = _moments(torch.stack([ds[i]["video"] for i in range(64)]))
        err = (got - reference[key]).abs().max().item()
        assert err < 1e-3, f"{key}: the rendered clips moved by {err:.3g} (sum of pixel values) from the reference"


def test_the_moments_check_catches_a_one_pixel_shift():
    ds = ShapesDataset(ShapesConfig(frames=8, resolution=16), "train")
    videos = torch.stack([ds[i]["video"] for i in range(64)])
    assert (_moments(videos.roll(1, dims=-1)) - torch.load(MOMENTS)["8x16"]).abs().max() > 0.05
    assert (_moments(videos.flip(-2)) - torch.load(MOMENTS)["8x16"]).abs().max() > 0.05


def _sprite_mask(video: torch.Tensor, item: dict) -> torch.Tensor:
    """(T, H, W) pixels closer to the sprite colour than to the background (video (3, T, H, W) in [-1, 1])."""
    from datamodules.shapes import BACKGROUNDS, COLORS

    fg = torch.tensor(list(COLORS.values())[item["color"]]).view(3, 1, 1, 1) * 2 - 1
    bg = torch.tensor(list(BACKGROUNDS.values())[item["background"]]).view(3, 1, 1, 1) * 2 - 1
    return (video - fg).abs().sum(0) < (video - bg).abs().sum(0)


def test_long_clips_continue_the_motion_and_keep_the_sprite():
    """64 / 128-frame clips start with the 16-frame clip exactly, keep the class's direction (translations wrap
    around the edges, grow / shrink repeat every 16 frames, orbit and bounce go on) and always show the sprite,
    of its colour, at its size."""
    short = ShapesDataset(ShapesConfig(frames=16, resolution=32), "train")
    for frames in (64, 128):
        ds = ShapesDataset(ShapesConfig(frames=frames, resolution=32), "train")
        seen = set()
        for i in range(48):
            item, a = ds[i], ds.attributes(i)
            video, motion = item["video"], MOTIONS[a["label"]]
            seen.add(motion)
            assert video.shape == (3, frames, 32, 32) and video.abs().max() <= 1
            assert torch.equal(video[:, :16], short[i]["video"])
            area = _sprite_mask(video, item).sum(dim=(1, 2)).float()  # (T,) sprite pixels per frame
            if motion in ("left", "right", "up", "down", "orbit", "bounce"):  # rigid motion: the same size always
                assert area.min() > 0.8 * area[0] and area.max() < 1.25 * area[0], (motion, area)
            else:  # grow / shrink: each 16-frame period repeats the first
                assert area.min() > 0
                torch.testing.assert_close(video[:, 16:32], video[:, :16], rtol=0, atol=1e-5)
            x, y, r = trajectory(a, frames)
            step = {"left": -(x.diff() % 1 - 1) % 1, "right": x.diff() % 1, "up": -(y.diff() % 1 - 1) % 1,
                    "down": y.diff() % 1}.get(motion)
            if step is not None:  # the same direction and speed every frame, through the wraps
                torch.testing.assert_close(step, torch.full_like(step, 0.5 * a["speed"] / 15), rtol=0, atol=1e-5)
        assert seen == set(MOTIONS)
