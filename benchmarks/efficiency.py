"""Cost of every registered method at matched resolution and frames: parameters, FLOPs, time, memory.

    python -m benchmarks.efficiency scale=tiny                     # CPU, every method, timed
    python -m benchmarks.efficiency methods=vdm,cmd scale=paper    # FLOPs and parameters (timed on a GPU)
    python -m benchmarks.efficiency scale=tiny repeats=3 out=results/efficiency sample.steps=50
Own options: methods=a,b (default: every method in methods.METHODS), out=DIR (default
results/efficiency), repeats=N (timed repetitions, default 1), timing=auto|on|off (auto: on,
except scale=paper without a GPU), train=true|false (per-stage training cost). Everything else
is a run-config override applied to every method (dataset=, dataset.resolution=, sample.steps=, ...).
Every method runs at the same dataset.resolution and dataset.frames (the first method's, VDM's
when it is measured), so the comparison is at matched resolution and frames.

What is measured, per method (each in its own subprocess, so memory peaks do not mix):
- parameters: total, per stage, and per network (the method's direct child modules);
- FLOPs per generated video: torch.utils.flop_counter over one whole `sample(1, ...)` call with
  the run's configured steps and guidance (every sampling step, CFG's doubled batch and the
  decoder included). It is traced on the `meta` device (shapes only, no arithmetic, exact for
  the same code path), falling back to a real run when a method cannot trace. Counted: matmul,
  conv and attention FLOPs (2 per multiply-add); element-wise ops are not;
- sampling seconds per video: separate un-instrumented runs (median of `repeats`, after a
  one-step warm-up), under the run's autocast precision;
- peak memory: on CUDA the allocator's peak (weights included); on CPU the peak resident-set
  increase over the loaded model (weights excluded), read from VmHWM after resetting it through
  /proc/self/clear_refs (or a ru_maxrss difference, a lower bound, where that is unavailable);
- training, per stage: FLOPs of one forward + backward at the stage's batch size, seconds per
  optimiser step (AdamW) and the peak memory of those steps (a stage with random per-sample
  branches, e.g. PVDM's clip-conditional training, costs a little differently each step: one draw).
Untimed on a CPU (scale=paper), a part that cannot trace on meta is counted on a shortened real
run (1 and 2 sampling steps extrapolated; a training step at batch 1 times the batch size) and
the `flops_method` column says so.
Outputs in out/: efficiency.csv (one row per method, ratios vs VDM in their own columns),
efficiency_parts.csv (per network and per stage), efficiency_reported.csv (the papers' numbers
beside ours), efficiency.png (bar charts); the main table is printed as Markdown.
"""

from __future__ import annotations

import csv
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

USAGE = __doc__
OWN_KEYS = ("methods", "out", "repeats", "timing", "train")
BASELINE = "vdm"  # ratios are against this method
RATIOS = {"params": "params_vs_vdm", "sample_gflops": "gflops_vs_vdm", "sample_seconds": "seconds_vs_vdm",
          "sample_peak_mb": "mem_vs_vdm", "train_gflops_per_video": "train_gflops_vs_vdm"}


# --- the papers' numbers (../shared/reference/methods.md) ----------------------------------------------


@dataclass(frozen=True)
class Reported:
    """A cost a paper reports for a method beside a video-diffusion baseline measured in the same setting."""

    method: str  # our registry name
    quantity: str  # sample_tflops | sample_seconds | sample_peak_gb | train_tflops:<stage> | speedup
    value: float  # the paper's number for the method
    baseline: str  # the paper's baseline
    baseline_value: float | None  # the paper's number for that baseline
    setting: str  # resolution, hardware, precision, what is excluded
    source: str


