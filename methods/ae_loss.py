"""The papers' autoencoder losses: reconstruction (L1 / MSE) + LPIPS + a PatchGAN with an adaptive weight.

CMD's pixel-mode autoencoder trains on L1 + LPIPS, its latent mode on MSE (the official code); PVDM's on
L1 + LPIPS (one random frame per clip) and, in a later stage, a 2D + 3D PatchGAN with the hinge loss. All of
it is configured under `method.autoencoder.loss` (`AELossConfig`); the defaults are L1 alone (pixels) or MSE
(CMD latent mode), so a run that names nothing trains as before.

LPIPS (Zhang et al. 2018, the "v0.1 vgg" variant the autoencoders of both papers use) needs two local files,
never downloaded: `lpips.vgg_path`, a VGG16 `features` state dict in torchvision's layout (`features.0.weight`
... `features.28.bias`; a whole vgg16 state dict is fine, its classifier is ignored), and `lpips.linear_path`,
the per-layer linear weights of the lpips package (`lin0.model.1.weight` ... `lin4.model.1.weight`, each
(1, C, 1, 1)). The network's widths are read from the files, so a narrow stand-in of the same layout (the
tests') loads the same way. Distance: inputs in [-1, 1] shifted and scaled per channel, the five relu taps
(relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) unit-normalised over channels, squared differences weighted
per channel by the linear layer, averaged over space, summed over taps.

The adversarial part trains inside the autoencoder stage's single optimiser step (the discriminators are their
own parameter group, clipped on their own: one norm over both players let the discriminators' gradient, tens of times the
autoencoder's, shrink the autoencoder's step): the discriminators' hinge
loss sees detached reconstructions (its gradient reaches only the discriminators), and the generator's term
-D(x_hat) goes through the discriminators with their weights detached (`torch.func.functional_call`), so its
gradient reaches only the autoencoder. Its weight is taming's adaptive one, ||grad_last L_nll|| /
(||grad_last L_g|| + 1e-4) clamped to [0, 1e4], times `gan.weight`, on the decoder's last layer; it starts at
`gan.start` steps (counted by this module, stored in checkpoints). Discriminators: taming's NLayerDiscriminator
(kernel 4, stride 2 x layers, BatchNorm, LeakyReLU 0.2) on frames (2d) and its Conv3d twin on clips (3d), run in
fp32 under bf16 autocast (a bf16 Conv3d weight gradient on CPU turned non-finite; see `_logits`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

RECON_LOSSES = ("auto", "l1", "mse")
GAN_KINDS = ("2d", "3d", "2d+3d")

# VGG16's `features` Sequential: the convs' indices, grouped by the stage that ends at an LPIPS tap
VGG16_STAGES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
# lpips' ScalingLayer (inputs in [-1, 1] -> the statistics the VGG was trained on)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


@dataclass
class LPIPSConfig:
    weight: float = 0.0  # 0: off. CMD (pixel) and PVDM: 1
    vgg_path: str = ""  # a torchvision-layout VGG16 state dict (features.*), a local file
    linear_path: str = ""  # the lpips package's v0.1 vgg linear weights (lin0..lin4), a local file
    frames: int = 1  # frames per clip scored (random ones, as PVDM); 0: every frame


@dataclass
class GANConfig:
    weight: float = 0.0  # disc_weight; 0: off. PVDM: 1 (2D + 3D, hinge)
    start: int = 0  # the autoencoder step at which the adversarial term and the discriminators start
    kind: str = "2d+3d"  # 2d: frames | 3d: clips | 2d+3d (PVDM)
    channels: int = 64  # ndf, the first layer's width
    layers: int = 3  # stride-2 layers
    adaptive: bool = True  # taming's adaptive weight; False: gan.weight alone
    lr_scale: float = 1.0  # the discriminators' learning rate relative to the stage's (taming: the same)


@dataclass
class AELossConfig:
    recon: str = "auto"  # auto: L1 on pixels, MSE on latents (CMD's latent mode) | l1 | mse
    lpips: LPIPSConfig = field(default_factory=LPIPSConfig)
    gan: GANConfig = field(default_factory=GANConfig)


# --- LPIPS ----------------------------------------------------------------------------------------------


def _load_state(path: str, key: str) -> dict[str, Tensor]:
    if not path:
        raise FileNotFoundError(f"{key} is not set: LPIPS needs local weights (nothing is downloaded). Set {key}=<file>, "
                                f"or turn LPIPS off with method.autoencoder.loss.lpips.weight=0")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{key}={path}: no such file ({p.resolve()}). Give the local weights file, or turn "
                                f"LPIPS off with method.autoencoder.loss.lpips.weight=0")
    state = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{key}={path} holds a {type(state).__name__}, not a state dict")
    return state


class LPIPS(nn.Module):
    """Learned perceptual distance between image batches (N, 3, H, W) in [-1, 1] -> (N,); frozen."""

    def __init__(self, vgg_state: dict[str, Tensor], linear_state: dict[str, Tensor]) -> None:
        super().__init__()
        prefix = "features." if any(k.startswith("features.") for k in vgg_state) else ""
        self.convs = nn.ModuleList()
        for stage in VGG16_STAGES:
            for i in stage:
                w, b = vgg_state.get(f"{prefix}{i}.weight"), vgg_state.get(f"{prefix}{i}.bias")
                if w is None or b is None or w.dim() != 4:
                    raise ValueError(f"the VGG16 state dict has no conv {prefix}{i}.weight/bias: expected torchvision's "
                                     f"vgg16 layout (features.0 ... features.28)")
                conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], padding=w.shape[2] // 2)
                conv.weight.data.copy_(w)
                conv.bias.data.copy_(b)
                self.convs.append(conv)
        self.lins = nn.ParameterList()
        for k in range(len(VGG16_STAGES)):
            names = [n for n in linear_state if re.fullmatch(rf"lin{k}\.(model\.\d+\.)?weight", n)]
            width = self.convs[sum(len(s) for s in VGG16_STAGES[: k + 1]) - 1].out_channels
            if len(names) != 1 or linear_state[names[0]].numel() != width:
                raise ValueError(f"the LPIPS linear weights need lin{k}.model.1.weight of {width} channels "
                                 f"(the lpips package's v0.1 layout); found {names or 'none'}")
            self.lins.append(nn.Parameter(linear_state[names[0]].reshape(1, width, 1, 1).clone()))
        if self.convs[0].in_channels != 3:
            raise ValueError(f"the VGG16 takes {self.convs[0].in_channels} channels, LPIPS needs 3")
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_config(cls, cfg: LPIPSConfig, key: str = "method.autoencoder.loss.lpips") -> LPIPS:
        return cls(_load_state(cfg.vgg_path, f"{key}.vgg_path"), _load_state(cfg.linear_path, f"{key}.linear_path"))

    def taps(self, x: Tensor) -> list[Tensor]:
        """The five relu taps of x (N, 3, H, W), each unit-normalised over channels."""
        h, out, i = (x - self.shift) / self.scale, [], 0
        for k, stage in enumerate(VGG16_STAGES):
            if k:
                h = F.max_pool2d(h, 2)
            for _ in stage:
                h = F.relu(self.convs[i](h))
                i += 1
            out.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.shape[1] == 1:
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        if a.shape[1] != 3:
            raise ValueError(f"LPIPS compares RGB (or grey) images; got {a.shape[1]} channels")
        d = 0.0
        for fa, fb, lin in zip(self.taps(a), self.taps(b), self.lins):
            d = d + ((fa - fb).pow(2) * lin).sum(dim=1).mean(dim=(1, 2))
        return d


# --- PatchGAN -------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """taming's NLayerDiscriminator, 2D (frames) or 3D (clips): logits per patch."""

    def __init__(self, in_channels: int, channels: int = 64, layers: int = 3, dims: int = 2) -> None:
        super().__init__()
        Conv, Norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
        mods: list[nn.Module] = [Conv(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for n in range(1, layers + 1):
            nxt = channels * min(2 ** n, 8)
            stride = 2 if n < layers else 1
            mods += [Conv(width, nxt, 4, stride, 1, bias=False), Norm(nxt), nn.LeakyReLU(0.2, True)]
            width = nxt
        mods.append(Conv(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)
        self.dims, self.layers = dims, layers
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def min_size(self) -> int:
        """The smallest side every input axis needs (stride-2 layers, then two kernel-4 stride-1 convs)."""
        return 3 * 2 ** self.layers  # each kernel-4 padding-1 conv: stride 2 halves a side, stride 1 takes 1 off

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def hinge_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


# --- the loss -------------------------------------------------------------------------------------------


class AutoencoderLoss(nn.Module):
    """loss(x, x_hat, last_layer) for an autoencoder of clips (B, C, T, H, W); holds the discriminators.

    `space`: "pixel" (x in [-1, 1], LPIPS possible) or "latent" (recon=auto means MSE, LPIPS refused).
    """

    def __init__(self, cfg: AELossConfig, channels: int, clip: tuple[int, int, int], space: str = "pixel",
                 key: str = "method.autoencoder.loss") -> None:
        super().__init__()
        if cfg.recon not in RECON_LOSSES:
            raise ValueError(f"{key}.recon must be one of {RECON_LOSSES}, got {cfg.recon!r}")
        if cfg.gan.kind not in GAN_KINDS:
            raise ValueError(f"{key}.gan.kind must be one of {GAN_KINDS}, got {cfg.gan.kind!r}")
        self.cfg, self.space = cfg, space
        self.recon = cfg.recon if cfg.recon != "auto" else ("mse" if space == "latent" else "l1")
        self._lpips: list[LPIPS] = []  # a plain list: frozen weights stay out of the method's state dict
        if cfg.lpips.weight > 0:
            if space != "pixel":
                raise ValueError(f"{key}.lpips compares pixels; this autoencoder works on latents (CMD's latent mode "
                                 f"trains on MSE, as the official code): set {key}.lpips.weight=0")
            self._lpips.append(LPIPS.from_config(cfg.lpips, f"{key}.lpips"))
        self.disc = nn.ModuleDict()
        if cfg.gan.weight > 0:
            T, H, W = clip
            for kind in cfg.gan.kind.split("+"):
                d = PatchDiscriminator(channels, cfg.gan.channels, cfg.gan.layers, dims=int(kind[0]))
                sides = (H, W) if kind == "2d" else (T, H, W)
                if min(sides) < d.min_size():
                    raise ValueError(f"a {kind} PatchGAN of {cfg.gan.layers} layers needs every side >= {d.min_size()}; "
                                     f"the clip is {T}x{H}x{W}: lower {key}.gan.layers")
                self.disc[kind] = d
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        state_dict.setdefault(prefix + "step", torch.zeros((), dtype=torch.long))  # weights stored before this module
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def lpips(self) -> LPIPS | None:
        return self._lpips[0] if self._lpips else None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.disc.parameters())

    def param_groups(self, autoencoder: list[nn.Parameter]) -> list[dict]:
        """The autoencoder stage's optimiser groups: the autoencoder, then (with a PatchGAN) the discriminators as
        their own player, so each gets its own gradient clipping (`lightning_modules.system.clip_by_player`) and
        learning rate (`gan.lr_scale`)."""
        groups = [{"params": autoencoder, "lr_scale": 1.0}]
        if self.disc:
            groups.append({"params": self.trainable_parameters(), "lr_scale": self.cfg.gan.lr_scale,
                           "player": "discriminator"})
        return groups

    def _logits(self, kind: str, x: Tensor, params: dict[str, Tensor] | None = None) -> Tensor:
        if kind == "2d":
            x = x.transpose(1, 2).flatten(0, 1)  # (B*T, C, H, W)
        d = self.disc[kind]
        # fp32 even under bf16 autocast: on CPU (torch 2.13, oneDNN) the bf16 weight gradient of the 3D
        # discriminator's last conv (kernel 4, stride 1, a 3x7x7 input) came out non-finite in ~6-10% of
        # steps and the autoencoder diverged to NaN; the discriminators are a small share of a step
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            return d(x) if params is None else functional_call(d, params, (x,))

    def perceptual(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """Mean LPIPS over `lpips.frames` random frames of every clip (all frames for 0)."""
        lp = self.lpips
        if lp.shift.device != x.device:
            lp.to(x.device)
        T = x.shape[2]
        k = self.cfg.lpips.frames
        if 0 < k < T:
            idx = torch.rand(x.shape[0], T, device=x.device).argsort(dim=1)[:, :k]  # k distinct frames per clip
            rows = torch.arange(x.shape[0], device=x.device)[:, None]
            a, b = x[rows, :, idx].flatten(0, 1), x_hat[rows, :, idx].flatten(0, 1)  # (B*k, C, H, W)
        else:
            a, b = x.transpose(1, 2).flatten(0, 1), x_hat.transpose(1, 2).flatten(0, 1)
        return lp(a.float(), b.float()).mean()

    def forward(self, x: Tensor, x_hat: Tensor, last_layer: Tensor | None = None) -> dict[str, Tensor]:
        x, x_hat = x.float(), x_hat.float()
        rec = (x_hat - x).abs().mean() if self.recon == "l1" else (x_hat - x).pow(2).mean()
        out = {self.recon: rec.detach()}
        nll = rec
        if self.lpips is not None:
            p = self.perceptual(x, x_hat)
            nll = nll + self.cfg.lpips.weight * p
            out["lpips"] = p.detach()
        loss = nll
        if self.disc:
            training = torch.is_grad_enabled() and x_hat.requires_grad
            if int(self.step) >= self.cfg.gan.start:
                frozen = {k: {n: p.detach() for n, p in d.named_parameters()} for k, d in self.disc.items()}
                g = sum(-self._logits(k, x_hat, frozen[k]).float().mean() for k in self.disc)
                w = torch.tensor(self.cfg.gan.weight, device=x.device)
                if self.cfg.gan.adaptive and training and last_layer is not None and last_layer.requires_grad:
                    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
                    g_adv = torch.autograd.grad(g, last_layer, retain_graph=True)[0]
                    w = (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach() * self.cfg.gan.weight
                d_loss = sum(hinge_d_loss(self._logits(k, x.detach()).float(), self._logits(k, x_hat.detach()).float())
                             for k in self.disc)
                loss = loss + w * g + d_loss
                out.update(g=g.detach(), d=d_loss.detach(), gan_weight=w.detach())
            else:  # every discriminator weight takes part (zero gradient) so DDP sees no unused parameter
                loss = loss + 0.0 * sum(p.sum() for p in self.disc.parameters())
            if training:
                self.step += 1
        out["loss"] = loss
        return out
