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


def test_the_second_order_sampler_is_counted_on_meta_as_ddim_with_its_network_calls():
    """DPM-Solver++(2M) reads the schedule's values, which the meta device lacks; it calls the network once a step
    as DDIM does, so the results row's traced GFLOPs are DDIM's (they were None: a cost figure never fails a run)."""
    from benchmarks.common import build_datamodule
    from benchmarks.config import load_config

    flops = {}
    for sampler in ("ddim", "dpmpp2m"):
        cfg = load_config(["method=vdm", "scale=test", f"method.diffusion.sampler={sampler}", "sample.steps=3"])
        flops[sampler] = eff.sample_gflops(cfg, build_datamodule(cfg))
    assert flops["ddim"] > 0 and flops["dpmpp2m"] == pytest.approx(flops["ddim"])


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
    assert "preset=paper-settings" in tflops["note"]  # the paper's values are at its own setting, not ours
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


# --- the papers' efficiency claims at the papers' settings (preset=paper-settings) ----------------------


@pytest.fixture(scope="module")
def preset():
    return eff.load_preset("paper-settings")


def test_paper_settings_preset_composes_every_setting(preset):
    settings = preset["settings"]
    cmd, cmd50 = settings["cmd"], settings["cmd-50-motion-steps"]
    assert cmd50["method"] == "cmd" and cmd50["overrides"] == [*cmd["overrides"], "method.sampling.motion_steps=50"]
    for name in {*preset["table"], *preset["resolution_sweep"]["settings"]}:
        load_config(eff.setting_spec(settings[name])[1])  # every override is a run-config key
    spec, _, where = eff.setting_spec(settings["modelscope"])
    assert spec.video_shape == (4, 16, 64, 128) and where.startswith("512x1024x16")  # SD-VAE latents
    spec, overrides, _ = eff.setting_spec(settings["pvdm"], height=128, width=128)
    assert spec.video_shape == (3, 16, 128, 128) and overrides[-1] == "method.autoencoder.patch=4"  # 32x32 planes


def test_step_counts_and_guidance_scales_are_found_in_the_run_config():
    cfg = load_config(["method=cmd", "scale=paper", "method.sampling.motion_steps=7",
                       "method.sampling.content_guidance=5"])
    assert eff._step_knobs(cfg) == {"sample.steps": 50, "method.sampling.motion_steps": 7}
    off = eff._unguided(cfg)
    assert off.sample.guidance == 1 and off.method.sampling.content_guidance == 1
    assert off.method.sampling.motion_guidance == 1 and cfg.method.sampling.content_guidance == 5  # a copy


def test_sd_unet_flops_at_sd_size_are_in_the_known_range(preset):
    from diffusers import UNet2DConditionModel

    unet = eff.on_meta(lambda: UNet2DConditionModel.from_config(preset["diffusers"]["sd-2.1"]["unet"]))
    assert 860e6 < sum(p.numel() for p in unet.parameters()) < 870e6  # SD-2.1's UNet: 866M
    by_op = {}
    with torch.no_grad(), eff.count_flops(None, by_op) as (counter, _):
        unet(torch.zeros(1, 4, 64, 64, device="meta"), torch.zeros(1, device="meta"),
             encoder_hidden_states=torch.zeros(1, 77, 1024, device="meta"))
    layer_macs = sum(v for (_, op), v in by_op.items() if op in eff.LAYER_OPS) / 2
    # one forward at 512x512: ~339 G multiply-adds in conv and linear layers (BK-SDM's count for SD's UNet; the CMD
    # paper's 0.34 "TFLOPs" per content training step); attention's QK^T and AV add ~0.06 T multiply-adds
    assert 330e9 < layer_macs < 345e9
    assert 0.75e12 < counter.get_total_flops() < 0.85e12
    assert counter.get_total_flops() == sum(by_op.values())


