"""A tiny P-frame codec: block-matching motion vectors, block warping, residuals (ED-VDM, arXiv 2311.14294).

Notation (per video; frames x_1 .. x_T, x_1 the I-frame, x_2 .. x_T the P-frames):
    block      b, the side of the square, non-overlapping blocks (H and W divisible by b)
    search     S, motion vectors range over the integer window [-S, S]^2
    MV_i       (2, H/b, W/b) integer (dy, dx) per block: the displacement of the block's content
               from x_{i-1} to x_i, so warp(x_{i-1}, MV_i)(p) = x_{i-1}(p - MV_i(block of p))
    R_i        = x_i - warp(x_{i-1}, MV_i)                                  the residual
    x_i        = warp(x_{i-1}, MV_i) + R_i                                  recursive reconstruction
Open and closed loop (when the residuals are coded lossily, R_i -> R^_i = code(R_i)):
    open       R_i = x_i - warp(x_{i-1}, MV_i) against the *original* previous frame (`decompose`);
               the decoder's x^_i = warp(x^_{i-1}, MV_i) + R^_i then carries every earlier coding error
               e_j = R^_j - R_j forward (warped): the error of frame i is the sum of i - 1 coding errors
    closed     R_i = x_i - warp(x^_{i-1}, MV_i) against the *decoded* previous frame, as a real codec's
               encoder does (`decompose_closed_loop`): x^_i = warp(x^_{i-1}, MV_i) + R^_i = x_i + e_i, so
               each frame carries only its own coding error (up to clamping)
MV_i minimises the sum of absolute errors between the block of x_i and its candidate in x_{i-1}
(minimum absolute error block matching); ties go to the shorter vector, so flat regions stay at
zero motion. Pixels the window reaches outside the frame read the border pixel (replicate
padding) in matching and warping alike.

Layouts follow the framework: videos (B, C, T, H, W); motion vectors (B, 2, T - 1, H/b, W/b)
long; residuals (B, C, T - 1, H, W). Everything is vectorised over batch, frames and blocks;
only the (2S + 1)^2 candidate displacements are a Python loop (a running minimum keeps memory
at one candidate). Warping is a gather (no arithmetic), and residuals are computed and summed
in float64, where the difference of two float32 (or bf16) numbers in [-1, 1] is exact as long as
each is 0 or at least 2^-29 in magnitude (e.g. any clip decoded from integer pixels; the shapes
clips are tested): the reconstruction then returns the float32 (bf16) video bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange
from torch import Tensor

EXACT_DTYPE = torch.float64  # residual arithmetic: float32 differences are exact here
MATCH_REFERENCES = ("original", "decoded")  # closed loop: motion vectors found against x_{i-1} or x^_{i-1}


def _check_frame(x: Tensor, block: int) -> None:
    if x.ndim < 3:
        raise ValueError(f"frames must be (..., C, H, W), got shape {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if block < 1 or H % block or W % block:
        raise ValueError(f"frame size {H}x{W} must be divisible by the block size {block}")


def candidates(search: int) -> list[tuple[int, int]]:
    """The (dy, dx) displacements of the window [-S, S]^2, shortest first (the tie-break order)."""
    grid = [(dy, dx) for dy in range(-search, search + 1) for dx in range(-search, search + 1)]
    return sorted(grid, key=lambda v: (abs(v[0]) + abs(v[1]), max(abs(v[0]), abs(v[1])), v))


def block_sums(x: Tensor, block: int) -> Tensor:
    """Sum over channels and each b x b block: (N, C, H, W) -> (N, H/b, W/b)."""
    return rearrange(x, "n c (hb p) (wb q) -> n hb wb (c p q)", p=block, q=block).sum(-1)


def match_blocks(cur: Tensor, prev: Tensor, block: int, search: int) -> Tensor:
    """Minimum-absolute-error block matching of `cur` against `prev`.

    cur, prev: (..., C, H, W) frames -> (..., 2, H/b, W/b) long motion vectors (dy, dx) with
    prev(p - MV) the best prediction of cur(p) over the window [-S, S]^2.
    """
    _check_frame(cur, block)
    if cur.shape != prev.shape:
        raise ValueError(f"cur {tuple(cur.shape)} and prev {tuple(prev.shape)} must have the same shape")
    lead, (C, H, W) = cur.shape[:-3], cur.shape[-3:]
    cur, prev = cur.reshape(-1, C, H, W).float(), prev.reshape(-1, C, H, W).float()  # matching needs no exactness
    S = search
    padded = torch.nn.functional.pad(prev, (S, S, S, S), mode="replicate") if S > 0 else prev  # (N, C, H+2S, W+2S)
    best_err = best = None
    for dy, dx in candidates(S):
        # prediction(p) = prev(p - (dy, dx)): a shifted window of the padded frame
        pred = padded[..., S - dy:S - dy + H, S - dx:S - dx + W]  # (N, C, H, W)
        err = block_sums((cur - pred).abs(), block)  # (N, H/b, W/b)
        mv = torch.tensor([dy, dx], device=cur.device).view(1, 2, 1, 1)
        if best is None:
            best_err, best = err, mv.expand(err.shape[0], 2, *err.shape[1:]).clone()
            continue
        better = err < best_err  # strict: earlier (shorter) vectors win ties
        best_err = torch.where(better, err, best_err)
        best = torch.where(better[:, None], mv, best)
    return best.reshape(*lead, 2, H // block, W // block)


def warp(prev: Tensor, mv: Tensor, block: int) -> Tensor:
    """Move each b x b block by its integer vector: out(p) = prev(p - MV(block of p)), border replicated.

    prev: (..., C, H, W); mv: (..., 2, H/b, W/b) integer -> (..., C, H, W), a pure gather.
    """
    _check_frame(prev, block)
    lead, (C, H, W) = prev.shape[:-3], prev.shape[-3:]
    if mv.shape[:-3] != lead or mv.shape[-3:] != (2, H // block, W // block):
        raise ValueError(f"motion vectors {tuple(mv.shape)} do not fit frames {tuple(prev.shape)} with block {block}")
    prev, mv = prev.reshape(-1, C, H, W), mv.reshape(-1, 2, H // block, W // block).long()
    per_pixel = mv.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)  # (N, 2, H, W)
    ys = torch.arange(H, device=prev.device).view(1, H, 1)
    xs = torch.arange(W, device=prev.device).view(1, 1, W)
    src_y = (ys - per_pixel[:, 0]).clamp(0, H - 1)  # (N, H, W)
    src_x = (xs - per_pixel[:, 1]).clamp(0, W - 1)
    index = (src_y * W + src_x).flatten(1)[:, None].expand(-1, C, -1)  # (N, C, H*W)
    out = prev.flatten(-2).gather(-1, index)
    return out.reshape(*lead, C, H, W)


def motion_vectors(video: Tensor, block: int, search: int) -> Tensor:
    """MV_i of every P-frame against its predecessor: (B, C, T, H, W) -> (B, 2, T - 1, H/b, W/b) long."""
    cur = rearrange(video[:, :, 1:], "b c t h w -> b t c h w")
    prev = rearrange(video[:, :, :-1], "b c t h w -> b t c h w")
    return rearrange(match_blocks(cur, prev, block, search), "b t v h w -> b v t h w")


def residuals(video: Tensor, mv: Tensor, block: int) -> Tensor:
    """R_i = x_i - warp(x_{i-1}, MV_i) in float64 (exact for float32 input): -> (B, C, T - 1, H, W)."""
    prev = rearrange(video[:, :, :-1], "b c t h w -> b t c h w")
    pred = rearrange(warp(prev, rearrange(mv, "b v t h w -> b t v h w"), block), "b t c h w -> b c t h w")
    return video[:, :, 1:].to(EXACT_DTYPE) - pred.to(EXACT_DTYPE)


def decompose(video: Tensor, block: int, search: int) -> tuple[Tensor, Tensor]:
    """The codec's invertible transform of a clip (B, C, T, H, W): (MV (B, 2, T-1, H/b, W/b), R (B, C, T-1, H, W))."""
    if video.ndim != 5:
        raise ValueError(f"video must be (B, C, T, H, W), got shape {tuple(video.shape)}")
    mv = motion_vectors(video, block, search)
    return mv, residuals(video, mv, block)


