"""D-VDM and ED-VDM (Shen et al., AAAI 2024, arXiv 2311.14294): first-frame-conditioned video diffusion
over a content/motion decomposition of the clip.

Notation (paper section 3; per video of T frames x_1 .. x_T, shapes per video):
    x_1      (C, H, W)             the given first frame (the condition, with the class / caption c)
    E        first-frame encoder, trained jointly with the denoiser: E(x_1) is concatenated
             channel-wise to the noisy target at every frame
    D-VDM    target d_i = x_i - x_1, i = 2..T: (C, T-1, H, W), scaled by `difference_scale` so it is
             about unit-variance; x_i = x_1 + d_i
    ED-VDM   the codec's transform (methods/codec.py): I-frame x_1, per P-frame motion vectors
             MV_i (2, H/b, W/b) and residuals R_i; a residual autoencoder maps each R_i to a latent
             l_i (c_z, H/b, W/b); the target is z = [MV / S, l]  (2 + c_z, T-1, H/b, W/b), one
             low-resolution tensor; decoding runs x^_i = warp(x^_{i-1}, round(S * MV_i)) + Dec(l_i)
             recursively from the given x^_1 = x_1. `codec.loop` says what R_i is taken against:
             closed (default): R_i = x_i - warp(x^_{i-1}, MV_i), the previous frame as decoded through
               the residual autoencoder (a real codec's encoder loop), so each decoded frame carries
               only its own coding error;
             open: R_i = x_i - warp(x_{i-1}, MV_i), the original previous frame, so the decoder
               accumulates the autoencoder's errors over the P-frames.
Both: eps_theta(z_t, t, [E(x_1)], c) is the factorised (2+1)D UNet of methods/nets/unet.py,
class/caption through the timestep embedding, classifier-free guidance on c as the VDM baseline
(the first frame is never dropped: it is the task's input, not a guidance signal).

What the paper confirms (abstract): motion vectors and residuals predicted by a 3D-UNet
diffusion model and warped onto the starting image. Everything below is our reading of
secondary notes, unverified, and a config option:
  - D-VDM's first-frame encoder: `first_frame_encoder` = conv (a small strided CNN, trained
    jointly) | identity (the raw frame / its space-to-depth rearrangement for ED-VDM).
  - difference_scale = 2.5: d_i has std 0.39 on shapes 32x32x16 (256 train clips), 0.31 at
    16x16x8; 1 / 0.39 ~ 2.5. Other data need their own value (std of x_i - x_1 over clips).
  - block size b, search range S, residual-autoencoder width and latent channels c_z: the
    paper's values are not known to us; defaults b = 4, S = 4 (covers the shapes motions at
    32x32), c_z = 4.
  - codec.loop = closed, codec.match = original: residuals against the decoded previous frame,
    motion vectors found between the original frames. In training the decoded previous frame is the
    codec round trip through the current (stage 1) or frozen (stage 2) residual autoencoder: one
    no-grad autoencoder pass over the clip, frame by frame. Measured on shapes 32x32x16
    (python -m benchmarks.probe_methods edvdm-loop): see configs/method/edvdm.yaml.
  - the residual autoencoder is a plain conv AE with tanh-bounded latents and an L1 loss,
    per frame, downsampling by b so its latents share the motion vectors' grid (the paper
    reportedly uses a latent-diffusion autoencoder; no KL term or GAN here).
  - motion vectors are integers: the model generates MV / S as a continuous channel pair,
    and decoding rounds S * MV to the nearest integer in [-S, S].
  - decoding clamps each reconstructed frame to [-1, 1] before it predicts the next, so
    errors in generated residuals cannot compound out of range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from methods import codec
from methods import diffusion as D
from methods.base import Conditioning, DataSpec, VideoBatch, VideoGenerator
from methods.nets.cond_denoiser import CondDenoiser
from methods.nets.embed import TextEncoderConfig
from methods.nets.unet import UNet, UNetConfig
from methods.vdm import DiffusionConfig, diffusion_schedule, run_sampler

MV_CHANNELS = 2  # (dy, dx)


@dataclass
class FirstFrameDiffusionConfig:
    """What D-VDM and ED-VDM share: the denoiser, its diffusion, its conditions."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    conditioning: str = "class"  # none | class | text | class+text (CFG as the VDM baseline)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    first_frame_encoder: str = "conv"  # conv: small CNN trained jointly | identity: the raw (space-to-depth) frame
    first_frame_width: int = 32  # channels of the conv encoder (its output width)


