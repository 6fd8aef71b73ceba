"""The evaluation protocol's configuration (pure dataclass; the `eval` node of a run config)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    metrics: list[str] = field(default_factory=list)  # e.g. ["fvd", "is", "clipsim", "cond_acc"]; empty = skip
    num_samples: int = 64  # generated videos scored per evaluation
