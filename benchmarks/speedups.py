"""What PyTorch's CPU speed options buy each method: step time with and without, side by side in one process.

    python -m benchmarks.speedups scale=tiny                               # every method, every option
    python -m benchmarks.speedups methods=cmd,vdm options=channels_last,attention=fused steps=5
Own options: methods=a,b (default: every method), options=a,b (default compile,channels_last,attention=fused;
each is a `trainer.<option>` setting, `compile` meaning trainer.compile=true), steps=N (timed rounds per part,
default 4), sample=true|false (default true), train=true|false (default true; false measures sampling
alone), sample_rounds=N (timed sampling calls per arm, default 2), out=DIR (default results/speedups).
Everything else is a run-config override applied to every arm (scale=tiny, sample.steps=10, ...).

Per method and per part (each training stage, then sampling), one instance of the method per arm (the
default, and the default with one option switched on), built from the same seed. The arms take turns:
every round times one step of each arm on the same batch, so a noisy machine slows all arms alike, in an
order that rotates from round to round (since 2026-12-02; the README's rows of that day ran in a fixed order).
- training: forward + backward of `method.loss(stage, batch)` under the run's autocast, gradient
  clipping, AdamW (as benchmarks.utilisation times it; the data wait is left out, the same for every arm).
  The first step of each arm is timed on its own: for `compile` it holds the compilation
  (`methods.speed.compile_called` compiles the networks the loss calls, as `trainer.compile` does in a run).
- sampling: one `method.sample` call of the run's sample.batch_size videos at the run's steps and
  guidance; the first (one-step) call holds the sampler's compilation.
Columns: seconds (median over rounds), speedup (default / option), first_seconds and overhead_seconds
(the option's first step minus the default's: compilation), and whether the option wins over a whole
default run of that part, overhead included: `run_steps` optimiser steps for a stage (its preset
max_steps) and, for sampling, the sample calls of a default run (sample.num_videos + eval.num_samples videos
in batches of sample.batch_size); `break_even` is the number of steps (calls) after which it pays off.
Outputs in out/: speedups.csv, machine.json; the table is printed as Markdown.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

USAGE = __doc__
OWN_KEYS = ("methods", "options", "steps", "sample", "train", "sample_rounds", "out")
DEFAULT_OPTIONS = ("compile", "channels_last", "attention=fused")


def _parse(argv: list[str]) -> tuple[dict, list[str]]:
    opts = {"methods": None, "options": list(DEFAULT_OPTIONS), "steps": 4, "sample": True, "train": True, "sample_rounds": 2,
            "out": "results/speedups"}
    rest = []
    for a in argv:
        key, _, value = a.partition("=")
        if key not in OWN_KEYS:
            rest.append(a)
        elif key in ("methods", "options"):
            opts[key] = [v for v in value.split(",") if v]
        elif key in ("steps", "sample_rounds"):
            opts[key] = max(1, int(value))
        elif key in ("sample", "train"):
            opts[key] = value.lower() in ("1", "true", "yes", "on")
        else:
            opts[key] = value
    return opts, rest


def option_override(option: str) -> str:
    """`compile` -> trainer.compile=true; `attention=fused` -> trainer.attention=fused; checked by load_config."""
    name, _, value = option.partition("=")
    return f"trainer.{name}={value or 'true'}"


class Arm:
    """One instance of the method with its options: its own weights, optimiser and compiled networks."""

    def __init__(self, label: str, cfg, build, device) -> None:
        self.label, self.cfg, self.device = label, cfg, device
        self.method = build(cfg).to(device)
        self.attention = str(cfg.trainer.attention)
        self.compile = bool(cfg.trainer.compile)

    def kernel(self):
        from methods.speed import attention_kernel

        return attention_kernel(self.attention)

    def train_step_fn(self, stage: str):
        import torch

        from benchmarks.config import stage_settings
        from benchmarks.efficiency import _autocast, _freeze_for
        from benchmarks.utilisation import _optimizer, training_step

        method, cfg = self.method, self.cfg
        settings = stage_settings(cfg, stage)
        method.train()
        _freeze_for(method, stage)
        opt = _optimizer(method, stage, settings, cfg.optim.weight_decay)
        clip = float(cfg.trainer.gradient_clip_val or 0)
        compiled = [False]

        def step(batch) -> float:
            with self.kernel():
                if self.compile and not compiled[0]:
                    from methods.speed import compile_called

                    with torch.no_grad(), _autocast(cfg, self.device):
                        compile_called(method, lambda: method.loss(stage, batch))
                    compiled[0] = True
                return training_step(method, stage, batch, opt, cfg, self.device, clip)

        return step

    def sample_fn(self, cond):
        import torch

        from benchmarks.efficiency import _autocast

        method, cfg = self.method, self.cfg
        compiled = [False]

        def call(steps: int) -> None:
            method.eval()
            g = torch.Generator(device=self.device).manual_seed(0)
            fn = lambda: method.sample(len(cond), cond, steps=steps, guidance=cfg.sample.guidance,  # noqa: E731
                                       eta=cfg.sample.eta, generator=g)
            with torch.no_grad(), _autocast(cfg, self.device), self.kernel():
                if self.compile and not compiled[0]:
                    from methods.speed import compile_called

                    compile_called(method, fn)
                    compiled[0] = True
                fn()

        return call


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _time_arms(arms: list, fns: list, first_arg, round_args) -> tuple[dict[str, tuple[float, list[float]]], dict[str, str]]:
    """Each arm's first call timed on its own, then one call of every arm per round (round_args: the argument of
    each round), in an order that rotates from round to round so no arm always runs first (right after the
    batch is rendered) or last. An option whose first call raises (a compiler error, say) is left out with its
    error and the other arms go on; the default arm failing fails the part.
    Returns {label: (first_seconds, [seconds per round])} and {label: error}."""
    first, failed = {}, {}
    for arm, fn in zip(arms, fns, strict=True):
        try:
            first[arm.label] = _timed(fn, first_arg)
        except Exception as e:  # noqa: BLE001 - one option's failure must not lose the other arms
            if arm.label == "default":
                raise
            failed[arm.label] = _error_text(e)
    times: dict[str, list[float]] = {label: [] for label in first}
    for k, arg in enumerate(round_args):
        for i in ((j + k) % len(arms) for j in range(len(arms))):
            if arms[i].label in first:
                times[arms[i].label].append(_timed(fns[i], arg))
    return {label: (first[label], times[label]) for label in first}, failed


def measure_method(name: str, options: list[str], overrides: list[str], steps: int, sample: bool,
                   progress=None, train: bool = True, sample_rounds: int = 2) -> list[dict]:
    """Rows (one per part and arm) for one method; the default arm's rows have option 'default'."""
    import torch

    from benchmarks.common import build_datamodule, build_method, data_spec, real_conditioning
    from benchmarks.config import load_config, stage_settings

    # A fresh compiler cache per method, as in a run of its own: the methods share network classes, so a cache
    # carried over from the previous method recompiles the same code at new shapes until dynamo switches to
    # dynamic shapes, which failed inductor on four of the six methods here (torch 2.13, bf16 autocast).
    torch._dynamo.reset()
    base_cfg = load_config([f"method={name}", *overrides])
    cfgs = {"default": base_cfg, **{o: load_config([f"method={name}", *overrides, option_override(o)]) for o in options}}
    device = torch.device("cuda" if torch.cuda.is_available() and base_cfg.trainer.accelerator in ("auto", "gpu", "cuda")
                          else "cpu")
    dm = build_datamodule(base_cfg)
    dm.setup("fit")
    spec = data_spec(base_cfg, dm)

    def build(cfg):
        torch.manual_seed(cfg.seed)
        return build_method(cfg, spec)

    arms = [Arm(label, cfg, build, device) for label, cfg in cfgs.items()]
    from methods.speed import set_attention_kernel

    set_attention_kernel("auto")  # build_method set the last arm's kernel globally; every arm sets its own per call
    common = {"method": name, "scale": base_cfg.scale, "resolution": base_cfg.dataset.resolution,
              "frames": base_cfg.dataset.frames, "precision": base_cfg.trainer.precision, "device": device.type}
    rows = []
    for stage in arms[0].method.stages if train else ():
        if progress is not None:
            progress.set_postfix_str(f"{name} train:{stage}")
        settings = stage_settings(base_cfg, stage)
        loader = dm.loader_for("train", shuffle=True, drop_last=True, batch_size=settings["batch_size"],
                               seed=base_cfg.seed)
        batches = iter(loader)
        fns = [arm.train_step_fn(stage) for arm in arms]
        timed, failed = _time_arms(arms, fns, next(batches).to(device),
                                   (next(batches).to(device) for _ in range(steps)))
        rows += [{**common, "part": f"train:{stage}", "kind": "train", "option": label, "error": err}
                 for label, err in failed.items()]
        for label, (f, ts) in timed.items():
            rows.append({**common, "part": f"train:{stage}", "kind": "train", "option": label,
                         "batch_size": settings["batch_size"], "seconds": statistics.median(ts), "best_seconds": min(ts),
                         "first_seconds": f, "repeats": steps, "run_steps": settings["max_steps"]})
        for arm in arms:
            for p in arm.method.parameters():
                p.requires_grad_(True)
        if progress is not None:
            progress.update()
    if sample:
        if progress is not None:
            progress.set_postfix_str(f"{name} sample")
        bs = base_cfg.sample.batch_size
        cond = real_conditioning(dm, bs, "val", first_frame=arms[0].method.image_to_video).to(device)
        fns = [arm.sample_fn(cond) for arm in arms]
        reps = sample_rounds
        timed, failed = _time_arms(arms, fns, 1, [base_cfg.sample.steps] * reps)
        rows += [{**common, "part": "sample", "kind": "sample", "option": label, "error": err}
                 for label, err in failed.items()]
        calls = math.ceil(base_cfg.sample.num_videos / bs) + math.ceil(base_cfg.eval.num_samples / bs)
        for label, (f, ts) in timed.items():
            rows.append({**common, "part": "sample", "kind": "sample", "option": label, "batch_size": bs,
                         "seconds": statistics.median(ts), "best_seconds": min(ts), "first_seconds": f, "repeats": reps,
                         "run_steps": calls, "sample_steps": base_cfg.sample.steps})
        if progress is not None:
            progress.update()
    return with_verdicts(rows)


