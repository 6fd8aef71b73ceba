"""The method contract: every video generator in the framework implements this.

A method is a plain `nn.Module` (no Lightning). The training system calls
`loss(stage, batch)` on the parameters of `stage_parameters(stage)`, stage by stage in
`stages` order; evaluation calls `sample(...)` and, for methods with an autoencoder,
`reconstruct(...)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from datamodules.batch import VideoBatch

__all__ = ["VideoBatch", "Conditioning", "DataSpec", "VideoGenerator"]


@dataclass(frozen=True)
class DataSpec:
    """What a method needs to know about the data it will be trained on."""

    channels: int = 3
    frames: int = 16
    height: int = 32
    width: int = 32
    num_classes: int = 0  # 0 = unconditional on class
    captions: bool = False  # the dataset provides text
    class_names: tuple[str, ...] = ()  # names by label (Stable Diffusion priors turn labels into prompts with them)

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        return (self.channels, self.frames, self.height, self.width)


@dataclass
class Conditioning:
    """What a sample is conditioned on; every field is optional.

    label: (n,) long; text: n captions; first_frame: (n, C, H, W) in [-1, 1] (image-to-video).
    """

    label: Tensor | None = None
    text: list[str] | None = None
    first_frame: Tensor | None = None

    @classmethod
    def from_batch(cls, batch: VideoBatch, first_frame: bool = False) -> Conditioning:
        return cls(label=batch.label, text=batch.text, first_frame=batch.first_frame if first_frame else None)

    def __len__(self) -> int:
        for v in (self.label, self.text, self.first_frame):
            if v is not None:
                return len(v)
        return 0

    def slice(self, start: int, stop: int) -> Conditioning:
        return Conditioning(
            label=None if self.label is None else self.label[start:stop],
            text=None if self.text is None else self.text[start:stop],
            first_frame=None if self.first_frame is None else self.first_frame[start:stop],
        )

    def to(self, device: torch.device | str) -> Conditioning:
        return Conditioning(
            label=None if self.label is None else self.label.to(device),
            text=self.text,
            first_frame=None if self.first_frame is None else self.first_frame.to(device),
        )


class VideoGenerator(nn.Module):
    """Base class of every method. Subclasses set `stages` and implement the hooks."""

    stages: tuple[str, ...] = ()
    # Stages whose trained weights other methods may share (e.g. the image prior).
    image_to_video: bool = False  # True when sampling needs Conditioning.first_frame
    long_video: bool = False  # True when `sample_long` generates videos of several clips

    def __init__(self, data: DataSpec) -> None:
        super().__init__()
        self.data = data
        self.encoding_cache = None  # a methods.speed.EncodingCache (trainer.encoding_cache), or None

    def frozen_encode(self, fn, x: Tensor, module: nn.Module):
        """`fn(x)`: a frozen `module` encoding the clips `x` inside a loss, through the encoding cache when the run
        keeps one (rows seen before are read back, not encoded again)."""
        return fn(x) if self.encoding_cache is None else self.encoding_cache(x, fn, module)

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        """The parameters that `stage` trains (the rest stay frozen during it)."""
        raise NotImplementedError

    def stage_requires(self, stage: str) -> tuple[str, ...]:
        """The stages whose trained weights `stage` needs before it starts: by default every earlier stage (a
        chain). A method whose stages are independent says so, and `benchmarks.run` may then train them at once
        (`trainer.parallel_stages`)."""
        self.check_stage(stage)
        return self.stages[: self.stages.index(stage)]

    def stage_modules(self, stage: str) -> tuple[str, ...]:
        """The top-level submodules whose parameters and buffers `stage` trains: those holding its parameters."""
        mine = {id(p) for p in self.stage_parameters(stage)}
        return tuple(name for name, child in self.named_children() if any(id(p) in mine for p in child.parameters()))

    def stage_state_keys(self, stage: str) -> set[str]:
        """The keys of `state_dict()` that `stage` writes (its modules' parameters and buffers); a stage's saved
        weights are merged into a method by these keys, so stages trained side by side compose."""
        prefixes = tuple(f"{m}." for m in self.stage_modules(stage))
        return {k for k in self.state_dict() if k.startswith(prefixes)}

    def stage_param_groups(self, stage: str) -> list[dict]:
        """The stage's optimiser groups: {"params", optional "lr_scale" (relative learning rate), optional "player"
        (a group clipped on its own, e.g. a PatchGAN's discriminators)}; by default one group of `stage_parameters`."""
        return [{"params": self.stage_parameters(stage)}]

    def loss(self, stage: str, batch: VideoBatch) -> dict[str, Tensor]:
        """{"loss": scalar, **scalars to log} for one training batch of `stage`."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(
        self,
        n: int,
        cond: Conditioning,
        *,
        steps: int,
        guidance: float,
        generator: torch.Generator | None = None,
        eta: float = 0.0,
    ) -> Tensor:
        """n videos (n, C, T, H, W) in [-1, 1].

        guidance: the classifier-free guidance scale s in eps(null) + s (eps(c) - eps(null))
        (`methods.diffusion.cfg_combine`); 1 is no guidance and skips the unconditional pass.
        """
        raise NotImplementedError

    @property
    def has_autoencoder(self) -> bool:
        return type(self).reconstruct is not VideoGenerator.reconstruct

    def reconstruct(self, video: Tensor) -> Tensor:
        """Encode and decode `video` (B, C, T, H, W) -> same shape (methods with an autoencoder)."""
        raise NotImplementedError(f"{type(self).__name__} has no autoencoder to reconstruct with")

    def check_stage(self, stage: str) -> None:
        if stage not in self.stages:
            raise ValueError(f"{type(self).__name__} has no stage {stage!r}; its stages are {self.stages}")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self, stage: str | None = None) -> int:
        params = self.parameters() if stage is None else self.stage_parameters(stage)
        return sum(p.numel() for p in params)
