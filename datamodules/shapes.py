"""The embedded `shapes` dataset: procedural videos of a coloured sprite whose motion is the class.

Content (shape, colour, background) and motion (the class) are independent by
construction, which is what makes it a test bed for content/motion decompositions. Every
item is a pure function of (seed, split, index): no files, no download, identical on
every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from datamodules.base import DatasetConfig, VideoDataset
from datamodules.batch import intra_op_threads

MOTIONS = ("left", "right", "up", "down", "grow", "shrink", "orbit", "bounce")
MOTION_PHRASES = {
    "left": "moves left", "right": "moves right", "up": "moves up", "down": "moves down",
    "grow": "grows", "shrink": "shrinks", "orbit": "circles around", "bounce": "bounces",
}
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {  # sprite colours, RGB in [0, 1]
    "red": (0.95, 0.15, 0.15), "green": (0.15, 0.85, 0.2), "blue": (0.2, 0.35, 1.0),
    "yellow": (0.95, 0.9, 0.1), "magenta": (0.9, 0.2, 0.9), "white": (0.97, 0.97, 0.97),
}
BACKGROUNDS = {  # darker backgrounds, so every sprite colour stands out
    "black": (0.05, 0.05, 0.05), "navy": (0.05, 0.08, 0.3), "gray": (0.35, 0.35, 0.35),
    "brown": (0.3, 0.18, 0.08), "teal": (0.03, 0.28, 0.28),
}
SPLIT_OFFSET = {"train": 0, "val": 10_000_000, "test": 20_000_000}  # disjoint index ranges per split


@dataclass
class ShapesConfig(DatasetConfig):
    name: str = "shapes"
    num_classes: int = 8  # the first `num_classes` motions of MOTIONS
    train_size: int = 8192
    val_size: int = 512
    test_size: int = 512
    seed: int = 0
    texture: float = 0.08  # amplitude of the background's smooth gradient (0 = flat)


class ShapesDataset(VideoDataset):
    """Coloured sprites on a varied background; the motion is the label.

    Items: `video` (3, T, R, R) in [-1, 1], `label` = motion index, `text` = a caption such
    as "a red circle moves left on a navy background", plus `shape`, `color`, `background`
    indices (used to train and probe the shapes evaluator).
    """

    Config = ShapesConfig
    has_captions = True

    def __init__(self, cfg: ShapesConfig, split: str = "train") -> None:
        super().__init__(cfg, split)
        if not 1 <= cfg.num_classes <= len(MOTIONS):
            raise ValueError(f"dataset.num_classes must be in [1, {len(MOTIONS)}], got {cfg.num_classes}")
        if cfg.channels != 3:
            raise ValueError("dataset.channels must be 3 for shapes (RGB)")
        self.class_names = list(MOTIONS[: cfg.num_classes])
        self._len = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}[split]

    def __len__(self) -> int:
        return self._len

    def attributes(self, index: int) -> dict:
        """The latent factors of item `index` (drawn exactly as `__getitem__` draws them)."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + SPLIT_OFFSET[self.split] + index)
        u = torch.rand(12, generator=g).tolist()
        motion = int(u[0] * cfg.num_classes)
        shape, color = int(u[1] * len(SHAPES)), int(u[2] * len(COLORS))
        background = int(u[3] * len(BACKGROUNDS))
        return {"label": motion, "shape": shape, "color": color, "background": background,
                "size": 0.16 + 0.08 * u[4], "x": u[5], "y": u[6], "phase": u[7], "angle": u[8],
                "grad_angle": 2 * math.pi * u[9], "speed": 0.8 + 0.4 * u[10]}

    def caption(self, attrs: dict) -> str:
        return (f"a {list(COLORS)[attrs['color']]} {SHAPES[attrs['shape']]} "
                f"{MOTION_PHRASES[MOTIONS[attrs['label']]]} on a {list(BACKGROUNDS)[attrs['background']]} background")

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        a = self.attributes(index)
        with intra_op_threads(RENDER_THREADS):
            video = render(a, self.cfg.frames, self.cfg.resolution, self.cfg.texture, stride=self.cfg.stride)
        return {"video": video, "label": a["label"], "text": self.caption(a),
                "shape": a["shape"], "color": a["color"], "background": a["background"]}


# Intra-op threads while a clip renders. A clip is ~40 small element-wise ops (3 x 16 x 32 x 32 at
# tiny); with torch's 2 threads the larger ones fork an OpenMP region each, and on a busy 2-core machine a
# region waits for a descheduled thread: measured 1.6-110 ms per clip (2 threads) vs 0.5 ms (1 thread),
# pixels bit for bit the same (element-wise ops and max are exact either way). None: leave the count alone.
# (datamodules.batch.COLLATE_THREADS does the same for stacking the batch.)
RENDER_THREADS: int | None = 1


CLIP_PERIOD = 16  # source frames of the base clip: clip time s = n / 15 runs over [0, 1] for frames n = 0..15


