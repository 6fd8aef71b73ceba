"""Native Inception-I3D (Carreira & Zisserman 2017), the VideoGPT / TATS / DIGAN FVD network.

Its state dict has exactly the keys and shapes of the widely used `i3d_pretrained_400.pt`
(listed in reference/i3d_state_dict_keys.tsv), so that file loads with `strict=True`.
Inception-v1 inflated to 3D; every conv is a `Unit3D` (Conv3d without bias + BatchNorm3d
(eps `bn_eps`, momentum 0.01) + ReLU) with TensorFlow "SAME" padding computed from the input
size at run time, as in the TF-Hub original the weights were ported from.

BatchNorm eps: the TF/Sonnet original uses 1e-3 (the default here); every codebase that runs
`i3d_pretrained_400.pt` for FVD (VideoGPT, TATS, DIGAN, PVDM, cd-fvd) builds BatchNorm3d with
torch's default 1e-5, which the `videogpt` protocol preset selects (`eval.detector_options.i3d_bn_eps`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

Triple = tuple[int, int, int]


def _same_pad(size: tuple[int, ...], kernel: Triple, stride: Triple) -> list[int]:
    """F.pad amounts (last dim first) for TF SAME padding of a (T, H, W) input."""
    pad: list[int] = []
    for s, k, st in reversed(list(zip(size, kernel, stride))):
        total = max(k - st, 0) if s % st == 0 else max(k - s % st, 0)
        pad += [total // 2, total - total // 2]  # TF puts the odd pixel at the end
    return pad


class Unit3D(nn.Module):
    """Conv3d (+ BatchNorm3d + ReLU) with TF SAME padding; keys `conv3d.*`, `bn.*`."""

    def __init__(self, c_in: int, c_out: int, kernel: Triple = (1, 1, 1), stride: Triple = (1, 1, 1),
                 bn: bool = True, relu: bool = True, bias: bool = False, bn_eps: float = 1e-3) -> None:
        super().__init__()
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.conv3d = nn.Conv3d(c_in, c_out, kernel, stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(c_out, eps=bn_eps, momentum=0.01) if bn else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv3d(F.pad(x, _same_pad(x.shape[2:], self.kernel, self.stride)))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MaxPool3dSame(nn.Module):
    """Max-pool with TF SAME padding. Zero padding equals TF's -inf here: inputs follow a ReLU."""

    def __init__(self, kernel: Triple, stride: Triple) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool3d(F.pad(x, _same_pad(x.shape[2:], self.kernel, self.stride)), self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Four branches concatenated: b0 1x1 | b1a 1x1 -> b1b 3x3x3 | b2a 1x1 -> b2b 3x3x3 | pool -> b3b 1x1."""

    def __init__(self, c_in: int, c: tuple[int, int, int, int, int, int], bn_eps: float = 1e-3) -> None:
        super().__init__()
        self.b0 = Unit3D(c_in, c[0], bn_eps=bn_eps)
        self.b1a, self.b1b = Unit3D(c_in, c[1], bn_eps=bn_eps), Unit3D(c[1], c[2], (3, 3, 3), bn_eps=bn_eps)
        self.b2a, self.b2b = Unit3D(c_in, c[3], bn_eps=bn_eps), Unit3D(c[3], c[4], (3, 3, 3), bn_eps=bn_eps)
        self.b3a, self.b3b = MaxPool3dSame((3, 3, 3), (1, 1, 1)), Unit3D(c_in, c[5], bn_eps=bn_eps)
        self.out_channels = c[0] + c[2] + c[4] + c[5]

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


# Output channels per Inception module (b0, b1a, b1b, b2a, b2b, b3b), read off the reference key shapes.
MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32), "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64), "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64), "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128), "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
POOL_BEFORE = {  # max-pools (kernel, stride) in front of these blocks
    "Conv3d_2b_1x1": ((1, 3, 3), (1, 2, 2)), "Mixed_3b": ((1, 3, 3), (1, 2, 2)),
    "Mixed_4b": ((3, 3, 3), (2, 2, 2)), "Mixed_5b": ((2, 2, 2), (2, 2, 2)),
}


class InceptionI3d(nn.Module):
    """Inception-I3D: (B, 3, T, 224, 224) in [-1, 1] -> (B, num_classes) logits averaged over time.

    Needs T >= 9 (the final [2, 7, 7] average pool sees T/8 frames). `bn_eps`: every BatchNorm's eps.
    """

    def __init__(self, num_classes: int = 400, dropout: float = 0.5, bn_eps: float = 1e-3) -> None:
        super().__init__()
        self.bn_eps = bn_eps
        # `logits` first, so state_dict() lists keys in the reference file's order
        self.logits = Unit3D(1024, num_classes, bn=False, relu=False, bias=True)
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2), bn_eps=bn_eps)
        self.Conv3d_2b_1x1 = Unit3D(64, 64, bn_eps=bn_eps)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3), bn_eps=bn_eps)
        c = 192
        for name, channels in MIXED.items():
            block = InceptionModule(c, channels, bn_eps)
            self.add_module(name, block)
            c = block.out_channels
        self.pools = nn.ModuleDict({k: MaxPool3dSame(*v) for k, v in POOL_BEFORE.items()})  # no parameters
        self.dropout = nn.Dropout(dropout)
        self.order = ["Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3", *MIXED]

    def forward(self, x: Tensor) -> Tensor:
        for name in self.order:
            if name in self.pools:
                x = self.pools[name](x)
            x = getattr(self, name)(x)
        x = F.avg_pool3d(x, kernel_size=(2, 7, 7), stride=1)  # (B, 1024, T', 1, 1)
        x = self.logits(self.dropout(x))  # (B, K, T', 1, 1)
        return x.flatten(2).mean(dim=2)  # (B, K)


def videogpt_preprocess(video_u8: Tensor, resolution: int = 224) -> Tensor:
    """VideoGPT's I3D input: uint8 (B, 3, T, H, W) -> float (B, 3, T, R, R) in [-1, 1].

    Shorter side resized to `resolution` (bilinear, align_corners=False), centre crop, x/255*2-1.
    """
    b, _, _, h, w = video_u8.shape
    x = rearrange(video_u8.float() / 255, "b c t h w -> (b t) c h w")
    scale = resolution / min(h, w)
    size = (resolution, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), resolution)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    top, left = (x.shape[2] - resolution) // 2, (x.shape[3] - resolution) // 2
    x = x[:, :, top:top + resolution, left:left + resolution]
    x = rearrange(x, "(b t) c h w -> b c t h w", b=b)  # (B, C, T, R, R)
    return x * 2 - 1
