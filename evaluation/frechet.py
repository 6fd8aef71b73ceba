"""Fréchet distance between Gaussian fits of detector features (the math behind FVD / FID).

    d^2 = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})          (Fréchet 1957; Heusel et al. 2017, eq. 6)

Conventions (reference/metrics.md): statistics in float64; the StyleGAN-V protocol uses the
*biased* covariance (divide by N) and `scipy.linalg.sqrtm`, keeping the real part. The
VideoGPT lineage and torchmetrics use the unbiased covariance (N - 1), selectable here.
Numerical care: when N is below the feature dimension the covariances are singular and
`sqrtm` can return large imaginary parts or NaN; we then add eps * I to both covariances and
retry with growing eps. The regularised distance is computed *consistently*: S_1 + eps I and
S_2 + eps I enter the two traces as well as the square-root term (regularising only the
square-root term biases the distance low by about 2 d eps). If that still fails, the
eigenvalue form tr((S_1 S_2)^{1/2}) = sum sqrt(eig(sqrt(S_1) S_2 sqrt(S_1))) of the
unregularised covariances takes over. The result is clamped at 0 (equal sets can give tiny
negative values). `frechet` reports which path was taken (`Frechet.method`, and the eps added,
`Frechet.fallback_eps`), which the results row records as `fvd_sqrt_method` / `fvd_fallback_eps`.

`sqrt="svd"` (`eval.matrix_sqrt=svd`, the VideoGPT / TATS / DIGAN / PVDM lineage) takes the square
root as tf-gan's `trace_sqrt_product` does instead: tr(R(R(S_1) S_2 R(S_1))) with R(A) = U diag(r) V^T
from the SVD A = U diag(s) V^T, r = sqrt(s) where s >= 1e-10 and r = s below (tf-gan's
`_symmetric_matrix_square_root`); in float64, never regularised (method "svd").
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.linalg
import torch

COVARIANCES = ("biased", "unbiased")
MATRIX_SQRTS = ("scipy", "svd")  # scipy.linalg.sqrtm of S_1 S_2 (StyleGAN-V, cd-fvd) | tf-gan's SVD form (VideoGPT)
SVD_SQRT_EPS = 1e-10  # tf-gan: singular values below this are kept as they are, not square-rooted
IMAG_TOL = 1e-3  # largest tolerated |imaginary part| on the diagonal of sqrtm's result (as pytorch-fid)


def _as_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def feature_stats(feats, unbiased: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and covariance (d, d), float64, of features (N, d).

    unbiased=False divides by N (StyleGAN-V), True by N - 1 (VideoGPT, torchmetrics).
    """
    x = _as_f64(feats)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, d); got shape {x.shape}")
    n = x.shape[0]
    if n < (2 if unbiased else 1):
        raise ValueError(f"need at least {2 if unbiased else 1} feature vectors, got {n}")
    mu = x.mean(axis=0)
    xc = x - mu
    sigma = xc.T @ xc / (n - 1 if unbiased else n)
    return mu, sigma


def stats_from_sums(n: int, s, ss, unbiased: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance from n, the sum of features s (d,) and of outer products ss (d, d).

    This is what a distributed metric accumulates: sums reduce across ranks by addition.
    """
    s, ss = _as_f64(s), _as_f64(ss)
    if n < (2 if unbiased else 1):
        raise ValueError(f"need at least {2 if unbiased else 1} feature vectors, got {n}")
    mu = s / n
    scatter = ss - n * np.outer(mu, mu)  # sum_i (x_i - mu)(x_i - mu)^T
    return mu, scatter / (n - 1 if unbiased else n)


def _sqrtm_trace(a: np.ndarray) -> float | None:
    """tr(sqrtm(a)) with scipy, or None when the result is not usable (NaN / large imaginary part)."""
    with warnings.catch_warnings():  # singular products are expected (N < d) and handled below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(a)
    if not np.all(np.isfinite(root)):
        return None
    if np.iscomplexobj(root):
        if np.max(np.abs(np.diagonal(root).imag)) > IMAG_TOL:
            return None
        root = root.real
    return float(np.trace(root))


def _eig_trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S_1 S_2)^{1/2}) for PSD S_1, S_2 via the symmetric form sqrt(S_1) S_2 sqrt(S_1)."""
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def _svd_sqrt(mat: np.ndarray, eps: float = SVD_SQRT_EPS) -> np.ndarray:
    """tf-gan's `_symmetric_matrix_square_root`: U diag(r) V^T, r = sqrt(s) for s >= eps, else s."""
    u, s, vt = np.linalg.svd(mat)
    return (u * np.where(s < eps, s, np.sqrt(s))) @ vt


def svd_trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S_1 S_2)^{1/2}) as tf-gan's `trace_sqrt_product`: tr(R(R(S_1) S_2 R(S_1))), R = `_svd_sqrt`."""
    root1 = _svd_sqrt(sigma1)
    return float(np.trace(_svd_sqrt(root1 @ (sigma2 @ root1))))


