"""The allocator, measured: every method's training steps and sampling with glibc's malloc as it starts and as `reuse` sets it.

    python -m benchmarks.allocator                                   # every method, 3 steps per stage
    python -m benchmarks.allocator methods=cmd,pvdm steps=5 rounds=2 out=docs/results/allocator
Own options: methods=a,b (default: every method in methods.METHODS), steps=N (timed training steps per
stage, default 3), sample_batch=B (videos per timed sampling call, default 16), rounds=R (default 1),
out=DIR (default results/allocator). Everything else is a run-config override for every method.

`trainer.allocator` is process-wide (methods.speed.tune_allocator), so each arm of a method runs in its own
process: `python -m benchmarks.utilisation methods=<m> trainer.allocator=<default|reuse> ...`, the two arms
of a method back to back, their order alternating from method to method and from round to round, so that
a drift of the machine's speed hits both arms. Per part: seconds per training step (median of `steps`, data
wait included) or per sampling call, under each arm; the speedup (default / reuse); and for sampling the
digest of the samples each arm drew with the same seed (`same_samples`: bit-identical, as the allocator
only changes where memory comes from). Outputs in out/: allocator.csv (one row per method, part and
round), allocator.png (the speedups), machine.json (the probe of the first process); the table is printed
as Markdown.
"""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

USAGE = __doc__
OWN_KEYS = ("methods", "steps", "sample_batch", "rounds", "out")
ARMS = ("default", "reuse")


def _parse(argv: list[str]) -> tuple[dict, list[str]]:
    opts = {"methods": None, "steps": 3, "sample_batch": 16, "rounds": 1, "out": "results/allocator"}
    rest = []
    for a in argv:
        key, eq, value = a.partition("=")
        if eq and key in OWN_KEYS:
            opts[key] = value.split(",") if key == "methods" else (value if key == "out" else int(value))
        else:
            rest.append(a)
    return opts, rest


def measure_arm(method: str, arm: str, overrides: list[str], steps: int, sample_batch: int,
                workdir: Path) -> tuple[list[dict], dict]:
    """(utilisation rows, machine note) of one method under one allocator arm, measured in a fresh process."""
    out = workdir / f"{method}-{arm}"
    cmd = [sys.executable, "-m", "benchmarks.utilisation", f"methods={method}", f"steps={steps}",
           f"sample_batch={sample_batch}", "probe_seconds=1", f"out={out}", f"trainer.allocator={arm}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{method} under trainer.allocator={arm} failed: {tail[0]}")
    with open(out / "utilisation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if r.get("error"):
            raise RuntimeError(f"{method} under trainer.allocator={arm}: {r['error']}")
    return rows, json.loads((out / "machine.json").read_text())


def pair_rows(method: str, round_: int, by_arm: dict[str, list[dict]]) -> list[dict]:
    """One row per part: both arms' seconds, the speedup, and for sampling whether the samples are identical."""
    rows = []
    reuse = {r["part"]: r for r in by_arm["reuse"]}
    for d in by_arm["default"]:
        a = reuse[d["part"]]
        before, after = float(d["seconds"]), float(a["seconds"])
        row = {"method": method, "part": d["part"], "round": round_, "batch_size": int(d["batch_size"]),
               "precision": d["precision"], "seconds_default": before, "seconds_reuse": after,
               "best_default": float(d["best_seconds"]), "best_reuse": float(a["best_seconds"]),
               "speedup": before / after if after > 0 else None, "same_samples": ""}
        if d["kind"] == "sample":
            row["same_samples"] = d.get("sample_sha256", "") == a.get("sample_sha256", "") != ""
        rows.append(row)
    return rows


def run(methods: list[str], overrides: list[str], steps: int = 3, sample_batch: int = 16, rounds: int = 1,
        show_progress: bool = True) -> tuple[list[dict], dict]:
    from tqdm.auto import tqdm

    rows: list[dict] = []
    note: dict = {}
    with tempfile.TemporaryDirectory(prefix="allocator-") as tmp, \
            tqdm(total=len(methods) * rounds * 2, desc="allocator", unit="process", disable=not show_progress) as bar:
        for k in range(rounds):
            for i, m in enumerate(methods):
                order = ARMS if (i + k) % 2 == 0 else ARMS[::-1]
                by_arm = {}
                for arm in order:
                    bar.set_postfix_str(f"{m} allocator={arm}")
                    try:
                        by_arm[arm], arm_note = measure_arm(m, arm, overrides, steps, sample_batch, Path(tmp) / f"r{k}")
                        note = note or arm_note
                    except RuntimeError as e:  # one method's failure must not lose the others
                        rows.append({"method": m, "round": k, "error": str(e)[:300]})
                    bar.update()
                if len(by_arm) == 2:
                    rows += pair_rows(m, k, by_arm)
    return rows, note


def summary(rows: list[dict]) -> list[dict]:
    """Per method and part, the median over rounds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["method"], r["part"]), []).append(r)
    out = []
    for (m, part), rs in groups.items():
        d = statistics.median(r["seconds_default"] for r in rs)
        a = statistics.median(r["seconds_reuse"] for r in rs)
        same = [r["same_samples"] for r in rs if r["same_samples"] != ""]
        out.append({"method": m, "part": part, "batch_size": rs[0]["batch_size"], "seconds_default": d,
                    "seconds_reuse": a, "speedup": d / a if a > 0 else None, "rounds": len(rs),
                    "same_samples": (all(same) if same else "")})
    return out


def markdown(table: list[dict], note: dict) -> str:
    probe = (f"bf16 matmul {note.get('bf16_matmul_gflops', 0):.0f} / fp32 {note.get('fp32_matmul_gflops', 0):.0f}"
             " GFLOP/s") if note else "no probe"
    lines = [f"Allocator as glibc starts (`default`) against `reuse` ({probe}); seconds per training step or per "
             "sampling call", "",
             "| method | part | batch | default s | reuse s | speedup | same samples |", "|---|---|---|---|---|---|---|"]
    for r in table:
        same = {True: "yes", False: "**no**"}.get(r["same_samples"], "")
        lines.append(f"| {r['method']} | {r['part']} | {r['batch_size']} | {r['seconds_default']:.3g} | "
                     f"{r['seconds_reuse']:.3g} | {r['speedup']:.2f}x | {same} |")
    return "\n".join(lines)


def bar_chart(table: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['method']} {r['part']}" for r in table]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(table) + 1.2))
    ax.barh(range(len(table)), [r["speedup"] for r in table], color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(table)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of trainer.allocator=reuse over glibc's default (seconds default / reuse)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    from benchmarks.common import benchmark_cli

    started = benchmark_cli(argv, USAGE, _parse)
    if started is None:
        return []
    opts, rest, methods = started
    from benchmarks.results import atomic_write_csv, atomic_write_text

    t0 = time.perf_counter()
    rows, note = run(methods, rest, opts["steps"], opts["sample_batch"], opts["rounds"])
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out / "allocator.csv", rows)
    atomic_write_text(out / "machine.json", json.dumps(note, indent=1))
    table = summary(rows)
    if table:
        bar_chart(table, out / "allocator.png")
    print(markdown(table, note))
    for r in rows:
        if "error" in r:
            print(f"failed: {r['method']} (round {r['round']}): {r['error']}")
    print(f"wrote {out}/allocator.csv, machine.json, allocator.png ({time.perf_counter() - t0:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
