"""The report page: the comparison as a researcher wants to see it, one folder that opens anywhere.

    python -m benchmarks.report                                        # results/results.jsonl -> report/index.html
    python -m benchmarks.report --sweep vdm_guidance --out report-guidance
    python -m benchmarks.report --results r.jsonl --figures docs/results,results/efficiency --max-videos 4
Options: --results PATH (default results/results.jsonl), --dataset/--method/--tag/--sweep/--scale
(comma-separated lists, as the leaderboard), --out DIR (default report), --figures DIR[,DIR...] (every
*.png in them shown, every *.csv rendered as a table; default: the *.png and efficiency*.csv files beside
the results store and in its efficiency/ folder), --max-videos N (sample videos per method, default 8),
--include-degenerate (as the leaderboard: keep runs whose samples were degenerate, marked), --screenshot PNG
(load the written page in headless chromium, benchmarks.browser: save a full-page screenshot and fail if a
video did not decode, an image did not load or the console shows an error).

The folder holds index.html and everything it shows, by relative paths only: it can be zipped and opened
anywhere, with no server and no network (plain HTML and CSS, no script, no web fonts). The page:
- the leaderboard: benchmarks.leaderboard's tables (seeds aggregated, metrics split by protocol) with its
  protocol and notes, as HTML;
- figures: the PNGs (budget curves, efficiency charts) and CSV tables (efficiency) found or given;
- samples: per dataset, one row per method (videos of one run of it: its best entry by the first
  metric, lowest seed; the row says which run) and one column per conditioning: a class per column on
  labelled data (the first sample of that class), else real clip i (its caption / first frame) per
  column; every video is labelled with what it was conditioned on (samples/conditioning.json, written
  by benchmarks.run.write_samples); at most --max-videos per method;
- runs: every selected run with its original run folder and a copy of its config.yaml (and metrics.json,
  the sample grid) under runs/<name>/.
The same store and options give a byte-identical index.html (sorted orders, no timestamps); the folder
is rebuilt whole on every call (an existing folder is replaced only if it is an earlier report).
Importing this module does not import torch.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.leaderboard import LOWER_IS_BETTER, METRICS, Entry, aggregate, parse_options, select, to_markdown
from benchmarks.results import read_rows
from benchmarks.run_folder import RunFolder
from evaluation.grid import conditioning_kinds

USAGE = __doc__
GENERATOR = '<meta name="generator" content="benchmarks.report">'  # marks a folder this module may replace
CSV_MAX_ROWS = 200
MANIFEST = "conditioning.json"  # written beside the samples by benchmarks.run.write_samples


# --- small HTML helpers -----------------------------------------------------------------------------


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def _inline(text: str) -> str:
    """Markdown inline subset -> HTML: `code`, **bold**, a whole _italic_ line; everything else escaped."""
    stripped = text.strip()
    if len(stripped) > 2 and stripped[0] == stripped[-1] == "_":
        return f"<em>{esc(stripped[1:-1])}</em>"
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for p in parts:
        if len(p) >= 2 and p[0] == p[-1] == "`":
            out.append(f"<code>{esc(p[1:-1])}</code>")
        else:
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", esc(p)))
    return "".join(out)


_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?( ± [-+]?[\d.eE+-]+)?$")


def _cell(tag: str, text: str) -> str:
    cls = ' class="num"' if tag == "td" and _NUMBER.match(text.strip()) else ""
    return f"<{tag}{cls}>{_inline(text.strip())}</{tag}>"


def _split_row(line: str) -> list[str]:
    return line.strip().strip("|").split("|")


def markdown_html(md: str, min_heading: int = 3) -> str:
    """The Markdown subset benchmarks.leaderboard writes (headings, pipe tables, lines of text) as HTML."""
    out: list[str] = []
    table: list[str] = []

    def flush() -> None:
        if not table:
            return
        rows = [r for r in table if not re.match(r"^\|?\s*:?-{3,}", r.strip())]
        head, body = rows[0], rows[1:]
        out.append('<div class="scroll"><table>')
        out.append("<thead><tr>" + "".join(_cell("th", c) for c in _split_row(head)) + "</tr></thead>")
        out.append("<tbody>" + "".join("<tr>" + "".join(_cell("td", c) for c in _split_row(r)) + "</tr>"
                                       for r in body) + "</tbody>")
        out.append("</table></div>")
        table.clear()

    for line in md.splitlines():
        if line.lstrip().startswith("|"):
            table.append(line)
            continue
        flush()
        if not line.strip():
            continue
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if m:
            level = min(6, max(min_heading, len(m.group(1))))
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
        else:
            out.append(f'<p class="note">{_inline(line)}</p>')
    flush()
    return "\n".join(out)


def _fmt_csv_cell(cell: str) -> str:
    """Long floats shortened to 4 significant digits; everything else as written."""
    try:
        value = float(cell)
    except ValueError:
        return cell
    if re.fullmatch(r"[-+]?\d+", cell.strip()) or len(cell) <= 8:
        return cell
    return f"{value:.4g}"


def csv_html(path: Path, max_rows: int = CSV_MAX_ROWS) -> str:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return '<p class="note"><em>empty CSV</em></p>'
    head, body = rows[0], rows[1:]
    out = ['<div class="scroll"><table>', "<thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in head) + "</tr></thead>",
           "<tbody>"]
    for r in body[:max_rows]:
        cells = [_fmt_csv_cell(c) for c in r]
        out.append("<tr>" + "".join(f'<td{" class=num" if _NUMBER.match(c.strip()) else ""}>{esc(c)}</td>'
                                    for c in cells) + "</tr>")
    out.append("</tbody></table></div>")
    if len(body) > max_rows:
        out.append(f'<p class="note">first {max_rows} of {len(body)} rows</p>')
    return "\n".join(out)


# --- the runs and their samples ---------------------------------------------------------------------


def _slug(run_dir: str) -> str:
    """A folder name for a run inside the report: its own name, made unique by a hash of its full path."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(run_dir).name) or "run"
    return f"{name}-{hashlib.sha256(run_dir.encode()).hexdigest()[:8]}"


