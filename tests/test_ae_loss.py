"""The papers' autoencoder losses (methods/ae_loss.py): LPIPS from local files, the PatchGAN and its adaptive weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import build_method
from benchmarks.config import load_config
from datamodules.batch import collate_items
from datamodules.shapes import ShapesConfig, ShapesDataset
from lightning_modules.system import clip_by_player, optimizer_groups
from methods.ae_loss import LPIPS_SCALE, LPIPS_SHIFT, VGG16_STAGES, AELossConfig, AutoencoderLoss, GANConfig, LPIPSConfig
from methods.base import DataSpec

WIDTHS = (4, 8, 8, 16, 16)  # a narrow VGG16 of the real layout: the widths are read from the file


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """A torchvision-layout VGG16 `features` state dict and lpips-layout linear weights, random, saved to files."""
    g = torch.Generator().manual_seed(0)
    vgg, lin, c_in = {}, {}, 3
    for k, stage in enumerate(VGG16_STAGES):
        for i in stage:
            vgg[f"features.{i}.weight"] = torch.randn(WIDTHS[k], c_in, 3, 3, generator=g) * (2.0 / (9 * c_in)) ** 0.5
            vgg[f"features.{i}.bias"] = torch.randn(WIDTHS[k], generator=g) * 0.1
            c_in = WIDTHS[k]
        lin[f"lin{k}.model.1.weight"] = torch.rand(1, WIDTHS[k], 1, 1, generator=g)
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # a whole vgg16 state dict: the classifier is ignored
    folder = tmp_path_factory.mktemp("lpips")
    torch.save(vgg, folder / "vgg16.pth")
    torch.save(lin, folder / "vgg.pth")
    return folder / "vgg16.pth", folder / "vgg.pth", vgg, lin


def lpips_config(files, weight: float = 1.0, frames: int = 1) -> LPIPSConfig:
    return LPIPSConfig(weight=weight, vgg_path=str(files[0]), linear_path=str(files[1]), frames=frames)


def reference_lpips(vgg: dict, lin: dict, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS written out from the definition with functional calls on the raw state dicts (no module code shared)."""
    shift = torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1)
    scale = torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1)
    total = torch.zeros(a.shape[0], dtype=torch.float64)
    ha, hb = (a - shift) / scale, (b - shift) / scale
    for k, stage in enumerate(VGG16_STAGES):
        if k:
            ha, hb = F.max_pool2d(ha, kernel_size=2, stride=2), F.max_pool2d(hb, kernel_size=2, stride=2)
        for i in stage:
            w, bias = vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"]
            ha, hb = F.relu(F.conv2d(ha, w, bias, padding=1)), F.relu(F.conv2d(hb, w, bias, padding=1))
        na = ha.double() / (ha.double().norm(dim=1, keepdim=True) + 1e-10)
        nb = hb.double() / (hb.double().norm(dim=1, keepdim=True) + 1e-10)
        per_pixel = torch.einsum("nchw,c->nhw", (na - nb) ** 2, lin[f"lin{k}.model.1.weight"].flatten().double())
        total += per_pixel.flatten(1).mean(dim=1)
    return total


def test_lpips_matches_the_definition_and_behaves_like_a_distance(lpips_files):
    loss = AutoencoderLoss(AELossConfig(lpips=lpips_config(lpips_files)), 3, (4, 32, 32))
    lp = loss.lpips
    g = torch.Generator().manual_seed(1)
    a = torch.rand(5, 3, 32, 32, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(5, 3, 32, 32, generator=g)).clamp(-1, 1)
    d = lp(a, b)
    assert torch.allclose(d.double(), reference_lpips(lpips_files[2], lpips_files[3], a, b), rtol=1e-4, atol=1e-6)
    assert torch.allclose(d, lp(b, a)) and lp(a, a).abs().max() < 1e-6  # symmetric, zero on identical images
    noise = torch.randn(5, 3, 32, 32, generator=g)
    dists = [lp(a, (a + s * noise).clamp(-1, 1)).mean().item() for s in (0.05, 0.1, 0.2, 0.4, 0.8)]
    assert all(x < y for x, y in zip(dists, dists[1:])), dists  # more corruption, larger distance
    assert not any(p.requires_grad for p in lp.parameters())
    assert not [k for k in loss.state_dict() if "convs" in k or "lins" in k]  # frozen weights stay out of checkpoints