def trajectory(a: dict, frames: int, stride: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre (x, y) and radius per frame, each (T,), for the attributes `a`.

    Source frames n = 0..15 (the default 16-frame clip) are the base motion, with the sprite inside the
    frame. Long clips (dataset.frames * dataset.stride > 16) continue it, keeping the class's direction:
    left / right / up / down keep moving and wrap around the frame's edges (x, y taken modulo 1; `render`
    draws on a torus for those frames); grow / shrink restart every 16 source frames (a sawtooth: each
    16-frame period repeats the base clip's scale change); orbit keeps circling; bounce keeps bouncing.
    """
    motion = MOTIONS[a["label"]]
    n = torch.arange(frames, dtype=torch.float32) * stride  # source frame index
    s = n / 15.0  # clip time in [0, 1] at the default 16 frames
    r0, speed = a["size"], a["speed"]
    span = 0.5 * speed  # distance travelled in one clip, as a fraction of the frame
    lo, hi = r0 + 0.02, 1 - r0 - 0.02 - span  # start so the sprite stays inside the frame
    x = torch.full_like(s, lo + (hi - lo) * a["x"])
    y = torch.full_like(s, lo + (hi - lo) * a["y"])
    r = torch.full_like(s, r0)
    if motion == "right":
        x = x + span * s
    elif motion == "left":
        x = x + span * (1 - s)
    elif motion == "down":
        y = y + span * s
    elif motion == "up":
        y = y + span * (1 - s)
    elif motion == "grow":
        r = r0 * (0.55 + 0.9 * _period(n, s))
        x, y = torch.full_like(s, 0.5), torch.full_like(s, 0.5)
    elif motion == "shrink":
        r = r0 * (1.45 - 0.9 * _period(n, s))
        x, y = torch.full_like(s, 0.5), torch.full_like(s, 0.5)
    elif motion == "orbit":
        theta = 2 * math.pi * (a["phase"] + 0.9 * s)
        x, y = 0.5 + 0.22 * torch.cos(theta), 0.5 + 0.22 * torch.sin(theta)
    elif motion == "bounce":  # falls to the floor and bounces back up, twice per 16 frames
        y = 1 - r0 - 0.02 - (0.6 - r0) * (2 * ((2 * s) % 1) - 1) ** 2
    beyond = n >= CLIP_PERIOD  # frames past the base clip: positions wrap (a no-op inside the frame)
    return torch.where(beyond, x % 1.0, x), torch.where(beyond, y % 1.0, y), r


def _period(n: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Clip time restarted every 16 source frames: s itself for n < 16 (bit for bit), (n mod 16) / 15 after."""
    return torch.where(n >= CLIP_PERIOD, (n % CLIP_PERIOD) / 15.0, s)


def render(a: dict, frames: int, res: int, texture: float = 0.08, stride: int = 1) -> torch.Tensor:
    """Draw the clip (3, T, res, res) in [-1, 1] with an anti-aliased sprite."""
    x, y, r = trajectory(a, frames, stride)
    coords = (torch.arange(res, dtype=torch.float32) + 0.5) / res
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")  # (H, W)
    dx = gx[None] - x[:, None, None]  # (T, H, W)
    dy = gy[None] - y[:, None, None]
    beyond = (torch.arange(frames) * stride >= CLIP_PERIOD).view(-1, 1, 1)  # long clips: draw on a torus
    if beyond.any():  # the nearest copy of the sprite across the wrapped edges; frames 0..15 untouched
        dx = torch.where(beyond, (dx + 0.5) % 1.0 - 0.5, dx)
        dy = torch.where(beyond, (dy + 0.5) % 1.0 - 0.5, dy)
    rr = r[:, None, None]
    c, s_ = math.cos(a["angle"] * math.pi / 2), math.sin(a["angle"] * math.pi / 2)  # fixed tilt per video
    u, v = c * dx + s_ * dy, -s_ * dx + c * dy
    shape = SHAPES[a["shape"]]
    # signed distance (negative inside), in units of the frame
    if shape == "circle":
        sd = (dx**2 + dy**2).sqrt() - rr
    elif shape == "square":
        sd = torch.maximum(u.abs(), v.abs()) - 0.8 * rr
    elif shape == "triangle":
        n = [(0.0, -1.0), (0.866, 0.5), (-0.866, 0.5)]
        sd = torch.stack([u * nx + v * ny for nx, ny in n]).amax(0) - 0.5 * rr
    else:  # cross
        arm = torch.minimum(torch.maximum(u.abs() - rr, v.abs() - 0.35 * rr),
                            torch.maximum(v.abs() - rr, u.abs() - 0.35 * rr))
        sd = arm
    alpha = (0.5 - sd * res).clamp(0, 1)[None]  # (1, T, H, W): one-pixel anti-aliasing
    fg = torch.tensor(list(COLORS.values())[a["color"]]).view(3, 1, 1, 1)
    bg = torch.tensor(list(BACKGROUNDS.values())[a["background"]]).view(3, 1, 1, 1)
    ramp = math.cos(a["grad_angle"]) * (gx - 0.5) + math.sin(a["grad_angle"]) * (gy - 0.5)  # (H, W)
    bg = (bg + texture * ramp[None, None]).clamp(0, 1)
    video = alpha * fg + (1 - alpha) * bg  # (3, T, H, W)
    return video * 2 - 1