def locate_run(run_dir: str, results: Path) -> Path | None:
    """The run folder on this machine: as written in the row (relative to the current folder), else relative
    to the folder above the results store (a store at <repo>/results/results.jsonl, runs at <repo>/runs)."""
    p = Path(run_dir)
    for candidate in ([p] if p.is_absolute() else [p, results.resolve().parent.parent / p]):
        if candidate.is_dir():
            return candidate
    return None


@dataclass
class Sample:
    file: Path  # the mp4 in the run folder
    index: int  # the real clip it was conditioned like
    key: str  # its column: "class <name>" on labelled data, else "clip <index>"
    order: tuple  # column order
    label: str  # what it was conditioned on


def _kinds(row: dict) -> tuple[str, ...]:
    cfg = row.get("config")
    return conditioning_kinds(cfg.get("method", {})) if isinstance(cfg, dict) else ()


def run_samples(row: dict, folder: Path) -> list[Sample]:
    """The run's sample videos in index order, each with its column and what it was conditioned on.

    From samples/conditioning.json when the run wrote one; for older runs from the file names
    (`<NNN>-<class>.mp4`) and the method's configured conditioning.
    """
    sdir = RunFolder(folder).samples_dir
    files = sorted(sdir.glob("*.mp4")) if sdir.is_dir() else []
    records: dict[str, dict] = {}
    if (sdir / MANIFEST).exists():
        try:
            records = {r["file"]: r for r in json.loads((sdir / MANIFEST).read_text())["videos"] if "file" in r}
        except (ValueError, KeyError, TypeError):
            records = {}
    kinds = _kinds(row)
    out = []
    for pos, f in enumerate(files):
        head, _, cls = f.stem.partition("-")
        index = int(head) if head.isdigit() else pos
        rec = records.get(f.name)
        if rec is not None:
            label = str(rec.get("conditioned_on"))
            number = rec.get("label")
        else:  # written before conditioning.json: what the file name and the config say
            parts = [cls] if cls and "class" in kinds else []
            if "text" in kinds:
                parts.append(f"the caption of val clip {index} (not recorded)")
            label = " + ".join(parts) or "not recorded (the run predates samples/conditioning.json)"
            number = None
        if cls:
            key, order = f"class {cls}", (0, number if isinstance(number, int) else 10**9, index, cls)
        else:
            key, order = f"clip {index}", (1, index, index, "")
        out.append(Sample(f, index, key, order, label))
    return out


