"""PVDM: tri-plane shapes, what each plane means in the decoder, cross-plane mixing, clip chaining."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from datamodules.batch import collate_items
from datamodules.shapes import ShapesConfig, ShapesDataset
from methods import METHODS
from methods.base import Conditioning, DataSpec
from methods.nets.triplane import Triplane, TriplaneUNet
from methods.nets.unet import UNetConfig
from methods.pvdm import PVDM, AutoencoderConfig, PVDMConfig

CLASSES = 4
# every side different (T = 3, h = 4, w = 2), so a swapped axis changes a shape
ODD = DataSpec(channels=3, frames=6, height=16, width=8, num_classes=CLASSES)
DATA = DataSpec(channels=3, frames=8, height=16, width=16, num_classes=CLASSES)  # T = h = w = 4


def tiny_config(**over) -> PVDMConfig:
    cfg = PVDMConfig(autoencoder=AutoencoderConfig(width=16, depth=1, heads=2, patch=4, latent_channels=3, proj_depth=1),
                     unet=UNetConfig(channels=[8, 16], heads=2))
    for key, value in over.items():
        node, *path = key.split(".")
        target = getattr(cfg, node) if path else cfg
        setattr(target, path[0] if path else node, value)
    return cfg


def randomise(module: nn.Module, std: float = 0.2) -> None:
    """Perturb every parameter (zero-initialised layers would hide whether inputs reach the output)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)


def shapes_batch(n: int = 2, frames: int = 8):
    ds = ShapesDataset(ShapesConfig(frames=frames, resolution=16, num_classes=CLASSES, train_size=8))
    return collate_items([ds[i] for i in range(n)])


def test_registered_with_two_stages():
    assert METHODS["pvdm"] is PVDM and PVDM.stages == ("autoencoder", "diffusion")


def test_planes_have_the_documented_shapes():
    torch.manual_seed(0)
    pvdm = PVDM(tiny_config(clip_frames=3, unet=UNetConfig(channels=[8], heads=2)), ODD)
    T, h, w = 3, 4, 2
    assert pvdm.layout == Triplane(T, h, w) and pvdm.clip_frames == 3
    x = torch.rand(2, 3, T, 16, 8) * 2 - 1
    u = pvdm.autoencoder.features(x)
    assert u.shape == (2, 16, T, h, w)
    z_s, z_h, z_w = pvdm.autoencoder.project(u)
    assert z_s.shape == (2, 3, h, w) and z_h.shape == (2, 3, T, w) and z_w.shape == (2, 3, T, h)
    z = pvdm.autoencoder.encode(x)
    assert z.shape == (2, 3, h * w + T * w + T * h) == (2, *pvdm.latent_shape)
    assert z.abs().max() < 1  # tanh
    assert all(torch.equal(a, b) for a, b in zip(pvdm.layout.split(z), (z_s, z_h, z_w)))
    assert torch.equal(pvdm.layout.join(pvdm.layout.split(z)), z)
    assert pvdm.autoencoder.decode(z).shape == x.shape


def test_each_plane_summarises_exactly_its_axis():
    """A change of u at one (t, h, w) reaches z_s only at (h, w), z_h only at (t, w), z_w only at (t, h)."""
    torch.manual_seed(0)
    ae = PVDM(tiny_config(clip_frames=3, unet=UNetConfig(channels=[8], heads=2)), ODD).autoencoder
    u = torch.randn(1, 16, 3, 4, 2)
    t0, h0, w0 = 1, 2, 1
    v = u.clone()
    v[:, :, t0, h0, w0] += torch.randn(16)  # not a constant: LayerNorm would remove that
    expected = [(h0, w0), (t0, w0), (t0, h0)]
    for a, b, where in zip(ae.project(u), ae.project(v), expected):
        changed = (a - b).abs().amax(dim=(0, 1)) > 1e-6  # (rows, cols) of this plane
        mask = torch.zeros_like(changed)
        mask[where] = True
        assert torch.equal(changed, mask), where


@pytest.mark.parametrize("plane", [0, 1, 2])
def test_a_plane_perturbation_changes_the_video_along_its_axis_only(plane):
    """With a depth-0 decoder (tokens are never mixed), each plane entry owns an exact set of pixels:
    z_s[h, w] the patch (h, w) in every frame; z_h[t, w] column band w of frame t; z_w[t, h] row band h of frame t.
    A plane broadcast over the wrong axis fails this."""
    torch.manual_seed(0)
    cfg = tiny_config(clip_frames=3, unet=UNetConfig(channels=[8], heads=2))
    cfg.autoencoder.decoder_depth = 0
    ae = PVDM(cfg, ODD).autoencoder
    randomise(ae)
    p, T = 4, 3
    planes = [torch.rand(1, 3, *s) * 2 - 1 for s in ae.layout.shapes]
    i, j = 1, 1  # one entry of the plane: (h, w), (t, w) or (t, h)
    moved = [q.clone() for q in planes]
    moved[plane][:, :, i, j] += 0.5
    a, b = (ae.decode(ae.layout.join(q)) for q in (planes, moved))
    changed = (a - b).abs().amax(dim=(0, 1)) > 1e-5  # (T, H, W)
    mask = torch.zeros(T, 16, 8, dtype=torch.bool)
    if plane == 0:
        mask[:, i * p:(i + 1) * p, j * p:(j + 1) * p] = True
    elif plane == 1:
        mask[i, :, j * p:(j + 1) * p] = True
    else:
        mask[i, j * p:(j + 1) * p, :] = True
    assert torch.equal(changed, mask)
    assert torch.equal(a[..., ~mask], b[..., ~mask])