def decompose_closed_loop(video: Tensor, block: int, search: int, code: Callable[[Tensor], Tensor],
                          clamp: float | None = 1.0, match: str = "original") -> tuple[Tensor, Tensor, Tensor]:
    """The closed-loop encoder: residuals against the *decoded* previous frame, as a real codec computes them.

    video (B, C, T, H, W); code: the residual coder's round trip, residual frames (B, C, H, W) -> their
    decoded version (B, C, H, W) (called once per P-frame, in order). x^_1 = x_1 (the I-frame is given);
    for i = 2..T: R_i = x_i - warp(x^_{i-1}, MV_i), x^_i = clamp(warp(x^_{i-1}, MV_i) + code(R_i)), exactly
    the recursion `reconstruct` runs (float64, clamped to [-clamp, clamp]), so decoding the coded residuals
    returns x^. match: where MV_i is found: "original" (x_i against x_{i-1}: the open loop's vectors, all
    frames at once) or "decoded" (x_i against x^_{i-1}, per frame).
    Returns (MV (B, 2, T-1, H/b, W/b) long, R (B, C, T-1, H, W) float64, x^ (B, C, T, H, W) float64).
    """
    if video.ndim != 5:
        raise ValueError(f"video must be (B, C, T, H, W), got shape {tuple(video.shape)}")
    if match not in MATCH_REFERENCES:
        raise ValueError(f"match must be one of {MATCH_REFERENCES}, got {match!r}")
    mv_all = motion_vectors(video, block, search) if match == "original" else None
    frames, mvs, res = [video[:, :, 0].to(EXACT_DTYPE)], [], []
    for i in range(1, video.shape[2]):
        x = video[:, :, i]
        mv = mv_all[:, :, i - 1] if mv_all is not None else match_blocks(x, frames[-1], block, search)
        pred = warp(frames[-1], mv, block)  # the decoder's prediction of x_i      (B, C, H, W) float64
        r = x.to(EXACT_DTYPE) - pred
        rec = pred + code(r).to(EXACT_DTYPE)
        frames.append(rec.clamp(-clamp, clamp) if clamp is not None else rec)
        mvs.append(mv)
        res.append(r)
    return torch.stack(mvs, dim=2), torch.stack(res, dim=2), torch.stack(frames, dim=2)


