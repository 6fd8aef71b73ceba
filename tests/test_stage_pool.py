"""Independent stages side by side (benchmarks.stage_pool): the stage graph of every method, the core
shares, weights of stages trained apart composing into one method, and a real run in worker processes
against the same run one stage after another."""

from pathlib import Path

import pytest
import torch

from benchmarks import run
from benchmarks.common import build_datamodule, build_method, data_spec
from benchmarks.config import load_config
from benchmarks.results import read_rows
from benchmarks.run_folder import RunFolder
from benchmarks.stage_pool import ancestors, parallel_mode, ready_stages, side_by_side, thread_shares
from methods import METHODS


def _method(name: str, *overrides: str):
    cfg = load_config([f"method={name}", "scale=test", *overrides])
    dm = build_datamodule(cfg)
    return cfg, build_method(cfg, data_spec(cfg, dm))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_stage_needs_only_earlier_stages_and_writes_its_own_parameters(name):
    _, method = _method(name)
    for i, stage in enumerate(method.stages):
        assert set(method.stage_requires(stage)) <= set(method.stages[:i])  # the stage order is a valid order
        keys = method.stage_state_keys(stage)
        named = {id(p): n for n, p in method.named_parameters()}
        assert {named[id(p)] for p in method.stage_parameters(stage)} <= keys


def test_cmd_trains_prior_with_autoencoder_then_content_with_motion():
    _, method = _method("cmd")
    requires = {s: method.stage_requires(s) for s in method.stages}
    assert ancestors(requires, "content") == {"image_prior", "autoencoder"}
    assert set(side_by_side(requires, list(method.stages))) == {("image_prior", "autoencoder"), ("content", "motion"),
                                                                ("image_prior", "motion")}
    assert ready_stages(requires, set(), set()) == ["image_prior", "autoencoder"]
    assert ready_stages(requires, {"image_prior"}, {"autoencoder"}) == []  # content waits for the autoencoder
    assert ready_stages(requires, {"autoencoder"}, {"image_prior"}) == ["motion"]
    # a chain (VDM's one stage, PVDM's autoencoder -> diffusion) has nothing to put side by side
    for name in ("vdm", "pvdm", "videofusion"):
        _, m = _method(name)
        assert side_by_side({s: m.stage_requires(s) for s in m.stages}, list(m.stages)) == []


def test_thread_shares_split_every_core_and_give_each_stage_one():
    assert thread_shares(["a", "b"], 2) == {"a": 1, "b": 1}
    assert thread_shares(["a"], 2) == {"a": 2}  # alone, a stage takes the freed core
    assert thread_shares(["a", "b"], 5) == {"a": 3, "b": 2}
    assert thread_shares(["a", "b", "c"], 2) == {"a": 1, "b": 1, "c": 1}
    assert thread_shares([], 4) == {}
    assert [parallel_mode(v) for v in ("auto", True, "False", "on", "off", "sometimes")] == ["auto", "on", "off", "on",
                                                                                          "off", None]


def test_side_by_side_only_where_it_can_pay_off():
    """Off by default; auto: on CPU, one process, no time budget, two or more cores, over a minute of predicted
    training; on: wherever two stages can train at once."""
    from benchmarks.stage_pool import AUTO_MIN_SECONDS, parallel_cpus

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cfg, method = _method("cmd", "trainer.parallel_stages=auto")
        todo = list(method.stages)
        assert parallel_cpus(cfg, method, todo, 2 * AUTO_MIN_SECONDS) == 2
        assert parallel_cpus(cfg, method, todo, AUTO_MIN_SECONDS / 2) == 0  # a worker's start would not pay
        assert parallel_cpus(cfg, method, todo[2:], 2 * AUTO_MIN_SECONDS) == 2  # content beside motion
        assert parallel_cpus(cfg, method, ["content"], 2 * AUTO_MIN_SECONDS) == 0  # nothing to put beside it
        for off in ([], ["trainer.time_budget=300"]):  # off by default; and never under a time budget
            cfg_off, _ = _method("cmd", *off, *(["trainer.parallel_stages=auto"] if off else []))
            assert parallel_cpus(cfg_off, method, todo, 2 * AUTO_MIN_SECONDS) == 0, off
        cfg_on, _ = _method("cmd", "trainer.parallel_stages=true")
        assert parallel_cpus(cfg_on, method, todo, None) == 2
        torch.set_num_threads(1)
        assert parallel_cpus(cfg, method, todo, 2 * AUTO_MIN_SECONDS) == 0  # one core: nothing to share
        cfg_vdm, vdm = _method("vdm", "trainer.parallel_stages=true")
        assert parallel_cpus(cfg_vdm, vdm, list(vdm.stages), 2 * AUTO_MIN_SECONDS) == 0
    finally:
        torch.set_num_threads(before)


