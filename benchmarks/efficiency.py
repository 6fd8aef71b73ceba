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
efficiency_reported.csv sets the papers' figures beside our runs at *our* resolution; the papers
measured at their own settings, which the next mode reproduces.

The papers' efficiency claims at the papers' settings (FLOPs only, on the meta device: no weights,
no GPU; about two minutes on two CPU cores):

    python -m benchmarks.efficiency preset=paper-settings                  # table + resolution sweep
    python -m benchmarks.efficiency preset=paper-settings sweep=false      # the table alone
    python -m benchmarks.efficiency preset=paper-settings resolutions=64,256 exact=true out=DIR
The settings are in configs/efficiency/paper-settings.yaml (`preset=` also takes a YAML path): CMD at
512x1024x16 in Stable Diffusion's latent space (SD-2.1's UNet for content frames, built from its config
dict, a DiT-L/2 motion model, 50 content and 2 x 50 motion DDIM steps, CFG s = 4 on the content model
only, as the official code), a ModelScope-sized latent 3D UNet at the same shape (50 steps with CFG, plus
the SD VAE decode of the 16 frames), PVDM-L at 256x256x16 (400 steps, unconditional) and the pixel VDM
at the same setting. Each is one of the framework's methods, composed like a run (`scale=paper` and the
setting's overrides) and traced through its own `sample(1, ...)`: at 1 step and at 2 steps of each step
count, extrapolated linearly (every step costs the same: exact; `exact=true` traces every step). Two
counts per setting, both in efficiency_paper_settings.csv (columns method, setting, sampling, counted,
ours_tflops, paper_tflops, ratio, ours_vs_baseline, paper_vs_baseline, params_m, parts_tflops, source):
- ours: FLOPs (2 per multiply-add) of every matmul, conv and attention product, CFG's doubled batch
  where the sampler guides, decoders (the method's autoencoder, the SD VAE) included;
- as the paper counts: multiply-adds of conv and linear layers only (attention's QK^T and AV products
  are what per-module counters such as thop, or fvcore with fused attention, do not see), one network
  call per step (traced again with every guidance scale at 1), decoders excluded. This reproduces the
  CMD paper's ModelScope figure (939 TFLOPs) and its per-step training figures (SD UNet 0.34, ModelScope
  9.41 TFLOPs at 512^2x16), so its "TFLOPs" are these multiply-adds.
The same settings timed (meant for a GPU; `bash benchmarks/gpu_bench.sh` runs this and more in one call):

    python -m benchmarks.efficiency preset=paper-settings timing=on [settings=cmd,modelscope] [repeats=3] [train=false]
