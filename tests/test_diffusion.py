"""The stateless diffusion core: forward process, parameterisations, samplers, CFG."""

import pytest
import torch

from methods import diffusion as D


@pytest.mark.parametrize("name", D.SCHEDULES)
def test_schedules_are_decreasing_and_in_range(name):
    ab = D.alpha_bar_schedule(name)
    assert ab.dtype == torch.float64 and ab.shape == (1000,)
    assert (ab[1:] < ab[:-1]).all() and 0 < ab[-1] < ab[0] < 1


@pytest.mark.parametrize("shift", [0.5, 2.0, 4.0])
def test_snr_shift_divides_every_snr_by_its_square(shift):
    ab = D.alpha_bar_schedule("cosine")
    shifted = D.alpha_bar_schedule("cosine", snr_shift=shift)
    snr = lambda a: a / (1 - a)  # noqa: E731
    assert torch.allclose(snr(shifted), snr(ab) / shift**2, rtol=1e-10)
    assert (shifted[1:] < shifted[:-1]).all() and 0 < shifted[-1] < shifted[0] < 1
    assert ((shifted < ab) if shift > 1 else (shifted > ab)).all()  # more noise at every t for shift > 1
    assert torch.equal(D.alpha_bar_schedule("cosine", snr_shift=1.0), ab)
    with pytest.raises(ValueError, match="snr_shift"):
        D.shift_snr(ab, 0.0)


def test_ldm_linear_endpoints():
    betas = D.beta_schedule("ldm_linear")
    assert betas[0].item() == pytest.approx(0.0015) and betas[-1].item() == pytest.approx(0.0195)


def test_noising_at_t0_returns_x0_and_marginal_variance():
    x0 = torch.randn(4, 3, 5, 6, 7, dtype=torch.float64)
    noise = torch.randn_like(x0)
    # alpha_bar with a first entry of exactly 1: t = 0 is clean data
    ab = torch.cat([torch.ones(1, dtype=torch.float64), D.alpha_bar_schedule("linear")[1:]])
    assert torch.allclose(D.q_sample(x0, torch.zeros(4, dtype=torch.long), ab, noise), x0)
    # at the last step of the cosine schedule x_t is almost pure noise
    ab = D.alpha_bar_schedule("cosine")
    x_t = D.q_sample(x0, torch.full((4,), 999), ab, noise)
    assert torch.allclose(x_t, noise, atol=1e-3)


@pytest.mark.parametrize("shape", [(3, 8), (2, 3, 4, 5), (2, 3, 4, 5, 6)])
def test_conversions_round_trip_any_rank(shape):
    ab = D.alpha_bar_schedule("linear")
    x0, eps = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    t = torch.randint(0, 1000, (shape[0],))
    x_t = D.q_sample(x0, t, ab, eps)
    assert torch.allclose(D.x0_from_eps(x_t, t, eps, ab), x0, atol=1e-6)
    assert torch.allclose(D.eps_from_x0(x_t, t, x0, ab), eps, atol=1e-6)
    v = D.v_from_eps(x0, t, eps, ab)
    assert torch.allclose(D.eps_from_v(x_t, t, v, ab), eps, atol=1e-8)
    assert torch.allclose(D.x0_from_v(x_t, t, v, ab), x0, atol=1e-8)
    for objective in D.OBJECTIVES:
        target = D.training_target(x0, t, eps, ab, objective)
        assert torch.allclose(D.to_eps(target, x_t, t, ab, objective), eps, atol=1e-6)


def _oracle(point: torch.Tensor, ab: torch.Tensor):
    """The exact eps-denoiser for a dataset that is the single point `point`."""
    return lambda x_t, t: D.eps_from_x0(x_t, t, point.expand_as(x_t), ab)


