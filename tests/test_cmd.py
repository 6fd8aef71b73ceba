"""CMD: shapes through every module, the decomposition's invariants, conditioning, stages, sampling."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from datamodules.batch import collate_items
from datamodules.shapes import ShapesConfig, ShapesDataset
from methods import METHODS
from methods.base import Conditioning, DataSpec
from methods.cmd import CMD, AutoencoderConfig, CMDConfig, CMDSamplingConfig, MotionConfig, MotionDiT
from methods.image_prior import ImagePriorConfig
from methods.nets.transformer import DiTConfig
from methods.nets.unet import UNetConfig

FRAMES, RES, CLASSES = 4, 16, 4
DATA = DataSpec(channels=3, frames=FRAMES, height=RES, width=RES, num_classes=CLASSES, captions=True)


def tiny_config(**over) -> CMDConfig:
    cfg = CMDConfig(
        autoencoder=AutoencoderConfig(width=32, depth=1, heads=2, patch=2, motion_dim=4),
        image_prior=ImagePriorConfig(unet=UNetConfig(channels=[16, 32], attention=False), frames_per_video=2),
        motion=MotionConfig(dit=DiTConfig(width=32, depth=2, heads=2), patch=2, content_patch=4),
        sampling=CMDSamplingConfig(content_steps=2, motion_steps=3),
    )
    for key, value in over.items():
        node, *path = key.split(".")
        target = getattr(cfg, node) if path else cfg
        setattr(target, path[0] if path else node, value)
    return cfg


def shapes_batch(n: int = 4):
    ds = ShapesDataset(ShapesConfig(frames=FRAMES, resolution=RES, num_classes=CLASSES, train_size=16))
    return collate_items([ds[i] for i in range(n)])


def randomise(module: nn.Module, std: float = 0.2) -> None:
    """Perturb every parameter (zero-initialised layers would hide whether inputs reach the output)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)


def test_registered():
    assert METHODS["cmd"] is CMD


