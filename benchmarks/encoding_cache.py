"""The encoding cache, measured: a training step whose frozen encoder runs, against the same step reading the cache.

    python -m benchmarks.encoding_cache                                  # every method, tiny preset
    python -m benchmarks.encoding_cache methods=cmd,pvdm,edvdm steps=6 out=docs/results/encoding-cache
Own options: methods=a,b (default: every method in methods.METHODS), steps=N (pairs of timed steps per
stage, default 6), out=DIR (default results/encoding_cache). Everything else is a run-config override
applied to every method (stages.motion.batch_size=8, ...).

`trainer.encoding_cache` (methods.speed.EncodingCache) keeps what a frozen encoder gave for each training
clip, so a clip that comes again (a later epoch, or a later stage of the same run: CMD's motion stage starts
with the content stage's batches) is not encoded again. Per method and stage, in one process with the
cache on: a warm-up step finds the stages whose loss encodes through it (`VideoGenerator.frozen_encode`;
the others are not listed); then, `steps` times, a step on a fresh batch (every clip new: encoded, and
kept) and a step on that same batch again (every clip read back), forward + backward under the run's
autocast, gradient clipping and AdamW as the trainer takes them, data loading not timed. The two halves
of a pair see the same clips, so their difference is the encoder's share of a step; a whole run gains that
much on each step whose clips all come again (the row's `encoding_cache` record counts them), so the
step speedup is the most a run can gain on that stage. Outputs in out/: encoding_cache.csv (one row per
method and stage: median new-clip and cached step seconds, the speedup, the encoder's share),
machine.json (the matmul probe); the table is printed as Markdown.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

USAGE = __doc__
OWN_KEYS = ("methods", "steps", "out")


def _parse(argv: list[str]) -> tuple[dict, list[str]]:
    opts = {"methods": None, "steps": 6, "out": "results/encoding_cache"}
    rest = []
    for a in argv:
        key, eq, value = a.partition("=")
        if eq and key in OWN_KEYS:
            opts[key] = [m for m in value.split(",") if m] if key == "methods" else (
                max(1, int(value)) if key == "steps" else value)
        else:
            rest.append(a)
    return opts, rest


def measure_method(name: str, overrides: list[str], steps: int) -> list[dict]:
    """Rows for the stages of `name` whose loss encodes through the cache."""
    import torch

    from benchmarks.common import build_datamodule, build_method, data_spec
    from benchmarks.config import load_config, stage_settings
    from benchmarks.efficiency import _freeze_for
    from benchmarks.utilisation import _optimizer
    from methods.speed import EncodingCache

    cfg = load_config([f"method={name}", *overrides])
    dm = build_datamodule(cfg)
    torch.manual_seed(cfg.seed)
    method = build_method(cfg, data_spec(cfg, dm))
    cache = method.encoding_cache = method.encoding_cache or EncodingCache(1024)
    clip = float(cfg.trainer.gradient_clip_val or 0)
    rows = []
    for stage in method.stages:
        settings = stage_settings(cfg, stage)
        method.train()
        _freeze_for(method, stage)
        opt = _optimizer(method, stage, settings, cfg.optim.weight_decay)
        batches = iter(dm.loader_for("train", shuffle=True, drop_last=True, batch_size=settings["batch_size"],
                                     seed=cfg.seed))

        cache.clear()  # an earlier stage's clips would be read back: CMD's motion loader starts with content's batches
        seen = cache.hits + cache.misses
        _timed_step(method, stage, next(batches), opt, cfg, clip)  # warm-up; does this stage encode through the cache?
        if cache.hits + cache.misses == seen:
            continue
        new, cached = [], []
        for k in range(steps):
            batch = next(batches)
            torch.manual_seed(cfg.seed + k)  # both halves draw the same noise (and PVDM the same clip windows)
            new.append(_timed_step(method, stage, batch, opt, cfg, clip))
            middle = cache.stats()
            torch.manual_seed(cfg.seed + k)
            cached.append(_timed_step(method, stage, batch, opt, cfg, clip))
            if cache.misses != middle["misses"]:
                raise RuntimeError(f"{name}:{stage}: the second step on the same batch encoded clips "
                                   f"({middle} -> {cache.stats()}); is the batch larger than the cache?")
        a, b = statistics.median(new), statistics.median(cached)
        rows.append({"method": name, "stage": stage, "batch_size": settings["batch_size"],
                     "preset_steps": settings["max_steps"], "seconds_new": a, "seconds_cached": b,
                     "speedup": a / b if b > 0 else None, "encoder_share": (a - b) / a if a > 0 else None,
                     "pairs": steps, "cache_mb_per_clip": cache.bytes / max(1, len(cache.rows)) / 2**20,
                     "precision": cfg.trainer.precision, "scale": cfg.scale})
    return rows


def _timed_step(method, stage: str, batch, opt, cfg, clip: float) -> float:
    """Seconds of one training step as the trainer takes it (benchmarks.utilisation.training_step), on the CPU."""
    import torch

    from benchmarks.utilisation import training_step

    t0 = time.perf_counter()
    training_step(method, stage, batch, opt, cfg, torch.device("cpu"), clip)
    return time.perf_counter() - t0


def markdown(rows: list[dict], note: dict) -> str:
    lines = [f"Training steps with the encoder run (new clips) and read from the cache (the same clips again); "
             f"bf16 matmul {note.get('bf16_matmul_gflops', 0):.0f} / fp32 {note.get('fp32_matmul_gflops', 0):.0f} "
             "GFLOP/s", "",
             "| method | stage | batch | new clips s/step | cached s/step | speedup | encoder's share |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['stage']} | {r['batch_size']} | {r['seconds_new']:.3g} | "
                     f"{r['seconds_cached']:.3g} | {r['speedup']:.2f}x | {100 * r['encoder_share']:.0f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    from benchmarks.common import benchmark_cli

    started = benchmark_cli(argv, USAGE, _parse)
    if started is None:
        return []
    opts, rest, methods = started
    from tqdm.auto import tqdm

    from benchmarks.results import atomic_write_csv, atomic_write_text
    from benchmarks.utilisation import peak_probe

    t0 = time.perf_counter()
    peak = peak_probe(2.5)
    note = {"bf16_matmul_gflops": peak["bf16"], "fp32_matmul_gflops": peak["fp32"]}
    rows: list[dict] = []
    for m in tqdm(methods, desc="encoding cache", unit="method"):
        rows += measure_method(m, rest, opts["steps"])
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out / "encoding_cache.csv", rows)
    atomic_write_text(out / "machine.json", json.dumps(note, indent=1))
    print(markdown(rows, note))
    print(f"wrote {out}/encoding_cache.csv, machine.json ({time.perf_counter() - t0:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