REPORTED = (
    Reported("cmd", "sample_tflops", 46.8, "ModelScope", 939, "512x1024x16 latent, A100 fp16, batch 1, "
             "decoder excluded", "CMD (arXiv 2403.14148), efficiency comparison; LVDM: 626"),
    Reported("cmd", "sample_seconds", 3.13, "ModelScope", 35.1, "512x1024x16 latent, A100 fp16, batch 1",
             "CMD (arXiv 2403.14148); LVDM: 24.2 s"),
    Reported("cmd", "sample_peak_gb", 5.56, "ModelScope", 8.5, "512x1024x16 latent, A100 fp16, batch 1",
             "CMD (arXiv 2403.14148); LVDM: 8.4 GB"),
    Reported("cmd", "train_tflops:autoencoder", 0.77, "ModelScope", 9.41, "512^2x16, per training step",
             "CMD (arXiv 2403.14148); LVDM: 6.28"),
    Reported("cmd", "train_tflops:content", 0.34, "ModelScope", 9.41, "512^2x16, per training step",
             "CMD (arXiv 2403.14148)"),
    Reported("cmd", "train_tflops:motion", 0.14, "ModelScope", 9.41, "512^2x16, per training step",
             "CMD (arXiv 2403.14148)"),
    Reported("pvdm", "sample_seconds", 20.4, "VDM", 113.0, "256x256x16, RTX 3090Ti (VDM: > 113 s)",
             "PVDM (arXiv 2302.07685) [unverified secondary]"),
    Reported("pvdm", "sample_peak_gb", 5.22, "VDM", 11.1, "256x256x16, RTX 3090Ti",
             "PVDM (arXiv 2302.07685) [unverified secondary]"),
    Reported("edvdm", "speedup", 110.0, "pixel-space video diffusion", 1.0, "training and inference",
             "D-VDM/ED-VDM (arXiv 2311.14294) [measurement unverified]"),
)


# --- measuring one method ----------------------------------------------------------------------------


def _owners(method) -> dict[int, str]:
    """id(module) -> the name of the method's direct child (network) it belongs to."""
    return {id(mod): name for name, child in method.named_children() for mod in child.modules()}


@contextmanager
def count_flops(owners: dict[int, str] | None = None):
    """Count FLOPs inside the block; yields (counter, per-network dict filled as modules run).

    Ops run while a module of network `n` is executing are credited to `n` (innermost wins);
    ops outside any network go to "(outside networks)".
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    aten = torch.ops.aten
    # the CPU flash-attention kernel is not in torch's FLOP registry: count it like the other SDPA kernels
    extra = {aten._scaled_dot_product_flash_attention_for_cpu:
             _as_raw(flop_registry[aten._scaled_dot_product_flash_attention]),
             aten._scaled_dot_product_flash_attention_for_cpu_backward:
             _as_raw(flop_registry[aten._scaled_dot_product_flash_attention_backward])}
    owners = owners or {}
    per_net: dict[str, int] = defaultdict(int)
    stack: list[str] = []

    class Counter(FlopCounterMode):
        def _count_flops(self, func_packet, out, args, kwargs):
            before = self.flop_counts["Global"].get(func_packet, 0)
            result = super()._count_flops(func_packet, out, args, kwargs)
            after = self.flop_counts["Global"].get(func_packet, 0)
            per_net[stack[-1] if stack else "(outside networks)"] += after - before
            return result

    def pre(module, args):
        if id(module) in owners:
            stack.append(owners[id(module)])

    def post(module, args, output):
        if id(module) in owners and stack:
            stack.pop()

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
             torch.nn.modules.module.register_module_forward_hook(post)]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # nn.MultiheadAttention's fused eval kernel is not counted
    counter = Counter(display=False, custom_mapping=extra)
    try:
        with counter:
            yield counter, per_net
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in hooks:
            h.remove()


def _as_raw(formula):
    """A registry formula (already shape-wrapped) marked so FlopCounterMode does not wrap it again."""
    def f(*args, **kwargs):
        return formula(*args, **kwargs)

    f._get_raw = True
    return f


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or the CPU resident-set high-water mark increase."""

    def __init__(self, device) -> None:
        self.device = device
        self.peak_mb: float | None = None
        self.kind = ""

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max allocated (weights included)"
        else:
            _release_free_memory()  # so memory freed by an earlier measurement is not silently reused
            self.base_kb = _status_kb("VmRSS")
            self.hwm_reset = _reset_hwm()
            self.maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.kind = ("cpu peak RSS increase (weights excluded)" if self.hwm_reset
                         else "cpu ru_maxrss increase (lower bound)")
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.hwm_reset:
            self.peak_mb = max(0, _status_kb("VmHWM") - self.base_kb) / 1024
        else:
            self.peak_mb = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.maxrss0) / 1024
        return False


