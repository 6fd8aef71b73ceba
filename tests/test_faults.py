"""Faults a hostile but realistic user hits: divergence, resumes that disagree with the folder, late errors.

Every test builds its bad input itself and checks that no wrong number reaches the results store.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import run
from benchmarks.config import load_config
from benchmarks.results import read_rows
from benchmarks.run_folder import RunFolder
from evaluation.sanity import check_samples

REPO = Path(__file__).resolve().parent.parent


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return ["scale=test", f"runs_root={tmp_path / 'runs'}", f"results={tmp_path / 'results.jsonl'}",
            f"cache_dir={tmp_path / 'cache'}", *extra]


def _rows(tmp_path: Path) -> list[dict]:
    return read_rows(tmp_path / "results.jsonl")


# --- divergence ---------------------------------------------------------------------------------------


def test_a_diverging_stage_stops_with_a_clear_error_keeps_the_last_good_checkpoint_and_stores_no_row(tmp_path):
    run_dir = tmp_path / "runs" / "diverged"
    with pytest.raises(SystemExit) as e:
        run.main(_args(tmp_path, "method=vdm", "optim.lr=1e3", "trainer.max_steps=20",
                       "trainer.checkpoint_every_n_steps=1", f"run_dir={run_dir}"))
    msg = str(e.value)
    assert "diverged at step" in msg and "'denoiser'" in msg and "learning rate" in msg and "optim.lr" in msg
    assert "No row was stored" in msg
    assert _rows(tmp_path) == []
    folder = RunFolder(run_dir)
    assert not folder.stage_done("denoiser") and not folder.metrics_path.exists()
    assert "diverged" in folder.state()["failed"]
    ckpt = torch.load(folder.last_checkpoint("denoiser"), map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_degenerate_samples_are_counted_by_kind():
    moving = torch.rand(4, 3, 8, 16, 16) * 2 - 1
    assert check_samples(moving, real_motion=0.3)["status"] == "ok"
    nan = moving.clone()
    nan[0, 0, 0, 0, 0] = float("nan")
    out = check_samples(nan, real_motion=0.3)
    assert out["nan"] == 1 and out["status"] == "degenerate"  # one non-finite video is enough
    constant = torch.full((4, 3, 8, 16, 16), -1.0)  # black: what NaN weights used to sample
    out = check_samples(constant, real_motion=0.3)
    assert out["constant"] == 4 and out["status"] == "degenerate" and "constant: 4/4 samples" in out["flags"]
    static = moving[:, :, :1].expand(-1, -1, 8, -1, -1)
    assert check_samples(static, real_motion=0.3)["static"] == 4
    assert check_samples(static, real_motion=0.0)["status"] == "ok"  # still data: a still video is no fault
    assert check_samples(torch.cat([moving, static[:1]]), real_motion=0.3)["status"] == "ok"  # 1 of 5


def test_a_run_whose_samples_are_constant_is_marked_degenerate_in_the_row_and_the_summary(tmp_path, monkeypatch, capsys):
    from methods.vdm import VDM

    def black(self, n, cond, **kw):
        return torch.full((n, *self.data.video_shape), -1.0)

    monkeypatch.setattr(VDM, "sample", black)
    row = run.main(_args(tmp_path, "method=vdm"))
    assert row["status"] == "degenerate" and row["sample_check"]["constant"] == row["sample_check"]["n"] == 2
    assert "DEGENERATE SAMPLES" in capsys.readouterr().out
    assert _rows(tmp_path)[0]["status"] == "degenerate"
    from benchmarks import leaderboard

    with pytest.warns(UserWarning, match="degenerate"):
        assert leaderboard.select(_rows(tmp_path)) == []  # the leaderboard leaves it out and says so


# --- the run folder is the source of truth ----------------------------------------------------------


def _finished_run(tmp_path: Path, *extra: str) -> tuple[dict, RunFolder]:
    run_dir = tmp_path / "runs" / "a"
    row = run.main(_args(tmp_path, "method=vdm", f"run_dir={run_dir}", *extra))
    return row, RunFolder(run_dir)


def test_run_dir_alone_resumes_with_the_saved_config(tmp_path):
    first, folder = _finished_run(tmp_path, "seed=5", "trainer.max_steps=3")
    config_before = folder.config_path.read_bytes()
    for path in (folder.state_path, folder.metrics_path, folder.final("denoiser")):  # as if killed before the end
        path.unlink()
    second = run.main([f"run_dir={folder.path}"])  # nothing else: not the default config
    assert second["method"] == "vdm" and second["seed"] == 5 and second["stage_steps"] == {"denoiser": 3}
    assert second["config_sha256"] == first["config_sha256"] and second["resumed"] is True
    assert folder.config_path.read_bytes() == config_before


def test_a_result_changing_override_on_resume_is_refused_with_the_difference(tmp_path):
    _, folder = _finished_run(tmp_path)
    folder.state_path.unlink()  # unfinished: the override would reach training
    before = folder.config_path.read_bytes()
    with pytest.raises(SystemExit) as e:
        run.main([f"run_dir={folder.path}", "trainer.max_steps=600"])
    msg = str(e.value)
    assert "trainer.max_steps: 2 in the run folder, 600 asked" in msg and "no run_dir" in msg
    assert folder.config_path.read_bytes() == before
    run.main([f"run_dir={folder.path}", "trainer.progress_bar=false"])  # how, not what: allowed


def test_another_runs_folder_and_a_foreign_folder_are_never_overwritten(tmp_path):
    _, folder = _finished_run(tmp_path)
    snapshot = {p: p.read_bytes() for p in folder.path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match="holds a vdm run .* never overwritten"):
        run.main(_args(tmp_path, "method=cmd", f"run_dir={folder.path}"))
    assert {p: p.read_bytes() for p in folder.path.rglob("*") if p.is_file()} == snapshot
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not empty .*notes.txt"):
        run.main(_args(tmp_path, "method=vdm", f"run_dir={foreign}"))
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_a_finished_run_is_not_appended_twice_and_points_to_re_evaluation(tmp_path, capsys):
    first, folder = _finished_run(tmp_path)
    again = run.main([f"run_dir={folder.path}"])
    assert "is finished" in capsys.readouterr().out
    assert again["config_sha256"] == first["config_sha256"] and len(_rows(tmp_path)) == 1
    from benchmarks import evaluate

    evaluate.main([f"run={folder.path}", "append=true"])
    rows = _rows(tmp_path)
    assert len(rows) == 2 and rows[1]["reevaluation_of"] == str(folder.path)
    from benchmarks import leaderboard

    entries = leaderboard.aggregate(leaderboard.select(rows))
    assert [len(e.rows) for e in entries] == [1]  # a re-evaluation is not a second seed
    assert rows[1]["config_sha256"] == first["config_sha256"]  # the same settings: it replaced the run's row
    # at another guidance it is another experiment: its own config and hash, its own leaderboard line
    evaluate.main([f"run={folder.path}", "append=true", "sample.guidance=3.5"])
    rows = _rows(tmp_path)
    assert rows[2]["config"]["sample"]["guidance"] == 3.5 and rows[2]["guidance"] == 3.5
    assert rows[2]["config_sha256"] != first["config_sha256"]
    entries = leaderboard.aggregate(leaderboard.select(rows))
    assert sorted(e.swept["sample.guidance"] for e in entries) == sorted([first["guidance"], 3.5])
    assert "sample.guidance" in leaderboard.to_markdown(entries)
    # with other sampler steps the row's cost is that of its own steps, not the run's: FLOPs follow the steps
    # (the decoder-free VDM: in proportion), and the seconds per video are the re-evaluation's own
    steps = first["steps"]
    evaluate.main([f"run={folder.path}", "append=true", f"sample.steps={2 * steps}"])
    row = _rows(tmp_path)[3]
    assert row["steps"] == 2 * steps and row["config"]["sample"]["steps"] == 2 * steps
    assert row["gflops_per_video"] == pytest.approx(2 * first["gflops_per_video"], rel=1e-6)
    assert row["sample_seconds_per_video"] == row["eval_sample_seconds_per_video"] != first["sample_seconds_per_video"]
    assert rows[1]["gflops_per_video"] == pytest.approx(first["gflops_per_video"])  # the same settings, the same cost


# --- checks before the first training step -----------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ("eval.metrics=[fvd,fdv]", "eval.metrics"),
    ("eval.covariance=unbaised", "eval.covariance"),
    ("eval.num_samples=5", "eval.num_samples"),
    ("sample.num_videos=0", "sample.num_videos"),
    ("trainer.max_steps=-1", "trainer.max_steps"),
    ("trainer.max_steps=-5", "trainer.max_steps"),
    ("stages.denoiser.max_steps=0", "stages.denoiser.max_steps"),
    ("eval.detector=i3d_torchscript", "eval.paths.i3d_torchscript"),  # no detector file given
    ("eval.paths.shapes=/nonexistent/shapes.pt", "eval.paths.shapes"),
])
def test_bad_settings_fail_before_any_training_naming_the_key(tmp_path, override, key):
    with pytest.raises(SystemExit) as e:
        run.main(_args(tmp_path, "method=vdm", override))
    assert key in str(e.value)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))


def test_an_unwritable_results_path_fails_before_training(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="results=.*a_file"):
        run.main(_args(tmp_path, "method=vdm", f"results={tmp_path / 'a_file' / 'results.jsonl'}"))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("resolution", [20, 17])
def test_a_cmd_shape_error_fails_in_the_dry_pass_not_after_three_stages(tmp_path, resolution):
    with pytest.raises(SystemExit) as e:
        run.main(_args(tmp_path, "method=cmd", "scale=tiny", f"dataset.resolution={resolution}"))  # test nets fit any size
    assert "dry pass" in str(e.value) and f"dataset.resolution={resolution}" in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_check_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    out = run.main(_args(tmp_path, "method=cmd", "--check"))
    text = capsys.readouterr().out
    for stage in ("image_prior", "autoencoder", "content", "motion"):
        assert stage in text
    assert "training, estimated" in text and "nothing was trained" in text
    plan = out["plan"]
    assert [s.status for s in plan.stages] == ["train"] * 4 and all(s.step_seconds > 0 for s in plan.stages)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results.jsonl").exists()


def test_a_negative_max_steps_is_one_line_without_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "method=vdm", "trainer.max_steps=-1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "trainer.max_steps=-1: must be a positive number" in proc.stderr


def test_the_resumed_config_validates_like_a_new_one(tmp_path):
    cfg = load_config(_args(tmp_path, "method=vdm"))
    folder = RunFolder(tmp_path / "runs" / "hand")
    cfg.run_dir = str(folder.path)
    cfg.sample.num_videos = 0  # a saved config edited by hand
    folder.save_config(cfg)
    with pytest.raises(SystemExit, match="sample.num_videos"):
        run.main([f"run_dir={folder.path}"])
    assert json.loads(json.dumps(folder.state())) == {}
