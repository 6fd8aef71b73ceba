"""Fréchet distance, FVD / IS / CLIPSIM / accuracy metrics, and the quantisation convention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from evaluation.detectors import quantize, rescale
from evaluation.frechet import GaussianStats, feature_stats, frechet_distance, stats_from_sums
from evaluation.metrics import CLIPSIM, FVD, ConditionalAccuracy, VideoInceptionScore, inception_score


def _rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


@pytest.mark.parametrize("d", [1, 3, 16])
def test_frechet_closed_form_commuting_gaussians(d):
    """Covariances Q diag(a) Q^T and Q diag(b) Q^T: d^2 = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2."""
    rng = np.random.default_rng(d)
    q = _rotation(d, d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-8, abs=1e-10)


def test_frechet_closed_form_scalar():
    # N(0, 4) vs N(3, 1): 9 + (2 - 1)^2 = 10
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(10.0)


def test_frechet_symmetric_and_zero_for_identical():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 12)), rng.normal(size=(150, 12)) * 1.5 + 0.2
    sx, sy = feature_stats(x), feature_stats(y)
    assert frechet_distance(*sx, *sy) == pytest.approx(frechet_distance(*sy, *sx), rel=1e-9)
    assert frechet_distance(*sx, *sy) > 0.1
    assert frechet_distance(*sx, *sx) == pytest.approx(0.0, abs=1e-8)


def test_frechet_agrees_with_torchmetrics_fid_on_same_features():
    """torchmetrics uses the unbiased covariance (N - 1); with the same convention the numbers agree.

    The StyleGAN-V default (biased, divide by N) gives a slightly different number on the same features.
    """

    class Identity(torch.nn.Module):
        num_features = 10

        def forward(self, x):
            return x

    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(64, 10, generator=g), torch.randn(48, 10, generator=g) * 1.3 + 0.25
    fid = FrechetInceptionDistance(feature=Identity())
    fid.update(real, real=True)
    fid.update(fake, real=False)
    reference = float(fid.compute())
    unbiased = frechet_distance(*feature_stats(fake, unbiased=True), *feature_stats(real, unbiased=True))
    biased = frechet_distance(*feature_stats(fake), *feature_stats(real))
    assert unbiased == pytest.approx(reference, rel=1e-4)
    assert abs(biased - reference) > 1e-4 * reference  # the convention matters, hence recorded in results


@pytest.mark.parametrize("n,d", [(2, 64), (5, 400), (10, 128)])
def test_frechet_never_nan_below_feature_dimension(n, d):
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d)) + 0.1
    v = frechet_distance(*feature_stats(x), *feature_stats(y))
    assert math.isfinite(v) and v > 0
    collapsed = np.repeat(y[:1], n, axis=0)  # a generator that always returns the same video
    v = frechet_distance(*feature_stats(x), *feature_stats(collapsed))
    assert math.isfinite(v) and v > 0
    assert frechet_distance(*feature_stats(x), *feature_stats(x)) == pytest.approx(0.0, abs=1e-6)


def test_stats_from_sums_match_feature_stats():
    x = np.random.default_rng(1).normal(size=(30, 5))
    for unbiased in (False, True):
        mu, sigma = stats_from_sums(30, x.sum(0), x.T @ x, unbiased)
        mu_ref, sigma_ref = feature_stats(x, unbiased)
        np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
        np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-10, atol=1e-12)


def test_gaussian_stats_roundtrip_and_conventions(tmp_path):
    x = np.random.default_rng(2).normal(size=(20, 4))
    s = GaussianStats.from_features(x)
    np.testing.assert_allclose(s.cov(unbiased=True), np.cov(x, rowvar=False), rtol=1e-12)
    np.testing.assert_allclose(s.cov(), np.cov(x, rowvar=False, bias=True), rtol=1e-12)
    s.save(tmp_path / "s.npz", {"k": 1})
    t = GaussianStats.load(tmp_path / "s.npz")
    assert t.n == 20 and np.array_equal(t.mu, s.mu) and np.array_equal(t.sigma, s.sigma)


@pytest.mark.parametrize("covariance", ["biased", "unbiased"])
def test_fvd_metric_matches_function_streamed_and_cached(covariance):
    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(40, 6, generator=g), torch.randn(30, 6, generator=g) + 0.5
    unbiased = covariance == "unbiased"
    expected = frechet_distance(*feature_stats(fake, unbiased), *feature_stats(real, unbiased))
    m = FVD(covariance=covariance)
    for chunk in real.split(7):
        m.update(chunk, real=True)
    for chunk in fake.split(9):
        m.update(chunk)
    assert float(m.compute()) == pytest.approx(expected, rel=1e-10)
    cached = FVD(covariance=covariance)
    cached.set_reference(m.real_stats())
    cached.update(fake)
    assert float(cached.compute()) == pytest.approx(expected, rel=1e-10)


def test_fvd_metric_rejects_bad_input():
    with pytest.raises(ValueError, match="covariance"):
        FVD(covariance="population")
    with pytest.raises(ValueError, match=r"\(B, d\)"):
        FVD().update(torch.zeros(2, 3, 4))


def test_inception_score_limits():
    k, n = 8, 800
    uniform = np.full((n, k), 1 / k)
    assert inception_score(uniform)[0] == pytest.approx(1.0)
    confident = np.eye(k)[np.arange(n) % k]  # one-hot, all classes equally often
    mean, std = inception_score(confident)
    assert 7.0 < mean <= k and std < 0.5  # splits of 80 after shuffling: nearly balanced


def test_inception_score_stylegan_v_protocol_by_hand():
    p = np.random.default_rng(4).dirichlet(np.ones(5) * 0.3, size=100)
    shuffled = p.copy()
    np.random.RandomState(42).shuffle(shuffled)
    scores = []
    for i in range(10):
        part = shuffled[i * 10:(i + 1) * 10]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    assert inception_score(p) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-12)


def test_inception_metric_is_independent_of_shard_order():
    p = torch.tensor(np.random.default_rng(5).dirichlet(np.ones(6), size=50))
    whole = VideoInceptionScore()
    whole.update(p, torch.arange(50))
    sharded = VideoInceptionScore()  # rank 1's half arrives first: the index restores the order
    sharded.update(p[25:], torch.arange(25, 50))
    sharded.update(p[:25], torch.arange(25))
    assert [float(v) for v in sharded.compute()] == pytest.approx([float(v) for v in whole.compute()], rel=1e-12)
    assert float(whole.compute()[0]) == pytest.approx(inception_score(p.numpy())[0], rel=1e-12)


def test_clipsim_mean_over_frames_then_videos():
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # unnormalised on purpose
    frames = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],  # cos 1, 0 -> 0.5
                           [[0.0, 3.0], [0.0, 1.0]]])  # cos 1, 1 -> 1.0
    m = CLIPSIM()
    m.update(frames, text)
    assert float(m.compute()) == pytest.approx(0.75)


def test_conditional_accuracy():
    m = ConditionalAccuracy()
    m.update(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), torch.tensor([0, 0, 0]))
    m.update(torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
    assert float(m.compute()) == pytest.approx(0.75)


def test_conditional_accuracy_keeps_per_class_confusion_counts():
    m = ConditionalAccuracy(num_classes=3)
    onehot = torch.eye(5)  # a detector that knows 5 classes, the dataset 3: classes 3 and 4 -> the last column
    m.update(onehot[[0, 1, 1, 3, 2, 4]], torch.tensor([0, 0, 1, 1, 2, 2]))
    assert m.confusion().tolist() == [[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 1]]
    assert m.per_class().tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert float(m.compute()) == pytest.approx(0.5)  # the diagonal's share, the same as before
    m.update(onehot[[2, 2]], torch.tensor([2, 2]))
    assert m.per_class().tolist() == pytest.approx([0.5, 0.5, 0.75])
    empty = ConditionalAccuracy(num_classes=2)
    empty.update(torch.eye(2)[[0]], torch.tensor([0]))
    assert empty.per_class()[0] == 1 and torch.isnan(empty.per_class()[1])  # no sample asked for class 1
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        m.update(onehot[[0]], torch.tensor([3]))
    with pytest.raises(ValueError, match="num_classes > 0"):
        ConditionalAccuracy().confusion()


def test_quantize_convention():
    x = torch.tensor([-1.0, -1.5, 0.0, 1.0, 2.0]).view(1, 1, 5, 1, 1)
    assert quantize(x).flatten().tolist() == [0, 0, 128, 255, 255]
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 256, 1, 1)
    assert torch.equal(quantize(u.float() / 127.5 - 1), u)  # a decoded real clip comes back exactly
    assert torch.equal(quantize(u), u)  # uint8 passes through
    assert rescale(u).min() == -1 and rescale(u).max() == 1


def test_frechet_regularised_retry_and_eigen_fallback(monkeypatch):
    """When sqrtm gives NaN / large imaginary parts, eps*I is added and retried; if that keeps failing,
    the eigenvalue form takes over: the value stays finite and close to the exact one."""
    import evaluation.frechet as fr

    rng = np.random.default_rng(6)
    s1, s2 = feature_stats(rng.normal(size=(50, 8))), feature_stats(rng.normal(size=(50, 8)) + 0.3)
    exact = frechet_distance(*s1, *s2)
    real_sqrtm, calls = fr.scipy.linalg.sqrtm, []

    def flaky(a):  # first call: a large imaginary part, as for near-singular products
        calls.append(a)
        root = real_sqrtm(a)
        return root + 1j * np.eye(len(a)) if len(calls) == 1 else root

    monkeypatch.setattr(fr.scipy.linalg, "sqrtm", flaky)
    assert frechet_distance(*s1, *s2) == pytest.approx(exact, rel=1e-4)
    assert len(calls) == 2 and not np.allclose(calls[0], calls[1])  # the retry saw regularised covariances
    monkeypatch.setattr(fr.scipy.linalg, "sqrtm", lambda a: np.full_like(a, np.nan))
    assert frechet_distance(*s1, *s2) == pytest.approx(exact, rel=1e-8)
