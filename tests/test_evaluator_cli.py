"""`python -m benchmarks.evaluate`: a folder of videos made elsewhere, and a run folder's checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from benchmarks import evaluate
from benchmarks.results import read_rows
from datamodules.shapes import ShapesConfig, ShapesDataset
from datamodules.video_io import write_video


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_scores_a_folder_of_mp4_gif_and_frame_folders(tmp_path):
    ds = ShapesDataset(ShapesConfig(), "test")
    folder, captions = tmp_path / "videos", {}
    for i in range(10):
        item = ds[i]
        u8 = ((item["video"] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)
        name = f"{i:03d}-{ds.class_names[item['label']]}"
        if i == 9:  # a folder of frame images
            from PIL import Image

            (folder / name).mkdir(parents=True)
            for t, frame in enumerate(u8):
                Image.fromarray(frame).save(folder / name / f"frame{t}.png")
        else:
            write_video(folder / f"{name}{'.gif' if i == 8 else '.mp4'}", u8, fps=8)
        captions[name] = item["text"]
    (folder / "captions.json").write_text(json.dumps(captions))
    (folder / "999-broken.mp4").write_bytes(b"not a video")
    row = evaluate.main([f"samples_dir={folder}", f"cache_dir={tmp_path / 'cache'}", f"results={tmp_path / 'r.jsonl'}",
                         "eval.num_real=48", "append=true"])
    assert row["n_gen"] == 10 and row["unreadable_videos"] == 1
    assert row["cond_acc"] >= 0.9  # real clips, labelled by their file names, survive h264 / GIF / PNG
    assert row["clipsim"] > 0.5 and row["fvd"] > 0 and row["detector"] == "shapes"
    assert (row["frames"], row["resolution"]) == (16, 32)
    assert read_rows(tmp_path / "r.jsonl")[0]["source"] == "benchmarks.evaluate"


def test_scores_a_run_folder_checkpoint(tmp_path):
    from benchmarks.common import build_datamodule, build_method, data_spec
    from benchmarks.config import load_config

    cfg = load_config(["method=vdm", "scale=test", f"cache_dir={tmp_path / 'cache'}"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    OmegaConf.save(cfg, run_dir / "config.yaml")
    method = build_method(cfg, data_spec(cfg, build_datamodule(cfg)))
    stage = method.stages[-1]
    (run_dir / "checkpoints" / stage).mkdir(parents=True)
    torch.save(method.state_dict(), run_dir / "checkpoints" / stage / "final.pt")
    row = evaluate.main([f"run={run_dir}", "eval.metrics=[fvd,cond_acc]", "eval.num_samples=4"])
    assert row["method"] == "vdm" and row["n_gen"] == 4 and row["checkpoint"].endswith("final.pt")
    assert row["fvd"] > 0 and 0 <= row["cond_acc"] <= 1 and row["steps"] == cfg.sample.steps


def test_needs_exactly_one_source():
    with pytest.raises(SystemExit, match="exactly one"):
        evaluate.main(["dataset=shapes"])
