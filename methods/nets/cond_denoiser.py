"""A conditional denoiser: backbone + condition embedder, with CFG-ready calls.

Shared by every method whose network is "a UNet over x_t conditioned on a class/caption":
the VDM baseline, the image prior, CMD's content model, VideoFusion's generators.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from methods.base import Conditioning
from methods.diffusion import NO_GUIDANCE, cfg_combine
from methods.nets.embed import ConditionEmbedder, TextEncoderConfig


class CondDenoiser(nn.Module):
    """eps_theta(x_t, t, c): `backbone(x, t, emb)` with emb from a `ConditionEmbedder`.

    conditioning: "none", "class", "text" or "class+text".
    """

    def __init__(self, backbone: nn.Module, emb_dim: int, conditioning: str, num_classes: int,
                 text: TextEncoderConfig | None) -> None:
        super().__init__()
        if conditioning not in ("none", "class", "text", "class+text"):
            raise ValueError(f"conditioning must be none|class|text|class+text, got {conditioning!r}")
        use_class = "class" in conditioning
        if use_class and num_classes <= 0:
            raise ValueError("conditioning on class needs a labelled dataset (num_classes > 0)")
        self.backbone = backbone
        self.conditioning = conditioning
        self.embedder = ConditionEmbedder(emb_dim, num_classes if use_class else 0,
                                          text if "text" in conditioning else None)

    def embed(self, n: int, cond: Conditioning | None, drop: Tensor | None, device: torch.device) -> Tensor | None:
        cond = cond or Conditioning()
        return self.embedder(n, label=cond.label, text=cond.text, drop=drop, device=device)

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning | None = None, drop: Tensor | None = None,
                extra_emb: Tensor | None = None) -> Tensor:
        emb = self.embed(x_t.shape[0], cond, drop, x_t.device)
        if extra_emb is not None:
            emb = extra_emb if emb is None else emb + extra_emb
        return self.backbone(x_t, t, emb)

    def random_drop(self, n: int, p: float, device: torch.device) -> Tensor | None:
        """(n,) bool: which rows train unconditionally (CFG training, p = 0.1 in the papers)."""
        if not self.embedder.enabled or p <= 0:
            return None
        return torch.rand(n, device=device) < p

    def guided(self, cond: Conditioning | None, guidance: float):
        """A `model(x_t, t) -> eps` closure with classifier-free guidance scale s = `guidance` (one doubled batch).

        s = 1 (or an unconditional model) skips the null branch: the conditional prediction alone.
        """
        if guidance == NO_GUIDANCE or not self.embedder.enabled:
            return lambda x_t, t: self(x_t, t, cond)

        def model(x_t: Tensor, t: Tensor) -> Tensor:
            n = x_t.shape[0]
            emb_c = self.embed(n, cond, None, x_t.device)
            emb_u = self.embed(n, cond, torch.ones(n, dtype=torch.bool, device=x_t.device), x_t.device)
            out = self.backbone(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([emb_c, emb_u]))
            eps_c, eps_u = out.chunk(2)
            return cfg_combine(eps_c, eps_u, guidance)

        return model