@pytest.mark.parametrize("init", ["image_prior", "scratch"])
@pytest.mark.parametrize("content", ["weighted", "mean"])
def test_shapes_through_every_stage(init, content):
    torch.manual_seed(0)
    cmd = CMD(tiny_config(**{"content.init": init, "autoencoder.content": content}), DATA)
    expected = ("image_prior", "autoencoder", "content", "motion") if init == "image_prior" else (
        "autoencoder", "content", "motion")
    assert cmd.stages == expected
    batch = shapes_batch()
    for stage in cmd.stages:
        cmd.on_stage_start(stage)
        out = cmd.loss(stage, batch)
        assert out["loss"].ndim == 0 and torch.isfinite(out["loss"]), stage
        assert cmd.num_parameters(stage) > 0
    content_frame, z = cmd.encode(batch.video)
    assert content_frame.shape == (4, 3, RES, RES)
    assert z.shape == (4, 4, FRAMES, RES // 2 + RES // 2) and z.abs().max() <= 1
    video = cmd.sample(3, Conditioning(label=torch.tensor([0, 1, 2])), steps=2, guidance=2.5,
                       generator=torch.Generator().manual_seed(0))
    assert video.shape == (3, *DATA.video_shape) and video.abs().max() <= 1
    rec = cmd.reconstruct(batch.video)
    assert rec.shape == batch.video.shape and rec.abs().max() <= 1


def test_content_weights_sum_to_one_over_time():
    torch.manual_seed(0)
    cmd = CMD(tiny_config(), DATA)
    randomise(cmd.autoencoder)
    content, _, weights = cmd.autoencoder.encode(shapes_batch().video)
    assert weights.shape == (4, 3, FRAMES, RES, RES)
    assert torch.allclose(weights.sum(dim=2), torch.ones_like(content), atol=1e-5)
    assert weights.min() >= 0
    assert weights.std(dim=2).max() > 1e-3  # genuinely per pixel / channel, not uniform


@pytest.mark.parametrize("content", ["weighted", "mean"])
def test_static_video_content_frame_is_its_frame(content):
    cmd = CMD(tiny_config(**{"autoencoder.content": content}), DATA)
    randomise(cmd.autoencoder)
    frame = shapes_batch().video[:, :, :1]  # (B, C, 1, H, W)
    static = frame.expand(-1, -1, FRAMES, -1, -1)
    content_frame, _, _ = cmd.autoencoder.encode(static)
    assert torch.allclose(content_frame, frame[:, :, 0], atol=1e-5)


def test_mean_content_is_the_average_frame():
    cmd = CMD(tiny_config(**{"autoencoder.content": "mean"}), DATA)
    video = shapes_batch().video
    content_frame, _, _ = cmd.autoencoder.encode(video)
    assert torch.allclose(content_frame, video.mean(dim=2), atol=1e-5)


def test_conditioning_reaches_the_motion_dit():
    torch.manual_seed(0)
    cmd = CMD(tiny_config(), DATA)
    randomise(cmd.motion)
    z_t = torch.randn(2, *cmd.motion_shape())
    t = torch.tensor([500, 500])
    content = torch.randn(2, 3, RES, RES)
    eps = cmd.motion(z_t, t, content, Conditioning(label=torch.tensor([0, 0])))
    other_label = cmd.motion(z_t, t, content, Conditioning(label=torch.tensor([1, 2])))
    other_content = cmd.motion(z_t, t, content.flip(-1), Conditioning(label=torch.tensor([0, 0])))
    other_time = cmd.motion(z_t, torch.tensor([10, 10]), content, Conditioning(label=torch.tensor([0, 0])))
    for changed in (other_label, other_content, other_time):
        assert (changed - eps).abs().max() > 1e-3
    # the null label (CFG) differs from a real one, and guidance moves the prediction away from it
    null = cmd.motion(z_t, t, content, Conditioning(label=torch.tensor([0, 0])), drop=torch.tensor([True, True]))
    assert (null - eps).abs().max() > 1e-3
    guided = cmd.motion.guided(Conditioning(label=torch.tensor([0, 0])), content, 3.0)(z_t, t)
    assert torch.allclose(guided, null + 3.0 * (eps - null), atol=1e-4)  # scale s: eps(null) + s (eps(c) - eps(null))


@pytest.mark.parametrize("grid", [(4, 8), (8, 16), (6, 10)])
def test_motion_dit_any_grid(grid):
    net = MotionDiT(MotionConfig(dit=DiTConfig(width=32, depth=1, heads=2), patch=2, content_patch=4), 4, 3)
    randomise(net)
    z = torch.randn(2, 4, *grid)
    out = net(z, torch.tensor([1, 2]), torch.randn(2, 3, 16, 8))
    assert out.shape == z.shape


def test_motion_dit_starts_at_zero():
    """adaLN-Zero: the final layer starts at zero, so the untrained model predicts eps = 0."""
    net = MotionDiT(MotionConfig(dit=DiTConfig(width=32, depth=2, heads=2)), 4, 3)
    out = net(torch.randn(2, 4, 4, 8), torch.tensor([1, 2]), torch.randn(2, 3, 16, 16))
    assert out.abs().max() == 0


def test_content_init_copies_the_image_prior():
    torch.manual_seed(0)
    cmd = CMD(tiny_config(), DATA)
    randomise(cmd.image_prior)
    before = [p.clone() for p in cmd.content.parameters()]
    cmd.on_stage_start("autoencoder")  # nothing happens before other stages
    assert all(torch.equal(a, b) for a, b in zip(before, cmd.content.parameters()))
    cmd.on_stage_start("content")
    for a, b in zip(cmd.image_prior.state_dict().values(), cmd.content.state_dict().values()):
        assert torch.equal(a, b)


def test_shared_stage_declaration():
    cmd = CMD(tiny_config(), DATA)
    assert cmd.shared_stages == {"image_prior": "image_prior"}
    key = cmd.shared_stage_config("image_prior")
    json.dumps(key)  # plain data, hashable by the runner
    other = CMD(tiny_config(**{"image_prior.frames_per_video": 3}), DATA).shared_stage_config("image_prior")
    assert key != other
    assert CMD(tiny_config(**{"content.init": "scratch"}), DATA).shared_stages == {}
    with pytest.raises(ValueError, match="image_prior"):
        cmd.shared_stage_config("motion")


@pytest.mark.parametrize("stage", ["image_prior", "autoencoder", "content", "motion"])
def test_plain_pytorch_loop_trains_each_stage(stage):
    """No Lightning: AdamW on stage_parameters(stage) lowers that stage's loss on a fixed batch."""
    torch.manual_seed(0)
    cmd = CMD(tiny_config(), DATA)
    batch = shapes_batch(4)
    params = cmd.stage_parameters(stage)
    opt = torch.optim.AdamW(params, lr=3e-3)
    cmd.on_stage_start(stage)

    def loss_at(seed: int) -> float:  # the diffusion loss is noisy: compare at a fixed noise draw
        torch.manual_seed(seed)
        with torch.no_grad():
            return sum(cmd.loss(stage, batch)["loss"].item() for _ in range(4))

    before = loss_at(123)
    frozen = {n: p.clone() for n, p in cmd.named_parameters() if all(p is not q for q in params)}
    for _ in range(30):
        loss = cmd.loss(stage, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_at(123) < before
    for n, p in cmd.named_parameters():  # other stages' weights are untouched
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_sampling_step_counts():
    """method.sampling's per-model steps win; None falls back to the run's steps (content) and 2x (motion)."""
    cmd = CMD(tiny_config(), DATA)
    calls = {"content": 0, "motion": 0}
    cmd.content.denoiser.backbone.register_forward_hook(lambda *_: calls.__setitem__("content", calls["content"] + 1))
    cmd.motion.net.register_forward_hook(lambda *_: calls.__setitem__("motion", calls["motion"] + 1))
    cond = Conditioning(label=torch.tensor([0, 1]))
    cmd.sample(2, cond, steps=7, guidance=2.0)
    assert calls == {"content": 2, "motion": 3}  # tiny_config: content_steps=2, motion_steps=3
    cmd.cfg.sampling = CMDSamplingConfig()
    calls.update(content=0, motion=0)
    cmd.sample(2, cond, steps=4, guidance=1.0)
    assert calls == {"content": 4, "motion": 8}


@pytest.mark.parametrize(("repeats", "content_repeats", "seen"), [
    (1, None, {"content": 4, "motion": 4}),
    (3, None, {"content": 12, "motion": 12}),
    (3, 1, {"content": 4, "motion": 12}),
    (1, 2, {"content": 8, "motion": 4}),
])
def test_latent_repeats_per_stage(repeats, content_repeats, seen):
    """latent_repeats draws that many noises per encoded clip; content.latent_repeats overrides it for content only."""
    cmd = CMD(tiny_config(latent_repeats=repeats, **{"content.latent_repeats": content_repeats}), DATA)
    rows = {}
    cmd.content.denoiser.backbone.register_forward_hook(lambda m, a, out: rows.__setitem__("content", out.shape[0]))
    cmd.motion.net.register_forward_hook(lambda m, a, out: rows.__setitem__("motion", out.shape[0]))
    batch = shapes_batch(4)
    for stage in ("content", "motion"):
        assert torch.isfinite(cmd.loss(stage, batch)["loss"])
    assert rows == seen


def test_text_conditioning():
    cfg = tiny_config(**{"image_prior.conditioning": "text", "motion.conditioning": "text", "content.init": "scratch"})
    cmd = CMD(cfg, DATA)
    batch = shapes_batch()
    for stage in cmd.stages:
        assert torch.isfinite(cmd.loss(stage, batch)["loss"])
    video = cmd.sample(2, Conditioning(text=batch.text[:2]), steps=2, guidance=2.0)
    assert video.shape == (2, *DATA.video_shape)


def test_bad_options_name_the_key():
    with pytest.raises(ValueError, match="content.init"):
        CMD(tiny_config(**{"content.init": "pretrained"}), DATA)
    with pytest.raises(ValueError, match="autoencoder.content"):
        CMD(tiny_config(**{"autoencoder.content": "median"}), DATA)
    with pytest.raises(ValueError, match="space=latent"):
        CMD(tiny_config(space="latent"), DATA)
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="method.content.latent_repeats"):
            CMD(tiny_config(**{"content.latent_repeats": bad}), DATA)
    with pytest.raises(ValueError, match="autoencoder.patch"):
        CMD(tiny_config(**{"autoencoder.patch": 3}), DATA).loss("autoencoder", shapes_batch())


def test_generation_probe_attributes_accuracy_and_its_reconstruction_pair_is_reconstruct():
    """benchmarks.probe_cmd's (real content, real z) decode is exactly `reconstruct`, scored by the shapes evaluator."""
    from benchmarks.common import build_datamodule, build_method, data_spec
    from benchmarks.config import load_config
    from benchmarks.probe_cmd import clips, generation_probe
    from evaluation.detectors import load_detector

    cfg = load_config(["method=cmd", "scale=test"])
    dm = build_datamodule(cfg)
    torch.manual_seed(0)
    method = build_method(cfg, data_spec(cfg, dm)).eval()
    val = clips(dm, "val", 6)
    names = [f"class{c}" for c in range(method.data.num_classes)]
    out = generation_probe(method, cfg, val, 6, batch=4, class_names=names)
    assert out["n"] == 6 and all(0 <= out[k] <= 1 for k in out if k not in ("n", "per_class"))
    det = load_detector("shapes")
    right = det.probs(method.reconstruct(val["video"])).argmax(-1) == val["label"]
    assert out["real_content_real_z"] == pytest.approx(right.float().mean().item())
    # per class: the same decodes, split by the clips' labels (a class without clips is None)
    per_class = out["per_class"]["real_content_real_z"]
    assert list(per_class) == names
    for c, name in enumerate(names):
        mine = right[val["label"] == c]
        assert per_class[name] == (None if len(mine) == 0 else pytest.approx(mine.float().mean().item()))
    for pair, acc in out["per_class"].items():  # the pairs' overall accuracy is their per-class accuracy, weighted
        weighted = sum(a * int((val["label"] == c).sum()) for c, a in enumerate(acc.values()) if a is not None) / 6
        assert out[pair] == pytest.approx(weighted)


# --- content.arch = dit: the official UCF-101 content model (a DiT from scratch) ----------------------------


def test_content_dit_shapes_conditioning_and_zero_start():
    from methods.cmd import ContentDiT
    from methods.nets.transformer import DiT

    torch.manual_seed(0)
    cmd = CMD(tiny_config(**{"content.arch": "dit", "content.init": "scratch"}), DATA)
    assert cmd.stages == ("autoencoder", "content", "motion")
    net = cmd.content.denoiser.backbone
    assert isinstance(net, ContentDiT) and isinstance(net.dit, DiT)  # the shared trunk, not a second transformer
    x_t, t = torch.randn(2, 3, RES, RES), torch.tensor([10, 900])
    assert cmd.content.denoiser(x_t, t, Conditioning(label=torch.tensor([0, 1]))).abs().max() == 0  # adaLN-Zero
    randomise(net)
    randomise(cmd.content.denoiser.embedder)
    eps = cmd.content.denoiser(x_t, t, Conditioning(label=torch.tensor([0, 1])))
    assert eps.shape == x_t.shape
    assert (cmd.content.denoiser(x_t, t, Conditioning(label=torch.tensor([2, 3]))) - eps).abs().max() > 1e-3
    with pytest.raises(ValueError, match="content.patch"):
        net(torch.randn(1, 3, 15, 16), torch.tensor([1]))


def test_content_dit_trains_and_samples():
    torch.manual_seed(0)
    cmd = CMD(tiny_config(**{"content.arch": "dit", "content.init": "scratch"}), DATA)
    batch = shapes_batch()
    params = cmd.stage_parameters("content")
    assert {id(p) for p in params} == {id(p) for p in cmd.content.denoiser.parameters()}
    opt = torch.optim.AdamW(params, lr=3e-3)
    for stage in cmd.stages:
        assert torch.isfinite(cmd.loss(stage, batch)["loss"]), stage
    before = [p.clone() for p in params]
    loss = cmd.loss("content", batch)["loss"]
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, params))
    video = cmd.sample(2, Conditioning(label=torch.tensor([0, 1])), steps=2, guidance=2.0)
    assert video.shape == (2, *DATA.video_shape) and video.abs().max() <= 1


def test_content_dit_options_name_the_key():
    with pytest.raises(ValueError, match="content.init=scratch"):
        CMD(tiny_config(**{"content.arch": "dit"}), DATA)
    with pytest.raises(ValueError, match="content.arch"):
        CMD(tiny_config(**{"content.arch": "transformer", "content.init": "scratch"}), DATA)


def test_ablation_sweep_budget_matches_pretrained_and_scratch():
    """The scratch content model gets the image prior's steps too; the default appears once."""
    from benchmarks.config import load_config, stage_settings
    from benchmarks.sweep import load_sweep

    spec = load_sweep("cmd_ablation")
    variants = [v for v in spec.variants if any(o.startswith("method.content.") for o in v)]
    assert variants and all("method.content.init=scratch" in v for v in variants)
    default = load_config([*spec.base])
    budget = stage_settings(default, "image_prior")["max_steps"] + stage_settings(default, "content")["max_steps"]
    for variant in variants:
        cfg = load_config([*spec.base, *variant])
        assert stage_settings(cfg, "content")["max_steps"] == budget, variant
    assert sum(v == [] or v == ["seed=0"] for v in spec.variants) == 1
