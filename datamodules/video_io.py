"""Video I/O on PyAV: probe, decode a clip by seeking, decode frame folders, encode mp4/GIF.

Time, not frame counts, is the ground truth here. Real files often do not know their frame
count (`stream.frames == 0` in MPEG-PS and some AVI) and may have a variable frame rate, so a
clip is a list of target times `t_k = start + k * step` (seconds from the stream's first
frame) and each target takes the decoded frame nearest to it. For a constant-rate file with
`step = stride / fps` this is exactly source frames `s, s + stride, s + 2 stride, ...`.

Every container is closed (`with av.open(...)`); decoding runs on `threads` FFmpeg threads
(frame + slice threading when > 1; see `_open_stream` for why the datasets default to 1).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".gif", ".flv", ".wmv")

# suffix -> (container format, codec, pixel format) for write_video
ENCODERS = {
    ".mp4": ("mp4", "libx264", "yuv420p"),  # browsers need yuv420p, which needs even sizes
    ".mkv": ("matroska", "libx264", "yuv420p"),
    ".avi": ("avi", "mpeg4", "yuv420p"),
    ".mpg": ("mpeg", "mpeg2video", "yuv420p"),  # MPEG-PS; MPEG-2 only allows standard rates (24, 25, 30, ...)
    ".mpeg": ("mpeg", "mpeg2video", "yuv420p"),
    ".gif": ("gif", "gif", "rgb8"),
}

# Formats whose parser interpolates timestamps: after a seek they can be off by half a frame,
# so these are decoded from the start (correct, slower; real datasets mostly ship AVI/MP4).
SEEK_UNRELIABLE = frozenset({"mpeg", "mpegts", "mpegvideo", "m4v", "h264", "hevc"})
DecodeError = (av.FFmpegError, OSError, ValueError, EOFError, RuntimeError)  # what a bad file may raise


@dataclass(frozen=True)
class VideoInfo:
    """What a clip sampler needs to know about a file."""

    num_frames: int  # frames in the stream (counted by demuxing when the container does not say)
    fps: float  # average frame rate
    width: int
    height: int
    duration: float  # seconds from the first frame to the end of the last (num_frames / fps at constant rate)


# ------------------------------------------------------------------------------------------ encode


def write_video(path: str | Path, frames, fps: int = 8, *, crf: int = 18) -> Path:
    """Encode uint8 frames (T, H, W, 3) (numpy or torch) to `path`; the codec follows the suffix.

    .mp4/.mkv: libx264 yuv420p (odd sizes are padded to even by repeating the edge); .gif: GIF;
    .avi: MPEG-4 part 2; .mpg: MPEG-2 program stream. The file is written under a temporary
    name and moved into place, so a crash never leaves a half-written video behind.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in ENCODERS:
        raise ValueError(f"cannot write {path}: unknown suffix {suffix!r}; supported: {sorted(ENCODERS)}")
    if hasattr(frames, "detach"):  # a torch tensor, without importing torch here
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"write_video wants uint8 frames (T, H, W, 3), T > 0; got {frames.dtype} {frames.shape}")
    fmt, codec, pix_fmt = ENCODERS[suffix]
    if pix_fmt == "yuv420p":  # chroma subsampling needs even sizes: repeat the last row / column
        t, h, w, _ = frames.shape
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{suffix}")
    try:
        with av.open(str(tmp), mode="w", format=fmt) as container:
            options = {"crf": str(crf)} if codec == "libx264" else {}
            stream = container.add_stream(codec, rate=fps, options=options)
            stream.height, stream.width = frames.shape[1:3]
            stream.pix_fmt = pix_fmt
            if codec in ("mpeg4", "mpeg2video"):
                stream.bit_rate = 8_000_000  # default 200 kb/s smears small test patterns
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
            container.mux(stream.encode())  # flush the encoder
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------------------ decode


def _open_stream(container: av.container.InputContainer, threads: int) -> av.video.stream.VideoStream:
    """The first video stream, decoding on `threads` threads (0: FFmpeg picks; > 1: frame + slice threads).

    Measured on 320x240 clips of 16 frames (2 busy cores): one thread is fastest, because each
    frame thread opens its own decoder context and adds a frame of latency, and DataLoader
    workers already decode in parallel. Threads pay off for large frames and few workers.
    """
    if not container.streams.video:
        raise ValueError(f"{container.name}: no video stream")
    stream = container.streams.video[0]
    if threads != 1:
        stream.thread_type = "AUTO"
    stream.thread_count = threads
    return stream


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or float(rate) <= 0:
        raise ValueError(f"{stream.container.name}: frame rate unknown")
    return float(rate)


