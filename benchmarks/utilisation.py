"""Utilisation, measured: how much of this machine's matmul peak each method's training and sampling reach.

    python -m benchmarks.utilisation scale=tiny                        # every method, a few steps per stage
    python -m benchmarks.utilisation methods=vdm,cmd scale=tiny steps=5
    python -m benchmarks.utilisation methods=cmd profile=true          # + where the time goes (torch.profiler)
Own options: methods=a,b (default: every method in methods.METHODS), out=DIR (default
results/utilisation), steps=N (timed training steps per stage, default 3), sample_batch=B (default
4; sample_batch=cfg uses the run's sample.batch_size), sample=true|false, profile=true|false,
data_ab=true|false (the data wait with the shapes renderer and the batch collation at torch's
thread count, the code before the fix, interleaved step by step with the default single-thread data
path: the `*_before` columns), probe_seconds=S (each peak probe, default 3). Everything else is a run-config
override applied to every method (data.num_workers=2, sample.steps=10, stages.motion.batch_size=8, ...).

Per method and per stage, in one process, beside a matmul peak probe taken in the same process
(`benchmarks.machine`, at the start and the end; the higher counts, so a probe that another
process disturbed lowers the peak rather than inflating the fractions):
- training: FLOPs of one optimiser step (forward + backward of `method.loss(stage, batch)`, counted
  by torch.utils.flop_counter on a real, untimed warm-up step under the run's autocast; matmul,
  conv and attention FLOPs, 2 per multiply-add, as benchmarks.efficiency counts them), then
  `steps` timed steps as the trainer takes them: the next batch from `dm.loader_for("train", ...)`
  (timed on its own: the data wait), forward + backward under autocast, gradient clipping as
  configured, AdamW. Achieved GFLOP/s = FLOPs / median step seconds (data wait included);
  `compute_fraction` leaves the data wait out; `best_fraction` uses the fastest step (the probe is
  a best repeat too: on a shared machine the two best cases compare most fairly). Not timed: EMA
  updates, logging, checkpoints.
- sampling: FLOPs of one `method.sample(B, ...)` call with the run's steps and guidance (traced on
  the meta device; a real counted run where a method cannot trace), and the seconds of one timed
  call after a one-step warm-up, under autocast.
- fraction of peak: achieved GFLOP/s / the probe's GFLOP/s for the run's precision (bf16 for
  bf16-mixed, fp32 otherwise).
- with profile=true, one more step per part (data loading included) under torch.profiler: the share
  of the step spent in the FLOP-counted kernels (matmul, conv, attention), in every other ATen op (element-wise,
  norms, copies: memory-bound), and outside ATen (Python and framework overhead).
Outputs in out/: utilisation.csv (one row per method and part), machine.json (the probe),
utilisation.png (fraction of peak and data-wait share per method and part); the table is
printed as Markdown.
"""

from __future__ import annotations

import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

USAGE = __doc__
OWN_KEYS = ("methods", "out", "steps", "sample_batch", "sample", "profile", "data_ab", "probe_seconds")
GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm", "convolution", "conv", "mkldnn", "scaled_dot_product", "_flash_attention",
            "linear", "matmul", "einsum")  # profiler names of the kernels whose FLOPs are counted


def _truthy(value: str) -> bool:
    return value.lower() in ("1", "true", "yes", "on")


def _parse(argv: list[str]) -> tuple[dict, list[str]]:
    opts = {"methods": None, "out": "results/utilisation", "steps": 3, "sample_batch": 4, "sample": True,
            "profile": False, "data_ab": False, "probe_seconds": 3.0}
    rest = []
    for a in argv:
        key, _, value = a.partition("=")
        if key not in OWN_KEYS:
            rest.append(a)
        elif key == "methods":
            opts["methods"] = [m for m in value.split(",") if m]
        elif key == "sample_batch" and value == "cfg":
            opts[key] = None
        elif key in ("steps", "sample_batch"):
            opts[key] = max(1, int(value))
        elif key in ("sample", "profile", "data_ab"):
            opts[key] = _truthy(value)
        elif key == "probe_seconds":
            opts[key] = float(value)
        else:
            opts[key] = value
    return opts, rest


