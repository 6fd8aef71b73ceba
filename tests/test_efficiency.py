"""The efficiency benchmark: exact FLOP counts, faithful meta tracing, memory peaks, ratios, CLI outputs."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from benchmarks import efficiency as eff
from benchmarks.common import build_datamodule, build_method, data_spec
from benchmarks.config import load_config
from methods import METHODS
from methods.base import Conditioning

REPO = Path(__file__).resolve().parent.parent


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        return self.b(self.a(x)) @ torch.ones(4, 3)  # the matmul outside the networks is credited apart


def test_flops_are_exact_and_credited_to_the_network_that_ran_them():
    model = Two()
    with eff.count_flops(eff._owners(model)) as (counter, per_net):
        model(torch.randn(5, 8))
    assert dict(per_net) == {"a": 2 * 5 * 8 * 16, "b": 2 * 5 * 16 * 4, "(outside networks)": 2 * 5 * 4 * 3}
    assert counter.get_total_flops() == sum(per_net.values())


def test_cpu_attention_kernels_are_counted():
    q = torch.randn(2, 4, 10, 8, requires_grad=True)
    with eff.count_flops() as (counter, _):
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    assert counter.get_total_flops() >= 2 * (2 * 2 * 4 * 10 * 10 * 8)  # QK^T and AV, forward alone


def _setup(name: str, *extra: str):
    cfg = load_config([f"method={name}", "scale=test", *extra])
    dm = build_datamodule(cfg)
    spec = data_spec(cfg, dm)
    return cfg, dm, lambda: build_method(cfg, spec)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_meta_trace_counts_what_a_real_run_counts(name):
    cfg, dm, build = _setup(name)
    model = build()
    cond, batch = eff._inputs(cfg, model, dm, 2)
    meta = eff.on_meta(build)
    traced = eff._flops(build, cfg, cond, {}, [], meta)
    real = eff._flops(build, cfg, cond, {}, [], None)
    assert traced["real"] == [], traced["errors"]
    assert real["real"] == ["sample"]
    assert traced["sample"] == real["sample"] and traced["sample"]["total"] > 0


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_shortened_count_for_paper_sizes_matches_the_full_count(name):
    cfg, dm, build = _setup(name, "sample.steps=4")
    model = build()
    cond, batch = eff._inputs(cfg, model, dm, 3)
    batches = {s: batch for s in model.stages}
    counts = []
    for seed, cheap in ((0, False), (1, False), (0, True)):  # the shortcut: 1 and 2 steps; batch 1 x batch size
        torch.manual_seed(seed)
        counts.append(eff._flops(build, cfg, cond, batches, list(model.stages), cheap=cheap))
    full, again, cheap = counts
    assert cheap["sample"] == full["sample"]
    assert len(cheap["real"]) == 1 + len(model.stages) and "extrapolated" in cheap["real"][0]
    # a stage whose step cost is random (e.g. PVDM's clip-conditional training) is one draw either way
    fixed = [s for s in model.stages if again["train"][s] == full["train"][s]]
    assert fixed and all(cheap["train"][s] == full["train"][s] for s in fixed)


def test_every_sampling_step_and_the_cfg_batch_are_counted():
    cfg, dm, build = _setup("vdm", "sample.guidance=2.0")
    model = build()
    x = torch.randn(2, *model.data.video_shape)  # CFG evaluates the conditional and the null branch together
    with eff.count_flops() as (counter, _):
        model.denoiser(x, torch.zeros(2, dtype=torch.long), Conditioning(label=torch.zeros(2, dtype=torch.long)))
    per_step = counter.get_total_flops()
    cond, _ = eff._inputs(cfg, model, dm, 1)
    for steps in (1, 3):
        cfg.sample.steps = steps
        assert eff._flops(build, cfg, cond, {}, [], None)["sample"]["total"] == steps * per_step


def test_peak_memory_sees_an_allocation_freed_inside_the_block():
    with eff.PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    assert mem.peak_mb >= 60 and mem.kind.startswith("cpu")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_measure_reports_every_cost_of_every_method(name):
    res = eff.measure(name, ["scale=test"], repeats=1)
    assert "error" not in res, res.get("error")
    _, _, build = _setup(name)
    model = build()
    assert res["params"] == model.num_parameters()
    assert set(res["networks"]) >= {n for n, _ in model.named_children()}
    assert sum(n["sample_gflops"] for n in res["networks"].values()) == pytest.approx(res["sample_gflops"])
    assert res["sample_gflops"] > 0 and res["sample_seconds"] > 0 and res["sample_peak_mb"] >= 0
    assert list(res["stages"]) == list(model.stages)
    for stage, rec in res["stages"].items():
        assert rec["params"] == model.num_parameters(stage) and rec["train_gflops_per_step"] > 0
        assert rec["step_seconds"] > 0 and rec["train_peak_mb"] >= 0
        assert rec["train_gflops_per_video"] == pytest.approx(rec["train_gflops_per_step"] / rec["batch_size"])


def test_paper_scale_without_a_gpu_counts_but_does_not_time():
    res = eff.measure("vdm", ["scale=paper", "trainer.accelerator=cpu"], train=False)
    assert res["sample_gflops"] > 1000 and "sample_seconds" not in res and "not timed" in res["timing_note"]
    assert res["flops_method"] == "traced on the meta device"


def test_ratios_against_vdm_and_the_papers_side_by_side():
    results = eff.with_ratios([
        {"method": "vdm", "params": 100, "sample_gflops": 1000.0, "sample_seconds": 10.0, "sample_peak_mb": 2048.0,
         "stages": {"denoiser": {"train_gflops_per_video": 40.0}}, "train_gflops_per_video": 40.0},
        {"method": "cmd", "params": 50, "sample_gflops": 100.0, "sample_seconds": 2.0, "sample_peak_mb": 512.0,
         "stages": {"motion": {"train_gflops_per_video": 4.0}}, "train_gflops_per_video": 4.0},
        {"method": "broken", "error": "config: no such file"}])
    assert results[0]["gflops_vs_vdm"] == 1.0 and results[1]["gflops_vs_vdm"] == pytest.approx(0.1)
    assert results[1]["seconds_vs_vdm"] == pytest.approx(0.2) and results[1]["mem_vs_vdm"] == pytest.approx(0.25)
    assert results[2]["params_vs_vdm"] is None
    rows = {(r["method"], r["quantity"]): r for r in eff.reported_rows(results)}
    tflops = rows[("cmd", "sample_tflops")]
    assert tflops["paper_ratio"] == pytest.approx(46.8 / 939) and tflops["ours_ratio_vs_vdm"] == pytest.approx(0.1)
    assert rows[("cmd", "train_tflops:motion")]["ours_ratio_vs_vdm"] == pytest.approx(0.1)
    assert rows[("pvdm", "sample_seconds")]["ours_value"] is None  # not measured here: left empty
    assert "| broken | error: config: no such file" in eff.markdown(results)


def test_cli_writes_the_tables_and_the_chart(tmp_path):
    out = tmp_path / "eff"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.efficiency", "methods=edvdm,vdm", "scale=test",
                           f"out={out}", "train=false"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(out / "efficiency.csv")))
    assert [r["method"] for r in rows] == ["vdm", "edvdm"]  # the baseline first
    assert rows[0]["gflops_vs_vdm"] == "1.0" and float(rows[1]["gflops_vs_vdm"]) > 0 and not rows[1]["error"]
    parts = list(csv.DictReader(open(out / "efficiency_parts.csv")))
    assert {p["method"] for p in parts} == {"vdm", "edvdm"} and all(p["kind"] == "network" for p in parts)
    assert len(list(csv.DictReader(open(out / "efficiency_reported.csv")))) == len(eff.REPORTED)
    with Image.open(out / "efficiency.png") as im:
        assert im.format == "PNG" and im.size[0] > 600
    assert "| vdm |" in proc.stdout and "GFLOPs vs VDM" in proc.stdout