def _release_free_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the OS (glibc malloc_trim; no-op elsewhere)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def _reset_hwm() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _autocast(cfg, device):
    import torch

    prec = str(cfg.trainer.precision)
    dtype = torch.bfloat16 if prec.startswith("bf16") else torch.float16 if prec.startswith("16") else None
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _inputs(cfg, method, dm, batch_size: int):
    """(conditioning for one video, a training batch of `batch_size`) drawn from the dataset when it is there."""
    import torch

    from benchmarks.common import real_conditioning
    from methods.base import Conditioning, VideoBatch

    spec = method.data
    if dm is not None:
        cond = real_conditioning(dm, 1, "val", first_frame=method.image_to_video)
        batch = next(iter(dm.loader_for("train", shuffle=False, drop_last=False, batch_size=batch_size)))
        if len(batch) == batch_size:
            return cond, batch
    label = torch.zeros(batch_size, dtype=torch.long) if spec.num_classes else None
    text = ["a video"] * batch_size if spec.captions else None
    video = torch.rand(batch_size, *spec.video_shape) * 2 - 1
    batch = VideoBatch(video=video, label=label, text=text)
    cond = Conditioning(label=None if label is None else label[:1], text=None if text is None else text[:1],
                        first_frame=video[:1, :, 0] if method.image_to_video else None)
    return cond, batch


def _freeze_for(method, stage: str) -> list:
    """Make only `stage`'s parameters trainable (as the training system does); returns them.

    The flags a method set when it was built (e.g. a frozen VAE) are restored first, since
    `stage_parameters` may filter on them.
    """
    built = method.__dict__.setdefault("_built_requires_grad", {id(p): p.requires_grad for p in method.parameters()})
    for p in method.parameters():
        p.requires_grad_(built[id(p)])
    if hasattr(method, "on_stage_start"):
        method.on_stage_start(stage)
    params = method.stage_parameters(stage)
    ids = {id(p) for p in params}
    for p in method.parameters():
        p.requires_grad_(id(p) in ids)
    return params


def _flops(build, cfg, cond, batches: dict, stages: list[str], meta_model=None, cheap: bool = False,
           real_device: str = "cpu") -> dict:
    """FLOPs of one sample(1, ...) call (total and per network) and of one training step per stage.

    Each part is traced on `meta_model` (built on the meta device) when given; a part whose code
    needs data (e.g. boolean-mask indexing) is run for real on `real_device` instead (a model from
    `build()`; None: no fallback) and named in `real`. With `cheap` (paper sizes on a CPU) that
    real run is shortened: sampling is counted at 1 and 2 steps and extrapolated linearly to the
    configured steps; a training step is counted at batch size 1 and multiplied by the batch size.
    """
    import torch

    models = {"meta": meta_model}
    out: dict = {"sample": {}, "train": {}, "real": [], "errors": []}

    def model_on(device: str):
        if models.get(device) is None:
            models[device] = build().to(device)
        return models[device]

    def sample(m, device, steps=cfg.sample.steps):
        m.eval()
        with count_flops(_owners(m)) as (counter, per_net):
            m.sample(1, cond.to(device), steps=steps, guidance=cfg.sample.guidance, generator=None,
                     eta=cfg.sample.eta)
        return {"total": counter.get_total_flops(), "networks": dict(per_net)}

    def sample_extrapolated(m, device):
        one, two, n = sample(m, device, 1), sample(m, device, 2), cfg.sample.steps
        line = lambda a, b: a + (n - 1) * (b - a)  # noqa: E731 - every step costs the same
        nets = {k: line(one["networks"].get(k, 0), two["networks"].get(k, 0)) for k in two["networks"]}
        return {"total": line(one["total"], two["total"]), "networks": nets}

    def train_step(m, device, stage, batch=None):
        m.train()
        _freeze_for(m, stage)
        try:
            with count_flops() as (counter, _):
                m.loss(stage, (batch or batches[stage]).to(device))["loss"].backward()
        finally:
            m.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    def train_step_batch1(m, device, stage):
        b = batches[stage]
        one = type(b)(video=b.video[:1], label=None if b.label is None else b.label[:1],
                      text=None if b.text is None else b.text[:1])
        return train_step(m, device, stage, one) * len(b)

    parts = [("sample", sample, sample_extrapolated, "sample (counted at 1 and 2 steps, extrapolated)")]
    parts += [(f"training:{s}", lambda m, d, s=s: train_step(m, d, s), lambda m, d, s=s: train_step_batch1(m, d, s),
               f"training:{s} (counted at batch 1, x batch size)") for s in stages]
    for name, fn, cheap_fn, cheap_name in parts:
        devices = (["meta"] if meta_model is not None else []) + ([real_device] if build is not None else [])
        for device in devices:
            try:
                with torch.no_grad() if name == "sample" else nullcontext():
                    value = (cheap_fn if cheap and device != "meta" else fn)(model_on(device), device)
                break
            except Exception as e:  # noqa: BLE001 - meta cannot trace data-dependent code: run it for real
                if device == devices[-1]:
                    raise
                out["errors"].append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        if device != "meta":
            out["real"].append(cheap_name if cheap else name)
        if name == "sample":
            out["sample"] = value
        else:
            out["train"][name.split(":", 1)[1]] = value
    return out


