"""The equal-budget race (benchmarks.race): budgets, failures, curves, time to 0.8, tasks, held-out first frames,
floor and ceiling references."""

import csv
import json
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks import leaderboard as lb
from benchmarks import race
from benchmarks.common import build_datamodule, real_conditioning
from benchmarks.config import config_hash, load_config, to_container
from benchmarks.results import append_row, read_rows
from benchmarks.run import BUDGET_TOLERANCE, budget_allowance, budget_fields
from evaluation.grid import task_of
from evaluation.protocol import FIRST_FRAME_SPLIT, evaluate_method, held_out_conditioning
from methods.base import VideoGenerator

# --- pure functions ---------------------------------------------------------------------------------


def test_time_to_accuracy_is_interpolated_linearly_between_budgets():
    assert race.time_to_accuracy([(100, 0.5), (200, 0.9), (400, 0.95)]) == (pytest.approx(175.0), "interpolated")
    # the first crossing counts, in budget order whatever the order given; a dip later does not matter
    assert race.time_to_accuracy([(400, 0.85), (100, 0.2), (200, 0.6), (300, 0.7)]) == (
        pytest.approx(300 + 0.1 / 0.15 * 100), "interpolated")
    assert race.time_to_accuracy([(120, 0.8), (240, 0.9)]) == (120.0, "at or before")
    assert race.time_to_accuracy([(120, 0.1), (240, 0.79)]) == (None, "not reached")
    assert race.time_to_accuracy([(120, None)]) == (None, "no data")
    assert race.time_to_accuracy([(10, 0.0), (20, 1.0)], threshold=0.25) == (pytest.approx(12.5), "interpolated")
    assert race.format_time_to(*race.time_to_accuracy([(100, 0.5), (200, 0.9)])) == "175 s"
    assert race.format_time_to(*race.time_to_accuracy([(120, 0.8)])) == "≤ 120 s"
    assert race.format_time_to(*race.time_to_accuracy([(120, 0.1)])) == "not reached"


def test_a_budget_is_shared_by_the_stages_still_to_train_and_checked_at_ten_percent():
    assert budget_allowance(240, 0.0, [100.0, 300.0]) == pytest.approx(60.0)  # in proportion to the estimates
    assert budget_allowance(240, 100.0, [300.0]) == pytest.approx(140.0)  # the last stage takes what is left
    assert budget_allowance(240, 300.0, [1.0, 1.0]) == 0.0  # overspent: nothing left (the stage runs one step)
    assert budget_allowance(240, 0.0, [0.0, 0.0]) == pytest.approx(120.0)  # nothing measured: equal shares
    assert budget_fields(240, 250) == {"time_budget": 240.0, "budget_ratio": pytest.approx(250 / 240),
                                       "within_budget": True}
    assert budget_fields(240, 240 * (1 + BUDGET_TOLERANCE) + 1)["within_budget"] is False
    assert budget_fields(240, 200)["within_budget"] is False and budget_fields(None, 200) == {}


def test_an_unset_budget_leaves_every_config_hash_as_it_was():
    cfg = load_config(["method=vdm", "scale=test"])
    d = to_container(cfg)
    assert d["trainer"]["time_budget"] is None
    del d["trainer"]["time_budget"]  # a config written before the key existed
    assert config_hash(cfg) == config_hash(d)
    assert config_hash(load_config(["method=vdm", "scale=test", "trainer.time_budget=60"])) != config_hash(cfg)


def test_the_task_names_what_is_generated_from_what():
    assert task_of({"conditioning": "class"}) == "class"
    assert task_of({"conditioning": "none"}) == "unconditional"
    assert task_of({"image_prior": {"conditioning": "class"}, "motion": {"conditioning": "class+text"}}) == "class+text"
    assert task_of({"conditioning": "class"}, image_to_video=True) == "image+class"
    assert task_of({"conditioning": "none"}, image_to_video=True) == "image"
    # rows written before `task`: derived from the config (and, for D-VDM / ED-VDM, the image)
    assert lb.row_task({"method": "dvdm", "config": {"method": {"conditioning": "class"}}}) == "image+class"
    assert lb.row_task({"method": "vdm", "config": {"method": {"conditioning": "text"}}}) == "text"
    assert lb.row_task({"method": "x", "task": "image"}) == "image" and lb.row_task({"method": "x"}) is None


