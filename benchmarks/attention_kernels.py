"""Which attention kernel is faster on this machine, by sequence length and head width: the evidence behind
`methods.nets.transformer.plain_is_faster`, the rule `trainer.attention=auto` follows on CPU.

    python -m benchmarks.attention_kernels                                   # the grid below, ~2 min on 2 cores
    python -m benchmarks.attention_kernels lengths=16,64,256 head_dims=8,32 tokens=4096 out=results/attention
Own options: lengths=a,b (default 16,64,128,256,512,1024), head_dims=a,b (default 8,16,32,64), tokens=N
(query tokens per call, batch x heads x length, default 16384: a tiny preset's training batch), repeats=N
(timed calls per kernel and round, default 5), rounds=N (default 2), precision=bf16-mixed|32-true (default:
what `trainer.precision=auto` picks here), out=DIR (default results/attention_kernels).

For every (mode, length, head width): the plain softmax(QK^T / sqrt(d))V and PyTorch's fused
`scaled_dot_product_attention` on the same random (B, heads, L, d) queries, keys and values, in turns (round
by round, plain first in odd rounds), under the run's autocast; `train` times forward + backward, `sample`
the forward under `torch.no_grad()`. Heads: 4 for widths under 32, 2 from 32 on (the batch makes up the tokens).
Per cell: the median seconds of each kernel (best round), `plain_over_fused` (below 1: the plain form is
faster), `rule` (the kernel `trainer.attention=auto` picks on CPU: in training the one `plain_is_faster` names,
in sampling always the fused one) and `rule_is_faster`. Outputs in out/:
attention_kernels.csv, attention_kernels.png (the ratio against length, one line per head width and mode),
machine.json (the matmul probe); the table is printed as Markdown.
"""

from __future__ import annotations

import difflib
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from methods.nets.transformer import plain_attention

USAGE = __doc__
OWN_KEYS = ("lengths", "head_dims", "tokens", "repeats", "rounds", "precision", "out")
MODES = ("train", "sample")


def _parse(argv: list[str]) -> dict:
    opts = {"lengths": [16, 64, 128, 256, 512, 1024], "head_dims": [8, 16, 32, 64], "tokens": 16384, "repeats": 5,
            "rounds": 2, "precision": "auto", "out": "results/attention_kernels"}
    for a in argv:
        key, eq, value = a.partition("=")
        if not eq or key not in OWN_KEYS:
            near = difflib.get_close_matches(key, OWN_KEYS, n=1)
            hint = f"did you mean {near[0]}=? " if near else ""
            raise SystemExit(f"error: unknown option {a!r}; {hint}options: {', '.join(k + '=' for k in OWN_KEYS)}")
        if key in ("precision", "out"):
            opts[key] = value
            continue
        is_list = key in ("lengths", "head_dims")
        try:
            numbers = [int(v) for v in value.split(",")]
        except ValueError:
            kind, example = ("a list of whole numbers", "16,64") if is_list else ("a whole number", "5")
            raise SystemExit(f"error: {key}={value!r} is not {kind}, e.g. {key}={example}") from None
        if min(numbers) < 1 or (not is_list and len(numbers) > 1):
            raise SystemExit(f"error: {key}={value!r}: give {'positive lengths' if is_list else 'one positive number'}")
        opts[key] = numbers if is_list else numbers[0]
    if opts["precision"] not in ("auto", "bf16-mixed", "32-true"):
        raise SystemExit(f"error: precision={opts['precision']!r}; choose auto, bf16-mixed or 32-true")
    return opts


KERNELS = {"plain": plain_attention, "fused": torch.nn.functional.scaled_dot_product_attention}


