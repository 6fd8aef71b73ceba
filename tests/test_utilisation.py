"""The machine probe and the utilisation benchmark: positive peaks, sane rows, FLOPs that scale with the batch."""

import csv
import json

import pytest
import torch

from benchmarks import machine
from benchmarks import utilisation as util
from benchmarks.common import build_datamodule, build_method, data_spec
from benchmarks.config import load_config
from benchmarks.efficiency import count_flops, on_meta
from datamodules import batch as batch_module
from datamodules import shapes
from methods.base import VideoBatch


def test_probe_reports_positive_peaks_and_the_machine():
    assert machine.bf16_matmul_gflops(0.05, n=256) > 0
    assert machine.fp32_matmul_gflops(0.05, n=256) > 0
    note = machine.machine_note(0.1, n=256)
    assert note["bf16_matmul_gflops"] > 0 and note["fp32_matmul_gflops"] > 0
    assert note["threads"] == torch.get_num_threads() and note["torch"] == torch.__version__
    assert isinstance(note["cpu_model"], str) and note["cpu_model"]
    json.dumps(note)  # goes into the results row as it is


def test_probe_counts_2n3_flops_per_product(monkeypatch):
    """A product that takes exactly 1 s must read as 2 n^3 / 1e9 GFLOP/s."""
    clock = iter(range(1000))
    monkeypatch.setattr(machine.time, "perf_counter", lambda: float(next(clock)))
    assert machine.matmul_gflops(torch.float32, n=64, seconds_budget=0, min_repeats=2) == pytest.approx(2 * 64**3 / 1e9)


def _vdm_test():
    cfg = load_config(["method=vdm", "scale=test"])
    dm = build_datamodule(cfg)
    torch.manual_seed(0)
    return cfg, dm, build_method(cfg, data_spec(cfg, dm))


def test_training_flops_double_with_the_batch():
    cfg, dm, _ = _vdm_test()
    method = on_meta(lambda: build_method(cfg, data_spec(cfg, dm))).train()  # same ops, no arithmetic
    video = next(iter(dm.loader_for("train", batch_size=4))).video
    counts = {}
    for b in (2, 4):
        batch = VideoBatch(video=video[:b], label=torch.zeros(b, dtype=torch.long))
        counts[b] = util.train_flops(method, "denoiser", batch, cfg, torch.device("meta"))
        method.zero_grad(set_to_none=True)
    assert counts[2] > 0
    assert counts[4] / counts[2] == pytest.approx(2.0, rel=0.05)


def test_one_method_at_test_scale_gives_sane_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "SIZE", 256)  # a short probe
    rows = util.main(["methods=vdm", "scale=test", "steps=1", "sample_batch=2", "probe_seconds=0.1",
                      f"out={tmp_path}"])
    assert [r["part"] for r in rows] == ["train:denoiser", "sample"]
    for r in rows:
        assert "error" not in r, r
        assert r["gflops"] > 0 and r["seconds"] > 0
        assert r["gflops_per_s"] == pytest.approx(r["gflops"] / r["seconds"])
        assert 0 < r["fraction_of_peak"] == pytest.approx(r["gflops_per_s"] / r["peak_gflops_per_s"])
        assert r["peak_kind"] == "fp32"  # scale=test trains in 32-true: the fp32 probe is its peak
    train = rows[0]
    assert 0 <= train["data_share"] <= 1 and train["data_seconds"] >= 0
    assert train["seconds"] >= train["compute_seconds"]
    assert rows[1]["gflops"] > 0 and rows[1]["batch_size"] == 2
    assert (tmp_path / "utilisation.png").stat().st_size > 0
    assert json.loads((tmp_path / "machine.json").read_text())["bf16_matmul_gflops"] > 0
    written = list(csv.DictReader(open(tmp_path / "utilisation.csv")))
    assert [r["part"] for r in written] == ["train:denoiser", "sample"]


def test_sampling_flops_scale_with_the_batch():
    cfg, dm, method = _vdm_test()
    from benchmarks.common import real_conditioning

    def build():
        torch.manual_seed(0)
        return build_method(cfg, data_spec(cfg, dm))

    one, _ = util.sample_flops(build, cfg, real_conditioning(dm, 1), 1, torch.device("cpu"))
    three, _ = util.sample_flops(build, cfg, real_conditioning(dm, 3), 3, torch.device("cpu"))
    assert one > 0 and three / one == pytest.approx(3.0, rel=0.05)


def test_single_thread_data_path_is_bit_identical_and_restores_the_thread_count():
    cfg = load_config(["method=vdm", "scale=tiny"])
    dm = build_datamodule(cfg)
    threads = torch.get_num_threads()
    fixed = next(iter(dm.loader_for("train", batch_size=12)))
    assert torch.get_num_threads() == threads
    with util.data_path_before_fix():  # renderer and collation at torch's thread count
        assert shapes.RENDER_THREADS is None and batch_module.COLLATE_THREADS is None
        before = next(iter(dm.loader_for("train", batch_size=12)))
    assert shapes.RENDER_THREADS == 1 and batch_module.COLLATE_THREADS == 1
    assert torch.equal(before.video, fixed.video) and torch.equal(before.label, fixed.label)
    with batch_module.intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads


def test_a_loss_that_takes_a_gradient_inside_is_counted():
    """autograd.grad inside the counted block (a GAN loss's adaptive weight) is counted, not refused.

    Closed form first: y = x W^T for x (2, 4), W (3, 4) costs 2 * 2 * 4 * 3 = 48 FLOPs, and so does each
    gradient with respect to W; one autograd.grad and one backward make 3 x 48. Then PVDM's autoencoder
    with its PatchGAN, whose adaptive weight calls autograd.grad twice: counted, and more than without it.
    """
    lin = torch.nn.Linear(4, 3, bias=False)
    x = torch.randn(2, 4)
    with count_flops() as (counter, _):
        y = lin(x)
        torch.autograd.grad(y.square().sum(), lin.weight, retain_graph=True)
        y.square().sum().backward()
    assert counter.get_total_flops() == 3 * 48

    counts = {}
    for weight in ("1.0", "0.0"):
        cfg = load_config(["method=pvdm", "scale=test", f"method.autoencoder.loss.gan.weight={weight}",
                           "method.autoencoder.loss.gan.layers=1"])
        dm = build_datamodule(cfg)
        torch.manual_seed(0)
        m = build_method(cfg, data_spec(cfg, dm)).train()
        batch = next(iter(dm.loader_for("train", shuffle=True, drop_last=True, batch_size=2, seed=0)))
        counts[weight] = util.train_flops(m, "autoencoder", batch, cfg, torch.device("cpu"))
        assert all(p.grad is not None for p in m.autoencoder.parameters())  # the step ran
    assert counts["1.0"] > counts["0.0"] > 0  # the discriminator and the two gradients are in the count
