"""CMD: content-frame / motion-latent decomposition (Yu et al., ICLR 2024, arXiv 2403.14148).

Notation (paper section 3; shapes per video):
    x        (C, T, H, W) the clip (pixels, or per-frame VAE latents in latent mode)
    w        (C, T, H, W) softmax-over-time weights, per pixel and channel        eq. 3
    content  (C, H, W)    the content frame  sum_l w_l * x_l                       eq. 3
    z        (D, T, W'+H') the motion latent: height-averaged then width-averaged  eq. 4
             encoder features, 1x1 conv to D channels, tanh (H' = H / patch)
    x_hat    the decoder's reconstruction from (content, z)                      eq. 5-6
Stages: [image_prior ->] autoencoder -> content -> motion. The content model is a 2D
diffusion model over content frames with the image prior's architecture (initialised from
it when content.init = image_prior), or (content.arch = dit) a class-conditional DiT over the
content frame trained from scratch, as the official code does for UCF-101 (DiT-L/2); the
motion model is a DiT over z that sees the content frame as a second, concatenated token set.
Sampling is Algorithm 1: content frame by DDIM with CFG, then z by DDIM conditioned on it with
CFG, then decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import Tensor, nn

from methods import diffusion as D
from methods.ae_loss import AELossConfig, AutoencoderLoss
from methods.base import Conditioning, DataSpec, VideoBatch, VideoGenerator
from methods.image_prior import ImagePrior, ImagePriorConfig, image_prior_cache_key, random_frames, repeat_conditioning
from methods.nets.embed import ConditionEmbedder, TextEncoderConfig, TimestepEmbedder, trainable
from methods.nets.transformer import DiT, DiTConfig, DiTFinalLayer, SpaceTimeTransformer, sincos_2d
from methods.vdm import DiffusionConfig, diffusion_schedule, run_sampler

ALL_STAGES = ("image_prior", "autoencoder", "content", "motion")


@dataclass
class AutoencoderConfig:
    width: int = 384  # C', the token width
    depth: int = 8  # encoder blocks (8 in the official code, 12 in the paper)
    decoder_depth: int | None = None  # None: same as depth
    heads: int = 6
    mlp_ratio: float = 4.0
    patch: int = 2  # H' = H / patch, W' = W / patch
    motion_dim: int = 8  # D, channels of z (16 in the paper's ablation)
    content: str = "weighted"  # weighted: softmax over time (eq. 3) | mean: plain average (ablation)
    loss: AELossConfig = field(default_factory=AELossConfig)  # L1 (pixels) / MSE (latents); + LPIPS (the paper's pixel mode)


@dataclass
class ContentConfig:
    init: str = "image_prior"  # image_prior: start from the trained/cached image prior | scratch
    # prior: the image prior's network (lean UNet, or a diffusers folder's UNet) | dit: a DiT over the content frame
    # (patch embedding, adaLN-Zero with timestep + class/text, needs init=scratch; the official UCF-101 content model
    # is DiT-L/2 from scratch). Its schedule is method.image_prior.diffusion; in latent mode it uses the folder's VAE.
    arch: str = "prior"
    dit: DiTConfig = field(default_factory=DiTConfig)  # content.arch=dit: the trunk (DiT-L: 1024 wide, 24 deep, 16 heads)
    patch: int = 2  # content.arch=dit: the content frame is cut into patch x patch tokens (DiT-L/2: 2)
    latent_repeats: int | None = None  # noise draws per encoded clip in the content stage; None: method.latent_repeats


@dataclass
class MotionConfig:
    dit: DiTConfig = field(default_factory=DiTConfig)
    patch: int = 2  # z is patchified patch x patch over (T, W'+H')
    content_patch: int = 4  # patch size of the content frame's token set (ablation 16 / 8 / 4)
    conditioning: str = "class"  # none | class | text | class+text (through adaLN-Zero with the timestep)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)


@dataclass
class CMDSamplingConfig:
    content_steps: int | None = None  # DDIM steps for the content frame; None: the run's sample.steps (paper 50)
    motion_steps: int | None = None  # DDIM steps for z; None: 2 x the run's sample.steps (paper 100)
    content_guidance: float | None = None  # CFG scale s (1: none); None: the run's sample.guidance
    motion_guidance: float | None = None  # CFG scale s (1: none); None: the run's sample.guidance


@dataclass
class CMDConfig:
    name: str = "cmd"
    space: str = "pixel"  # pixel | latent: frames encoded by the image prior's VAE (image_prior.diffusers_path/vae)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    image_prior: ImagePriorConfig = field(default_factory=ImagePriorConfig)  # also the content model's architecture
    content: ContentConfig = field(default_factory=ContentConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    sampling: CMDSamplingConfig = field(default_factory=CMDSamplingConfig)
    # content / motion stages: diffusion noise draws per encoded clip, amortising the frozen encoder and the
    # data pipeline (the effective diffusion batch is batch_size x latent_repeats)
    latent_repeats: int = 1


# --- autoencoder -------------------------------------------------------------------------------


class ContentMotionAutoencoder(nn.Module):
    """Video x (B, C, T, H, W) <-> (content (B, C, H, W), z (B, D, T, W'+H'))."""

    def __init__(self, cfg: AutoencoderConfig, channels: int, pixel_output: bool) -> None:
        super().__init__()
        if cfg.content not in ("weighted", "mean"):
            raise ValueError(f"autoencoder.content must be 'weighted' or 'mean', got {cfg.content!r}")
        self.cfg = cfg
        w, p, d = cfg.width, cfg.patch, cfg.motion_dim
        self.pixel_output = pixel_output
        # encoder
        self.patch_embed = nn.Conv2d(channels, w, p, stride=p)
        self.encoder = SpaceTimeTransformer(w, cfg.depth, cfg.heads, cfg.mlp_ratio)
        self.content_logits = nn.ConvTranspose2d(w, channels, p, stride=p)  # eq. 3: back to C x H x W per frame
        # zero logits: the content frame starts as the mean frame and sharpens as training needs (random logits
        # start from a per-pixel dither of frames, which the content diffusion model then has to reproduce)
        nn.init.zeros_(self.content_logits.weight)
        nn.init.zeros_(self.content_logits.bias)
        self.to_motion_w = nn.Conv2d(w, d, 1)  # height-averaged features -> (D, T, W')
        self.to_motion_h = nn.Conv2d(w, d, 1)  # width-averaged features  -> (D, T, H')
        # decoder
        self.content_embed = nn.Conv2d(channels, w, p, stride=p)
        self.from_motion_w = nn.Conv2d(d, w, 1)
        self.from_motion_h = nn.Conv2d(d, w, 1)
        self.decoder = SpaceTimeTransformer(w, cfg.decoder_depth or cfg.depth, cfg.heads, cfg.mlp_ratio)
        self.unpatch = nn.ConvTranspose2d(w, channels, p, stride=p)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        p = self.cfg.patch
        if height % p or width % p:
            raise ValueError(f"frame size {height}x{width} is not divisible by autoencoder.patch={p}")
        return height // p, width // p

    def content_weights(self, feats: Tensor, x: Tensor) -> Tensor:
        """Softmax-over-time weights w (B, C, T, H, W) from encoder features (B, T, h, w, C')."""
        if self.cfg.content == "mean":
            return torch.full_like(x, 1.0 / x.shape[2])
        T = x.shape[2]
        logits = self.content_logits(rearrange(feats, "b t h w c -> (b t) c h w"))  # (B*T, C, H, W)
        logits = rearrange(logits, "(b t) c h w -> b c t h w", t=T)
        return logits.float().softmax(dim=2).to(x.dtype)  # per pixel and channel, over time

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, C, T, H, W) -> content (B, C, H, W), z (B, D, T, W'+H'), weights (B, C, T, H, W)."""
        B, C, T, H, W = x.shape
        h, w = self.grid(H, W)
        tokens = self.patch_embed(rearrange(x, "b c t h w -> (b t) c h w"))  # (B*T, C', h, w)
        tokens = rearrange(tokens, "(b t) c h w -> b t (h w) c", t=T)
        feats = rearrange(self.encoder(tokens, (h, w)), "b t (h w) c -> b t h w c", h=h)  # (B, T, h, w, C')
        weights = self.content_weights(feats, x)
        content = (weights * x).sum(dim=2)  # eq. 3                                        (B, C, H, W)
        f = rearrange(feats, "b t h w c -> b c t h w")
        z_w = torch.tanh(self.to_motion_w(f.mean(dim=3)))  # eq. 4, averaged over height   (B, D, T, w)
        z_h = torch.tanh(self.to_motion_h(f.mean(dim=4)))  # eq. 4, averaged over width    (B, D, T, h)
        return content, torch.cat([z_w, z_h], dim=-1), weights

    def decode(self, content: Tensor, z: Tensor) -> Tensor:
        """content (B, C, H, W), z (B, D, T, W'+H') -> x_hat (B, C, T, H, W)."""
        h, w = self.grid(*content.shape[-2:])
        T = z.shape[2]
        c = self.content_embed(content)  # eq. 5, content patches embedded                 (B, C', h, w)
        m_w = self.from_motion_w(z[..., :w])  # (B, C', T, w), broadcast over height
        m_h = self.from_motion_h(z[..., w:])  # (B, C', T, h), broadcast over width
        tokens = c[:, :, None] + m_w[:, :, :, None, :] + m_h[:, :, :, :, None]  # eq. 6, summed (B, C', T, h, w)
        tokens = self.decoder(rearrange(tokens, "b c t h w -> b t (h w) c"), (h, w))
        out = self.unpatch(rearrange(tokens, "b t (h w) c -> (b t) c h w", h=h))  # (B*T, C, H, W)
        out = rearrange(out, "(b t) c h w -> b c t h w", t=T)
        return 2 * torch.sigmoid(out) - 1 if self.pixel_output else out

    def forward(self, x: Tensor) -> Tensor:
        content, z, _ = self.encode(x)
        return self.decode(content, z)


# --- content diffusion (content.arch = dit) -----------------------------------------------------


class ContentDiT(nn.Module):
    """A DiT over an image (B, C, H, W) behind the `(x, t, emb)` backbone call (Peebles & Xie 2023).

    The frame is patch-embedded (patch x patch), given 2D sin-cos positions for its grid, run through the
    shared `DiT` trunk with c = timestep + class/text embedding in adaLN-Zero, and unpatchified by the
    zero-initialised `DiTFinalLayer`: the untrained model predicts 0. (The official content DiT also
    learns the variance; here it predicts the configured objective only, like every model in the framework.)
    """

    def __init__(self, channels: int, cfg: DiTConfig, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Conv2d(channels, cfg.width, patch, stride=patch)
        self.time = TimestepEmbedder(cfg.width)
        self.dit = DiT(cfg)
        self.final = DiTFinalLayer(cfg.width, patch * patch * channels)
        self.emb_dim = cfg.width

    def forward(self, x: Tensor, t: Tensor, emb: Tensor | None = None) -> Tensor:
        """x (B, C, H, W), t (B,), emb (B, width) -> (B, C, H, W)."""
        p = self.patch
        H, W = x.shape[-2:]
        if H % p or W % p:
            raise ValueError(f"content frame {(H, W)} is not divisible by method.content.patch={p}")
        h = rearrange(self.embed(x), "b d h w -> b (h w) d")  # (B, L, width)
        h = h + sincos_2d(H // p, W // p, h.shape[-1], h.device).to(h.dtype)
        c = self.time(t)
        if emb is not None:
            c = c + emb
        out = self.final(self.dit(h, c), c)  # (B, L, p*p*C)
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=H // p, p=p, q=p)


# --- motion diffusion --------------------------------------------------------------------------


class MotionDiT(nn.Module):
    """eps_theta(z_t, t, content, c): a DiT over patchified z with the content frame as a second token set.

    The two token sets get their own 2D sin-cos positions on their own grids ((T, W'+H') / patch and
    (H, W) / content_patch) plus a learned set embedding, and are concatenated into one sequence;
    the timestep plus class/text embedding drives adaLN-Zero; only the z tokens are read out.
    """

    def __init__(self, cfg: MotionConfig, motion_dim: int, content_channels: int) -> None:
        super().__init__()
        self.cfg = cfg
        wd, p, pc = cfg.dit.width, cfg.patch, cfg.content_patch
        self.z_embed = nn.Conv2d(motion_dim, wd, p, stride=p)
        self.content_embed = nn.Conv2d(content_channels, wd, pc, stride=pc)
        self.set_embed = nn.Parameter(torch.zeros(2, wd))  # 0: motion tokens, 1: content tokens
        nn.init.normal_(self.set_embed, std=0.02)
        self.time = TimestepEmbedder(wd)
        self.dit = DiT(cfg.dit)
        self.final = DiTFinalLayer(wd, p * p * motion_dim)
        self.emb_dim = wd

    def forward(self, z_t: Tensor, t: Tensor, content: Tensor, emb: Tensor | None = None) -> Tensor:
        """z_t (B, D, T, S), t (B,), content (B, C, H, W), emb (B, width) -> eps (B, D, T, S)."""
        p, pc = self.cfg.patch, self.cfg.content_patch
        T, S = z_t.shape[-2:]
        H, W = content.shape[-2:]
        if T % p or S % p or H % pc or W % pc:
            raise ValueError(f"z grid {(T, S)} must be divisible by motion.patch={p} and the content frame "
                             f"{(H, W)} by motion.content_patch={pc}")
        x = rearrange(self.z_embed(z_t), "b d t s -> b (t s) d")  # (B, Lz, width)
        x = x + (sincos_2d(T // p, S // p, x.shape[-1], x.device) + self.set_embed[0]).to(x.dtype)
        y = rearrange(self.content_embed(content.to(x.dtype)), "b d h w -> b (h w) d")  # (B, Lc, width)
        y = y + (sincos_2d(H // pc, W // pc, y.shape[-1], y.device) + self.set_embed[1]).to(y.dtype)
        c = self.time(t)  # (B, width)
        if emb is not None:
            c = c + emb
        h = self.dit(torch.cat([x, y], dim=1), c)[:, : x.shape[1]]  # dense condition, z tokens read out
        out = self.final(h, c)  # (B, Lz, p*p*D)
        return rearrange(out, "b (t s) (p q d) -> b d (t p) (s q)", t=T // p, p=p, q=p)


class MotionDenoiser(nn.Module):
    """MotionDiT + class/text embedder, with CFG over the class/text (the content frame is always given)."""

    def __init__(self, cfg: MotionConfig, motion_dim: int, content_channels: int, num_classes: int) -> None:
        super().__init__()
        if cfg.conditioning not in ("none", "class", "text", "class+text"):
            raise ValueError(f"motion.conditioning must be none|class|text|class+text, got {cfg.conditioning!r}")
        if "class" in cfg.conditioning and num_classes <= 0:
            raise ValueError("motion.conditioning on class needs a labelled dataset (num_classes > 0)")
        self.net = MotionDiT(cfg, motion_dim, content_channels)
        self.embedder = ConditionEmbedder(self.net.emb_dim, num_classes if "class" in cfg.conditioning else 0,
                                          cfg.text if "text" in cfg.conditioning else None)

    def forward(self, z_t: Tensor, t: Tensor, content: Tensor, cond: Conditioning | None = None,
                drop: Tensor | None = None) -> Tensor:
        cond = cond or Conditioning()
        emb = self.embedder(z_t.shape[0], label=cond.label, text=cond.text, drop=drop, device=z_t.device)
        return self.net(z_t, t, content, emb)

    def random_drop(self, n: int, p: float, device: torch.device) -> Tensor | None:
        """(n,) bool: rows trained with the null condition (CFG training)."""
        if not self.embedder.enabled or p <= 0:
            return None
        return torch.rand(n, device=device) < p

    def guided(self, cond: Conditioning | None, content: Tensor, guidance: float) -> D.Model:
        """model(z_t, t) -> eps with CFG scale s: eps(null, content) + s (eps(c, content) - eps(null, content)).

        One doubled batch; s = 1 (or an unconditional model) runs the conditional branch alone.
        """
        if guidance == D.NO_GUIDANCE or not self.embedder.enabled:
            return lambda z_t, t: self(z_t, t, content, cond)

        def model(z_t: Tensor, t: Tensor) -> Tensor:
            n = z_t.shape[0]
            both = torch.ones(2 * n, dtype=torch.bool, device=z_t.device)
            both[:n] = False  # first half conditional, second half null
            cond2 = Conditioning(label=None if cond is None or cond.label is None else cond.label.repeat(2),
                                 text=None if cond is None or cond.text is None else cond.text * 2)
            out = self(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([content, content]), cond2, both)
            eps_c, eps_u = out.chunk(2)
            return D.cfg_combine(eps_c, eps_u, guidance)

        return model


# --- the method --------------------------------------------------------------------------------


class CMD(VideoGenerator):
    """Content-frame motion-latent diffusion: stages [image_prior,] autoencoder, content, motion."""

    Config = CMDConfig
    stages = ALL_STAGES  # every stage CMD may have; an instance drops image_prior when content.init=scratch
    shared_stages: dict[str, str] = {"image_prior": "image_prior"}

    def __init__(self, cfg: CMDConfig, data: DataSpec) -> None:
        super().__init__(data)
        self.cfg = cfg
        if cfg.content.init not in ("image_prior", "scratch"):
            raise ValueError(f"content.init must be 'image_prior' or 'scratch', got {cfg.content.init!r}")
        if cfg.space not in ("pixel", "latent"):
            raise ValueError(f"method.space must be 'pixel' or 'latent', got {cfg.space!r}")
        if cfg.content.arch not in ("prior", "dit"):
            raise ValueError(f"method.content.arch must be 'prior' or 'dit', got {cfg.content.arch!r}")
        repeats = {"method.latent_repeats": cfg.latent_repeats, "method.content.latent_repeats": cfg.content.latent_repeats}
        for key, r in repeats.items():
            if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
                raise ValueError(f"{key} must be a whole number >= 1 (noise draws per encoded clip), got {r!r}")
        if cfg.content.arch == "dit" and cfg.content.init != "scratch":
            raise ValueError("method.content.arch=dit trains the content DiT from scratch (the image prior is a UNet): "
                             "set method.content.init=scratch")
        dit = (lambda shape: ContentDiT(shape[0], cfg.content.dit, cfg.content.patch)) if cfg.content.arch == "dit" else None
        # content-frame diffusion: the prior's architecture (and later its weights), or a DiT
        self.content = ImagePrior(cfg.image_prior, data, backbone=dit)
        if (cfg.space == "latent") != (self.content.vae is not None):
            raise ValueError("method.space=latent needs an image prior with a VAE (method.image_prior.diffusers_path "
                             "holding vae/), and a prior with a VAE needs method.space=latent")
        if cfg.content.init == "image_prior":
            self.image_prior = ImagePrior(cfg.image_prior, data)
            self.stages = ALL_STAGES
        else:
            self.image_prior = None
            self.stages = tuple(s for s in ALL_STAGES if s != "image_prior")
            self.shared_stages = {}
        channels = self.content.image_shape[0]  # C of the space the autoencoder works in
        self.autoencoder = ContentMotionAutoencoder(cfg.autoencoder, channels, pixel_output=cfg.space == "pixel")
        self.autoencoder_loss = AutoencoderLoss(cfg.autoencoder.loss, channels,
                                                (data.frames, *self.content.image_shape[1:]), space=cfg.space)
        self.motion = MotionDenoiser(cfg.motion, cfg.autoencoder.motion_dim, channels, data.num_classes)
        self.register_buffer("motion_alpha_bar", diffusion_schedule(cfg.motion.diffusion), persistent=False)

    # --- stages --------------------------------------------------------------------------------

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        self.check_stage(stage)
        if stage == "image_prior":
            return self.image_prior.trainable_parameters()
        if stage == "content":
            return self.content.trainable_parameters()
        if stage == "autoencoder":  # with the PatchGAN's discriminators when the loss has them
            return trainable(self.autoencoder) + self.autoencoder_loss.trainable_parameters()
        return trainable(self.motion)  # a CLIP text encoder stays frozen

    def stage_requires(self, stage: str) -> tuple[str, ...]:
        """The prior and the autoencoder are independent; content needs both (the prior's weights start it, the
        autoencoder makes its content frames), motion the autoencoder (its latents and content frames)."""
        self.check_stage(stage)
        return {"image_prior": (), "autoencoder": (), "motion": ("autoencoder",),
                "content": ("autoencoder",) + (("image_prior",) if self.image_prior is not None else ())}[stage]

    def stage_modules(self, stage: str) -> tuple[str, ...]:
        """The autoencoder stage owns its loss module too (the PatchGAN's step counter and discriminators)."""
        return super().stage_modules(stage) + (("autoencoder_loss",) if stage == "autoencoder" else ())

    def stage_param_groups(self, stage: str) -> list[dict]:
        """Optimiser groups: the PatchGAN's discriminators are a player of their own in the autoencoder stage."""
        if stage == "autoencoder":
            return self.autoencoder_loss.param_groups(trainable(self.autoencoder))
        return super().stage_param_groups(stage)

    def shared_stage_config(self, stage: str) -> dict:
        """What determines a shared stage's weights besides data and training settings (its cache key)."""
        return image_prior_cache_key("CMD", stage, self.cfg.image_prior, self.data)

    def on_stage_start(self, stage: str) -> None:
        """Before the content stage, copy the trained image prior into the content model (content.init)."""
        if stage == "content" and self.image_prior is not None:
            self.content.load_state_dict(self.image_prior.state_dict())

    # --- the space the autoencoder works in -------------------------------------------------------

    def to_space(self, video: Tensor) -> Tensor:
        """Pixels (B, C, T, H, W) -> the autoencoder's input (per-frame VAE latents in latent mode)."""
        if self.cfg.space == "pixel":
            return video
        frames = self.content.encode(rearrange(video, "b c t h w -> (b t) c h w"))
        return rearrange(frames, "(b t) c h w -> b c t h w", t=video.shape[2])

    def from_space(self, x: Tensor) -> Tensor:
        """The autoencoder's output -> pixels (B, C, T, H, W) in [-1, 1]."""
        if self.cfg.space == "pixel":
            return x.clamp(-1, 1)
        frames = self.content.decode(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(frames, "(b t) c h w -> b c t h w", t=x.shape[2])

    @torch.no_grad()
    def encode(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """Pixels (B, C, T, H, W) -> (content (B, C', H', W') in the content model's space, z (B, D, T, W'+H'))."""
        content, z, _ = self.autoencoder.encode(self.to_space(video))
        return content, z

    # --- losses --------------------------------------------------------------------------------

    def loss(self, stage: str, batch: VideoBatch) -> dict[str, Tensor]:
        self.check_stage(stage)
        video = batch.video  # (B, C, T, H, W)
        cond = Conditioning.from_batch(batch)
        if stage == "image_prior":
            k = self.cfg.image_prior.frames_per_video
            frames = self.image_prior.encode(random_frames(video, k))  # (B*k, C', H', W')
            return {"loss": self.image_prior.loss(frames, repeat_conditioning(cond, k))}
        if stage == "autoencoder":
            x = self.to_space(video)  # L1 (pixels) or MSE (latents), + LPIPS / PatchGAN when configured
            return self.autoencoder_loss(x, self.autoencoder(x), self.autoencoder.unpatch.weight)
        content, z = self.frozen_encode(self.encode, video, self.autoencoder)  # the frozen autoencoder on real clips
        r = self.cfg.latent_repeats
        if stage == "content" and self.cfg.content.latent_repeats is not None:
            r = self.cfg.content.latent_repeats
        if r > 1:
            content, z, cond = content.repeat_interleave(r, 0), z.repeat_interleave(r, 0), repeat_conditioning(cond, r)
        if stage == "content":
            return {"loss": self.content.loss(content, cond)}
        return {"loss": self.motion_loss(z, content, cond)}

    def motion_loss(self, z: Tensor, content: Tensor, cond: Conditioning) -> Tensor:
        """Simple diffusion loss on z (B, D, T, W'+H') conditioned on the real content frame and c."""
        n = z.shape[0]
        t = D.sample_timesteps(n, len(self.motion_alpha_bar), z.device)
        drop = self.motion.random_drop(n, self.cfg.motion.diffusion.cond_drop_prob, z.device)
        per_sample = D.diffusion_loss(lambda z_t, tt: self.motion(z_t, tt, content, cond, drop), z, t,
                                      self.motion_alpha_bar, torch.randn_like(z), self.cfg.motion.diffusion.objective,
                                      self.cfg.motion.diffusion.min_snr_gamma)
        return per_sample.mean()

    # --- sampling (Algorithm 1) ------------------------------------------------------------------

    def motion_shape(self) -> tuple[int, int, int]:
        """(D, T, W'+H') of z for this method's data."""
        _, H, W = self.content.image_shape
        h, w = self.autoencoder.grid(H, W)
        return (self.cfg.autoencoder.motion_dim, self.data.frames, w + h)

    def sampling_settings(self, steps: int, guidance: float) -> tuple[int, int, float, float]:
        """(content steps, motion steps, content guidance, motion guidance) from the run's values and method.sampling."""
        s = self.cfg.sampling
        return (s.content_steps or steps, s.motion_steps or 2 * steps,
                guidance if s.content_guidance is None else s.content_guidance,
                guidance if s.motion_guidance is None else s.motion_guidance)

    @torch.no_grad()
    def sample_motion(self, cond: Conditioning, content: Tensor, *, steps: int, guidance: float,
                      generator: torch.Generator | None = None, eta: float = 0.0) -> Tensor:
        """z (n, D, T, W'+H') by the motion sampler, conditioned on content frames (n, C, H, W) and c, with CFG."""
        z_T = torch.randn((content.shape[0], *self.motion_shape()), generator=generator, device=self.device)
        model = D.as_eps_model(self.motion.guided(cond, content, guidance), self.motion_alpha_bar,
                               self.cfg.motion.diffusion.objective)
        return run_sampler(self.cfg.motion.diffusion.sampler, model, z_T, self.motion_alpha_bar, steps, eta,
                           generator).clamp(-1, 1)  # z lives in tanh's range

    @torch.no_grad()
    def sample(self, n: int, cond: Conditioning, *, steps: int, guidance: float,
               generator: torch.Generator | None = None, eta: float = 0.0) -> Tensor:
        """n videos (n, C, T, H, W) in [-1, 1].

        `steps` / `guidance` are the run's values; method.sampling's content_steps, motion_steps,
        content_guidance and motion_guidance override them per model (None: content uses `steps`,
        motion 2 x `steps`, as the paper's 50 / 100).
        """
        content_steps, motion_steps, w_content, w_motion = self.sampling_settings(steps, guidance)
        # 1. content frame by DDIM with CFG
        content = self.content.sample(n, cond, steps=content_steps, guidance=w_content, generator=generator, eta=eta)
        # 2. motion latent by DDIM conditioned on the generated content frame, with CFG
        z = self.sample_motion(cond, content, steps=motion_steps, guidance=w_motion, generator=generator, eta=eta)
        # 3. decode
        return self.from_space(self.autoencoder.decode(content, z)).float()

    def reconstruct(self, video: Tensor) -> Tensor:
        """video (B, C, T, H, W) -> its autoencoder reconstruction (for R-FVD)."""
        with torch.no_grad():
            return self.from_space(self.autoencoder(self.to_space(video))).float()
