"""Tri-plane networks (PVDM, Yu et al. 2023): the plane layout, axis-summary projections, and a
2D UNet whose weights are shared by the three planes, joined by a 1D cross-plane attention.

A video's features u (D, T, h, w) are summarised along one axis at a time into three planes:
    s-plane  (h, w)  summary over t at each (h, w)
    h-plane  (T, w)  summary over h at each (t, w)
    w-plane  (T, h)  summary over w at each (t, h)
The diffusion model sees them flattened and concatenated, z (C, h*w + T*w + T*h), as in the
official code; `Triplane` packs and unpacks that layout.

`TriplaneUNet` runs the layers of one `methods.nets.unet.UNet` (temporal=False) on every plane,
each at its own size: the UNet is convolutional, so planes of different shapes need no padding
(planes of equal shape are batched into one call). After every down block, the middle block and
every up block, a `CrossPlaneAttention` attends over the tokens of all three planes joined: the only
place the planes exchange information.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from methods.nets.transformer import Attention, Mlp, sincos_1d, sincos_2d
from methods.nets.unet import ResBlock, UNet, UNetConfig

PLANES = ("s", "h", "w")  # which axis each plane summarises away: t, h, w


@dataclass(frozen=True)
class Triplane:
    """The latent grid (T, h, w) and the flat layout z (B, C, h*w + T*w + T*h) of its three planes."""

    frames: int  # T
    height: int  # h = H / patch
    width: int  # w = W / patch

    @property
    def shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """Plane sizes in PLANES order: s (h, w), h (T, w), w (T, h)."""
        return (self.height, self.width), (self.frames, self.width), (self.frames, self.height)

    @property
    def length(self) -> int:
        return sum(a * b for a, b in self.shapes)

    def split(self, z: Tensor) -> list[Tensor]:
        """z (B, C, L) -> [z_s (B, C, h, w), z_h (B, C, T, w), z_w (B, C, T, h)]."""
        if z.shape[-1] != self.length:
            raise ValueError(f"latent length {z.shape[-1]} does not match the tri-plane layout {self} ({self.length})")
        parts = z.split([a * b for a, b in self.shapes], dim=-1)
        return [rearrange(p, "b c (x y) -> b c x y", x=a) for p, (a, _) in zip(parts, self.shapes)]

    def join(self, planes: list[Tensor]) -> Tensor:
        """[z_s, z_h, z_w] -> z (B, C, L)."""
        for p, shape in zip(planes, self.shapes):
            if tuple(p.shape[-2:]) != shape:
                raise ValueError(f"plane of size {tuple(p.shape[-2:])} where the layout {self} expects {shape}")
        return torch.cat([p.flatten(-2) for p in planes], dim=-1)


# --- axis-summary projections (autoencoder) ------------------------------------------------


class Block(nn.Module):
    """A plain pre-norm transformer block over (B, L, D): self-attention then MLP, residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, mlp_ratio)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AxisSummary(nn.Module):
    """A learned summary token attends along one axis: sequences (N, L, D) -> (N, D) (PVDM's projection f_phi).

    The token is prepended to the sequence (sin-cos positions on the sequence, a learned embedding
    for the token), `depth` transformer blocks run, and the token's output is the summary. (The
    official code appends the token but reads out position 0, the first sequence element.)
    """

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + sincos_1d(x.shape[1], x.shape[2], x.device).to(x.dtype)
        x = torch.cat([self.token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)  # (N, 1 + L, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])


# --- the shared-weight tri-plane UNet ------------------------------------------------------


class CrossPlaneAttention(nn.Module):
    """Residual 1D self-attention over the tokens of all three planes joined (PVDM's AttentionBlock1D).

    Each plane's tokens get 2D sin-cos positions on their own grid and a learned plane embedding
    in the attention input (the official code has neither, leaving attention blind to which plane
    and where a token is). The output projection starts at zero: the block starts as the identity.
    """

    def __init__(self, ch: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(min(8, ch), ch)
        self.plane_embed = nn.Parameter(torch.randn(len(PLANES), ch) * 0.02)
        self.attn = Attention(ch, heads)
        nn.init.zeros_(self.attn.proj.weight)
        nn.init.zeros_(self.attn.proj.bias)

    def forward(self, planes: list[Tensor]) -> list[Tensor]:
        """[(B, C, a_i, b_i)] -> the same list, each plane having attended to all three."""
        sizes = [p.shape[-2] * p.shape[-1] for p in planes]
        h = self.norm(torch.cat([p.flatten(-2) for p in planes], dim=-1))  # joint statistics      (B, C, L)
        pos = torch.cat([sincos_2d(p.shape[-2], p.shape[-1], p.shape[1], p.device) + self.plane_embed[i]
                         for i, p in enumerate(planes)])  # (L, C)
        h = self.attn(rearrange(h, "b c l -> b l c") + pos.to(h.dtype))  # (B, L, C)
        out = rearrange(h, "b l c -> b c l").split(sizes, dim=-1)
        return [p + o.reshape(p.shape) for p, o in zip(planes, out)]


def per_plane(fn: Callable[[Tensor, int], Tensor], planes: list[Tensor]) -> list[Tensor]:
    """Apply `fn(x, k)` to every plane; planes of equal shape go as one batch of k planes stacked."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(planes):
        groups.setdefault(tuple(p.shape[1:]), []).append(i)
    out: list[Tensor] = [planes[0]] * len(planes)
    for idx in groups.values():
        y = fn(torch.cat([planes[i] for i in idx]), len(idx))
        for i, part in zip(idx, y.chunk(len(idx))):
            out[i] = part
    return out


def _out_channels(layer: nn.Module) -> int:
    """Channels a UNet layer emits: those of its last convolution (ResBlock, downsample, upsample)."""
    return [m for m in layer.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


class TriplaneUNet(nn.Module):
    """eps_theta over a tri-plane latent: forward(x (B, C_in, L), t (B,), emb (B, E) | None) -> (B, C_out, L).

    One 2D `UNet`'s layers process every plane (shared weights); with `cross_attention`, a
    `CrossPlaneAttention` follows each down layer, the middle block and each up layer. Without
    it, the planes are denoised independently (an ablation, and what the tests compare against).
    """

    def __init__(self, in_channels: int, out_channels: int, cfg: UNetConfig, layout: Triplane,
                 cross_attention: bool = True) -> None:
        super().__init__()
        self.layout = layout
        self.unet = UNet(in_channels, out_channels, cfg, temporal=False)
        self.emb_dim = self.unet.emb_dim
        factor = 2 ** (len(cfg.channels) - 1)
        if any(n % factor for shape in layout.shapes for n in shape):
            raise ValueError(f"every plane side of {layout} must be divisible by {factor} for a "
                             f"{len(cfg.channels)}-level UNet: change method.unet.channels, method.clip_frames "
                             "or method.autoencoder.patch")
        self.cross_attention = cross_attention
        make = (lambda layer: CrossPlaneAttention(_out_channels(layer), cfg.heads)) if cross_attention else (
            lambda layer: nn.Identity())
        self.down_mix = nn.ModuleList(make(layer) for layer in self.unet.down)
        self.mid_mix = make(self.unet.mid2)
        self.up_mix = nn.ModuleList(make(layer) for layer in self.unet.up)

    def forward(self, x: Tensor, t: Tensor, emb: Tensor | None = None) -> Tensor:
        u = self.unet
        e = u.time(t)  # (B, E)
        if emb is not None:
            e = e + emb

        def block(layer: nn.Module) -> Callable[[Tensor, int], Tensor]:
            if isinstance(layer, ResBlock):
                return lambda h, k: layer(h, repeat(e, "b d -> (k b) d", k=k), 1)
            return lambda h, k: layer(h)

        def middle(h: Tensor, k: int) -> Tensor:
            ek = repeat(e, "b d -> (k b) d", k=k)
            h = u.mid1(h, ek, 1)
            if u.mid_attn is not None:
                h = u.mid_attn(h, 1)
            return u.mid2(h, ek, 1)

        hs = per_plane(block(u.stem), self.layout.split(x))  # [(B, ch, a_i, b_i)]
        skips = [hs]
        for layer, mix in zip(u.down, self.down_mix):
            hs = mix(per_plane(block(layer), hs))
            skips.append(hs)
        hs = self.mid_mix(per_plane(middle, hs))
        for layer, mix in zip(u.up, self.up_mix):
            if isinstance(layer, ResBlock):  # U-Net skip connection, per plane
                hs = [torch.cat([h, s], dim=1) for h, s in zip(hs, skips.pop())]
            hs = mix(per_plane(block(layer), hs))
        return self.layout.join(per_plane(block(u.out), hs))