def test_weights_of_stages_trained_apart_compose(tmp_path):
    """Each stage's final.pt holds the whole method, with the stages trained beside it at their initial values:
    loading them one after another must keep every stage's own weights (a plain load_state_dict would put the
    image prior back to its initial weights when it loads the autoencoder's file)."""
    _, method = _method("cmd")
    folder = RunFolder(tmp_path / "run")
    initial = {k: v.clone() for k, v in method.state_dict().items()}
    for i, stage in enumerate(method.stages):
        state = {k: v.clone() for k, v in initial.items()}
        for k in method.stage_state_keys(stage):
            if state[k].is_floating_point():
                state[k].fill_(float(i + 1))
        folder.save_stage(stage, state, {"seconds": 1.0})
    for stage in method.stages:
        run.load_stage_weights(method, folder, stage)
    now = method.state_dict()
    for i, stage in enumerate(method.stages):
        for k in method.stage_state_keys(stage):
            if now[k].is_floating_point():
                assert torch.all(now[k] == i + 1), (stage, k)


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return ["method=cmd", "scale=test", f"runs_root={tmp_path / 'runs'}", f"results={tmp_path / 'results.jsonl'}",
            f"cache_dir={tmp_path / 'cache'}", *extra]


def test_cmd_run_side_by_side_equals_the_run_one_stage_after_another(tmp_path):
    apart = run.main(_args(tmp_path, "trainer.parallel_stages=true", "trainer.progress_bar=false"))
    chain = run.main(_args(tmp_path, "trainer.parallel_stages=false", "trainer.progress_bar=false"))
    events = apart["parallel_stages"]["events"]
    started = [stage for _, stage, what, _ in events if what == "started"]
    assert started[:2] == ["image_prior", "autoencoder"] and sorted(started) == sorted(METHODS["cmd"].stages)
    assert chain["parallel_stages"] is None
    # the prior and the autoencoder ran at the same time; each later stage started once what it needs was done
    when = {(stage, what.split()[0]): t for t, stage, what, _ in events}
    assert when[("autoencoder", "started")] < when[("image_prior", "done")]
    assert when[("autoencoder", "done")] <= when[("motion", "started")] < when[("motion", "done")]
    assert max(when[("image_prior", "done")], when[("autoencoder", "done")]) <= when[("content", "started")]
    assert apart["train_seconds"] == pytest.approx(RunFolder(apart["run_dir"]).state()["parallel_training"]["wall_seconds"])
    for stage in ("image_prior", "autoencoder", "content", "motion"):
        assert (Path(apart["run_dir"]) / "checkpoints" / stage / "worker.log").exists()
    # the same stages, seeds and batches: the same weights, up to the rounding of one thread against two, which
    # is far less than training moved them (the prior's file holds the other stages untrained). The last
    # stage's final.pt is the whole method, as after a sequential run (benchmarks.evaluate and the probes load it)
    _, method = _method("cmd")
    untrained = torch.load(Path(apart["run_dir"]) / "checkpoints" / "image_prior" / "final.pt", weights_only=True)
    whole = torch.load(RunFolder(apart["run_dir"]).final_checkpoint(method.stages), weights_only=True)
    whole_chain = torch.load(RunFolder(chain["run_dir"]).final_checkpoint(method.stages), weights_only=True)
    for stage in method.stages[1:]:
        keys = [k for k in method.stage_state_keys(stage) if whole[k].is_floating_point()]
        rounding = max(float((whole[k] - whole_chain[k]).abs().max()) for k in keys)
        moved = max(float((whole[k] - untrained[k]).abs().max()) for k in keys)
        assert rounding < 0.1 * moved, (stage, rounding, moved)
    assert RunFolder(apart["run_dir"]).load_stage("motion")[1]["composed"]
    assert apart["cond_acc"] == pytest.approx(chain["cond_acc"]) and apart["fvd"] == pytest.approx(chain["fvd"], rel=1e-3)
    assert len(read_rows(tmp_path / "results.jsonl")) == 2


def test_a_failing_worker_stops_the_run_naming_its_stage_and_log(tmp_path):
    first = run.main(_args(tmp_path, "trainer.parallel_stages=false", "trainer.progress_bar=false"))
    broken = RunFolder(tmp_path / "broken")
    broken.save_config(RunFolder(first["run_dir"]).saved_config())
    broken.stage_dir("image_prior").mkdir(parents=True)
    broken.final("image_prior").write_bytes(b"not a checkpoint")  # a damaged file the content stage must load
    broken.record_path("image_prior").write_text("{}")
    with pytest.raises(SystemExit, match=r"stage 'content' failed in its worker process.*worker\.log"):
        run.main(_args(tmp_path, f"run_dir={broken.path}", "trainer.parallel_stages=true", "trainer.progress_bar=false"))
    assert broken.stage_done("autoencoder")  # what finished is kept for a resume
    assert "failed" in broken.state()


def test_bad_parallel_settings_fail_before_training_saying_what_to_set():
    from benchmarks.config import ConfigError
    from benchmarks.preflight import validate_config

    with pytest.raises(ConfigError, match=r"trainer.parallel_stages='sometimes': choose one of auto, true"):
        validate_config(load_config(["scale=test", "trainer.parallel_stages=sometimes"]))
    with pytest.raises(ConfigError, match=r"cannot share a time budget.*trainer.parallel_stages=auto or false"):
        validate_config(load_config(["scale=test", "trainer.parallel_stages=on", "trainer.time_budget=60"]))
    validate_config(load_config(["scale=test", "trainer.parallel_stages=off"]))  # YAML's off: false
