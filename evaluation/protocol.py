"""The one evaluation protocol: generate, detect, score, and record how.

    evaluate_method(method, datamodule, cfg)     sample with the method, score; DDP-sharded
    evaluate_videos(batches, datamodule, cfg)    score videos produced elsewhere (benchmarks.evaluate)
    evaluate_run(cfg, method, datamodule, dir)   evaluate_method + TensorBoard scalars (benchmarks.run)

Protocol (reference/metrics.md): the real set is `eval.num_real` clips of `eval.real_split`
(`dataset.eval_clip(i, eval.clip_seed)`), its detector statistics cached on disk. Generated
video i is conditioned like real clip i (its label and caption), so the generated set has
the real set's class / caption distribution. Under DDP, rank r generates the contiguous block
`shard(n, r, world)` of indices with a generator seeded `seed + r`: no sample twice, none
padded; the metrics gather across ranks. Every number comes back with the fields that
define it (detector and sha256, counts, frames, stride, resolution, covariance, sampler,
steps, guidance and its convention, seed) in one flat dict, ready for the results row, with
how the FVD's matrix square root was taken (`fvd_sqrt_method`, `fvd_fallback_eps`), and the
`task` the numbers belong to (`evaluation.grid.task_of`: "class", "image+class", ...).

Image-to-video methods (`method.image_to_video`: D-VDM, ED-VDM) are given first frames of
**held-out** clips: generated video i starts from the first frame of clip i of the `val` split
(`FIRST_FRAME_SPLIT`, `dataset.eval_clip(i, eval.clip_seed)`) and is conditioned on that clip's
label and caption, in `evaluate_method` and in `benchmarks.run`'s samples alike
(`clip_conditioning`). Their FVD reference is the same real set as every other method's,
`eval.real_split` (train by default): the first frames then come from clips that the model
never trained on and that are not in the reference set, so a model cannot score by
reproducing a reference clip from its first frame, and the i2v rows share their real
statistics with the other rows of the dataset. Taking the val clips themselves as the
reference would turn FVD into a paired reconstruction score (the held-out clips would score
0 against themselves: the `ceiling:real-val` reference of `benchmarks.race` would be trivial).
Rows record `first_frame_split`, and `task` keeps image-to-video numbers out of the columns of
class-to-video ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from evaluation.config import METRICS, protocol_label
from evaluation.detectors import Detector, load_detector
from evaluation.distributed import dist_info, shard
from evaluation.grid import task_of
from evaluation.metrics import CLIPSIM, FVD, ConditionalAccuracy, VideoInceptionScore
from evaluation.real_stats import RealSet, eval_clip_loader, load_or_compute_real_set
from evaluation.stylegan_v import RealClips
from methods.base import Conditioning
from methods.diffusion import GUIDANCE_CONVENTION


def _get(node, key: str, default=None):
    """Attribute access that works for dataclasses, DictConfigs and missing keys alike."""
    try:
        value = getattr(node, key)
    except (AttributeError, KeyError):
        return default
    return default if value is None else value


def sampler_name(cfg) -> str | None:
    """The sampler named by the method config (as the results row records it)."""
    diffusion = _get(cfg.method, "diffusion") if _get(cfg, "method") is not None else None
    return _get(diffusion, "sampler") if diffusion is not None else None


MAX_CONFUSION_CLASSES = 32  # rows keep the confusion counts up to this many classes (per-class accuracy always)


class Scorer:
    """Streams generated videos through the detectors into the metrics; `compute()` -> flat dict.

    metrics: any of METRICS except "rfvd" (R-FVD is scored by a second Scorer on reconstructions).
    """

    def __init__(self, metrics: list[str], ecfg, real: RealSet | None, detectors: dict[str, Detector],
                 num_classes: int = 0, class_names: list[str] | None = None) -> None:
        self.metrics, self.real, self.det = list(metrics), real, detectors
        self.num_classes = num_classes
        device = next(iter(detectors.values())).device if detectors else torch.device("cpu")
        self.fvd = FVD(covariance=ecfg.covariance, sqrt=_get(ecfg, "matrix_sqrt", "scipy")).to(device)
        if real is not None:
            self.fvd.set_reference(real.stats)
        self.isv = VideoInceptionScore(splits=ecfg.is_splits).to(device)
        self.class_names = list(class_names or [])
        self.clipsim = CLIPSIM().to(device)
        self.acc = ConditionalAccuracy(num_classes).to(device)
        self.n = 0

    def update(self, videos: Tensor, index: Tensor, labels: Tensor | None = None, texts: list[str] | None = None):
        """videos (B, C, T, H, W) in [-1, 1] or uint8; index (B,) global sample indices; the conditioning."""
        self.n += len(videos)
        if "fvd" in self.metrics:
            self.fvd.update(self.det["fvd"].features(videos))
        probs = None
        if "is" in self.metrics or ("cond_acc" in self.metrics and labels is not None):
            probs = self.det["is"].probs(videos)
        if "is" in self.metrics:
            self.isv.update(probs, index.to(probs.device))
        if "cond_acc" in self.metrics and labels is not None:
            self.acc.update(probs, labels.to(probs.device))
        if "clipsim" in self.metrics and texts is not None:
            self.clipsim.update(*self.det["clip"].clip_embeddings(videos, texts))

    def compute(self) -> dict:
        out: dict = {}
        if "fvd" in self.metrics:
            out["fvd"] = float(self.fvd.compute())
            out["fvd_sqrt_method"], out["fvd_fallback_eps"] = self.fvd.sqrt_method, self.fvd.fallback_eps
        if "is" in self.metrics:
            mean, std = self.isv.compute()
            out["is"], out["is_std"] = float(mean), float(std)
        if "cond_acc" in self.metrics and int(self.acc.total) > 0:
            out["cond_acc"] = float(self.acc.compute())
            if self.acc.num_classes:
                names = (self.class_names if len(self.class_names) == self.acc.num_classes
                         else [str(k) for k in range(self.acc.num_classes)])
                out["cond_acc_per_class"] = {n: (None if math.isnan(a) else a)
                                             for n, a in zip(names, self.acc.per_class().tolist(), strict=True)}
                if self.acc.num_classes <= MAX_CONFUSION_CLASSES:
                    out["cond_confusion"] = {"rows": names, "columns": [*names, "another evaluator class"],
                                             "counts": self.acc.confusion().tolist()}
        if "clipsim" in self.metrics and int(self.clipsim.count) > 0:
            out["clipsim"] = float(self.clipsim.compute())
        return out


def _class_names(datamodule) -> list[str]:
    return list(getattr(datamodule, "class_names", None) or [])


def plan(ecfg, datamodule, has_autoencoder: bool = False) -> tuple[list[str], dict[str, str]]:
    """(metrics to compute, {metric: why it is skipped}) for this data and method."""
    unknown = [m for m in ecfg.metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"eval.metrics: unknown metric(s) {unknown}; choose from {list(METRICS)}")
    skipped = {}
    if "cond_acc" in ecfg.metrics and datamodule.num_classes == 0:
        skipped["cond_acc"] = "the dataset has no class labels"
    if "clipsim" in ecfg.metrics and not datamodule.has_captions:
        skipped["clipsim"] = "the dataset has no captions"
    if "rfvd" in ecfg.metrics and not has_autoencoder:
        skipped["rfvd"] = "the method has no autoencoder"
    return [m for m in ecfg.metrics if m not in skipped], skipped


def load_detectors(ecfg, metrics: list[str], device) -> dict[str, Detector]:
    """{"fvd" | "is" | "clip": Detector} for the metrics requested (each detector file loaded once)."""
    roles = {"fvd": ecfg.detector, "is": ecfg.is_detector, "clip": ecfg.clip_detector}
    needs = {"fvd": {"fvd", "rfvd"}, "is": {"is", "cond_acc"}, "clip": {"clipsim"}}
    out = {}
    for role, name in roles.items():
        if needs[role] & set(metrics):
            out[role] = load_detector(name, _get(ecfg.paths, name), device, options=_get(ecfg, "detector_options"))
    return out


def real_set(ecfg, datamodule, detector: Detector, cache_dir: str | Path | None, num_workers: int = 0) -> RealSet:
    """The real statistics (and conditioning) for this protocol, from the cache when present.

    eval.real_selection / real_resize / real_jpeg_quality pick and prepare the clips (evaluation.stylegan_v).
    """
    return load_or_compute_real_set(
        datamodule.dataset(ecfg.real_split), datamodule.dataset_cfg, ecfg.real_split, detector, ecfg.num_real,
        ecfg.clip_seed, cache_dir if ecfg.cache_real_stats else None, ecfg.batch_size, num_workers,
        real_clips=RealClips.of(ecfg))


FIRST_FRAME_SPLIT = "val"  # where image-to-video methods get their first frames: held-out clips (module docstring)


def clip_conditioning(ds, indices, clip_seed: int | None = 0, first_frame: bool = False) -> Conditioning:
    """Conditioning like real clips `indices` of dataset split `ds` (wrapping around it): their labels, captions
    and, with `first_frame`, first frames (C, H, W). Clip i is `ds.eval_clip(i, clip_seed)`, the clip the
    evaluation protocol means by "clip i of the split" (clip_seed=None: `ds[i]`)."""
    if len(ds) == 0:
        raise ValueError(f"the {ds.split!r} split is empty: no clips to condition on")
    items = [ds[i % len(ds)] if clip_seed is None else ds.eval_clip(i % len(ds), clip_seed) for i in indices]
    label = torch.tensor([it["label"] for it in items]) if all(it.get("label", -1) >= 0 for it in items) else None
    text = [it["text"] for it in items] if all(it.get("text") is not None for it in items) else None
    ff = torch.stack([it["video"][:, 0] for it in items]) if first_frame else None
    return Conditioning(label=label, text=text, first_frame=ff)


def held_out_conditioning(datamodule, indices, clip_seed: int | None = 0) -> Conditioning:
    """An image-to-video method's conditioning of generated videos `indices`: held-out (val) clip i's first
    frame, label and caption (see the module docstring for why val, and what the FVD reference is)."""
    return clip_conditioning(datamodule.dataset(FIRST_FRAME_SPLIT), indices, clip_seed, first_frame=True)


def _conditioning(real: RealSet | None, indices: list[int]) -> tuple[Tensor | None, list[str] | None]:
    """Labels / captions of real clips `indices` (wrapping around the real set)."""
    if real is None:
        return None, None
    n = real.stats.n
    labels = torch.tensor([real.labels[i % n] for i in indices]) if real.labels is not None else None
    texts = [real.texts[i % n] for i in indices] if real.texts is not None else None
    return labels, texts


def dataset_labels(ds) -> list[int] | None:
    """The class label of every video of a split, without decoding (None when the dataset cannot say)."""
    if hasattr(ds, "samples"):
        labels = [int(getattr(s, "label", -1)) for s in ds.samples]
    elif hasattr(ds, "attributes"):
        labels = [int(ds.attributes(i)["label"]) for i in range(len(ds))]
    else:
        return None
    return labels if labels and all(lbl >= 0 for lbl in labels) else None


def drawn_labels(real: RealSet | None, real_ds, ecfg, n: int) -> list[int] | None:
    """StyleGAN-V's conditioning of the generated set: n labels drawn uniformly from the whole split.

    With `eval.real_selection=stylegan-v` the real clips are the first videos by name (on UCF-101 only the
    alphabetically first classes), so conditioning generated video i like real clip i would skew the
    generated classes the same way; StyleGAN-V instead draws each label from a random video of the
    dataset (seeded here by eval.clip_seed). None: condition like the real clips (`_conditioning`).
    """
    if _get(ecfg, "real_selection", "seeded") != "stylegan-v" or real is None or real.labels is None:
        return None
    pool = dataset_labels(real_ds)
    if pool is None:
        return None
    g = torch.Generator().manual_seed(int(_get(ecfg, "clip_seed", 0)))
    return [pool[int(i)] for i in torch.randint(len(pool), (n,), generator=g)]


def real_stride(cfg, real: RealSet | None) -> int | None:
    """The frame stride of the REAL clips: the real set's own protocol, else cfg.dataset.stride.

    Generated videos may be scored at another stride (benchmarks.evaluate reads them at 1); the
    real side is what fixes the protocol's temporal sampling, so that is what is recorded.
    """
    if real is not None and real.protocol.get("stride") is not None:
        return real.protocol["stride"]
    return _get(_get(cfg, "dataset"), "stride")


def protocol_fields(cfg, ecfg, dets: dict[str, Detector], real: RealSet | None, n_gen: int, video_shape,
                    seed: int | None, world: int) -> dict:
    """The fields that define the numbers (recorded beside them in the results row).

    fvd_protocol: fvd{n_gen}_{frames}f_s{stride} (StyleGAN-V's fvd2048_16f with the real clips'
    frame stride made explicit). is_protocol names the split convention and the detector that
    produced the probabilities (StyleGAN-V's isv2048_ucf is this convention on c3d_torchscript).
    guidance_convention: how `guidance` is to be read (methods.diffusion.GUIDANCE_CONVENTION).
    """
    sample = _get(cfg, "sample")
    frames, resolution = None, None
    if video_shape is not None:  # (C, T, H, W)
        h, w = video_shape[2], video_shape[3]
        frames, resolution = video_shape[1], h if h == w else f"{h}x{w}"
    stride = real_stride(cfg, real)
    is_detector = dets["is"].name if "is" in dets else ecfg.is_detector
    out = {"eval_protocol": protocol_label(ecfg) if _get(ecfg, "protocol") else None,
           "n_gen": n_gen, "n_real": real.stats.n if real is not None else None, "frames": frames,
           "resolution": resolution, "covariance": ecfg.covariance,
           "matrix_sqrt": _get(ecfg, "matrix_sqrt", "scipy"), "real_split": ecfg.real_split,
           "clip_seed": ecfg.clip_seed, "real_stats_cached": real.from_cache if real is not None else None,
           "sampler": sampler_name(cfg), "steps": _get(sample, "steps"), "guidance": _get(sample, "guidance"),
           "guidance_convention": GUIDANCE_CONVENTION,
           "eta": _get(sample, "eta"), "eval_seed": seed, "eval_world_size": world,
           "fvd_protocol": f"fvd{n_gen}_{frames}f_s{stride}" if frames is not None else None,
           "is_protocol": f"stylegan-v isv{n_gen} ({ecfg.is_splits} splits, seed-42 shuffle) on {is_detector}"}
    for role, prefix in (("fvd", "detector"), ("is", "is_detector"), ("clip", "clip_detector")):
        if role in dets:
            out[prefix], out[f"{prefix}_sha256"] = dets[role].name, dets[role].sha256
            if dets[role].options:  # settings beyond the file that change the numbers (e.g. the I3D's BatchNorm eps)
                out[f"{prefix}_options"] = dict(dets[role].options)
    return out


@torch.no_grad()
def evaluate_method(method, datamodule, cfg, *, num_samples: int | None = None, seed: int | None = None,
                    cache_dir: str | Path | None = None, autocast: bool | None = None) -> dict:
    """Sample `eval.num_samples` videos from `method`, score them, return metrics + protocol fields.

    method: a VideoGenerator (pass the EMA weights: see EvaluationCallback); datamodule: the
    VideoDataModule it was trained on; cfg: the run config (uses cfg.eval, cfg.sample,
    cfg.method, cfg.cache_dir, cfg.seed, cfg.trainer.precision). Call it on every rank under
    DDP: generation is sharded and the metrics reduce across ranks.
    """
    ecfg = cfg.eval
    t0 = time.perf_counter()
    rank, world = dist_info()
    metrics, skipped = plan(ecfg, datamodule, method.has_autoencoder)
    n = num_samples if num_samples is not None else ecfg.num_samples
    if n < world:
        raise ValueError(f"eval.num_samples={n} is smaller than the {world} processes generating them")
    seed = seed if seed is not None else _get(ecfg, "seed", _get(cfg, "seed", 0))
    autocast = autocast if autocast is not None else str(_get(_get(cfg, "trainer"), "precision", "")).startswith("bf16")
    cache_dir = cache_dir if cache_dir is not None else _get(cfg, "cache_dir", "cache")
    device = method.device
    dets = load_detectors(ecfg, metrics + ["fvd"], device)  # the FVD detector also yields the real conditioning
    real = real_set(ecfg, datamodule, dets["fvd"], cache_dir, _get(_get(cfg, "data"), "num_workers", 0))
    scorer = Scorer([m for m in metrics if m != "rfvd"], ecfg, real, dets, datamodule.num_classes,
                    _class_names(datamodule))
    sample, bs = cfg.sample, ecfg.batch_size
    g = torch.Generator(device=device).manual_seed(int(seed) + rank)  # per-rank stream: seed + rank
    was_training = method.training
    method.eval()
    mine, shape, t_sample = list(shard(n, rank, world)), None, 0.0
    real_ds = datamodule.dataset(ecfg.real_split)
    image_to_video = bool(getattr(method, "image_to_video", False))
    drawn = None if image_to_video else drawn_labels(real, real_ds, ecfg, n)
    for start in range(0, len(mine), bs):
        idx = mine[start:start + bs]
        if image_to_video:  # held-out clip i: its first frame, label and caption (never a training/reference clip)
            cond = held_out_conditioning(datamodule, idx, ecfg.clip_seed)
            labels = cond.label if real is not None and real.labels is not None else None
            texts = cond.text if real is not None and real.texts is not None else None
            cond = Conditioning(label=labels, text=texts, first_frame=cond.first_frame)
        else:
            labels, texts = _conditioning(real, idx)
            if drawn is not None:
                labels = torch.tensor([drawn[i] for i in idx])
            cond = Conditioning(label=labels, text=texts)
        cond = cond.to(device)
        ts = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            videos = method.sample(len(idx), cond, steps=sample.steps, guidance=sample.guidance, generator=g,
                                   eta=_get(sample, "eta", 0.0)).float()
        t_sample += time.perf_counter() - ts
        shape = tuple(videos.shape[1:])
        scorer.update(videos, torch.tensor(idx), labels, texts)
    out = scorer.compute()
    if "rfvd" in metrics:
        out["rfvd"], out["n_rec"], out["rfvd_fallback_eps"] = reconstruction_fvd(
            method, real_ds, dets["fvd"], ecfg, min(n, real.stats.n))
    method.train(was_training)
    out.update(protocol_fields(cfg, ecfg, dets, real, n, shape, seed, world))
    out["task"] = task_of(_get(cfg, "method") or {}, image_to_video)
    if image_to_video:
        out["first_frame_split"] = FIRST_FRAME_SPLIT
    out["skipped_metrics"] = skipped
    out["eval_sample_seconds_per_video"] = t_sample / max(1, len(mine))
    out["eval_seconds"] = time.perf_counter() - t0
    return out


@torch.no_grad()
def reconstruction_fvd(method, real_ds, detector: Detector, ecfg, n: int) -> tuple[float, int, float | None]:
    """R-FVD between the first n real clips and their `method.reconstruct`ions (the same clips, paired).

    Returns (R-FVD, n, the eps its Fréchet fallback added: None on the plain sqrtm path).
    """
    rank, world = dist_info()
    fvd = FVD(covariance=ecfg.covariance, sqrt=_get(ecfg, "matrix_sqrt", "scipy")).to(detector.device)
    for batch in eval_clip_loader(real_ds, shard(n, rank, world), ecfg.clip_seed, ecfg.batch_size):
        video = batch["video"].to(method.device)
        fvd.update(detector.features(video), real=True)
        fvd.update(detector.features(method.reconstruct(video).float().clamp(-1, 1)))
    value = float(fvd.compute())
    return value, n, fvd.fallback_eps


@torch.no_grad()
def evaluate_videos(batches: Iterable[tuple[Tensor, Tensor | None, list[str] | None]], datamodule, cfg, *,
                    cache_dir: str | Path | None = None, n_total: int | None = None) -> dict:
    """Score videos made elsewhere: batches of (videos (B, C, T, H, W) in [-1, 1] or uint8, labels|None, texts|None).

    Labels / captions, when given, are what each video was conditioned on (for conditional
    accuracy and CLIPSIM). Single process.
    """
    ecfg = cfg.eval
    t0 = time.perf_counter()
    metrics, skipped = plan(ecfg, datamodule, has_autoencoder=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dets = load_detectors(ecfg, metrics + ["fvd"], device)
    cache_dir = cache_dir if cache_dir is not None else _get(cfg, "cache_dir", "cache")
    real = real_set(ecfg, datamodule, dets["fvd"], cache_dir)
    scorer = Scorer(metrics, ecfg, real, dets, datamodule.num_classes, _class_names(datamodule))
    shape, count = None, 0
    for videos, labels, texts in batches:
        scorer.update(videos, torch.arange(count, count + len(videos)), labels, texts)
        count += len(videos)
        shape = tuple(videos.shape[1:])
    if count == 0:
        raise ValueError("no videos to evaluate")
    out = scorer.compute()
    for m in ("cond_acc", "clipsim"):
        if m in metrics and m not in out:
            skipped[m] = "the videos carry no " + ("labels" if m == "cond_acc" else "captions")
    out.update(protocol_fields(cfg, ecfg, dets, real, count, shape, None, 1))
    out.update({"skipped_metrics": skipped, "eval_seconds": time.perf_counter() - t0})
    return out


def numeric(metrics: dict) -> dict[str, float]:
    """The scores among a result dict (what is logged to TensorBoard)."""
    return {k: float(v) for k, v in metrics.items() if k in (*METRICS, "is_std") and isinstance(v, int | float)}


def evaluate_run(cfg, method, datamodule, run_dir: str | Path) -> dict:
    """benchmarks.run's hook: evaluate the trained (EMA) method, log scalars to TensorBoard on rank 0."""
    out = evaluate_method(method, datamodule, cfg)
    if dist_info()[0] == 0:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(Path(run_dir) / "tensorboard" / "eval")) as w:
            for k, v in numeric(out).items():
                w.add_scalar(f"eval/{k}", v, 0)
        scores = " ".join(f"{k}={v:.4g}" for k, v in numeric(out).items())
        print(f"evaluation ({out['n_gen']} generated vs {out['n_real']} real, detector {out.get('detector')}): {scores}")
    return out
