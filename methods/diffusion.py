"""Stateless diffusion core: schedules, forward noising, parameterisations, samplers, CFG.

Notation (DDPM, Ho et al. 2020; DDIM, Song et al. 2021):
    x0        clean data                 x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps   (DDPM eq. 4)
    eps       the noise                  v   = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0   (Salimans & Ho 2022)
    alpha_bar cumulative product of (1 - beta), one entry per discrete timestep t in [0, T)

Every function works on tensors of any rank: per-sample scalars (B,) are broadcast with
`append_dims`. A denoiser is any callable `model(x_t, t) -> prediction` with t a (B,) long
tensor; samplers take one that predicts eps (wrap others with `as_eps_model`). Noise is
always an argument or a `noise_fn`, which is how VideoFusion's shared base noise plugs in.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Model = Callable[[Tensor, Tensor], Tensor]  # (x_t, t) -> prediction
NoiseFn = Callable[[Tensor, torch.Generator | None], Tensor]  # (like, generator) -> noise shaped like `like`

SCHEDULES = ("linear", "ldm_linear", "cosine", "scaled_linear")
OBJECTIVES = ("eps", "v", "x0")


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so a (B,) tensor broadcasts against an ndim-rank tensor."""
    if x.ndim > ndim:
        raise ValueError(f"cannot broadcast a {x.ndim}-d tensor to {ndim} dims")
    return x.reshape(*x.shape, *([1] * (ndim - x.ndim)))


def default_noise(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like `like` (the default `noise_fn`)."""
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


# --- schedules --------------------------------------------------------------------------


def beta_schedule(name: str, num_timesteps: int = 1000) -> Tensor:
    """Betas (T,) float64. linear: DDPM 1e-4..0.02; ldm_linear: latent-diffusion
    linspace(sqrt(0.00085...)) style with (0.0015, 0.0195) as PVDM; cosine: Nichol & Dhariwal 2021 eq. 17;
    scaled_linear: Stable Diffusion's linspace(sqrt(0.00085), sqrt(0.012))^2 (diffusers' "scaled_linear")."""
    if name == "linear":
        scale = 1000 / num_timesteps  # keeps the endpoints meaningful for T != 1000
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    if name == "ldm_linear":
        return torch.linspace(0.0015**0.5, 0.0195**0.5, num_timesteps, dtype=torch.float64) ** 2
    if name == "scaled_linear":
        return scaled_linear_betas(0.00085, 0.012, num_timesteps)
    if name == "cosine":
        s = 0.008
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = 1 - f[1:] / f[:-1]
        return betas.clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {name!r}; choose one of {SCHEDULES}")


def scaled_linear_betas(beta_start: float, beta_end: float, num_timesteps: int) -> Tensor:
    """(T,) float64 betas linear in sqrt(beta): a Stable Diffusion folder's own endpoints (scheduler_config.json)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def alpha_bar_schedule(name: str, num_timesteps: int = 1000, snr_shift: float = 1.0) -> Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), (T,) float64; with `snr_shift` != 1, shifted by `shift_snr`."""
    alpha_bar = torch.cumprod(1 - beta_schedule(name, num_timesteps), dim=0)
    return alpha_bar if snr_shift == 1 else shift_snr(alpha_bar, snr_shift)


def shift_snr(alpha_bar: Tensor, shift: float) -> Tensor:
    """The schedule with every signal-to-noise ratio divided by shift^2: SNR'(t) = SNR(t) / shift^2.

    SNR = alpha_bar / (1 - alpha_bar), so alpha_bar' = alpha_bar / (alpha_bar + shift^2 (1 - alpha_bar)).
    Hoogeboom et al. 2023 (simple diffusion, sec. 3.1) shift the cosine schedule this way for larger inputs:
    neighbouring values are redundant, so a given SNR destroys less of the structure and the global layout
    is settled in a few high-noise steps; shift > 1 spends more of training and sampling at more noise.
    """
    if shift <= 0:
        raise ValueError(f"snr_shift must be > 0 (1: the schedule as named), got {shift}")
    return alpha_bar / (alpha_bar + shift**2 * (1 - alpha_bar))