def on_meta(build):
    """`build()` on the meta device: weights without storage, so paper sizes cost nothing to trace.

    The final `.to("meta")` catches tensors a constructor made outside the device context (it
    happens after transformers has loaded a model in the same process, which leaves factory
    functions such as `torch.linspace` on the CPU for buffers like a noise schedule).
    """
    import torch

    with torch.device("meta"):
        return build().to("meta")


def sample_gflops(cfg, dm) -> float | None:
    """GFLOPs of one generated video, traced on the meta device (the results row's `gflops_per_video`).

    Cheap (no arithmetic, no weights); None where a method cannot be traced on meta.
    """
    from benchmarks.common import build_method, data_spec, real_conditioning

    try:
        method = on_meta(lambda: build_method(cfg, data_spec(cfg, dm)))
        cond = real_conditioning(dm, 1, "val", first_frame=method.image_to_video)
        return _flops(None, cfg, cond, {}, [], method)["sample"]["total"] / 1e9
    except Exception:  # noqa: BLE001 - a cost figure must never fail a run
        return None


def measure(method_name: str, overrides: list[str], repeats: int = 1, timing: str = "auto",
            train: bool = True) -> dict:
    """Every cost of one method (see the module docstring); errors become an `error` field."""
    import torch

    from benchmarks.common import build_datamodule, build_method, data_spec
    from benchmarks.config import ConfigError, load_config, stage_settings
    from methods.base import DataSpec

    res: dict = {"method": method_name}
    try:
        cfg = load_config([f"method={method_name}", *overrides])
    except ConfigError as e:
        return {**res, "error": f"config: {e}"}
    ds = cfg.dataset
    try:
        dm = build_datamodule(cfg)
        spec = data_spec(cfg, dm)
    except (FileNotFoundError, ValueError, OSError):  # data not on this machine: shapes from the config alone
        dm = None
        spec = DataSpec(channels=ds.channels, frames=ds.frames, height=ds.resolution, width=ds.resolution,
                        num_classes=getattr(ds, "num_classes", 0) or 0, captions=False)
    cuda = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    device = torch.device("cuda" if cuda else "cpu")
    timed = timing == "on" or (timing == "auto" and (cuda or cfg.scale != "paper"))
    res.update(scale=cfg.scale, dataset=ds.name, resolution=ds.resolution, frames=ds.frames, steps=cfg.sample.steps,
               guidance=cfg.sample.guidance, precision=cfg.trainer.precision, device=device.type)

    def build():
        torch.manual_seed(cfg.seed)
        return build_method(cfg, spec)

    try:
        probe = on_meta(build)
    except Exception:  # noqa: BLE001 - a method that cannot be built on meta is built for real below
        probe = None
    shaped = probe if probe is not None else build()  # what the inputs must look like
    stages = list(shaped.stages) if train else []
    batch_sizes = {s: stage_settings(cfg, s)["batch_size"] for s in stages}
    cond, _ = _inputs(cfg, shaped, dm, 1)
    batches = {s: _inputs(cfg, shaped, dm, b)[1] for s, b in batch_sizes.items()}
    flops = _flops(build, cfg, cond, batches, stages, probe, cheap=not timed, real_device=device.type)
    res["flops_method"] = ("traced on the meta device" if not flops["real"] else f"run on {device.type}"
                           if probe is None else f"meta trace; run on {device.type}: {', '.join(flops['real'])}")
    if flops["errors"]:
        res["flops_note"] = "; ".join(flops["errors"])
    model = probe if probe is not None and not timed else build()
    res["params"] = model.num_parameters()
    res["sample_gflops"] = flops["sample"]["total"] / 1e9
    res["networks"] = {name: {"params": sum(p.numel() for p in child.parameters()),
                              "sample_gflops": flops["sample"]["networks"].get(name, 0) / 1e9}
                       for name, child in model.named_children()}
    outside = flops["sample"]["networks"].get("(outside networks)", 0)
    if outside:
        res["networks"]["(outside networks)"] = {"params": 0, "sample_gflops": outside / 1e9}
    res["stages"] = {s: {"params": model.num_parameters(s), "batch_size": batch_sizes[s],
                         "train_gflops_per_step": flops["train"][s] / 1e9,
                         "train_gflops_per_video": flops["train"][s] / 1e9 / batch_sizes[s]} for s in stages}
    res["train_gflops_per_video"] = sum(v["train_gflops_per_video"] for v in res["stages"].values()) or None
    if not timed:
        res["timing_note"] = "not timed (scale=paper without a GPU; timing=on forces it)"
        return res
    model = model.to(device)
    _time_sampling(res, model, cfg, cond.to(device), device, repeats)
    if train:
        for s in stages:
            _time_training(res["stages"][s], model, cfg, s, batches[s].to(device), device, repeats)
    return res


