"""Degenerate samples: what no metric should be computed on without saying so.

A diverged or collapsed model still produces tensors, and FVD / IS / accuracy still turn them
into numbers. `check_samples` flags the three failures that make such numbers meaningless:
non-finite values, a constant video, and a static video (all frames identical) when the real
data moves.
"""

from __future__ import annotations

import torch
from torch import Tensor

CONSTANT_STD = 1e-3  # a video whose values vary less than this (in [-1, 1] units) is one flat colour
STATIC_DIFF = 1e-3  # mean |frame t+1 - frame t| below this: the frames are identical
MOVING_DIFF = 1e-2  # real data whose mean frame difference exceeds this "moves"
DEGENERATE_FRACTION = 0.5  # a run with at least this share of degenerate samples is marked degenerate


def frame_motion(videos: Tensor) -> Tensor:
    """Mean absolute frame-to-frame difference of each video (N, C, T, H, W) -> (N,); 0 for one frame."""
    if videos.shape[2] < 2:
        return torch.zeros(len(videos))
    return (videos[:, :, 1:].float() - videos[:, :, :-1].float()).abs().flatten(1).mean(1)


def check_samples(videos: Tensor, real_motion: float | None = None) -> dict:
    """Counts of degenerate videos among `videos` (N, C, T, H, W) in [-1, 1].

    real_motion: the mean frame difference of real clips; static videos count only when the
    real data moves. Returns {"n", "nan", "constant", "static", "degenerate", "status", "flags", "motion",
    "real_motion"}: status is "degenerate" when any video is non-finite or at least half are constant or
    static; motion is the finite videos' mean frame difference, to be read against real_motion (several
    times it: frames that do not follow one another, flicker; benchmarks.motion_check).
    """
    v = videos.float()
    finite = torch.isfinite(v.flatten(1)).all(1)
    safe = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
    constant = finite & (safe.flatten(1).std(1) < CONSTANT_STD)
    moves = real_motion is not None and real_motion > MOVING_DIFF
    per_video = frame_motion(safe)  # (N,)
    static = finite & ~constant & (per_video < STATIC_DIFF) if moves else torch.zeros_like(finite)
    bad = ~finite | constant | static
    n = len(v)
    counts = {"nan": int((~finite).sum()), "constant": int(constant.sum()), "static": int(static.sum())}
    flags = [f"{k}: {c}/{n} samples" for k, c in counts.items() if c]
    degenerate = counts["nan"] > 0 or int(bad.sum()) >= DEGENERATE_FRACTION * n
    motion = float(per_video[finite].mean()) if bool(finite.any()) else None
    return {"n": n, **counts, "degenerate": int(bad.sum()), "motion": motion, "real_motion": real_motion,
            "status": "degenerate" if degenerate else "ok", "flags": flags}
