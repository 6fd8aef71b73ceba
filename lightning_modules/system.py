"""The Lightning system that trains one stage of any method.

It is handed a `VideoGenerator` and a stage name and holds no diffusion math: the step is
`method.loss(stage, batch)` on `method.stage_parameters(stage)`; everything else (EMA,
checkpoints, precision, clipping, DDP, logging) is Lightning's.
"""

from __future__ import annotations

import math
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging

from methods.base import VideoBatch, VideoGenerator


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight: the stage stops before it is stored."""


class StageSystem(L.LightningModule):
    """Trains `method.stage_parameters(stage)`; every other parameter is frozen for the stage.

    Guards: a non-finite loss, gradient norm or weight stops the stage with a `DivergenceError`
    before the optimiser applies it or a checkpoint stores it, so `last.ckpt` stays the last good
    state. Training seconds accumulate across resumes in the checkpoint (`train_seconds`).
    """

    def __init__(self, method: VideoGenerator, stage: str, *, lr: float = 2e-4, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, warmup_steps: int = 0, compile: bool = False,
                 schedule: LRSchedule | None = None) -> None:
        super().__init__()
        method.check_stage(stage)
        self.method = method
        self.stage = stage
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.schedule = schedule if schedule is not None else LRSchedule(warmup_steps)  # holds the warm-up
        trainable = {id(p) for p in method.stage_parameters(stage)}
        if not trainable:
            raise ValueError(f"stage {stage!r} of {type(method).__name__} has no parameters to train")
        for p in method.parameters():
            p.requires_grad_(id(p) in trainable)
        self.compile = compile  # torch.compile the networks the loss calls, at the first step (methods.speed)
        self.compiled: list[str] | None = None
        self.prior_seconds = 0.0  # training seconds of earlier attempts (restored from the checkpoint)
        self._started: float | None = None

    # --- the divergence guard ----------------------------------------------------------------------

    def _diverged(self, what: str) -> DivergenceError:
        step = self.global_step
        return DivergenceError(
            f"stage {self.stage!r} diverged at step {step}: {what} (learning rate {self.current_lr():.3g}). "
            f"Nothing of this step was stored. Try a lower learning rate "
            f"(stages.{self.stage}.lr or optim.lr, e.g. {self.lr / 10:.3g}), gradient clipping "
            f"(trainer.gradient_clip_val=1.0), a longer warm-up (optim.warmup_steps), or trainer.precision=32-true.")

    def current_lr(self) -> float:
        try:
            return float(self.optimizers().param_groups[0]["lr"])
        except (RuntimeError, AttributeError, IndexError):
            return self.lr

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.method.parameters() if p.grad is not None]
        if grads:
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
            if not math.isfinite(norm):
                raise self._diverged(f"the gradient norm is {norm}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        for name, p in self.method.named_parameters():
            if p.requires_grad and not torch.isfinite(p).all():
                raise self._diverged(f"parameter {name} holds non-finite values")
        checkpoint["train_seconds"] = self.train_seconds()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.prior_seconds = float(checkpoint.get("train_seconds", 0.0))

    def on_train_start(self) -> None:
        self._started = time.perf_counter()

    def train_seconds(self) -> float:
        """Seconds spent training this stage, over every attempt (resumes included)."""
        return self.prior_seconds + (time.perf_counter() - self._started if self._started is not None else 0.0)

    # --- the step ----------------------------------------------------------------------------------

    def training_step(self, batch: VideoBatch, batch_idx: int) -> torch.Tensor:
        if self.compile and self.compiled is None:
            from methods.speed import compile_called

            with torch.no_grad():  # one forward finds the networks the loss calls
                self.compiled = compile_called(self.method, lambda: self.method.loss(self.stage, batch))
        out = self.method.loss(self.stage, batch)
        if not torch.isfinite(out["loss"].detach()).all():
            raise self._diverged(f"the loss is {float(out['loss'].detach())}")
        logs = {f"{self.stage}/{k}": v.detach().float() for k, v in out.items()}
        self.log_dict(logs, prog_bar=False, batch_size=len(batch), sync_dist=False)
        self.log("loss", out["loss"].detach().float(), prog_bar=True, logger=False, batch_size=len(batch))
        return out["loss"]

    def configure_optimizers(self):
        groups = optimizer_groups(self.method, self.stage, self.lr)
        opt = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Norm clipping per player (`clip_by_player`) when a stage trains two (an autoencoder and its PatchGAN's
        discriminators); one player is clipped as Lightning does."""
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and len(players(optimizer)) > 1:
            clip_by_player(optimizer, float(gradient_clip_val))
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