@pytest.mark.parametrize("layout", [Triplane(4, 4, 4), Triplane(2, 4, 6)])
def test_cross_plane_attention_is_the_only_path_between_planes(layout):
    """Perturbing the s-plane input changes the h- and w-plane outputs with the attention, never without."""
    x = torch.randn(2, 4, layout.length)
    t = torch.tensor([10, 500])
    moved = layout.split(x)
    moved[0] = moved[0] + 1.0
    moved = layout.join(moved)
    for cross in (True, False):
        torch.manual_seed(0)
        net = TriplaneUNet(4, 2, UNetConfig(channels=[8, 16], heads=2), layout, cross_attention=cross)
        randomise(net)
        a, b = (layout.split(net(v, t)) for v in (x, moved))
        assert not torch.allclose(a[0], b[0])  # the perturbed plane itself always changes
        for k in (1, 2):
            if cross:
                assert (a[k] - b[k]).abs().max() > 1e-3, f"plane {k} did not see the s-plane"
            else:
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_without_cross_attention_each_plane_goes_through_the_shared_unet():
    layout = Triplane(2, 4, 6)
    torch.manual_seed(0)
    net = TriplaneUNet(4, 2, UNetConfig(channels=[8, 16], heads=2), layout, cross_attention=False)
    randomise(net)
    x, t, emb = torch.randn(2, 4, layout.length), torch.tensor([3, 700]), torch.randn(2, net.emb_dim)
    for out, plane in zip(layout.split(net(x, t, emb)), layout.split(x)):
        torch.testing.assert_close(out, net.unet(plane, t, emb), rtol=1e-5, atol=1e-5)


def test_plane_sides_must_suit_the_unet_depth():
    with pytest.raises(ValueError, match="divisible by 2"):
        TriplaneUNet(4, 2, UNetConfig(channels=[8, 16]), Triplane(3, 4, 4))


def test_training_clips_follow_the_previous_clip_rule():
    pvdm = PVDM(tiny_config(clip_frames=4, cond_prob=1.0), DATA)
    video = torch.randn(3, 3, 8, 16, 16)
    current, previous, conditioned = pvdm.training_clips(video)
    assert conditioned.all()
    assert torch.equal(current, video[:, :, 4:]) and torch.equal(previous, video[:, :, :4])
    pvdm.cfg.cond_prob = 0.0
    current, _, conditioned = pvdm.training_clips(video)  # clip_window=first: the item's first clip
    assert not conditioned.any() and torch.equal(current, video[:, :, :4])
    pvdm.cfg.clip_window = "random"  # the official random prefix
    torch.manual_seed(1)
    starts = set()
    for _ in range(20):
        current, _, conditioned = pvdm.training_clips(video)
        assert not conditioned.any()
        for v, c in zip(video, current):  # a window of 4 consecutive frames of its own item
            s = [s for s in range(5) if torch.equal(v[:, s:s + 4], c)]
            assert s
            starts.add(s[0])
    assert starts == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("cond_prob", [0.0, 1.0])
def test_the_denoiser_sees_the_previous_clips_latent_or_zeros(cond_prob):
    torch.manual_seed(0)
    pvdm = PVDM(tiny_config(clip_frames=4, cond_prob=cond_prob), DATA)
    batch = shapes_batch()
    seen = []
    pvdm.denoiser.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    out = pvdm.loss("diffusion", batch)
    assert torch.isfinite(out["loss"]) and out["conditioned"] == cond_prob
    z_prev = seen[0][:, 3:]  # the channels after z_t
    if cond_prob:
        torch.testing.assert_close(z_prev, pvdm.encode(batch.video[:, :, :4]))
    else:
        assert torch.equal(z_prev, torch.zeros_like(z_prev))


def test_stage_parameters_split_autoencoder_and_denoiser():
    pvdm = PVDM(tiny_config(), DATA)
    ae, dn = ({id(p) for p in pvdm.stage_parameters(s)} for s in pvdm.stages)
    assert ae and dn and not ae & dn and ae | dn == {id(p) for p in pvdm.parameters()}