def probe(path: str | Path, *, count: bool = False, folder_fps: float = 25.0) -> VideoInfo:
    """Frame count, rate and size of a video file or a folder of frame images.

    When the container does not know its frame count (`stream.frames == 0`) the packets are
    counted by demuxing (cheap: nothing is decoded); `count=True` always counts. A frame folder
    has no clock of its own: it plays at `folder_fps`. Raises on a file that cannot be opened
    (zero-byte, not a video, truncated header).
    """
    path = Path(path)
    if path.is_dir():
        files = list_frame_files(path)
        if not files:
            raise ValueError(f"{path}: folder holds no frame images ({', '.join(IMAGE_SUFFIXES)})")
        h, w = read_image(files[0]).shape[:2]
        return VideoInfo(num_frames=len(files), fps=folder_fps, width=w, height=h, duration=len(files) / folder_fps)
    with av.open(str(path)) as container:
        stream = _open_stream(container, threads=1)
        fps = _stream_fps(stream)
        n = int(stream.frames or 0)
        # a container that knows its frame count knows its duration; otherwise the duration
        # is often a bitrate estimate (MPEG-PS), so trust the counted frames instead
        duration = float(stream.duration * stream.time_base) if n > 0 and stream.duration else 0.0
        if n <= 0 or count:
            n = sum(1 for p in container.demux(stream) if p.size > 0)  # flush packets have size 0
        if n <= 0:
            raise ValueError(f"{path}: video stream holds no frames")
        return VideoInfo(num_frames=n, fps=fps, width=stream.codec_context.width, height=stream.codec_context.height,
                         duration=duration or n / fps)


def _first_time(container, stream) -> float:
    """Seconds at which the stream's first frame is shown (MPEG-PS starts near 0.5 s, not 0)."""
    if stream.start_time is not None:
        return float(stream.start_time * stream.time_base)
    if container.start_time is not None:
        return container.start_time / av.time_base
    return 0.0


def _select(frames_iter, targets: list[float], fps: float):
    """Yield (k, frame) pairs: for each target time the decoded frame nearest to it.

    frames_iter yields (time, frame) in presentation order. A frame with an unknown time is
    placed 1 / fps after its predecessor. After the last frame, targets within one frame
    interval are nearer to it than to a frame that would follow, and take it.
    """
    k, prev, prev_t = 0, None, None
    for t, frame in frames_iter:
        if t is None:
            t = (prev_t + 1.0 / fps) if prev_t is not None else 0.0
        # a frame within float noise of the target reaches it (no need to decode the next one to decide)
        while k < len(targets) and t >= targets[k] - 1e-6:
            near_prev = prev is not None and targets[k] - prev_t <= t - targets[k]  # ties go to the earlier frame
            yield k, (prev if near_prev else frame)
            k += 1
        if k == len(targets):
            return
        prev, prev_t = frame, t
    while prev is not None and k < len(targets) and targets[k] < prev_t + 0.5 / fps:
        yield k, prev
        k += 1


def read_clip(path: str | Path, num_frames: int, *, start: float = 0.0, step: float | None = None,
              stride: int = 1, threads: int = 1, folder_fps: float = 25.0) -> np.ndarray:
    """Decode `num_frames` frames at times `start + k * step` (seconds from the first frame).

    step defaults to `stride / fps` (every `stride`-th source frame). Seeks to the key frame
    before `start` instead of decoding from the beginning. Returns uint8 (T', H, W, 3) with
    T' <= num_frames: fewer when the video ends first (the caller decides to loop or skip).
    Raises on unreadable data. A folder of frame images plays at `folder_fps`.
    """
    path = Path(path)
    if path.is_dir():
        step = stride / folder_fps if step is None else step
        return read_frame_folder(path, [round((start + k * step) * folder_fps) for k in range(num_frames)])
    with av.open(str(path)) as container:
        stream = _open_stream(container, threads)
        fps = _stream_fps(stream)
        step = stride / fps if step is None else step
        t0 = _first_time(container, stream)
        targets = [t0 + start + k * step for k in range(num_frames)]
        tb = float(stream.time_base)
        if start > 0.5 / fps and container.format.name not in SEEK_UNRELIABLE:
            # seek to the key frame at or before the first target; some demuxers land after it
            container.seek(int((targets[0] - 0.5 / fps) / tb), stream=stream, backward=True, any_frame=False)
        out = _decode_selected(container, stream, targets, fps, tb)
        if out is None:  # the seek overshot the first target: decode from the beginning instead
            container.seek(0, stream=stream, backward=True, any_frame=False)
            out = _decode_selected(container, stream, targets, fps, tb, check_overshoot=False)
    return out