def _time_sampling(res: dict, model, cfg, cond, device, repeats: int) -> None:
    import torch

    model.eval()
    g = torch.Generator(device=device)
    with torch.no_grad(), _autocast(cfg, device):
        model.sample(1, cond, steps=1, guidance=cfg.sample.guidance, generator=g.manual_seed(0), eta=cfg.sample.eta)
        times = []
        with PeakMemory(device) as mem:
            for i in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                model.sample(1, cond, steps=cfg.sample.steps, guidance=cfg.sample.guidance,
                             generator=g.manual_seed(i), eta=cfg.sample.eta)
                _sync(device)
                times.append(time.perf_counter() - t0)
    res.update(sample_seconds=statistics.median(times), sample_peak_mb=mem.peak_mb, mem_kind=mem.kind,
               repeats=repeats)


def _time_training(rec: dict, model, cfg, stage: str, batch, device, repeats: int) -> None:
    import torch

    model.train()
    params = _freeze_for(model, stage)
    opt = torch.optim.AdamW(params, lr=1e-6)
    times = []
    with PeakMemory(device) as mem:
        for i in range(repeats + 1):  # the first step (optimizer state allocation) is not timed
            _sync(device)
            t0 = time.perf_counter()
            with _autocast(cfg, device):
                loss = model.loss(stage, batch)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if i:
                times.append(time.perf_counter() - t0)
    rec.update(step_seconds=statistics.median(times), train_peak_mb=mem.peak_mb)


# --- tables -------------------------------------------------------------------------------------------


MAIN_COLUMNS = ("method", "scale", "device", "precision", "resolution", "frames", "steps", "guidance", "params",
                "sample_gflops", "sample_seconds", "sample_peak_mb", "train_gflops_per_video", *RATIOS.values(),
                "flops_method", "mem_kind", "repeats", "error", "flops_note", "timing_note")


