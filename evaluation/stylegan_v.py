"""StyleGAN-V's real clips: which videos, which frames, and how they are resized (`eval.protocol=stylegan-v`).

Reimplemented from universome/stylegan-v (commit 3fecd69c602e1cda204357201461c0fb0a634909):
`src/metrics/frechet_video_distance.py` + `src/metrics/metric_utils.py` (compute_feature_stats_for_dataset),
`src/training/dataset.py` (VideoFramesFolderDataset) and `src/scripts/convert_videos_to_frames.py`.
`tests/test_stylegan_v_protocol.py` checks the whole chain against that code's own numbers.

`eval.real_selection=stylegan-v`
    videos   StyleGAN-V reads a folder of frame folders, one per video, named after the video file
             (the file name without its extension, '#' -> '_'), in the order of those names as Python
             strings (code points: case-sensitive, 'B' < 'a', 'g10' < 'g2'). `discard_short_videos` drops
             videos with fewer than frames * stride frames (one frame more than a clip spans when
             stride > 1). The real set is the FIRST n_real of the rest (`max_items`): not a random subset;
             on UCF-101 the first 2048 videos by name cover only the first classes alphabetically.
    offsets  `random.randint(0, L - frames * stride + stride - 1)`, uniform over every start whose clip
             fits, drawn with Python's `random` inside the DataLoader's 3 worker processes: worker w seeds
             it with base_seed + w, base_seed being one int64 draw from torch's global generator when the
             loader starts, and batches of NUM_FRAMES_IN_BATCH[resolution] // frames clips go to the workers
             in turn (batch k to worker k % 3). StyleGAN-V never seeds that generator (torch seeds it from
             the OS), so its offsets differ from run to run (its statistics cache keeps the first draw);
             here the generator is seeded with `eval.clip_seed`: the clips are exactly those of a
             single-process StyleGAN-V run (num_gpus=1) after `torch.manual_seed(clip_seed)`.
    frames   frame start + k * stride for k < frames, read from the file as decoded (frame folders: the
             images in natural order, which is StyleGAN-V's string order for its zero-padded names;
             video files: the frame count is the container's, StyleGAN-V's is what its converter extracted).
`eval.real_resize` (StyleGAN-V's dataset preparation, `convert_videos_to_frames.process_video`, per frame)
    lanczos-center-crop        PIL LANCZOS of the shorter side to `resolution` (longer side
                               int(resolution * long / short); a frame whose shorter side already is
                               `resolution` is not resampled), then the centred square with its corner at
                               int((size - resolution + 1) * 0.5): torchvision 0.8.2, StyleGAN-V's
                               `environment.yaml`
    lanczos-center-crop-tv010  the same with the corner at round((size - resolution) / 2) (halves to even):
                               torchvision >= 0.9, as in its `environment-ampere.yaml` (0.10). The two differ by
                               one pixel when size - resolution is 1 mod 4 (UCF-101's 320x240 at 256: 85)
    area                       the dataset's own centre crop + antialiased bilinear (`datamodules.clips`)
`eval.real_jpeg_quality`
    The converter stores frames as JPEG with `frame.save(path, q=95)`; Pillow has no `q` option and ignores
    it, so they are quality 75 (its default, 4:2:0 chroma) and read back with PIL. A quality repeats that round
    trip in memory after resizing; null skips it.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.clips import crop_resize, to_item_video
from datamodules.video_io import probe, read_clip, read_frame_folder

SELECTIONS = ("seeded", "stylegan-v")
RESIZES = ("area", "lanczos-center-crop", "lanczos-center-crop-tv010")
NUM_FRAMES_IN_BATCH = {128: 128, 256: 128, 512: 64, 1024: 32}  # frechet_video_distance.py: frames per loader batch
LOADER_WORKERS = 3  # compute_feature_stats_for_dataset: DataLoader(num_workers=3)


def video_name(path: str | Path) -> str:
    """The name of video `path`'s frame folder in StyleGAN-V's layout (what its dataset sorts by)."""
    path = Path(path)
    name = path.name
    if not path.is_dir() and "." in name:
        name = name[: name.rfind(".")]  # convert_videos_to_frames: the file name without its extension
    return name.replace("#", "_")


def loader_batch_size(resolution: int, frames: int) -> int:
    """Clips per batch of StyleGAN-V's FVD DataLoader (which fixes the workers' shares of the offsets)."""
    if resolution not in NUM_FRAMES_IN_BATCH:
        raise ValueError(f"eval.real_selection=stylegan-v: StyleGAN-V's FVD has a batch size only for dataset.resolution "
                         f"in {sorted(NUM_FRAMES_IN_BATCH)} (NUM_FRAMES_IN_BATCH), and its clip offsets depend on it; "
                         f"got {resolution}. At other resolutions use the dataset's own clips: eval.real_selection=seeded "
                         "eval.real_resize=area eval.real_jpeg_quality=null")
    size = NUM_FRAMES_IN_BATCH[resolution] // frames
    if size < 1:
        raise ValueError(f"eval.real_selection=stylegan-v: {frames} frames exceed StyleGAN-V's "
                         f"{NUM_FRAMES_IN_BATCH[resolution]} frames per batch at resolution {resolution}")
    return size


def loader_base_seed(seed: int) -> int:
    """The DataLoader's base seed when torch's global generator was seeded with `seed`."""
    g = torch.Generator().manual_seed(int(seed))
    return int(torch.empty((), dtype=torch.int64).random_(generator=g).item())


@dataclass(frozen=True)
class Clip:
    video: int  # index into the dataset's samples
    start: int  # first source frame


def select(names: list[str], lengths: list[int], n_real: int, frames: int, stride: int, resolution: int,
           seed: int) -> list[Clip]:
    """StyleGAN-V's real clips of the videos named `names` with `lengths` frames (see the module docstring).

    n_real <= 0 takes every long-enough video. Ties between equal names keep the dataset order.
    """
    need = frames * stride
    order = sorted((i for i in range(len(names)) if lengths[i] >= need), key=lambda i: names[i])
    if n_real > 0:
        order = order[:n_real]
    batch = loader_batch_size(resolution, frames)
    base = loader_base_seed(seed)
    workers = [random.Random(base + w) for w in range(LOADER_WORKERS)]  # torch's _worker_loop: random.seed(base + id)
    return [Clip(i, workers[(j // batch) % LOADER_WORKERS].randint(0, lengths[i] - need + stride - 1))
            for j, i in enumerate(order)]


def lanczos_center_crop(frames: np.ndarray, resolution: int, half_up: bool = True) -> np.ndarray:
    """uint8 (T, H, W, 3) -> (T, R, R, 3): PIL LANCZOS of the shorter side, then the centred square (per frame)."""
    from PIL import Image

    lanczos = getattr(Image, "Resampling", Image).LANCZOS
    out = []
    for frame in np.asarray(frames):
        im = Image.fromarray(frame)
        w, h = im.size
        if not ((w <= h and w == resolution) or (h <= w and h == resolution)):
            im = im.resize((resolution, int(resolution * h / w)) if w < h else (int(resolution * w / h), resolution),
                           lanczos)
        w, h = im.size
        if half_up:
            top, left = int((h - resolution + 1) * 0.5), int((w - resolution + 1) * 0.5)
        else:
            top, left = int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))
        out.append(np.asarray(im.crop((left, top, left + resolution, top + resolution))))
    return np.stack(out)


def jpeg_round_trip(frames: np.ndarray, quality: int) -> np.ndarray:
    """uint8 (T, H, W, 3) frames encoded as JPEG by Pillow at `quality` and decoded again."""
    from PIL import Image

    out = []
    for frame in np.asarray(frames):
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as im:
            out.append(np.array(im.convert("RGB")))
    return np.stack(out)


def _source_sha256() -> str:
    return hashlib.sha256(inspect.getsource(sys.modules[__name__]).encode()).hexdigest()


@dataclass(frozen=True)
class RealClips:
    """How the real clips are chosen and prepared: `eval.real_selection`, `eval.real_resize`, `eval.real_jpeg_quality`."""

    selection: str = "seeded"
    resize: str = "area"
    jpeg_quality: int | None = None

    @classmethod
    def of(cls, ecfg) -> RealClips:
        out = cls(getattr(ecfg, "real_selection", None) or "seeded", getattr(ecfg, "real_resize", None) or "area",
                  getattr(ecfg, "real_jpeg_quality", None))
        out.validate()
        return out

    @property
    def is_default(self) -> bool:
        return self == RealClips()

    def validate(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"eval.real_selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.resize not in RESIZES:
            raise ValueError(f"eval.real_resize must be one of {RESIZES}, got {self.resize!r}")
        if self.jpeg_quality is not None and not 1 <= int(self.jpeg_quality) <= 100:
            raise ValueError(f"eval.real_jpeg_quality must be in [1, 100] or null, got {self.jpeg_quality}")
        if self.selection == "seeded" and (self.resize != "area" or self.jpeg_quality is not None):
            raise ValueError("eval.real_resize and eval.real_jpeg_quality apply to eval.real_selection=stylegan-v; "
                             "the seeded selection uses the dataset's own clips (real_resize=area, real_jpeg_quality=null)")

    def protocol(self) -> dict:
        """Part of the real-statistics key (with this module's source, which defines what the options do)."""
        return {"selection": self.selection, "resize": self.resize, "jpeg_quality": self.jpeg_quality,
                "code_sha256": _source_sha256()}

    # ------------------------------------------------------------------ the stylegan-v selection

    def clips(self, dataset, n_real: int, seed: int) -> list[Clip]:
        """The real clips of `dataset` (a file dataset) in order; at most n_real (all when n_real <= 0)."""
        samples = getattr(dataset, "samples", None)
        if samples is None or not all(hasattr(s, "path") for s in samples[:1]):
            raise ValueError(f"eval.real_selection=stylegan-v needs a dataset of files (videos or frame folders); "
                             f"{type(dataset).__name__} has none")
        cfg = dataset.cfg
        if getattr(cfg, "fps", None):
            raise ValueError("eval.real_selection=stylegan-v takes every dataset.stride-th frame; "
                             f"dataset.fps={cfg.fps} resamples in time: set dataset.fps=null")
        infos = getattr(dataset, "infos", None)
        lengths = [infos[i].num_frames if infos is not None else
                   probe(s.path, folder_fps=getattr(cfg, "folder_fps", 25.0)).num_frames for i, s in enumerate(samples)]
        out = select([video_name(s.path) for s in samples], lengths, n_real, cfg.frames, cfg.stride, cfg.resolution,
                     seed)
        if not out:
            raise ValueError(f"eval.real_selection=stylegan-v: none of the {len(samples)} videos has the "
                             f"dataset.frames * dataset.stride = {cfg.frames * cfg.stride} frames StyleGAN-V requires")
        return out

    def loader(self, dataset, indices, seed: int, batch_size: int, num_workers: int = 0) -> DataLoader:
        """Batches {"index", "video" (B, C, T, H, W) in [-1, 1], "label", "text"} of real clips `indices`."""
        from evaluation.real_stats import _collate

        return DataLoader(StyleGANVClips(dataset, self, self.clips(dataset, 0, seed), indices), batch_size=batch_size,
                          shuffle=False, num_workers=num_workers, collate_fn=_collate)

    def prepare(self, frames: np.ndarray, resolution: int) -> np.ndarray:
        """Decoded uint8 (T, H, W, 3) -> (T, R, R, 3): the resize, then the JPEG round trip."""
        if self.resize == "area":
            out = crop_resize(np.ascontiguousarray(frames), resolution).numpy()
        else:
            out = lanczos_center_crop(frames, resolution, half_up=self.resize == "lanczos-center-crop")
        return jpeg_round_trip(out, self.jpeg_quality) if self.jpeg_quality is not None else out


class StyleGANVClips(Dataset):
    """Real clips `indices` (positions in `clips`) of a file dataset, decoded and prepared as `real` says."""

    def __init__(self, dataset, real: RealClips, clips: list[Clip], indices) -> None:
        self.dataset, self.real, self.clips, self.indices = dataset, real, clips, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def frames(self, clip: Clip) -> np.ndarray:
        """The clip's source frames, uint8 (T, H, W, 3), as decoded."""
        cfg = self.dataset.cfg
        path = Path(self.dataset.samples[clip.video].path)
        if path.is_dir():
            out = read_frame_folder(path, [clip.start + k * cfg.stride for k in range(cfg.frames)])
        else:
            infos = getattr(self.dataset, "infos", None)
            fps = infos[clip.video].fps if infos is not None else probe(path).fps
            out = read_clip(path, cfg.frames, start=clip.start / fps, step=cfg.stride / fps,
                            threads=getattr(cfg, "decode_threads", 1))
        if len(out) < cfg.frames:
            raise ValueError(f"{path}: decoded {len(out)} of {cfg.frames} frames from frame {clip.start} "
                             f"(stride {cfg.stride}); the file is shorter than it says")
        return out

    def __getitem__(self, j: int) -> dict:
        i = self.indices[j]
        clip = self.clips[i]
        sample = self.dataset.samples[clip.video]
        video = self.real.prepare(self.frames(clip), self.dataset.cfg.resolution)
        captions = getattr(sample, "captions", ())
        return {"index": i, "video": to_item_video(torch.from_numpy(np.ascontiguousarray(video))),
                "label": getattr(sample, "label", -1), "text": captions[0] if captions else None}