@dataclass
class MethodRow:
    dataset: str
    method: str
    row: dict | None  # the run its videos come from
    entry: Entry | None
    runs: int  # runs of this method on this dataset
    why: str  # how the run was chosen
    samples: dict[str, Sample] = field(default_factory=dict)  # column key -> sample (the first of its key)


def _best_metric(entries: list[Entry]) -> str | None:
    return next((m for m in METRICS if any(e.stat(m) is not None for e in entries)), None)


def _entry_order(e: Entry, metric: str | None):
    s = e.stat(metric) if metric else None
    if s is None:
        return (1, 0.0)
    return (0, s[0] if metric in LOWER_IS_BETTER else -s[0])


def choose_samples(entries: list[Entry], results: Path) -> list[MethodRow]:
    """Per (dataset, method): the run whose videos are shown (best entry by the first metric, lowest seed, a
    run whose samples are on this machine) and its videos, one per column key."""
    out = []
    by = {}
    for e in entries:
        by.setdefault((e.dataset, e.method), []).append(e)
    for (dataset, method), group in sorted(by.items()):
        metric = _best_metric(group)
        runs = sum(len(e.rows) for e in group)
        ordered = [(e, r) for e in sorted(group, key=lambda e: (_entry_order(e, metric), json.dumps(e.swept, sort_keys=True)))
                   for r in sorted(e.rows, key=lambda r: (str(r.get("seed")), str(r.get("run_dir"))))]
        chosen = None
        for e, r in ordered:
            folder = locate_run(str(r.get("run_dir")), results) if r.get("run_dir") else None
            samples = run_samples(r, folder) if folder else []
            if samples:
                chosen = (e, r, samples)
                break
        if chosen is None:
            out.append(MethodRow(dataset, method, None, None, runs, "no run of it has sample videos on this machine"))
            continue
        e, r, samples = chosen
        why = (f"its best entry by {metric}" if metric and len(group) > 1 else "") + (
            ", lowest seed" if len(e.rows) > 1 else "")
        mr = MethodRow(dataset, method, r, e, runs, why.lstrip(", "))
        for s in samples:
            mr.samples.setdefault(s.key, s)
        out.append(mr)
    return out


# --- the page ---------------------------------------------------------------------------------------


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em 2em; color: #1d1d1f;
       background: #fff; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.9em;
       background: #f4f4f6; padding: 0 0.2em; border-radius: 3px; word-break: break-all; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #d8d8de; padding: 0.25em 0.55em; text-align: left; vertical-align: top; }
