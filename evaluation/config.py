"""The evaluation protocol's configuration (pure dataclass; the `eval` node of a run config).

Defaults score the embedded shapes data with the shipped shapes evaluator, cheaply enough
for the tiny CPU preset; `configs/scale/paper.yaml` raises the counts to the papers'
(2048 generated, 2048 real). For UCF-101 the StyleGAN-V protocol is
`eval.detector=i3d_torchscript eval.is_detector=c3d_torchscript eval.paths.i3d_torchscript=...`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

METRICS = ("fvd", "is", "clipsim", "cond_acc", "rfvd")


@dataclass
class DetectorPaths:
    """Local detector files (None: the environment variable VDB_DETECTOR_<NAME>, else the shipped default)."""

    i3d_torchscript: str | None = None  # StyleGAN-V i3d_torchscript.pt
    i3d: str | None = None  # VideoGPT i3d_pretrained_400.pt (state dict)
    c3d_torchscript: str | None = None  # StyleGAN-V c3d_ucf101.pt
    clip: str | None = None  # a transformers CLIP folder (save_pretrained layout)
    shapes: str | None = None  # None = evaluation/weights/shapes_evaluator.pt (shipped)


@dataclass
class EvalConfig:
    metrics: list[str] = field(default_factory=lambda: list(METRICS))  # any of METRICS; empty = skip evaluation
    num_samples: int = 32  # generated videos scored per evaluation (the paper protocol: 2048)
    num_real: int = 512  # real clips behind the real statistics (capped at the split size; paper: 2048)
    real_split: str = "train"  # StyleGAN-V computes real statistics on the training videos
    clip_seed: int = 0  # seed of the real clips' order and temporal offsets
    detector: str = "shapes"  # FVD / R-FVD features: shapes | i3d_torchscript | i3d
    is_detector: str = "shapes"  # IS and conditional-accuracy probabilities: shapes | c3d_torchscript | i3d
    clip_detector: str = "shapes"  # CLIPSIM embeddings: shapes | clip
    paths: DetectorPaths = field(default_factory=DetectorPaths)
    covariance: str = "biased"  # "biased" (N, StyleGAN-V) or "unbiased" (N - 1, VideoGPT / torchmetrics)
    is_splits: int = 10  # StyleGAN-V: 10 splits of the (seed-42 shuffled) probabilities
    batch_size: int = 16  # videos per sampling / detector batch
    seed: int | None = None  # generation seed (rank r uses seed + r); None = the run's seed
    every_n_steps: int = 0  # >0: EvaluationCallback also evaluates every N steps of the final stage
    cache_real_stats: bool = True  # cache real statistics under <cache_dir>/real_stats/