def with_ratios(results: list[dict]) -> list[dict]:
    """Adds <quantity>_vs_vdm columns (method / VDM) where VDM was measured."""
    base = next((r for r in results if r["method"] == BASELINE and "error" not in r), None)
    for r in results:
        for key, col in RATIOS.items():
            a, b = r.get(key), (base or {}).get(key)
            r[col] = a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None
    return results


def parts_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        for name, n in r.get("networks", {}).items():
            rows.append({"method": r["method"], "kind": "network", "name": name, "params": n["params"],
                         "sample_gflops": n["sample_gflops"]})
        for name, s in r.get("stages", {}).items():
            rows.append({"method": r["method"], "kind": "stage", "name": name, **s})
    return rows


def reported_rows(results: list[dict]) -> list[dict]:
    """The papers' numbers beside ours: the comparable quantity is the ratio to each paper's baseline."""
    ours = {r["method"]: r for r in results}
    base = ours.get(BASELINE, {})
    rows = []
    for rep in REPORTED:
        mine, ref = ours.get(rep.method, {}), base
        if rep.quantity.startswith("train_tflops:"):
            stage = rep.quantity.split(":", 1)[1]
            value = mine.get("stages", {}).get(stage, {}).get("train_gflops_per_video")
            ref_value = next(iter(ref.get("stages", {}).values()), {}).get("train_gflops_per_video")
            value, ref_value = (None if v is None else v / 1e3 for v in (value, ref_value))
        else:
            key = {"sample_tflops": "sample_gflops", "sample_seconds": "sample_seconds",
                   "sample_peak_gb": "sample_peak_mb", "speedup": "sample_seconds"}[rep.quantity]
            value, ref_value = mine.get(key), ref.get(key)
            scale = {"sample_gflops": 1e-3, "sample_peak_mb": 1 / 1024}.get(key, 1.0)
            value, ref_value = (None if v is None else v * scale for v in (value, ref_value))
            if rep.quantity == "speedup":  # a speed-up is baseline / method
                value, ref_value = (ref_value / value if value and ref_value else None), 1.0
        paper_ratio = rep.value / rep.baseline_value if rep.baseline_value else None
        if rep.quantity == "speedup":
            paper_ratio = rep.value
        rows.append({"method": rep.method, "quantity": rep.quantity, "paper_value": rep.value,
                     "paper_baseline": rep.baseline, "paper_baseline_value": rep.baseline_value,
                     "paper_ratio": paper_ratio, "paper_setting": rep.setting, "source": rep.source,
                     "ours_value": value, "ours_vdm_value": ref_value,
                     "ours_ratio_vs_vdm": value / ref_value if value is not None and ref_value else None})
    return rows


def _write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in r.items()})


