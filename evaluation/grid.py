"""A PNG grid of videos: one row per video, evenly spaced frames across, optional captions."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F


def save_grid(videos_u8: torch.Tensor, path: str | Path, frames: int = 8, scale: int = 3,
              captions: list[str] | None = None, max_rows: int = 16) -> Path:
    """videos_u8 (N, C, T, H, W) uint8 -> PNG at `path` (written atomically)."""
    from PIL import Image, ImageDraw

    v = videos_u8[:max_rows]
    n, _, t, h, w = v.shape
    idx = torch.linspace(0, t - 1, min(frames, t)).round().long()
    rows = v[:, :, idx]  # (N, C, F, H, W)
    grid = rows.permute(0, 3, 2, 4, 1).reshape(n * h, len(idx) * w, v.shape[1])  # (N*H, F*W, C)
    if scale > 1:
        grid = F.interpolate(grid.permute(2, 0, 1)[None].float(), scale_factor=scale, mode="nearest")[0]
        grid = grid.permute(1, 2, 0).to(torch.uint8)
    img = Image.fromarray(grid.numpy())
    if captions:
        pad = 330
        canvas = Image.new("RGB", (img.width + pad, img.height), "white")
        canvas.paste(img, (pad, 0))
        draw = ImageDraw.Draw(canvas)
        for i, cap in enumerate(captions[:n]):
            draw.text((4, i * h * scale + 2), cap[:56], fill="black")
        img = canvas
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}.png")
    img.save(tmp)
    os.replace(tmp, path)
    return path
