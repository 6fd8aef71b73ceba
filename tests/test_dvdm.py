"""D-VDM and ED-VDM: their targets, their first-frame conditioning, stage separation and the codec decoding path."""

import pytest
import torch
from einops import rearrange

from benchmarks.common import build_datamodule, build_method, data_spec
from benchmarks.config import load_config
from datamodules.shapes import ShapesConfig, ShapesDataset
from methods import codec
from methods.base import Conditioning
from methods.dvdm import DVDM, EDVDM, MV_CHANNELS, DVDMConfig


def _build(name: str, *overrides: str):
    cfg = load_config([f"method={name}", "scale=test", *overrides])
    dm = build_datamodule(cfg)
    torch.manual_seed(0)
    method = build_method(cfg, data_spec(cfg, dm))
    batch = next(iter(dm.loader_for("train", batch_size=2)))
    return method, batch


def _perturb(method) -> None:
    """Make zero-initialised output layers non-trivial so conditioning paths show in the outputs."""
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.05 * torch.randn_like(p))


def _grads(loss, params) -> list:
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


def _touched(grads) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in grads)


def test_dvdm_target_is_the_scaled_difference_to_the_first_frame_and_inverts():
    method, batch = _build("dvdm")
    video = batch.video
    d = method.differences(video)  # (B, C, T-1, H, W)
    assert d.shape == (2, 3, video.shape[2] - 1, *video.shape[-2:])
    assert torch.allclose(d[:, :, 2], method.cfg.difference_scale * (video[:, :, 3] - video[:, :, 0]))
    assert torch.allclose(method.compose(video[:, :, 0], d), video, atol=1e-6)


def test_dvdm_default_difference_scale_makes_the_target_about_unit_variance():
    ds = ShapesDataset(ShapesConfig(frames=16, resolution=32), "train")
    video = torch.stack([ds[i]["video"] for i in range(64)])
    scale = DVDMConfig().difference_scale
    std = (scale * (video[:, :, 1:] - video[:, :, :1])).std()
    assert 0.8 < std < 1.25, std  # documented: std(x_i - x_1) = 0.39 on shapes 32x32x16


@pytest.mark.parametrize("name", ["dvdm", "edvdm"])
def test_first_frame_encoder_trains_jointly_with_the_denoiser(name):
    method, batch = _build(name)
    assert method.image_to_video
    params = method.stage_parameters("denoiser")
    encoder = list(method.encoder.parameters())
    assert encoder and {id(p) for p in encoder} <= {id(p) for p in params}
    _perturb(method)  # the UNet's zero-initialised output layer blocks every upstream gradient at step 0
    out = method.loss("denoiser", batch)
    assert _touched(_grads(out["loss"], encoder)) and _touched(_grads(out["loss"], list(method.denoiser.parameters())))


@pytest.mark.parametrize("name", ["dvdm", "edvdm"])
def test_identity_first_frame_encoder_has_no_parameters_and_trains(name):
    method, batch = _build(name, "method.first_frame_encoder=identity")
    assert not list(method.encoder.parameters())
    C = method.data.channels
    factor = method.cfg.codec.block if name == "edvdm" else 1
    assert method.encoder.out_channels == C * factor**2
    _perturb(method)
    out = method.loss("denoiser", batch)
    assert torch.isfinite(out["loss"]) and _touched(_grads(out["loss"], method.stage_parameters("denoiser")))


@pytest.mark.parametrize("name", ["dvdm", "edvdm"])
def test_samples_start_from_the_given_first_frame_and_depend_on_it(name):
    method, batch = _build(name)
    _perturb(method)
    method.eval()
    first = batch.first_frame
    cond = Conditioning(label=batch.label, first_frame=first)
    a = method.sample(2, cond, steps=2, guidance=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a[:, :, 0], first.clamp(-1, 1))
    # the denoiser sees the first frame through E(x_1): another first frame gives another generated target
    other = Conditioning(label=batch.label, first_frame=first.flip(-1))
    za = method.generate(first, cond, 2, 1.0, torch.Generator().manual_seed(0), 0.0)
    zb = method.generate(other.first_frame, other, 2, 1.0, torch.Generator().manual_seed(0), 0.0)
    assert not torch.allclose(za, zb)


@pytest.mark.parametrize("name", ["dvdm", "edvdm"])
def test_sampling_without_a_first_frame_says_what_is_missing(name):
    method, batch = _build(name)
    with pytest.raises(ValueError, match="first_frame"):
        method.sample(2, Conditioning(label=batch.label), steps=2, guidance=1.0)


