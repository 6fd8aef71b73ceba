"""benchmarks.probe_methods: the ED-VDM codec-loop curve command and the PVDM clip-length cost command."""

import csv

import pytest

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


def test_pair_agreement_counts_pairs_2i_and_2i_plus_1():
    import torch

    heads = {"color": torch.tensor([0, 0, 1, 2, 3, 3, 4, 4]), "shape": torch.tensor([1, 1, 1, 1, 0, 2, 3, 3]),
             "background": torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])}
    out = probe_methods.pair_agreement(heads)
    assert out == {"color_same": 0.75, "shape_same": 0.75, "background_same": 0.0, "color_and_shape_same": 0.5}


def test_videofusion_base_probe_on_a_test_run(tmp_path):
    import json

    import torch

    from benchmarks import run

    row = run.main(["method=videofusion", "scale=test", f"runs_root={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'c'}",
                    f"results={tmp_path / 'r.jsonl'}", "eval.metrics=[]"])
    report = probe_methods.main(["videofusion-base", f"run_dir={row['run_dir']}", "n=3", "batch_size=4",
                                 f"out={tmp_path}"])
    assert json.loads((tmp_path / "videofusion_base.json").read_text())["pairs"] == 3
    for name in ("shared", "independent"):
        assert set(report[name]) >= {"color_same", "shape_same", "background_same", "cond_acc"}
        assert all(0 <= v <= 1 for v in report[name].values())
    # the shared base is the key frame's whole start noise (lam_k = 1): every video of the batch starts from it
    _, _, method = probe_methods._load_run(row["run_dir"])
    C, H, W = method.base.image_shape
    b = torch.randn(C, H, W)
    eps = method.noise(torch.empty(5, C, method.data.frames, H, W), torch.Generator().manual_seed(0), base=b)
    assert torch.allclose(eps[:, :, method.key], b.expand(5, C, H, W))
    assert not torch.allclose(eps[0, :, method.key - 1], eps[1, :, method.key - 1])  # residuals differ
    # flicker: the same run's frame change at two guidance scales, against real clips' (and in the run's row)
    assert row["sample_check"]["motion"] > 0 and row["sample_check"]["real_motion"] > 0
    fl = probe_methods.main(["flicker", f"run_dir={row['run_dir']}", "n=3", "guidance=1,4", "steps=2",
                             f"out={tmp_path}"])
    assert [(r["guidance"], r["steps"]) for r in fl["settings"]] == [(1.0, 2), (4.0, 2)]
    assert all(r["ratio"] == pytest.approx(r["motion"] / fl["real_motion"]) and 0 <= r["cond_acc"] <= 1
               for r in fl["settings"])
    again = probe_methods.main(["flicker", f"run_dir={row['run_dir']}", "n=3", "guidance=4", "steps=2",
                                f"out={tmp_path}"])
    assert again["settings"][0]["motion"] == pytest.approx(fl["settings"][1]["motion"])  # seeded: the same videos
    assert (tmp_path / "videofusion_flicker.json").exists()
    with pytest.raises(SystemExit, match="run_dir"):
        probe_methods.main(["flicker"])


