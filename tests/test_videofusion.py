"""VideoFusion's decomposed noise and its stop-gradient, checked against the paper's closed forms."""

import pytest
import torch

from benchmarks.common import build_datamodule, build_method, data_spec
from benchmarks.config import load_config


def _build(*overrides):
    cfg = load_config(["method=videofusion", "scale=test", "method.lam=0.64", *overrides])
    dm = build_datamodule(cfg)
    torch.manual_seed(0)
    return build_method(cfg, data_spec(cfg, dm)), dm


@pytest.fixture(scope="module")
def vf():
    return _build("method.image_prior.diffusion.objective=eps")


@pytest.fixture(scope="module", params=["eps", "v"])
def vf_objective(request):
    return _build(f"method.image_prior.diffusion.objective={request.param}")


def test_noise_marginals_and_correlations(vf):
    method, _ = vf
    like = torch.empty(4000, 1, 8, 2, 2)
    eps = method.noise(like, torch.Generator().manual_seed(0))  # (N, 1, T, 2, 2)
    flat = eps.permute(2, 0, 1, 3, 4).reshape(8, -1)  # (T, samples)
    corr = torch.corrcoef(flat)
    k = method.key
    assert flat.var(1) == pytest.approx(torch.ones(8), abs=0.05)  # every frame's marginal is N(0, 1)
    lam = method.lam
    expected = (lam[:, None] * lam[None]).sqrt()  # corr(eps_i, eps_j) = sqrt(lam_i lam_j), i != j
    off = ~torch.eye(8, dtype=torch.bool)
    assert torch.allclose(corr[off], expected[off], atol=0.05)
    assert lam[k] == 1 and torch.allclose(lam[torch.arange(8) != k], torch.tensor(0.64))


def test_base_generator_learns_only_from_the_key_frame(vf_objective):
    method, dm = vf_objective
    batch = next(iter(dm.loader_for("train", batch_size=2)))
    method.on_stage_start("video")
    torch.manual_seed(1)
    out = method.loss("video", batch)
    base_params = method.base.trainable_parameters()
    assert out["loss_residual"].requires_grad
    grads_res = torch.autograd.grad(out["loss_residual"], base_params, allow_unused=True, retain_graph=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads_res), "the residual loss reached z_b"
    res_params = [p for p in method.residual.parameters() if p.requires_grad]
    grads_r = torch.autograd.grad(out["loss_residual"], res_params, allow_unused=True, retain_graph=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads_r)
    grads_base = torch.autograd.grad(out["loss_base"], base_params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads_base)


@pytest.mark.parametrize("t", [0, 300, 999])
def test_v_outputs_convert_exactly_to_the_decomposed_noise(vf_objective, t):
    """Both networks outputting their exact targets make eq. 10 reproduce the true eps of every frame, for any
    b_hat (z_r's target absorbs z_b's error, as the eps loss's optimum does), under either objective."""
    import methods.diffusion as D

    method, _ = vf_objective
    g = torch.Generator().manual_seed(t)
    x0 = torch.rand((3, 1, 8, 4, 4), generator=g, dtype=torch.float64) * 2 - 1
    eps = method.noise(x0, g)
    tt = torch.full((3,), t)
    x_t = D.q_sample(x0, tt, method.alpha_bar, eps)
    k, lam = method.key, method._lam(x0)
    # z_b's exact output converts to b = eps_k
    out_base = D.training_target(x0[:, :, k], tt, eps[:, :, k], method.alpha_bar, method.objective)
    b = D.to_eps(out_base, x_t[:, :, k], tt, method.alpha_bar, method.objective)
    torch.testing.assert_close(b, eps[:, :, k])
    b_hat = b + 0.1 * torch.randn(b.shape, generator=g, dtype=b.dtype)  # an imperfect base generator
    x_res = method._remove_base(x_t, tt, b_hat)
    others = torch.arange(8) != k
    lam_o = lam[:, :, others]
    r_star = (eps[:, :, others] - lam_o.sqrt() * b_hat[:, :, None]) / (1 - lam_o).sqrt()
    w = method.residual_target(x0[:, :, others], r_star, tt, lam_o)
    r_hat = method.residual_noise(w, x_res[:, :, others], tt, lam_o)
    eps_hat = lam_o.sqrt() * b_hat[:, :, None] + (1 - lam_o).sqrt() * r_hat
    torch.testing.assert_close(eps_hat, eps[:, :, others])
    if method.objective == "v":  # the target is the residual diffusion's v: a bounded mix of noise and x0
        a = method.alpha_bar[t].item()
        s = (1 - lam_o).sqrt() * (1 - a) ** 0.5
        n = (a + s * s).sqrt()
        torch.testing.assert_close(w, (a**0.5 * r_star - s * x0[:, :, others]) / n)


