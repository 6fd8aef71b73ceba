"""The shared image prior: a 2D diffusion model over single frames of the dataset.

Decomposed methods start their per-frame / content generators from it (CMD's content-frame
model, VideoFusion's base generator), so it is method-agnostic: it knows images and
conditions, nothing of videos. It is either
- a lean 2D UNet (`methods/nets/unet.py`, temporal=False) trained on frames of the dataset, or
- a diffusers `UNet2DConditionModel` (+ optional `AutoencoderKL`) loaded from a local folder
  (e.g. Stable Diffusion's `unet/` and `vae/`), then fine-tuned like the lean one. When the folder
  also has `text_encoder/` + `tokenizer/`, the UNet is conditioned as Stable Diffusion is: captions,
  or class labels through `class_prompt`, encoded by the folder's frozen CLIP text encoder, with the
  empty prompt as the CFG null (`methods/nets/sd.py`); its `scheduler/scheduler_config.json` gives
  the noise schedule and prediction type (config key `scheduler`).
With a VAE the prior models x0 = scale * vae.encode(frame) (latent diffusion); without, pixels.
The framework trains it once and caches its weights by config hash (see `shared_stages`).

Notation: x0 (B, C, H, W) an image in the prior's space, x_t its noised version, eps the noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from methods import diffusion as D
from methods.base import Conditioning, DataSpec
from methods.nets.cond_denoiser import CondDenoiser
from methods.nets.embed import TextEncoderConfig, trainable
from methods.nets.sd import PromptDenoiser, PromptEncoder, has_prompt_encoder, read_schedule
from methods.nets.unet import UNet, UNetConfig
from methods.vdm import DiffusionConfig, diffusion_schedule, run_sampler


@dataclass
class ImagePriorConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)  # the lean 2D UNet (ignored with diffusers_path)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    conditioning: str = "class"  # none | class | text | class+text
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    # A local folder holding `unet/` (diffusers UNet2DConditionModel) and optionally `vae/` (AutoencoderKL),
    # as written by `save_pretrained` (a Stable Diffusion snapshot has both). Nothing is downloaded.
    diffusers_path: str | None = None
    latent_scale: float | None = None  # x0 = scale * VAE latent; None: the VAE config's scaling_factor
    frames_per_video: int = 2  # frames drawn from each training clip per step
    # With diffusers_path only. How the UNet sees the condition: auto: the folder's CLIP text_encoder/ + tokenizer/
    # when it has both (Stable Diffusion's own conditioning), else `learned`; folder: require them; learned: a new,
    # trained embedding as one cross-attention token (SD's text conditioning unused: an ablation)
    prompt_encoder: str = "auto"
    class_prompt: str = "a video of {class}"  # class labels -> prompts ({class}: the class name in words)
    # Noise schedule and prediction type. auto: the folder's scheduler/scheduler_config.json when it has one (what
    # its UNet was trained with: SD's scaled_linear 0.00085..0.012, epsilon or v_prediction), else `diffusion` above;
    # folder: require it; config: `diffusion` above whatever the folder says
    scheduler: str = "auto"


SD_ONLY_KEYS = ("prompt_encoder", "class_prompt", "scheduler")  # keys that mean nothing without diffusers_path


def image_prior_cache_key(owner: str, stage: str, cfg: ImagePriorConfig, data: DataSpec) -> dict:
    """What determines a shared image prior's weights besides the data config and training settings: one
    definition for every method that shares the stage, so equal prior configs give one cache entry."""
    if stage != "image_prior":
        raise ValueError(f"{owner} shares only its image_prior stage, not {stage!r}")
    prior, spec = asdict(cfg), asdict(data)
    if not cfg.diffusers_path:  # keys only a Stable Diffusion folder uses stay out: a lean prior's key is unchanged
        for key in SD_ONLY_KEYS:
            prior.pop(key)
        spec.pop("class_names")
    return {"image_prior": prior, "data": spec}


class DiffusersUNet2D(nn.Module):
    """diffusers' UNet2DConditionModel behind our (x, t, emb) backbone call; emb is one cross-attention token."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.emb_dim = net.config.cross_attention_dim

    def forward(self, x: Tensor, t: Tensor, emb: Tensor | None = None) -> Tensor:
        if emb is None:
            emb = x.new_zeros(x.shape[0], self.emb_dim)
        return self.net(x, t, encoder_hidden_states=emb[:, None].to(x.dtype)).sample


