"""The `stylegan-v` evaluation protocol against StyleGAN-V's own metric code.

End-to-end equality (`test_fvd_equals_stylegan_v_reference`): our whole pipeline (a folder dataset of
real videos stored as PNG frame folders, `eval.protocol=stylegan-v`: StyleGAN-V's video order, short-video
rule and DataLoader-worker offsets, PIL LANCZOS shorter side + centre crop, JPEG quality-75 round trip,
quantisation, the `i3d_torchscript` detector under TF32-off, biased statistics, scipy sqrtm) gives the FVD
that StyleGAN-V's code gives on the same videos with the same detector file.

How the golden values were produced (once, outside the project; the runner script is not in the repo):
  * reference: universome/stylegan-v at commit 3fecd69c602e1cda204357201461c0fb0a634909 (`git archive`),
    run with this machine's Python 3.11.7, torch 2.13.0+cpu, numpy 2.4.6, scipy 1.17.1, Pillow 13.0.0, omegaconf.
  * inputs: the runner imported this module and wrote `real_videos(...)` as PNG frame folders,
    `generated_videos(...)` as PNG frame folders (for stride 2: 32 frames, the clip on the even ones),
    and `build_detector(...)`: a small TorchScript stand-in with i3d_torchscript.pt's call signature
    `(x, rescale, resize, return_features)` on uint8 (B, 3, T, H, W) and its output layout (B, d) (d = 8
    instead of 400, so that a few dozen videos give full-rank covariances), formula weights.
  * data preparation ran StyleGAN-V's own `src/scripts/convert_videos_to_frames.convert_videos_to_frames`
    (target_size=128, num_workers=1, video_ext mp4) over empty `<name>.mp4` marker files, with two shims:
    `moviepy.editor.VideoFileClip` returned our PNG frames (fps 25) instead of decoding a file (no moviepy
    here), and `torchvision.transforms` was the pure-Python transforms package of the torchvision 0.8.2
    wheel of StyleGAN-V's environment.yaml (its resize / center_crop code, unmodified; the compiled
    parts of torchvision are not needed). So its LANCZOS resize, torchvision-0.8.2 centre crop and
    JPEG writing (`frame.save(..., q=95)`, i.e. Pillow's default quality 75) all ran as written.
  * metric: `src.metrics.frechet_video_distance.compute_fvd(opts, max_real=26, num_gen=24, num_frames=16,
    subsample_factor=s)` unmodified, with `MetricOptions(device=cpu, cache=False, generator_as_dataset=True)`,
    the real and generated `training.dataset.VideoFramesFolderDataset` kwargs of
    `calc_metrics_for_dataset.py` (cfg max_num_frames=10000, resolution=128, xflip=False), its DataLoader
    with 3 workers, and the stand-in detector placed in dnnlib's download cache under the md5 of the
    hard-coded i3d_torchscript URL (so `get_feature_detector` loaded it through its normal path). The
    only intervention: `torch.manual_seed(CLIP_SEED)` right before `compute_fvd` (StyleGAN-V leaves torch
    unseeded, so its offsets are otherwise random), and a logging wrapper around
    `VideoFramesFolderDataset._load_raw_frames` that recorded which frames each real item read
    (REFERENCE_CLIPS_*).
  * tolerance reached: our FVD equals the reference's to a relative 6.4e-14 (stride 1) and 2.5e-14 (stride 2)
    on this machine (the uint8 clips, hence the features, are identical; the rest is float64 summation order).
    The test allows 1e-6 relative for other CPUs' float32 convolution kernels. Any one deviation from the
    reference moves the FVD by far more: torchvision >= 0.9's crop rounding 2e-3..5e-3, no JPEG 4e-2..5e-2,
    JPEG quality 95 4e-3..6e-3, the area resize 4e-3..7e-3, another clip seed 0.2..0.5 (relative).
What is NOT reproduced here: decoding real video files (StyleGAN-V's converter decodes with moviepy/ffmpeg,
we with PyAV; the test uses frame folders so both sides see the same pixels), the real i3d_torchscript.pt
and c3d_ucf101.pt weights, CUDA, and multi-GPU runs (StyleGAN-V's rank interleaving and per-rank workers).
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evaluation.stylegan_v import RealClips, jpeg_round_trip, lanczos_center_crop, loader_base_seed, select, video_name

RES, FRAMES, N_REAL, N_GEN, CLIP_SEED, FEATURES = 128, 16, 26, 24, 2024, 8
REFERENCE_COMMIT = "3fecd69c602e1cda204357201461c0fb0a634909"

# StyleGAN-V's compute_fvd on the inputs below (see the module docstring): stride -> FVD
REFERENCE_FVD = {1: 0.022664471605195243, 2: 0.0240879560006139}
# the real clips its dataset read, in order: (frame folder name, first frame)
REFERENCE_CLIPS = {
    1: [
        ("v_ApplyEyeMakeup_g10_c1", 20), ("v_ApplyEyeMakeup_g10_c2", 0), ("v_ApplyEyeMakeup_g1_c1", 5),
        ("v_ApplyEyeMakeup_g1_c2", 6), ("v_ApplyEyeMakeup_g2_c1", 0), ("v_Basketball_g10_c1", 2),
        ("v_Basketball_g10_c2", 16), ("v_Basketball_g1_c1", 12), ("v_Basketball_g1_c2", 5),
        ("v_Basketball_g2_c1", 3), ("v_Basketball_g2_c2", 0), ("v_Zumba_g10_c1", 3), ("v_Zumba_g10_c2", 11),
        ("v_Zumba_g1_c1", 4), ("v_Zumba_g2_c1", 1), ("v_Zumba_g2_c2", 1), ("v_apply_g10_c1", 0),
        ("v_apply_g10_c2", 18), ("v_apply_g1_c1", 10), ("v_apply_g1_c2", 3), ("v_apply_g2_c2", 3),
        ("v_basket_1_g1_c1", 4), ("v_basket_g10_c1", 7), ("v_basket_g10_c2", 11), ("v_basket_g1_c2", 1),
        ("v_basket_g2_c1", 0),
    ],
    2: [
        ("v_ApplyEyeMakeup_g10_c1", 5), ("v_ApplyEyeMakeup_g1_c1", 0), ("v_Basketball_g10_c1", 2),
        ("v_Basketball_g10_c2", 0), ("v_Basketball_g1_c1", 0), ("v_Basketball_g1_c2", 0), ("v_Basketball_g2_c1", 3),
        ("v_Zumba_g10_c1", 0), ("v_Zumba_g10_c2", 0), ("v_Zumba_g2_c1", 0), ("v_apply_g10_c2", 8),
        ("v_apply_g2_c2", 5), ("v_basket_1_g1_c1", 1), ("v_basket_g10_c1", 0), ("v_basket_g1_c2", 2),
        ("v_basket_g2_c2", 0),
    ],
}
# The features are fp32 network outputs whose last bits depend on the CPU's BLAS path (AVX2 vs AVX-512), and an
# FVD this small is a difference of near-equal terms: an AVX2-only machine gave 1.3e-6 relative for stride 2.
REL_TOL = 1e-5

# ------------------------------------------------------------------------------------ fixed inputs

CLASSES = ("ApplyEyeMakeup", "Basketball", "apply", "basket", "Zumba")  # code-point order != natural order
SIZES = ((144, 182), (182, 144), (128, 128), (150, 200), (96, 120))  # (H, W): odd/even crop margins, portrait,
COUNTS = (33, 31, 20, 15, 36, 17, 40, 32, 34, 16, 38)  # already 128, upscaled; 15: short; 31: short at stride 2


def video_specs() -> list[tuple[str, int, tuple[int, int]]]:
    """(folder name, frames, (H, W)) of the 30 real videos."""
    specs, k = [], 0
    for c in CLASSES:
        for g in (1, 2, 10):
            for clip in (1, 2):
                name = "v_basket#1_g1_c1" if (c, g, clip) == ("basket", 1, 1) else f"v_{c}_g{g}_c{clip}"
                specs.append((name, COUNTS[k % len(COUNTS)], SIZES[(3 * k) % len(SIZES)]))
                k += 1
    return specs


def frame_pixels(v: int, t: int, h: int, w: int) -> np.ndarray:
    """uint8 (h, w, 3) frame t of video v: integer arithmetic only (no RNG), so it is the same everywhere."""
    y, x = np.arange(h)[:, None], np.arange(w)[None, :]
    cx, cy, r = (7 + 11 * v + 5 * t) % w, (5 + 3 * v + 3 * t) % h, 9 + v % 7
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < r * r).astype(np.int64)
    return np.stack([((1 + v % 3) * x + (2 + v % 5) * y + 9 * t * (c + 1) + 60 * c + 90 * disc) % 256
                     for c in range(3)], -1).astype(np.uint8)


def real_videos(root: Path) -> Path:
    """Write the real videos as PNG frame folders root/<name>/0000.png ..."""
    from PIL import Image

    for v, (name, n, (h, w)) in enumerate(video_specs()):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for t in range(n):
            Image.fromarray(frame_pixels(v, t, h, w)).save(d / f"{t:04d}.png", compress_level=1)
    return root


def generated_videos(n: int = N_GEN) -> Tensor:
    """uint8 (n, 3, FRAMES, RES, RES): the 'generated' set."""
    return torch.from_numpy(np.stack([np.stack([frame_pixels(100 + 7 * i, t, RES, RES) for t in range(FRAMES)])
                                      for i in range(n)])).permute(0, 4, 1, 2, 3).contiguous()


def hash_uniform(n: int, key: int) -> np.ndarray:
    """n numbers in [0, 1) from splitmix64 of (key, 0..n-1): exact integer arithmetic."""
    z = np.arange(n, dtype=np.uint64) + np.uint64((key + 1) * 0x9E3779B97F4A7C15 % 2**64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0 ** 53


class StandInI3D(nn.Module):
    """i3d_torchscript.pt's interface on a tiny network: uint8 (B, 3, T, H, W) -> (B, d) features."""

    def __init__(self, dim: int = FEATURES) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 6, kernel_size=(3, 5, 5), stride=(1, 3, 3))
        self.head = nn.Linear(6 * 2 * 3 * 3, dim)
        with torch.no_grad():
            for k, p in enumerate(self.parameters()):  # weights from an integer hash: no RNG, the same everywhere
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.from_numpy((hash_uniform(p.numel(), k) * 2 - 1) * 3 ** 0.5 / fan_in ** 0.5).view_as(p))

    def forward(self, x: Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> Tensor:
        x = x.float()
        if rescale:
            x = x / 255.0 * 2.0 - 1.0
        if resize:
            x = F.interpolate(x, size=[int(x.shape[2]), 32, 32], mode="trilinear", align_corners=False)
        h = F.adaptive_avg_pool3d(torch.relu(self.conv(x)), [2, 3, 3]).flatten(1)
        logits = self.head(h)
        if return_features:
            return logits
        return logits.softmax(-1)


def build_detector(path: Path) -> Path:
    torch.jit.save(torch.jit.script(StandInI3D().eval()), str(path))
    return path


# ------------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stylegan_v")
    return {"real": real_videos(root / "real"), "detector": build_detector(root / "i3d_standin.pt"), "tmp": root}


def _cfg(data, stride: int, *extra: str):
    from benchmarks.config import load_config

    tmp = data["tmp"]
    return load_config(["dataset=folder", f"dataset.root={data['real']}", f"dataset.resolution={RES}",
                        f"dataset.frames={FRAMES}", f"dataset.stride={stride}", f"dataset.cache_dir={tmp / 'clips'}",
                        "eval.protocol=stylegan-v", "eval.metrics=[fvd]", f"eval.num_samples={N_GEN}",
                        f"eval.num_real={N_REAL}", f"eval.clip_seed={CLIP_SEED}", "eval.batch_size=8",
                        f"eval.paths.i3d_torchscript={data['detector']}", f"cache_dir={tmp / 'cache'}", *extra])


@pytest.mark.parametrize("stride", [1, 2])
def test_selection_equals_reference_clips(data, stride):
    """Which videos, in which order, from which frame: exactly the clips StyleGAN-V's dataset read."""
    from benchmarks.common import build_datamodule

    if REFERENCE_CLIPS[stride] is None:
        pytest.skip("no reference recorded")
    cfg = _cfg(data, stride)
    ds = build_datamodule(cfg).dataset("train")
    clips = RealClips.of(cfg.eval).clips(ds, N_REAL, CLIP_SEED)
    assert [(video_name(ds.samples[c.video].path), c.start) for c in clips] == [tuple(c) for c in REFERENCE_CLIPS[stride]]


@pytest.mark.parametrize("stride", [1, 2])
def test_fvd_equals_stylegan_v_reference(data, stride):
    from benchmarks.common import build_datamodule
    from evaluation.protocol import evaluate_videos

    if REFERENCE_FVD[stride] is None:
        pytest.skip("no reference recorded")
    cfg = _cfg(data, stride)
    dm = build_datamodule(cfg)
    gen = generated_videos()
    out = evaluate_videos([(gen[i:i + 8], None, None) for i in range(0, len(gen), 8)], dm, cfg,
                          cache_dir=data["tmp"] / f"cache{stride}")
    assert out["eval_protocol"] == "stylegan-v (modified: metrics, num_samples, num_real)"
    assert out["n_real"] == len(REFERENCE_CLIPS[stride]) and out["n_gen"] == N_GEN
    assert out["fvd_sqrt_method"] == "sqrtm"
    assert out["fvd"] == pytest.approx(REFERENCE_FVD[stride], rel=REL_TOL)
    # the cached statistics give the same number
    again = evaluate_videos([(gen, None, None)], dm, cfg, cache_dir=data["tmp"] / f"cache{stride}")
    assert again["real_stats_cached"] and again["fvd"] == pytest.approx(out["fvd"], rel=1e-12)


def test_offsets_are_those_of_torch_dataloader_workers():
    """select()'s model of the offsets against a real DataLoader with StyleGAN-V's 3 workers and batch size."""

    class Offsets(torch.utils.data.Dataset):  # as VideoFramesFolderDataset.__getitem__ draws them
        def __init__(self, lengths, need, stride):
            self.lengths, self.need, self.stride = lengths, need, stride

        def __len__(self):
            return len(self.lengths)

        def __getitem__(self, i):
            return random.randint(0, self.lengths[i] - self.need + self.stride - 1)

    lengths = [16 + (7 * i) % 23 for i in range(30)]
    names = [f"v{i:02d}" for i in range(30)]
    want = select(names, lengths, 27, 16, 1, 128, seed=7)  # batch 128 // 16 = 8: workers 0, 1, 2, 0
    torch.manual_seed(7)
    loader = torch.utils.data.DataLoader(Offsets(lengths, 16, 1), sampler=[c.video for c in want], batch_size=8,
                                         num_workers=3)
    got = [int(o) for batch in loader for o in batch]
    assert got == [c.start for c in want]
    assert len({c.start for c in want}) > 5  # not all the same


def test_selection_order_short_videos_and_first_n():
    names = ["v_b", "V_z", "v_a10", "v_a2", "v_c"]
    lengths = [40, 40, 40, 40, 31]
    clips = select(names, lengths, 3, 16, 2, 256, seed=0)  # needs 16 * 2 = 32 frames: v_c (31) is dropped
    assert [names[c.video] for c in clips] == ["V_z", "v_a10", "v_a2"]  # code points; the first 3
    assert all(0 <= c.start <= 40 - 32 + 1 for c in clips)  # randint(0, L - n*s + s - 1)
    assert select(names, lengths, 0, 16, 2, 256, seed=0)[:3] == clips  # later clips don't move earlier ones
    assert video_name(Path("/x/v_a#b.avi")) == "v_a_b"
    with pytest.raises(ValueError, match="resolution"):
        select(names, lengths, 3, 16, 1, 64, seed=0)
    assert loader_base_seed(5) == torch.empty((), dtype=torch.int64).random_(generator=torch.Generator().manual_seed(5))


def test_lanczos_center_crop_as_torchvision_0_8_2():
    from PIL import Image

    frame = np.stack([frame_pixels(3, 0, 144, 182)])
    out = lanczos_center_crop(frame, 128)  # shorter side 144 -> 128, longer int(128 * 182 / 144) = 161
    wide = np.asarray(Image.fromarray(frame[0]).resize((161, 128), getattr(Image, "Resampling", Image).LANCZOS))
    assert (out[0] == wide[:, 17:145]).all()  # margin 33: int(34 * 0.5) = 17 (torchvision 0.8.2)
    assert (lanczos_center_crop(frame, 128, half_up=False)[0] == wide[:, 16:144]).all()  # round(16.5) = 16 (>= 0.9)
    square = np.stack([frame_pixels(1, 0, 128, 140)])
    assert (lanczos_center_crop(square, 128)[0] == square[0, :, 6:134]).all()  # shorter side already 128: no resample


def test_pillow_ignores_q_so_stylegan_v_frames_are_quality_75():
    from PIL import Image

    im = Image.fromarray(frame_pixels(2, 1, 40, 48))

    def encode(**kw):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", **kw)
        return buf.getvalue()

    assert encode(q=95) == encode(quality=75) != encode(quality=95)
    back = jpeg_round_trip(np.asarray(im)[None], 75)[0]
    assert (back == np.asarray(Image.open(io.BytesIO(encode(q=95))))).all()


def test_options_are_validated_and_in_the_cache_key(data):
    from benchmarks.common import build_datamodule
    from evaluation.detectors import load_detector
    from evaluation.real_stats import protocol_key, real_protocol

    with pytest.raises(ValueError, match="real_selection=stylegan-v"):
        RealClips("seeded", "lanczos-center-crop").validate()
    with pytest.raises(ValueError, match="real_resize"):
        RealClips("stylegan-v", "bicubic").validate()
    cfg = _cfg(data, 1)
    det = load_detector("i3d_torchscript", data["detector"])
    keys = set()
    for opts in (RealClips(), RealClips("stylegan-v", "lanczos-center-crop", 75),
                 RealClips("stylegan-v", "lanczos-center-crop-tv010", 75), RealClips("stylegan-v", "lanczos-center-crop"),
                 RealClips("stylegan-v", "area")):
        proto = real_protocol(cfg.dataset, "train", N_REAL, CLIP_SEED, det,
                              real_clips=None if opts.is_default else opts.protocol())
        assert ("real_clips" in proto) != opts.is_default  # the default key is unchanged
        keys.add(protocol_key(proto))
    assert len(keys) == 5
    ds = build_datamodule(cfg).dataset("train")
    assert len(RealClips.of(cfg.eval).clips(ds, 1000, CLIP_SEED)) == 27  # capped at the long-enough videos


def test_tf32_is_off_inside_the_stylegan_v_detectors(data):
    from evaluation.detectors import load_detector

    seen = []

    class Probe(nn.Module):
        def forward(self, x, rescale: bool = False, resize: bool = False, return_features: bool = False):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            return torch.zeros(len(x), FEATURES)

    det = load_detector("i3d_torchscript", data["detector"], cache=False)
    det.net = Probe()
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        det.features(torch.zeros(1, 3, 10, 8, 8, dtype=torch.uint8))
        assert seen == [(False, False)]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_preset_sets_the_protocol_and_leaves_the_default_alone():
    from benchmarks.config import load_config
    from evaluation.config import protocol_label

    cfg = load_config(["eval.protocol=stylegan-v"])
    e = cfg.eval
    assert (e.detector, e.is_detector, e.covariance, e.num_samples, e.num_real) == (
        "i3d_torchscript", "c3d_torchscript", "biased", 2048, 2048)
    assert (e.real_selection, e.real_resize, e.real_jpeg_quality) == ("stylegan-v", "lanczos-center-crop", 75)
    assert protocol_label(e) == "stylegan-v"
    assert protocol_label(load_config(["eval.protocol=stylegan-v", "eval.real_jpeg_quality=null"]).eval) == (
        "stylegan-v (modified: real_jpeg_quality)")
    d = load_config([]).eval
    assert (d.protocol, d.real_selection, d.real_resize, d.real_jpeg_quality) == ("shapes", "seeded", "area", None)
