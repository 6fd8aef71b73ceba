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
def test_long_videos_chain_clips_on_the_last_generated_frame(name):
    method, batch = _build(name)
    _perturb(method)
    method.eval()
    T = method.data.frames
    cond = Conditioning(label=batch.label, first_frame=batch.first_frame)
    kw = dict(steps=2, guidance=2.0)
    long = method.sample_long(2, cond, 3, generator=torch.Generator().manual_seed(0), **kw)
    assert long.shape[2] == 3 * T and method.long_video
    # written out: clip k + 1 is sampled from clip k's last frame, with the generator's state running on
    g = torch.Generator().manual_seed(0)
    video = method.sample(2, cond, generator=g, **kw)
    while video.shape[2] < 3 * T:
        nxt = Conditioning(label=batch.label, first_frame=video[:, :, -1])
        video = torch.cat([video, method.sample(2, nxt, generator=g, **kw)[:, :, 1:]], dim=2)
    assert torch.equal(long, video[:, :, :3 * T])
    assert torch.equal(method.sample_long(2, cond, 1, generator=torch.Generator().manual_seed(0), **kw),
                       method.sample(2, cond, generator=torch.Generator().manual_seed(0), **kw))


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


def _space_to_depth_coder(method, b: int, bias: float = 0.0) -> None:
    """Residuals through unchanged (space-to-depth as the 'autoencoder'), decoded with `bias` added: a coder
    whose error on every residual pixel is exactly `bias` (lossless at 0)."""
    method.autoencoder.encode = lambda r: rearrange(r, "n c (h p) (w q) -> n (c p q) h w", p=b, q=b)
    method.autoencoder.decode = lambda lat: rearrange(lat, "n (c p q) h w -> n c (h p) (w q)", p=b, q=b) + bias


@pytest.mark.parametrize("loop", ["open", "closed"])
def test_edvdm_reconstruct_is_lossless_through_the_codec_path_with_a_lossless_residual_coder(loop):
    """With residuals passed through unchanged, the full path decompose -> pack -> unpack -> recursive
    decoding returns the clip, in either loop."""
    b = 4
    method, batch = _build("edvdm", f"method.codec.block={b}", f"method.residual_autoencoder.latent_channels={3 * b * b}",
                           f"method.codec.loop={loop}")
    _space_to_depth_coder(method, b)
    out = method.reconstruct(batch.video)
    assert out.shape == batch.video.shape and torch.allclose(out, batch.video, atol=1e-6)


def test_closed_loop_residuals_are_taken_against_the_decoded_previous_frame():
    """A coder that adds 0.005 to every residual pixel: in the closed loop each decoded frame is off by its own
    0.005 and the next residual corrects it (R_i closed = R_i open - 0.005); in the open loop the decoder
    carries every earlier error forward (frame i off by 0.005 i). Residuals against the original frame fail it."""
    b, bias = 4, 0.005
    video = None
    errors, residuals = {}, {}
    for loop in ("open", "closed"):
        method, batch = _build("edvdm", f"method.codec.block={b}",
                               f"method.residual_autoencoder.latent_channels={3 * b * b}", f"method.codec.loop={loop}")
        _space_to_depth_coder(method, b, bias)
        video = 0.9 * batch.video  # pixels within +-0.9: no clamping within (T - 1) * bias
        assert video.max() < 1 - (video.shape[2] - 1) * bias
        recon = method.reconstruct(video)
        errors[loop] = (recon - video).mean(dim=(0, 1, 3, 4))  # signed mean error per frame (T,)
        residuals[loop] = method.decompose(video)[1]
        if loop == "closed":
            torch.testing.assert_close(recon[:, :, 1:] - video[:, :, 1:], torch.full_like(video[:, :, 1:], bias),
                                       rtol=0, atol=1e-5)  # every pixel of every P-frame: its own error only
            mv, r, latent = method.encode_video(video)  # the denoiser's target decodes to the same frames
            torch.testing.assert_close(method.decode(video[:, :, 0], method.pack(mv, latent)), recon)
    T = video.shape[2]
    torch.testing.assert_close(errors["open"], bias * torch.arange(T, dtype=torch.float32), rtol=0, atol=1e-5)
    torch.testing.assert_close(errors["closed"][1:], torch.full((T - 1,), bias), rtol=0, atol=1e-5)
    torch.testing.assert_close(residuals["closed"][:, :, 0], residuals["open"][:, :, 0])  # x^_1 = x_1: the same
    torch.testing.assert_close(residuals["closed"][:, :, 1:], residuals["open"][:, :, 1:] - bias, rtol=0, atol=1e-5)


def test_closed_loop_stages_train_on_closed_loop_residuals():
    """Stage 1 trains the autoencoder on the residuals its own round trip leaves; stage 2's target encodes them."""
    method, batch = _build("edvdm", "method.codec.loop=closed")
    _perturb(method)
    seen = []
    handle = method.autoencoder.enc.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    out = method.loss("residual_autoencoder", batch)
    handle.remove()
    _, r_closed, _ = method.encode_video(batch.video)
    frames = rearrange(r_closed, "b c t h w -> (b t) c h w")
    torch.testing.assert_close(seen[-1], frames)  # the trained forward pass saw the closed-loop residuals
    _, r_open = codec.decompose(batch.video, method.cfg.codec.block, method.cfg.codec.search)
    assert (r_closed - r_open.float()).abs().max() > 1e-3  # and they are not the open-loop ones (a lossy AE)
    assert _touched(_grads(out["loss"], method.stage_parameters("residual_autoencoder")))
    den = method.loss("denoiser", batch)["loss"]
    assert torch.isfinite(den) and not _touched(_grads(den, method.stage_parameters("residual_autoencoder")))


def test_edvdm_default_loop_is_closed():
    from methods.dvdm import EDVDMConfig

    assert EDVDMConfig().codec.loop == "closed" and load_config(["method=edvdm"]).method.codec.loop == "closed"


@pytest.mark.parametrize("loop", ["open", "closed"])
def test_edvdm_reconstruct_uses_the_residual_autoencoder(loop):
    method, batch = _build("edvdm", f"method.codec.loop={loop}")
    video = batch.video
    if loop == "closed":
        code = lambda r: method.autoencoder(r.float())  # noqa: E731
        _, _, expected = codec.decompose_closed_loop(video, method.cfg.codec.block, method.cfg.codec.search, code)
        assert torch.allclose(method.reconstruct(video), expected.float(), atol=1e-5)
        return
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
    ("method.codec.loop=half", "method.codec.loop"),
    ("method.codec.match=next", "method.codec.match"),
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