def test_cfg_doubles_the_guided_model_and_nothing_else(preset):
    parts = eff.measure_setting(preset, "cmd", height=128, width=256, steps=1, exact=True)["parts"]
    assert parts["content.denoiser"]["flops"] == 2 * parts["content.denoiser"]["unguided_flops"]  # s = 4
    for name in ("motion", "autoencoder", "content.vae"):  # motion sampled without CFG (official); decoders once
        assert parts[name]["flops"] == parts[name]["unguided_flops"] > 0
    assert parts["autoencoder"]["paper_macs"] == parts["content.vae"]["paper_macs"] == 0  # the paper leaves decoders out
    assert parts["autoencoder"]["decoder"] and not parts["motion"]["decoder"]


def test_extrapolated_count_is_the_full_trace_and_linear_in_steps(preset):
    p = {**preset, "settings": {"cmd": {**preset["settings"]["cmd"]}}}
    p["settings"]["cmd"]["overrides"] = [*p["settings"]["cmd"]["overrides"], "method.sampling.motion_steps=3"]
    size = {"height": 64, "width": 128}
    ours = ("ours",)
    full = [eff.measure_setting(p, "cmd", steps=s, exact=True, counts=ours, **size) for s in (1, 2, 3)]
    totals = [r["total_flops"] for r in full]  # s content + 3 motion steps, every one traced
    assert totals[2] - totals[1] == totals[1] - totals[0] > 0  # every content step costs the same
    fast = eff.measure_setting(p, "cmd", steps=3, counts=ours, **size)  # each step count at 1 and 2, extrapolated
    assert fast["parts"] == full[2]["parts"] and fast["total_flops"] == totals[2]
    assert fast["sampling"] == "3 content (CFG s=4) + 3 motion (no CFG)"


def test_the_papers_convention_reproduces_the_cmd_papers_figures(preset):
    results = [eff.measure_setting(preset, name, counts=("paper",)) for name in ("cmd-50-motion-steps", "modelscope")]
    rows = {r["method"]: r for r in eff.paper_setting_rows(results, preset)}
    assert {r["kind"] for r in rows.values()} == {"paper"}
    cmd = rows[preset["settings"]["cmd-50-motion-steps"]["label"]]
    ms = rows[preset["settings"]["modelscope"]["label"]]
    assert ms["paper_tflops"] == 938.9 and ms["ratio"] == pytest.approx(1, abs=0.05)  # measured: 0.997
    assert cmd["paper_tflops"] == 46.83 and cmd["ratio"] == pytest.approx(1, abs=0.05)  # measured: 1.01
    assert cmd["ours_vs_baseline"] == pytest.approx(cmd["paper_vs_baseline"], rel=0.05)


def test_cli_preset_writes_the_table_the_sweep_and_the_plot(preset, tmp_path):
    from omegaconf import OmegaConf

    few = {name: {**preset["settings"][name], "steps": 2, "video": [16, 64, 64]} for name in ("pvdm", "vdm-pixel")}
    small = {"diffusers": preset["diffusers"], "settings": few, "table": ["pvdm", "vdm-pixel"],
             "resolution_sweep": {"settings": ["vdm-pixel", "pvdm"], "resolutions": [64, 128], "frames": 16, "steps": 2}}
    OmegaConf.save(OmegaConf.create(small), tmp_path / "small.yaml")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.efficiency", f"preset={tmp_path / 'small.yaml'}",
                           f"out={out}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(out / "efficiency_paper_settings.csv")))
    assert [r["kind"] for r in rows] == ["ours", "paper"] * 2
    assert {"method", "setting", "counted", "ours_tflops", "paper_tflops", "ratio"} <= set(rows[0])
    assert 0 < float(rows[0]["ours_vs_baseline"]) < 1  # PVDM against the pixel VDM
    sweep = list(csv.DictReader(open(out / "efficiency_vs_resolution.csv")))
    assert len(sweep) == 4
    vdm = [float(r["tflops"]) for r in sweep if r["name"] == "vdm-pixel"]
    assert vdm[1] == pytest.approx(4 * vdm[0], rel=0.05)  # a pixel UNet's cost grows with the pixel count
    with Image.open(out / "efficiency_vs_resolution.png") as im:
        assert im.format == "PNG" and im.size[0] > 600
    assert "| PVDM-L" in proc.stdout and "MACs; layers, no CFG, no decoders" in proc.stdout


