"""The shared image prior: lean UNet prior, frame sampling, diffusers loading, CMD in latent mode."""

from __future__ import annotations

import pytest
import torch

from methods.base import Conditioning, DataSpec
from methods.image_prior import ImagePrior, ImagePriorConfig, random_frames, repeat_conditioning
from methods.nets.unet import UNetConfig

DATA = DataSpec(channels=3, frames=4, height=16, width=16, num_classes=3)


def test_random_frames_order_and_conditioning():
    video = torch.arange(2 * 5, dtype=torch.float32).view(2, 1, 5, 1, 1).expand(2, 3, 5, 4, 4)  # frame id per clip
    frames = random_frames(video, 3, torch.Generator().manual_seed(0))
    assert frames.shape == (6, 3, 4, 4)
    assert (frames[:3] < 5).all() and (frames[3:] >= 5).all()  # clip-major: first clip's frames first
    cond = repeat_conditioning(Conditioning(label=torch.tensor([4, 7]), text=["a", "b"]), 3)
    assert cond.label.tolist() == [4, 4, 4, 7, 7, 7] and cond.text == ["a"] * 3 + ["b"] * 3


def test_lean_prior_loss_and_sample():
    torch.manual_seed(0)
    prior = ImagePrior(ImagePriorConfig(unet=UNetConfig(channels=[16, 32], attention=False)), DATA)
    assert prior.vae is None and prior.image_shape == (3, 16, 16)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    assert torch.equal(prior.encode(x0), x0)
    loss = prior.loss(x0, Conditioning(label=torch.tensor([0, 1, 2, 0])))
    assert loss.ndim == 0 and torch.isfinite(loss)
    out = prior.sample(2, Conditioning(label=torch.tensor([0, 1])), steps=2, guidance=3.0,
                       generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 16, 16) and out.abs().max() <= 1


def test_missing_diffusers_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="method.image_prior.diffusers_path"):
        ImagePrior(ImagePriorConfig(diffusers_path=str(tmp_path / "nowhere")), DATA)


@pytest.fixture(scope="module")
def tiny_diffusers(tmp_path_factory):
    """A tiny UNet2DConditionModel + AutoencoderKL saved like a Stable Diffusion snapshot (unet/, vae/)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sd_tiny")
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).save_pretrained(root / "unet")
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
    ).save_pretrained(root / "vae")
    return root


def test_diffusers_prior_loads_and_runs(tiny_diffusers):
    prior = ImagePrior(ImagePriorConfig(diffusers_path=str(tiny_diffusers)), DATA)
    assert prior.vae is not None and prior.image_shape == (4, 8, 8)  # the tiny VAE downsamples by 2
    assert all(not p.requires_grad for p in prior.vae.parameters())
    assert all(p.requires_grad for p in prior.trainable_parameters())
    frames = torch.rand(2, 3, 16, 16) * 2 - 1
    x0 = prior.encode(frames)
    assert x0.shape == (2, 4, 8, 8)
    loss = prior.loss(x0, Conditioning(label=torch.tensor([0, 1])))
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None for p in prior.trainable_parameters())
    img = prior.decode(prior.sample(2, Conditioning(label=torch.tensor([0, 1])), steps=2, guidance=2.0))
    assert img.shape == (2, 3, 16, 16) and img.abs().max() <= 1


def test_cmd_latent_mode_with_diffusers_prior(tiny_diffusers):
    from datamodules.batch import VideoBatch
    from methods.cmd import CMD, AutoencoderConfig, CMDConfig, CMDSamplingConfig, MotionConfig
    from methods.nets.transformer import DiTConfig

    cfg = CMDConfig(space="latent", autoencoder=AutoencoderConfig(width=32, depth=1, heads=2, patch=2, motion_dim=4),
                    image_prior=ImagePriorConfig(diffusers_path=str(tiny_diffusers)),
                    motion=MotionConfig(dit=DiTConfig(width=32, depth=1, heads=2), patch=2, content_patch=2),
                    sampling=CMDSamplingConfig(content_steps=2, motion_steps=2))
    cmd = CMD(cfg, DATA)
    video = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    batch = VideoBatch(video, torch.tensor([0, 1]))
    for stage in cmd.stages:
        cmd.on_stage_start(stage)
        assert torch.isfinite(cmd.loss(stage, batch)["loss"]), stage
    content, z = cmd.encode(video)
    assert content.shape == (2, 4, 8, 8) and z.shape == (2, 4, 4, 8)  # z over the 4x4 latent patch grid
    out = cmd.sample(2, Conditioning(label=torch.tensor([0, 1])), steps=2, guidance=2.0)
    assert out.shape == (2, 3, 4, 16, 16) and out.abs().max() <= 1
    assert cmd.reconstruct(video).shape == video.shape