def test_lpips_files_missing_or_wrong_name_the_key(lpips_files, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"method\.autoencoder\.loss\.lpips\.vgg_path is not set"):
        AutoencoderLoss(AELossConfig(lpips=LPIPSConfig(weight=1.0)), 3, (4, 32, 32))
    missing = LPIPSConfig(weight=1.0, vgg_path=str(lpips_files[0]), linear_path=str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match=r"lpips\.linear_path=.*nope\.pth: no such file"):
        AutoencoderLoss(AELossConfig(lpips=missing), 3, (4, 32, 32))
    torch.save({"lin0.model.1.weight": torch.ones(1, 3, 1, 1)}, tmp_path / "bad.pth")
    bad = LPIPSConfig(weight=1.0, vgg_path=str(lpips_files[0]), linear_path=str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match="lin0.model.1.weight of 4 channels"):
        AutoencoderLoss(AELossConfig(lpips=bad), 3, (4, 32, 32))
    with pytest.raises(ValueError, match="CMD's latent mode trains on MSE"):
        AutoencoderLoss(AELossConfig(lpips=lpips_config(lpips_files)), 4, (4, 8, 8), space="latent")


def test_reconstruction_loss_is_l1_on_pixels_and_mse_on_latents():
    x, y = torch.zeros(1, 3, 2, 4, 4), torch.full((1, 3, 2, 4, 4), 0.5)
    assert AutoencoderLoss(AELossConfig(), 3, (2, 4, 4))(x, y)["loss"].item() == pytest.approx(0.5)
    out = AutoencoderLoss(AELossConfig(), 4, (2, 4, 4), space="latent")(x, y)
    assert out["loss"].item() == pytest.approx(0.25) and "mse" in out


class TinyAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv3d(3, 4, 3, padding=1)
        self.unpatch = nn.Conv3d(4, 3, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.unpatch(torch.relu(self.enc(x))))


def gan_setup(**gan):
    torch.manual_seed(0)
    cfg = AELossConfig(gan=GANConfig(weight=0.5, channels=4, layers=1, **gan))
    x = torch.rand(2, 3, 6, 12, 12) * 2 - 1
    return TinyAE(), AutoencoderLoss(cfg, 3, (6, 12, 12)), x


def test_each_player_gets_only_its_own_gradient_and_the_adaptive_weight():
    ae, loss, x = gan_setup()
    x_hat = ae(x)
    out = loss(x, x_hat, ae.unpatch.weight)
    out["loss"].backward()
    # the discriminators' gradient is exactly that of their hinge loss on detached clips
    disc_grads = [p.grad.clone() for p in loss.disc.parameters()]
    for p in loss.disc.parameters():
        p.grad = None
    d_only = sum(0.5 * (F.relu(1 - loss._logits(k, x)).mean() + F.relu(1 + loss._logits(k, x_hat.detach())).mean())
                 for k in loss.disc)
    d_only.backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(disc_grads, loss.disc.parameters()))
    # the autoencoder's gradient is that of L1 + w * (-D(x_hat)), with taming's adaptive w
    ae_grads = [p.grad.clone() for p in ae.parameters()]
    ae.zero_grad()
    x_hat = ae(x)
    nll = (x_hat - x).abs().mean()
    g = sum(-loss._logits(k, x_hat).mean() for k in loss.disc)
    gn = torch.autograd.grad(nll, ae.unpatch.weight, retain_graph=True)[0].norm()
    ga = torch.autograd.grad(g, ae.unpatch.weight, retain_graph=True)[0].norm()
    w = (gn / (ga + 1e-4)).clamp(0, 1e4) * 0.5
    assert out["gan_weight"].item() == pytest.approx(w.item(), rel=1e-4)
    (nll + w.detach() * g).backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(ae_grads, ae.parameters()))