Each setting in its own subprocess, built with random weights on the accelerator (the CPU where there is none),
under the run's autocast precision. Sampling one video is timed as its FLOPs are counted: every step count at 1,
then each at 1 + 8 alone (median of `repeats` after an untimed run that counts the FLOPs and warms up),
extrapolated linearly; under 30 s in total, one full sample is timed too (`seconds_full`, a check). The time
spent inside the decoders (the method's autoencoder, the SD VAE) is clocked apart, so `seconds_no_decoders` is
what the papers time. Then one AdamW step per training stage at batch 1 (not for a `like:` setting, whose
networks are its base's). efficiency_paper_timing.csv (rewritten after each setting) holds seconds, TFLOPs,
achieved TFLOP/s and its fraction of a bf16 matmul peak probed in the same run, peak memory, the ratio to the
setting's baseline (decoders left out) and the paper's seconds and ratio (`paper.seconds` in the preset).
The resolution sweep (preset key `resolution_sweep`) traces the same models at square resolutions, every
one at 50 steps, into efficiency_vs_resolution.csv and efficiency_vs_resolution.png: TFLOPs per video
(with and without decoders) and each decomposition's cost relative to its baseline (CMD against the
ModelScope-sized UNet, PVDM against the pixel VDM).
"""

from __future__ import annotations

import copy
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
OWN_KEYS = ("methods", "out", "repeats", "timing", "train", "preset", "exact", "sweep", "resolutions", "settings")
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


REPORTED_NOTE = ("the paper's values are at paper_setting, ours at ours_setting: compare the ratios, not the values; "
                 "at the papers' own settings: python -m benchmarks.efficiency preset=paper-settings")


# --- measuring one method ----------------------------------------------------------------------------


def _owners(method) -> dict[int, str]:
    """id(module) -> the name of the method's direct child (network) it belongs to."""
    return {id(mod): name for name, child in method.named_children() for mod in child.modules()}


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: no hooks, every op counted under "Global"."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


@contextmanager
def count_flops(owners: dict[int, str] | None = None, by_op: dict | None = None):
    """Count FLOPs inside the block; yields (counter, per-network dict filled as modules run).

    Ops run while a module of network `n` is executing are credited to `n` (innermost wins);
    ops outside any network go to "(outside networks)". With `by_op` (a dict), it is also filled
    with {(network, op name such as "aten.mm"): FLOPs}.
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
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            # torch's per-module split hooks every module's backward (register_multi_grad_hook), and those
            # hooks break autograd.grad inside a counted loss (a GAN loss's adaptive weight: "A leaf node was
            # passed to _will_engine_execute_node"); the split here is our own (forward hooks below), so
            # every op counts towards "Global" alone
            self.mod_tracker = _GlobalOnly()

        def _count_flops(self, func_packet, out, args, kwargs):
            before = self.flop_counts["Global"].get(func_packet, 0)
            result = super()._count_flops(func_packet, out, args, kwargs)
            after = self.flop_counts["Global"].get(func_packet, 0)
            net = stack[-1] if stack else "(outside networks)"
            per_net[net] += after - before
            if by_op is not None:
                by_op[(net, str(func_packet))] = by_op.get((net, str(func_packet)), 0) + after - before
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


def _time_training(rec: dict, model, cfg, stage: str, batch, device, repeats: int, count: bool = False) -> None:
    """Seconds per optimiser step (AdamW) of `stage` (median of `repeats` after one untimed step) and the peak
    memory of those steps; with `count`, the FLOPs of the untimed step and the trained parameters too."""
    import torch

    model.train()
    params = _freeze_for(model, stage)
    opt = torch.optim.AdamW(params, lr=1e-6)

    def step():
        with _autocast(cfg, device):
            loss = model.loss(stage, batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with PeakMemory(device) as mem:
        with count_flops() if count else nullcontext((None, None)) as (counter, _):
            step()  # not timed: optimiser state allocation, kernel selection
        rec["step_seconds"] = _timed(step, device, repeats)
    rec["train_peak_mb"] = mem.peak_mb
    if count:
        rec.update(train_flops=counter.get_total_flops(), train_params=sum(p.numel() for p in params))


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
        res = mine.get("resolution")
        rows.append({"method": rep.method, "quantity": rep.quantity, "paper_value": rep.value,
                     "paper_baseline": rep.baseline, "paper_baseline_value": rep.baseline_value,
                     "paper_ratio": paper_ratio, "paper_setting": rep.setting, "source": rep.source,
                     "ours_value": value, "ours_vdm_value": ref_value,
                     "ours_ratio_vs_vdm": value / ref_value if value is not None and ref_value else None,
                     "ours_setting": f"{res}x{res}x{mine.get('frames')}, scale={mine.get('scale')}" if res else None,
                     "note": REPORTED_NOTE})
    return rows


def _write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """Written to a temporary file beside `path`, then renamed over it: never half-written."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in r.items()})
    os.replace(tmp, path)


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


# --- the papers' efficiency settings (preset=paper-settings) ------------------------------------------


PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "efficiency"
# The ops of conv and linear layers: what per-module counters (thop; fvcore, which skips fused attention)
# see. The other ops counted here (bmm, baddbmm, scaled-dot-product attention) are attention's QK^T and AV.
LAYER_OPS = frozenset({"aten.mm", "aten.addmm", "aten.convolution", "aten._convolution"})
COUNTED = {
    "ours": "FLOPs (2 per multiply-add) of every matmul, conv and attention product of one sample(1, ...) as "
            "configured: every step, CFG's doubled batch where guided, decoders included",
    "paper": "as the paper counts: multiply-adds of conv and linear layers (attention's QK^T and AV not "
             "counted), one network call per step (no CFG doubling), decoders excluded",
}
COUNTED_SHORT = {"ours": "FLOPs; all ops, CFG, decoders", "paper": "MACs; layers, no CFG, no decoders"}


def load_preset(name: str) -> dict:
    """configs/efficiency/<name>.yaml (or a YAML file's path) as plain dicts; a setting with `like: other`
    extends `other` (its keys win, its `overrides` are appended)."""
    from omegaconf import OmegaConf

    path = Path(name) if name.endswith((".yaml", ".yml")) else PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        choices = ", ".join(sorted(q.stem for q in PRESET_DIR.glob("*.yaml")))
        raise SystemExit(f"error: no efficiency preset {name!r} in {PRESET_DIR}; choose one of: {choices}")
    preset = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    settings = preset["settings"]
    for key, entry in list(settings.items()):
        if "like" in entry:
            base = settings[entry["like"]]
            settings[key] = {**base, **entry, "overrides": [*base.get("overrides", []), *entry.get("overrides", [])]}
    return preset


@contextmanager
def diffusers_from_configs(models: dict):
    """While open, `methods.image_prior.load_diffusers(path)` builds `models[path]` ({"unet": config dict,
    "vae": config dict}) with diffusers' `from_config` instead of reading a folder; other paths load as before."""
    import methods.image_prior as image_prior

    original = image_prior.load_diffusers

    def load(path):
        if str(path) not in models:
            return original(path)
        from diffusers import AutoencoderKL, UNet2DConditionModel

        spec = models[str(path)]
        vae = AutoencoderKL.from_config(spec["vae"]) if spec.get("vae") else None
        return UNet2DConditionModel.from_config(spec["unet"]), vae

    image_prior.load_diffusers = load
    try:
        yield
    finally:
        image_prior.load_diffusers = original


def setting_spec(entry: dict, height: int | None = None, width: int | None = None, frames: int | None = None,
                 steps: int | None = None):
    """(DataSpec the method is built for, run-config overrides, a description) of a preset setting, at its
    own video size or at (frames, height, width) and `steps` when given."""
    from methods.base import DataSpec

    f0, h0, w0 = entry["video"]
    frames, height, width = frames or f0, height or h0, width or w0
    overrides = [f"method={entry['method']}", "scale=paper", f"sample.steps={steps or entry['steps']}",
                 *entry.get("overrides", [])]
    if entry.get("plane_size"):
        overrides.append(f"method.autoencoder.patch={height // entry['plane_size']}")
    where = f"{height}x{width}x{frames}"
    latent = entry.get("latent")
    if latent:
        k = latent["factor"]
        spec = DataSpec(channels=latent["channels"], frames=frames, height=height // k, width=width // k,
                        num_classes=entry.get("num_classes", 0))
        where += f", latent {latent['channels']}x{height // k}x{width // k}"
    else:
        spec = DataSpec(channels=3, frames=frames, height=height, width=width, num_classes=entry.get("num_classes", 0))
        where += f", latent 4x{height // 8}x{width // 8}" if "method.space=latent" in overrides else ", pixels"
    return spec, overrides, where


def _parts(method) -> dict[str, object]:
    """The networks of a method by name; a child holding a VAE (an image prior) is split into its own children
    (e.g. CMD's content.denoiser and content.vae)."""
    parts = {}
    for name, child in method.named_children():
        if getattr(child, "vae", None) is not None:
            parts.update({f"{name}.{sub}": m for sub, m in child.named_children()})
        else:
            parts[name] = child
    return parts


def is_decoder(part: str) -> bool:
    """Decoders (a method's autoencoder, only decoding while sampling, and any VAE): the papers leave them out."""
    return part == "autoencoder" or part.split(".")[-1] == "vae"


def _unguided(cfg):
    """A copy of `cfg` with every classifier-free guidance scale at 1 (none): one network call per step."""
    from omegaconf import OmegaConf

    cfg = copy.deepcopy(cfg)
    cfg.sample.guidance = 1.0

    def walk(node):
        for key in list(node.keys()):
            value = node[key]
            if OmegaConf.is_dict(value):
                walk(value)
            elif str(key).endswith("guidance") and isinstance(value, int | float):
                node[key] = 1.0

    walk(cfg.method)
    return cfg


def _step_knobs(cfg) -> dict[str, int]:
    """Every step count of a run config that sampling's cost is linear in: sample.steps and any method key
    `*_steps` that is set (e.g. CMD's method.sampling.motion_steps), dotted key -> value."""
    from omegaconf import OmegaConf

    knobs = {"sample.steps": int(cfg.sample.steps)}

    def walk(node, prefix):
        for key in node.keys():
            value = node[key]
            if OmegaConf.is_dict(value):
                walk(value, f"{prefix}{key}.")
            elif str(key).endswith("_steps") and isinstance(value, int) and not isinstance(value, bool):
                knobs[f"{prefix}{key}"] = value

    walk(cfg.method, "method.")
    return knobs


def _with_values(cfg, values: dict):
    """A copy of `cfg` with dotted keys set."""
    from omegaconf import OmegaConf

    cfg = copy.deepcopy(cfg)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def _sampling_text(method, steps: int, guidance: float) -> str:
    if hasattr(method, "sampling_settings"):  # CMD: content and motion models
        cs, ms, wc, wm = method.sampling_settings(steps, guidance)
        cfg_text = lambda w: f"CFG s={w:g}" if w != 1 else "no CFG"  # noqa: E731
        return f"{cs} content ({cfg_text(wc)}) + {ms} motion ({cfg_text(wm)})"
    denoiser = getattr(method, "denoiser", None)
    guided = guidance != 1 and denoiser is not None and denoiser.embedder.enabled
    return f"{steps} (CFG s={guidance:g})" if guided else f"{steps} (no CFG)"


def measure_setting(preset: dict, name: str, *, height: int | None = None, width: int | None = None,
                    frames: int | None = None, steps: int | None = None, exact: bool = False,
                    counts: tuple[str, ...] = ("ours", "paper")) -> dict:
    """FLOPs of one video at a preset setting, traced on the meta device, per network and per op.

    `counts`: "ours" traces the sampler as configured; "paper" traces it again with every guidance scale at
    1 for the paper's convention (COUNTED). `exact`: trace every sampling step; otherwise each step count at
    1 and at 2, extrapolated linearly (every step costs the same, so this is exact too; the tests check it).
    """
    import torch
    from omegaconf import OmegaConf

    from benchmarks.common import build_method
    from benchmarks.config import load_config
    from methods.base import Conditioning

    entry = preset["settings"][name]
    spec, overrides, where = setting_spec(entry, height, width, frames, steps)
    cfg = load_config(overrides)
    n = cfg.sample.steps
    label = torch.zeros(1, dtype=torch.long, device="meta") if spec.num_classes else None
    cond = Conditioning(label=label)
    vae = None
    if entry.get("latent"):  # a latent-space baseline: the SD VAE decodes every frame of its sample
        from diffusers import AutoencoderKL

        vae = on_meta(lambda: AutoencoderKL.from_config(preset["diffusers"][entry["latent"]["diffusers"]]["vae"]))
    built: dict[str, object] = {}

    def build(c):
        """The method for `c` on meta, built once per method config (the run's steps and guidance are not in it)."""
        key = OmegaConf.to_yaml(c.method)
        if key not in built:
            with diffusers_from_configs(preset.get("diffusers", {})):
                built[key] = on_meta(lambda: build_method(c, spec)).eval()
        return built[key]

    def trace(c) -> dict:
        method = build(c)
        owners = {id(m): part for part, mod in _parts(method).items() for m in mod.modules()}
        by_op: dict = {}
        with torch.no_grad():
            with count_flops(owners, by_op):
                out = method.sample(1, cond, steps=c.sample.steps, guidance=c.sample.guidance, generator=None,
                                    eta=c.sample.eta)
            if vae is not None:
                with count_flops({id(m): "vae" for m in vae.modules()}, by_op):
                    vae.decode(out.transpose(1, 2).flatten(0, 1) / vae.config.scaling_factor)  # (T, 4, h, w)
        return by_op

    def count(c) -> dict:
        """{(network, op): FLOPs} of one sample at `c`'s step counts."""
        if exact:
            return trace(c)
        knobs = _step_knobs(c)  # the cost is linear in each step count: trace at 1, then each at 2
        ones = dict.fromkeys(knobs, 1)
        base = trace(_with_values(c, ones))
        total = dict(base)
        for key, steps_k in knobs.items():
            two = trace(_with_values(c, {**ones, key: 2}))
            for k in {*base, *two}:
                total[k] = total.get(k, 0) + (steps_k - 1) * (two.get(k, 0) - base.get(k, 0))
        return total

    method = build(cfg)
    parts: dict[str, dict] = defaultdict(lambda: {"flops": 0, "unguided_flops": 0, "paper_macs": 0})
    res = {"name": name, "label": entry.get("label", name), "method": entry["method"], "setting": where,
           "steps": n, "sampling": _sampling_text(method, n, cfg.sample.guidance),
           "params": sum(p.numel() for p in method.parameters()) + (
               sum(p.numel() for p in vae.parameters()) if vae is not None else 0)}
    if "ours" in counts:
        ours = count(cfg)
        for (part, _), v in ours.items():
            parts[part]["flops"] += v
        res["total_flops"] = sum(ours.values())
        res["denoiser_flops"] = sum(v for (part, _), v in ours.items() if not is_decoder(part))
    if "paper" in counts:
        for (part, op), v in count(_unguided(cfg)).items():
            parts[part]["unguided_flops"] += v
            if not is_decoder(part) and op in LAYER_OPS:
                parts[part]["paper_macs"] += v // 2
        res["paper_macs"] = sum(p["paper_macs"] for p in parts.values())
    res["parts"] = {k: dict(v, decoder=is_decoder(k)) for k, v in parts.items() if any(v.values())}
    return res


def paper_setting_rows(results: list[dict], preset: dict) -> list[dict]:
    """Two rows per setting: as we count, and as the paper counts (beside the paper's figure)."""
    by_name = {r["name"]: r for r in results}
    rows = []
    for r in results:
        paper = preset["settings"][r["name"]].get("paper", {})
        base = by_name.get(paper.get("baseline"))
        base_paper = preset["settings"].get(paper.get("baseline"), {}).get("paper", {}).get("tflops")
        for kind, key in (("ours", "total_flops"), ("paper", "paper_macs")):
            if key not in r:
                continue
            ours = r[key] / 1e12
            theirs = paper.get("tflops") if kind == "paper" else None
            part_key = "flops" if kind == "ours" else "paper_macs"
            rows.append({
                "method": r["label"], "setting": r["setting"], "sampling": r["sampling"], "counted": COUNTED[kind],
                "ours_tflops": ours, "paper_tflops": theirs, "ratio": ours / theirs if theirs else None,
                "baseline": base["label"] if base else None,
                "ours_vs_baseline": ours / (base[key] / 1e12) if base and base.get(key) else None,
                "paper_vs_baseline": theirs / base_paper if theirs and base and base_paper else None,
                "params_m": r["params"] / 1e6,
                "parts_tflops": {k: v[part_key] / 1e12 for k, v in r["parts"].items() if v[part_key]},
                "source": paper.get("source", ""), "kind": kind})
    return rows


def paper_settings_markdown(rows: list[dict]) -> str:
    head = ["method", "setting", "sampling steps", "counted", "ours TFLOPs", "paper TFLOPs", "ours / paper",
            "vs baseline: ours", "vs baseline: paper"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["setting"], r["sampling"], COUNTED_SHORT[r["kind"]], _g(r["ours_tflops"], 4),
                 _g(r["paper_tflops"], 4), _g(r["ratio"]),
                 f"{_g(r['ours_vs_baseline'])} ({r['baseline']})" if r["ours_vs_baseline"] is not None else "",
                 _g(r["paper_vs_baseline"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def resolution_sweep(preset: dict, resolutions: list[int] | None = None, exact: bool = False) -> list[dict]:
    """TFLOPs per video of every sweep setting at square resolutions (see the preset's `resolution_sweep`)."""
    sweep = preset["resolution_sweep"]
    rows = []
    for name in sweep["settings"]:
        for res in resolutions or sweep["resolutions"]:
            r = measure_setting(preset, name, height=res, width=res, frames=sweep["frames"], steps=sweep["steps"],
                                exact=exact, counts=("ours",))
            rows.append({"method": r["label"], "name": name, "resolution": res, "frames": sweep["frames"],
                         "setting": r["setting"], "sampling": r["sampling"], "tflops": r["total_flops"] / 1e12,
                         "denoiser_tflops": r["denoiser_flops"] / 1e12, "params_m": r["params"] / 1e6,
                         "parts_tflops": {k: v["flops"] / 1e12 for k, v in r["parts"].items()}})
    return rows


def resolution_plot(rows: list[dict], preset: dict, path: Path) -> Path:
    """TFLOPs per video against resolution (solid: everything; dashed: decoders left out) and each
    decomposition's cost relative to its baseline (below 1: it pays off)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = preset["settings"]
    names = list(dict.fromkeys(r["name"] for r in rows))
    color = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    fig, (ax, rel) = plt.subplots(1, 2, figsize=(12, 5.6))
    for n in names:
        mine = sorted((r for r in rows if r["name"] == n), key=lambda r: r["resolution"])
        xs = [r["resolution"] for r in mine]
        ax.plot(xs, [r["tflops"] for r in mine], "o-", color=color[n], label=f"{mine[0]['method']}: {mine[0]['sampling']}")
        ax.plot(xs, [r["denoiser_tflops"] for r in mine], "--", color=color[n], alpha=0.6)
        base = settings[n].get("paper", {}).get("baseline")
        if base in names:
            ref = {r["resolution"]: r for r in rows if r["name"] == base}
            pairs = [(r["resolution"], r["tflops"] / ref[r["resolution"]]["tflops"],
                      r["denoiser_tflops"] / ref[r["resolution"]]["denoiser_tflops"]) for r in mine if r["resolution"] in ref]
            rel.plot([p[0] for p in pairs], [p[1] for p in pairs], "o-", color=color[n],
                     label=f"{settings[n].get('label', n)} / {settings[base].get('label', base)}")
            rel.plot([p[0] for p in pairs], [p[2] for p in pairs], "--", color=color[n], alpha=0.6)
    for a in (ax, rel):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xticks(sorted({r["resolution"] for r in rows}))
        a.set_xticklabels([f"{x}x{x}" for x in sorted({r["resolution"] for r in rows})])
        a.set_xlabel(f"resolution ({rows[0]['frames']} frames)")
        a.grid(True, which="both", alpha=0.3)
    rel.axhline(1.0, color="gray", lw=1)
    ax.set_ylabel("sampling TFLOPs per video")
    ax.set_title("TFLOPs per video (solid: with decoders; dashed: without)", fontsize=10)
    rel.set_ylabel("decomposed / its baseline")
    rel.set_title("relative cost (below 1: the decomposition pays off)", fontsize=10)
    for a in (ax, rel):  # below the panels, clear of the lines
        a.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def paper_settings_main(opts: dict) -> list[dict]:
    """`preset=<name>`: the table of the papers' settings, the resolution sweep and its plot."""
    preset = load_preset(opts["preset"])
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in opts["settings"] or preset["table"]:
        t0 = time.perf_counter()
        results.append(measure_setting(preset, name, exact=opts["exact"]))
        print(f"[{name}] traced ({time.perf_counter() - t0:.0f}s)", flush=True)
    rows = paper_setting_rows(results, preset)
    _write_csv(out / "efficiency_paper_settings.csv", rows)
    print(paper_settings_markdown(rows))
    written = ["efficiency_paper_settings.csv"]
    if opts["sweep"] and preset.get("resolution_sweep"):
        t0 = time.perf_counter()
        sweep = resolution_sweep(preset, opts["resolutions"], exact=opts["exact"])
        _write_csv(out / "efficiency_vs_resolution.csv", sweep)
        resolution_plot(sweep, preset, out / "efficiency_vs_resolution.png")
        print(f"[resolution sweep] traced ({time.perf_counter() - t0:.0f}s)")
        print(resolution_markdown(sweep))
        written += ["efficiency_vs_resolution.csv", "efficiency_vs_resolution.png"]
    print(f"wrote {out}/" + ", ".join(written))
    return rows


def resolution_markdown(rows: list[dict]) -> str:
    resolutions = sorted({r["resolution"] for r in rows})
    head = ["method", *(f"{x}x{x} TFLOPs (no decoders)" for x in resolutions)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in dict.fromkeys(r["name"] for r in rows):
        by_res = {r["resolution"]: r for r in rows if r["name"] == name}
        cells = [next(iter(by_res.values()))["method"]]
        cells += [f"{_g(by_res[x]['tflops'], 4)} ({_g(by_res[x]['denoiser_tflops'], 4)})" if x in by_res else ""
                  for x in resolutions]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- the papers' settings, timed (preset=... timing=on; meant for a GPU) --------------------------------


TIMING_COLUMNS = ("method", "setting", "kind", "sampling", "device", "seconds", "decoder_seconds",
                  "seconds_no_decoders", "seconds_method", "seconds_full",
                  "tflops", "achieved_tflops_per_s", "fraction_of_peak", "peak_gb", "baseline", "seconds_vs_baseline",
                  "paper_seconds", "paper_vs_baseline", "paper_peak_gb", "paper_hardware", "peak_probe_tflops",
                  "params_m", "error")


def _set_knob(method, key: str, value) -> None:
    """Set a dotted `method.*` step knob on a built method's own config (read at sampling time)."""
    node = method.cfg
    *path, leaf = key.split(".")[1:]
    for part in path:
        node = getattr(node, part)
    setattr(node, leaf, value)


class DecoderClock:
    """Seconds spent inside the given modules' forward calls (outermost calls only, synchronised on entry and
    exit), accumulated while open: how long a sample spends in its decoders."""

    def __init__(self, roots, device) -> None:
        self.ids = {id(m) for r in roots for m in r.modules()}
        self.device = device
        self.seconds = 0.0
        self._depth = 0
        self._t0 = 0.0

    def __enter__(self):
        import torch

        def pre(module, args):
            if id(module) in self.ids:
                if self._depth == 0:
                    _sync(self.device)
                    self._t0 = time.perf_counter()
                self._depth += 1

        def post(module, args, output):
            if id(module) in self.ids:
                self._depth -= 1
                if self._depth == 0:
                    _sync(self.device)
                    self.seconds += time.perf_counter() - self._t0

        self._hooks = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
                       torch.nn.modules.module.register_module_forward_hook(post)]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return False


def _timed(fn, device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _build_for_timing(entry: dict, preset: dict, cfg, spec, device):
    """(method, SD VAE or None) with random weights on `device`: built there directly, or on the CPU and moved
    where a constructor does not allow that (e.g. a CPU generator)."""
    import torch

    from benchmarks.common import build_method

    def build():
        torch.manual_seed(cfg.seed)
        with diffusers_from_configs(preset.get("diffusers", {})):
            method = build_method(cfg, spec)
        vae = None
        if entry.get("latent"):
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_config(preset["diffusers"][entry["latent"]["diffusers"]]["vae"])
        return method, vae

    try:
        with torch.device(device):
            method, vae = build()
    except Exception:  # noqa: BLE001 - a constructor that insists on the CPU
        method, vae = build()
    method = method.to(device).eval()
    return method, (vae.to(device).eval() if vae is not None else None)


def time_setting(preset: dict, name: str, device, *, repeats: int = 3, probe_steps: int = 8,
                 full_below: float = 30.0, train: bool = True) -> dict:
    """Seconds (and achieved TFLOP/s, peak memory) of one video at a preset setting, random weights on `device`.

    Sampling is timed as the FLOPs are counted: every step knob (`_step_knobs`) at 1, then each knob at
    1 + `probe_steps` alone, each configuration the median of `repeats` runs after an untimed run that counts
    its FLOPs (and warms up); the seconds are extrapolated linearly to the setting's step counts (every step
    costs the same). Where that total is under `full_below` seconds, one full sample is timed as well
    (`seconds_full`: a check of the extrapolation). With `train`, one optimiser step (AdamW) per stage at
    batch 1: FLOPs counted on the untimed first step, then the median of `repeats` steps.
    """
    import torch

    from benchmarks.config import load_config
    from methods.base import Conditioning

    entry = preset["settings"][name]
    spec, overrides, where = setting_spec(entry)
    accel = "gpu" if device.type == "cuda" else "cpu"
    cfg = load_config([*overrides, f"trainer.accelerator={accel}"])
    res: dict = {"name": name, "method": entry.get("label", name), "setting": where, "device": _device_name(device)}
    method, vae = _build_for_timing(entry, preset, cfg, spec, device)
    res["params_m"] = (sum(p.numel() for p in method.parameters())
                       + (sum(p.numel() for p in vae.parameters()) if vae is not None else 0)) / 1e6
    res["sampling"] = _sampling_text(method, cfg.sample.steps, cfg.sample.guidance)
    label = torch.zeros(1, dtype=torch.long, device=device) if spec.num_classes else None
    cond = Conditioning(label=label)
    knobs = _step_knobs(cfg)
    method_knobs = {k: v for k, v in knobs.items() if k != "sample.steps"}
    g = torch.Generator(device=device)

    def sample(values: dict) -> None:
        for key, value in method_knobs.items():
            _set_knob(method, key, values.get(key, value))
        with torch.no_grad(), _autocast(cfg, device):
            out = method.sample(1, cond, steps=values.get("sample.steps", cfg.sample.steps),
                                guidance=cfg.sample.guidance, generator=g.manual_seed(0), eta=cfg.sample.eta)
            if vae is not None:
                vae.decode(out.to(vae.dtype).transpose(1, 2).flatten(0, 1) / vae.config.scaling_factor)

    def counted(values: dict) -> int:
        with count_flops() as (counter, _):
            sample(values)
        return counter.get_total_flops()

    ones = dict.fromkeys(knobs, 1)
    decoders = [mod for part, mod in _parts(method).items() if is_decoder(part)] + ([vae] if vae is not None else [])
    with PeakMemory(device) as mem:
        flops1 = counted(ones)
        t1 = _timed(lambda: sample(ones), device, repeats)
        with DecoderClock(decoders, device) as clock:  # decoding does not depend on the step counts
            _timed(lambda: sample(ones), device, repeats)
        res["decoder_seconds"] = clock.seconds / repeats
        seconds, flops = t1, flops1
        for key, n in knobs.items():
            if n <= 1:
                continue
            more = {**ones, key: 1 + probe_steps}
            flops_k = counted(more)
            if flops_k == flops1:  # a knob that sampling does not use
                continue
            t_k = _timed(lambda more=more: sample(more), device, repeats)
            seconds += (n - 1) * (t_k - t1) / probe_steps
            flops += (n - 1) * (flops_k - flops1) // probe_steps
    res.update(kind="sample", seconds=seconds, seconds_no_decoders=seconds - res["decoder_seconds"],
               tflops=flops / 1e12, peak_gb=mem.peak_mb / 1024,
               seconds_method=f"median of {repeats}, extrapolated from 1 and 1 + {probe_steps} steps per step count")
    if seconds < full_below:
        res["seconds_full"] = _timed(lambda: sample(knobs), device, 1)
    rows = [res]
    if train:
        rows += [_time_train_step(res, method, cfg, stage, device, repeats) for stage in method.stages]
    return {"rows": rows}


def _time_train_step(sample_row: dict, method, cfg, stage: str, device, repeats: int) -> dict:
    import torch

    row = {k: sample_row[k] for k in ("name", "method", "setting", "device")}
    row.update(kind=f"train:{stage}", sampling="one optimiser step (AdamW), batch 1")
    try:
        _, batch = _inputs(cfg, method, None, 1)
        rec: dict = {}
        _time_training(rec, method, cfg, stage, batch.to(device), device, repeats, count=True)
        row.update(seconds=rec["step_seconds"], tflops=rec["train_flops"] / 1e12, peak_gb=rec["train_peak_mb"] / 1024,
                   seconds_method=f"median of {repeats} steps after one untimed", params_m=rec["train_params"] / 1e6)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: the row says so, the other stages go on
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:  # the optimiser's state went with `_time_training`'s frame
        method.zero_grad(set_to_none=True)
        method.eval()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


def peak_probe_tflops(device) -> float:
    """The device's best bf16 matmul rate (TFLOP/s): 8192^2 products on a GPU, the CPU probe's 2048^2 elsewhere."""
    import torch

    from benchmarks.machine import matmul_gflops

    n = 8192 if device.type == "cuda" else None
    return matmul_gflops(torch.bfloat16, n=n, seconds_budget=2.0, min_repeats=5, device=device) / 1e3


def timing_rows(rows: list[dict], preset: dict, peak: float) -> list[dict]:
    """Adds achieved TFLOP/s, the fraction of the peak probe, and each sampling row's ratio to its baseline and
    the paper's figures (from the preset's `paper.seconds`, `paper.peak_gb`, `paper.hardware`)."""
    samples = {r["name"]: r for r in rows if r.get("kind") == "sample" and r.get("seconds")}
    for r in rows:
        r["peak_probe_tflops"] = peak
        if r.get("seconds") and r.get("tflops"):
            r["achieved_tflops_per_s"] = r["tflops"] / r["seconds"]
            r["fraction_of_peak"] = r["achieved_tflops_per_s"] / peak
        if r.get("kind") != "sample":
            continue
        paper = preset["settings"][r["name"]].get("paper", {})
        base = samples.get(paper.get("baseline"))
        r["baseline"] = base["method"] if base else paper.get("baseline")
        if base and r.get("seconds"):  # the papers time the denoisers: decoders left out
            r["seconds_vs_baseline"] = r["seconds_no_decoders"] / base["seconds_no_decoders"]
        r["paper_seconds"] = paper.get("seconds")
        r["paper_peak_gb"] = paper.get("peak_gb")
        r["paper_hardware"] = paper.get("hardware")
        base_paper = preset["settings"].get(paper.get("baseline"), {}).get("paper", {}).get("seconds")
        if paper.get("seconds") and base_paper:
            r["paper_vs_baseline"] = paper["seconds"] / base_paper
    return rows


def timing_markdown(rows: list[dict]) -> str:
    head = ["method", "setting", "what", "device", "seconds", "(full run)", "no decoders", "TFLOPs", "TFLOP/s",
            "of peak", "peak GB", "vs baseline (no decoders)", "paper s", "paper vs baseline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        what = r["sampling"] if r["kind"] == "sample" else r["kind"]
        if r.get("error"):
            lines.append(f"| {r['method']} | {r['setting']} | {what} | {r.get('device', '')} | failed: {r['error']} |"
                         + " |" * (len(head) - 5))
            continue
        frac = r.get("fraction_of_peak")
        cells = [r["method"], r["setting"], what, r.get("device", ""), _g(r.get("seconds")), _g(r.get("seconds_full")),
                 _g(r.get("seconds_no_decoders")), _g(r.get("tflops"), 4), _g(r.get("achieved_tflops_per_s")),
                 f"{frac:.0%}" if frac else "",
                 _g(r.get("peak_gb")), _g(r.get("seconds_vs_baseline")), _g(r.get("paper_seconds")),
                 _g(r.get("paper_vs_baseline"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _time_in_subprocess(preset_name: str, name: str, argv: list[str]) -> list[dict]:
    """`time_setting` in a fresh interpreter: an out-of-memory crash or a memory peak stays with its setting."""
    rows = _in_subprocess(["--timing-worker", preset_name, name], argv)
    return [{"name": name, "kind": "sample", **rows}] if isinstance(rows, dict) else rows


def paper_timing_main(opts: dict) -> list[dict]:
    """`preset=<name> timing=on`: every setting of the preset's table (or `settings=`) timed on this machine's
    accelerator, each in its own subprocess; efficiency_paper_timing.csv is rewritten after each setting."""
    import torch

    preset = load_preset(opts["preset"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    names = opts["settings"] or preset["table"]
    unknown = [n for n in names if n not in preset["settings"]]
    if unknown:
        raise SystemExit(f"error: no setting(s) {unknown} in preset {opts['preset']}; "
                         f"choose from: {', '.join(preset['settings'])}")
    peak = peak_probe_tflops(device)
    print(f"[peak probe] bf16 matmul on {_device_name(device)}: {peak:.1f} TFLOP/s", flush=True)
    worker_args = [f"repeats={opts['repeats']}", f"train={opts['train']}"]
    rows: list[dict] = []
    for name in names:
        t0 = time.perf_counter()
        print(f"[{name}] timing ...", flush=True)
        got = _time_in_subprocess(opts["preset"], name, worker_args)
        for r in got:
            r.setdefault("method", preset["settings"][name].get("label", name))
            r.setdefault("setting", "")
            r.setdefault("sampling", "")
        rows += got
        failed = [r["error"] for r in got if r.get("error")]
        print(f"[{name}] {'; '.join(failed) if failed else 'done'} ({time.perf_counter() - t0:.0f}s)", flush=True)
        timing_rows(rows, preset, peak)
        _write_csv(out / "efficiency_paper_timing.csv", rows, list(TIMING_COLUMNS))
    print(timing_markdown(rows))
    print(f"wrote {out}/efficiency_paper_timing.csv")
    return rows


# --- command line ----------------------------------------------------------------------------------------


def _parse(argv: list[str]) -> tuple[dict, list[str]]:
    opts = {"methods": None, "out": "results/efficiency", "repeats": 1, "timing": "auto", "train": True,
            "preset": None, "exact": False, "sweep": True, "resolutions": None, "settings": None}
    rest = []
    for a in argv:
        key, _, value = a.partition("=")
        if key not in OWN_KEYS:
            rest.append(a)
        elif key in ("methods", "settings"):
            opts[key] = [m for m in value.split(",") if m]
        elif key == "repeats":
            opts["repeats"] = max(1, int(value))
        elif key == "timing":
            if value not in ("auto", "on", "off"):
                raise SystemExit(f"error: timing must be auto, on or off, got {value!r}")
            opts["timing"] = value
        elif key in ("train", "exact", "sweep"):
            opts[key] = value.lower() in ("1", "true", "yes", "on")
        elif key == "resolutions":
            opts["resolutions"] = [int(r) for r in value.split(",") if r]
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


def _in_subprocess(worker: list[str], argv: list[str]):
    """`python -m benchmarks.efficiency <worker...> <result.json> <argv...>` in a fresh interpreter; its JSON
    result, or {"error": ...} with the last line it printed where it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                          env.get("PYTHONPATH")]))
        proc = subprocess.run([sys.executable, "-m", "benchmarks.efficiency", *worker, str(out), *argv],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"error": f"worker exited {proc.returncode}: {tail[0]}"}
        return json.loads(out.read_text())


def _measure_in_subprocess(method: str, argv: list[str]) -> dict:
    """`measure` in a fresh interpreter: memory peaks of one method cannot leak into another's."""
    res = _in_subprocess(["--worker", method], argv)
    return {"method": method, **res} if "error" in res else res


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
    if argv[:1] == ["--timing-worker"]:  # one preset setting timed, rows as JSON (see _time_in_subprocess)
        import torch

        torch.backends.cudnn.benchmark = True  # as a GPU training run would; the untimed first runs tune it

        preset_name, name, path, argv = argv[1], argv[2], Path(argv[3]), argv[4:]
        opts, _ = _parse(argv)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        preset = load_preset(preset_name)
        train = opts["train"] and "like" not in preset["settings"][name]  # `like`: the same networks as another
        res = time_setting(preset, name, device, repeats=opts["repeats"], train=train)
        path.write_text(json.dumps(res["rows"], default=str))
        return []

    opts, rest = _parse(argv)
    if opts["preset"]:
        if rest or opts["methods"]:
            raise SystemExit(f"error: preset={opts['preset']} takes only out=, exact=, sweep=, resolutions=, "
                             f"settings=, timing=, repeats= and train=; its settings are in "
                             f"configs/efficiency/{opts['preset']}.yaml (got {rest or argv})")
        if opts["timing"] == "on":  # seconds on this machine's accelerator; otherwise FLOPs on meta
            return paper_timing_main(opts)
        return paper_settings_main(opts)
    from benchmarks.common import chosen_methods

    methods = chosen_methods(opts["methods"])
    methods = sorted(methods, key=lambda m: m != BASELINE)  # the baseline first
    argv = argv + matched_shape(methods[0], rest)
    results = []
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    for m in methods:
        t0 = time.perf_counter()
        print(f"[{m}] measuring ...", flush=True)
        r = _measure_in_subprocess(m, argv)
        print(f"[{m}] {'error: ' + r['error'] if 'error' in r else 'done'} ({time.perf_counter() - t0:.0f}s)",
              flush=True)
        results.append(r)
        with_ratios(results)
        _write_csv(out / "efficiency.csv", results, list(MAIN_COLUMNS))  # after each method: a stopped run keeps it
    _write_csv(out / "efficiency_parts.csv", parts_rows(results))
    _write_csv(out / "efficiency_reported.csv", reported_rows(results))
    bar_chart(results, out / "efficiency.png")
    print(markdown(results))
    print(f"wrote {out}/efficiency.csv, efficiency_parts.csv, efficiency_reported.csv, efficiency.png "
          "(the papers' figures at their own settings: preset=paper-settings)")
    return results


if __name__ == "__main__":
    main()
