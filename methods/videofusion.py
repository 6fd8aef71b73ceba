"""VideoFusion (Luo et al., CVPR 2023, arXiv 2303.08320): decomposed noise for video diffusion.

Notation (paper section 3; per video of N frames, frame index i, key frame k = floor(N / 2)):
    b        (C, H, W)       base noise shared by every frame of a video
    r_i      (C, H, W)       residual noise of frame i
    lam_i    scalar          share of base noise: lam_k = 1, lam_i = lam otherwise
    eps_i    = sqrt(lam_i) b + sqrt(1 - lam_i) r_i                                   (eq. 5)
    x_t^i    = sqrt(alpha_bar_t) x0^i + sqrt(1 - alpha_bar_t) eps_i                  (eq. 6)
    z_b      base generator: an image denoiser (from the shared image prior) that sees only
             the noisy key frame x_t^k and predicts b
    x'_t^i   = x_t^i - sqrt(lam_i) sqrt(1 - alpha_bar_t) z_b(x_t^k, t)               (eq. 9)
    z_r      residual generator: predicts r_i from x'_t^i, t and the frame index i
    eps_hat_i = sqrt(lam_i) z_b(x_t^k, t) + sqrt(1 - lam_i) z_r(x'_t^i, t, i)         (eq. 10)
With a Stable Diffusion prior (`image_prior.diffusers_path` holding `vae/`) the whole decomposition runs
on per-frame VAE latents (C, H, W above are the latent's), z_b starts from the folder's UNet conditioned
through its own text encoder (methods/image_prior.py), and samples are decoded frame by frame.
Objective (`image_prior.diffusion.objective`, both generators): eps, as written above; or v, the
parametrisation of VDM's and CMD's tiny presets. With v, z_b predicts the key frame's
v_k = sqrt(a) b - sqrt(1 - a) x0^k (a = alpha_bar_t; the image prior's own objective) and b_hat =
sqrt(a) x_t^k + sqrt(1 - a) v_hat_k exactly; z_r predicts the v of the base-removed frame, which is a
diffusion of x0^i with noise scale s_i = sqrt(1 - lam_i) sqrt(1 - a):
    x'_t^i = sqrt(a) x0^i + s_i r*_i,   r*_i = (eps_i - sqrt(lam_i) b_hat) / sqrt(1 - lam_i)
    w_i    = (sqrt(a) r*_i - s_i x0^i) / n_i,   n_i = sqrt(a + s_i^2)
    r_hat  = sqrt(a) w_hat / n_i + s_i x'_t^i / n_i^2                       (exact: w_hat = w_i gives r*_i)
r*_i is the residual that makes eq. 10 exact given b_hat, the optimum of the eps loss too, so eq. 9, eq. 10
and the stop-gradient are unchanged: only what the two networks output is, as v is only eps re-weighted.
Every frame's marginal is the usual DDPM one, so a standard DDIM step per frame samples it,
with the start noise and (eta > 0) the step noise drawn from the same decomposition: this
is the sampler's `noise_fn`. The base generator learns only from the key-frame loss (the
residual loss sees it through a stop-gradient) and is fine-tuned with a smaller learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from methods import diffusion as D
from methods.base import Conditioning, DataSpec, VideoBatch, VideoGenerator
from methods.image_prior import ImagePrior, ImagePriorConfig, image_prior_cache_key, random_frames, repeat_conditioning
from methods.nets.cond_denoiser import CondDenoiser
from methods.nets.embed import TextEncoderConfig, trainable
from methods.nets.unet import UNet, UNetConfig
from methods.vdm import run_sampler

OBJECTIVES = ("eps", "v")  # what z_b and z_r output (x0 is not offered: its eps is unstable at low noise)


@dataclass
class ResidualConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    temporal: bool = True  # factorised temporal layers in z_r (the paper leaves the residual network's form open)
    conditioning: str = "class"  # none | class | text | class+text
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)


@dataclass
class VideoFusionConfig:
    name: str = "videofusion"
    lam: float = 0.5  # lam_i for every frame but the key frame (paper's main setting; ablated there)
    image_prior: ImagePriorConfig = field(default_factory=ImagePriorConfig)  # z_b's architecture, schedule, condition
    base_init: str = "image_prior"  # image_prior: z_b starts from the trained/cached prior | scratch
    base_lr_scale: float = 0.1  # z_b's learning rate relative to the stage's (joint fine-tuning, small lr)
    residual: ResidualConfig = field(default_factory=ResidualConfig)
    # DDIM clamps each step's x0 estimate to [-clip_x0, clip_x0] (pixels; the official DDPM code's clip_denoised);
    # 0: off. With eps prediction the x0 estimate at high t is eps's error amplified by sqrt(1 - a) / sqrt(a)
    clip_x0: float = 0.0


class VideoFusion(VideoGenerator):
    """Shared base noise + per-frame residual noise; stages [image_prior,] video."""

    Config = VideoFusionConfig
    stages = ("image_prior", "video")
    shared_stages: dict[str, str] = {"image_prior": "image_prior"}

    def __init__(self, cfg: VideoFusionConfig, data: DataSpec) -> None:
        super().__init__(data)
        if not 0 <= cfg.lam < 1:
            raise ValueError(f"method.lam must be in [0, 1), got {cfg.lam}")
        if cfg.base_init not in ("image_prior", "scratch"):
            raise ValueError(f"method.base_init must be 'image_prior' or 'scratch', got {cfg.base_init!r}")
        if cfg.image_prior.diffusion.objective not in OBJECTIVES and not cfg.image_prior.diffusers_path:
            raise ValueError(f"VideoFusion's generators predict eps or v (converted exactly to its decomposed noise), "
                             f"got method.image_prior.diffusion.objective={cfg.image_prior.diffusion.objective!r}: "
                             "set it to eps or v")
        self.cfg = cfg
        self.key = data.frames // 2  # k = floor(N / 2)
        self.base = ImagePrior(cfg.image_prior, data)  # z_b (a Stable Diffusion folder's UNet, text encoder, VAE)
        if self.base.objective not in OBJECTIVES:  # a folder's scheduler may say "sample" (x0)
            raise ValueError(
                "VideoFusion's generators predict eps or v; the image prior predicts "
                f"{self.base.objective!r} ({self.base.schedule}): use an epsilon- or v-prediction Stable Diffusion "
                "folder, or set method.image_prior.scheduler=config with method.image_prior.diffusion.objective=eps")
        self.objective = self.base.objective  # z_r's output follows z_b's (a v folder makes both v)
        if cfg.base_init == "image_prior":
            self.image_prior = ImagePrior(cfg.image_prior, data)
        else:
            self.image_prior = None
            self.stages = ("video",)
            self.shared_stages = {}
        c = self.base.image_shape[0]  # pixels' channels, or a VAE's latent channels
        backbone = UNet(c, c, cfg.residual.unet, temporal=cfg.residual.temporal)
        self.residual = CondDenoiser(backbone, backbone.emb_dim, cfg.residual.conditioning, data.num_classes,
                                     cfg.residual.text)  # z_r
        self.frame_embed = nn.Embedding(data.frames, backbone.emb_dim)  # the frame index i
        lam = torch.full((data.frames,), cfg.lam)
        lam[self.key] = 1.0
        self.register_buffer("lam", lam, persistent=False)

    @property
    def alpha_bar(self) -> Tensor:
        return self.base.alpha_bar

    # --- stages ---------------------------------------------------------------------------------

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        self.check_stage(stage)
        if stage == "image_prior":
            return self.image_prior.trainable_parameters()
        return [p for g in self.stage_param_groups(stage) for p in g["params"]]

    def stage_param_groups(self, stage: str) -> list[dict]:
        """Optimiser groups with a relative learning rate (`lr_scale`): z_b fine-tunes slowly."""
        if stage != "video":
            return super().stage_param_groups(stage)
        residual = [*trainable(self.residual), *trainable(self.frame_embed)]  # a CLIP text encoder stays frozen
        return [{"params": residual, "lr_scale": 1.0},
                {"params": self.base.trainable_parameters(), "lr_scale": self.cfg.base_lr_scale}]

    def shared_stage_config(self, stage: str) -> dict:
        """The image prior's cache key, identical to CMD's for the same prior config: one prior, many methods."""
        return image_prior_cache_key("VideoFusion", stage, self.cfg.image_prior, self.data)

    def on_stage_start(self, stage: str) -> None:
        if stage == "video" and self.image_prior is not None:
            self.base.load_state_dict(self.image_prior.state_dict())

    # --- the space the decomposition runs in (pixels, or per-frame VAE latents) ------------------------

    def to_space(self, video: Tensor) -> Tensor:
        """Pixels (B, C, T, H, W) -> x0 of the video diffusion (per-frame VAE latents with a Stable Diffusion prior)."""
        if self.base.vae is None:
            return video
        frames = self.base.encode(rearrange(video, "b c t h w -> (b t) c h w"))
        return rearrange(frames, "(b t) c h w -> b c t h w", t=video.shape[2])

    def from_space(self, x0: Tensor) -> Tensor:
        """x0 of the video diffusion -> pixels (B, C, T, H, W) in [-1, 1]."""
        if self.base.vae is None:
            return x0.clamp(-1, 1)
        frames = self.base.decode(rearrange(x0, "b c t h w -> (b t) c h w"))
        return rearrange(frames, "(b t) c h w -> b c t h w", t=x0.shape[2])

    # --- the decomposed noise -----------------------------------------------------------------------

    def _lam(self, like: Tensor) -> Tensor:
        return self.lam.to(like.dtype).view(1, 1, -1, 1, 1)  # (1, 1, T, 1, 1)

    def noise(self, like: Tensor, generator: torch.Generator | None = None, base: Tensor | None = None) -> Tensor:
        """eps_i = sqrt(lam_i) b + sqrt(1 - lam_i) r_i for a batch shaped like `like` (B, C, T, H, W) (eq. 5);
        `base`: b given, (C, H, W) for every video of the batch or (B, C, H, W) per video (else drawn per video)."""
        B, C, _, H, W = like.shape
        if base is not None:
            if tuple(base.shape) not in ((C, H, W), (B, C, H, W)):
                raise ValueError(f"the base noise must be (C, H, W) = {(C, H, W)} or (B, C, H, W) = {(B, C, H, W)}, "
                                 f"got {tuple(base.shape)}")
            b = base.to(like).expand(B, C, H, W)[:, :, None]
        else:
            b = torch.randn((B, C, 1, H, W), generator=generator, device=like.device, dtype=like.dtype)
        r = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        lam = self._lam(like)
        return lam.sqrt() * b + (1 - lam).sqrt() * r

    def _residual(self, x_res: Tensor, t: Tensor, cond: Conditioning | None, drop: Tensor | None) -> Tensor:
        """z_r(x'_t^i, t, i): the residual generator with the frame index added to each frame's embedding."""
        B, T = x_res.shape[0], x_res.shape[2]
        emb = self.residual.embed(B, cond, drop, x_res.device)  # (B, E) or None
        frames = repeat(self.frame_embed.weight[:T], "t e -> (b t) e", b=B)  # (B*T, E)
        emb = frames if emb is None else frames + repeat(emb, "b e -> (b t) e", t=T)
        if self.cfg.residual.temporal:
            return self.residual.backbone(x_res, t, emb)
        out = self.residual.backbone(rearrange(x_res, "b c t h w -> (b t) c h w"), t.repeat_interleave(T), emb)
        return rearrange(out, "(b t) c h w -> b c t h w", t=T)

    def _remove_base(self, x_t: Tensor, t: Tensor, eps_base: Tensor) -> Tensor:
        """x'_t^i = x_t^i - sqrt(lam_i) sqrt(1 - alpha_bar_t) z_b(x_t^k, t) (eq. 9)."""
        a = D.append_dims(self.alpha_bar.to(x_t.device)[t], x_t.ndim).to(x_t.dtype)
        return x_t - self._lam(x_t).sqrt() * (1 - a).sqrt() * eps_base[:, :, None]

    def _residual_scales(self, t: Tensor, lam: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """sqrt(a), s_i = sqrt(1 - lam_i) sqrt(1 - a) and n_i = sqrt(a + s_i^2) for frames with shares `lam`
        (1, 1, T', 1, 1), each broadcast to (B, 1, T', 1, 1)."""
        a = D.append_dims(self.alpha_bar.to(like.device)[t], like.ndim).to(like.dtype)
        s = (1 - lam).sqrt() * (1 - a).sqrt()
        return a.sqrt(), s, (a + s * s).sqrt()

    def residual_target(self, x0: Tensor, r: Tensor, t: Tensor, lam: Tensor) -> Tensor:
        """What z_r regresses for frames x0 (B, C, T', H, W) with residual noise r and shares lam < 1 (1, 1, T', 1, 1):
        r itself (eps), or w_i of the base-removed frame (v; see the module docstring)."""
        if self.objective == "eps":
            return r
        alpha, s, n = self._residual_scales(t, lam, x0)
        return (alpha * r - s * x0) / n

    def residual_noise(self, out: Tensor, x_res: Tensor, t: Tensor, lam: Tensor) -> Tensor:
        """z_r's output -> r_hat for base-removed frames x_res (B, C, T', H, W) with shares lam (1, 1, T', 1, 1)
        (the key frame's r_hat, if included, has weight sqrt(1 - lam_k) = 0 in eq. 10)."""
        if self.objective == "eps":
            return out
        alpha, s, n = self._residual_scales(t, lam, x_res)
        return alpha * out / n + s * x_res / (n * n)

    # --- training -------------------------------------------------------------------------------

    def loss(self, stage: str, batch: VideoBatch) -> dict[str, Tensor]:
        self.check_stage(stage)
        video = batch.video  # (B, C, T, H, W)
        cond = Conditioning.from_batch(batch)
        if stage == "image_prior":
            k = self.cfg.image_prior.frames_per_video
            frames = self.image_prior.encode(random_frames(video, k))  # pixels, or VAE latents
            return {"loss": self.image_prior.loss(frames, repeat_conditioning(cond, k))}
        video = self.to_space(video)  # (B, C, T, H, W) pixels, or per-frame VAE latents
        B = video.shape[0]
        t = D.sample_timesteps(B, len(self.alpha_bar), video.device)
        eps = self.noise(video)  # (B, C, T, H, W)
        x_t = D.q_sample(video, t, self.alpha_bar, eps)
        drop = self.base.denoiser.random_drop(B, self.cfg.image_prior.diffusion.cond_drop_prob, video.device)
        # 1. base generator on the key frame predicts b = eps_k (its only loss; as v: v_k)
        k, x_key = self.key, x_t[:, :, self.key]
        out_base = self.base.denoiser(x_key, t, cond, drop)  # (B, C, H, W)
        target = D.training_target(video[:, :, k], t, eps[:, :, k], self.alpha_bar, self.objective)
        loss_base = (out_base.float() - target.float()).pow(2).mean()
        # 2. residual generator on the base-removed frames, with z_b behind a stop-gradient (eq. 11)
        sg = D.to_eps(out_base.detach(), x_key, t, self.alpha_bar, self.objective)  # b_hat
        out = self._residual(self._remove_base(x_t, t, sg), t, cond, drop)
        others = torch.ones(video.shape[2], dtype=torch.bool, device=video.device)
        others[k] = False
        lam = self._lam(x_t)[:, :, others]  # (1, 1, T - 1, 1, 1), all < 1
        if self.objective == "eps":  # eq. 10 against eps, as the paper writes it
            pred = lam.sqrt() * sg[:, :, None] + (1 - lam).sqrt() * out[:, :, others]
            target = eps[:, :, others]
        else:  # z_r's v target of the residual r*_i that makes eq. 10 exact given b_hat (module docstring)
            r_star = (eps[:, :, others] - lam.sqrt() * sg[:, :, None]) / (1 - lam).sqrt()
            pred, target = out[:, :, others], self.residual_target(video[:, :, others], r_star, t, lam)
        loss_res = (pred.float() - target.float()).pow(2).mean()
        # the parts stay attached to the graph (the trainer detaches what it logs): tests check the stop-gradient
        return {"loss": loss_base + loss_res, "loss_base": loss_base, "loss_residual": loss_res}

    # --- sampling -------------------------------------------------------------------------------

    def eps_model(self, cond: Conditioning, guidance: float) -> D.Model:
        """model(x_t, t) -> eps_hat for every frame (eq. 10), classifier-free guided (scale s) in both generators."""
        base = self.base.denoiser.guided(cond, guidance)
        null = torch.ones(len(cond), dtype=torch.bool, device=self.lam.device) if len(cond) else None

        def model(x_t: Tensor, t: Tensor) -> Tensor:
            x_key = x_t[:, :, self.key]
            eps_base = D.to_eps(base(x_key, t), x_key, t, self.alpha_bar, self.objective)  # b_hat (B, C, H, W)
            x_res = self._remove_base(x_t, t, eps_base)
            out = self._residual(x_res, t, cond, None)
            if guidance != D.NO_GUIDANCE and null is not None:  # guided output; v -> r is affine: the same either way
                out = D.cfg_combine(out, self._residual(x_res, t, cond, null), guidance)
            lam = self._lam(x_t)
            return lam.sqrt() * eps_base[:, :, None] + (1 - lam).sqrt() * self.residual_noise(out, x_res, t, lam)

        return model

    @torch.no_grad()
    def sample(self, n: int, cond: Conditioning, *, steps: int, guidance: float,
               generator: torch.Generator | None = None, eta: float = 0.0, shared_base: Tensor | None = None) -> Tensor:
        """n videos; `shared_base` (C, H, W): the start noise's base b, the same for every sample (their
        residuals r_i drawn independently): the paper's "same content, different motion" (benchmarks.probe_methods
        videofusion-base); (n, C, H, W): one base per video. The step noise of a stochastic sampler (eta > 0)
        stays independent."""
        C, H, W = self.base.image_shape
        like = torch.empty((n, C, self.data.frames, H, W), device=self.lam.device)
        x_T = self.noise(like, generator, base=shared_base)  # the start noise has the decomposed structure too
        clip = self.cfg.clip_x0 if self.cfg.clip_x0 > 0 and self.base.vae is None else None  # pixels only
        x0 = run_sampler(self.cfg.image_prior.diffusion.sampler, self.eps_model(cond, guidance), x_T, self.alpha_bar,
                         steps, eta, generator, noise_fn=self.noise, clip_x0=clip)
        return self.from_space(x0).float() if self.base.vae is not None else x0.clamp(-1, 1)
