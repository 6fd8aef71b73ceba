"""PyAV decode/encode, the clip pipeline and the decode cache, on small real files written here."""

from __future__ import annotations

import os
import pickle
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from datamodules.cache import BAD, STORED, ClipCache
from datamodules.clips import ClipTiming, crop_resize, loop_frames, to_item_video
from datamodules.video_io import (
    DecodeError,
    VideoInfo,
    frame_index_pattern,
    probe,
    read_clip,
    read_frame_index,
    read_video,
    write_video,
)

N = 40  # frames per test video
FPS = 25  # MPEG-2 only takes standard rates

CONTAINERS = [".mp4", ".avi", ".mpg", ".mkv"]  # h264 in MP4, MPEG-4 in AVI, MPEG-2 in MPEG-PS, h264 in Matroska


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("vio")
    out = {suffix: write_video(root / f"v{suffix}", frame_index_pattern(N), fps=FPS) for suffix in CONTAINERS}
    frames_dir = root / "frames"
    frames_dir.mkdir()
    from PIL import Image

    for i, frame in enumerate(frame_index_pattern(N)):
        Image.fromarray(frame).save(frames_dir / f"img_{i + 1}.png")  # natural order: img_2 before img_10
    out["frames"] = frames_dir
    return out


@pytest.mark.parametrize("suffix", CONTAINERS + ["frames"])
def test_roundtrip_keeps_every_frame_in_order(videos, suffix):
    v = read_video(videos[suffix])
    assert v.dtype == np.uint8 and v.shape == (N, 48, 64, 3)
    assert read_frame_index(v) == (list(range(N)), False)
    info = probe(videos[suffix], folder_fps=FPS)
    assert (info.num_frames, info.fps, info.width, info.height) == (N, FPS, 64, 48)
    assert info.duration == pytest.approx(N / FPS, abs=1e-3)


def test_mpeg_ps_has_no_frame_count_and_probe_counts_it(videos):
    with av.open(str(videos[".mpg"])) as c:
        assert c.streams.video[0].frames == 0  # what real MPEG-PS files report
    assert probe(videos[".mpg"]).num_frames == N


@pytest.mark.parametrize("suffix", CONTAINERS + ["frames"])
@pytest.mark.parametrize("start,stride", [(0, 1), (3, 2), (17, 3), (31, 1)])
def test_read_clip_seeks_to_the_right_frames(videos, suffix, start, stride):
    clip = read_clip(videos[suffix], 8, start=start / FPS, stride=stride, folder_fps=FPS)
    want = [i for i in range(start, N, stride)][:8]
    assert read_frame_index(clip)[0] == want  # shorter when the video ends first


@pytest.mark.parametrize("suffix", [".mp4", ".mpg"])
def test_resampling_to_a_target_fps(videos, suffix):
    clip = read_clip(videos[suffix], 6, start=4 / FPS, step=1 / 12.5)  # 25 -> 12.5 fps: every 2nd frame
    assert read_frame_index(clip)[0] == [4, 6, 8, 10, 12, 14]
    clip = read_clip(videos[suffix], 6, start=4 / FPS, step=1 / 75)  # 3x upsampling: frame 4, 4.33, 4.67, 5, ...
    assert read_frame_index(clip)[0] == [4, 4, 5, 5, 5, 6]


