"""EvaluationCallback samples with the EMA weights, whatever the callback order, mid-stage and at the end."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from datamodules.base import LoaderConfig, VideoDataModule
from datamodules.shapes import ShapesConfig
from evaluation.callback import EvaluationCallback
from evaluation.config import EvalConfig
from lightning_modules.system import EMA, StageSystem
from methods.base import DataSpec, VideoGenerator


class Drift(VideoGenerator):
    """One scalar pulled towards 10; sampling records the value it used."""

    stages = ("main",)

    def __init__(self) -> None:
        super().__init__(DataSpec(frames=16, height=32, width=32))
        self.w = nn.Parameter(torch.zeros(()))
        self.sampled_with: list[float] = []

    def stage_parameters(self, stage):
        return [self.w]

    def loss(self, stage, batch):
        return {"loss": (self.w - 10.0) ** 2 + 0 * batch.video.mean()}

    @torch.no_grad()
    def sample(self, n, cond, *, steps, guidance, generator=None, eta=0.0):
        self.sampled_with.append(float(self.w))
        noise = torch.rand(n, *self.data.video_shape, generator=generator, device=self.w.device)
        return (torch.tanh(self.w / 10) * noise).clamp(-1, 1)


class Spy(EvaluationCallback):
    """Notes the live (training) weight at each evaluation."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.live: list[float] = []
        self.evaluated: list[Drift] = []

    def _evaluate(self, trainer, pl_module):
        self.live.append(float(pl_module.method.w))
        out = super()._evaluate(trainer, pl_module)
        return out


@pytest.mark.parametrize("eval_first", [False, True])
def test_callback_samples_the_ema_weights(tmp_path, eval_first):
    torch.set_num_threads(1)
    dm = VideoDataModule(ShapesConfig(train_size=32, val_size=8, test_size=8), LoaderConfig(batch_size=4))
    cfg = OmegaConf.create({"eval": OmegaConf.structured(EvalConfig(metrics=["fvd"], num_samples=4, num_real=8,
                                                                     batch_size=4)),
                            "seed": 0, "cache_dir": str(tmp_path), "trainer": {"precision": "32-true"},
                            "method": {"name": "drift"}, "sample": {"steps": 1, "guidance": 1.0, "eta": 0.0}})
    method = Drift()
    ema = EMA(decay=0.9)
    spy = Spy(cfg, dm, every_n_steps=3)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[spy, ema] if eval_first else [ema, spy])
    trainer.fit(StageSystem(method, "main", lr=0.5), train_dataloaders=dm.loader_for("train", shuffle=True,
                                                                                         drop_last=True))
    assert [step for step, _ in spy.history] == [3, 6]
    averaged = ema._average_model.module.method
    sampled = averaged.sampled_with  # sampling happened on the averaged copy ...
    assert len(sampled) == 2 and method.sampled_with == []  # ... never on the live training weights
    assert sampled[0] != pytest.approx(spy.live[0], abs=1e-3)  # mid-stage the EMA lags the live weight
    assert sampled[1] == pytest.approx(float(averaged.w))  # at the end: the final EMA weight
    assert float(method.w) == pytest.approx(float(averaged.w))  # which Lightning copied into the method
    assert all(r["eval_weights"] == "ema" for _, r in spy.history)
    assert spy.results["eval_step"] == 6 and spy.results["fvd"] > 0
