"""The shapes evaluator: small networks trained on the embedded shapes data (nothing to download).

- `ShapesVideoNet`: a (2+1)D conv video classifier with heads for the motion class (the
  label), shape, colour and background. Its penultimate features feed FVD; its motion-class
  probabilities feed IS and conditional accuracy.
- `ShapesCLIP`: a CLIP-style pair, a frame encoder and a word-level text encoder over the
  shapes vocabulary, trained contrastively on frames and captions; feeds CLIPSIM.

Both see 16 frames of 32x32: `prepare_input` resizes other sizes (64x64 -> area
downsampling, other frame counts -> evenly spaced frames) so every preset is scored by the
same network. Trained by benchmarks/train_shapes_evaluator.py; the weights ship in
evaluation/weights/shapes_evaluator.pt.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

SHAPES_EVALUATOR_PATH = Path(__file__).resolve().parent / "weights" / "shapes_evaluator.pt"
HEADS = ("motion", "shape", "color", "background")  # heads of ShapesVideoNet, in this order


@dataclass
class ShapesEvaluatorConfig:
    frames: int = 16  # the network's input clip length
    resolution: int = 32  # the network's input side length
    width: int = 32  # channels of the first block (then 2w, 4w, 4w)
    feature_dim: int = 64  # penultimate features (FVD); small d keeps the finite-N bias of FVD low
    num_motions: int = 8
    num_shapes: int = 4
    num_colors: int = 6
    num_backgrounds: int = 5
    embed_dim: int = 64  # CLIP-style joint embedding size
    max_words: int = 16  # longest caption, in words


def prepare_input(video: Tensor, frames: int = 16, resolution: int = 32) -> Tensor:
    """(B, 3, T, H, W) float in [-1, 1] -> (B, 3, frames, resolution, resolution).

    Spatial: area interpolation (an exact box filter for 64 -> 32). Temporal: evenly spaced
    frames when T differs from `frames`.
    """
    b, _, t, h, w = video.shape
    if t != frames:
        idx = torch.linspace(0, t - 1, frames, device=video.device).round().long()
        video = video[:, :, idx]
    if (h, w) != (resolution, resolution):
        x = rearrange(video, "b c t h w -> (b t) c h w")
        x = F.interpolate(x, size=(resolution, resolution), mode="area" if h >= resolution else "bilinear")
        video = rearrange(x, "(b t) c h w -> b c t h w", b=b)
    return video


class Block2p1d(nn.Module):
    """Per-frame 3x3 conv then a 3-tap temporal conv, each BatchNorm + SiLU (BatchNorm trains far faster here)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, t_stride: int = 1) -> None:
        super().__init__()
        self.spatial = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.norm1 = nn.BatchNorm2d(c_out)
        self.temporal = nn.Conv1d(c_out, c_out, 3, stride=t_stride, padding=1)
        self.norm2 = nn.BatchNorm1d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        b, _, _, _, _ = x.shape
        h = rearrange(x, "b c t h w -> (b t) c h w")
        h = F.silu(self.norm1(self.spatial(h)))  # (B*T, C', H', W')
        hh, ww = h.shape[-2:]
        h = rearrange(h, "(b t) c h w -> (b h w) c t", b=b)
        h = F.silu(self.norm2(self.temporal(h)))  # (B*H'*W', C', T')
        return rearrange(h, "(b h w) c t -> b c t h w", b=b, h=hh, w=ww)


