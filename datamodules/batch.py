"""The one batch type that flows from every dataset into every method.

Pure PyTorch on purpose: `methods` re-exports it, `datamodules` builds it, and neither
has to import the other's machinery.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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


# Intra-op threads while a batch is stacked (None: torch's count). Stacking 16 tiny clips (3 MB) with 2
# threads forks an OpenMP region, and on a busy 2-core machine the region waits for a descheduled thread:
# measured 128 ms of CPU per batch of 16 (2 threads) vs 0.06 ms (1 thread), the same bytes either way.
# DataLoader workers run single-threaded already; this matters for num_workers=0 (the CPU default).
COLLATE_THREADS: int | None = 1


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `n` inside the block (restored after); None: unchanged."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def collate_items(items: list[dict]) -> VideoBatch:
    """Collate dataset items `{"video": (C, T, H, W) float, "label": int, "text": str}`.

    A label of -1 means "no label" and a caption of None means "no text"; a batch keeps a
    field only when every item has it.
    """
    with intra_op_threads(COLLATE_THREADS):
        video = torch.stack([it["video"] for it in items])
    labels = [it.get("label", -1) for it in items]
    texts = [it.get("text") for it in items]
    label = torch.tensor(labels, dtype=torch.long) if all(lbl is not None and lbl >= 0 for lbl in labels) else None
    text = list(texts) if all(t is not None for t in texts) else None
    return VideoBatch(video=video, label=label, text=text)
