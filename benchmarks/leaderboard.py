"""Export the results store: CSV (every field of every run), Markdown (seeds aggregated), PNG plots.

    python -m benchmarks.leaderboard                                  # Markdown tables on stdout
    python -m benchmarks.leaderboard --format csv > leaderboard.csv   # one row per run, every field
    python -m benchmarks.leaderboard --format png --out board.png     # quality vs sampling cost (+ sweep plot)
    python -m benchmarks.leaderboard --sweep vdm_guidance --format png --metric fvd --out guidance.png
Options: --results PATH (default results/results.jsonl), --dataset/--method/--tag/--sweep/--scale/--task
(comma-separated lists; --task class,image+class), --metric NAME (PNG y axis), --cost seconds|gflops|params (PNG x axis),
--strict (exit with an error instead of splitting a metric over protocols), --out PATH,
--include-degenerate (keep runs whose samples were NaN / constant / static, marked; default: left out).
One row per run folder and config: a re-evaluation (`benchmarks.evaluate run=X append=true`) replaces its run's row;
one at other sampling settings (`sample.guidance=5`) is its own row, its setting a column.

Runs that differ only in their seed are one entry: mean ± sample std over seeds. A metric is
only put in one column when its protocol (detector and its sha256, n_gen, n_real, frames,
resolution, covariance convention, ...) is the same; otherwise the column is split, named
`fvd [A]`, `fvd [B]`, with a note saying what differs. The task (`unconditional`, `class`,
`image+class`, ...: what is generated from what, `row_task`) is part of the protocol, and
every task gets its own table. Importing this module does not import torch or Lightning: it
stays a fast CLI.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.config_keys import ABSENT_AT_DEFAULT, HOW_KEYS
from benchmarks.results import read_rows

USAGE = __doc__
METRICS = ("fvd", "is", "clipsim", "cond_acc", "rfvd")  # known quality metrics, in display order
LOWER_IS_BETTER = {"fvd", "rfvd"}
# Fields that define how a number was measured (written by evaluation.protocol): two numbers that differ in
# one of the fields of their metric do not share a column.
COMMON_PROTOCOL = ("split", "real_split", "resolution", "frames", "stride", "n_gen", "clip_seed", "eval_protocol",
                   "task", "first_frame_split")
# Rows written before `task` was recorded: the image-to-video methods of that time (their first frames came from
# the real set's training clips then, so their rows also lack `first_frame_split`: they stay apart from new ones).
LEGACY_IMAGE_TO_VIDEO = ("dvdm", "edvdm")
# How a row's `guidance` is to be read (methods.diffusion.GUIDANCE_CONVENTION): rows written before it was
# recorded used w = s - 1, so their guidance values mean something else. Scores of generated samples only.
SAMPLING_PROTOCOL = ("guidance_convention",)
METRIC_PROTOCOL = {
    "fvd": ("detector", "detector_sha256", "detector_options", "n_real", "covariance", "matrix_sqrt", "fvd_protocol",
            *SAMPLING_PROTOCOL),
    "rfvd": ("detector", "detector_sha256", "detector_options", "covariance", "matrix_sqrt", "n_rec"),
    "is": ("is_detector", "is_detector_sha256", "is_protocol", "is_splits", *SAMPLING_PROTOCOL),
    "clipsim": ("clip_detector", "clip_detector_sha256", *SAMPLING_PROTOCOL),
    "cond_acc": ("detector", "detector_sha256", "is_detector", "is_detector_sha256", *SAMPLING_PROTOCOL),
}
PROTOCOL_FIELDS = tuple(dict.fromkeys(COMMON_PROTOCOL + sum(METRIC_PROTOCOL.values(), ())))
COST_FIELDS = {"seconds": "sample_seconds_per_video", "gflops": "gflops_per_video", "params": "params"}
# Config keys that never change a result (paths, labels, progress settings) and the seed (aggregated over).
NOT_A_SETTING = (*HOW_KEYS, "seed")
ABSENT = "<absent>"  # CSV cell of a field this run does not have (an empty cell is None)
FRONT = ("method", "dataset", "scale", "tag", "seed", *METRICS, "is_std", "params", "train_seconds",
         "sample_seconds_per_video", "gflops_per_video", "config_sha256")


# --- CSV: one row per run, every field, round-trips -----------------------------------------------


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts -> one level with dotted keys; an empty dict stays a value so it round-trips."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def unflatten(d: dict) -> dict:
    out: dict = {}
    for key, v in d.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _encode(v) -> str:
    """A cell: plain strings as they are, everything else as JSON; None is the empty cell."""
    if v is None:
        return ""
    if isinstance(v, str):
        if v in ("", ABSENT):
            return json.dumps(v)
        try:
            json.loads(v)
        except ValueError:
            return v
        return json.dumps(v)  # a string that would read back as a number/bool/... is quoted
    return json.dumps(v)


def _decode(cell: str):
    if cell == "":
        return None
    try:
        return json.loads(cell)
    except ValueError:
        return cell


def to_csv(rows: list[dict]) -> str:
    """One line per run, a column per (flattened) field; `from_csv` gives the rows back exactly."""
    flat = [flatten(r) for r in rows]
    keys = {k for r in flat for k in r}
    columns = [k for k in FRONT if k in keys] + sorted(keys - set(FRONT))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in flat:
        w.writerow([_encode(r[k]) if k in r else ABSENT for k in columns])
    return buf.getvalue()


def from_csv(text: str) -> list[dict]:
    reader = csv.reader(io.StringIO(text))
    columns = next(reader, [])
    return [unflatten({k: _decode(c) for k, c in zip(columns, cells, strict=True) if c != ABSENT}) for cells in reader]


# --- selection and aggregation ---------------------------------------------------------------------


def latest_per_run(rows: list[dict]) -> list[dict]:
    """One row per run folder and config: a re-evaluation (`benchmarks.evaluate run=X append=true`) replaces the
    run's row; one at other sampling settings (`sample.guidance=5`: another config hash) is a row of its own."""
    def key(r: dict) -> tuple[str, str] | None:
        run = r.get("reevaluation_of") or r.get("run_dir")
        return (str(run), str(r.get("config_sha256"))) if run else None

    last = {key(r): i for i, r in enumerate(rows) if key(r)}
    return [r for i, r in enumerate(rows) if key(r) is None or last[key(r)] == i]