@pytest.mark.parametrize("sampler", ["ddim0", "ddim1", "ddim_fewsteps", "ddpm", "dpmpp2m", "dpmpp2m_fewsteps"])
def test_oracle_denoiser_makes_every_sampler_return_the_point(sampler):
    ab = D.alpha_bar_schedule("linear")
    point = torch.linspace(-0.9, 0.9, 2 * 3 * 4 * 5, dtype=torch.float64).reshape(1, 2, 3, 4, 5)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn((3, 2, 3, 4, 5), generator=g, dtype=torch.float64)
    model = _oracle(point, ab)
    if sampler == "ddpm":
        out = D.ddpm_sample(model, x_T, ab, generator=g)
    elif sampler.startswith("dpmpp2m"):
        out = D.dpmpp_2m_sample(model, x_T, ab, 3 if sampler.endswith("fewsteps") else 50)
    else:
        steps = 3 if sampler == "ddim_fewsteps" else 50
        out = D.ddim_sample(model, x_T, ab, steps, eta=1.0 if sampler == "ddim1" else 0.0, generator=g)
    assert torch.allclose(out, point.expand_as(out), atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(eta):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(25)
    ours = D.ddim_timesteps(1000, 25)
    assert ours.tolist() == sched.timesteps.tolist()
    ab = D.alpha_bar_schedule("linear")
    g = torch.Generator().manual_seed(1)
    for i in (0, 7, 24):
        x, eps, noise = (torch.randn(2, 3, 4, 8, 8, generator=g) for _ in range(3))
        t = int(sched.timesteps[i])
        ref = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        t_prev = ours[i + 1] if i + 1 < len(ours) else torch.tensor(-1)
        mine = D.ddim_step(eps, x, torch.full((2,), t), t_prev.expand(2), ab, eta=eta, noise=noise)
        assert torch.allclose(mine, ref, atol=1e-5), (i, (mine - ref).abs().max())


def _gaussian_eps_model(mu: float, std: float, ab: torch.Tensor):
    """The exact eps-denoiser when every data value is N(mu, std^2): x_t ~ N(a mu, a^2 std^2 + s^2) with
    a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t), so eps = s (x_t - a mu) / (a^2 std^2 + s^2)."""
    def model(x_t, t):
        a2 = D._gather(ab, t, x_t)
        return (1 - a2).sqrt() * (x_t - a2.sqrt() * mu) / (a2 * std**2 + 1 - a2)
    return model


def test_dpm_solver_2m_converges_to_the_exact_ode_map_of_a_gaussian_at_second_order():
    """For Gaussian data the probability-flow ODE keeps x_t's standard score: x0 = mu + std (x_T - a_T mu) /
    sqrt(a_T^2 std^2 + s_T^2). Doubling the steps must cut DPM-Solver++(2M)'s error about 4x (second order) and
    DDIM's about 2x (first order), so a first-order or mis-weighted update fails. (With very few steps, 5-20 here,
    the multistep extrapolation from poor early x0 estimates can land *farther* than DDIM: fewer steps at equal
    quality is a measurement per model, not a given.)"""
    ab = D.alpha_bar_schedule("cosine").double()
    mu, std = 0.3, 0.5
    model = _gaussian_eps_model(mu, std, ab)
    x_T = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = {}
    for steps in (50, 100, 200):
        t0 = int(D.ddim_timesteps(len(ab), steps)[0])
        a2 = ab[t0]
        exact = mu + std * (x_T - a2.sqrt() * mu) / (a2 * std**2 + 1 - a2).sqrt()
        dpm = D.dpmpp_2m_sample(model, x_T, ab, steps)
        ddim = D.ddim_sample(model, x_T, ab, steps)
        errors[steps] = ((dpm - exact).abs().max().item(), (ddim - exact).abs().max().item())
    for coarse, fine in ((50, 100), (100, 200)):
        assert errors[coarse][0] / errors[fine][0] > 3.2, errors  # second order
        assert 1.5 < errors[coarse][1] / errors[fine][1] < 2.5, errors  # DDIM: first order
    assert errors[100][0] < errors[100][1] / 3 and errors[200][0] < errors[200][1] / 6
    # its first step (and a one-step run) is DDIM's
    one = D.dpmpp_2m_sample(model, x_T, ab, 1)
    assert torch.allclose(one, D.ddim_sample(model, x_T, ab, 1), atol=1e-12)


def test_dpm_solver_2m_matches_diffusers():
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                        beta_end=0.02, algorithm_type="dpmsolver++", solver_order=2,
                                        prediction_type="epsilon", final_sigmas_type="zero", lower_order_final=True)
    ours = D.ddim_timesteps(1000, 12)
    sched.set_timesteps(timesteps=ours.tolist())
    ab = D.alpha_bar_schedule("linear")
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(3, 3, generator=g) * 0.3
    def model(x, t):  # any smooth eps-model that depends on x and t
        return torch.einsum("ij,bjhw->bihw", weight, x) * (t.float() / 1000).view(-1, 1, 1, 1) + 0.1 * x
    x_T = torch.randn(2, 3, 8, 8, generator=g)
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, torch.full((2,), int(t))), int(t), x).prev_sample
    mine = D.dpmpp_2m_sample(model, x_T, ab, 12)
    assert torch.allclose(mine, x, atol=1e-4), (mine - x).abs().max()


