"""Frame change of samples against real clips (evaluation.sanity, benchmarks.motion_check)."""

from pathlib import Path

import pytest
import torch

from benchmarks import motion_check
from benchmarks.common import build_datamodule
from benchmarks.config import load_config
from benchmarks.run_folder import RunFolder
from datamodules.video_io import write_video
from evaluation.detectors import quantize
from evaluation.sanity import check_samples, frame_motion


def test_frame_motion_is_the_closed_form_step_of_a_linear_ramp_and_zero_for_a_still_video():
    t = torch.arange(8, dtype=torch.float32).view(1, 1, 8, 1, 1)
    ramp = (-0.5 + 0.05 * t).expand(2, 3, 8, 4, 4)  # every pixel moves by 0.05 per frame
    assert torch.allclose(frame_motion(ramp), torch.full((2,), 0.05))
    out = check_samples(torch.cat([ramp, ramp[:, :, :1].expand(-1, -1, 8, -1, -1)]), real_motion=0.05)
    assert out["motion"] == pytest.approx(0.025)  # two moving videos, two still ones
    nan = ramp.clone()
    nan[0, 0, 0, 0, 0] = float("nan")
    assert check_samples(nan, real_motion=0.05)["motion"] == pytest.approx(0.05)  # the finite videos only


def _run_folder(tmp_path: Path, videos: torch.Tensor) -> Path:
    """A benchmarks.run folder (its config, samples/*.mp4) holding `videos` (N, C, T, H, W) in [-1, 1]."""
    cfg = load_config(["method=vdm", "dataset=shapes", "scale=test"])
    folder = RunFolder(tmp_path / "run")
    folder.save_config(cfg)
    folder.samples_dir.mkdir(parents=True)
    for i, v in enumerate(quantize(videos)):
        write_video(folder.samples_dir / f"{i:03d}.mp4", v.permute(1, 2, 3, 0), fps=cfg.sample.fps)
    return folder.path


def _real(n: int) -> torch.Tensor:
    ds = build_datamodule(load_config(["method=vdm", "dataset=shapes", "scale=test"])).dataset("val")
    return torch.stack([ds[i]["video"] for i in range(n)])


def test_real_clips_as_samples_score_one_and_shuffled_or_still_frames_move_it_apart(tmp_path):
    real = _real(4)
    same = motion_check.measure([_run_folder(tmp_path / "same", real)], n_real=4)[0]
    assert same["ratio"] == pytest.approx(1.0, abs=1e-6) and same["real_motion"] > 0.01  # the same clips, same codec
    shuffled = real[:, :, torch.randperm(real.shape[2], generator=torch.Generator().manual_seed(0))]
    assert motion_check.measure([_run_folder(tmp_path / "shuffled", shuffled)], n_real=4)[0]["ratio"] > 1.5
    still = real[:, :, :1].expand_as(real)
    assert motion_check.measure([_run_folder(tmp_path / "still", still)], n_real=4)[0]["ratio"] < 0.05


def test_bad_arguments_say_what_to_give(tmp_path):
    with pytest.raises(SystemExit, match="not folders"):
        motion_check.main([str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="unknown option"):
        motion_check.main([str(tmp_path), "outt=x.csv"])
    with pytest.raises(SystemExit, match="config.yaml not found"):
        motion_check.main([str(tmp_path)])