# --- measuring ---------------------------------------------------------------------------------------


def peak_probe(seconds: float = 3.0) -> dict:
    """bf16 and fp32 matmul GFLOP/s now (60/40 of `seconds`)."""
    from benchmarks.machine import bf16_matmul_gflops, fp32_matmul_gflops

    return {"bf16": bf16_matmul_gflops(0.6 * seconds), "fp32": fp32_matmul_gflops(0.4 * seconds)}


def _peak_kind(cfg) -> str:
    return "bf16" if str(cfg.trainer.precision).startswith("bf16") else "fp32"


def _optimizer(method, stage: str, settings: dict, weight_decay: float):
    """AdamW over the stage's parameters, grouped as lightning_modules.system.StageSystem groups them."""
    import torch

    from lightning_modules.system import optimizer_groups

    lr = settings["lr"]
    return torch.optim.AdamW(optimizer_groups(method, stage, lr), lr=lr, betas=tuple(settings["betas"]),
                             weight_decay=weight_decay)


def train_flops(method, stage: str, batch, cfg, device) -> int:
    """FLOPs of one forward + backward of `method.loss(stage, batch)` (a real step; gradients left in place).

    A loss that takes a gradient inside (PVDM's PatchGAN weight calls autograd.grad) is counted too,
    the gradients it takes included.
    """
    from benchmarks.efficiency import _autocast, count_flops

    with count_flops() as (counter, _):
        with _autocast(cfg, device):
            loss = method.loss(stage, batch.to(device))["loss"]
        loss.backward()
    return counter.get_total_flops()


def profile_split(fn) -> dict:
    """Run `fn()` under torch.profiler: shares of its wall time in counted kernels, other ATen ops and outside ATen.

    Inclusive times of top-level ATen ops (an op called by another op is inside its parent's time; the
    autograd engine's backward ops are top level too); the rest of the wall time is outside ATen.
    Also returns the five top-level ops with the most time.
    """
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    wall = time.perf_counter() - t0
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    # top level = not nested inside another aten op on the same thread
    gemm = other = 0.0
    by_name: dict[str, float] = {}
    for e in events:
        parent, nested = e.cpu_parent, False
        while parent is not None:
            if parent.name.startswith("aten::"):
                nested = True
                break
            parent = parent.cpu_parent
        if nested:
            continue
        total = e.cpu_time_total / 1e6  # inclusive time of this top-level op (children included)
        name = e.name[len("aten::"):]
        by_name[name] = by_name.get(name, 0.0) + total
        if any(k in name for k in GEMM_OPS):
            gemm += total
        else:
            other += total
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:5]
    wall = max(wall, gemm + other)
    return {"gemm_share": gemm / wall, "other_aten_share": other / wall,
            "outside_aten_share": max(0.0, wall - gemm - other) / wall,
            "top_ops": "; ".join(f"{n} {t / wall:.0%}" for n, t in top), "profiled_seconds": wall}


@contextmanager
def data_path_before_fix(before: bool = True):
    """Inside the block (when `before`), the data path as it was before the fix: the shapes renderer
    and the batch collation at torch's intra-op thread count (datamodules.shapes.RENDER_THREADS,
    datamodules.batch.COLLATE_THREADS set to None)."""
    from datamodules import batch, shapes

    saved = shapes.RENDER_THREADS, batch.COLLATE_THREADS
    if before:
        shapes.RENDER_THREADS = batch.COLLATE_THREADS = None
    try:
        yield
    finally:
        shapes.RENDER_THREADS, batch.COLLATE_THREADS = saved


