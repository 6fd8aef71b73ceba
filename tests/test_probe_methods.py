"""benchmarks.probe_methods: the ED-VDM codec-loop curve command and the PVDM clip-length cost command."""

import csv

from benchmarks import probe_methods


def test_edvdm_loop_writes_the_per_frame_curves(tmp_path):
    report = probe_methods.main(["edvdm-loop", "scale=test", "n=16", "ae_steps=2", f"out={tmp_path}"])
    rows = list(csv.DictReader(open(tmp_path / "edvdm_loop.csv")))
    T = report["frames"]
    keys = {(r["coder"], r["loop"]) for r in rows}
    assert keys == {(c, loop) for c in ("noise0.02", "ae(open-trained)", "ae(closed-trained)") for loop in ("open", "closed")}
    assert len(rows) == len(keys) * T and (tmp_path / "edvdm_loop.png").stat().st_size > 0
    open_, closed = report["curves"]["noise0.02/open"], report["curves"]["noise0.02/closed"]
    assert open_[0] == closed[0] == 0  # the I-frame is given
    assert abs(open_[1] - closed[1]) < 1e-3  # the first P-frame has one coding error either way
    assert open_[-1] > 1.5 * open_[1] and max(closed[1:]) < 1.1 * min(closed[1:])  # accumulates / stays flat
    assert report["r_fvd"]["noise0.02/closed"] <= report["r_fvd"]["noise0.02/open"]
    assert set(report["autoencoder_step_gflops"]) == {"open", "closed"}


def test_pvdm_cost_compares_the_clip_lengths():
    report = probe_methods.main(["pvdm-cost", "scales=test", "batch=2", "time=false"])
    rows = report["scales"]["test"]
    new, old = rows["clip=dataset.frames (default)"], rows["clip=dataset.frames/2 (earlier default)"]
    F = report["scales"]["test"]["frames"]
    assert new["clip_frames"] == F and new["clips_per_video"] == 1 and new["train_item_frames"] == 2 * F
    assert old["clip_frames"] == F // 2 and old["clips_per_video"] == 2
    assert new["latent_tokens"] > old["latent_tokens"] and new["diffusion"]["gflops"] > old["diffusion"]["gflops"]
