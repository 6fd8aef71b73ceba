"""FVD, video IS, CLIPSIM and conditional accuracy as torchmetrics `Metric`s (they reduce across DDP ranks).

The metrics consume detector outputs (features, probabilities, embeddings), not videos:
`evaluation.detectors` turns videos into those. States are gathered features / probabilities
(`cat`) or float64 sums, so N processes give the same number as one process on the same
set (IS sorts by the global sample index before its seeded shuffle, so even its splits match).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import xlogy
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from evaluation.frechet import COVARIANCES, MATRIX_SQRTS, Frechet, GaussianStats, frechet_from_stats


class FVD(Metric):
    """Fréchet distance between Gaussian fits of generated and real detector features.

    update(features (B, d), real=False) streams generated (or real) features. The real side
    may instead be a cached `GaussianStats` given to `set_reference`. covariance: "biased"
    (divide by N, StyleGAN-V, the default) or "unbiased" (N - 1, VideoGPT / torchmetrics).
    sqrt: "scipy" (scipy.linalg.sqrtm, the default) or "svd" (tf-gan's form, VideoGPT lineage).
    After `compute()`, `fallback_eps` / `sqrt_method` say how the matrix square root was taken
    (None / "sqrtm" on the plain path; see `evaluation.frechet.frechet`).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, covariance: str = "biased", sqrt: str = "scipy", **kwargs) -> None:
        super().__init__(**kwargs)
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}; got {covariance!r}")
        if sqrt not in MATRIX_SQRTS:
            raise ValueError(f"eval.matrix_sqrt must be one of {MATRIX_SQRTS}; got {sqrt!r}")
        self.covariance, self.sqrt = covariance, sqrt
        self.add_state("fake", default=[], dist_reduce_fx="cat")
        self.add_state("real", default=[], dist_reduce_fx="cat")
        self.reference: GaussianStats | None = None
        self.frechet_result: Frechet | None = None  # the last compute()'s value and numerical path

    def update(self, features: Tensor, real: bool = False) -> None:
        if features.ndim != 2:
            raise ValueError(f"FVD.update expects features (B, d); got shape {tuple(features.shape)}")
        (self.real if real else self.fake).append(features.detach().double())

    def set_reference(self, stats: GaussianStats) -> None:
        """Use precomputed real statistics (e.g. from the on-disk cache) instead of streamed real features."""
        self.reference = stats

    def _stats(self, which: str) -> GaussianStats:
        feats = getattr(self, which)
        if not (isinstance(feats, Tensor) or feats):
            raise RuntimeError(f"FVD has no {which} features: call update(..., real={which == 'real'}) first")
        return GaussianStats.from_features(dim_zero_cat(feats))

    def real_stats(self) -> GaussianStats:
        """Gaussian fit of the streamed real features, gathered from every rank."""
        with self.sync_context(should_unsync=True):
            return self._stats("real")

    def compute(self) -> Tensor:
        real = self.reference if self.reference is not None else self._stats("real")
        self.frechet_result = frechet_from_stats(self._stats("fake"), real, unbiased=self.covariance == "unbiased",
                                                 sqrt=self.sqrt)
        return torch.tensor(self.frechet_result.value, dtype=torch.float64)

    @property
    def fallback_eps(self) -> float | None:
        """The eps added to both covariances by the last compute() (None: the plain sqrtm path; 0.0: eigh)."""
        return self.frechet_result.fallback_eps if self.frechet_result is not None else None

    @property
    def sqrt_method(self) -> str | None:
        """"sqrtm", "sqrtm+eps" or "eigh": how the last compute() took the matrix square root."""
        return self.frechet_result.method if self.frechet_result is not None else None