def test_sample_long_chains_clips_on_the_previous_latent():
    torch.manual_seed(0)
    pvdm = PVDM(tiny_config(clip_frames=4), DATA)
    randomise(pvdm)
    pvdm.eval()
    cond = Conditioning(label=torch.tensor([0, 2]))
    kw = dict(steps=2, guidance=2.0, eta=1.0)
    long = pvdm.sample_long(2, cond, 3, generator=torch.Generator().manual_seed(0), **kw)
    assert long.shape == (2, 3, 3 * 4, 16, 16) and long.abs().max() <= 1
    # the same chain by hand: clip k is sampled given clip k-1's latent
    g = torch.Generator().manual_seed(0)
    z1 = pvdm.sample_latent(2, cond, None, generator=g, **kw)
    state = g.get_state()
    z2 = pvdm.sample_latent(2, cond, z1, generator=g, **kw)
    torch.testing.assert_close(long[:, :, :4], pvdm.autoencoder.decode(z1))
    torch.testing.assert_close(long[:, :, 4:8], pvdm.autoencoder.decode(z2))
    # the second clip depends on the first: same noise, another previous latent -> another clip
    g.set_state(state)
    other = pvdm.sample_latent(2, cond, -z1, generator=g, **kw)
    assert (other - z2).abs().max() > 1e-3
    # sample() is the data.frames-long chain; a context clip changes what follows it
    short = pvdm.sample(2, cond, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(short, long[:, :, :8])
    ctx = pvdm.sample_long(2, cond, 1, generator=torch.Generator().manual_seed(0), context=long[:, :, 8:], **kw)
    assert ctx.shape == (2, 3, 4, 16, 16) and (ctx - long[:, :, :4]).abs().max() > 1e-3


def test_reconstruct_works_clip_by_clip():
    torch.manual_seed(0)
    pvdm = PVDM(tiny_config(clip_frames=4), DATA)
    video = shapes_batch().video
    out = pvdm.reconstruct(video)
    assert out.shape == video.shape
    torch.testing.assert_close(out[:, :, 4:], pvdm.autoencoder(video[:, :, 4:]))


def test_invalid_clip_settings_name_the_key():
    with pytest.raises(ValueError, match="method.clip_frames"):
        PVDM(tiny_config(clip_frames=3), DATA)
    with pytest.raises(ValueError, match="method.cond_prob"):
        PVDM(tiny_config(cond_prob=1.5), DATA)
    with pytest.raises(ValueError, match="method.clip_window"):
        PVDM(tiny_config(clip_window="middle"), DATA)
    one_clip = PVDM(tiny_config(clip_frames=8, cond_prob=0.0), DATA)  # single-clip PVDM (no long-video training)
    assert one_clip.clip_frames == 8 and PVDM.training_frames(one_clip.cfg, DATA.frames) == 8


def test_default_clip_is_the_evaluated_length_and_training_items_hold_two_clips():
    """The default clip length is dataset.frames (sample() is one unconditioned clip: no clip boundary inside an
    evaluated video); the training loader yields previous clip + clip; the real set keeps dataset.frames."""
    from benchmarks.common import build_datamodule, build_method, data_spec
    from benchmarks.config import load_config

    for scale in ("test", "tiny", "paper"):
        cfg = load_config(["method=pvdm", f"scale={scale}"])
        assert cfg.method.clip_frames == 0 and cfg.method.cond_prob > 0
        assert PVDM.training_frames(cfg.method, cfg.dataset.frames) == 2 * cfg.dataset.frames
    cfg = load_config(["method=pvdm", "scale=test"])
    dm = build_datamodule(cfg)
    torch.manual_seed(0)
    pvdm = build_method(cfg, data_spec(cfg, dm))
    F = cfg.dataset.frames
    assert pvdm.clip_frames == F and pvdm.layout.frames == F
    batch = next(iter(dm.loader_for("train", batch_size=2)))
    assert batch.video.shape[2] == 2 * F and dm.dataset("train")[0]["video"].shape[1] == F
    torch.testing.assert_close(batch.video[:, :, :F], torch.stack([dm.dataset("train")[i]["video"] for i in range(2)]))
    assert torch.isfinite(pvdm.loss("diffusion", batch)["loss"]) and torch.isfinite(pvdm.loss("autoencoder", batch)["loss"])
    pvdm.eval()
    out = pvdm.sample(2, Conditioning(label=batch.label), steps=1, guidance=1.0)
    assert out.shape == (2, 3, F, cfg.dataset.resolution, cfg.dataset.resolution)
    # items of one clip cannot train the clip-conditional model: the error says how to get two
    with pytest.raises(ValueError, match="build_datamodule"):
        pvdm.loss("diffusion", type(batch)(video=batch.video[:, :, :F], label=batch.label, text=batch.text))