def select(rows: list[dict], *, dataset=None, method=None, tag=None, scale=None, task=None,
           include_degenerate: bool = False) -> list[dict]:
    """Successful runs matching every given filter (each a collection of accepted values), one row per run.

    Rows whose samples were degenerate (NaN, constant or static videos: `evaluation.sanity`) are
    left out with a warning, or kept and marked when include_degenerate.
    """
    import warnings

    def keep(r: dict) -> bool:
        return (r.get("status", "ok") != "failed"
                and all(want is None or str(r.get(k)) in want
                        for k, want in (("dataset", dataset), ("method", method), ("tag", tag), ("scale", scale)))
                and (task is None or str(row_task(r)) in task))
    kept = [r for r in latest_per_run(rows) if keep(r)]
    bad = [r for r in kept if r.get("status", "ok") == "degenerate"]
    if bad and not include_degenerate:
        warnings.warn(f"{len(bad)} run(s) with degenerate samples left out (" + "; ".join(
            f"{r.get('method')} {r.get('run_dir')}: {', '.join(r.get('flags') or [])}" for r in bad[:3])
            + "); --include-degenerate shows them marked", stacklevel=2)
        kept = [r for r in kept if r.get("status", "ok") != "degenerate"]
    return kept


def settings(row: dict) -> dict:
    """The flattened run config without paths, labels and seed (what makes two runs the same experiment)."""
    cfg = row.get("config")
    if not isinstance(cfg, dict):  # a row without its config: identify it by its own fields
        cfg = {k: row.get(k) for k in ("method", "dataset", "scale", "steps", "guidance", "sampler", "ema_decay",
                                       "precision", "resolution", "frames")}
    flat = flatten({k: v for k, v in cfg.items() if k not in NOT_A_SETTING})
    return {k: v for k, v in flat.items() if k not in NOT_A_SETTING
            and not (k in ABSENT_AT_DEFAULT and v == ABSENT_AT_DEFAULT[k])}


