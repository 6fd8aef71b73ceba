"""The run folder: its layout and its state, in one place.

    runs/<method>-<dataset>-<time>/
        config.yaml                        the resolved config: the source of truth on resume
        state.json                         whether the row was appended (and where), re-evaluations
        checkpoints/<stage>/last.ckpt      Lightning's resume point (it also carries the stage's training seconds)
        checkpoints/<stage>/record.json    the finished stage's record (steps, seconds, final loss)
        checkpoints/<stage>/final.pt       the whole method's state dict after the stage; written last, so
                                           its presence marks the stage done
        tensorboard/<stage>/               Lightning's TensorBoard logs (and tensorboard/samples, tensorboard/eval)
        samples/*.mp4, samples/grid.png    the generated videos
        metrics.json                       the results row, as appended to the store

`benchmarks.run`, `benchmarks.evaluate`, `benchmarks.sweep` and the probes reach the folder
through `RunFolder`; no other module spells these names.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from benchmarks.config_keys import HOW_KEYS
from benchmarks.leaderboard import flatten
from benchmarks.results import atomic_torch_save, atomic_write_text  # (torch is imported only to load weights)

# Files a folder may hold before its run starts (a sweep creates the folder and its log first).
PRE_RUN_FILES = {"sweep.log"}  # RunFolder.sweep_log


class RunFolderError(ValueError):
    """The folder cannot be used the way it was asked to be (another run's, or a different config)."""


class RunFolder:
    """One run's folder. Creating the object touches nothing on disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # --- layout -------------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    @property
    def grid_path(self) -> Path:
        return self.samples_dir / "grid.png"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    @property
    def sweep_log(self) -> Path:
        return self.path / "sweep.log"

    def stage_dir(self, stage: str) -> Path:
        return self.path / "checkpoints" / stage

    def final(self, stage: str) -> Path:
        return self.stage_dir(stage) / "final.pt"

    def last_checkpoint(self, stage: str) -> Path:
        return self.stage_dir(stage) / "last.ckpt"

    def record_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / "record.json"

    # --- what the folder holds ----------------------------------------------------------------------

    def has_run(self) -> bool:
        return self.config_path.exists()

    def foreign_contents(self) -> list[str]:
        """Entries of an existing folder that no run of ours wrote (a folder holding them is never taken over)."""
        if not self.path.exists() or self.has_run():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name not in PRE_RUN_FILES)

    def saved_config(self) -> DictConfig:
        return OmegaConf.load(self.config_path)

    def save_config(self, cfg: DictConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, OmegaConf.to_yaml(cfg))

    def stage_done(self, stage: str) -> bool:
        return self.final(stage).exists()

    def load_stage(self, stage: str) -> tuple[dict, dict]:
        """(the method's state dict after `stage`, the stage's record)."""
        import torch

        state = torch.load(self.final(stage), map_location="cpu", weights_only=True)
        return state, json.loads(self.record_path(stage).read_text())

    def save_stage(self, stage: str, state_dict: dict, record: dict) -> None:
        """The stage's record, then its final weights (whose presence marks the stage done)."""
        self.stage_dir(stage).mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.record_path(stage), json.dumps(record, default=str))
        atomic_torch_save(state_dict, self.final(stage))

    def final_checkpoint(self, stages) -> Path:
        """The last finished stage's final.pt (the whole method after its last stage, EMA weights)."""
        for stage in reversed(tuple(stages)):
            if self.stage_done(stage):
                return self.final(stage)
        raise FileNotFoundError(f"no checkpoints/<stage>/final.pt under {self.path}: is the run finished?")

    # --- state --------------------------------------------------------------------------------------

    def state(self) -> dict:
        return json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def update_state(self, **changes) -> None:
        atomic_write_text(self.state_path, json.dumps({**self.state(), **changes}, indent=2, default=str))

    def row_appended(self) -> bool:
        return bool(self.state().get("row_appended"))

    def stored_row(self) -> dict | None:
        return json.loads(self.metrics_path.read_text()) if self.metrics_path.exists() else None

    def write_metrics(self, row: dict) -> None:
        atomic_write_text(self.metrics_path, json.dumps(row, indent=2, default=str))


def config_difference(saved: dict, wanted: dict, ignore: tuple[str, ...] = HOW_KEYS) -> list[tuple[str, object, object]]:
    """[(dotted key, saved value, wanted value)] for every result-defining key that differs (keys in `ignore`,
    the HOW keys by default, are left out)."""
    a, b = flatten(saved), flatten(wanted)

    def ignored(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in ignore)

    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
            if not ignored(k) and a.get(k, "<absent>") != b.get(k, "<absent>")]