def with_verdicts(rows: list[dict]) -> list[dict]:
    """Adds, to every option's row, the comparison with the default arm of the same method and part."""
    base = {(r["method"], r["part"]): r for r in rows if r["option"] == "default"}
    for r in rows:
        b = base.get((r["method"], r["part"]))
        if b is None or r["option"] == "default" or "error" in r:
            continue
        saved = b["seconds"] - r["seconds"]  # per step (per sample call)
        overhead = max(0.0, r["first_seconds"] - b["first_seconds"])
        r["speedup"] = b["seconds"] / r["seconds"] if r["seconds"] else None
        r["overhead_seconds"] = overhead
        r["break_even"] = overhead / saved if saved > 0 else None
        r["run_seconds_saved"] = saved * r["run_steps"] - overhead
        r["wins_over_run"] = r["run_seconds_saved"] > 0
    return rows


COLUMNS = ("method", "part", "option", "batch_size", "seconds", "speedup", "first_seconds", "overhead_seconds",
           "break_even", "run_steps", "run_seconds_saved", "wins_over_run", "best_seconds", "repeats", "sample_steps",
           "scale", "resolution", "frames", "precision", "device", "error")


def _g(v, digits: int = 3) -> str:
    if v is None or v == "":
        return ""
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict], note: dict) -> str:
    options = list(dict.fromkeys(r["option"] for r in rows if r.get("option") not in (None, "default")))
    head = ["method", "part", "s/step default"] + [f"{o}: speedup (overhead s, net s over a run)" for o in options]
    lines = [f"Machine: bf16 matmul {note['bf16_matmul_gflops']:.0f} GFLOP/s, {note['cpu_model']}, "
             f"{note['threads']} threads. Speedup = default s / option s (median of rounds, arms interleaved); "
             "overhead = the option's first step minus the default's (compilation); net = seconds saved over a "
             "default run of the part, overhead included (negative: it loses).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_part: dict[tuple, dict] = {}
    failed_methods = []
    for r in rows:
        if "error" in r and not r.get("part"):  # the whole method failed
            failed_methods.append(f"| {r['method']} | error: {r['error'][:120]} |" + " |" * (len(head) - 2))
            continue
        by_part.setdefault((r["method"], r["part"]), {})[r["option"]] = r
    for (m, part), arms in by_part.items():
        d = arms.get("default")
        label = part if not (part == "sample" and d) else f"sample ({d['batch_size']} videos, {d.get('sample_steps')} steps)"
        cells = [m, label, _g(d["seconds"]) if d else ""]
        for o in options:
            r = arms.get(o)
            if r is not None and "error" in r:
                cells.append(f"failed: {r['error'][:80]}")
            else:
                cells.append("" if r is None or r.get("speedup") is None else
                             f"{r['speedup']:.2f}x ({r['overhead_seconds']:.0f} s, {r['run_seconds_saved']:+.0f} s)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + failed_methods) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    from benchmarks.results import atomic_write_csv

    atomic_write_csv(path, rows, COLUMNS)


def main(argv: list[str] | None = None) -> list[dict]:
    from benchmarks.common import benchmark_cli

    started = benchmark_cli(argv, USAGE, _parse)
    if started is None:
        return []
    opts, rest, methods = started
    from tqdm.auto import tqdm

    from benchmarks.config import ConfigError, load_config
    from benchmarks.machine import machine_note
    from benchmarks.results import atomic_write_text
    from methods import METHODS

    try:  # a bad option or override fails here, before anything is measured
        for o in opts["options"]:
            load_config([f"method={methods[0]}", *rest, option_override(o)])
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    t0 = time.perf_counter()
    note = machine_note(2.5)
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "machine.json", json.dumps(note, indent=1))  # first: a stopped run keeps it
    rows: list[dict] = []
    parts = sum(len(METHODS[m].stages) * int(opts["train"]) + int(opts["sample"]) for m in methods)
    with tqdm(total=parts, desc="speedups", unit="part") as bar:
        for m in methods:
            try:
                rows += measure_method(m, opts["options"], rest, opts["steps"], opts["sample"], bar, opts["train"],
                                       opts["sample_rounds"])
            except Exception as e:  # noqa: BLE001 - one method's failure must not lose the others
                rows.append({"method": m, "part": "", "option": "", "error": _error_text(e)})
            write_csv(out / "speedups.csv", rows)  # after every method: a long run keeps what it measured
    print(markdown(rows, note))
    print(f"wrote {out}/speedups.csv, machine.json ({time.perf_counter() - t0:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