def test_the_leaderboard_never_puts_two_tasks_in_one_table(tmp_path):
    path = tmp_path / "r.jsonl"
    proto = {"n_gen": 16, "n_real": 32, "detector": "shapes", "frames": 8, "resolution": 16}
    for seed, fvd in ((0, 100.0), (1, 120.0)):
        append_row(path, {"method": "vdm", "dataset": "shapes", "seed": seed, "task": "class", "fvd": fvd,
                          "config": {"method": {"name": "vdm", "conditioning": "class"}}, "run_dir": f"v{seed}",
                          **proto})
    append_row(path, {"method": "dvdm", "dataset": "shapes", "seed": 0, "task": "image+class", "fvd": 50.0,
                      "first_frame_split": "val", "config": {"method": {"name": "dvdm", "conditioning": "class"}},
                      "run_dir": "d0", **proto})
    text = lb.to_markdown(lb.aggregate(read_rows(path)))
    sections = {part.split("\n", 1)[0]: part for part in text.split("### ")[1:]}
    class_table, image_table = sections["shapes (task: class)"], sections["shapes (task: image+class)"]
    assert "| vdm" in class_table and "dvdm" not in class_table
    assert "| dvdm" in image_table and "| vdm" not in image_table
    assert "110 ± 14" in class_table  # mean ± sample std over seeds
    assert [r["method"] for r in lb.select(read_rows(path), task={"image+class"})] == ["dvdm"]  # --task filter


# --- image-to-video: first frames of held-out clips -------------------------------------------------


class _RecordingI2V(VideoGenerator):
    """Samples noise and remembers the conditioning it was given."""

    stages = ("denoiser",)
    image_to_video = True

    def __init__(self, data) -> None:
        super().__init__(data)
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list = []

    @torch.no_grad()
    def sample(self, n, cond, *, steps, guidance, generator=None, eta=0.0):
        self.seen.append(cond)
        return torch.rand((n, *self.data.video_shape), generator=generator) * 2 - 1


def test_image_to_video_methods_start_from_held_out_val_clips_in_both_code_paths(tmp_path):
    from benchmarks.common import data_spec

    cfg = load_config(["method=dvdm", "scale=test", f"cache_dir={tmp_path / 'cache'}", "eval.metrics=[fvd,cond_acc]"])
    dm = build_datamodule(cfg)
    dm.setup("fit")
    method = _RecordingI2V(data_spec(cfg, dm))
    out = evaluate_method(method, dm, cfg)
    first = torch.cat([c.first_frame for c in method.seen])
    labels = torch.cat([c.label for c in method.seen])
    n = cfg.eval.num_samples
    val, train = dm.dataset("val"), dm.dataset("train")
    want = torch.stack([val.eval_clip(i, cfg.eval.clip_seed)["video"][:, 0] for i in range(n)])
    assert FIRST_FRAME_SPLIT == "val" and torch.equal(first, want)  # val clip i, the evaluation's clip i
    assert labels.tolist() == [val.eval_clip(i, cfg.eval.clip_seed)["label"] for i in range(n)]  # and its class
    trained_on = torch.stack([train.eval_clip(i, cfg.eval.clip_seed)["video"][:, 0] for i in range(n)])
    assert not torch.equal(first, trained_on)  # not the training / reference clips of before
    assert out["first_frame_split"] == "val" and out["task"] == "image+class" and out["real_split"] == "train"
    # benchmarks.run's samples are conditioned on the same clips
    run_cond = real_conditioning(dm, n, "val", first_frame=True, clip_seed=cfg.eval.clip_seed)
    assert torch.equal(run_cond.first_frame, want) and torch.equal(held_out_conditioning(dm, range(n)).first_frame, want)


def test_the_class_floor_repeats_a_held_out_frame_of_the_conditioned_class(tmp_path):
    cfg = load_config(["method=vdm", "scale=test", f"cache_dir={tmp_path / 'cache'}"])
    dm = build_datamodule(cfg)
    wanted = [3, 3, 1, 0, 5, 3]
    videos, labels, texts = next(race.reference_videos(race.FLOOR, "class", dm, cfg, 6, wanted))
    assert labels.tolist() == wanted and len(texts) == 6
    assert torch.equal(videos, videos[:, :, :1].expand_as(videos))  # one frame, repeated
    firsts = [v[:, 0] for v in videos]
    assert not torch.equal(firsts[0], firsts[1])  # the next clip of that class, not the same one again
    ceiling, lab, _ = next(race.reference_videos(race.CEILING, "class", dm, cfg, 4, wanted))
    val = dm.dataset("val")
    assert torch.equal(ceiling, torch.stack([val.eval_clip(i, 0)["video"] for i in range(4)]))
    assert lab.tolist() == [val.eval_clip(i, 0)["label"] for i in range(4)]


# --- the race end to end ----------------------------------------------------------------------------


