"""The learning-rate schedule of a stage (optim.lr_decay): warm-up, then constant or decaying to 0 by the end of
the stage, measured in steps or, under a time budget, in seconds; and the training options added after results
were stored (this one, Min-SNR weighting), which leave stored configs' hashes as they were at their defaults."""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from benchmarks.config import config_hash, load_config, to_container, without_keys
from benchmarks.config_keys import ABSENT_AT_DEFAULT, DIFFUSION_CONFIGS
from benchmarks.preflight import ConfigError, validate_config
from datamodules.base import LoaderConfig, VideoDataModule
from datamodules.shapes import ShapesConfig
from lightning_modules.system import LRSchedule, StageSystem
from methods import METHODS
from methods.base import DataSpec, VideoGenerator


def test_warm_up_then_constant_by_default():
    s = LRSchedule(warmup_steps=4, max_steps=10)
    assert [s(i) for i in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert s(9) == 1.0 and s(100) == 1.0


def test_linear_and_cosine_decay_reach_zero_at_the_end_of_the_stage():
    lin = LRSchedule(warmup_steps=0, max_steps=100, decay="linear")
    assert [lin(i) for i in (0, 25, 50, 100)] == pytest.approx([1.0, 0.75, 0.5, 0.0])
    cos = LRSchedule(warmup_steps=0, max_steps=100, decay="cosine")
    assert [cos(i) for i in (0, 50, 100)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    assert cos(25) == pytest.approx(0.5 * (1 + 2 ** -0.5))  # cosine stays higher than linear early on ...
    assert cos(75) == pytest.approx(0.5 * (1 - 2 ** -0.5))  # ... and lower late
    late = LRSchedule(warmup_steps=0, max_steps=100, decay="linear", decay_start=0.8)
    assert [late(i) for i in (0, 80, 90, 100)] == pytest.approx([1.0, 1.0, 0.5, 0.0])
    warm = LRSchedule(warmup_steps=10, max_steps=100, decay="linear")
    assert warm(4) == pytest.approx(0.5 * 0.96)  # warm-up and decay multiply
    assert lin(150) == 0.0  # past the end (a step cap above the steps run): it stays at 0


def test_under_a_time_budget_the_decay_follows_the_seconds_spent():
    s = LRSchedule(warmup_steps=0, max_steps=10_000, decay="linear")  # the step cap is far off ...
    s.allowance = 100.0
    s.deadline = time.perf_counter() + 25.0  # ... but 75 of the stage's 100 s are spent
    assert s.progress(10) == pytest.approx(0.75, abs=0.01)
    assert s(10) == pytest.approx(0.25, abs=0.01)
    s.deadline = time.perf_counter() - 5.0  # past the deadline: the end of the stage
    assert s(10) == 0.0
    s.deadline = time.perf_counter() + 100.0  # nothing spent yet, but half the steps run: the further along wins
    assert s.progress(5_000) == pytest.approx(0.5)


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="optim.lr_decay must be one of none, linear, cosine"):
        LRSchedule(decay="exp")
    with pytest.raises(ValueError, match=r"optim.lr_decay_start must be in \[0, 1\)"):
        LRSchedule(decay="linear", decay_start=1.0)
    with pytest.raises(ConfigError, match="optim.lr_decay"):
        validate_config(load_config(["method=vdm", "scale=test", "optim.lr_decay=step"]))
    with pytest.raises(ConfigError, match="optim.lr_decay_start"):
        validate_config(load_config(["method=vdm", "scale=test", "optim.lr_decay_start=-0.5"]))


def _has(d: dict, key: str) -> bool:
    *parents, last = key.split(".")
    for part in parents:
        d = d.get(part, {})
    return last in d


@pytest.mark.parametrize("method", sorted(METHODS))
def test_keys_added_later_leave_every_config_hash_as_it_was_at_their_default(method):
    cfg = load_config([f"method={method}", "scale=test"])
    d = to_container(cfg)
    present = [k for k in ABSENT_AT_DEFAULT if _has(d, k)]
    assert "optim.lr_decay" in present and any(k.endswith("diffusion.min_snr_gamma") for k in present)
    assert config_hash(cfg) == config_hash(without_keys(d, tuple(present)))  # a config written before the keys
    assert config_hash(load_config([f"method={method}", "scale=test", "optim.lr_decay=linear"])) != config_hash(cfg)
    gamma = next(k for k in present if k.endswith("min_snr_gamma"))
    assert config_hash(load_config([f"method={method}", "scale=test", f"{gamma}=5"])) != config_hash(cfg)
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        validate_config(load_config([f"method={method}", "scale=test", f"{gamma}=-1"]))
    shift = next(k for k in present if k.endswith("snr_shift"))
    assert config_hash(load_config([f"method={method}", "scale=test", f"{shift}=2"])) != config_hash(cfg)
    with pytest.raises(ConfigError, match="snr_shift"):
        validate_config(load_config([f"method={method}", "scale=test", f"{shift}=0"]))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_snr_shift_reaches_every_schedule_a_method_builds(method):
    """Each diffusion config's snr_shift changes exactly the schedule built from it (every call site passes it on)."""
    from benchmarks.common import build_datamodule, build_method, data_spec
    from methods import diffusion as D
    from methods.vdm import diffusion_schedule

    base = load_config([f"method={method}", "scale=test"])
    at = [k for k in DIFFUSION_CONFIGS if OmegaConf.select(base, k) is not None]
    assert at, f"{method}: none of {DIFFUSION_CONFIGS} in its config"

    def schedules(cfg):
        m = build_method(cfg, data_spec(cfg, build_datamodule(cfg)))
        return {n: b.clone() for n, b in m.named_buffers() if n.endswith("alpha_bar")}

    before = schedules(base)
    for key in at:
        after = schedules(load_config([f"method={method}", "scale=test", f"{key}.snr_shift=2"]))
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert changed, f"{key}.snr_shift=2 changed none of {sorted(before)}"
        named = diffusion_schedule(OmegaConf.select(base, key))  # the unshifted schedule the config names
        for n in changed:
            assert torch.allclose(after[n], D.shift_snr(before[n], 2.0)) and torch.equal(before[n], named)


class _Scalar(VideoGenerator):
    stages = ("main",)

    def __init__(self) -> None:
        super().__init__(DataSpec(frames=16, height=32, width=32))
        self.w = nn.Parameter(torch.zeros(()))

    def stage_parameters(self, stage):
        return [self.w]

    def loss(self, stage, batch):
        return {"loss": (self.w - 10.0) ** 2 + 0 * batch.video.mean()}

    def sample(self, n, cond, *, steps, guidance, generator=None, eta=0.0):
        raise NotImplementedError


class _LRs(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_a_stage_trains_with_the_schedule_it_is_given():
    torch.set_num_threads(1)
    dm = VideoDataModule(ShapesConfig(train_size=32, val_size=8, test_size=8), LoaderConfig(batch_size=4))
    seen = _LRs()
    trainer = L.Trainer(max_steps=8, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[seen])
    system = StageSystem(_Scalar(), "main", lr=0.4, warmup_steps=2,
                         schedule=LRSchedule(warmup_steps=2, max_steps=8, decay="linear"))
    trainer.fit(system, train_dataloaders=dm.loader_for("train", shuffle=True, drop_last=True))
    expected = [0.4 * min(1, (i + 1) / 2) * (1 - i / 8) for i in range(8)]
    assert seen.lrs == pytest.approx(expected)