def test_variable_frame_rate_takes_the_nearest_frame(tmp_path):
    times_ms = [0, 40, 80, 200, 240, 400, 440, 480, 600, 1000, 1040]
    frames = frame_index_pattern(len(times_ms))
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        for t, f in zip(times_ms, frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            c.mux(s.encode(frame))
        c.mux(s.encode())
    assert probe(path).num_frames == len(times_ms)
    # targets 0.0 .. 0.5 s every 0.1 s -> nearest frames at 0, .08, .2, .24, .4, .48
    assert read_frame_index(read_clip(path, 6, start=0.0, step=0.1))[0] == [0, 2, 3, 4, 5, 7]
    # from 0.45 s (a seek): .44, .6, .6, .6, 1.0, 1.0
    assert read_frame_index(read_clip(path, 6, start=0.45, step=0.1))[0] == [6, 8, 8, 8, 9, 9]


def test_gif_and_odd_sizes_and_torch_input(tmp_path):
    frames = torch.from_numpy(frame_index_pattern(6, 47, 63) // 36 * 36)  # rgb8 keeps multiples of 36 in red
    gif = write_video(tmp_path / "a.gif", frames, fps=10)
    v = read_video(gif)
    assert v.shape == (6, 47, 63, 3) and np.array_equal(v[..., 0], frames.numpy()[..., 0])
    mp4 = write_video(tmp_path / "odd.mp4", frames, fps=8)  # yuv420p needs even sizes: padded
    with av.open(str(mp4)) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.codec_context.pix_fmt, s.width, s.height) == ("h264", "yuv420p", 64, 48)
    assert not list(tmp_path.glob(".*tmp*"))  # temporary files moved into place
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", frames.float(), fps=8)
    with pytest.raises(ValueError, match="suffix"):
        write_video(tmp_path / "f.xyz", frames, fps=8)


@pytest.mark.parametrize("content", [b"", b"not a video at all" * 50])
def test_unreadable_files_raise_a_decode_error(tmp_path, content):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(DecodeError):
        probe(path)
    with pytest.raises(DecodeError):
        read_clip(path, 4)


def test_containers_are_closed(videos):
    fds = len(os.listdir("/proc/self/fd"))
    for i in range(30):
        read_clip(videos[".mp4"], 4, start=(i % 20) / FPS)
        probe(videos[".mpg"])
    assert len(os.listdir("/proc/self/fd")) <= fds + 2


# ------------------------------------------------------------------------------------ clip pipeline


def test_crop_resize_centre_and_offset():
    frames = np.zeros((2, 40, 80, 3), np.uint8)
    frames[:, :, :20] = 255  # a bright band in the left quarter
    centre = crop_resize(frames, 20)
    left = crop_resize(frames, 20, offset=(0.5, 0.0))
    assert centre.shape == (2, 20, 20, 3) and centre.dtype == torch.uint8
    assert centre.max() == 0  # the centre square [20, 60) misses the band
    assert left[:, :, :9].min() == 255 and left[:, :, 11:].max() == 0  # the filter blurs only the edge
    same = crop_resize(frames[:, :, 20:60], 40)  # already square at the target size: untouched
    assert torch.equal(same, torch.from_numpy(frames[:, :, 20:60]))


def test_antialiased_downsampling_averages():
    frames = np.zeros((1, 64, 64, 3), np.uint8)
    frames[:, ::2] = 255  # one-pixel stripes alias without an antialiasing filter
    out = crop_resize(frames, 8).float()
    assert (out - 127.5).abs().max() < 20


def test_item_range_layout_and_flip():
    clip = torch.from_numpy(frame_index_pattern(4, 32, 32))
    x = to_item_video(clip)
    assert x.shape == (3, 4, 32, 32) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    back = ((x + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert read_frame_index(back) == ([0, 1, 2, 3], False)
    flipped = ((to_item_video(clip, flip=True) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert read_frame_index(flipped) == ([0, 1, 2, 3], True)


def test_loop_frames():
    assert loop_frames(np.arange(3), 7).tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_clip_timing():
    info = VideoInfo(num_frames=40, fps=25.0, width=64, height=48, duration=40 / 25)
    t = ClipTiming.of(frames=8, stride=3, fps=None, source_fps=25.0)
    assert t.step == pytest.approx(3 / 25)
    assert t.fits(info) and t.max_start(info) == pytest.approx((39 - 21) / 25)
    assert t.start(0.0, info) == 0 and t.start(1.0, info) == pytest.approx(18 / 25)
    assert round(t.start(0.5, info) * 25) == 9  # snapped to a source frame
    assert not ClipTiming.of(frames=8, stride=6, fps=None, source_fps=25.0).fits(info)  # needs 43 frames
    assert ClipTiming.of(frames=8, stride=1, fps=5.0, source_fps=25.0).step == pytest.approx(0.2)


# ------------------------------------------------------------------------------------ decode cache


def test_clip_cache_store_reopen_and_pickle(tmp_path):
    key = {"dataset": "x", "resolution": 8}
    cache = ClipCache(tmp_path, "x", key, num_entries=3, clip_shape=(2, 8, 8, 3))
    assert cache.counts() == {"todo": 3, "stored": 0, "bad": 0}
    clip = np.random.default_rng(0).integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
    cache.put(1, clip)
    cache.mark_bad(2)
    cache.flush()
    again = pickle.loads(pickle.dumps(ClipCache(tmp_path, "x", key, 3, (2, 8, 8, 3))))  # same folder, maps reopened
    assert again.dir == cache.dir and again.get(0) is None and np.array_equal(again.get(1), clip)
    assert again.status(1) == STORED and again.status(2) == BAD
    assert np.load(cache.dir / "clips.npy", mmap_mode="r").shape == (3, 2, 8, 8, 3)  # plain .npy
    other = ClipCache(tmp_path, "x", {**key, "resolution": 16}, 3, (2, 16, 16, 3))
    assert other.dir != cache.dir  # a new key never reads a stale cache