def training_step(method, stage: str, batch, opt, cfg, device, clip: float) -> float:
    """One optimiser step as the trainer takes it: the loss under the run's autocast, backward, clipping, AdamW;
    returns the loss."""
    from benchmarks.efficiency import _autocast
    from lightning_modules.system import clip_by_player

    with _autocast(cfg, device):
        loss = method.loss(stage, batch)["loss"]
    loss.backward()
    if clip > 0:
        clip_by_player(opt, clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def measure_training(method, stage: str, cfg, dm, device, steps: int, profile: bool = False,
                     data_ab: bool = False) -> dict:
    """One row: FLOPs per step, median step seconds, data-wait share, achieved GFLOP/s (see the module docstring).

    data_ab: 2 x `steps` steps, alternating the data path before the fix (`data_path_before_fix`) and
    the default; the before steps go to the `*_before` columns.
    """

    from benchmarks.config import stage_settings
    from benchmarks.efficiency import _freeze_for, _sync

    settings = stage_settings(cfg, stage)
    bs = settings["batch_size"]
    method.train()
    _freeze_for(method, stage)
    opt = _optimizer(method, stage, settings, cfg.optim.weight_decay)
    clip = float(cfg.trainer.gradient_clip_val or 0)
    loader = dm.loader_for("train", shuffle=True, drop_last=True, batch_size=bs, seed=cfg.seed)
    it = iter(loader)

    def step(batch) -> None:
        training_step(method, stage, batch, opt, cfg, device, clip)

    def next_batch():
        try:
            return next(it).to(device)
        except StopIteration:  # a tiny split: start another epoch
            return next(iter(loader)).to(device)

    # the warm-up step (optimiser state, first-call allocations) is the counted one
    flops = train_flops(method, stage, next_batch(), cfg, device)
    opt.step()
    opt.zero_grad(set_to_none=True)
    timed: dict[str, tuple[list, list]] = {"after": ([], []), "before": ([], [])}
    for i in range(2 * steps if data_ab else steps):
        arm = "before" if data_ab and i % 2 == 0 else "after"
        with data_path_before_fix(arm == "before"):
            _sync(device)
            t0 = time.perf_counter()
            batch = next_batch()
            t1 = time.perf_counter()
        step(batch)
        _sync(device)
        t2 = time.perf_counter()
        timed[arm][0].append(t1 - t0)
        timed[arm][1].append(t2 - t1)

    def summary(waits: list, computes: list, suffix: str = "") -> dict:
        totals = [w + c for w, c in zip(waits, computes, strict=True)]
        return {f"seconds{suffix}": statistics.median(totals), f"best_seconds{suffix}": min(totals),
                f"compute_seconds{suffix}": statistics.median(computes),
                f"data_seconds{suffix}": statistics.median(waits), f"data_share{suffix}": sum(waits) / sum(totals)}

    row = {"part": f"train:{stage}", "kind": "train", "stage": stage, "batch_size": bs,
           "gflops": flops / 1e9, **summary(*timed["after"]), "repeats": steps,
           "params": method.num_parameters(stage),
           "flops_method": "real step, counted"}
    if data_ab:
        row.update(summary(*timed["before"], "_before"))
    if profile:
        row.update(profile_split(lambda: step(next_batch())))
    for p in method.parameters():
        p.requires_grad_(True)
    return row


def sample_flops(build, cfg, cond, n: int, device) -> tuple[int, str]:
    """FLOPs of one `sample(n, cond, ...)` call: traced on the meta device, else counted on a real run."""
    import torch

    from benchmarks.efficiency import count_flops, on_meta

    kw = {"steps": cfg.sample.steps, "guidance": cfg.sample.guidance, "eta": cfg.sample.eta, "generator": None}
    try:
        meta = on_meta(build).eval()
        with torch.no_grad(), count_flops() as (counter, _):
            meta.sample(n, cond.to("meta"), **kw)
        return counter.get_total_flops(), "traced on meta"
    except Exception:  # noqa: BLE001 - data-dependent code cannot trace on meta: count a real run
        model = build().to(device).eval()
        with torch.no_grad(), count_flops() as (counter, _):
            model.sample(n, cond.to(device), **kw)
        return counter.get_total_flops(), f"real run on {device.type}, counted"


def measure_sampling(method, build, cfg, dm, device, n: int, profile: bool = False) -> dict:
    import torch

    from benchmarks.common import real_conditioning
    from benchmarks.efficiency import _autocast, _sync

    cond = real_conditioning(dm, n, "val", first_frame=method.image_to_video)
    flops, how = sample_flops(build, cfg, cond, n, device)
    method.eval()
    cond = cond.to(device)
    g = torch.Generator(device=device)
    kw = {"guidance": cfg.sample.guidance, "eta": cfg.sample.eta}

    def call(steps: int, seed: int = 0):
        with torch.no_grad(), _autocast(cfg, device):
            return method.sample(n, cond, steps=steps, generator=g.manual_seed(seed), **kw)

    call(1)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    videos = call(cfg.sample.steps)
    _sync(device)
    seconds = time.perf_counter() - t0
    row = {"part": "sample", "kind": "sample", "stage": "", "batch_size": n, "gflops": flops / 1e9,
           "seconds": seconds, "best_seconds": seconds, "compute_seconds": seconds, "data_seconds": 0.0,
           "data_share": None, "repeats": 1,
           "params": method.num_parameters(), "flops_method": how, "sample_steps": cfg.sample.steps,
           "guidance": cfg.sample.guidance, "sample_sha256": tensor_sha256(videos)}
    if profile:
        row.update(profile_split(lambda: call(cfg.sample.steps, 1)))
    return row


def tensor_sha256(x) -> str:
    """Digest of a tensor's values (dtype, shape and bytes): equal digests, bit-identical samples."""
    import hashlib

    import torch

    x = x.detach().cpu().contiguous()
    h = hashlib.sha256(f"{x.dtype} {tuple(x.shape)}".encode())
    h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def method_parts(name: str, overrides: list[str], sample: bool = True) -> list[str]:
    from methods import METHODS

    return [f"train:{s}" for s in METHODS[name].stages] + (["sample"] if sample else [])


def measure_method(name: str, overrides: list[str], steps: int = 3, sample_batch: int | None = None,
                   sample: bool = True, profile: bool = False, progress=None, data_ab: bool = False) -> list[dict]:
    """Rows for every training stage (and sampling) of one method; `progress.update()` after each part."""
    import torch

    from benchmarks.common import build_datamodule, build_method, data_spec
    from benchmarks.config import load_config

    cfg = load_config([f"method={name}", *overrides])
    cuda = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    device = torch.device("cuda" if cuda else "cpu")
    dm = build_datamodule(cfg)
    spec = data_spec(cfg, dm)

    def build():
        torch.manual_seed(cfg.seed)
        return build_method(cfg, spec)

    method = build().to(device)
    common = {"method": name, "scale": cfg.scale, "dataset": cfg.dataset.name, "resolution": cfg.dataset.resolution,
              "frames": cfg.dataset.frames, "precision": cfg.trainer.precision, "device": device.type,
              "num_workers": cfg.data.num_workers, "peak_kind": _peak_kind(cfg)}
    rows = []
    for stage in method.stages:
        if progress is not None:
            progress.set_postfix_str(f"{name} train:{stage}")
        rows.append({**common, **measure_training(method, stage, cfg, dm, device, steps, profile, data_ab)})
        if progress is not None:
            progress.update()
    if sample:
        if progress is not None:
            progress.set_postfix_str(f"{name} sample")
        n = sample_batch or cfg.sample.batch_size
        rows.append({**common, **measure_sampling(method, build, cfg, dm, device, n, profile)})
        if progress is not None:
            progress.update()
    return rows


def with_fractions(rows: list[dict], peak: dict) -> list[dict]:
    """Adds achieved GFLOP/s and the fraction of the probe's peak for the row's precision."""
    for r in rows:
        if "error" in r:
            continue
        p = peak[r["peak_kind"]]
        r["gflops_per_s"] = r["gflops"] / r["seconds"] if r["seconds"] else None
        r["compute_gflops_per_s"] = r["gflops"] / r["compute_seconds"] if r["compute_seconds"] else None
        r["peak_gflops_per_s"] = p
        r["fraction_of_peak"] = r["gflops_per_s"] / p if r["gflops_per_s"] is not None else None
        r["best_fraction"] = r["gflops"] / r["best_seconds"] / p if r.get("best_seconds") else None
        r["compute_fraction"] = r["compute_gflops_per_s"] / p if r["compute_gflops_per_s"] is not None else None
    return rows


# --- tables ----------------------------------------------------------------------------------------------


COLUMNS = ("method", "part", "batch_size", "gflops", "seconds", "gflops_per_s", "fraction_of_peak", "data_share",
           "compute_fraction", "best_seconds", "best_fraction", "data_seconds", "compute_seconds", "data_share_before",
           "data_seconds_before", "seconds_before", "compute_seconds_before", "peak_gflops_per_s", "peak_kind", "params",
           "sample_steps", "guidance", "repeats", "flops_method", "gemm_share", "other_aten_share",
           "outside_aten_share", "top_ops", "scale", "dataset", "resolution", "frames", "precision", "device",
           "num_workers", "error")


def _g(v, digits: int = 3) -> str:
    if v is None or v == "":
        return ""
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}%"