def _decode_selected(container, stream, targets, fps, tb, check_overshoot: bool = True) -> np.ndarray | None:
    def timed():
        first = True
        for frame in container.decode(stream):
            t = None if frame.pts is None else frame.pts * tb
            if first and check_overshoot and t is not None and t > targets[0] + 0.5 / fps:
                raise _Overshoot
            first = False
            yield t, frame

    # One reformatter (one SwsContext) for the clip: `frame.to_ndarray(format=...)` builds a new
    # one per frame, which measured ~3x slower than the whole decode of a 320x240 frame.
    rgb = VideoReformatter()
    arrays, last = [], None
    try:
        for _, frame in _select(timed(), targets, fps):
            if frame is not last:  # picks are in order: a frame picked twice (step < 1 / fps) converts once
                last, array = frame, rgb.reformat(frame, format="rgb24").to_ndarray()
            arrays.append(array)
    except _Overshoot:
        return None
    if not arrays:
        return np.zeros((0, stream.codec_context.height, stream.codec_context.width, 3), np.uint8)
    return np.stack(arrays)


class _Overshoot(Exception):
    pass


def read_video(path: str | Path, threads: int = 1) -> np.ndarray:
    """Every frame of a video file, uint8 (T, H, W, 3) (small files and tests only)."""
    path = Path(path)
    if path.is_dir():
        return read_frame_folder(path, range(len(list_frame_files(path))))
    with av.open(str(path)) as container:
        stream = _open_stream(container, threads)
        rgb = VideoReformatter()
        return np.stack([rgb.reformat(f, format="rgb24").to_ndarray() for f in container.decode(stream)])


# ------------------------------------------------------------------------------------ frame folders


def natural_key(name: str) -> list:
    return [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", name)]


def list_frame_files(folder: str | Path) -> list[Path]:
    """Image files of a frame folder in natural order (frame2 before frame10)."""
    files = [p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(files, key=lambda p: natural_key(p.name))


def read_image(path: str | Path) -> np.ndarray:
    """One image as uint8 (H, W, 3)."""
    from PIL import Image  # Pillow ships with matplotlib; imported here to keep `import datamodules` light

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_frame_folder(folder: str | Path, indices) -> np.ndarray:
    """Frames `indices` of a frame folder as uint8 (T', H, W, 3); indices past the end are dropped."""
    files = list_frame_files(folder)
    indices = [i for i in indices if 0 <= i < len(files)]
    cache: dict[int, np.ndarray] = {}
    for i in indices:
        if i not in cache:
            cache[i] = read_image(files[i])
    if not indices:
        return np.zeros((0, 1, 1, 3), np.uint8)
    return np.stack([cache[i] for i in indices])


# ------------------------------------------------------------------------------ test patterns


def frame_index_pattern(num_frames: int, height: int = 48, width: int = 64) -> np.ndarray:
    """uint8 (T, H, W, 3) frames that carry their own index, robust to lossy codecs and resizing.

    Top half: gray patches 8 * (i % 32) + 4 (left) and 8 * (i // 32) + 4 (right); bottom half:
    light on the left, dark on the right (so a mirror image is detectable). For tests and benchmarks.
    """
    if num_frames > 1024:
        raise ValueError("frame_index_pattern encodes at most 1024 frames")
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        frames[i, : height // 2, : width // 2] = 8 * (i % 32) + 4
        frames[i, : height // 2, width // 2:] = 8 * (i // 32) + 4
        frames[i, height // 2:, : width // 2] = 220
        frames[i, height // 2:, width // 2:] = 30
    return frames


def read_frame_index(frames: np.ndarray) -> tuple[list[int], bool]:
    """(frame indices, mirrored) read back from frame_index_pattern frames, uint8 (T, H, W, 3), any size."""
    frames = np.asarray(frames).astype(np.int64)
    _, h, w, _ = frames.shape
    top, bottom, left, right = h // 4, 3 * h // 4, w // 4, 3 * w // 4
    lo = np.rint((frames[:, top, left].mean(-1) - 4) / 8).astype(int)
    hi = np.rint((frames[:, top, right].mean(-1) - 4) / 8).astype(int)
    mirrored = bool(frames[0, bottom, left].mean() < frames[0, bottom, right].mean())
    if mirrored:
        lo, hi = hi, lo
    return (hi * 32 + lo).tolist(), mirrored