@dataclass
class DVDMConfig(FirstFrameDiffusionConfig):
    name: str = "dvdm"
    difference_scale: float = 2.5  # d_i = scale * (x_i - x_1): ~unit variance on shapes (std 0.39) [our choice]


CODEC_LOOPS = ("open", "closed")


@dataclass
class CodecConfig:
    block: int = 4  # b: motion vectors live at 1/b resolution (a power of 2) [paper value unverified]
    search: int = 4  # S: integer motion vectors in [-S, S]^2 [paper value unverified]
    loop: str = "closed"  # residuals against the decoded (closed) or the original (open) previous frame [unverified]
    match: str = "original"  # closed loop: motion vectors found against the original or the decoded previous frame


@dataclass
class ResidualAutoencoderConfig:
    width: int = 64  # conv channels
    latent_channels: int = 4  # c_z per 1/b-resolution cell [paper value unverified]


@dataclass
class EDVDMConfig(FirstFrameDiffusionConfig):
    name: str = "edvdm"
    codec: CodecConfig = field(default_factory=CodecConfig)
    residual_autoencoder: ResidualAutoencoderConfig = field(default_factory=ResidualAutoencoderConfig)


def _log2(factor: int, what: str) -> int:
    if factor < 1 or factor & (factor - 1):
        raise ValueError(f"{what} must be a power of 2, got {factor}")
    return factor.bit_length() - 1


class FirstFrameEncoder(nn.Module):
    """E(x_1): (B, C, H, W) -> (B, out_channels, H/f, W/f), at the generated tensor's resolution.

    conv: conv3x3, log2(f) stride-2 convs, conv3x3 (trained jointly with the denoiser);
    identity: the frame itself, space-to-depth rearranged when f > 1 (no parameters).
    """

    def __init__(self, kind: str, channels: int, width: int, factor: int) -> None:
        super().__init__()
        downs = _log2(factor, "the first-frame encoder's downsampling factor")
        self.factor = factor
        if kind == "identity":
            self.net = None
            self.out_channels = channels * factor**2
        elif kind == "conv":
            layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1)]
            for _ in range(downs):
                layers += [nn.SiLU(), nn.Conv2d(width, width, 4, stride=2, padding=1)]
            layers += [nn.SiLU(), nn.Conv2d(width, width, 3, padding=1)]
            self.net = nn.Sequential(*layers)
            self.out_channels = width
        else:
            raise ValueError(f"method.first_frame_encoder must be 'conv' or 'identity', got {kind!r}")

    def forward(self, first: Tensor) -> Tensor:
        if self.net is not None:
            return self.net(first)
        return rearrange(first, "b c (h p) (w q) -> b (c p q) h w", p=self.factor, q=self.factor)