def markdown(rows: list[dict], note: dict) -> str:
    profiled = any("gemm_share" in r for r in rows)
    ab = any("data_share_before" in r for r in rows)
    head = ["method", "part", "batch", "GFLOPs/step", "s/step", "GFLOP/s", "of peak", "data wait", "of peak w/o data",
            "of peak, best step"]
    if ab:
        head += ["data wait before fix", "s/step before fix"]
    if profiled:
        head += ["matmul/conv", "other ATen", "outside ATen", "top ops (self+children)"]
    lines = [f"Peak (best 2048^2 matmul, this process): bf16 {note['bf16_matmul_gflops']:.0f} GFLOP/s, "
             f"fp32 {note['fp32_matmul_gflops']:.0f} GFLOP/s; {note['cpu_model']}, {note['threads']} threads.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r.get('part', '')} | error: {r['error'][:100]} |" + " |" * (len(head) - 3))
            continue
        part = r["part"] if r["kind"] == "train" else f"sample ({r['sample_steps']} steps, s={r['guidance']:g})"
        cells = [r["method"], part, str(r["batch_size"]), _g(r["gflops"]), _g(r["seconds"]), _g(r["gflops_per_s"]),
                 _pct(r["fraction_of_peak"]), _pct(r["data_share"]), _pct(r["compute_fraction"]), _pct(r["best_fraction"])]
        if ab:
            cells += [_pct(r.get("data_share_before")), _g(r.get("seconds_before"))]
        if profiled:
            cells += [_pct(r.get("gemm_share")), _pct(r.get("other_aten_share")), _pct(r.get("outside_aten_share")),
                      r.get("top_ops", "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    from benchmarks.results import atomic_write_csv

    extra = [k for r in rows for k in r if k not in COLUMNS]
    atomic_write_csv(path, rows, list(dict.fromkeys([*COLUMNS, *extra])))


def bar_chart(rows: list[dict], note: dict, path: Path) -> Path:
    """Two panels, one bar per method and part: fraction of the matmul peak, data-wait share of the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    labels = [f"{r['method']}\n{r['part'].removeprefix('train:')}" for r in ok]
    methods = list(dict.fromkeys(r["method"] for r in ok))
    colors = [plt.cm.tab10(methods.index(r["method"]) % 10) for r in ok]
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.55 * len(ok) + 1.5), 6.4), sharex=True)
    frac = [100 * (r["fraction_of_peak"] or 0) for r in ok]
    bars = axes[0].bar(range(len(ok)), frac, color=colors)
    for bar, r in zip(bars, ok, strict=True):
        if r["kind"] == "sample":
            bar.set_hatch("//")
    axes[0].bar_label(bars, labels=[f"{v:.1f}" for v in frac], fontsize=7)
    axes[0].set_ylabel(f"% of {ok[0]['peak_kind'] if ok else 'bf16'} matmul peak")
    axes[0].set_title(f"achieved FLOP/s vs the matmul peak measured in the same run "
                      f"(bf16 {note['bf16_matmul_gflops']:.0f} GFLOP/s); hatched: sampling", fontsize=9)
    data = [100 * (r["data_share"] or 0) for r in ok]
    bars = axes[1].bar(range(len(ok)), data, color=colors)
    axes[1].bar_label(bars, labels=[f"{v:.1f}" if r["kind"] == "train" else "" for v, r in zip(data, ok, strict=True)],
                      fontsize=7)
    axes[1].set_ylabel("data wait, % of step")
    axes[1].set_xticks(range(len(ok)), labels, fontsize=7, rotation=60)
    scale = ok[0]["scale"] if ok else ""
    where = f"{ok[0]['resolution']}x{ok[0]['resolution']}x{ok[0]['frames']}, {ok[0]['precision']}" if ok else ""
    fig.suptitle(f"utilisation at scale={scale} ({where})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- command line ----------------------------------------------------------------------------------------


def run(methods: list[str], overrides: list[str], steps: int = 3, sample_batch: int | None = 4, sample: bool = True,
        profile: bool = False, show_progress: bool = True, data_ab: bool = False,
        probe_seconds: float = 3.0) -> tuple[list[dict], dict]:
    """(rows, machine note) for `methods`; the probe is taken before and after, the higher one is the peak."""
    from tqdm.auto import tqdm

    from benchmarks.machine import machine_note

    note = machine_note(probe_seconds)
    parts = {m: method_parts(m, overrides, sample) for m in methods}
    rows: list[dict] = []
    with tqdm(total=sum(map(len, parts.values())), desc="utilisation", unit="part", disable=not show_progress) as bar:
        for m in methods:
            try:
                rows += measure_method(m, overrides, steps, sample_batch, sample, profile, bar, data_ab)
            except Exception as e:  # noqa: BLE001 - one method's failure must not lose the others
                rows.append({"method": m, "part": "", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
                bar.update(len(parts[m]) - sum(1 for r in rows if r["method"] == m and "error" not in r))
    after = peak_probe(probe_seconds)
    note["bf16_before"], note["fp32_before"] = note["bf16_matmul_gflops"], note["fp32_matmul_gflops"]
    note["bf16_after"], note["fp32_after"] = round(after["bf16"], 1), round(after["fp32"], 1)
    note["bf16_matmul_gflops"] = max(note["bf16_before"], note["bf16_after"])
    note["fp32_matmul_gflops"] = max(note["fp32_before"], note["fp32_after"])
    with_fractions(rows, {"bf16": note["bf16_matmul_gflops"], "fp32": note["fp32_matmul_gflops"]})
    return rows, note


def main(argv: list[str] | None = None) -> list[dict]:
    from benchmarks.common import benchmark_cli

    started = benchmark_cli(argv, USAGE, _parse)
    if started is None:
        return []
    opts, rest, methods = started
    from benchmarks.results import atomic_write_text

    t0 = time.perf_counter()
    rows, note = run(methods, rest, opts["steps"], opts["sample_batch"], opts["sample"], opts["profile"],
                     data_ab=opts["data_ab"], probe_seconds=opts["probe_seconds"])
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "utilisation.csv", rows)
    atomic_write_text(out / "machine.json", json.dumps(note, indent=1))
    bar_chart(rows, note, out / "utilisation.png")
    print(markdown(rows, note))
    print(f"wrote {out}/utilisation.csv, machine.json, utilisation.png ({time.perf_counter() - t0:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
