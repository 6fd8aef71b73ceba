"""Training step time under bf16-mixed vs 32-true, measured side by side (interleaved) in one process.

    python -m benchmarks.precision method=vdm [--steps 6] [--out results/precision.csv]

The machines are shared and noisy, so the two precisions alternate step by step and the
ratio of medians is reported; CSV rows: method, stage, precision, median/min step seconds.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import build_datamodule, build_method, data_spec
from benchmarks.config import load_config, stage_settings


def step_time(method, stage: str, batch, opt, bf16: bool) -> float:
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = method.loss(stage, batch)["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per precision (after 2 warm-up steps each)")
    ap.add_argument("--out", default="results/precision.csv")
    args, overrides = ap.parse_known_args(argv)
    cfg = load_config(overrides)
    dm = build_datamodule(cfg)
    torch.manual_seed(0)
    method = build_method(cfg, data_spec(cfg, dm))
    rows = []
    for stage in method.stages:
        if hasattr(method, "on_stage_start"):
            method.on_stage_start(stage)
        batch = next(iter(dm.loader_for("train", batch_size=stage_settings(cfg, stage)["batch_size"])))
        opt = torch.optim.AdamW(method.stage_parameters(stage), lr=1e-5)
        times = {True: [], False: []}
        for i in range(args.steps + 2):
            for bf16 in (True, False):  # interleaved: both precisions see the same machine load
                t = step_time(method, stage, batch, opt, bf16)
                if i >= 2:
                    times[bf16].append(t)
        for bf16, ts in times.items():
            rows.append({"method": cfg.method.name, "stage": stage, "precision": "bf16-mixed" if bf16 else "32-true",
                         "batch_size": len(batch), "median_s": statistics.median(ts), "min_s": min(ts)})
        ratio = statistics.median(times[False]) / statistics.median(times[True])
        print(f"{cfg.method.name}/{stage}: 32-true {statistics.median(times[False]):.3f}s, "
              f"bf16-mixed {statistics.median(times[True]):.3f}s per step -> bf16 is {ratio:.2f}x faster")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
