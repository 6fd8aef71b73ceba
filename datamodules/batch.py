"""The one batch type that flows from every dataset into every method.

Pure PyTorch on purpose: `methods` re-exports it, `datamodules` builds it, and neither
has to import the other's machinery.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass
class VideoBatch:
    """A batch of clips.

    video: (B, C, T, H, W) float in [-1, 1].
    label: (B,) long class index, or None for unlabelled data.
    text:  B captions, or None for data without text.
    """

    video: Tensor
    label: Tensor | None = None
    text: list[str] | None = None
    meta: dict = field(default_factory=dict)  # free-form (e.g. source paths); never used by methods

    def __post_init__(self) -> None:
        if self.video.ndim != 5:
            raise ValueError(f"VideoBatch.video must be (B, C, T, H, W); got shape {tuple(self.video.shape)}")
        if self.label is not None and self.label.shape != (self.video.shape[0],):
            raise ValueError(f"VideoBatch.label must be (B,); got {tuple(self.label.shape)}")
        if self.text is not None and len(self.text) != self.video.shape[0]:
            raise ValueError(f"VideoBatch.text has {len(self.text)} captions for {self.video.shape[0]} videos")

    @property
    def first_frame(self) -> Tensor:
        """(B, C, H, W): derived, never stored (image-to-video methods condition on it)."""
        return self.video[:, :, 0]

    def __len__(self) -> int:
        return self.video.shape[0]

    def to(self, device: torch.device | str) -> VideoBatch:
        label = None if self.label is None else self.label.to(device)
        return replace(self, video=self.video.to(device), label=label)


def collate_items(items: list[dict]) -> VideoBatch:
    """Collate dataset items `{"video": (C, T, H, W) float, "label": int, "text": str}`.

    A label of -1 means "no label" and a caption of None means "no text"; a batch keeps a
    field only when every item has it.
    """
    video = torch.stack([it["video"] for it in items])
    labels = [it.get("label", -1) for it in items]
    texts = [it.get("text") for it in items]
    label = torch.tensor(labels, dtype=torch.long) if all(lbl is not None and lbl >= 0 for lbl in labels) else None
    text = list(texts) if all(t is not None for t in texts) else None
    return VideoBatch(video=video, label=label, text=text)
