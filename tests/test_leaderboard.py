"""The leaderboard: exact CSV round trip, seed aggregation, protocol splitting, filters, plots, a torch-free CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from benchmarks import leaderboard as lb
from benchmarks.results import append_row, read_rows

REPO = Path(__file__).resolve().parent.parent
PROTO = {"detector": "shapes_evaluator", "detector_sha256": "abc123", "n_gen": 64, "n_real": 512,
         "covariance": "biased", "resolution": 32, "frames": 16, "stride": 1, "split": "val"}


def _row(method="vdm", seed=0, guidance=1.0, tag="", dataset="shapes", **extra) -> dict:
    config = {"method": {"name": method, "unet": {"channels": [8, 16]}}, "dataset": {"name": dataset},
              "sample": {"guidance": guidance, "steps": 25}, "seed": seed, "tag": tag, "run_dir": f"runs/{seed}",
              "stages": {}}
    return {"method": method, "dataset": dataset, "scale": "tiny", "tag": tag, "seed": seed, "guidance": guidance,
            "params": 1_000_000 if method == "vdm" else 3_000_000, "sample_seconds_per_video": 2.0 + guidance,
            "train_seconds": 100.0, "config_sha256": f"{method}{seed}{guidance}", "config": config,
            "stage_params": {"denoiser": 10}, "versions": {"torch": "2.13"}, "git_dirty": True, "note": None,
            **PROTO, **extra}


@pytest.fixture
def store(tmp_path) -> Path:
    path = tmp_path / "results.jsonl"
    for seed, fvd in ((0, 100.0), (1, 110.0), (2, 120.0)):
        append_row(path, _row("vdm", seed, 1.0, "g", fvd=fvd, **{"is": 5.0 + seed}))
        append_row(path, _row("vdm", seed, 3.0, "g", fvd=fvd - 20, **{"is": 6.0}))
        append_row(path, _row("cmd", seed, 1.0, fvd=fvd / 2))
    append_row(path, _row("vdm", 0, 1.0, dataset="ucf101", fvd=500.0))
    append_row(path, {"status": "failed", "method": "vdm", "dataset": "shapes", "fvd": 0.0})
    return path


def test_csv_round_trips_every_field(store):
    rows = read_rows(store)
    rows.append({"method": "odd", "tag": "0", "text": "true", "empty": {}, "absent": "<absent>", "list": [1, None]})
    assert lb.from_csv(lb.to_csv(rows)) == rows


def test_csv_cli_writes_one_row_per_run_with_the_protocol_columns(store):
    out = subprocess.run([sys.executable, "-m", "benchmarks.leaderboard", "--results", str(store), "--format", "csv"],
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout
    back = lb.from_csv(out)
    assert back == [r for r in read_rows(store) if r.get("status") != "failed"]
    header = out.splitlines()[0].split(",")
    for col in ("method", "seed", "fvd", "detector_sha256", "n_gen", "covariance", "config.sample.guidance"):
        assert col in header


def test_markdown_aggregates_seeds_as_mean_and_std(store):
    text = lb.to_markdown(lb.aggregate(lb.select(read_rows(store), dataset={"shapes"})))
    assert "### shapes" in text and "ucf101" not in text
    assert "110 ± 10" in text and "90 ± 10" in text and "55 ± 5" in text  # vdm w=1, vdm w=3, cmd
    assert "sample.guidance" in text  # the swept setting is a column
    line = next(line for line in text.splitlines() if line.startswith("| cmd"))
    assert line.split("|")[3].strip() == "3"  # three seeds, aggregated into one entry
    assert text.index("| cmd") < text.index("| vdm")  # sorted by FVD, lower first


def test_metrics_under_different_protocols_are_split_and_noted(tmp_path):
    path = tmp_path / "r.jsonl"
    append_row(path, _row("vdm", 0, fvd=100.0))
    append_row(path, _row("cmd", 0, fvd=50.0, detector_sha256="other", n_gen=2048))
    entries = lb.aggregate(read_rows(path))
    text = lb.to_markdown(entries)
    assert "fvd [A]" in text and "fvd [B]" in text and "not comparable" in text
    assert "detector_sha256=abc123" in text and "detector_sha256=other" in text and "n_gen=2048" in text
    with pytest.raises(lb.ProtocolMismatch):
        lb.to_markdown(entries, strict=True)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.leaderboard", "--results", str(path), "--strict"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "different protocols" in proc.stderr


@pytest.mark.parametrize(("flag", "value", "n"), [("--method", "cmd", 3), ("--sweep", "g", 6), ("--tag", "g", 6),
                                                  ("--dataset", "ucf101", 1), ("--method", "vdm,cmd", 10)])
def test_filters(store, tmp_path, flag, value, n):
    out = tmp_path / "f.csv"
    lb.main(["--results", str(store), "--format", "csv", flag, value, "--out", str(out)])
    assert len(lb.from_csv(out.read_text())) == n


def test_rows_without_metrics_or_config_still_tabulate(tmp_path):
    path = tmp_path / "r.jsonl"
    append_row(path, {"method": "vdm", "dataset": "shapes", "seed": 0, "params": 5, "sample_seconds_per_video": 1.0})
    text = lb.to_markdown(lb.aggregate(read_rows(path)))
    assert "| vdm |" in text
    fig = lb.plot(lb.aggregate(read_rows(path)))
    assert "no runs with both" in fig.axes[0].texts[0].get_text()


def test_png_plots_quality_vs_cost_and_the_swept_parameter(store, tmp_path):
    entries = lb.aggregate(lb.select(read_rows(store), dataset={"shapes"}))
    fig = lb.plot(entries, metric="fvd")
    cost, sweep = fig.axes[:2]
    assert cost.get_xlabel() == "sampling seconds per video" and cost.get_ylabel().startswith("fvd")
    assert sorted(t.get_text() for t in cost.get_legend().get_texts()) == ["cmd", "vdm"]
    assert len(cost.containers) == 3  # one errorbar per entry: vdm w=1, vdm w=3, cmd
    assert sweep.get_xlabel() == "sample.guidance"
    (line,) = [c.lines[0] for c in sweep.containers]  # one line: vdm at w = 1 and 3 (cmd swept nothing)
    assert list(line.get_xdata()) == [1.0, 3.0] and list(line.get_ydata()) == [110.0, 90.0]
    out = tmp_path / "board.png"
    assert lb.main(["--results", str(store), "--format", "png", "--dataset", "shapes", "--out", str(out)]) == str(out)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 600


def test_the_cli_does_not_import_torch_or_lightning():
    code = "import sys, benchmarks.leaderboard; sys.exit(int('torch' in sys.modules or 'lightning' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0


def test_a_protocol_field_splits_only_the_metrics_it_defines(tmp_path):
    path = tmp_path / "r.jsonl"
    append_row(path, _row("vdm", 0, fvd=100.0, clipsim=0.30, clip_detector="clip", clip_detector_sha256="x"))
    append_row(path, _row("cmd", 0, fvd=50.0, clipsim=0.20, clip_detector="clip", clip_detector_sha256="y"))
    text = lb.to_markdown(lb.aggregate(read_rows(path)))
    header = [c.strip() for c in next(ln for ln in text.splitlines() if ln.startswith("| method")).split("|")]
    assert "fvd" in header and "clipsim [A]" in header and "clipsim [B]" in header and "fvd [A]" not in header
    assert "clip_detector_sha256=x" in text


def test_how_keys_are_not_settings():
    """Keys that do not change a result (benchmarks.config.HOW_KEYS) neither split runs nor show as columns."""
    from benchmarks.config import HOW_KEYS

    assert set(HOW_KEYS) <= set(lb.NOT_A_SETTING), "leaderboard.NOT_A_SETTING must list every HOW key"
    a, b = _row("vdm", 0), _row("vdm", 1)
    b["config"]["trainer"] = {"progress_bar": False}
    b["config"]["data"] = {"num_workers": 4}
    entries = lb.aggregate([a, b])
    assert len(entries) == 1 and len(entries[0].rows) == 2 and "trainer.progress_bar" not in entries[0].settings


def test_a_later_added_key_at_its_default_reads_as_its_default():
    # rows store such keys only when set (benchmarks.config_keys.ABSENT_AT_DEFAULT); the column shows the default
    plain = _row("vdm", 0, fvd=100.0)
    decayed = _row("vdm", 0, fvd=90.0, config_sha256="decayed")
    decayed["config"] = {**decayed["config"], "optim": {"lr_decay": "cosine"}}
    (a, b) = sorted(lb.aggregate([plain, decayed]), key=lambda e: str(e.swept))
    assert a.swept == {"optim.lr_decay": "cosine"} and b.swept == {"optim.lr_decay": "none"}
