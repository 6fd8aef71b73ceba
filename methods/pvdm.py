"""PVDM: projected latent video diffusion (Yu et al., CVPR 2023, arXiv 2302.07685; official sihyun-yu/PVDM).

Notation (paper section 3; per clip of T frames, h = H / patch, w = W / patch, c latent channels):
    x        (C, T, H, W)   a clip
    u        (D, T, h, w)   space-time (TimeSformer) encoder features
    z_s      (c, h, w)      tanh(1x1 conv(f_s(u))): a learned summary token attends over t at each (h, w)
    z_h      (c, T, w)      the same over h at each (t, w)
    z_w      (c, T, h)      the same over w at each (t, h)
    z        (c, h*w + T*w + T*h)  the three planes flattened and concatenated: the diffusion target
    x_hat    decoder(g_s(z_s) + g_h(z_h) + g_w(z_w)): each plane 1x1-convolved back to D channels and
             broadcast over its missing axis, the three summed (the official code; the paper's text
             reads as a concatenation), a TimeSformer decoder, a per-frame ConvTranspose2d, 2 sigmoid - 1
Stages: autoencoder (L1 by default; the paper's LPIPS on one random frame and 2D + 3D PatchGAN are options,
`method.autoencoder.loss`, methods/ae_loss.py: LPIPS needs local VGG16 + linear weights, none ship)
-> diffusion (eps-prediction, MSE, over z with one 2D UNet shared by the three planes and a cross-plane
attention after every block, methods/nets/triplane.py).
Long videos: the denoiser sees [z_t, z_prev] with z_prev the previous clip's latent or zeros; in
training a clip is conditioned on the clip before it with probability `cond_prob` (0.3 in the code).
Clip length: by default a clip is the evaluated length (clip_frames = data.frames), as the paper's
FVD16 is one 16-frame clip; `sample` then generates one unconditioned clip and `sample_long` chains
any number (the paper's FVD128). Clip-conditional training needs a previous clip, so PVDM trains on
items of 2 x clip_frames (the paper's 32-frame items for 16-frame clips): `training_frames` tells
`benchmarks.common.build_datamodule`, whose training loader then yields items that long (the real
evaluation set keeps data.frames). clip_frames below data.frames chains data.frames / clip_frames
clips in `sample` (the earlier default, data.frames / 2: a clip boundary inside every evaluated video).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import Tensor, nn

from methods import diffusion as D
from methods.ae_loss import AELossConfig, AutoencoderLoss
from methods.base import Conditioning, DataSpec, VideoBatch, VideoGenerator
from methods.nets.cond_denoiser import CondDenoiser
from methods.nets.embed import TextEncoderConfig
from methods.nets.transformer import SpaceTimeTransformer
from methods.nets.triplane import PLANES, AxisSummary, Triplane, TriplaneUNet
from methods.nets.unet import UNetConfig
from methods.vdm import DiffusionConfig, diffusion_schedule, run_sampler

CLIP_WINDOWS = ("first", "random")


@dataclass
class AutoencoderConfig:
    width: int = 384  # D, the token width
    depth: int = 8  # encoder blocks (divided space-time attention)
    decoder_depth: int | None = None  # None: same as depth
    heads: int = 8
    mlp_ratio: float = 4.0
    patch: int = 8  # h = H / patch, w = W / patch (8 at 256x256, 4 at 128x128 in the code)
    latent_channels: int = 4  # c, channels of every plane
    proj_depth: int = 4  # blocks of each axis-summary transformer
    loss: AELossConfig = field(default_factory=AELossConfig)  # L1; + LPIPS and the 2D + 3D PatchGAN (the paper's)


@dataclass
class PVDMConfig:
    name: str = "pvdm"
    clip_frames: int = 0  # frames per clip the autoencoder and denoiser see; 0: data.frames (the evaluated length)
    cond_prob: float = 0.3  # training clips conditioned on the previous clip's latent (0.2 for SkyTimelapse)
    clip_window: str = "first"  # unconditioned training clips: the item's first clip | a random window (official)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)  # the 2D UNet shared by the three planes
    cross_attention: bool = True  # attention over the joined planes after every block; False: planes independent
    conditioning: str = "class"  # none | class | text | class+text
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(schedule="ldm_linear"))
    clip_x0: float | None = 1.0  # clamp the predicted z0 to tanh's range while sampling (the code's clip_denoised)


# --- autoencoder -------------------------------------------------------------------------------


class TriplaneAutoencoder(nn.Module):
    """Clip x (B, C, T, H, W) <-> tri-plane latent z (B, c, h*w + T*w + T*h)."""

    def __init__(self, cfg: AutoencoderConfig, channels: int, layout: Triplane) -> None:
        super().__init__()
        self.layout = layout
        d, p, c = cfg.width, cfg.patch, cfg.latent_channels
        self.patch = p
        # encoder: patches -> u -> three axis summaries -> c channels, tanh
        self.patch_embed = nn.Conv2d(channels, d, p, stride=p)
        self.encoder = SpaceTimeTransformer(d, cfg.depth, cfg.heads, cfg.mlp_ratio)
        self.summary = nn.ModuleList(AxisSummary(d, cfg.proj_depth, cfg.heads, cfg.mlp_ratio) for _ in PLANES)
        self.to_latent = nn.ModuleList(nn.Conv2d(d, c, 1) for _ in PLANES)
        # decoder: planes -> D channels, broadcast, summed -> TimeSformer -> pixels
        self.from_latent = nn.ModuleList(nn.Conv2d(c, d, 1) for _ in PLANES)
        self.decoder = SpaceTimeTransformer(d, cfg.depth if cfg.decoder_depth is None else cfg.decoder_depth,
                                            cfg.heads, cfg.mlp_ratio)
        self.unpatch = nn.ConvTranspose2d(d, channels, p, stride=p)

    def features(self, x: Tensor) -> Tensor:
        """x (B, C, T, H, W) -> u (B, D, T, h, w)."""
        T, H, W = x.shape[2:]
        p = self.patch
        if H % p or W % p or Triplane(T, H // p, W // p) != self.layout:
            raise ValueError(f"clip of {T}x{H}x{W} does not match the autoencoder's grid {self.layout} "
                             f"with patch {self.patch}")
        tokens = self.patch_embed(rearrange(x, "b c t h w -> (b t) c h w"))  # (B*T, D, h, w)
        tokens = rearrange(tokens, "(b t) d h w -> b t (h w) d", t=T)
        u = self.encoder(tokens, (self.layout.height, self.layout.width))  # (B, T, h*w, D)
        return rearrange(u, "b t (h w) d -> b d t h w", h=self.layout.height)

    def project(self, u: Tensor) -> list[Tensor]:
        """u (B, D, T, h, w) -> planes [z_s (B, c, h, w), z_h (B, c, T, w), z_w (B, c, T, h)] in (-1, 1)."""
        B, _, T, h, w = u.shape
        s = self.summary[0](rearrange(u, "b d t h w -> (b h w) t d"))  # over t at each (h, w)     (B*h*w, D)
        hh = self.summary[1](rearrange(u, "b d t h w -> (b t w) h d"))  # over h at each (t, w)    (B*T*w, D)
        ww = self.summary[2](rearrange(u, "b d t h w -> (b t h) w d"))  # over w at each (t, h)    (B*T*h, D)
        planes = [rearrange(s, "(b h w) d -> b d h w", b=B, h=h),
                  rearrange(hh, "(b t w) d -> b d t w", b=B, t=T),
                  rearrange(ww, "(b t h) d -> b d t h", b=B, t=T)]
        return [torch.tanh(conv(p)) for conv, p in zip(self.to_latent, planes)]

    def encode(self, x: Tensor) -> Tensor:
        """x (B, C, T, H, W) -> z (B, c, L)."""
        return self.layout.join(self.project(self.features(x)))

    def lift(self, planes: list[Tensor]) -> Tensor:
        """Planes -> the decoder's input volume (B, D, T, h, w): each lifted to D channels, broadcast, summed."""
        s, hh, ww = (conv(p) for conv, p in zip(self.from_latent, planes))
        return s[:, :, None] + hh[:, :, :, None, :] + ww[:, :, :, :, None]  # (B, D, T, h, w)

    def decode(self, z: Tensor) -> Tensor:
        """z (B, c, L) -> x_hat (B, C, T, H, W) in (-1, 1)."""
        v = self.lift(self.layout.split(z))
        T, h, w = v.shape[2:]
        tokens = self.decoder(rearrange(v, "b d t h w -> b t (h w) d"), (h, w))
        out = self.unpatch(rearrange(tokens, "b t (h w) d -> (b t) d h w", h=h))  # (B*T, C, H, W)
        return 2 * torch.sigmoid(rearrange(out, "(b t) c h w -> b c t h w", t=T)) - 1

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