def inception_score(probs: np.ndarray, splits: int = 10, shuffle_seed: int | None = 42) -> tuple[float, float]:
    """StyleGAN-V's video IS of class probabilities (N, K): mean and population std over splits.

    `np.random.RandomState(42).shuffle(probs)`; split i is probs[i*N//splits : (i+1)*N//splits];
    per split exp(mean_i sum_c p (log p - log mean_i p)). 0 log 0 is taken as 0.
    """
    p = np.array(probs, dtype=np.float64)
    n = p.shape[0]
    if n < splits:
        raise ValueError(f"inception score needs at least {splits} samples (one per split); got {n}")
    if shuffle_seed is not None:
        np.random.RandomState(shuffle_seed).shuffle(p)
    scores = []
    for i in range(splits):
        part = p[i * n // splits: (i + 1) * n // splits]
        kl = xlogy(part, part) - xlogy(part, part.mean(axis=0, keepdims=True))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


class VideoInceptionScore(Metric):
    """IS on gathered class probabilities with the StyleGAN-V protocol (seed-42 shuffle, 10 splits).

    update(probs (B, K), index (B,) optional global sample index): with indices, the gathered
    probabilities are put in index order before the shuffle, so the result does not depend on
    how samples were sharded across ranks. compute() -> (mean, std).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, splits: int = 10, shuffle_seed: int = 42, **kwargs) -> None:
        super().__init__(**kwargs)
        self.splits, self.shuffle_seed = splits, shuffle_seed
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(self, probs: Tensor, index: Tensor | None = None) -> None:
        if probs.ndim != 2:
            raise ValueError(f"VideoInceptionScore.update expects probabilities (B, K); got {tuple(probs.shape)}")
        if index is None:
            index = torch.full((probs.shape[0],), -1, dtype=torch.long, device=probs.device)
        self.probs.append(probs.detach().double())
        self.index.append(index.detach().long())

    def compute(self) -> tuple[Tensor, Tensor]:
        p, idx = dim_zero_cat(self.probs), dim_zero_cat(self.index)
        if bool((idx >= 0).all()):
            p = p[torch.argsort(idx)]
        mean, std = inception_score(p.cpu().numpy(), self.splits, self.shuffle_seed)
        return torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)


class CLIPSIM(Metric):
    """Mean over videos of the mean over frames of cos(frame embedding, caption embedding); raw, not x100.

    update(frame_emb (B, T, D), text_emb (B, D)).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, frame_emb: Tensor, text_emb: Tensor) -> None:
        if frame_emb.ndim != 3 or text_emb.ndim != 2 or frame_emb.shape[0] != text_emb.shape[0]:
            raise ValueError(f"CLIPSIM.update expects (B, T, D) and (B, D); got {tuple(frame_emb.shape)}, "
                             f"{tuple(text_emb.shape)}")
        f, t = F.normalize(frame_emb.double(), dim=-1), F.normalize(text_emb.double(), dim=-1)
        per_video = (f * t[:, None]).sum(-1).mean(1)  # (B,)
        self.total += per_video.sum()
        self.count += per_video.numel()

    def compute(self) -> Tensor:
        return self.total / self.count


class ConditionalAccuracy(Metric):
    """Fraction of class-conditioned samples the evaluator classifies as their conditioning class.

    update(scores (B, K') probabilities or logits, target (B,) the class each sample was conditioned on).
    With `num_classes=K` (the dataset's classes) it also keeps the confusion counts, K x (K + 1): row = the
    conditioning class, column = the evaluator's class, the last column any evaluator class >= K (a detector
    may know more classes than the dataset names). `confusion()` returns them; `per_class()` each
    conditioning class's accuracy (NaN where no sample asked for it): *which* classes a model gets.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        if self.num_classes > 0:
            self.add_state("counts", default=torch.zeros(self.num_classes, self.num_classes + 1, dtype=torch.long),
                           dist_reduce_fx="sum")

    def update(self, scores: Tensor, target: Tensor) -> None:
        if scores.ndim != 2 or target.shape != (scores.shape[0],):
            raise ValueError(f"ConditionalAccuracy.update expects (B, K) and (B,); got {tuple(scores.shape)}, "
                             f"{tuple(target.shape)}")
        target = target.to(scores.device).long()
        predicted = scores.argmax(-1)
        self.correct += (predicted == target).sum()
        self.total += target.numel()
        if self.num_classes > 0 and target.numel():
            k = self.num_classes
            if int(target.min()) < 0 or int(target.max()) >= k:
                raise ValueError(f"ConditionalAccuracy(num_classes={k}): conditioning classes must lie in [0, {k}), "
                                 f"got [{int(target.min())}, {int(target.max())}]")
            column = predicted.clamp(max=k)  # every evaluator class >= k: the last column
            self.counts += torch.bincount(target * (k + 1) + column, minlength=k * (k + 1)).view(k, k + 1)

    def compute(self) -> Tensor:
        return self.correct.double() / self.total

    def confusion(self) -> Tensor:
        if self.num_classes == 0:
            raise ValueError("ConditionalAccuracy keeps confusion counts only with num_classes > 0")
        return self.counts.clone()

    def per_class(self) -> Tensor:
        counts = self.confusion().double()
        return counts.diagonal() / counts.sum(1)  # 0 / 0 = NaN: a class no sample was conditioned on
