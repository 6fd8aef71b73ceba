"""VideoMAE features for content-debiased FVD (Ge et al., CVPR 2024; package cd-fvd), from a local folder.

cd-fvd's VideoMAE path (`cdfvd/fvd.py` `get_videomae_features`, `cdfvd/third_party/VideoMAEv2/utils.py`):

    model         VideoMAE-v2 ViT-g/14 fine-tuned on Something-Something v2 (`vit_g_hybrid_pt_1200e_ssv2_ft.pth`:
                  224 px, 16 frames, tubelet 2, 1408 wide, 40 blocks, 16 heads, LayerNorm eps 1e-6,
                  fixed sinusoidal positions, mean pooling)
    input         uint8 (T, H, W, C) per video -> (C, T, H, W) float / 255, every frame resized straight
                  to 224 x 224 (F.interpolate bilinear, align_corners=False, no antialias, no crop, aspect
                  not kept), values left in [0, 1] (no mean / std normalisation)
    features      `forward_features`: fc_norm(mean over all tokens of the last block), 1408-d
    statistics    mean and biased covariance (N) in float64; scipy.linalg.sqrtm, real part

Here the network is transformers' `VideoMAEModel` loaded from a local folder (`from_pretrained`,
nothing downloaded). A `VideoMAEForVideoClassification` folder (what `convert_videomaev2` writes
from cd-fvd's checkpoint) also supplies `fc_norm`, applied with the folder's `layer_norm_eps`
(transformers' own classification head builds it with eps 1e-5; VideoMAE-v2 uses 1e-6); a bare
`VideoMAEModel` folder gives the plain token mean (`pooling` says which, and the results row records it).
Clips must have exactly the model's `num_frames` (cd-fvd interpolates the position table for other
lengths; that is not reproduced).

    python -m evaluation.videomae vit_g_hybrid_pt_1200e_ssv2_ft.pth /w/videomae_v2_g_ssv2   # convert once
    ... eval.protocol=cd-fvd eval.paths.videomae=/w/videomae_v2_g_ssv2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}  # ViT-S/B/L/H/g as VideoMAE(-v2) builds them


def cdfvd_preprocess(video_u8: Tensor, size: int = 224) -> Tensor:
    """uint8 (B, 3, T, H, W) -> float (B, T, 3, size, size) in [0, 1], as cd-fvd's `preprocess_videomae`.

    x / 255, each frame resized straight to size x size (bilinear, align_corners=False, no antialias),
    no normalisation; laid out (B, T, C, H, W) as transformers' VideoMAE wants its pixel_values.
    """
    b = video_u8.shape[0]
    x = rearrange(video_u8.float() / 255, "b c t h w -> (b c) t h w")
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return rearrange(x, "(b c) t h w -> b t c h w", b=b)


class VideoMAEFeatures(nn.Module):
    """uint8 (B, 3, T, H, W) -> (B, hidden) cd-fvd features: fc_norm(mean of the last tokens) (or the mean)."""

    def __init__(self, model: nn.Module, fc_norm: nn.LayerNorm | None) -> None:
        super().__init__()
        self.model, self.fc_norm = model, fc_norm
        cfg = model.config
        self.num_frames, self.image_size = int(cfg.num_frames), int(cfg.image_size)
        self.pooling = "fc_norm(mean tokens)" if fc_norm is not None else "mean tokens"

    def forward(self, video_u8: Tensor) -> Tensor:
        if video_u8.shape[2] != self.num_frames:
            raise ValueError(f"the VideoMAE detector scores clips of exactly {self.num_frames} frames (its "
                             f"num_frames; cd-fvd's model: 16); got {video_u8.shape[2]}: set dataset.frames={self.num_frames}")
        out = self.model(pixel_values=cdfvd_preprocess(video_u8, self.image_size))
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, N, D)
        pooled = hidden.mean(1)
        return self.fc_norm(pooled) if self.fc_norm is not None else pooled


def load_videomae(path: str | Path) -> VideoMAEFeatures:
    """The feature extractor of a local transformers VideoMAE folder (classification or bare model)."""
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification, VideoMAEModel  # optional dependency

    config = VideoMAEConfig.from_pretrained(str(path))
    if "VideoMAEForVideoClassification" in (config.architectures or []) and config.use_mean_pooling:
        clf = VideoMAEForVideoClassification.from_pretrained(str(path))
        fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # VideoMAE(-v2)'s eps, not transformers' 1e-5
        fc_norm.load_state_dict(clf.fc_norm.state_dict())
        return VideoMAEFeatures(clf.videomae, fc_norm).eval()
    return VideoMAEFeatures(VideoMAEModel.from_pretrained(str(path)), None).eval()


def _unwrap(state: dict) -> dict:
    for key in ("model", "module"):  # how VideoMAE-v2 / cd-fvd checkpoints may nest the weights
        if key in state and isinstance(state[key], dict):
            return state[key]
    return state


def convert_videomaev2(src: str | Path | dict, out_dir: str | Path, num_heads: int | None = None,
                       image_size: int = 224, num_frames: int = 16, layer_norm_eps: float = 1e-6) -> Path:
    """Write a VideoMAE-v2 fine-tuned checkpoint (cd-fvd's `VisionTransformer` keys) as a transformers folder.

    src: the `.pth` (e.g. `vit_g_hybrid_pt_1200e_ssv2_ft.pth`) or its state dict. Width, depth, MLP
    width, patch and tubelet sizes and classes are read off the tensors; num_heads defaults by width
    (ViT-g: 16). Every source tensor must be used and every target one filled (strict), so an
    unsupported variant (layer scale, cosine attention, learnt positions) fails loudly.
    """
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    state = _unwrap(torch.load(src, map_location="cpu", weights_only=True) if not isinstance(src, dict) else src)
    state = dict(state)  # a copy: tensors are popped as they are converted
    w = state["patch_embed.proj.weight"]  # (D, 3, tubelet, p, p)
    hidden, tubelet, patch = w.shape[0], w.shape[2], w.shape[3]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    heads = num_heads or HEADS_BY_WIDTH.get(hidden)
    if heads is None:
        raise ValueError(f"width {hidden}: give num_heads (known widths: {HEADS_BY_WIDTH})")
    config = VideoMAEConfig(
        image_size=image_size, patch_size=patch, num_channels=3, num_frames=num_frames, tubelet_size=tubelet,
        hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads,
        intermediate_size=state["blocks.0.mlp.fc1.weight"].shape[0], hidden_act="gelu", layer_norm_eps=layer_norm_eps,
        qkv_bias=True, use_mean_pooling=True, num_labels=state["head.weight"].shape[0],
        architectures=["VideoMAEForVideoClassification"])
    model = VideoMAEForVideoClassification(config)
    target = model.state_dict()
    prefix = "videomae.encoder.layer.{}.attention.attention."
    q_bias = "q_bias" if prefix.format(0) + "q_bias" in target else "query.bias"  # transformers 4 | 5
    v_bias = "v_bias" if prefix.format(0) + "v_bias" in target else "value.bias"
    out: dict[str, Tensor] = {
        "videomae.embeddings.patch_embeddings.projection.weight": state.pop("patch_embed.proj.weight"),
        "videomae.embeddings.patch_embeddings.projection.bias": state.pop("patch_embed.proj.bias"),
        "fc_norm.weight": state.pop("fc_norm.weight"), "fc_norm.bias": state.pop("fc_norm.bias"),
        "classifier.weight": state.pop("head.weight"), "classifier.bias": state.pop("head.bias"),
    }
    for i in range(depth):
        src_, dst = f"blocks.{i}.", f"videomae.encoder.layer.{i}."
        q, k, v = state.pop(src_ + "attn.qkv.weight").chunk(3, dim=0)
        att = prefix.format(i)
        out.update({att + "query.weight": q, att + "key.weight": k, att + "value.weight": v,
                    att + q_bias: state.pop(src_ + "attn.q_bias"), att + v_bias: state.pop(src_ + "attn.v_bias")})
        for a, b in (("norm1", "layernorm_before"), ("norm2", "layernorm_after"), ("attn.proj", "attention.output.dense"),
                     ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = state.pop(f"{src_}{a}.{p}")
    if state:
        raise ValueError(f"unsupported VideoMAE-v2 checkpoint: tensors not converted: {sorted(state)[:8]}")
    model.load_state_dict(out, strict=True)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Convert a VideoMAE-v2 checkpoint (cd-fvd's) to a transformers folder.")
    ap.add_argument("checkpoint", help="e.g. vit_g_hybrid_pt_1200e_ssv2_ft.pth")
    ap.add_argument("out_dir")
    ap.add_argument("--num-heads", type=int, default=None)
    args = ap.parse_args(argv)
    print(convert_videomaev2(args.checkpoint, args.out_dir, num_heads=args.num_heads))


if __name__ == "__main__":
    main()