def row_task(row: dict) -> str | None:
    """The task a row's numbers belong to: its `task` field, else (rows written before it) what its config's
    `conditioning` values and the method say (`evaluation.grid.task_of`); None when the row cannot say."""
    if row.get("task"):
        return str(row["task"])
    cfg = row.get("config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("method"), dict):
        return None
    from evaluation.grid import task_of

    i2v = row.get("image_to_video")
    return task_of(cfg["method"], bool(i2v) if i2v is not None else row.get("method") in LEGACY_IMAGE_TO_VIDEO)


def protocol(row: dict, metric: str | None = None) -> dict:
    """The protocol fields a row records, all of them or those of one metric (plus any nested `protocol` dict)."""
    keys = PROTOCOL_FIELDS if metric is None else COMMON_PROTOCOL + METRIC_PROTOCOL.get(metric, PROTOCOL_FIELDS)
    p = {k: row[k] for k in keys if row.get(k) is not None}
    task = row_task(row)
    if task is not None:
        p["task"] = task
    if isinstance(row.get("protocol"), dict):
        p.update(flatten(row["protocol"], "protocol."))
    return p


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class Entry:
    """Runs of one experiment (same settings and protocol, seeds differ)."""

    rows: list[dict]
    settings: dict
    protocol: dict
    swept: dict = field(default_factory=dict)  # the settings that vary within its method, e.g. {"sample.guidance": 1}

    @property
    def method(self) -> str:
        return str(self.rows[0].get("method"))

    @property
    def dataset(self) -> str:
        return str(self.rows[0].get("dataset"))

    @property
    def task(self) -> str | None:
        return self.protocol.get("task")

    def protocol_of(self, metric: str) -> dict:
        return protocol(self.rows[0], metric)

    @property
    def seeds(self) -> list:
        return sorted({r.get("seed") for r in self.rows}, key=str)

    def stat(self, key: str) -> tuple[float, float, int] | None:
        """(mean, sample std (0 for one value), n) of a numeric field over the runs that have it."""
        vals = [float(r[key]) for r in self.rows
                if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
        if not vals:
            return None
        return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


def aggregate(rows: list[dict]) -> list[Entry]:
    """Group runs by (settings, protocol); mark the settings that vary among each method's entries."""
    groups: dict[str, Entry] = {}
    for r in rows:
        s, p = settings(r), protocol(r)
        key = _digest([s, p])
        if key not in groups:
            groups[key] = Entry([], s, p)
        groups[key].rows.append(r)
    entries = list(groups.values())
    by_method = defaultdict(list)
    for e in entries:
        by_method[(e.method, e.dataset)].append(e)

    def value(e: Entry, k: str):  # a later-added key left at its default reads as that default, not as absent
        return e.settings.get(k, ABSENT_AT_DEFAULT.get(k))

    for group in by_method.values():
        keys = {k for e in group for k in e.settings}
        varying = sorted(k for k in keys if len({json.dumps(value(e, k), sort_keys=True) for e in group}) > 1)
        for e in group:
            e.swept = {k: value(e, k) for k in varying if k != "method.name"}
    return entries


def metric_columns(entries: list[Entry], metric: str) -> list[tuple[str, dict | None]]:
    """[(column name, protocol or None)] for one metric: one column, or one per distinct protocol."""
    protos = []
    for e in entries:
        if e.stat(metric) is not None and e.protocol_of(metric) not in protos:
            protos.append(e.protocol_of(metric))
    if len(protos) <= 1:
        return [(metric, None)] if protos else []
    return [(f"{metric} [{chr(ord('A') + i)}]", p) for i, p in enumerate(protos)]


def protocol_note(columns: list[tuple[str, dict | None]]) -> str:
    """What differs between the protocols of a split metric, field by field."""
    protos = [p for _, p in columns if p is not None]
    keys = sorted({k for p in protos for k in p if len({json.dumps(q.get(k)) for q in protos}) > 1})
    parts = [f"{name}: " + ", ".join(f"{k}={_short(p.get(k))}" for k in keys) for name, p in columns]
    return "; ".join(parts)


class ProtocolMismatch(ValueError):
    """A metric was measured under different protocols (raised only with --strict)."""


# --- Markdown ---------------------------------------------------------------------------------------


def _short(value) -> str:
    """A protocol value for display: sha256 digests shortened to 12 characters."""
    text = str(value)
    return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


def _fmt(stat: tuple[float, float, int] | None, digits: int = 4) -> str:
    if stat is None:
        return ""
    mean, std, n = stat
    return f"{mean:.{digits}g} ± {std:.2g}" if n > 1 else f"{mean:.{digits}g}"


def _sort_key(e: Entry, metric: str | None):
    s = e.stat(metric) if metric else None
    if s is None:
        return (1, 0.0, e.method)
    return (0, s[0] if metric in LOWER_IS_BETTER else -s[0], e.method)


def to_markdown(entries: list[Entry], strict: bool = False) -> str:
    """One table per dataset and task: method, swept settings, seeds, metrics (mean ± std), costs; notes below."""
    if not entries:
        return "_no runs match the filters_\n"
    out = []
    for dataset, task in sorted({(e.dataset, e.task or "") for e in entries}):
        group = [e for e in entries if e.dataset == dataset and (e.task or "") == task]
        cols, notes = [], []
        for m in METRICS:
            mc = metric_columns(group, m)
            if len(mc) > 1:
                if strict:
                    raise ProtocolMismatch(f"{dataset}: {m} was measured under different protocols: "
                                           f"{protocol_note(mc)}")
                notes.append(f"`{m}` is split by protocol, the numbers are not comparable across columns: "
                             f"{protocol_note(mc)}")
            cols += [(name, m, p) for name, p in mc]
        primary = next((m for _, m, _ in cols), None)
        swept = sorted({k for e in group for k in e.swept})
        ref = any(e.stat("train_seconds_ref") is not None for e in group)  # rows that carry the machine probe
        header = ["method", *swept, "seeds", *(name for name, _, _ in cols),
                  "params (M)", "train s", *(["train s @570"] if ref else []), "sample s/video", "GFLOPs/video"]
        title = f"### {dataset}" + (f" (task: {task})" if task else "")
        lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for e in sorted(group, key=lambda e: _sort_key(e, primary)):
            marked = e.method + (" (degenerate samples)" if any(r.get("status") == "degenerate" for r in e.rows) else "")
            cells = [marked, *(json.dumps(e.swept[k]) if k in e.swept else "" for k in swept), str(len(e.seeds))]
            cells += [_fmt(e.stat(m)) if p is None or e.protocol_of(m) == p else "" for _, m, p in cols]
            params = e.stat("params")
            cells += [f"{params[0] / 1e6:.3g}" if params else "", _fmt(e.stat("train_seconds"), 3),
                      *([_fmt(e.stat("train_seconds_ref"), 3)] if ref else []),
                      _fmt(e.stat("sample_seconds_per_video"), 3), _fmt(e.stat("gflops_per_video"), 3)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if any(len(e.seeds) > 1 for e in group):
            lines.append("Values are mean ± sample standard deviation over seeds.")
        if ref:
            lines.append("`train s @570`: training seconds scaled by the machine's bf16 matmul speed, measured at the "
                         "start of each run, to a 570 GFLOP/s machine (benchmarks.machine).")
        common = {k: v for k, v in group[0].protocol.items() if all(e.protocol.get(k) == v for e in group)}
        if common:
            lines.append("Protocol: " + ", ".join(f"{k}={_short(v)}" for k, v in sorted(common.items())) + ".")
        lines += [f"Note: {n}" for n in notes]
        out.append("\n".join(lines).rstrip() + "\n")
    return "\n".join(out)


# --- PNG --------------------------------------------------------------------------------------------


def numeric_sweep_key(entries: list[Entry]) -> str | None:
    """The first swept setting whose values are all numbers (the x axis of the sweep plot)."""
    keys = sorted({k for e in entries for k in e.swept})
    for k in keys:
        vals = [e.swept.get(k) for e in entries if k in e.swept]
        if vals and all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals):
            return k
    return None


def plot(entries: list[Entry], metric: str | None = None, cost: str = "seconds"):
    """A matplotlib Figure: quality vs sampling cost per method, and metric vs the swept parameter if any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric or next((m for m in METRICS if any(e.stat(m) for e in entries)), "fvd")
    sweep_key = numeric_sweep_key(entries)
    fig, axes = plt.subplots(1, 2 if sweep_key else 1, figsize=(12 if sweep_key else 6.5, 4.8), squeeze=False)
    ax = axes[0, 0]
    methods = sorted({e.method for e in entries})
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    cost_key = COST_FIELDS[cost]
    mc = metric_columns(entries, metric)
    markers = {json.dumps(p, sort_keys=True): mk for (_, p), mk in zip(mc, "osD^v<>p*h", strict=False)}
    for m in methods:
        for e in (e for e in entries if e.method == m):
            x, y = e.stat(cost_key), e.stat(metric)
            if x is None or y is None:
                continue
            mk = markers.get(json.dumps(e.protocol_of(metric), sort_keys=True), "o") if len(mc) > 1 else "o"
            ax.errorbar(x[0], y[0], yerr=y[1], xerr=x[1], fmt=mk, color=colors[m], capsize=3, label=m)
            if e.swept:  # which variant this point is, e.g. "guidance=1.0"
                ax.annotate(",".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(e.swept.items())), (x[0], y[0]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7, color=colors[m])
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    if uniq:
        ax.legend(uniq.values(), uniq.keys(), title="method")
        if cost != "params":
            ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, f"no runs with both {metric} and {cost_key}", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel({"seconds": "sampling seconds per video", "gflops": "GFLOPs per video",
                   "params": "parameters"}[cost])
    ax.set_ylabel(metric + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
    ax.set_title(f"{metric} vs sampling cost" + (" (marker = protocol: not comparable)" if len(mc) > 1 else ""))
    ax.grid(alpha=0.3)
    if sweep_key:
        ax2 = axes[0, 1]
        lines = defaultdict(list)  # one line per method and combination of the other swept settings
        for e in entries:
            if sweep_key not in e.swept or e.stat(metric) is None:
                continue
            rest = {k: v for k, v in e.swept.items() if k != sweep_key}
            label = e.method + "".join(f", {k.split('.')[-1]}={v}" for k, v in sorted(rest.items()))
            lines[label].append((e.swept[sweep_key], e.stat(metric), e.method))
        for label, pts in sorted(lines.items()):
            pts.sort(key=lambda t: t[0])
            ax2.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts], marker="o",
                         capsize=3, label=label, color=colors[pts[0][2]])
        ax2.set_xlabel(sweep_key)
        ax2.set_ylabel(metric)
        ax2.set_title(f"{metric} vs {sweep_key} (mean ± std over seeds)")
        ax2.grid(alpha=0.3)
        if lines:
            ax2.legend()
    fig.tight_layout()
    return fig


# --- command line -----------------------------------------------------------------------------------


def parse_options(argv: list[str], opts: dict, flags: tuple[str, ...], usage: str) -> dict[str, set[str] | None]:
    """Fill `opts` from `--name value` / `--name=value` arguments (`flags` take no value; dashes in names
    read as underscores) and return the run filters (--dataset/--method/--tag/--sweep/--scale, comma lists)."""
    filters: dict[str, set[str] | None] = {"dataset": None, "method": None, "tag": None, "scale": None, "task": None}
    it = iter(argv)
    for a in it:
        if a in flags:
            opts[a[2:].replace("-", "_")] = True
            continue
        if not a.startswith("--"):
            raise SystemExit(f"error: unexpected argument {a!r}\n{usage}")
        name, _, value = a[2:].partition("=")
        name = name.replace("-", "_")
        if not value:
            value = next(it, "")
        if not value:
            raise SystemExit(f"error: --{name} needs a value")
        if name == "sweep":
            name = "tag"  # a sweep tags its runs with its name
        if name in filters:
            filters[name] = set(value.split(","))
        elif name in opts:
            opts[name] = value
        else:
            raise SystemExit(f"error: unknown option --{name}\n{usage}")
    return filters


def _parse(argv: list[str]) -> dict:
    opts = {"format": "markdown", "results": "results/results.jsonl", "out": None, "metric": None,
            "cost": "seconds", "strict": False, "include_degenerate": False}
    filters = parse_options(argv, opts, ("--strict", "--include-degenerate"), USAGE)
    if opts["format"] not in ("csv", "markdown", "png"):
        raise SystemExit(f"error: --format must be csv, markdown or png, got {opts['format']!r}")
    if opts["cost"] not in COST_FIELDS:
        raise SystemExit(f"error: --cost must be one of {', '.join(COST_FIELDS)}, got {opts['cost']!r}")
    return {**opts, "filters": filters}


def main(argv: list[str] | None = None) -> str:
    """Run the CLI; returns what it wrote (text, or the PNG path)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return ""
    opts = _parse(argv)
    if not Path(opts["results"]).exists():
        raise SystemExit(f"error: no results store at {opts['results']} (set --results PATH)")
    rows = select(read_rows(opts["results"]), **opts["filters"], include_degenerate=opts["include_degenerate"])
    if opts["format"] == "csv":
        text = to_csv(rows)
    elif opts["format"] == "markdown":
        try:
            text = to_markdown(aggregate(rows), strict=opts["strict"])
        except ProtocolMismatch as e:
            raise SystemExit(f"error: {e}") from None
    else:
        entries = aggregate(rows)
        if opts["strict"] and len(metric_columns(entries, opts["metric"] or "fvd")) > 1:
            raise SystemExit(f"error: {opts['metric'] or 'fvd'} was measured under different protocols")
        out = Path(opts["out"] or "leaderboard.png")
        out.parent.mkdir(parents=True, exist_ok=True)
        plot(entries, opts["metric"], opts["cost"]).savefig(out, dpi=120)
        print(f"wrote {out} ({len(rows)} runs, {len(entries)} entries)")
        return str(out)
    if opts["out"]:
        Path(opts["out"]).parent.mkdir(parents=True, exist_ok=True)
        Path(opts["out"]).write_text(text)
        print(f"wrote {opts['out']} ({len(rows)} runs)")
    else:
        sys.stdout.write(text)
    return text


if __name__ == "__main__":
    main()