def time_cell(mode: str, length: int, head_dim: int, tokens: int, repeats: int, rounds: int, bf16: bool) -> dict:
    """Median seconds per call of each kernel (the best of `rounds`, the kernels taking turns) for one cell."""
    heads = 4 if head_dim < 32 else 2
    batch = max(1, tokens // (heads * length))
    gen = torch.Generator().manual_seed(0)
    qkv = [torch.randn(batch, heads, length, head_dim, generator=gen, requires_grad=mode == "train") for _ in range(3)]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    best = {name: float("inf") for name in KERNELS}
    for r in range(rounds):
        for name in (("plain", "fused") if r % 2 == 0 else ("fused", "plain")):
            fn, seconds = KERNELS[name], []
            for _ in range(repeats + 1):  # the first call warms up
                t0 = time.perf_counter()
                with torch.set_grad_enabled(mode == "train"), autocast:
                    out = fn(*qkv)
                if mode == "train":
                    out.float().sum().backward()
                seconds.append(time.perf_counter() - t0)
            best[name] = min(best[name], statistics.median(seconds[1:]))
    return {"batch": batch, "heads": heads, "plain_seconds": best["plain"], "fused_seconds": best["fused"]}


def run(opts: dict, progress: bool = True) -> tuple[list[dict], dict]:
    from tqdm import tqdm

    from benchmarks.machine import fast_bf16, machine_note
    from methods.nets.transformer import plain_is_faster

    bf16 = fast_bf16() if opts["precision"] == "auto" else opts["precision"] == "bf16-mixed"
    note = machine_note(seconds_budget=1.0)
    note["precision"] = "bf16-mixed" if bf16 else "32-true"
    cells = [(m, length, d) for m in MODES for d in opts["head_dims"] for length in opts["lengths"]]
    rows = []
    for mode, length, d in tqdm(cells, desc="attention kernels", unit="cell", disable=not progress):
        t = time_cell(mode, length, d, opts["tokens"], opts["repeats"], opts["rounds"], bf16)
        ratio = t["plain_seconds"] / t["fused_seconds"]
        rule = "plain" if mode == "train" and plain_is_faster(length, d) else "fused"
        rows.append({"mode": mode, "length": length, "head_dim": d, **t, "plain_over_fused": ratio, "rule": rule,
                     "rule_is_faster": (ratio <= 1.0) == (rule == "plain"), "tokens": opts["tokens"],
                     "precision": note["precision"]})
    return rows, note


def markdown(rows: list[dict], note: dict) -> str:
    lengths = sorted({r["length"] for r in rows})
    lines = [f"Plain softmax(QK^T)V over PyTorch's fused kernel, seconds ratio (below 1: plain is faster; `*`: the "
             f"kernel `trainer.attention=auto` picks is the slower one), {note['precision']}, bf16 matmul probe "
             f"{note.get('bf16_matmul_gflops', 0):.0f} GFLOP/s, {rows[0]['tokens'] if rows else 0} query tokens a call",
             "", "| mode | head width | " + " | ".join(f"L={n}" for n in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for mode in MODES:
        for d in sorted({r["head_dim"] for r in rows}):
            cells = {r["length"]: r for r in rows if r["mode"] == mode and r["head_dim"] == d}
            if cells:
                lines.append(f"| {mode} | {d} | " + " | ".join(
                    f"{cells[n]['plain_over_fused']:.2f}{'' if cells[n]['rule_is_faster'] else '*'}" if n in cells
                    else "" for n in lengths) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODES), figsize=(10, 3.8), sharey=True)
    for ax, mode in zip(axes, MODES):
        for d in sorted({r["head_dim"] for r in rows}):
            cells = sorted((r["length"], r["plain_over_fused"]) for r in rows if r["mode"] == mode and r["head_dim"] == d)
            if cells:
                ax.plot(*zip(*cells), marker="o", label=f"head width {d}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_title(f"{mode} ({'forward + backward' if mode == 'train' else 'forward, no grad'})")
    axes[0].set_ylabel("plain / fused seconds (below 1: plain faster)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return []
    opts = _parse(argv)
    from benchmarks.results import atomic_write_csv, atomic_write_text

    t0 = time.perf_counter()
    rows, note = run(opts)
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out / "attention_kernels.csv", rows)
    atomic_write_text(out / "machine.json", json.dumps(note, indent=1))
    plot(rows, out / "attention_kernels.png")
    print(markdown(rows, note))
    wrong = sum(not r["rule_is_faster"] for r in rows)
    print(f"the rule picks the faster kernel in {len(rows) - wrong} of {len(rows)} cells")
    print(f"wrote {out}/attention_kernels.csv, attention_kernels.png, machine.json ({time.perf_counter() - t0:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