class FirstFrameDiffusion(VideoGenerator):
    """Shared machinery: a (2+1)D UNet denoising a (C_z, T', H', W') target next to E(x_1), with CFG on c."""

    image_to_video = True
    long_video = True  # clip by clip, each clip starting from the previous clip's last frame (`sample_long`)

    def __init__(self, cfg: FirstFrameDiffusionConfig, data: DataSpec, target_shape: tuple[int, int, int, int],
                 factor: int) -> None:
        super().__init__(data)
        if data.frames < 2:
            raise ValueError("image-to-video needs clips of at least 2 frames (dataset.frames)")
        self.cfg = cfg
        self.target_shape = target_shape  # (C_z, T', H', W') of the diffused tensor
        self.encoder = FirstFrameEncoder(cfg.first_frame_encoder, data.channels, cfg.first_frame_width, factor)
        backbone = UNet(target_shape[0] + self.encoder.out_channels, target_shape[0], cfg.unet, temporal=True)
        self.denoiser = CondDenoiser(backbone, backbone.emb_dim, cfg.conditioning, data.num_classes, cfg.text)
        self.register_buffer("alpha_bar", diffusion_schedule(cfg.diffusion), persistent=False)

    def denoiser_parameters(self) -> list[nn.Parameter]:
        """The denoiser and the first-frame encoder: trained jointly."""
        return [p for m in (self.denoiser, self.encoder) for p in m.parameters() if p.requires_grad]

    @staticmethod
    def _with_first(z_t: Tensor, feats: Tensor) -> Tensor:
        """[z_t, E(x_1)] on channels, E(x_1) broadcast over time: (B, C_z + C_e, T', H', W')."""
        return torch.cat([z_t, repeat(feats, "b c h w -> b c t h w", t=z_t.shape[2]).to(z_t.dtype)], dim=1)

    def diffusion_loss(self, z0: Tensor, first: Tensor, cond: Conditioning) -> Tensor:
        """Simple loss (DDPM eq. 14) on the target z0 (B, C_z, T', H', W') given x_1 (B, C, H, W) and c."""
        n = z0.shape[0]
        feats = self.encoder(first)  # (B, C_e, H', W'), gradients reach E: trained jointly
        t = D.sample_timesteps(n, len(self.alpha_bar), z0.device)
        drop = self.denoiser.random_drop(n, self.cfg.diffusion.cond_drop_prob, z0.device)
        per_sample = D.diffusion_loss(lambda z_t, tt: self.denoiser(self._with_first(z_t, feats), tt, cond, drop),
                                      z0, t, self.alpha_bar, torch.randn_like(z0), self.cfg.diffusion.objective,
                                      self.cfg.diffusion.min_snr_gamma)
        return per_sample.mean()

    def first_frame(self, n: int, cond: Conditioning) -> Tensor:
        """Conditioning.first_frame (n, C, H, W), checked."""
        first = cond.first_frame
        expected = (n, self.data.channels, self.data.height, self.data.width)
        if first is None or tuple(first.shape) != expected:
            raise ValueError(f"{type(self).__name__} is image-to-video: sample() needs Conditioning.first_frame of "
                             f"shape {expected}, got {None if first is None else tuple(first.shape)}")
        return first.to(self.device)

    @torch.no_grad()
    def sample_long(self, n: int, cond: Conditioning, clips: int, *, steps: int, guidance: float,
                    generator: torch.Generator | None = None, eta: float = 0.0) -> Tensor:
        """n videos of clips * T frames (n, C, clips * T, H, W) in [-1, 1], clip by clip: the first clip starts from
        `cond.first_frame`, every further clip from the last frame generated so far (it repeats that frame and adds
        T - 1 new ones), as an image-to-video model extends a video; the label / caption stays the same."""
        if clips < 1:
            raise ValueError(f"clips must be >= 1, got {clips}")
        frames = clips * self.data.frames
        video = self.sample(n, cond, steps=steps, guidance=guidance, generator=generator, eta=eta)
        while video.shape[2] < frames:
            nxt = Conditioning(label=cond.label, text=cond.text, first_frame=video[:, :, -1])
            video = torch.cat([video, self.sample(n, nxt, steps=steps, guidance=guidance, generator=generator,
                                                  eta=eta)[:, :, 1:]], dim=2)
        return video[:, :, :frames]

    def generate(self, first: Tensor, cond: Conditioning, steps: int, guidance: float,
                 generator: torch.Generator | None, eta: float) -> Tensor:
        """The target z0 (n, C_z, T', H', W') by the configured sampler, next to E(x_1), with CFG on c."""
        feats = self.encoder(first)
        guided = self.denoiser.guided(cond, guidance)
        model = D.as_eps_model(lambda z_t, t: guided(self._with_first(z_t, feats), t), self.alpha_bar,
                               self.cfg.diffusion.objective)
        z_T = torch.randn((first.shape[0], *self.target_shape), generator=generator, device=self.device)
        return run_sampler(self.cfg.diffusion.sampler, model, z_T, self.alpha_bar, steps, eta, generator)


class DVDM(FirstFrameDiffusion):
    """D-VDM: diffusion over the differences to the first frame, d_i = x_i - x_1."""

    Config = DVDMConfig
    stages = ("denoiser",)

    def __init__(self, cfg: DVDMConfig, data: DataSpec) -> None:
        if cfg.difference_scale <= 0:
            raise ValueError(f"method.difference_scale must be positive, got {cfg.difference_scale}")
        C, T, H, W = data.video_shape
        super().__init__(cfg, data, (C, T - 1, H, W), factor=1)

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        self.check_stage(stage)
        return self.denoiser_parameters()

    def differences(self, video: Tensor) -> Tensor:
        """scale * (x_i - x_1) for i = 2..T: (B, C, T, H, W) -> (B, C, T-1, H, W)."""
        return self.cfg.difference_scale * (video[:, :, 1:] - video[:, :, :1])

    def compose(self, first: Tensor, d: Tensor) -> Tensor:
        """x_1 (B, C, H, W) and scaled d (B, C, T-1, H, W) -> the clip (B, C, T, H, W) in [-1, 1]."""
        rest = first[:, :, None] + d / self.cfg.difference_scale  # x_i = x_1 + d_i
        return torch.cat([first[:, :, None], rest.to(first.dtype)], dim=2).clamp(-1, 1)

    def loss(self, stage: str, batch: VideoBatch) -> dict[str, Tensor]:
        self.check_stage(stage)
        video = batch.video  # (B, C, T, H, W)
        return {"loss": self.diffusion_loss(self.differences(video), batch.first_frame, Conditioning.from_batch(batch))}

    @torch.no_grad()
    def sample(self, n: int, cond: Conditioning, *, steps: int, guidance: float,
               generator: torch.Generator | None = None, eta: float = 0.0) -> Tensor:
        first = self.first_frame(n, cond)
        d = self.generate(first, cond, steps, guidance, generator, eta)  # (n, C, T-1, H, W)
        return self.compose(first.float(), d.float())