def test_i2v_protocol_scores_one_run_under_both_first_frame_splits(tmp_path):
    from benchmarks import run
    from evaluation import protocol

    row = run.main(["method=dvdm", "scale=test", f"runs_root={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'c'}",
                    f"results={tmp_path / 'r.jsonl'}", "eval.metrics=[fvd,cond_acc]"])
    report = probe_methods.main(["i2v-protocol", f"run_dir={row['run_dir']}", "eval.num_samples=4", f"out={tmp_path}"])
    assert report["train"]["n_gen"] == report["val"]["n_gen"] == 4
    assert report["train"]["fvd"] != report["val"]["fvd"]  # other first frames, other videos
    assert protocol.FIRST_FRAME_SPLIT == "val"  # restored
    # the same run's long videos: chained on the last frame, scored for appearance across the clip boundaries
    long = probe_methods.main(["long-video", f"run_dir={row['run_dir']}", "clips=2", "n=3", f"out={tmp_path}"])
    assert long["method"] == "dvdm" and "last frame" in long["mode"] and "independent" not in long
    assert long["frames"] == 2 * long["clip_frames"] and len(long["chained"]["fvd_per_clip"]) == 2
    assert 0 <= long["chained"]["appearance"]["color_same"] <= 1 and (tmp_path / "dvdm_long.json").exists()
    assert (tmp_path / "i2v_protocol.json").exists()
    # the same run against the clips whose first frames it was given
    fol = probe_methods.main(["i2v-follow", f"run_dir={row['run_dir']}", "n=3", f"out={tmp_path}"])
    T = len(fol["curves"]["generated"])
    assert set(fol["curves"]) == {"generated", "first frame held", "another clip"} and T == long["clip_frames"]
    assert fol["curves"]["generated"][0] == pytest.approx(0, abs=1e-6)  # D-VDM's frame 0 is the given frame
    assert fol["curves"]["first frame held"][0] == 0 and 0 <= fol["cond_acc"] <= 1
    assert (tmp_path / "dvdm_follow.json").exists() and (tmp_path / "dvdm_follow.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="n >= 2"):
        probe_methods.main(["i2v-follow", f"run_dir={row['run_dir']}", "n=1"])


def test_follow_errors_closed_form():
    import torch

    g = torch.Generator().manual_seed(0)
    real = torch.rand(4, 3, 5, 6, 6, generator=g) * 2 - 1
    same = probe_methods.follow_errors(real, real)
    assert same["generated"] == [0.0] * 5  # the real continuation itself
    held = real[:, :, :1].expand_as(real)
    expect = [(real[:, :, 0] - real[:, :, t]).abs().mean().item() for t in range(5)]
    assert same["first frame held"] == pytest.approx(expect) and expect[0] == 0
    still = probe_methods.follow_errors(held, real)  # a video that holds its first frame scores as the floor
    assert still["generated"] == pytest.approx(still["first frame held"])
    shifted = probe_methods.follow_errors(real.roll(-1, dims=0), real)  # clip i+1 as video i: the other reference
    assert shifted["generated"] == pytest.approx(same["another clip"]) and min(shifted["generated"]) > 0.1
    assert shifted["another clip"] == [0.0] * 5  # video i is clip i+1 itself
    with pytest.raises(ValueError, match="differ in shape"):
        probe_methods.follow_errors(real[:, :, :4], real)


def test_pvdm_ae_trains_the_autoencoder_alone_and_scores_its_reconstructions():
    report = probe_methods.main(["pvdm-ae", "scale=test", "seconds=1", "n=4"])
    assert report["steps"] >= 1 and 0 < report["val_l1"] < 2 and 0 <= report["recon_motion_acc"] <= 1
    assert report["batch_size"] > 0 and report["overrides"] == ["scale=test"] and report["r_fvd"] >= 0
    gan = ["scale=test", "method.autoencoder.loss.gan.weight=1", "method.autoencoder.loss.gan.layers=1",
           "method.autoencoder.loss.gan.channels=4"]
    report = probe_methods.main(["pvdm-ae", "steps=3", "n=4", *gan])
    assert report["steps"] == 3 and report["r_fvd"] >= 0  # exactly `steps`, with the PatchGAN as its own player
    assert {"g", "d", "grad_norm_model", "grad_norm_discriminator"} <= set(report["last_step"])


def test_ae_seeds_trains_the_autoencoder_the_run_of_that_seed_trains(tmp_path):
    import json

    import torch

    from benchmarks import run
    from benchmarks.common import build_method, data_spec
    from benchmarks.probe_cmd import load_run
    from benchmarks.run_folder import RunFolder

    common = ["scale=test", f"cache_dir={tmp_path / 'cache'}"]
    rows = probe_methods.main(["ae-seeds", "seeds=1,2", "n=4", f"out={tmp_path / 'probe'}", *common])
    assert [r["seed"] for r in rows] == [1, 2] and rows[0]["val_l1"] != rows[1]["val_l1"]
    assert [json.loads(line) for line in open(tmp_path / "probe" / "cmd_ae_seeds.jsonl")] == rows
    # the whole run of seed 2: its autoencoder, after its autoencoder stage, reconstructs the clips the same
    run.main(["method=cmd", "seed=2", f"run_dir={tmp_path / 'run'}", f"results={tmp_path / 'rows.jsonl'}", *common])
    cfg, dm, _ = load_run(tmp_path / "run")
    method = build_method(cfg, data_spec(cfg, dm))
    method.load_state_dict(torch.load(RunFolder(tmp_path / "run").final("autoencoder"), weights_only=True))
    real = probe_methods._real(cfg, "val", 4)["video"]
    recon = probe_methods.reconstruct(cfg, method.eval(), real)
    assert (recon - real).abs().mean().item() == pytest.approx(rows[1]["val_l1"], rel=1e-6)
    with pytest.raises(SystemExit, match="no autoencoder stage"):
        probe_methods.main(["ae-seeds", "seeds=0", "n=4", "method=vdm", *common])
    with pytest.raises(SystemExit, match="drop trainer.time_budget"):
        probe_methods.main(["ae-seeds", "seeds=0", "n=4", "trainer.time_budget=10", *common])
