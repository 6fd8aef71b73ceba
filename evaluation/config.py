"""The evaluation protocol's configuration (pure dataclass; the `eval` node of a run config).

Defaults score the embedded shapes data with the shipped shapes evaluator, cheaply enough
for the tiny CPU preset; `configs/scale/paper.yaml` raises the counts to the papers'
(2048 generated, 2048 real). For UCF-101 the StyleGAN-V protocol is `eval.protocol=stylegan-v
eval.paths.i3d_torchscript=... eval.paths.c3d_torchscript=...` (configs/protocol/stylegan-v.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PROTOCOL_DIR = Path(__file__).resolve().parent.parent / "configs" / "protocol"

METRICS = ("fvd", "is", "clipsim", "cond_acc", "rfvd")


@dataclass
class DetectorPaths:
    """Local detector files (None: the environment variable VDB_DETECTOR_<NAME>, else the shipped default)."""

    i3d_torchscript: str | None = None  # StyleGAN-V i3d_torchscript.pt
    i3d: str | None = None  # VideoGPT i3d_pretrained_400.pt (state dict)
    c3d_torchscript: str | None = None  # StyleGAN-V c3d_ucf101.pt
    clip: str | None = None  # a transformers CLIP folder (save_pretrained layout)
    shapes: str | None = None  # None = evaluation/weights/shapes_evaluator.pt (shipped)
    videomae: str | None = None  # a transformers VideoMAE folder (cd-fvd's VideoMAE-v2: evaluation/videomae.py converts it)


@dataclass
class DetectorOptions:
    """Detector settings that change the numbers (the `eval.protocol` presets set them; recorded in the row)."""

    i3d_bn_eps: float = 1e-3  # native I3D BatchNorm eps: 1e-3 (TF/Sonnet original), 1e-5 (VideoGPT/TATS/DIGAN/PVDM code)


@dataclass
class EvalConfig:
    protocol: str = "shapes"  # a named preset, configs/protocol/<name>.yaml: sets every eval key that defines a number
    metrics: list[str] = field(default_factory=lambda: list(METRICS))  # any of METRICS; empty = skip evaluation
    num_samples: int = 32  # generated videos scored per evaluation (the paper protocol: 2048)
    num_real: int = 512  # real clips behind the real statistics (capped at the split size; paper: 2048)
    real_split: str = "train"  # StyleGAN-V computes real statistics on the training videos
    clip_seed: int = 0  # seed of the real clips' order and temporal offsets
    # which real clips and how they are resized (evaluation/stylegan_v.py): "seeded" = dataset.eval_clip (seeded
    # order and offsets, the dataset's crop + area resize); "stylegan-v" = its first videos by name, its offsets
    real_selection: str = "seeded"
    real_resize: str = "area"  # area | lanczos-center-crop (StyleGAN-V's data preparation) | lanczos-center-crop-tv010
    real_jpeg_quality: int | None = None  # JPEG round trip of real frames (StyleGAN-V's frame folders: 75); null: none
    detector: str = "shapes"  # FVD / R-FVD features: shapes | i3d_torchscript | i3d | videomae
    is_detector: str = "shapes"  # IS and conditional-accuracy probabilities: shapes | c3d_torchscript | i3d
    clip_detector: str = "shapes"  # CLIPSIM embeddings: shapes | clip
    paths: DetectorPaths = field(default_factory=DetectorPaths)
    detector_options: DetectorOptions = field(default_factory=DetectorOptions)
    covariance: str = "biased"  # "biased" (N, StyleGAN-V) or "unbiased" (N - 1, VideoGPT / torchmetrics)
    matrix_sqrt: str = "scipy"  # FVD's tr((S1 S2)^1/2): "scipy" (sqrtm, StyleGAN-V / cd-fvd) or "svd" (tf-gan, VideoGPT)
    is_splits: int = 10  # StyleGAN-V: 10 splits of the (seed-42 shuffled) probabilities
    batch_size: int = 16  # videos per sampling / detector batch
    seed: int | None = None  # generation seed (rank r uses seed + r); None = the run's seed
    every_n_steps: int = 0  # >0: EvaluationCallback also evaluates every N steps of the final stage
    cache_real_stats: bool = True  # cache real statistics under <cache_dir>/real_stats/


def protocol_names() -> list[str]:
    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml"))


def protocol_preset(name: str) -> dict:
    """The `eval` keys that protocol `name` fixes (configs/protocol/<name>.yaml)."""
    from omegaconf import OmegaConf

    path = PROTOCOL_DIR / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"unknown eval.protocol {name!r}; choose one of: {', '.join(protocol_names())}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True).get("eval", {})


def protocol_label(ecfg) -> str:
    """`eval.protocol`, with the preset's keys that this config changed: "stylegan-v (modified: covariance)"."""
    preset = protocol_preset(ecfg.protocol)

    def changed(want: dict, node, prefix: str = "") -> list[str]:
        out = []
        for k, v in want.items():
            have = getattr(node, k, None) if not isinstance(node, dict) else node.get(k)
            if isinstance(v, dict):
                out += changed(v, have, f"{prefix}{k}.")
            elif (list(have) if isinstance(v, list) and have is not None else have) != v:
                out.append(prefix + k)
        return out

    diff = changed(preset, ecfg)
    return ecfg.protocol + (f" (modified: {', '.join(diff)})" if diff else "")
