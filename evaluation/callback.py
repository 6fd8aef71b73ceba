"""`EvaluationCallback`: the common Lightning callback that scores a method with the evaluation protocol.

It evaluates at the end of the stage it is attached to (give it to the final stage's
Trainer) and, with `every_n_steps > 0`, every N optimiser steps during it. It always samples
with the EMA weights when an EMA (`WeightAveraging`) callback is present: it samples from
that callback's averaged copy of the system, so the result does not depend on callback order
(Lightning's EMA swaps weights only around validation, and callbacks run before the module's
own hooks: reference/ecosystem.md). Numbers go to the Trainer's logger under `eval/` and to
`self.results` (the latest flat dict, with its protocol fields) / `self.history`.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback, WeightAveraging

from evaluation.protocol import evaluate_method, numeric


def ema_method(trainer: L.Trainer, pl_module: L.LightningModule):
    """(the method with EMA weights if an EMA callback holds them, else the live one, "ema"|"live")."""
    for cb in trainer.callbacks:
        averaged = getattr(cb, "_average_model", None) if isinstance(cb, WeightAveraging) else None
        if averaged is not None:
            return averaged.module.method, "ema"
    return pl_module.method, "live"


class EvaluationCallback(Callback):
    """Evaluate `pl_module.method` (EMA weights) on `datamodule` with `cfg.eval` at train end / every N steps."""

    def __init__(self, cfg, datamodule, every_n_steps: int | None = None, at_train_end: bool = True) -> None:
        super().__init__()
        self.cfg, self.datamodule, self.at_train_end = cfg, datamodule, at_train_end
        self.every_n_steps = every_n_steps if every_n_steps is not None else int(cfg.eval.every_n_steps or 0)
        self.results: dict | None = None
        self.history: list[tuple[int, dict]] = []

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        method, weights = ema_method(trainer, pl_module)
        out = evaluate_method(method, self.datamodule, self.cfg)
        out["eval_weights"] = weights
        out["eval_step"] = trainer.global_step
        self.results = out
        self.history.append((trainer.global_step, out))
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics({f"eval/{k}": v for k, v in numeric(out).items()}, step=trainer.global_step)
        return out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        due = self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0
        done = self.history and self.history[-1][0] == step  # gradient accumulation repeats a global step
        if due and not done and step < (trainer.max_steps or 0):  # the final step is scored by on_train_end
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_train_end:
            self._evaluate(trainer, pl_module)
