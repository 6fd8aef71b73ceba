"""A PNG grid of videos: one row per video, evenly spaced frames across, optional captions; and what each sample
was conditioned on, the words a grid row, a report cell or `samples/conditioning.json` labels it with.

A sample is labelled with what its method was conditioned on, never with more: a class-conditional method's
sample with its class name (not the real clip's caption, which it never saw), a text-conditional one's with
the caption, an image-to-video one's with "first frame of <split> clip <i>". Importing this module does not
import torch (`benchmarks.report` uses the labels).
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

CONDITIONING_KINDS = ("class", "text")  # in label order
UNCONDITIONAL = "nothing (unconditional)"


def conditioning_kinds(method_cfg) -> tuple[str, ...]:
    """What a method's networks are conditioned on, from its config (a dict or DictConfig): a subset of
    ("class", "text").

    Every `conditioning` value anywhere in the method config counts ("class+text" is both; "none" neither):
    VDM, PVDM and (E)D-VDM set `method.conditioning`; CMD its `image_prior` (the content model) and `motion`;
    VideoFusion its `image_prior` (the base generator) and `residual`.
    """
    found: set[str] = set()

    def walk(node) -> None:
        if hasattr(node, "items"):
            for key, value in node.items():
                if key == "conditioning" and isinstance(value, str):
                    found.update(part.strip() for part in value.split("+"))
                else:
                    walk(value)

    walk(method_cfg)
    return tuple(k for k in CONDITIONING_KINDS if k in found)


def task_of(method_cfg, image_to_video: bool = False) -> str:
    """The generation task a method config solves, as results rows record it (`task`): "unconditional",
    "class", "text", "class+text", or with a given first frame "image", "image+class", "image+text",
    "image+class+text". Numbers of two tasks are not comparable (benchmarks.leaderboard keeps them apart)."""
    parts = (("image",) if image_to_video else ()) + conditioning_kinds(method_cfg)
    return "+".join(parts) or "unconditional"


def conditioning_records(n: int, kinds, *, labels=None, texts=None, image_to_video: bool = False,
                         class_names=(), split: str = "val") -> list[dict]:
    """One record per sample i (conditioned like real clip i of `split`): {"index", "clip", "label", "class",
    "text", "first_frame", "conditioned_on"}; `class` / `text` / `first_frame` are None unless the sample was
    conditioned on them, `label` (the class index) is kept for aligning samples of one class, and
    `conditioned_on` is the display string (e.g. "up", '"a red cross moves down ..."',
    "up + first frame of val clip 3", or "nothing (unconditional)")."""
    records = []
    for i in range(n):
        label = None if labels is None else int(labels[i])
        cls = None
        if "class" in kinds and label is not None:
            cls = str(class_names[label]) if 0 <= label < len(class_names) else f"class {label}"
        text = str(texts[i]) if "text" in kinds and texts is not None else None
        first = f"first frame of {split} clip {i}" if image_to_video else None
        parts = [p for p in (cls, None if text is None else f'"{text}"', first) if p]
        records.append({"index": i, "clip": f"{split} clip {i}", "label": label, "class": cls, "text": text,
                        "first_frame": first, "conditioned_on": " + ".join(parts) or UNCONDITIONAL})
    return records


def _caption_lines(caption: str, width: int, max_lines: int) -> list[str]:
    """`caption` wrapped to `width` characters, at most `max_lines` lines (the last one ends in "..." when cut)."""
    lines = textwrap.wrap(caption, width) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, width - 3)] + "..."
    return lines


def save_grid(videos_u8, path: str | Path, frames: int = 8, scale: int = 3,
              captions: list[str] | None = None, max_rows: int = 16) -> Path:
    """videos_u8 (N, C, T, H, W) uint8 tensor -> PNG at `path` (written atomically); caption i (what video i
    was conditioned on) is printed left of row i, wrapped over as many lines as the row's height holds."""
    import torch
    import torch.nn.functional as F
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
        line_height = 11
        max_lines = max(1, (h * scale - 2) // line_height)
        lines = [_caption_lines(str(cap), 54, max_lines) for cap in captions[:n]]
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        pad = min(330, 12 + max(int(measure.textlength(line)) for rows_ in lines for line in rows_))
        canvas = Image.new("RGB", (img.width + pad, img.height), "white")
        canvas.paste(img, (pad, 0))
        draw = ImageDraw.Draw(canvas)
        for i, rows_ in enumerate(lines):
            for j, line in enumerate(rows_):
                draw.text((4, i * h * scale + 2 + j * line_height), line, fill="black")
        img = canvas
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}.png")
    img.save(tmp)
    os.replace(tmp, path)
    return path
