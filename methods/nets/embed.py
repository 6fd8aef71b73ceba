"""Timestep, class and text embeddings shared by every denoiser."""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) (Transformer positional encoding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


class TimestepEmbedder(nn.Module):
    """(B,) timesteps -> (B, dim) through sinusoids and a 2-layer MLP."""

    def __init__(self, dim: int, freq_dim: int = 128) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))


@dataclass
class TextEncoderConfig:
    kind: str = "learned"  # "learned": a small word-level transformer trained with the model; "clip": a local CLIP folder
    clip_path: str | None = None  # local transformers CLIP folder when kind == "clip"
    vocab_buckets: int = 2048  # words are hashed into this many buckets (no vocabulary file needed)
    width: int = 128
    depth: int = 2
    max_words: int = 24


class LearnedTextEncoder(nn.Module):
    """Captions -> (B, L, width) tokens and a (B, width) pooled vector; a small word-hash transformer.

    Words are hashed (crc32) into buckets, so it needs no vocabulary file and works on any
    caption set; it is trained jointly with the denoiser.
    """

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_buckets + 1, cfg.width, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(1, cfg.max_words, cfg.width))
        layer = nn.TransformerEncoderLayer(cfg.width, nhead=4, dim_feedforward=2 * cfg.width, batch_first=True,
                                           norm_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.out_dim = cfg.width

    def tokenize(self, texts: list[str], device: torch.device) -> Tensor:
        ids = torch.zeros(len(texts), self.cfg.max_words, dtype=torch.long)
        for i, text in enumerate(texts):
            words = re.findall(r"[a-z0-9]+", text.lower())[: self.cfg.max_words]
            for j, w in enumerate(words):
                ids[i, j] = 1 + zlib.crc32(w.encode()) % self.cfg.vocab_buckets
        return ids.to(device)

    def forward(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        ids = self.tokenize(texts, self.pos.device)  # (B, L)
        pad = ids == 0
        pad[:, 0] = False  # an empty caption still attends to one position
        h = self.encoder(self.tok(ids) + self.pos, src_key_padding_mask=pad)  # (B, L, D)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        pooled = (h * keep).sum(1) / keep.sum(1)  # (B, D)
        return h, pooled


class CLIPTextEncoder(nn.Module):
    """A frozen CLIP text encoder from a local transformers folder (nothing is downloaded)."""

    frozen_weights = True  # never trained: `trainable` leaves its parameters out of every stage

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        from pathlib import Path

        if not cfg.clip_path or not Path(cfg.clip_path).is_dir():
            raise FileNotFoundError(
                f"CLIP text encoder folder {cfg.clip_path!r} not found (config key method.text.clip_path): "
                "give a local folder saved with transformers' CLIPModel.save_pretrained (e.g. openai/clip-vit-base-patch32)")
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(cfg.clip_path)
        self.model = CLIPTextModelWithProjection.from_pretrained(cfg.clip_path).eval().requires_grad_(False)
        self.out_dim = self.model.config.hidden_size

    def forward(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        device = next(self.model.parameters()).device
        enc = self.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt").to(device)
        out = self.model(**enc)
        h = out.last_hidden_state
        return h, h[torch.arange(h.shape[0]), enc["input_ids"].argmax(-1)]


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """`module`'s parameters that a stage may train: requires_grad, minus those of submodules marked
    `frozen_weights = True` (a pretrained text encoder), whatever their requires_grad says (a runner that
    re-enables every parameter between stages must not turn them into trained ones)."""
    frozen = {id(p) for m in module.modules() if getattr(m, "frozen_weights", False) for p in m.parameters()}
    return [p for p in module.parameters() if p.requires_grad and id(p) not in frozen]


def build_text_encoder(cfg: TextEncoderConfig) -> nn.Module:
    if cfg.kind == "learned":
        return LearnedTextEncoder(cfg)
    if cfg.kind == "clip":
        return CLIPTextEncoder(cfg)
    raise ValueError(f"unknown text encoder kind {cfg.kind!r}; choose 'learned' or 'clip'")


class ConditionEmbedder(nn.Module):
    """Class label and/or caption -> one (B, dim) vector added to the timestep embedding.

    Classifier-free guidance needs a "null" condition: label index `num_classes` and the
    empty caption are learned null embeddings; `drop` (B,) bool replaces a row's condition by null.
    """

    def __init__(self, dim: int, num_classes: int = 0, text: TextEncoderConfig | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.label = nn.Embedding(num_classes + 1, dim) if num_classes > 0 else None
        self.text = build_text_encoder(text) if text is not None else None
        self.text_proj = nn.Linear(self.text.out_dim, dim) if self.text is not None else None
        self.null_text = nn.Parameter(torch.zeros(dim)) if self.text is not None else None

    @property
    def enabled(self) -> bool:
        return self.label is not None or self.text is not None

    def forward(self, batch_size: int, label: Tensor | None = None, text: list[str] | None = None,
                drop: Tensor | None = None, device: torch.device | None = None) -> Tensor | None:
        if not self.enabled:
            return None
        out = 0
        if self.label is not None:
            if label is None:
                label = torch.full((batch_size,), self.num_classes, device=device, dtype=torch.long)
            if drop is not None:
                label = torch.where(drop, torch.full_like(label, self.num_classes), label)
            out = out + self.label(label)
        if self.text is not None:
            if text is None:
                emb = self.null_text.expand(batch_size, -1)
            else:
                emb = self.text_proj(self.text(text)[1])
                if drop is not None:
                    emb = torch.where(drop[:, None], self.null_text.to(emb.dtype).expand_as(emb), emb)
            out = out + emb
        return out