def reconstruct(first: Tensor, mv: Tensor, residual: Tensor, block: int, clamp: float | None = None,
                dtype: torch.dtype | None = None) -> Tensor:
    """x_1 = first; x_i = warp(x_{i-1}, MV_i) + R_i, recursively: -> (B, C, T, H, W) in `dtype` (first's by default).

    first: (B, C, H, W); mv: (B, 2, T-1, H/b, W/b); residual: (B, C, T-1, H, W). `clamp` keeps each
    reconstructed frame in [-clamp, clamp] before it predicts the next, so errors in generated
    residuals cannot compound out of range (a no-op on real clips, which are already in range).
    """
    if first.ndim != 4 or residual.ndim != 5 or mv.ndim != 5:
        raise ValueError(f"need first (B, C, H, W), mv (B, 2, T-1, h, w), residual (B, C, T-1, H, W); got "
                         f"{tuple(first.shape)}, {tuple(mv.shape)}, {tuple(residual.shape)}")
    if mv.shape[2] != residual.shape[2]:
        raise ValueError(f"{mv.shape[2]} motion-vector frames but {residual.shape[2]} residual frames")
    dtype = dtype or first.dtype
    frames = [first.to(EXACT_DTYPE)]
    for i in range(residual.shape[2]):
        x = warp(frames[-1], mv[:, :, i], block) + residual[:, :, i].to(EXACT_DTYPE)  # (B, C, H, W)
        frames.append(x.clamp(-clamp, clamp) if clamp is not None else x)
    return torch.stack(frames, dim=2).to(dtype)