class ResidualAutoencoder(nn.Module):
    """Per-frame residual R (N, C, H, W) <-> latent l (N, c_z, H/b, W/b) in [-1, 1] (tanh); a small conv AE."""

    def __init__(self, cfg: ResidualAutoencoderConfig, channels: int, factor: int) -> None:
        super().__init__()
        downs = _log2(factor, "method.codec.block")
        w = cfg.width
        enc: list[nn.Module] = [nn.Conv2d(channels, w, 3, padding=1)]
        dec: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, w, 3, padding=1)]
        for _ in range(downs):
            enc += [nn.SiLU(), nn.Conv2d(w, w, 4, stride=2, padding=1)]
            dec += [nn.SiLU(), nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w, w, 3, padding=1)]
        enc += [nn.SiLU(), nn.Conv2d(w, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, cfg.latent_channels, 3, padding=1)]
        dec += [nn.SiLU(), nn.Conv2d(w, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, channels, 3, padding=1)]
        self.enc, self.dec = nn.Sequential(*enc), nn.Sequential(*dec)

    def encode(self, r: Tensor) -> Tensor:
        return torch.tanh(self.enc(r))

    def decode(self, latent: Tensor) -> Tensor:
        return self.dec(latent)

    def forward(self, r: Tensor) -> Tensor:
        return self.decode(self.encode(r))