def test_edvdm_target_packs_normalised_motion_vectors_and_residual_latents():
    method, batch = _build("edvdm")
    b, S = method.cfg.codec.block, method.cfg.codec.search
    mv, r = method.decompose(batch.video)
    latent = method.encode_residuals(r)
    z = method.pack(mv, latent)
    C, T, H, W = method.data.video_shape
    assert z.shape == (2, *method.target_shape) == (2, 2 + method.cfg.residual_autoencoder.latent_channels,
                                                     T - 1, H // b, W // b)
    assert z.abs().max() <= 1
    # generated motion vectors are continuous: anything within half a step of S * mv rounds back to it
    jitter = torch.rand(z.shape, generator=torch.Generator().manual_seed(0)) * 0.98 - 0.49
    jitter[:, MV_CHANNELS:] = 0  # only the motion-vector channels are jittered
    mv_back, latent_back = method.unpack(z + jitter / S)
    assert torch.equal(mv_back, mv) and torch.equal(latent_back, latent)
    mv_far, _ = method.unpack(torch.full_like(z, 5.0))
    assert mv_far.max() == S  # out-of-range values clamp to the search window


def test_edvdm_reconstruct_is_lossless_through_the_codec_path_with_a_lossless_residual_coder():
    """With residuals passed through unchanged (space-to-depth as the 'autoencoder'), the full path
    decompose -> pack -> unpack -> recursive decoding returns the clip."""
    b = 4
    method, batch = _build("edvdm", f"method.codec.block={b}", f"method.residual_autoencoder.latent_channels={3 * b * b}")
    method.autoencoder.encode = lambda r: rearrange(r, "n c (h p) (w q) -> n (c p q) h w", p=b, q=b)
    method.autoencoder.decode = lambda lat: rearrange(lat, "n (c p q) h w -> n c (h p) (w q)", p=b, q=b)
    out = method.reconstruct(batch.video)
    assert out.shape == batch.video.shape and torch.allclose(out, batch.video, atol=1e-6)


def test_edvdm_reconstruct_uses_the_residual_autoencoder():
    method, batch = _build("edvdm")
    video = batch.video
    mv, r = codec.decompose(video, method.cfg.codec.block, method.cfg.codec.search)
    frames = rearrange(r.float(), "b c t h w -> (b t) c h w")
    with torch.no_grad():
        r_hat = rearrange(method.autoencoder(frames), "(b t) c h w -> b c t h w", b=video.shape[0])
    expected = codec.reconstruct(video[:, :, 0], mv, r_hat, method.cfg.codec.block, clamp=1.0)
    assert torch.allclose(method.reconstruct(video), expected, atol=1e-5)


def test_edvdm_stages_train_separate_parameters():
    method, batch = _build("edvdm")
    ae = method.stage_parameters("residual_autoencoder")
    den = method.stage_parameters("denoiser")
    assert not {id(p) for p in ae} & {id(p) for p in den}
    _perturb(method)  # with the UNet's zero-initialised output no gradient would flow back at all
    ae_loss = method.loss("residual_autoencoder", batch)["loss"]
    assert _touched(_grads(ae_loss, ae)) and not _touched(_grads(ae_loss, den))
    den_loss = method.loss("denoiser", batch)["loss"]
    assert den_loss.requires_grad and not _touched(_grads(den_loss, ae))  # the autoencoder is frozen there


@pytest.mark.parametrize("override,match", [
    ("method.codec.block=3", "power of 2"),
    ("method.codec.search=0", "search"),
    ("method.first_frame_encoder=vae", "first_frame_encoder"),
])
def test_edvdm_rejects_bad_codec_and_encoder_options(override, match):
    with pytest.raises(ValueError, match=match):
        _build("edvdm", override)


def test_dvdm_rejects_a_non_positive_difference_scale():
    with pytest.raises(ValueError, match="difference_scale"):
        _build("dvdm", "method.difference_scale=0")


def test_registry_names_both_methods():
    from methods import METHODS
    from methods.base import VideoGenerator

    assert METHODS["dvdm"] is DVDM and METHODS["edvdm"] is EDVDM
    assert DVDM.stages == ("denoiser",) and EDVDM.stages == ("residual_autoencoder", "denoiser")
    assert DVDM.reconstruct is VideoGenerator.reconstruct  # D-VDM has no autoencoder: no reconstruction FVD
    assert EDVDM.reconstruct is not VideoGenerator.reconstruct