class ShapesVideoNet(nn.Module):
    """(B, 3, 16, 32, 32) in [-1, 1] -> penultimate features (B, feature_dim) and per-head logits.

    Input: the frames and their temporal differences (6 channels), a strong, cheap cue for
    motion. Factorised (2+1)D blocks: 32 -> 16 -> 8 -> 4 px, 16 -> 16 -> 8 -> 4 frames; then
    mean- and max-pooling over space-time (max keeps the small sprite from being averaged away).
    """

    def __init__(self, cfg: ShapesEvaluatorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.blocks = nn.Sequential(
            Block2p1d(6, w, stride=2), Block2p1d(w, 2 * w, stride=2),
            Block2p1d(2 * w, 4 * w, stride=2, t_stride=2), Block2p1d(4 * w, 4 * w, t_stride=2),
        )
        self.fc = nn.Linear(8 * w, cfg.feature_dim)  # from mean- and max-pooled maps
        sizes = {"motion": cfg.num_motions, "shape": cfg.num_shapes, "color": cfg.num_colors,
                 "background": cfg.num_backgrounds}
        self.heads = nn.ModuleDict({k: nn.Linear(cfg.feature_dim, sizes[k]) for k in HEADS})

    def features(self, video: Tensor) -> Tensor:
        """Penultimate features (B, feature_dim) of a video in [-1, 1] (any size: see prepare_input)."""
        x = prepare_input(video, self.cfg.frames, self.cfg.resolution)
        diff = F.pad(x[:, :, 1:] - x[:, :, :-1], (0, 0, 0, 0, 0, 1))  # (B, 3, T, H, W), last difference 0
        h = self.blocks(torch.cat([x, diff], dim=1))  # (B, 4w, 4, 4, 4)
        pooled = torch.cat([h.mean(dim=(2, 3, 4)), h.amax(dim=(2, 3, 4))], dim=1)  # (B, 8w)
        return F.silu(self.fc(pooled))  # (B, feature_dim)

    def forward(self, video: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        f = self.features(video)
        return f, {k: head(f) for k, head in self.heads.items()}


class WordTokenizer:
    """Lower-cased whitespace words -> ids over a fixed vocabulary; 0 = padding, 1 = unknown word."""

    PAD, UNK = 0, 1

    def __init__(self, vocab: list[str], max_words: int = 16) -> None:
        self.vocab = list(vocab)
        self.index = {w: i + 2 for i, w in enumerate(self.vocab)}
        self.max_words = max_words

    def __len__(self) -> int:
        return len(self.vocab) + 2

    @staticmethod
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z]+", text.lower())

    def __call__(self, texts: list[str]) -> Tensor:
        """(B, max_words) long ids, right-padded (longer captions are truncated)."""
        ids = torch.zeros(len(texts), self.max_words, dtype=torch.long)
        for i, text in enumerate(texts):
            toks = [self.index.get(w, self.UNK) for w in self.words(text)][: self.max_words]
            ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        return ids


class ShapesCLIP(nn.Module):
    """Frame encoder (B, 3, 32, 32) -> (B, D) and word-level text encoder (B, L) ids -> (B, D), unit norm."""

    def __init__(self, cfg: ShapesEvaluatorConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        d, w = cfg.embed_dim, cfg.width
        self.image = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 4 * w), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, d),
        )
        self.word = nn.Embedding(vocab_size, d, padding_idx=WordTokenizer.PAD)
        self.pos = nn.Parameter(torch.zeros(cfg.max_words, d))
        self.text = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
        self.text_proj = nn.Linear(d, d)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's temperature init

    def encode_image(self, frames: Tensor) -> Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, D) unit vectors (frames resized to the training resolution)."""
        if frames.shape[-2:] != (self.cfg.resolution, self.cfg.resolution):
            mode = "area" if frames.shape[-1] >= self.cfg.resolution else "bilinear"
            frames = F.interpolate(frames, size=(self.cfg.resolution, self.cfg.resolution), mode=mode)
        return F.normalize(self.image(frames), dim=-1)

    def encode_text(self, ids: Tensor) -> Tensor:
        """(B, L) word ids -> (B, D) unit vectors (mean over non-padding words)."""
        pad = ids == WordTokenizer.PAD  # (B, L)
        h = self.text(self.word(ids) + self.pos[: ids.shape[1]], src_key_padding_mask=pad)  # (B, L, D)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        h = (h * keep).sum(1) / keep.sum(1).clamp(min=1)
        return F.normalize(self.text_proj(h), dim=-1)


def save_evaluator(path: str | Path, video_net: ShapesVideoNet, clip: ShapesCLIP, tokenizer: WordTokenizer,
                   meta: dict) -> None:
    """Write the evaluator as plain containers (loads with torch.load(weights_only=True))."""
    torch.save({"config": asdict(video_net.cfg), "vocab": tokenizer.vocab, "meta": meta,
                "video_net": video_net.state_dict(), "clip": clip.state_dict()}, path)


def load_evaluator(path: str | Path) -> tuple[ShapesVideoNet, ShapesCLIP, WordTokenizer, dict]:
    """(video net, CLIP-style model, tokenizer, meta) in eval mode, from a file written by save_evaluator."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = ShapesEvaluatorConfig(**ckpt["config"])
    tokenizer = WordTokenizer(ckpt["vocab"], cfg.max_words)
    video_net, clip = ShapesVideoNet(cfg), ShapesCLIP(cfg, len(tokenizer))
    video_net.load_state_dict(ckpt["video_net"])
    clip.load_state_dict(ckpt["clip"])
    return video_net.eval(), clip.eval(), tokenizer, ckpt.get("meta", {})
