"""Multi-process training on Lightning's DDP: 2 CPU processes (gloo) through `benchmarks.run`, every method."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.results import read_rows
from methods import METHODS

REPO = Path(__file__).resolve().parent.parent


def _run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "benchmarks.run", "scale=test", "trainer.accelerator=cpu", "trainer.devices=2",
           f"runs_root={tmp_path / 'runs'}", f"results={tmp_path / 'results.jsonl'}",
           f"cache_dir={tmp_path / 'cache'}", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stdout + proc.stderr  # two ranks really joined the process group
    return proc


def _check_run(tmp_path: Path, name: str, eval_world: int) -> Path:
    """One run folder, one row with metrics, samples; each stage's saved weights are the ones the workers trained."""
    (run_dir,) = (tmp_path / "runs").iterdir()  # every rank wrote into the same folder
    rows = read_rows(tmp_path / "results.jsonl")
    assert len(rows) == 1 and rows[0]["method"] == name and rows[0]["run_dir"] == str(run_dir)
    assert len(list((run_dir / "samples").glob("*.mp4"))) == 2
    assert isinstance(rows[0]["fvd"], float) and rows[0]["eval_world_size"] == eval_world
    for stage in rows[0]["stage_steps"]:
        ckpt = torch.load(run_dir / "checkpoints" / stage / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == rows[0]["stage_steps"][stage]
        final = torch.load(run_dir / "checkpoints" / stage / "final.pt", map_location="cpu", weights_only=True)
        trained = {k.removeprefix("method."): v for k, v in ckpt["state_dict"].items()}
        assert final.keys() == trained.keys()
        assert all(torch.equal(final[k], trained[k]) for k in final), f"{stage}: final.pt differs from the workers'"
    return run_dir


@pytest.mark.parametrize("name", sorted(METHODS))
def test_ddp_spawn_two_cpu_processes_train_and_the_main_process_gets_the_weights(tmp_path, name):
    _run(tmp_path, f"method={name}", "trainer.strategy=ddp_spawn")
    _check_run(tmp_path, name, eval_world=1)  # the spawned workers are gone after fit: the main process evaluates


# The relaunch path (strategy=ddp: rank 0 re-executes the command for rank 1) is method-independent:
# the spawn test above runs every method under 2 processes; this one checks sharded evaluation end to end.
@pytest.mark.parametrize("name", ["vdm"])
def test_ddp_relaunched_workers_share_the_run_folder_train_and_evaluate_together(tmp_path, name):
    _run(tmp_path, f"method={name}", "trainer.strategy=ddp")
    _check_run(tmp_path, name, eval_world=2)  # both ranks generate a shard; the metrics gather them