th { background: #f1f1f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; max-width: 100%; }
.note { color: #444; font-size: 0.9em; margin: 0.3em 0; }
figure { margin: 0.5em 0; display: inline-block; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.82em; color: #333; max-width: 140px; overflow-wrap: anywhere; }
.samples td, .samples th { text-align: center; }
.samples th.method, .samples td.method { text-align: left; max-width: 16em; }
.samples video { width: 128px; height: 128px; image-rendering: pixelated; background: #000; display: block; }
.figures figure { margin-right: 1em; } .figures figcaption { max-width: none; }
nav a { margin-right: 1em; }
"""


def _video_cell(href: str, s: Sample) -> str:
    return (f'<figure><video src="{esc(href)}" controls muted loop playsinline autoplay preload="auto"></video>'
            f"<figcaption>conditioned on: <b>{esc(s.label)}</b></figcaption></figure>")


def samples_html(method_rows: list[MethodRow], max_videos: int, slugs: dict[str, str]) -> tuple[str, dict[str, list[Path]]]:
    """The samples section and, per run slug, the videos it shows (to copy)."""
    out, copies = [], {}
    for dataset in sorted({m.dataset for m in method_rows}):
        group = [m for m in method_rows if m.dataset == dataset]
        keys: dict[str, tuple] = {}
        for m in group:
            for k, s in m.samples.items():
                keys[k] = min(keys.get(k, s.order), s.order)
        columns = sorted(keys, key=lambda k: (keys[k], k))[:max_videos]
        out.append(f"<h3>{esc(dataset)}</h3>")
        if not columns:
            out.append('<p class="note"><em>no sample videos on this machine for these runs</em></p>')
            continue
        by_class = any(k.startswith("class ") for k in columns)
        out.append('<p class="note">One row per method, one column per ' + (
            "class (each video conditioned like the first real val clip of that class)" if by_class else
            "real val clip (its caption / first frame)") + "; under each video, what it was conditioned on.</p>")
        out.append('<div class="scroll"><table class="samples"><thead><tr><th class="method">method (run)</th>'
                   + "".join(f"<th>{esc(k)}</th>" for k in columns) + "</tr></thead><tbody>")
        for m in group:
            if m.row is None:
                out.append(f'<tr><td class="method"><b>{esc(m.method)}</b><br><span class="note">{esc(m.why)}'
                           f" ({m.runs} run{'s' if m.runs != 1 else ''})</span></td>"
                           + "<td></td>" * len(columns) + "</tr>")
                continue
            run_dir = str(m.row.get("run_dir"))
            slug = slugs[run_dir]
            swept = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(m.entry.swept.items())) if m.entry else ""
            about = (f'<b>{esc(m.method)}</b><br><span class="note">samples of run <a href="runs/{esc(slug)}/config.yaml">'
                     f"{esc(Path(run_dir).name)}</a>, seed {esc(m.row.get('seed'))}"
                     + (f", {esc(swept)}" if swept else "")
                     + (f" ({esc(m.why)}; {m.runs} runs of {esc(m.method)}, all under Runs)" if m.runs > 1 else "")
                     + "</span>")
            cells = []
            for k in columns:
                s = m.samples.get(k)
                if s is None:
                    cells.append("<td></td>")
                    continue
                copies.setdefault(slug, []).append(s.file)
                cells.append(f"<td>{_video_cell(f'runs/{slug}/samples/{s.file.name}', s)}</td>")
            out.append(f'<tr><td class="method">{about}</td>' + "".join(cells) + "</tr>")
        out.append("</tbody></table></div>")
    return "\n".join(out), copies


def find_figures(results: Path, given: list[str] | None) -> list[Path]:
    """PNG and CSV files to show: every one in the given folders (or files), else the PNGs and efficiency CSVs
    beside the results store and in its efficiency/ folder."""
    found: list[Path] = []
    if given:
        for g in given:
            p = Path(g)
            if p.is_file():
                found.append(p)
            elif p.is_dir():
                found += sorted(q for q in p.iterdir() if q.suffix.lower() in (".png", ".csv") and q.is_file())
            else:
                raise SystemExit(f"error: --figures {g}: no such file or folder")
        return found
    for d in (results.parent, results.parent / "efficiency"):
        if d.is_dir():
            found += sorted(q for q in d.iterdir() if q.is_file() and (
                q.suffix.lower() == ".png" or (q.suffix.lower() == ".csv" and q.name.startswith("efficiency"))))
    return found


def figures_html(figures: list[Path]) -> tuple[str, dict[str, Path]]:
    """The figures section and {path inside the report: source file} for the PNGs."""
    out, copies = [], {}
    folders: dict[str, str] = {}
    for f in figures:
        parent = str(f.parent)
        if parent not in folders:
            folders[parent] = f"figures/{len(folders):02d}-" + (re.sub(r"[^A-Za-z0-9._-]+", "_", f.parent.name) or "files")
        if f.suffix.lower() == ".png":
            dest = f"{folders[parent]}/{f.name}"
            copies[dest] = f
            out.append(f'<figure><img src="{esc(dest)}" alt="{esc(f.name)}"><figcaption>{esc(f.name)} '
                       f"(from <code>{esc(f)}</code>)</figcaption></figure>")
    for f in figures:
        if f.suffix.lower() == ".csv":
            out.append(f"<h3>{esc(f.name)}</h3><p class=\"note\">from <code>{esc(f)}</code></p>")
            out.append(csv_html(f))
    return "\n".join(out), copies


def runs_html(rows: list[dict], slugs: dict[str, str], files: dict[str, list[str]], shown: set[str]) -> str:
    head = ["method", "dataset", "scale", "tag", "seed", "status", "run folder (where it was written)", "copied here",
            "samples shown"]
    out = ['<div class="scroll"><table><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in sorted(rows, key=_row_order):
        run_dir = r.get("run_dir")
        slug = slugs.get(str(run_dir)) if run_dir else None
        links = " · ".join(f'<a href="runs/{esc(slug)}/{esc(name)}">{esc(name)}</a>' for name in files.get(slug, [])) \
            if slug else ""
        status = r.get("status", "ok") + (f" ({', '.join(r.get('flags') or [])})" if r.get("flags") else "")
        cells = [esc(r.get("method")), esc(r.get("dataset")), esc(r.get("scale")), esc(r.get("tag") or ""),
                 esc(r.get("seed")), esc(status),
                 f"<code>{esc(run_dir)}</code>" if slug else "<em>none recorded</em>",
                 (f'<a href="runs/{esc(slug)}/">folder</a>' + (" · " + links if links else "")) if slug else "",
                 "yes" if str(run_dir) in shown else ""]
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _row_order(r: dict):
    return (str(r.get("dataset")), str(r.get("method")), str(r.get("tag")), str(r.get("seed")), str(r.get("run_dir")))


def _config_yaml(row: dict, folder: Path | None) -> tuple[str, bytes] | None:
    """The run's config.yaml as written, else the resolved config its row carries (YAML)."""
    if folder is not None and RunFolder(folder).config_path.is_file():
        return "config.yaml", RunFolder(folder).config_path.read_bytes()
    if isinstance(row.get("config"), dict):
        from omegaconf import OmegaConf

        return "config.yaml", OmegaConf.to_yaml(OmegaConf.create(row["config"])).encode()
    return None


def build(results: Path, out: Path, *, filters: dict, figures: list[str] | None = None, max_videos: int = 8,
          include_degenerate: bool = False, results_label: str | None = None) -> Path:
    """Write the report folder `out` (index.html and its files); returns the path of index.html."""
    rows = select(read_rows(results), **filters, include_degenerate=include_degenerate)
    entries = aggregate(rows)
    slugs = {str(r["run_dir"]): _slug(str(r["run_dir"])) for r in rows if r.get("run_dir")}
    method_rows = choose_samples(entries, results) if max_videos > 0 else []
    samples_part, video_copies = samples_html(method_rows, max_videos, slugs)
    figure_files = find_figures(results, figures)
    figures_part, figure_copies = figures_html(figure_files)

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files: dict[str, list[str]] = {}  # slug -> files copied into runs/<slug>/
        for r in sorted(rows, key=_row_order):
            if not r.get("run_dir"):
                continue
            slug = slugs[str(r["run_dir"])]
            folder = locate_run(str(r["run_dir"]), results)
            dest = tmp / "runs" / slug
            dest.mkdir(parents=True, exist_ok=True)
            names = []
            config = _config_yaml(r, folder)
            if config is not None:
                (dest / config[0]).write_bytes(config[1])
                names.append(config[0])
            run = RunFolder(folder) if folder is not None else None
            for name, src in (("metrics.json", run and run.metrics_path), ("grid.png", run and run.grid_path),
                              (MANIFEST, run and run.samples_dir / MANIFEST)):
                if src is not None and src.is_file():
                    shutil.copyfile(src, dest / name)
                    names.append(name)
            files[slug] = names
        for slug, videos in video_copies.items():
            (tmp / "runs" / slug / "samples").mkdir(parents=True, exist_ok=True)
            for v in videos:
                shutil.copyfile(v, tmp / "runs" / slug / "samples" / v.name)
        for dest, src in figure_copies.items():
            (tmp / dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / dest)

        shown = {str(m.row.get("run_dir")) for m in method_rows if m.row is not None}
        active = {k: sorted(v) for k, v in filters.items() if v}
        filt = "; ".join(f"{k} = {', '.join(v)}" for k, v in sorted(active.items())) or "none"
        nav = ['<a href="#leaderboard">Leaderboard</a>', '<a href="#figures">Figures</a>' if figures_part else "",
               '<a href="#samples">Samples</a>' if method_rows else "", '<a href="#runs">Runs</a>']
        parts = [
            "<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', GENERATOR,
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            "<title>Video diffusion comparison</title>", f"<style>{CSS}</style>", "</head>", "<body>",
            "<h1>Video diffusion comparison</h1>",
            f'<p class="note">Results store <code>{esc(results_label or results)}</code>: {len(rows)} run'
            f"{'s' if len(rows) != 1 else ''} selected (filters: {esc(filt)}"
            f"{'; degenerate runs kept, marked' if include_degenerate else ''}). Written by "
            "<code>python -m benchmarks.report</code>.</p>",
            "<nav>" + "".join(n for n in nav if n) + "</nav>",
            '<h2 id="leaderboard">Leaderboard</h2>',
            '<p class="note">Runs that differ only in their seed are one entry (mean ± sample std); a metric measured '
            "under different protocols is split into columns; the protocol shared by every entry is listed under "
            "its table (<code>python -m benchmarks.leaderboard</code>).</p>",
            markdown_html(to_markdown(entries)),
        ]
        if figures_part:
            parts += ['<h2 id="figures">Figures</h2>', '<div class="figures">', figures_part, "</div>"]
        if method_rows:
            parts += ['<h2 id="samples">Samples</h2>',
                      f'<p class="note">At most {max_videos} videos per method, each from one run of it (named in '
                      "its row; the other runs are under Runs). Videos loop, muted.</p>", samples_part]
        parts += ['<h2 id="runs">Runs</h2>',
                  '<p class="note">Each run folder as the results row records it, and copies of its config.yaml '
                  "(and metrics.json, sample grid, conditioning.json where the folder was found) under "
                  "<code>runs/</code> in this report.</p>",
                  runs_html(rows, slugs, files, shown), "</body>", "</html>", ""]
        (tmp / "index.html").write_text("\n".join(parts), encoding="utf-8")
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "index.html"


def _replace(new: Path, out: Path) -> None:
    """Move the built folder `new` to `out`; an existing `out` must be empty or an earlier report."""
    if out.exists():
        index = out / "index.html"
        earlier = index.is_file() and GENERATOR in index.read_text(encoding="utf-8", errors="replace")
        if not out.is_dir() or (any(out.iterdir()) and not earlier):
            raise SystemExit(f"error: --out {out} exists and is not a report written by benchmarks.report; "
                             "choose another folder or remove it")
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(new, out)


# --- command line -----------------------------------------------------------------------------------


def _parse(argv: list[str]) -> dict:
    opts = {"results": "results/results.jsonl", "out": "report", "figures": None, "max_videos": "8",
            "include_degenerate": False, "screenshot": None}
    filters = parse_options(argv, opts, ("--include-degenerate",), USAGE)
    try:
        opts["max_videos"] = int(opts["max_videos"])
        if opts["max_videos"] < 0:
            raise ValueError
    except ValueError:
        raise SystemExit(f"error: --max-videos must be a whole number >= 0, got {opts['max_videos']!r}") from None
    if opts["figures"] is not None:
        opts["figures"] = [f for f in opts["figures"].split(",") if f]
    return {**opts, "filters": filters}


def main(argv: list[str] | None = None) -> Path | None:
    """Run the CLI; returns the path of the written index.html."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return None
    opts = _parse(argv)
    results = Path(opts["results"])
    if not results.exists():
        raise SystemExit(f"error: no results store at {results} (set --results PATH)")
    index = build(results, Path(opts["out"]), filters=opts["filters"], figures=opts["figures"],
                  max_videos=opts["max_videos"], include_degenerate=opts["include_degenerate"],
                  results_label=opts["results"])
    print(f"wrote {index} (open it in a browser; the folder {index.parent} is self-contained)")
    if opts["screenshot"]:
        check_in_browser(index, Path(opts["screenshot"]))
    return index


def check_in_browser(index: Path, png: Path) -> dict:
    """Load the page in headless chromium, save a full-page screenshot, fail if anything did not load."""
    from benchmarks.browser import BrowserError, capture

    try:
        state = capture(index, png)
    except BrowserError as e:
        raise SystemExit(f"error: --screenshot: {e}") from None
    videos, images = state["videos"], state["images"]
    bad_videos = [f"video {v['src']}: {v['error'] or 'readyState ' + str(v['readyState'])}" for v in videos
                  if v["error"] or v["readyState"] < 2]
    bad_images = [f"image {i['src']} did not load" for i in images if not i["width"]]
    bad = bad_videos + bad_images
    print(f"browser: {len(videos) - len(bad_videos)}/{len(videos)} videos decoded, "
          f"{len(images) - len(bad_images)}/{len(images)} images loaded, "
          f"{len(state['errors'])} console errors; screenshot {png} ({state['width']}x{state['height']} page)")
    if bad or state["errors"]:
        raise SystemExit("error: the page did not load cleanly:\n  " + "\n  ".join(bad + state["errors"]))
    return state


if __name__ == "__main__":
    main()