def test_a_test_scale_race_runs_resumes_tolerates_a_failure_and_writes_the_summary(tmp_path):
    spec = tmp_path / "minirace.yaml"
    spec.write_text(textwrap.dedent(f"""
        base: [dataset=shapes, scale=test, trainer.time_budget=99]
        list:
          - [method=pvdm, eval.paths.shapes={tmp_path / 'missing.pt'}]   # fails: its evaluator file is missing
          - [method=vdm]
          - [method=dvdm]
        seeds: [0]
    """))
    common = [f"sweep={spec}", "budget=3", f"runs_root={tmp_path / 'runs'}", f"results={tmp_path / 'results.jsonl'}",
              f"cache_dir={tmp_path / 'cache'}", f"out={tmp_path / 'out'}", "eval.metrics=[fvd,cond_acc]"]
    first = race.run_race(common)
    assert (first["total"], first["ran"], first["failed"]) == (3, 3, 1)  # pvdm failed, the others went on
    assert first["references"] == {"ran": 4, "skipped": 0, "failed": 0}  # floor + ceiling for two tasks
    rows = read_rows(tmp_path / "results.jsonl")
    runs = {r["method"]: r for r in rows if not r.get("reference")}
    assert set(runs) == {"vdm", "dvdm"}
    for r in runs.values():  # the budget and the measured seconds, the ±10% flag computed from them
        assert r["time_budget"] == 3.0 and r["train_seconds"] > 0
        assert r["budget_ratio"] == pytest.approx(r["train_seconds"] / 3.0)
        assert r["within_budget"] == (abs(r["budget_ratio"] - 1) <= BUDGET_TOLERANCE)
        assert r["n_gen"] == 10 and r["n_real"] == 32 and r["tag"] == "minirace"
        record = json.loads(next(Path(r["run_dir"]).glob("checkpoints/*/record.json")).read_text())
        assert record["stopped_on"] in ("time", "steps") and record["allowance_seconds"] == pytest.approx(3.0)
    assert runs["vdm"]["task"] == "class" and runs["dvdm"]["task"] == "image+class"
    assert runs["dvdm"]["first_frame_split"] == "val" and "first_frame_split" not in runs["vdm"]
    manifest = json.loads((Path(runs["dvdm"]["run_dir"]) / "samples" / "conditioning.json").read_text())
    assert manifest["image_to_video"] and manifest["videos"][0]["first_frame"] == "first frame of val clip 0"

    refs = {(r["method"], r["task"]): r for r in rows if r.get("reference")}
    assert set(refs) == {(k, t) for k in (race.FLOOR, race.CEILING) for t in ("class", "image+class")}
    for task in ("class", "image+class"):
        floor, ceiling = refs[(race.FLOOR, task)], refs[(race.CEILING, task)]
        assert ceiling["cond_acc"] > floor["cond_acc"] and ceiling["fvd"] < floor["fvd"]
        for ref in (floor, ceiling):  # scored under the runs' protocol: same columns
            assert lb.protocol(ref) == lb.protocol(runs["vdm" if task == "class" else "dvdm"])

    out = tmp_path / "out"
    md = (out / "race.md").read_text()
    assert "### task: class" in md and "### task: image+class" in md and "time to 0.8 acc" in md
    pvdm_line = next(ln for ln in md.splitlines() if ln.startswith("| pvdm"))
    assert "failed:" in pvdm_line and "missing.pt" in pvdm_line and "**Failed**" in md
    assert race.FLOOR in md and race.CEILING in md
    # which motions each contender gets: a per-class table
    table_md = md[md.index("Per-class conditional accuracy at 3 s"):]
    assert "| contender | left | right |" in table_md and "| vdm |" in table_md
    assert "Machine: " in md
    flagged = [r for r in runs.values() if not r["within_budget"]]
    assert ("**Outside the budget" in md) == bool(flagged)
    with (out / "race.csv").open() as f:
        table = list(csv.DictReader(f))
    assert {"time_to_0.8", "within_budget", "train_seconds_mean", "fvd_std"} <= set(table[0])
    assert {t["contender"] for t in table} >= {"vdm", "dvdm", race.FLOOR, race.CEILING}
    assert all(t["time_to_0.8"] in ("", "not reached") or t["time_to_0.8"].endswith(" s")
               for t in table if t["method"] in ("vdm", "dvdm"))
    for png in ("curves.png", "cost.png", "per_class.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 800
    assert len(lb.from_csv((out / "runs.csv").read_text())) == 6

    # resume: the done runs and references are skipped (without the failing contender, nothing is left to run)
    again = race.run_race([*common, "methods=vdm,dvdm"])
    assert (again["total"], again["skipped"], again["ran"], again["failed"]) == (2, 2, 0, 0)
    assert again["references"] == {"ran": 0, "skipped": 4, "failed": 0}
    assert len(read_rows(tmp_path / "results.jsonl")) == len(rows)


def test_stop_by_starts_no_run_that_would_not_finish_and_machines_are_not_mixed(tmp_path):
    from datetime import datetime

    now = datetime(2026, 12, 5, 4, 0).timestamp()
    assert race.parse_stop_by("05:30", now) == pytest.approx(now + 90 * 60)
    assert race.parse_stop_by("03:30", now) == pytest.approx(now + 23.5 * 3600)  # past: the next such time
    assert race.parse_stop_by("+45", now) == pytest.approx(now + 45 * 60)
    with pytest.raises(race.ConfigError, match="HH:MM"):
        race.parse_stop_by("soon", now)
    store = tmp_path / "rows.jsonl"
    r = race.load_race("race", methods=["vdm", "cmd"], budget=100, seeds=[0], extra=[f"results={store}"])
    vdm = next(rj for rj in r.jobs if rj.contender.method == "vdm")
    # no finished run of the method: twice the budget plus 2 minutes; then the budget plus the longest overhead
    assert race.expected_wall(vdm, []) == pytest.approx(320.0)
    rows = [{"method": "vdm", "wall_seconds": 190.0, "train_seconds": 100.0},
            {"method": "vdm", "wall_seconds": 150.0, "train_seconds": 100.0},
            {"method": "cmd", "wall_seconds": 900.0, "train_seconds": 100.0}]
    assert race.expected_wall(vdm, rows) == pytest.approx(190.0)
    # a stop_by already past starts nothing, and says what is left
    counts = race.run_jobs(r, command=["false"], stop_by=now)
    assert counts["ran"] == 0 and counts["left"] == len(r.jobs)
    # a finished run from another kind of machine: refused, with the way out named
    here = ("CPU A", 2, True)
    append_row(store, {"config_sha256": vdm.job.config_sha256, "machine": {"cpu_model": "CPU B", "cpus": 2,
                                                                          "fast_bf16": True}})
    with pytest.raises(race.ConfigError, match="mixed_machines=true"):
        race.check_machine(r, here)
    race.check_machine(r, ("CPU B", 2, True))  # the same kind: fine
    # the command line: vdm's run is done, cmd's would not finish by now; the summary is still written
    assert race.run_race(["methods=vdm,cmd", "budget=100", "seeds=0", f"results={store}", f"out={tmp_path / 'o'}",
                          "stop_by=+0", "mixed_machines=true"], command=["false"])["left"] == 1
    assert (tmp_path / "o" / "race.md").exists()


def test_race_md_names_the_machines_that_made_its_rows():
    amd = {"cpu_model": "AMD EPYC", "cpus": 2, "fast_bf16": True}
    one = race.machines_note([{"machine": {**amd, "bf16_matmul_gflops": 417.0}},
                              {"machine": {**amd, "bf16_matmul_gflops": 430.5}}])
    assert one == "Machine: AMD EPYC, 2 cores, bf16 units (2 runs; bf16 matmul probe 417-430 GFLOP/s)."
    mixed = race.machines_note([{"machine": {**amd, "bf16_matmul_gflops": 420.0}},
                                {"machine": {"cpu_model": "Intel Xeon", "cpus": 2, "fast_bf16": True,
                                             "bf16_matmul_gflops": 900.0}}])
    assert mixed.startswith("**Machines (mixed") and "Intel Xeon" in mixed and "AMD EPYC" in mixed
    assert race.machines_note([]) == "Machine: no finished run yet."
    # without bf16 units the runs train in fp32 (precision=auto): the note gives the fp32 probe, not the bf16 one
    avx2 = {"cpu_model": "AMD EPYC", "cpus": 2, "fast_bf16": False, "bf16_matmul_gflops": 1.3}
    fp32 = race.machines_note([{"machine": {**avx2, "fp32_matmul_gflops": 172.0}},
                               {"machine": {**avx2, "fp32_matmul_gflops": 184.6}}])
    assert fp32 == "Machine: AMD EPYC, 2 cores, no bf16 units (2 runs; fp32 matmul probe 172-185 GFLOP/s)."


def test_race_md_gives_training_seconds_as_whole_seconds():
    assert race._seconds_cell((1308.016, 0.0, 1)) == "1308"
    assert race._seconds_cell((1307.5, 0.62, 2)) == "1308 ± 0.62"
    assert race._seconds_cell(None) == ""