class Frechet(NamedTuple):
    """A Fréchet distance and how it was computed.

    method: "sqrtm" (scipy on the plain covariances), "sqrtm+eps" (scipy on S + eps I, the whole
    distance regularised) or "eigh" (eigenvalue form on the plain covariances, when even the
    regularised sqrtm failed), or "svd" (tf-gan's SVD form, asked for with sqrt="svd").
    fallback_eps: the absolute eps added to both covariances' diagonals, None for "sqrtm" and
    "svd", 0.0 for "eigh".
    """

    value: float
    method: str
    fallback_eps: float | None


def frechet(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, sqrt: str = "scipy") -> Frechet:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) and the path taken; float64, clamped at 0.

    mu: (d,), sigma: (d, d); numpy arrays or tensors. `eps` (relative to the largest variance,
    at least 1) is the first regulariser tried when `sqrtm` of the product is unusable; it grows
    tenfold up to 0.1. A regularised distance is that of N(mu1, S_1 + eps I) and N(mu2, S_2 + eps I).
    sqrt: "scipy" (the above) or "svd" (tf-gan's SVD square roots, see the module docstring).
    """
    if sqrt not in MATRIX_SQRTS:
        raise ValueError(f"matrix square root must be one of {MATRIX_SQRTS}; got {sqrt!r}")
    mu1, mu2 = np.atleast_1d(_as_f64(mu1)), np.atleast_1d(_as_f64(mu2))
    sigma1, sigma2 = np.atleast_2d(_as_f64(sigma1)), np.atleast_2d(_as_f64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    for name, arr in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains NaN or inf")
    diff = mu1 - mu2
    mean_term = float(diff @ diff)
    if sqrt == "svd":
        d2 = mean_term + np.trace(sigma1) + np.trace(sigma2) - 2 * svd_trace_sqrt_product(sigma1, sigma2)
        return Frechet(max(float(d2), 0.0), "svd", None)
    tr_covmean = _sqrtm_trace(sigma1 @ sigma2)
    if tr_covmean is not None:
        d2 = mean_term + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean
        return Frechet(max(float(d2), 0.0), "sqrtm", None)
    scale = max(np.abs(np.diagonal(sigma1)).max(), np.abs(np.diagonal(sigma2)).max(), 1.0)
    e = eps
    while e <= 1e-1:  # regularise: the distance between N(mu1, S_1 + eps I) and N(mu2, S_2 + eps I)
        offset = np.eye(sigma1.shape[0]) * (e * scale)
        s1, s2 = sigma1 + offset, sigma2 + offset
        tr_covmean = _sqrtm_trace(s1 @ s2)
        if tr_covmean is not None:
            d2 = mean_term + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
            return Frechet(max(float(d2), 0.0), "sqrtm+eps", float(e * scale))
        e *= 10
    d2 = mean_term + np.trace(sigma1) + np.trace(sigma2) - 2 * _eig_trace_sqrt_product(sigma1, sigma2)
    return Frechet(max(float(d2), 0.0), "eigh", 0.0)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); float64, clamped at 0, never NaN.

    mu: (d,), sigma: (d, d); numpy arrays or tensors. `eps` is the first regulariser tried
    when `sqrtm` of the product is unusable (see `frechet`, which also says which path was taken).
    """
    return frechet(mu1, sigma1, mu2, sigma2, eps).value


@dataclass
class GaussianStats:
    """A Gaussian fit of N feature vectors: mean (d,), *biased* covariance (d, d), float64, and N.

    The biased covariance is stored; `cov(unbiased=True)` rescales it by N / (N - 1).
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def from_features(cls, feats) -> GaussianStats:
        mu, sigma = feature_stats(feats, unbiased=False)
        return cls(mu, sigma, int(_as_f64(feats).shape[0]))

    def cov(self, unbiased: bool = False) -> np.ndarray:
        if unbiased and self.n < 2:
            raise ValueError("the unbiased covariance needs at least 2 feature vectors")
        return self.sigma * (self.n / (self.n - 1)) if unbiased else self.sigma

    def save(self, path: str | Path, protocol: dict | None = None, extra: dict[str, np.ndarray] | None = None) -> None:
        """Write an .npz atomically (concurrent writers of the same key never leave a torn file).

        `extra` arrays are stored beside the statistics (e.g. the real clips' labels).
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, mu=self.mu, sigma=self.sigma, n=np.int64(self.n),
                     protocol=np.array(json.dumps(protocol or {}, sort_keys=True, default=str)), **(extra or {}))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> GaussianStats:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["mu"].astype(np.float64), z["sigma"].astype(np.float64), int(z["n"]))


def frechet_from_stats(fake: GaussianStats, real: GaussianStats, unbiased: bool = False,
                       sqrt: str = "scipy") -> Frechet:
    """Fréchet distance (and the path taken) between two Gaussian fits under one covariance convention."""
    return frechet(fake.mu, fake.cov(unbiased), real.mu, real.cov(unbiased), sqrt=sqrt)


def fvd_from_stats(fake: GaussianStats, real: GaussianStats, unbiased: bool = False, sqrt: str = "scipy") -> float:
    """Fréchet distance between two Gaussian fits under one covariance convention."""
    return frechet_from_stats(fake, real, unbiased, sqrt).value
