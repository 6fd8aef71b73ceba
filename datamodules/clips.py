"""The clip pipeline: where a clip starts, square crop + antialiased resize, looping, flip, [-1, 1].

Kept as pure functions over arrays and tensors so the decode path and the cache path share
every step: the cache stores exactly what `crop_resize` returns (uint8), and an item is
`to_item_video(...)` of it either way, so a cached clip equals a freshly decoded one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from datamodules.video_io import VideoInfo


@dataclass(frozen=True)
class ClipTiming:
    """Which source times make a clip: `frames` targets `step` seconds apart."""

    frames: int
    step: float  # seconds between clip frames

    @classmethod
    def of(cls, frames: int, stride: int, fps: float | None, source_fps: float) -> ClipTiming:
        """Every `stride`-th source frame, or resampled to `fps` frames per second when given."""
        if fps is not None and fps <= 0:
            raise ValueError(f"dataset.fps must be positive or null, got {fps}")
        return cls(frames, 1.0 / fps if fps else stride / source_fps)

    def max_start(self, info: VideoInfo) -> float:
        """Latest start (seconds) whose last target still falls on a source frame; < 0 if too short."""
        last = info.duration - 1.0 / info.fps  # time of the last source frame
        return last - (self.frames - 1) * self.step

    def fits(self, info: VideoInfo) -> bool:
        """Whether the video holds one whole clip."""
        return self.max_start(info) > -1e-6

    def start(self, u: float, info: VideoInfo) -> float:
        """Start time for a uniform draw u in [0, 1], snapped to a source frame time."""
        latest = max(self.max_start(info), 0.0)
        return math.floor(u * latest * info.fps + 1e-6) / info.fps


def crop_resize(frames: np.ndarray | Tensor, resolution: int, offset: tuple[float, float] = (0.5, 0.5)) -> Tensor:
    """Square crop of the shorter side at `offset`, then antialiased resize to `resolution`.

    frames: uint8 (T, H, W, 3). offset: (y, x) in [0, 1], where the crop sits along each axis
    (0.5 = centre). Cropping before resizing equals shorter-side resize + crop and costs less.
    Returns uint8 (T, resolution, resolution, 3).
    """
    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"crop_resize wants uint8 (T, H, W, 3); got {x.dtype} {tuple(x.shape)}")
    t, h, w, _ = x.shape
    side = min(h, w)
    top, left = round((h - side) * offset[0]), round((w - side) * offset[1])
    x = x[:, top: top + side, left: left + side]
    if side == resolution:
        return x.contiguous()
    # (T, H, W, 3) memory viewed as channels-last (T, 3, H, W): torch's antialiased bilinear
    # has a uint8 channels-last kernel, ~8x faster than converting to float and back
    x = F.interpolate(rearrange(x, "t h w c -> t c h w"), size=(resolution, resolution), mode="bilinear",
                      antialias=True, align_corners=False)  # (T, 3, R, R) uint8, channels-last
    return rearrange(x, "t c h w -> t h w c").contiguous()


def loop_frames(frames: np.ndarray, num_frames: int) -> np.ndarray:
    """Repeat a short clip from its start until it has `num_frames` frames: (T', ...) -> (num_frames, ...)."""
    if len(frames) == 0:
        raise ValueError("cannot loop an empty clip")
    return frames[np.arange(num_frames) % len(frames)]


def to_item_video(clip: Tensor, flip: bool = False) -> Tensor:
    """uint8 (T, H, W, 3) -> float32 (3, T, H, W) in [-1, 1], optionally mirrored left-right."""
    if flip:
        clip = clip.flip(2)
    # one strided copy into the (C, T, H, W) layout, then in-place arithmetic on contiguous memory
    x = rearrange(clip, "t h w c -> c t h w").to(torch.float32, memory_format=torch.contiguous_format)
    return x.mul_(1 / 127.5).sub_(1.0)