# --- the papers' settings timed (timing=on: meant for a GPU; here on the CPU at scale=test) --------------


@pytest.fixture(scope="module")
def tiny_preset():
    """Two settings at test-scale networks: CMD (with its own motion step knob) against a VDM baseline."""
    common = {"video": [8, 16, 16], "num_classes": 1, "steps": 3}
    return {"diffusers": {}, "table": ["cmd", "vdm"], "settings": {
        "cmd": {**common, "method": "cmd", "label": "CMD",
                "overrides": ["scale=test", "method.content.init=scratch", "method.sampling.motion_steps=4"],
                "paper": {"seconds": 3.13, "baseline": "vdm", "hardware": "A100"}},
        "vdm": {**common, "method": "vdm", "label": "VDM", "overrides": ["scale=test"], "paper": {"seconds": 35.1}}}}


def test_timing_counts_what_the_trace_counts_and_times_every_stage(tiny_preset):
    cpu = torch.device("cpu")
    rows = eff.time_setting(tiny_preset, "cmd", cpu, repeats=1, probe_steps=2)["rows"]
    sample, train = rows[0], rows[1:]
    # FLOPs extrapolated from 1 and 1 + 2 steps of each step count (3 content, 4 motion) = every step traced
    traced = eff.measure_setting(tiny_preset, "cmd", exact=True, counts=("ours",))
    assert sample["tflops"] * 1e12 == pytest.approx(traced["total_flops"], rel=1e-6)
    assert sample["sampling"] == "3 content (CFG s=4) + 4 motion (no CFG)"
    assert 0 < sample["decoder_seconds"] < sample["seconds"] and sample["seconds_full"] > 0
    assert sample["seconds_no_decoders"] == pytest.approx(sample["seconds"] - sample["decoder_seconds"])
    assert [r["kind"] for r in train] == ["train:autoencoder", "train:content", "train:motion"]
    for r in train:
        assert "error" not in r and r["seconds"] > 0 and r["tflops"] > 0 and r["params_m"] > 0
    vdm = eff.time_setting(tiny_preset, "vdm", cpu, repeats=1, train=False)["rows"]
    eff.timing_rows(rows + vdm, tiny_preset, peak=1.0)
    assert sample["baseline"] == "VDM" and sample["paper_vs_baseline"] == pytest.approx(3.13 / 35.1)
    assert sample["seconds_vs_baseline"] == pytest.approx(sample["seconds_no_decoders"] / vdm[0]["seconds_no_decoders"])
    assert sample["achieved_tflops_per_s"] == pytest.approx(sample["tflops"] / sample["seconds"])


def test_cli_timing_writes_its_table_per_setting(tiny_preset, tmp_path):
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.create(tiny_preset), tmp_path / "tiny.yaml")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.efficiency", f"preset={tmp_path / 'tiny.yaml'}",
                           "timing=on", "settings=vdm", "repeats=1", f"out={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(out / "efficiency_paper_timing.csv")))
    assert [r["kind"] for r in rows] == ["sample", "train:denoiser"]
    assert all(float(r["seconds"]) > 0 and float(r["fraction_of_peak"]) > 0 for r in rows)
    assert "[peak probe] bf16 matmul" in proc.stdout and "| VDM |" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "benchmarks.efficiency", f"preset={tmp_path / 'tiny.yaml'}",
                          "timing=on", "settings=nope", f"out={out}"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0 and "no setting(s) ['nope']" in bad.stderr and "cmd, vdm" in bad.stderr