def test_guided_sampling_under_either_objective_returns_finite_frames(vf_objective):
    """eq. 10 assembled from converted outputs (guided in both generators) drives DDIM to finite pixels."""
    from methods.base import Conditioning

    method, _ = vf_objective
    method.eval()
    x = method.sample(2, Conditioning(label=torch.arange(2)), steps=3, guidance=3.0,
                      generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 8, 16, 16) and torch.isfinite(x).all() and x.abs().max() <= 1


def test_objective_x0_is_refused_with_the_key_to_set():
    with pytest.raises(ValueError, match="method.image_prior.diffusion.objective='x0'.*eps or v"):
        _build("method.image_prior.diffusion.objective=x0")


def test_base_fine_tunes_with_a_smaller_learning_rate(vf):
    method, _ = vf
    groups = method.stage_param_groups("video")
    scales = sorted(g["lr_scale"] for g in groups)
    assert scales == [method.cfg.base_lr_scale, 1.0]
    base_ids = {id(p) for p in method.base.parameters()}
    slow = next(g for g in groups if g["lr_scale"] == method.cfg.base_lr_scale)
    assert {id(p) for p in slow["params"]} <= base_ids


def test_shares_the_image_prior_cache_key_with_cmd():
    """Same prior config, data and budget -> one cache entry (CMD's tiny prior, for VideoFusion its schedule unshifted,
    CMD's width and heads, and CMD's steps); VideoFusion's own tiny prior (SNR shift 4, 340 steps) is a different entry."""
    from benchmarks.config import stage_settings
    from benchmarks.run import shared_stage_cache

    def key(*overrides):
        cfg = load_config(["scale=tiny", *overrides])
        method = build_method(cfg, data_spec(cfg, build_datamodule(cfg)))
        return shared_stage_cache(cfg, method, "image_prior", stage_settings(cfg, "image_prior"))

    as_cmd = ("method.image_prior.diffusion.snr_shift=1", "stages.image_prior.max_steps=150",
              "method.image_prior.unet.channels=[16,32]", "method.image_prior.unet.heads=1")
    assert key("method=cmd") == key("method=videofusion", *as_cmd), "CMD and VideoFusion must reuse one prior"
    assert key("method=cmd") != key("method=videofusion")
    eps = ("method.image_prior.diffusion.objective=eps", "method.image_prior.diffusion.schedule=linear")
    assert key("method=cmd", *eps) == key("method=videofusion", *eps, *as_cmd)
    assert key("method=cmd", *eps) != key("method=cmd")  # a different prior config is a different cache entry


def test_clip_x0_reaches_the_ddim_sampler_and_changes_pixel_samples(vf, monkeypatch):
    """method.clip_x0 > 0: every DDIM step's x0 estimate is clamped to [-clip_x0, clip_x0] (pixel space)."""
    import methods.diffusion as D
    from methods.base import Conditioning

    method, _ = vf
    seen, last = [], {}
    real_step = D.ddim_step

    def spy(eps, x, t, t_prev, alpha_bar, **kw):  # the x0 each step moves towards
        seen.append(D.x0_from_eps(x, t, eps, alpha_bar).abs().max().item())
        last[method.cfg.clip_x0] = x
        return real_step(eps, x, t, t_prev, alpha_bar, **kw)

    monkeypatch.setattr(D, "ddim_step", spy)
    cond = Conditioning(label=torch.arange(2) % 2)
    method.eval()
    out = {}
    for clip in (0.0, 1.0):
        monkeypatch.setattr(method.cfg, "clip_x0", clip)
        seen.clear()
        out[clip] = method.sample(2, cond, steps=4, guidance=1.0, generator=torch.Generator().manual_seed(0))
        if clip:
            assert max(seen) <= clip + 1e-4, seen
        else:
            assert max(seen) > 1.0, "an untrained eps model's x0 estimate should leave [-1, 1]"
    # the trajectories differ (an untrained model's samples saturate at +-1 either way after the final clamp)
    assert not torch.equal(last[0.0], last[1.0])
    with pytest.raises(ValueError, match="ddim"):
        from methods.vdm import run_sampler

        run_sampler("ddpm", lambda x, t: x, torch.zeros(1, 1), torch.linspace(0.9, 0.1, 10), 2, 0.0, None, clip_x0=1.0)