# --- the method --------------------------------------------------------------------------------


class PVDM(VideoGenerator):
    """Tri-plane autoencoder + shared-weight 2D UNet diffusion over the planes; stages autoencoder, diffusion."""

    Config = PVDMConfig
    stages = ("autoencoder", "diffusion")
    long_video = True  # clip by clip, each clip conditioned on the previous clip's latent (`sample_long`)

    def __init__(self, cfg: PVDMConfig, data: DataSpec) -> None:
        super().__init__(data)
        self.cfg = cfg
        T = cfg.clip_frames or data.frames
        p = cfg.autoencoder.patch
        if T < 1 or data.frames % T:
            raise ValueError(f"method.clip_frames={cfg.clip_frames} (clip of {T} frames) must divide the "
                             f"dataset's {data.frames} frames")
        if not 0 <= cfg.cond_prob <= 1:
            raise ValueError(f"method.cond_prob must be in [0, 1], got {cfg.cond_prob}")
        if cfg.clip_window not in CLIP_WINDOWS:
            raise ValueError(f"method.clip_window must be one of {CLIP_WINDOWS}, got {cfg.clip_window!r}")
        if data.height % p or data.width % p:
            raise ValueError(f"frame size {data.height}x{data.width} is not divisible by method.autoencoder.patch={p}")
        self.layout = Triplane(T, data.height // p, data.width // p)
        c = cfg.autoencoder.latent_channels
        self.autoencoder = TriplaneAutoencoder(cfg.autoencoder, data.channels, self.layout)
        self.autoencoder_loss = AutoencoderLoss(cfg.autoencoder.loss, data.channels, (T, data.height, data.width))
        backbone = TriplaneUNet(2 * c, c, cfg.unet, self.layout, cfg.cross_attention)  # input [z_t, z_prev]
        self.denoiser = CondDenoiser(backbone, backbone.emb_dim, cfg.conditioning, data.num_classes, cfg.text)
        self.register_buffer("alpha_bar", diffusion_schedule(cfg.diffusion), persistent=False)

    @staticmethod
    def training_frames(cfg: PVDMConfig, frames: int) -> int:
        """Frames per training item for clips of `cfg.clip_frames` (0: `frames`, the evaluated length): a whole
        number of clips, at least two when clip-conditional training is on (the previous clip and the clip)."""
        T = cfg.clip_frames or frames
        if T < 1 or frames % T:
            return frames  # the constructor names the problem
        return max(frames, 2 * T) if cfg.cond_prob > 0 else frames

    @property
    def clip_frames(self) -> int:
        return self.layout.frames

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(c, L) of one clip's z."""
        return (self.cfg.autoencoder.latent_channels, self.layout.length)

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        self.check_stage(stage)
        if stage == "autoencoder":  # with the PatchGAN's discriminators when the loss has them
            return [p for p in self.autoencoder.parameters() if p.requires_grad] + self.autoencoder_loss.trainable_parameters()
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def stage_param_groups(self, stage: str) -> list[dict]:
        """Optimiser groups: the PatchGAN's discriminators are a player of their own in the autoencoder stage."""
        if stage == "autoencoder":
            return self.autoencoder_loss.param_groups([p for p in self.autoencoder.parameters() if p.requires_grad])
        return super().stage_param_groups(stage)

    # --- clips -------------------------------------------------------------------------------------

    def split_clips(self, video: Tensor) -> Tensor:
        """video (B, C, k*T, H, W) -> its k consecutive clips (B*k, C, T, H, W)."""
        return rearrange(video, "b c (k t) h w -> (b k) c t h w", t=self.clip_frames)

    def training_clips(self, video: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(current (B, C, T, H, W), previous (B, C, T, H, W), conditioned (B,) bool) from items (B, C, F, H, W).

        A conditioned row's current clip starts at s uniform in [T, F - T] and its previous clip is frames
        [s - T, s) (with F = 2T: the second half and the first half). Any other row's clip is, by `clip_window`,
        the item's first clip [0, T) ("first": distributed as the evaluated clips, which are items'
        starts; on real data an item starts at a random offset, so this is a random window too) or a
        random window [s, s + T), s uniform in [0, F - T] ("random": the official code's random prefix).
        """
        B, F, T = video.shape[0], video.shape[2], self.clip_frames
        if F < T or (self.cfg.cond_prob > 0 and F < 2 * T):
            raise ValueError(f"PVDM trains on items of {self.training_frames(self.cfg, self.data.frames)} frames "
                             f"(clips of {T}, {'the previous clip and the clip' if self.cfg.cond_prob else 'one clip'})"
                             f", got {F}: build the data module with benchmarks.common.build_datamodule, whose "
                             "training loader yields items that long, or set method.cond_prob=0")
        conditioned = torch.rand(B, device=video.device) < self.cfg.cond_prob
        lo = conditioned.long() * T
        hi = torch.full_like(lo, F - T)
        if self.cfg.clip_window == "first":
            hi = torch.where(conditioned, hi, 0)  # unconditioned rows: the item's first clip
        start = lo + (torch.rand(B, device=video.device) * (hi - lo + 1)).long()
        starts = start.tolist()
        current = torch.stack([v[:, s: s + T] for v, s in zip(video, starts)])
        previous = torch.stack([v[:, max(s - T, 0): max(s - T, 0) + T] for v, s in zip(video, starts)])
        return current, previous, conditioned

    @torch.no_grad()
    def encode(self, clip: Tensor) -> Tensor:
        """clip (B, C, T, H, W) -> z (B, c, L) with the (frozen) autoencoder."""
        return self.autoencoder.encode(clip).float()

    # --- losses ------------------------------------------------------------------------------------

    def loss(self, stage: str, batch: VideoBatch) -> dict[str, Tensor]:
        self.check_stage(stage)
        video = batch.video  # (B, C, F, H, W)
        if stage == "autoencoder":
            x = self.split_clips(video)  # every clip of every item                  (B*k, C, T, H, W)
            return self.autoencoder_loss(x, self.autoencoder(x), self.autoencoder.unpatch.weight)  # L1 (+ LPIPS, GAN)
        current, previous, conditioned = self.training_clips(video)
        z = self.frozen_encode(self.encode, current, self.autoencoder)  # (B, c, L)
        z_prev = torch.zeros_like(z)
        if conditioned.any():
            z_prev[conditioned] = self.frozen_encode(self.encode, previous[conditioned], self.autoencoder)
        cond = Conditioning.from_batch(batch)
        n = z.shape[0]
        t = D.sample_timesteps(n, len(self.alpha_bar), z.device)
        drop = self.denoiser.random_drop(n, self.cfg.diffusion.cond_drop_prob, z.device)
        per_sample = D.diffusion_loss(lambda z_t, tt: self.denoiser(torch.cat([z_t, z_prev], dim=1), tt, cond, drop),
                                      z, t, self.alpha_bar, torch.randn_like(z), self.cfg.diffusion.objective,
                                      self.cfg.diffusion.min_snr_gamma)
        return {"loss": per_sample.mean(), "conditioned": conditioned.float().mean()}

    # --- sampling ----------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_latent(self, n: int, cond: Conditioning, z_prev: Tensor | None, *, steps: int, guidance: float,
                      generator: torch.Generator | None = None, eta: float = 0.0) -> Tensor:
        """One clip's z (n, c, L) by the configured sampler (DDIM, DPM-Solver++(2M) or DDPM) with CFG on the
        class/caption, given the previous clip's z_prev (n, c, L) or None (zeros: an unconditioned first clip)."""
        z_T = torch.randn((n, *self.latent_shape), generator=generator, device=self.device)
        z_prev = torch.zeros_like(z_T) if z_prev is None else z_prev.to(z_T)
        guided = self.denoiser.guided(cond, guidance)
        obj = self.cfg.diffusion.objective
        model = D.as_eps_model(lambda z_t, t: guided(torch.cat([z_t, z_prev.to(z_t.dtype)], dim=1), t),
                               self.alpha_bar, obj)
        sampler = self.cfg.diffusion.sampler
        z = run_sampler(sampler, model, z_T, self.alpha_bar, steps, eta, generator,
                        clip_x0=None if sampler == "ddpm" else self.cfg.clip_x0)  # DDPM: unclamped, as before
        return z.float().clamp(-1, 1)  # z lives in tanh's range

    @torch.no_grad()
    def sample_long(self, n: int, cond: Conditioning, clips: int, *, steps: int, guidance: float,
                    generator: torch.Generator | None = None, eta: float = 0.0,
                    context: Tensor | None = None) -> Tensor:
        """n videos of `clips` clips (n, C, clips * T, H, W) in [-1, 1], generated clip by clip.

        Each clip is conditioned on the previous clip's z; the first on zeros, or on the encoded
        `context` clip (n, C, T, H, W) when given (the video then continues it; context not returned).
        """
        if clips < 1:
            raise ValueError(f"clips must be >= 1, got {clips}")
        z_prev = None if context is None else self.encode(context.to(self.device))
        out = []
        for _ in range(clips):
            z_prev = self.sample_latent(n, cond, z_prev, steps=steps, guidance=guidance, generator=generator, eta=eta)
            out.append(self.autoencoder.decode(z_prev).float())
        return torch.cat(out, dim=2).clamp(-1, 1)

    @torch.no_grad()
    def sample(self, n: int, cond: Conditioning, *, steps: int, guidance: float,
               generator: torch.Generator | None = None, eta: float = 0.0) -> Tensor:
        """n videos (n, C, data.frames, H, W): data.frames / clip_frames clips chained by `sample_long` (one
        unconditioned clip at the default clip length)."""
        return self.sample_long(n, cond, self.data.frames // self.clip_frames, steps=steps, guidance=guidance,
                                generator=generator, eta=eta)

    def reconstruct(self, video: Tensor) -> Tensor:
        """video (B, C, F, H, W) -> its autoencoder reconstruction, clip by clip (for R-FVD)."""
        with torch.no_grad():
            x_hat = self.autoencoder(self.split_clips(video))
        return rearrange(x_hat.float(), "(b k) c t h w -> b c (k t) h w", b=video.shape[0]).clamp(-1, 1)
