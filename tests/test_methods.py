"""Every registered method honours the contract, from a plain PyTorch loop (no Lightning)."""

import pytest
import torch

from benchmarks.common import build_datamodule, build_method, data_spec, real_conditioning
from benchmarks.config import load_config
from methods import METHODS
from methods.base import Conditioning, VideoGenerator


def _setup(name: str):
    cfg = load_config([f"method={name}", "scale=test"])
    dm = build_datamodule(cfg)
    torch.manual_seed(0)
    method = build_method(cfg, data_spec(cfg, dm))
    batch = next(iter(dm.loader_for("train", batch_size=2)))
    return cfg, dm, method, batch


@pytest.mark.parametrize("name", sorted(METHODS))
def test_plain_pytorch_loop_trains_every_stage(name):
    _, _, method, batch = _setup(name)
    assert isinstance(method, VideoGenerator) and method.stages
    for stage in method.stages:
        if hasattr(method, "on_stage_start"):
            method.on_stage_start(stage)
        params = method.stage_parameters(stage)
        assert params, f"{name}.{stage} has no parameters"
        before = [p.detach().clone() for p in params]
        opt = torch.optim.Adam(params, lr=1e-2)
        out = method.loss(stage, batch)
        assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        changed = sum(not torch.equal(b, p) for b, p in zip(before, params))
        assert changed > 0, f"{name}.{stage}: one step changed no parameter"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_sample_shape_range_and_seed(name):
    cfg, dm, method, _ = _setup(name)
    cond = real_conditioning(dm, 2, first_frame=method.image_to_video)
    method.eval()
    a = method.sample(2, cond, steps=2, guidance=2.0, generator=torch.Generator().manual_seed(0))
    b = method.sample(2, cond, steps=2, guidance=2.0, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, *method.data.video_shape)
    assert a.min() >= -1 and a.max() <= 1 and torch.isfinite(a).all()
    assert torch.equal(a, b), "the same generator must give the same samples"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_reconstruct_when_there_is_an_autoencoder(name):
    _, _, method, batch = _setup(name)
    if not method.has_autoencoder:
        with pytest.raises(NotImplementedError):
            method.reconstruct(batch.video)
        return
    out = method.reconstruct(batch.video)
    assert out.shape == batch.video.shape and out.min() >= -1 and out.max() <= 1


@pytest.mark.parametrize("name", sorted(METHODS))
def test_class_condition_reaches_the_samples(name):
    _, _, method, batch = _setup(name)
    # make the conditioning path non-trivial: zero-initialised output layers would hide it
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.05 * torch.randn_like(p))
    method.eval()
    base = real_conditioning_for(method, batch)
    a = method.sample(2, base, steps=2, guidance=1.0, generator=torch.Generator().manual_seed(0))
    flipped = Conditioning(label=(base.label + 1) % method.data.num_classes, text=base.text,
                           first_frame=base.first_frame)
    b = method.sample(2, flipped, steps=2, guidance=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, b), "changing the class label did not change the samples"


def real_conditioning_for(method, batch) -> Conditioning:
    return Conditioning(label=batch.label, text=batch.text, first_frame=batch.first_frame if method.image_to_video else None)
