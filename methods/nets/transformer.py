"""Transformer pieces shared by the decomposed methods.

- `SpaceTimeTransformer`: TimeSformer-style divided attention (Bertasius et al. 2021): in
  every block, attention over time at each spatial location, then attention over space in
  each frame, then an MLP. Tokens are (B, T, N, D) with N = h * w patches per frame.
- `DiT`: a stack of DiT blocks (Peebles & Xie 2023) whose conditioning vector c (timestep +
  class/text) enters through adaLN-Zero: per block, c regresses shift/scale/gate of both
  sublayers, and the regressing layer starts at zero so every block starts as the identity.

Positions are fixed sin-cos embeddings computed for the grid at hand, so a network built
for one (T, h, w) runs on any other grid.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

# --- positions -------------------------------------------------------------------------------


_POSITIONS: dict[tuple, Tensor] = {}  # (function, its arguments as text) -> the table: grids repeat every call


def _cached(fn):
    """Memoises a position table per arguments: a sampler asks for the same grid at every step and layer.

    Tables are made outside inference mode (a later training step may save them for backward) and
    are never written in place by their users. Under torch.compile the table is computed, so the
    graph holds no Python-side cache.
    """

    @functools.wraps(fn)
    def table(*args) -> Tensor:
        if torch.compiler.is_compiling():
            return fn(*args)
        key = (fn.__name__, *map(str, args))
        if key not in _POSITIONS:
            with torch.inference_mode(False), torch.no_grad():
                _POSITIONS[key] = fn(*args)
        return _POSITIONS[key]

    return table


@_cached
def sincos_1d(n: int, dim: int, device: torch.device | None = None) -> Tensor:
    """(n, dim) sin-cos embedding of positions 0..n-1 (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) / max(1, half))
    args = torch.arange(n, device=device, dtype=torch.float32)[:, None] * freqs[None]
    return nn.functional.pad(torch.cat([torch.sin(args), torch.cos(args)], dim=-1), (0, dim % 2))