def test_the_adversarial_term_starts_at_its_step_and_the_step_survives_a_checkpoint():
    ae, loss, x = gan_setup(start=2)
    seen = []
    for _ in range(3):
        out = loss(x, ae(x), ae.unpatch.weight)
        out["loss"].backward()
        seen.append("g" in out)
    assert seen == [False, False, True] and int(loss.step) == 3
    assert all(p.grad is not None for p in loss.disc.parameters())  # used (zero gradient) before the start too
    with torch.no_grad():
        loss(x, ae(x), ae.unpatch.weight)  # evaluation does not count
    assert int(loss.step) == 3
    state = loss.state_dict()
    fresh = gan_setup(start=2)[1]
    fresh.load_state_dict(state)
    assert int(fresh.step) == 3
    del state["step"]  # weights stored before the loss module existed still load
    fresh.load_state_dict(state)


def test_the_discriminators_run_in_fp32_under_bf16_autocast_and_their_gradients_stay_finite():
    """PVDM's tiny setting (2D + 3D, 2 layers, 16x32x32 clips): in bf16 the 3D discriminator's last conv weight
    gradient came out non-finite on some CPUs in ~1 step in 12, and the autoencoder diverged to NaN."""
    torch.manual_seed(0)
    loss = AutoencoderLoss(AELossConfig(gan=GANConfig(weight=1.0, layers=2, channels=16)), 3, (16, 32, 32))
    for _ in range(8):
        x = torch.rand(2, 3, 16, 32, 32) * 2 - 1
        x_hat = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert all(loss._logits(k, x).dtype == torch.float32 for k in loss.disc)
            out = loss(x, x_hat)
        loss.zero_grad()
        out["loss"].backward()
        assert torch.isfinite(out["loss"]) and torch.isfinite(x_hat.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in loss.disc.parameters())


def test_a_discriminator_too_deep_for_the_clip_names_the_key():
    with pytest.raises(ValueError, match=r"3d PatchGAN of 3 layers needs every side >= 24.*gan\.layers"):
        AutoencoderLoss(AELossConfig(gan=GANConfig(weight=1.0, layers=3)), 3, (16, 32, 32))


def shapes_batch(n: int, frames: int, classes: int = 4):
    ds = ShapesDataset(ShapesConfig(frames=frames, resolution=16, num_classes=classes, train_size=8))
    return collate_items([ds[i] for i in range(n)])


@pytest.mark.parametrize("method", ["cmd", "pvdm"])
def test_the_papers_losses_train_the_autoencoder_stage_through_the_config(method, lpips_files):
    over = [f"method={method}", "scale=test", "method.autoencoder.loss.lpips.weight=1",
            f"method.autoencoder.loss.lpips.vgg_path={lpips_files[0]}",
            f"method.autoencoder.loss.lpips.linear_path={lpips_files[1]}",
            "method.autoencoder.loss.gan.weight=1", "method.autoencoder.loss.gan.channels=4",
            "method.autoencoder.loss.gan.layers=1", "method.autoencoder.loss.gan.kind=2d+3d"]
    cfg = load_config(over)
    spec = DataSpec(channels=3, frames=8, height=16, width=16, num_classes=4)
    torch.manual_seed(0)
    m = build_method(cfg, spec)
    params = m.stage_parameters("autoencoder")
    assert {id(p) for p in m.autoencoder_loss.disc.parameters()} <= {id(p) for p in params}
    frames = 2 * spec.frames if method == "pvdm" else spec.frames  # PVDM trains on items of two clips
    out = m.loss("autoencoder", shapes_batch(2, frames))
    assert {"loss", "l1", "lpips", "g", "d", "gan_weight"} <= set(out) and out["lpips"] > 0
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params if p.requires_grad)
    # the discriminators are their own optimiser group ("player"), clipped on their own
    groups = optimizer_groups(m, "autoencoder", 1e-3)
    assert [g["player"] for g in groups] == ["model", "discriminator"]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in m.autoencoder_loss.disc.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(params)


def test_each_player_is_clipped_on_its_own():
    a, b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(9))
    opt = torch.optim.AdamW([{"params": [a], "player": "model"}, {"params": [b], "player": "discriminator"}])
    a.grad, b.grad = torch.full((4,), 0.25), torch.full((9,), 10.0)  # norms 0.5 and 30
    norms = clip_by_player(opt, 1.0)
    assert norms == pytest.approx({"model": 0.5, "discriminator": 30.0})
    assert torch.allclose(a.grad, torch.full((4,), 0.25))  # under the limit: untouched (one joint norm would scale it by 1/30)
    assert b.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