class EDVDM(FirstFrameDiffusion):
    """ED-VDM: diffusion over (motion vectors, residual latents) of the codec, decoded from the given first frame."""

    Config = EDVDMConfig
    stages = ("residual_autoencoder", "denoiser")

    def __init__(self, cfg: EDVDMConfig, data: DataSpec) -> None:
        b, S = cfg.codec.block, cfg.codec.search
        _log2(b, "method.codec.block")
        if data.height % b or data.width % b:
            raise ValueError(f"frame size {data.height}x{data.width} must be divisible by method.codec.block={b}")
        if S < 1:
            raise ValueError(f"method.codec.search must be >= 1, got {S}")
        if cfg.codec.loop not in CODEC_LOOPS:
            raise ValueError(f"method.codec.loop must be one of {CODEC_LOOPS}, got {cfg.codec.loop!r}")
        if cfg.codec.match not in codec.MATCH_REFERENCES:
            raise ValueError(f"method.codec.match must be one of {codec.MATCH_REFERENCES}, got {cfg.codec.match!r}")
        C, T, H, W = data.video_shape
        super().__init__(cfg, data, (MV_CHANNELS + cfg.residual_autoencoder.latent_channels, T - 1, H // b, W // b),
                         factor=b)
        self.autoencoder = ResidualAutoencoder(cfg.residual_autoencoder, C, b)

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        self.check_stage(stage)
        if stage == "residual_autoencoder":
            return [p for p in self.autoencoder.parameters() if p.requires_grad]
        return self.denoiser_parameters()

    # --- the codec representation -----------------------------------------------------------------

    def decompose(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, T, H, W) -> (MV (B, 2, T-1, H/b, W/b) long, R (B, C, T-1, H, W) in video's dtype).

        The residuals of the configured loop: open, against the original previous frame (lossless
        transform); closed, against the previous frame as decoded through the current residual
        autoencoder (`encode_video`). No gradients either way.
        """
        if self.cfg.codec.loop == "closed":
            mv, r, _ = self.encode_video(video)
            return mv, r
        with torch.no_grad():
            mv, r = codec.decompose(video, self.cfg.codec.block, self.cfg.codec.search)
        return mv, r.to(video.dtype)

    @torch.no_grad()
    def encode_video(self, video: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The codec's encoder in the configured loop: (MV, R (B, C, T-1, H, W), latents (B, c_z, T-1, H/b, W/b)).

        closed: R_i = x_i - warp(x^_{i-1}, MV_i) with x^_{i-1} the previous frame as the decoder will
        rebuild it from the latents (`codec.decompose_closed_loop` with the autoencoder's round trip, one
        frame of the batch at a time: one extra forward pass of the autoencoder over the clip's residuals,
        no gradients). In the residual-autoencoder stage that is the *current* autoencoder, so the stage
        trains on the residuals its own coding errors leave (its target moves with it, as the decoded
        frames do); in the denoiser stage the frozen one, so `decode` of the target rebuilds x^ exactly
        (up to floating-point differences of batched vs per-frame convolutions).
        open: R_i = x_i - warp(x_{i-1}, MV_i) against the original frames.
        """
        cfg = self.cfg.codec
        if cfg.loop == "open":
            mv, r = codec.decompose(video, cfg.block, cfg.search)
            r = r.to(video.dtype)
            return mv, r, self.encode_residuals(r)
        latents: list[Tensor] = []

        def code(r: Tensor) -> Tensor:  # the residual coder's round trip, recording the latents
            latents.append(self.autoencoder.encode(r.to(video.dtype)))
            return self.autoencoder.decode(latents[-1]).float()

        mv, r, _ = codec.decompose_closed_loop(video, cfg.block, cfg.search, code, clamp=1.0, match=cfg.match)
        return mv, r.to(video.dtype), torch.stack(latents, dim=2)

    def encode_codes(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """(MV, latents): what the denoiser learns, without the residuals (the encoding cache keeps these)."""
        mv, _, latent = self.encode_video(video)
        return mv, latent

    def encode_residuals(self, r: Tensor) -> Tensor:
        """R (B, C, T', H, W) -> latents (B, c_z, T', H/b, W/b), frame by frame."""
        latent = self.autoencoder.encode(rearrange(r, "b c t h w -> (b t) c h w"))
        return rearrange(latent, "(b t) c h w -> b c t h w", t=r.shape[2])

    def decode_residuals(self, latent: Tensor) -> Tensor:
        """latents (B, c_z, T', H/b, W/b) -> R (B, C, T', H, W), frame by frame."""
        r = self.autoencoder.decode(rearrange(latent, "b c t h w -> (b t) c h w"))
        return rearrange(r, "(b t) c h w -> b c t h w", t=latent.shape[2])

    def pack(self, mv: Tensor, latent: Tensor) -> Tensor:
        """z = [MV / S, l]: (B, 2 + c_z, T-1, H/b, W/b), motion vectors normalised into [-1, 1]."""
        return torch.cat([mv.to(latent.dtype) / self.cfg.codec.search, latent], dim=1)

    def unpack(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z -> (MV long: S * z_mv rounded to the nearest integer in [-S, S], latents)."""
        S = self.cfg.codec.search
        mv_norm, latent = z.split([MV_CHANNELS, self.cfg.residual_autoencoder.latent_channels], dim=1)
        return (mv_norm.float() * S).round().clamp(-S, S).long(), latent

    def decode(self, first: Tensor, z: Tensor) -> Tensor:
        """x_1 (B, C, H, W) and z -> the clip (B, C, T, H, W) in [-1, 1] by the recursive codec reconstruction."""
        mv, latent = self.unpack(z)
        r = self.decode_residuals(latent)
        return codec.reconstruct(first.float(), mv, r.float(), self.cfg.codec.block, clamp=1.0, dtype=torch.float32)

    # --- stages ----------------------------------------------------------------------------------

    def loss(self, stage: str, batch: VideoBatch) -> dict[str, Tensor]:
        self.check_stage(stage)
        video = batch.video  # (B, C, T, H, W)
        if stage == "residual_autoencoder":
            _, r = self.decompose(video)  # closed loop: against the frames the current autoencoder decodes
            frames = rearrange(r, "b c t h w -> (b t) c h w")
            l1 = (self.autoencoder(frames).float() - frames.float()).abs().mean()
            return {"loss": l1, "l1": l1.detach()}
        mv, latent = self.frozen_encode(self.encode_codes, video, self.autoencoder)  # frozen in this stage
        z0 = self.pack(mv, latent)
        return {"loss": self.diffusion_loss(z0, batch.first_frame, Conditioning.from_batch(batch))}

    @torch.no_grad()
    def sample(self, n: int, cond: Conditioning, *, steps: int, guidance: float,
               generator: torch.Generator | None = None, eta: float = 0.0) -> Tensor:
        first = self.first_frame(n, cond)
        z = self.generate(first, cond, steps, guidance, generator, eta).clamp(-1, 1)  # both parts live in [-1, 1]
        return self.decode(first, z)

    @torch.no_grad()
    def reconstruct(self, video: Tensor) -> Tensor:
        """The full codec path: the configured loop's encoder (motion vectors, residual latents), pack/unpack,
        recursive decoding from the real first frame."""
        mv, _, latent = self.encode_video(video)
        return self.decode(video[:, :, 0], self.pack(mv, latent))