def optimizer_groups(method: VideoGenerator, stage: str, lr: float) -> list[dict]:
    """The stage's AdamW groups from `method.stage_param_groups`: a relative learning rate (`lr_scale`, VideoFusion's
    slow z_b) or a second player (`player`, the PatchGAN's discriminators)."""
    return [{"params": g["params"], "lr": lr * g.get("lr_scale", 1.0), "player": g.get("player", "model")}
            for g in method.stage_param_groups(stage) if g["params"]]


def players(optimizer: torch.optim.Optimizer) -> dict[str, list[torch.nn.Parameter]]:
    out: dict[str, list[torch.nn.Parameter]] = {}
    for g in optimizer.param_groups:
        out.setdefault(g.get("player", "model"), []).extend(g["params"])
    return out


def clip_by_player(optimizer: torch.optim.Optimizer, max_norm: float) -> dict[str, float]:
    """Clips each player's gradient to `max_norm` on its own; returns the norms before clipping. Within a player
    it is Lightning's norm clipping. One norm over an autoencoder and its discriminators let the discriminators'
    gradient (measured ~40x the autoencoder's in PVDM's tiny setting) shrink the autoencoder's step ~40x."""
    return {name: float(torch.nn.utils.clip_grad_norm_(params, max_norm)) for name, params in players(optimizer).items()}


class LRSchedule:
    """The learning-rate factor of a stage's step: a linear warm-up over `warmup_steps`, then constant (`decay`
    "none") or decaying to 0 at the end of the stage ("linear", "cosine"), from `decay_start` (a fraction of the
    stage) on. The stage's progress is step / `max_steps`, or, under a time budget (`deadline`, a
    time.perf_counter() value, and `allowance`, the stage's seconds, set when its clock starts), the fraction of
    its seconds spent when that is further along: a time-budgeted stage does not know its step count in advance.
    A class, not a closure, so `ddp_spawn` can pickle it."""

    DECAYS = ("none", "linear", "cosine")

    def __init__(self, warmup_steps: int = 0, max_steps: int = 1, decay: str = "none", decay_start: float = 0.0) -> None:
        if decay not in self.DECAYS:
            raise ValueError(f"optim.lr_decay must be one of {', '.join(self.DECAYS)}; got {decay!r}")
        if not 0.0 <= decay_start < 1.0:
            raise ValueError(f"optim.lr_decay_start must be in [0, 1) (a fraction of the stage); got {decay_start}")
        self.warmup_steps, self.max_steps, self.decay, self.decay_start = warmup_steps, max(1, max_steps), decay, decay_start
        self.deadline: float | None = None
        self.allowance: float | None = None

    def progress(self, step: int) -> float:
        p = step / self.max_steps
        if self.deadline is not None and self.allowance:
            p = max(p, 1.0 - (self.deadline - time.perf_counter()) / self.allowance)
        return min(1.0, max(0.0, p))

    def __call__(self, step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, self.warmup_steps))
        if self.decay == "none":
            return warm
        q = max(0.0, self.progress(step) - self.decay_start) / (1.0 - self.decay_start)
        return warm * ((1.0 - q) if self.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * q)))


class EMA(WeightAveraging):
    """Lightning's weight averaging with an EMA whose decay warms up: min(decay, (1 + n) / (10 + n)).

    A fixed decay of 0.999 over a 300-step CPU run would leave the averaged weights mostly
    at their initialisation; the warm-up (as in common EMA practice) makes short runs usable
    while long runs converge to `decay`.
    """

    def __init__(self, decay: float = 0.999, start_step: int = 0) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        super().__init__(avg_fn=WarmupDecay(decay), use_buffers=True)
        self.decay, self.start_step = decay, start_step

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step


class WarmupDecay:
    """EMA update with decay min(decay, (1 + n) / (10 + n)); a class, not a closure, so `ddp_spawn` can pickle it."""

    def __init__(self, decay: float) -> None:
        self.decay = decay

    def __call__(self, averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        n = float(num_averaged)
        d = min(self.decay, (1 + n) / (10 + n))
        if not averaged.is_floating_point():  # integer buffers (token ids, counters) are copied, not averaged
            return current.clone()
        return torch.lerp(averaged, current, 1 - d)  # exact for frozen weights (averaged == current)