def _g(v, digits: int = 3) -> str:
    if v is None or v == "":
        return ""
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def markdown(results: list[dict]) -> str:
    head = ["method", "params (M)", "GFLOPs/video", "s/video", "peak MB", "train GFLOPs/video",
            "params vs VDM", "GFLOPs vs VDM", "time vs VDM", "mem vs VDM"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | error: {r['error'][:100]} |" + " |" * (len(head) - 2))
            continue
        cells = [r["method"], _g(r["params"] / 1e6), _g(r.get("sample_gflops"), 4), _g(r.get("sample_seconds")),
                 _g(r.get("sample_peak_mb")), _g(r.get("train_gflops_per_video")),
                 *(_g(r.get(c)) for c in ("params_vs_vdm", "gflops_vs_vdm", "seconds_vs_vdm", "mem_vs_vdm"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(results: list[dict], path: Path) -> Path:
    """One panel per quantity, a bar per method (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    panels = [("params", "parameters (M)", 1e-6), ("sample_gflops", "GFLOPs per video", 1.0),
              ("sample_seconds", "sampling s per video", 1.0), ("sample_peak_mb", "peak memory (MB)", 1.0),
              ("train_gflops_per_video", "training GFLOPs per video (all stages)", 1.0)]
    panels = [p for p in panels if any(isinstance(r.get(p[0]), int | float) for r in ok)]
    cols = min(3, max(1, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (key, label, scale) in zip(axes.flat, panels, strict=False):
        names = [r["method"] for r in ok if isinstance(r.get(key), int | float)]
        vals = [r[key] * scale for r in ok if isinstance(r.get(key), int | float)]
        bars = ax.bar(names, vals, color=[plt.cm.tab10(i % 10) for i in range(len(names))])
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in vals], fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30)
        if vals and min(vals) > 0 and max(vals) / min(vals) > 20:  # log only where the range needs it
            ax.set_yscale("log")
    scale = ok[0].get("scale", "") if ok else ""
    where = f"{ok[0]['resolution']}x{ok[0]['resolution']}x{ok[0]['frames']}, {ok[0]['device']}" if ok else ""
    fig.suptitle(f"efficiency at scale={scale} ({where})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- command line ----------------------------------------------------------------------------------------


def _parse(argv: list[str]) -> tuple[dict, list[str]]:
    opts = {"methods": None, "out": "results/efficiency", "repeats": 1, "timing": "auto", "train": True}
    rest = []
    for a in argv:
        key, _, value = a.partition("=")
        if key not in OWN_KEYS:
            rest.append(a)
        elif key == "methods":
            opts["methods"] = [m for m in value.split(",") if m]
        elif key == "repeats":
            opts["repeats"] = max(1, int(value))
        elif key == "timing":
            if value not in ("auto", "on", "off"):
                raise SystemExit(f"error: timing must be auto, on or off, got {value!r}")
            opts["timing"] = value
        elif key == "train":
            opts["train"] = value.lower() in ("1", "true", "yes", "on")
        else:
            opts[key] = value
    return opts, rest


def matched_shape(method: str, overrides: list[str]) -> list[str]:
    """Overrides pinning every method to the first one's resolution and frames (unless given explicitly)."""
    from benchmarks.config import ConfigError, load_config

    given = {o.split("=", 1)[0] for o in overrides}
    try:
        ds = load_config([f"method={method}", *overrides]).dataset
    except ConfigError:
        return []  # the worker reports the error
    return [f"dataset.{k}={getattr(ds, k)}" for k in ("resolution", "frames") if f"dataset.{k}" not in given]


def _measure_in_subprocess(method: str, argv: list[str]) -> dict:
    """`measure` in a fresh interpreter: memory peaks of one method cannot leak into another's."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                          env.get("PYTHONPATH")]))
        proc = subprocess.run([sys.executable, "-m", "benchmarks.efficiency", "--worker", method, str(out), *argv],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"method": method, "error": f"worker exited {proc.returncode}: {tail[0]}"}
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return []
    if argv[:1] == ["--worker"]:  # one method, result as JSON (see _measure_in_subprocess)
        method, path, argv = argv[1], Path(argv[2]), argv[3:]
        opts, rest = _parse(argv)
        path.write_text(json.dumps(measure(method, rest, opts["repeats"], opts["timing"], opts["train"]), default=str))
        return []
    from methods import METHODS

    opts, rest = _parse(argv)
    methods = opts["methods"] or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; registered: {', '.join(METHODS)}")
    methods = sorted(methods, key=lambda m: m != BASELINE)  # the baseline first
    argv = argv + matched_shape(methods[0], rest)
    results = []
    for m in methods:
        t0 = time.perf_counter()
        print(f"[{m}] measuring ...", flush=True)
        r = _measure_in_subprocess(m, argv)
        print(f"[{m}] {'error: ' + r['error'] if 'error' in r else 'done'} ({time.perf_counter() - t0:.0f}s)",
              flush=True)
        results.append(r)
    with_ratios(results)
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "efficiency.csv", results, list(MAIN_COLUMNS))
    _write_csv(out / "efficiency_parts.csv", parts_rows(results))
    _write_csv(out / "efficiency_reported.csv", reported_rows(results))
    bar_chart(results, out / "efficiency.png")
    print(markdown(results))
    print(f"wrote {out}/efficiency.csv, efficiency_parts.csv, efficiency_reported.csv, efficiency.png")
    return results


if __name__ == "__main__":
    main()