def load_diffusers(path: str) -> tuple[nn.Module, nn.Module | None]:
    """(UNet2DConditionModel, AutoencoderKL or None) from a local folder; a clear error when missing."""
    root = Path(path)
    if not (root / "unet").is_dir():
        raise FileNotFoundError(
            f"image prior folder {str(root)!r} has no 'unet/' subfolder "
            "(config key method.image_prior.diffusers_path): "
            "give a local folder with a diffusers UNet2DConditionModel saved under unet/ (and optionally an "
            "AutoencoderKL under vae/), e.g. a Stable Diffusion snapshot")
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(root / "unet")
    vae = AutoencoderKL.from_pretrained(root / "vae") if (root / "vae").is_dir() else None
    return unet, vae


def random_frames(video: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k random frames of every clip: video (B, C, T, H, W) -> (B * k, C, H, W), clip-major."""
    B, _, T = video.shape[:3]
    idx = torch.randint(0, T, (B, k), generator=generator, device=video.device)  # (B, k)
    frames = video[torch.arange(B, device=video.device)[:, None], :, idx]  # (B, k, C, H, W)
    return frames.flatten(0, 1)


def repeat_conditioning(cond: Conditioning, k: int) -> Conditioning:
    """Each condition repeated k times in a row (matches `random_frames`' clip-major order)."""
    return Conditioning(
        label=None if cond.label is None else cond.label.repeat_interleave(k),
        text=None if cond.text is None else [t for t in cond.text for _ in range(k)],
        first_frame=None if cond.first_frame is None else cond.first_frame.repeat_interleave(k, dim=0),
    )


def load_vae(path: str) -> nn.Module | None:
    """The AutoencoderKL under `<path>/vae/`, or None (for a content model that uses only a folder's latent space)."""
    root = Path(path)
    if not (root / "vae").is_dir():
        return None
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(root / "vae")


Backbone = Callable[[tuple[int, int, int]], nn.Module]  # image shape (C, H, W) -> a `(x, t, emb)` backbone with emb_dim


class ImagePrior(nn.Module):
    """A conditional 2D diffusion model eps_theta(x_t, t, c) over images (B, C, H, W).

    `backbone` replaces the prior's own network (CMD's content DiT): it is built for the prior's image
    shape and conditioned through a learned embedding; a diffusers folder then gives only its VAE
    (the latent space), and the schedule is `cfg.diffusion` unless `cfg.scheduler=folder`.
    """

    Config = ImagePriorConfig

    def __init__(self, cfg: ImagePriorConfig, data: DataSpec, backbone: Backbone | None = None) -> None:
        super().__init__()
        for key, value, choices in (("prompt_encoder", cfg.prompt_encoder, ("auto", "folder", "learned")),
                                    ("scheduler", cfg.scheduler, ("auto", "folder", "config"))):
            if value not in choices:
                raise ValueError(f"method.image_prior.{key} must be one of {'|'.join(choices)}, got {value!r}")
        self.cfg = cfg
        self.vae: nn.Module | None = None
        unet, vae = (None, None)
        if cfg.diffusers_path:
            unet, vae = load_diffusers(cfg.diffusers_path) if backbone is None else (None, load_vae(cfg.diffusers_path))
        if vae is not None:
            self.vae = vae.eval().requires_grad_(False)
            self.latent_scale = cfg.latent_scale or vae.config.scaling_factor
            down = 2 ** (len(vae.config.block_out_channels) - 1)
            self.image_shape = (vae.config.latent_channels, data.height // down, data.width // down)
        else:
            self.image_shape = (data.channels, data.height, data.width)
        if unet is not None and unet.config.in_channels != self.image_shape[0]:
            raise ValueError(f"the diffusers UNet in {cfg.diffusers_path} takes {unet.config.in_channels} "
                             f"channels; the prior's images have {self.image_shape[0]}")
        self.denoiser: nn.Module
        if unet is not None and self._uses_prompts():
            self.denoiser = PromptDenoiser(unet, PromptEncoder(cfg.diffusers_path), cfg.conditioning, data.class_names,
                                           cfg.class_prompt)
        else:
            if backbone is not None:
                net = backbone(self.image_shape)
            elif unet is not None:
                net = DiffusersUNet2D(unet)
            else:
                net = UNet(data.channels, data.channels, cfg.unet, temporal=False)
            self.denoiser = CondDenoiser(net, net.emb_dim, cfg.conditioning, data.num_classes, cfg.text)
        # the noise schedule and prediction type: the folder's (what its UNet was trained with) or the config's
        folder = read_schedule(cfg.diffusers_path) if cfg.diffusers_path and cfg.scheduler != "config" else None
        if cfg.scheduler == "folder" and folder is None:
            raise FileNotFoundError(f"method.image_prior.scheduler=folder: {cfg.diffusers_path!r} has no "
                                    "scheduler/scheduler_config.json")
        if folder is not None and (unet is not None or cfg.scheduler == "folder"):
            alpha_bar, self.objective = folder.alpha_bar, folder.objective
            self.schedule = {"source": "folder", **folder.source}
        else:
            d = cfg.diffusion
            alpha_bar, self.objective = diffusion_schedule(d), d.objective
            self.schedule = {"source": "config", "schedule": d.schedule, "num_timesteps": d.num_timesteps,
                             "objective": d.objective, "snr_shift": d.snr_shift}
        self.register_buffer("alpha_bar", alpha_bar, persistent=False)

    def _uses_prompts(self) -> bool:
        """Whether the diffusers UNet is conditioned by the folder's CLIP text encoder (config key prompt_encoder)."""
        cfg = self.cfg
        if cfg.prompt_encoder == "learned":
            return False
        return cfg.prompt_encoder == "folder" or has_prompt_encoder(cfg.diffusers_path)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The denoiser's trainable parameters (a VAE and a CLIP text encoder stay frozen)."""
        return trainable(self.denoiser)

    # --- the space the prior models -----------------------------------------------------------

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Pixels (B, C, H, W) in [-1, 1] -> x0 in the prior's space (VAE latents when it has a VAE)."""
        if self.vae is None:
            return images
        return self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean * self.latent_scale

    @torch.no_grad()
    def decode(self, x0: Tensor) -> Tensor:
        """x0 in the prior's space -> pixels (B, C, H, W) in [-1, 1]."""
        if self.vae is None:
            return x0.clamp(-1, 1)
        return self.vae.decode(x0.to(self.vae.dtype) / self.latent_scale).sample.clamp(-1, 1)

    # --- training and sampling ----------------------------------------------------------------

    def loss(self, x0: Tensor, cond: Conditioning) -> Tensor:
        """Scalar simple diffusion loss on x0 (B, C, H, W) in the prior's space (see `encode`), CFG dropout on."""
        n = x0.shape[0]
        t = D.sample_timesteps(n, len(self.alpha_bar), x0.device)
        drop = self.denoiser.random_drop(n, self.cfg.diffusion.cond_drop_prob, x0.device)
        per_sample = D.diffusion_loss(lambda x_t, tt: self.denoiser(x_t, tt, cond, drop), x0, t, self.alpha_bar,
                                      torch.randn_like(x0), self.objective, self.cfg.diffusion.min_snr_gamma)
        return per_sample.mean()

    def eps_model(self, cond: Conditioning | None, guidance: float) -> D.Model:
        """model(x_t, t) -> eps with classifier-free guidance scale s = `guidance` (1: none)."""
        return D.as_eps_model(self.denoiser.guided(cond, guidance), self.alpha_bar, self.objective)

    @torch.no_grad()
    def sample(self, n: int, cond: Conditioning | None, *, steps: int, guidance: float,
               generator: torch.Generator | None = None, eta: float = 0.0) -> Tensor:
        """n images x0 (n, *image_shape) in the prior's space (use `decode` for pixels)."""
        device = self.alpha_bar.device
        x_T = torch.randn((n, *self.image_shape), generator=generator, device=device)
        x0 = run_sampler(self.cfg.diffusion.sampler, self.eps_model(cond, guidance), x_T, self.alpha_bar, steps, eta,
                         generator)
        return x0 if self.vae is not None else x0.clamp(-1, 1)