def test_cfg_combine_formula():
    """Scale convention: eps(null) + s (eps(c) - eps(null)); s = 1 conditional, s = 0 unconditional, affine in s."""
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g,
                                                                                    dtype=torch.float64)
    assert torch.equal(D.cfg_combine(c, u, 1.0), c)  # exactly: (s - 1) = 0
    assert torch.allclose(D.cfg_combine(c, u, 0.0), u, atol=1e-15)
    for s in (-0.5, 2.0, 4.0, 7.5):
        assert torch.allclose(D.cfg_combine(c, u, s), u + s * (c - u), atol=1e-14)
        assert torch.allclose(D.cfg_combine(c, u, s), (1 - s) * u + s * c, atol=1e-14)
    # linear in (eps(c), eps(null)) jointly, affine in s
    c2, u2 = torch.randn_like(c), torch.randn_like(u)
    assert torch.allclose(D.cfg_combine(2 * c + c2, 2 * u + u2, 3.0), 2 * D.cfg_combine(c, u, 3.0)
                          + D.cfg_combine(c2, u2, 3.0), atol=1e-13)
    a, b = D.cfg_combine(c, u, 2.0), D.cfg_combine(c, u, 5.0)
    assert torch.allclose(D.cfg_combine(c, u, 3.5), (a + b) / 2, atol=1e-14)
    # the former w convention, (1 + w) eps(c) - w eps(null), is s = w + 1, bit for bit
    for w in (0.0, 1.0, 1.5, 4.0, 6.0):
        assert torch.equal(D.cfg_combine(c, u, w + 1), c + w * (c - u))


def test_guided_scale_one_never_calls_the_unconditional_model():
    calls = []
    cond = lambda x, t: x + 1  # noqa: E731
    uncond = lambda x, t: calls.append(1) or x  # noqa: E731
    x, t = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    assert D.guided(cond, uncond, 1.0) is cond and not calls
    assert torch.allclose(D.guided(cond, uncond, 3.0)(x, t), x + 3) and calls == [1]
    assert torch.allclose(D.guided(cond, uncond, 0.0)(x, t), x)


def test_noise_fn_is_used_by_the_sampler():
    """A constant noise_fn changes a stochastic sampler's output: noise really is a parameter."""
    ab = D.alpha_bar_schedule("linear")
    x_T = torch.randn(2, 3, 4, 4)
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    a = D.ddim_sample(model, x_T, ab, 5, eta=1.0, generator=torch.Generator().manual_seed(0))
    b = D.ddim_sample(model, x_T, ab, 5, eta=1.0, noise_fn=lambda like, g: torch.ones_like(like))
    assert not torch.allclose(a, b)


def test_diffusion_loss_zero_for_perfect_model_and_per_sample():
    ab = D.alpha_bar_schedule("cosine")
    x0, noise = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    t = torch.randint(0, 1000, (5,))
    loss = D.diffusion_loss(lambda x_t, tt: noise, x0, t, ab, noise, "eps")
    assert loss.shape == (5,) and torch.allclose(loss, torch.zeros(5))
    assert (D.diffusion_loss(lambda x_t, tt: torch.zeros_like(x_t), x0, t, ab, noise, "eps") > 0).all()


def test_run_sampler_dispatches_dpmpp2m_and_refuses_a_stochastic_eta():
    from methods.vdm import run_sampler

    ab = D.alpha_bar_schedule("linear")
    point = torch.full((1, 2, 4), 0.25, dtype=torch.float64)
    x_T = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = run_sampler("dpmpp2m", _oracle(point, ab), x_T, ab, 10, 0.0, None)
    assert torch.allclose(out, point.expand_as(out), atol=1e-6)
    with pytest.raises(ValueError, match="deterministic"):
        run_sampler("dpmpp2m", _oracle(point, ab), x_T, ab, 10, 0.5, None)
    with pytest.raises(ValueError, match="ddim, ddpm or dpmpp2m"):
        run_sampler("euler", _oracle(point, ab), x_T, ab, 10, 0.0, None)


@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
def test_min_snr_weighting_is_the_x0_loss_weighted_by_clipped_snr(objective):
    """Whatever the objective, the weighted loss equals min(SNR, gamma) x the error of the implied x0 estimate."""
    torch.manual_seed(0)
    alpha_bar = D.alpha_bar_schedule("cosine", 1000)
    x0, noise = torch.randn(6, 3, 4, 8, 8), torch.randn(6, 3, 4, 8, 8)
    t = torch.tensor([0, 10, 200, 500, 800, 999])
    out = torch.randn_like(x0)  # any network output
    model = lambda x_t, tt: out  # noqa: E731
    gamma = 5.0
    weighted = D.diffusion_loss(model, x0, t, alpha_bar, noise, objective, min_snr_gamma=gamma)
    x_t = D.q_sample(x0, t, alpha_bar, noise)
    eps_hat = D.to_eps(out, x_t, t, alpha_bar, objective)
    x0_err = ((D.x0_from_eps(x_t, t, eps_hat, alpha_bar) - x0) ** 2).flatten(1).mean(1)
    snr = alpha_bar[t] / (1 - alpha_bar[t])
    assert weighted.double() == pytest.approx((snr.clamp(max=gamma) * x0_err).double(), rel=1e-3)
    plain = D.diffusion_loss(model, x0, t, alpha_bar, noise, objective)  # gamma 0: the unweighted loss
    assert torch.equal(plain, ((out - D.training_target(x0, t, noise, alpha_bar, objective)) ** 2).flatten(1).mean(1))
    assert weighted.double() == pytest.approx((plain * D.min_snr_weight(t, alpha_bar, objective, gamma)).double())