def _gather(alpha_bar: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """alpha_bar[t] broadcast against `like`, in like's dtype (computed in float64 first)."""
    a = alpha_bar.to(like.device)[t.to(like.device)]
    return append_dims(a, like.ndim).to(like.dtype)


# --- forward process and parameterisations ----------------------------------------------


def q_sample(x0: Tensor, t: Tensor, alpha_bar: Tensor, noise: Tensor) -> Tensor:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (DDPM eq. 4)."""
    a = _gather(alpha_bar, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def x0_from_eps(x_t: Tensor, t: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    a = _gather(alpha_bar, t, x_t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def eps_from_x0(x_t: Tensor, t: Tensor, x0: Tensor, alpha_bar: Tensor) -> Tensor:
    a = _gather(alpha_bar, t, x_t)
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def v_from_eps(x0: Tensor, t: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0."""
    a = _gather(alpha_bar, t, x0)
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def eps_from_v(x_t: Tensor, t: Tensor, v: Tensor, alpha_bar: Tensor) -> Tensor:
    """eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v."""
    a = _gather(alpha_bar, t, x_t)
    return (1 - a).sqrt() * x_t + a.sqrt() * v


def x0_from_v(x_t: Tensor, t: Tensor, v: Tensor, alpha_bar: Tensor) -> Tensor:
    """x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v."""
    a = _gather(alpha_bar, t, x_t)
    return a.sqrt() * x_t - (1 - a).sqrt() * v


def to_eps(pred: Tensor, x_t: Tensor, t: Tensor, alpha_bar: Tensor, objective: str) -> Tensor:
    """Convert a network output under `objective` to an eps prediction."""
    if objective == "eps":
        return pred
    if objective == "v":
        return eps_from_v(x_t, t, pred, alpha_bar)
    if objective == "x0":
        return eps_from_x0(x_t, t, pred, alpha_bar)
    raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")


def as_eps_model(model: Model, alpha_bar: Tensor, objective: str) -> Model:
    """Wrap a model predicting under `objective` so it predicts eps (for the samplers)."""
    if objective == "eps":
        return model
    return lambda x_t, t: to_eps(model(x_t, t), x_t, t, alpha_bar, objective)


def training_target(x0: Tensor, t: Tensor, noise: Tensor, alpha_bar: Tensor, objective: str) -> Tensor:
    """What the network regresses under `objective`."""
    if objective == "eps":
        return noise
    if objective == "v":
        return v_from_eps(x0, t, noise, alpha_bar)
    if objective == "x0":
        return x0
    raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")


def sample_timesteps(n: int, num_timesteps: int, device: torch.device | str = "cpu",
                     generator: torch.Generator | None = None) -> Tensor:
    """(n,) uniform training timesteps."""
    return torch.randint(0, num_timesteps, (n,), device=device, generator=generator)


def min_snr_weight(t: Tensor, alpha_bar: Tensor, objective: str, gamma: float) -> Tensor:
    """(B,) Min-SNR-gamma loss weights (Hang et al., ICCV 2023): each objective's loss re-weighted so that it is
    the x0 loss weighted by min(SNR(t), gamma), SNR = alpha_bar / (1 - alpha_bar): eps min(SNR, g) / SNR,
    v min(SNR, g) / (SNR + 1), x0 min(SNR, g). Low-noise steps, which plain losses weight most, no longer
    dominate the gradient."""
    a = alpha_bar.to(t.device)[t].double()
    snr = a / (1 - a)
    clipped = snr.clamp(max=gamma)
    if objective == "eps":
        w = clipped / snr
    elif objective == "v":
        w = clipped / (snr + 1)
    elif objective == "x0":
        w = clipped
    else:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    return w.float()


def diffusion_loss(model: Model, x0: Tensor, t: Tensor, alpha_bar: Tensor, noise: Tensor,
                   objective: str = "eps", min_snr_gamma: float = 0.0) -> Tensor:
    """Per-sample simple loss (B,): mean squared error of the prediction (DDPM eq. 14); with `min_snr_gamma` > 0,
    weighted per sample by `min_snr_weight`."""
    x_t = q_sample(x0, t, alpha_bar, noise)
    target = training_target(x0, t, noise, alpha_bar, objective)
    err = ((model(x_t, t).float() - target.float()) ** 2).flatten(1).mean(1)
    return err * min_snr_weight(t, alpha_bar, objective, min_snr_gamma) if min_snr_gamma > 0 else err


# --- classifier-free guidance ------------------------------------------------------------


GUIDANCE_CONVENTION = "s: eps(null) + s*(eps(c) - eps(null))"  # recorded with every result (evaluation.protocol)
NO_GUIDANCE = 1.0  # the guidance scale s that leaves the conditional prediction unchanged


def cfg_combine(eps_cond: Tensor, eps_uncond: Tensor, scale: float) -> Tensor:
    """eps = eps(null) + s (eps(c) - eps(null)): classifier-free guidance with scale s.

    s = 1 is the conditional prediction (no guidance), s = 0 the unconditional one; s = 1 + w is
    Ho & Salimans' (2022, eq. 6) (1 + w) eps(c) - w eps(null). This is the convention of the
    official CMD / DiT / GLIDE code (`cfg_scale`) and of diffusers (`guidance_scale`). Evaluated
    as eps(c) + (s - 1) (eps(c) - eps(null)), the same value, so that s = w + 1 reproduces the
    former w-convention results bit for bit.
    """
    return eps_cond + (scale - NO_GUIDANCE) * (eps_cond - eps_uncond)


def guided(model_cond: Model, model_uncond: Model, guidance: float) -> Model:
    """A denoiser applying CFG with scale s = `guidance`. With s = 1 the unconditional model is never called.

    Both branches run as one doubled batch when they are the same callable with a
    `cond` keyword; here they are separate callables, so the caller decides batching.
    """
    if guidance == NO_GUIDANCE:
        return model_cond
    return lambda x_t, t: cfg_combine(model_cond(x_t, t), model_uncond(x_t, t), guidance)


# --- samplers ----------------------------------------------------------------------------


def ddim_timesteps(num_timesteps: int, steps: int) -> Tensor:
    """Descending timesteps for a `steps`-step DDIM run ("leading" spacing, as diffusers' default)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    ratio = num_timesteps // steps
    return (torch.arange(steps) * ratio).flip(0).long()


def ddim_step(eps: Tensor, x_t: Tensor, t: Tensor, t_prev: Tensor, alpha_bar: Tensor,
              eta: float = 0.0, noise: Tensor | None = None) -> Tensor:
    """One DDIM update x_t -> x_{t_prev} (Song et al. 2021, eq. 12 with sigma from eq. 16).

    t_prev < 0 means "the final step": alpha_bar_prev = 1.
    """
    a_t = _gather(alpha_bar, t, x_t)
    a_prev = _gather(torch.cat([alpha_bar, alpha_bar.new_ones(1)]), torch.where(t_prev < 0, len(alpha_bar), t_prev), x_t)
    # 1. predicted x0 (eq. 12, first term)
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    # 2. sigma_t (eq. 16), eta interpolates DDIM (0) and DDPM-like (1)
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
    # 3. direction pointing to x_t (eq. 12, second term)
    direction = (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
    x_prev = a_prev.sqrt() * x0 + direction
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs a noise tensor")
        x_prev = x_prev + sigma * noise
    return x_prev


def ddim_sample(model: Model, x_T: Tensor, alpha_bar: Tensor, steps: int, *, eta: float = 0.0,
                generator: torch.Generator | None = None, noise_fn: NoiseFn = default_noise,
                progress: bool = False, clip_x0: float | None = None) -> Tensor:
    """DDIM sampling from x_T with an eps-predicting `model`; returns x0 (Song et al. 2021)."""
    timesteps = ddim_timesteps(len(alpha_bar), steps).to(x_T.device)
    x = x_T
    iterator = _progress(range(len(timesteps)), progress, "DDIM")
    for i in iterator:
        t = timesteps[i].expand(x.shape[0])
        t_prev = (timesteps[i + 1] if i + 1 < len(timesteps) else torch.tensor(-1, device=x.device)).expand(x.shape[0])
        eps = model(x, t).to(x.dtype)
        if clip_x0 is not None:  # re-derive eps from a clipped x0 (keeps pixels in range)
            x0 = x0_from_eps(x, t, eps, alpha_bar).clamp(-clip_x0, clip_x0)
            eps = eps_from_x0(x, t, x0, alpha_bar)
        noise = noise_fn(x, generator) if eta > 0 else None
        x = ddim_step(eps, x, t, t_prev, alpha_bar, eta=eta, noise=noise)
    return x


def dpmpp_2m_sample(model: Model, x_T: Tensor, alpha_bar: Tensor, steps: int, *, progress: bool = False,
                    clip_x0: float | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): the probability-flow ODE solved in lambda = log(alpha /
    sigma) with a second-order multistep update of the x0 estimate, over DDIM's timesteps; returns x0.

    Deterministic (DDIM's eta = 0 path, to higher order): the first step and the last (to alpha_bar = 1) are
    first order, which is DDIM exactly; in between, D = (1 + 1 / 2r) x0_i - (1 / 2r) x0_{i-1} with r = h_{i-1} / h_i.
    Its purpose is DDIM's trajectory in fewer steps; whether half the steps keep a model's scores is measured per
    model (README). Tested against a Gaussian dataset's exact ODE map (second-order convergence) and diffusers'
    DPMSolverMultistepScheduler. clip_x0 clamps each x0 estimate, as for DDIM.
    """
    timesteps = ddim_timesteps(len(alpha_bar), steps).tolist()
    # on the meta device (FLOPs traced without weights, benchmarks.efficiency) the schedule has no values; the work
    # does not depend on them, so any decreasing schedule stands in
    ab = (torch.linspace(0.9999, 1e-4, len(alpha_bar), dtype=torch.float64) if alpha_bar.is_meta
          else alpha_bar.double().cpu())
    x, previous, h_previous = x_T, None, None
    for i in _progress(range(len(timesteps)), progress, "DPM-Solver++(2M)"):
        s = timesteps[i]
        alpha_s, sigma_s = float(ab[s].sqrt()), float((1 - ab[s]).sqrt())
        eps = model(x, torch.full((x.shape[0],), s, device=x.device, dtype=torch.long)).to(x.dtype)
        x0 = (x - sigma_s * eps) / alpha_s
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        if i + 1 == len(timesteps):  # to alpha_bar = 1 (sigma = 0): the first-order step lands on x0
            return x0
        t = timesteps[i + 1]
        alpha_t, sigma_t = float(ab[t].sqrt()), float((1 - ab[t]).sqrt())
        h = math.log(alpha_t / sigma_t) - math.log(alpha_s / sigma_s)
        if previous is None:
            d = x0
        else:
            r = h_previous / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous
        x = (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * d
        previous, h_previous = x0, h
    return x


def ddpm_sample(model: Model, x_T: Tensor, alpha_bar: Tensor, *, generator: torch.Generator | None = None,
                noise_fn: NoiseFn = default_noise, progress: bool = False) -> Tensor:
    """Ancestral sampling over every timestep (DDPM Algorithm 2, sigma_t^2 = beta_tilde_t)."""
    x = x_T
    for i in _progress(range(len(alpha_bar) - 1, -1, -1), progress, "DDPM"):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        eps = model(x, t).to(x.dtype)
        a_t = _gather(alpha_bar, t, x)
        a_prev = _gather(alpha_bar, (t - 1).clamp(min=0), x) if i > 0 else torch.ones_like(a_t)
        beta = 1 - a_t / a_prev
        # posterior mean (DDPM eq. 11) and variance beta_tilde (eq. 7)
        mean = (x - beta / (1 - a_t).sqrt() * eps) / (1 - beta).sqrt()
        if i > 0:
            var = beta * (1 - a_prev) / (1 - a_t)
            x = mean + var.sqrt() * noise_fn(x, generator)
        else:
            x = mean
    return x


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False)