@_cached
def sincos_2d(h: int, w: int, dim: int, device: torch.device | None = None) -> Tensor:
    """(h * w, dim) embedding of a row-major h x w grid: half the channels for rows, half for columns."""
    rows = sincos_1d(h, dim // 2, device)  # (h, dim/2)
    cols = sincos_1d(w, dim - dim // 2, device)  # (w, dim/2)
    return torch.cat([rows[:, None].expand(h, w, -1), cols[None].expand(h, w, -1)], dim=-1).reshape(h * w, dim)


# --- layers ----------------------------------------------------------------------------------

# "auto": the fused kernel on CUDA, and on CPU wherever no gradient is recorded (sampling, frozen encoders); when
# training on CPU the plain form where it was measured faster (`plain_is_faster`); "math" / "fused": always that one
ATTENTION_KERNEL = "auto"


def plain_is_faster(length: int, head_dim: int) -> bool:
    """Whether the plain softmax(QK^T)V trains faster than PyTorch's fused (flash) kernel on CPU at this length.

    `python -m benchmarks.attention_kernels` (forward + backward under bf16 autocast, the 2-core family-26 AMD EPYC;
    docs/results/attention-kernels/), the plain form's seconds over the fused kernel's: 0.09-0.42x at lengths 16-128
    with 16k query tokens a call and 0.13-0.40x with 64k; at 256 0.38-0.50x with 16k but, with 64k, 1.5x for heads
    of 8-16 channels and 0.83-1.10x for heads of 32-64; from 512 on the fused kernel mostly wins (its memory grows
    linearly with the length, the plain form's quadratically). Sampling keeps the fused kernel: at batch 1 the
    plain form made CMD's and ED-VDM's whole samplers 1.17-1.27x slower (`benchmarks.efficiency`, in turns).
    """
    return length <= 128 or (length <= 256 and head_dim >= 32)


def takes_plain_form(x: Tensor, length: int, head_dim: int) -> bool:
    """Whether attention over `x` (queries, or the tokens they come from) computes in the plain form (the kernel
    switch `ATTENTION_KERNEL`; see `plain_is_faster` for auto)."""
    if ATTENTION_KERNEL != "auto":
        return ATTENTION_KERNEL == "math"
    return not x.is_cuda and torch.is_grad_enabled() and plain_is_faster(length, head_dim)


def plain_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(QK^T / sqrt(d))V of (B, heads, L, d) queries, keys and values, in plain matmuls."""
    return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v


def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Scaled dot-product attention of (B, heads, L, d) queries, keys and values -> (B, heads, L, d)."""
    if takes_plain_form(q, q.shape[-2], q.shape[-1]):
        return plain_attention(q, k, v)
    return nn.functional.scaled_dot_product_attention(q, k, v)  # fused kernel


def multihead_self_attention(attn: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """`attn(x, x, x)[0]` for a batch-first, bias-carrying `nn.MultiheadAttention` without dropout: torch's own
    forward (its fused kernel) unless `takes_plain_form`, then the same projections around the plain form."""
    if not takes_plain_form(x, x.shape[1], attn.head_dim):
        return attn(x, x, x, need_weights=False)[0]
    q, k, v = rearrange(nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias), "b l (three h d) -> three b h l d",
                        three=3, h=attn.num_heads)
    return attn.out_proj(rearrange(plain_attention(q, k, v), "b h l d -> b l (h d)"))


class Attention(nn.Module):
    """Multi-head self-attention over (B, L, D) tokens (the kernel: `attend`)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        return self.proj(rearrange(attend(q, k, v), "b h l d -> b l (h d)"))


class Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float = 4.0) -> None:
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class SpaceTimeBlock(nn.Module):
    """Divided space-time attention: time attention, space attention, MLP; pre-norm residuals."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm_t, self.attn_t = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm_s, self.attn_s = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm_m, self.mlp = nn.LayerNorm(dim), Mlp(dim, mlp_ratio)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, N, D) -> (B, T, N, D)."""
        T = x.shape[1]
        h = rearrange(self.norm_t(x), "b t n d -> (b n) t d")
        x = x + rearrange(self.attn_t(h), "(b n) t d -> b t n d", t=T, b=x.shape[0])
        h = rearrange(self.norm_s(x), "b t n d -> (b t) n d")
        x = x + rearrange(self.attn_s(h), "(b t) n d -> b t n d", t=T)
        return x + self.mlp(self.norm_m(x))


class SpaceTimeTransformer(nn.Module):
    """A TimeSformer trunk: positions added, `depth` divided-attention blocks, final LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.dim = dim
        self.blocks = nn.ModuleList(SpaceTimeBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """x (B, T, h*w, D) tokens of an h x w patch grid per frame -> same shape."""
        B, T, N, D = x.shape
        h, w = grid
        if h * w != N:
            raise ValueError(f"grid {grid} does not match {N} tokens per frame")
        pos = sincos_1d(T, D, x.device)[:, None] + sincos_2d(h, w, D, x.device)[None]  # (T, N, D)
        x = x + pos.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# --- DiT with adaLN-Zero ---------------------------------------------------------------------


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x (B, L, D) scaled and shifted per sample by (B, D) vectors."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """x + gate * sublayer(modulate(norm(x))) for attention and MLP; the six (B, D) vectors come from c."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[-1].weight)  # adaLN-Zero: gates start at 0, the block is the identity
        nn.init.zeros_(self.ada[-1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B, L, D), c (B, D) -> (B, L, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiTFinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a zero-initialised linear map to `out_dim` per token."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)
        for layer in (self.ada[-1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


@dataclass
class DiTConfig:
    width: int = 128  # token width D
    depth: int = 4  # number of DiT blocks
    heads: int = 4
    mlp_ratio: float = 4.0


# DiT sizes (Peebles & Xie 2023, Table 1) as one-line factories.
DIT_SIZES: dict[str, DiTConfig] = {
    "S": DiTConfig(width=384, depth=12, heads=6),
    "B": DiTConfig(width=768, depth=12, heads=12),
    "L": DiTConfig(width=1024, depth=24, heads=16),
    "XL": DiTConfig(width=1152, depth=28, heads=16),
}


class DiT(nn.Module):
    """A DiT trunk over an already-embedded token sequence: forward(x (B, L, D), c (B, D)) -> (B, L, D).

    Patch embedding, positions and the output head belong to the caller, which knows its token sets.
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.width = cfg.width
        self.blocks = nn.ModuleList(DiTBlock(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, c)
        return x
