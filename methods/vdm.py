"""VDM baseline (Ho et al. 2022): one diffusion model over whole pixel videos.

Notation: x0 (B, C, T, H, W) the clip, x_t its noised version, eps the noise; the network
eps_theta(x_t, t, c) is a factorised space-time UNet. It is the yardstick: every decomposed
method's cost and quality is compared against it at the same data and budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from methods import diffusion as D
from methods.base import Conditioning, DataSpec, VideoBatch, VideoGenerator
from methods.nets.cond_denoiser import CondDenoiser
from methods.nets.embed import TextEncoderConfig
from methods.nets.unet import UNet, UNetConfig


@dataclass
class DiffusionConfig:
    schedule: str = "linear"  # linear | ldm_linear | cosine
    num_timesteps: int = 1000
    objective: str = "eps"  # eps | v | x0
    sampler: str = "ddim"  # ddim | ddpm | dpmpp2m (DPM-Solver++(2M): deterministic, DDIM's trajectory in fewer steps)
    cond_drop_prob: float = 0.1  # CFG training: condition dropped with this probability
    min_snr_gamma: float = 0.0  # > 0: Min-SNR-gamma loss weighting (methods.diffusion.min_snr_weight); 0: the plain loss
    snr_shift: float = 1.0  # > 1: every SNR of the schedule divided by its square (methods.diffusion.shift_snr)


def diffusion_schedule(d: DiffusionConfig) -> Tensor:
    """alpha_bar (T,) float64 of a diffusion config: its named schedule, shifted by its `snr_shift`."""
    return D.alpha_bar_schedule(d.schedule, d.num_timesteps, d.snr_shift)


@dataclass
class VDMConfig:
    name: str = "vdm"
    backbone: str = "lean"  # lean: our factorised (2+1)D UNet; diffusers: UNet3DConditionModel (paper-scale baseline)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    conditioning: str = "class"  # none | class | text | class+text
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)


class DiffusersUNet3D(nn.Module):
    """diffusers' UNet3DConditionModel behind our (x, t, emb) backbone call; emb becomes one cross-attn token."""

    def __init__(self, in_channels: int, out_channels: int, cfg: UNetConfig) -> None:
        super().__init__()
        from diffusers import UNet3DConditionModel

        self.emb_dim = cfg.emb_dim or 4 * cfg.channels[0]
        n = len(cfg.channels)
        self.net = UNet3DConditionModel(
            in_channels=in_channels, out_channels=out_channels, block_out_channels=tuple(cfg.channels),
            down_block_types=("CrossAttnDownBlock3D",) * (n - 1) + ("DownBlock3D",),
            up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * (n - 1),
            layers_per_block=cfg.blocks_per_level, cross_attention_dim=self.emb_dim,
            attention_head_dim=max(8, cfg.channels[0] // cfg.heads), norm_num_groups=min(8, cfg.channels[0]))

    def forward(self, x: Tensor, t: Tensor, emb: Tensor | None = None) -> Tensor:
        if emb is None:
            emb = x.new_zeros(x.shape[0], self.emb_dim)
        return self.net(x, t, encoder_hidden_states=emb[:, None].to(x.dtype)).sample


class VDM(VideoGenerator):
    Config = VDMConfig
    stages = ("denoiser",)

    def __init__(self, cfg: VDMConfig, data: DataSpec) -> None:
        super().__init__(data)
        self.cfg = cfg
        c = data.channels
        if cfg.backbone == "lean":
            backbone = UNet(c, c, cfg.unet, temporal=True)
        elif cfg.backbone == "diffusers":
            backbone = DiffusersUNet3D(c, c, cfg.unet)
        else:
            raise ValueError(f"method.backbone must be 'lean' or 'diffusers', got {cfg.backbone!r}")
        self.denoiser = CondDenoiser(backbone, backbone.emb_dim, cfg.conditioning, data.num_classes, cfg.text)
        self.register_buffer("alpha_bar", diffusion_schedule(cfg.diffusion), persistent=False)

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        self.check_stage(stage)
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def loss(self, stage: str, batch: VideoBatch) -> dict[str, Tensor]:
        self.check_stage(stage)
        x0 = batch.video  # (B, C, T, H, W)
        n = x0.shape[0]
        t = D.sample_timesteps(n, len(self.alpha_bar), x0.device)
        noise = torch.randn_like(x0)
        drop = self.denoiser.random_drop(n, self.cfg.diffusion.cond_drop_prob, x0.device)
        cond = Conditioning.from_batch(batch)
        per_sample = D.diffusion_loss(lambda x_t, tt: self.denoiser(x_t, tt, cond, drop), x0, t, self.alpha_bar,
                                      noise, self.cfg.diffusion.objective, self.cfg.diffusion.min_snr_gamma)
        return {"loss": per_sample.mean()}

    @torch.no_grad()
    def sample(self, n: int, cond: Conditioning, *, steps: int, guidance: float,
               generator: torch.Generator | None = None, eta: float = 0.0) -> Tensor:
        x_T = torch.randn((n, *self.data.video_shape), generator=generator, device=self.device)
        model = D.as_eps_model(self.denoiser.guided(cond, guidance), self.alpha_bar, self.cfg.diffusion.objective)
        return run_sampler(self.cfg.diffusion.sampler, model, x_T, self.alpha_bar, steps, eta, generator).clamp(-1, 1)


def run_sampler(sampler: str, model: D.Model, x_T: Tensor, alpha_bar: Tensor, steps: int, eta: float,
                generator: torch.Generator | None, noise_fn: D.NoiseFn = D.default_noise,
                clip_x0: float | None = None) -> Tensor:
    """Dispatch on the configured sampler name (ddim | ddpm | dpmpp2m). clip_x0: DDIM and DPM-Solver++ clamp each
    step's x0 estimate to [-clip_x0, clip_x0] (DDIM re-derives eps from it: DDPM's clip_denoised); None: no clamp."""
    if sampler == "ddim":
        return D.ddim_sample(model, x_T, alpha_bar, steps, eta=eta, generator=generator, noise_fn=noise_fn,
                             clip_x0=clip_x0)
    if sampler == "dpmpp2m":
        if eta:
            raise ValueError(f"the dpmpp2m sampler is deterministic (the ODE); got sample.eta={eta}: set it to 0 "
                             "or use the ddim sampler")
        return D.dpmpp_2m_sample(model, x_T, alpha_bar, steps, clip_x0=clip_x0)
    if clip_x0 is not None:
        raise ValueError("clip_x0 is implemented for the ddim and dpmpp2m samplers only; choose one or set clip_x0 to 0")
    if sampler == "ddpm":
        return D.ddpm_sample(model, x_T, alpha_bar, generator=generator, noise_fn=noise_fn)
    raise ValueError(f"unknown sampler {sampler!r}; choose ddim, ddpm or dpmpp2m")
