"""Issue #10 protocol fixes: consistent Fréchet regularisation, the CFG scale convention, honest protocol labels,
a real-statistics key that covers the data's content, and rank 0 deciding the cache under DDP."""

from __future__ import annotations

import json
import os
import warnings
from datetime import timedelta
from pathlib import Path

import mpmath
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import evaluation.frechet as fr
import evaluation.real_stats as rs
from datamodules.base import VideoDataModule
from datamodules.files import CorruptVideoWarning
from datamodules.folder import FolderDataset
from datamodules.shapes import ShapesConfig
from datamodules.video_io import frame_index_pattern, write_video
from evaluation.config import EvalConfig
from evaluation.detectors import load_detector
from evaluation.distributed import broadcast_from_rank0
from evaluation.frechet import GaussianStats, frechet
from evaluation.metrics import FVD
from evaluation.protocol import evaluate_videos
from methods.diffusion import GUIDANCE_CONVENTION

FRAMES, RES = 16, 32


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on a shared CPU
    yield
    torch.set_num_threads(threads)


# --- 1. Fréchet fallback: the whole distance is regularised -------------------------------------------------


def _fail_first(monkeypatch, n: int) -> list:
    """Make the first n `_sqrtm_trace` calls (plain, then eps, 10 eps, ...) report an unusable sqrtm."""
    real, calls = fr._sqrtm_trace, []

    def flaky(a):
        calls.append(a)
        return None if len(calls) <= n else real(a)

    monkeypatch.setattr(fr, "_sqrtm_trace", flaky)
    return calls


def _mp_frechet(mu1, s1, mu2, s2, eps: float) -> mpmath.mpf:
    """d^2 between N(mu1, S1 + eps I) and N(mu2, S2 + eps I) with 50 significant digits (mpmath eigsy):
    tr((A B)^1/2) = sum sqrt(eig(A^1/2 B A^1/2)) for symmetric positive definite A, B."""
    with mpmath.workdps(50):
        d = len(mu1)
        a = mpmath.matrix(s1.tolist()) + eps * mpmath.eye(d)
        b = mpmath.matrix(s2.tolist()) + eps * mpmath.eye(d)
        w, q = mpmath.eigsy(a)
        ra = q * mpmath.diag([mpmath.sqrt(x) for x in w]) * q.T
        m = ra * b * ra
        ev, _ = mpmath.eigsy((m + m.T) / 2)
        tr = lambda x: sum(x[i, i] for i in range(d))  # noqa: E731
        diff = sum((mpmath.mpf(float(x)) - mpmath.mpf(float(y))) ** 2 for x, y in zip(mu1, mu2))
        return diff + tr(a) + tr(b) - 2 * sum(mpmath.sqrt(max(x, 0)) for x in ev)


@pytest.mark.parametrize("failures", [1, 3])
def test_fallback_regularises_traces_too_and_matches_a_50_digit_reference(monkeypatch, failures):
    """Singular covariances (N = 4 < d = 6), sqrtm forced to fail `failures` times: the value is the distance
    between the eps-shifted Gaussians to 1e-9 relative (mpmath, 50 digits); the former formula (eps only inside
    the square root) is off by about 2 d eps, far outside that tolerance."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 6)), rng.normal(size=(4, 6)) * 1.3 + 0.2
    (mu1, s1), (mu2, s2) = fr.feature_stats(x), fr.feature_stats(y)
    calls = _fail_first(monkeypatch, failures)
    got = frechet(mu1, s1, mu2, s2)
    scale = max(np.diagonal(s1).max(), np.diagonal(s2).max(), 1.0)
    assert got.method == "sqrtm+eps" and len(calls) == failures + 1
    assert got.fallback_eps == pytest.approx(1e-6 * 10 ** (failures - 1) * scale, rel=1e-12)
    ref = float(_mp_frechet(mu1, s1, mu2, s2, got.fallback_eps))
    assert got.value == pytest.approx(ref, rel=1e-9, abs=1e-12)  # reached: 3e-12 (1 failure), 5e-13 (3)
    biased = got.value - 2 * 6 * got.fallback_eps  # the former: tr(S1) + tr(S2) without the shift
    assert abs(biased - ref) > 1e3 * abs(got.value - ref) + 1e-11


def test_fallback_closed_form_for_diagonal_covariances(monkeypatch):
    """Commuting (diagonal) covariances: tr((A B)^1/2) = sum sqrt(a_i b_i), so
    d^2 = |mu1 - mu2|^2 + sum (sqrt(a_i + eps) - sqrt(b_i + eps))^2, reached to 1e-12 relative."""
    a, b = np.array([4.0, 1e-9, 0.0, 2.5, 0.3]), np.array([1.0, 0.0, 3e-3, 2.5, 7.0])
    mu1, mu2 = np.arange(5.0), np.arange(5.0)[::-1] * 0.5
    _fail_first(monkeypatch, 1)
    got = frechet(mu1, np.diag(a), mu2, np.diag(b))
    e = got.fallback_eps
    assert got.method == "sqrtm+eps" and e == pytest.approx(1e-6 * 7.0)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a + e) - np.sqrt(b + e)) ** 2).sum()
    assert got.value == pytest.approx(expected, rel=1e-12)


def test_plain_and_eigh_paths_are_reported(monkeypatch):
    rng = np.random.default_rng(1)
    s1, s2 = fr.feature_stats(rng.normal(size=(60, 5))), fr.feature_stats(rng.normal(size=(60, 5)) + 0.4)
    plain = frechet(*s1, *s2)
    assert (plain.method, plain.fallback_eps) == ("sqrtm", None)
    monkeypatch.setattr(fr, "_sqrtm_trace", lambda a: None)  # every sqrtm unusable: the eigenvalue form
    eig = frechet(*s1, *s2)
    assert (eig.method, eig.fallback_eps) == ("eigh", 0.0) and eig.value == pytest.approx(plain.value, rel=1e-9)


def test_fvd_metric_exposes_the_path(monkeypatch):
    rng = np.random.default_rng(2)
    m = FVD()
    m.update(torch.tensor(rng.normal(size=(30, 4))))
    m.update(torch.tensor(rng.normal(size=(30, 4)) + 1), real=True)
    assert m.fallback_eps is None and m.sqrt_method is None  # nothing computed yet
    m.compute()
    assert (m.sqrt_method, m.fallback_eps) == ("sqrtm", None)
    _fail_first(monkeypatch, 1)
    forced = FVD()
    forced.update(torch.tensor(rng.normal(size=(30, 4))))
    forced.set_reference(GaussianStats.from_features(rng.normal(size=(30, 4))))
    forced.compute()
    assert forced.sqrt_method == "sqrtm+eps" and forced.fallback_eps > 0


# --- 1-3. the flat result dict: fallback, guidance convention, labels ---------------------------------------


def _cfg(tmp_path, stride: int = 1):
    ecfg = EvalConfig(metrics=["fvd", "is"], num_samples=10, num_real=16, batch_size=8)
    return OmegaConf.create({"eval": OmegaConf.structured(ecfg), "seed": 0, "cache_dir": str(tmp_path / "cache"),
                             "dataset": {"stride": stride}, "method": {"name": "none"},
                             "sample": {"steps": 3, "guidance": 2.0, "eta": 0.0}})


def test_result_dict_records_fallback_convention_and_labels(tmp_path, monkeypatch):
    dm = VideoDataModule(ShapesConfig(frames=FRAMES, resolution=RES, train_size=16, val_size=4, test_size=4,
                                      stride=2))
    videos = torch.rand(10, 3, FRAMES, RES, RES) * 2 - 1
    out = evaluate_videos([(videos, None, None)], dm, _cfg(tmp_path, stride=3))
    assert out["guidance_convention"] == GUIDANCE_CONVENTION and out["guidance"] == 2.0
    # the REAL clips' stride (the dataset's, 2), not the run config's
    assert out["fvd_protocol"] == f"fvd10_{FRAMES}f_s2"
    assert out["is_protocol"] == "stylegan-v isv10 (10 splits, seed-42 shuffle) on shapes"
    assert "fvd_fallback_eps" in out and out["fvd_sqrt_method"] in ("sqrtm", "sqrtm+eps", "eigh")
    _fail_first(monkeypatch, 1)
    forced = evaluate_videos([(videos, None, None)], dm, _cfg(tmp_path))
    assert forced["fvd_sqrt_method"] == "sqrtm+eps" and forced["fvd_fallback_eps"] > 0
    json.dumps(forced)  # the row stays JSON


# --- 4. the real-statistics key covers the content -----------------------------------------------------------


def _folder(root: Path) -> Path:
    for i in range(3):
        write_video(root / f"v{i}.mp4", frame_index_pattern(12), fps=8)
    return root


def _key(root: Path, tmp: Path, det) -> tuple[str, dict]:
    cfg = FolderDataset.Config(root=str(root), frames=8, resolution=32, cache_dir=str(tmp / "clips"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptVideoWarning)
        ds = FolderDataset(cfg, "train")
    protocol = rs.real_protocol(cfg, "train", 3, 0, det, ds)
    return rs.protocol_key(protocol), protocol


def test_real_stats_key_covers_files_decoder_and_code(tmp_path, monkeypatch):
    det = load_detector("shapes")
    root = _folder(tmp_path / "videos")
    key, protocol = _key(root, tmp_path, det)
    assert _key(root, tmp_path, det)[0] == key  # same content, a fresh dataset object: same key
    assert protocol["content"]["kind"] == "files" and protocol["content"]["n_files"] == 3
    assert protocol["decoder"]["av"] and protocol["decoder"]["libraries"]
    assert "datamodules.clips" in rs.preprocessing_modules(object(), det)
    # touching a file (mtime) changes the key; so does changing its bytes (size)
    st = (root / "v1.mp4").stat()
    os.utime(root / "v1.mp4", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = _key(root, tmp_path, det)[0]
    assert touched != key
    with open(root / "v2.mp4", "ab") as f:
        f.write(b"\0" * 16)
    grown = _key(root, tmp_path, det)[0]
    assert grown not in (key, touched)
    # a skipped (unreadable) file changes it too
    (root / "v3.mp4").write_bytes(b"not a video")
    assert _key(root, tmp_path, det)[0] != grown
    (root / "v3.mp4").unlink()
    assert _key(root, tmp_path, det)[0] == grown
    # another decoder or other preprocessing code: another key
    monkeypatch.setattr(rs, "decoder_versions", lambda: {"av": "0.0"})
    assert _key(root, tmp_path, det)[0] != grown
    monkeypatch.undo()
    source = rs._module_source
    monkeypatch.setattr(rs, "_module_source", lambda name: source(name) + ("#" if name == "datamodules.clips" else ""))
    assert _key(root, tmp_path, det)[0] != grown


def test_real_stats_key_of_procedural_data_is_its_config_and_code():
    det = load_detector("shapes")
    cfg = ShapesConfig(frames=8, resolution=16, train_size=8)
    keys = {rs.protocol_key(rs.real_protocol(cfg, "train", 8, 0, det, VideoDataModule(cfg).dataset("train")))
            for _ in range(2)}
    p = rs.real_protocol(cfg, "train", 8, 0, det, VideoDataModule(cfg).dataset("train"))
    assert len(keys) == 1 and p["content"]["kind"] == "procedural" and p["decoder"] is None
    assert "datamodules.shapes" in rs.preprocessing_modules(VideoDataModule(cfg).dataset("train"), det)
    other = ShapesConfig(frames=8, resolution=16, train_size=8, seed=1)
    assert rs.protocol_key(rs.real_protocol(other, "train", 8, 0, det, VideoDataModule(other).dataset("train"))) \
        not in keys


# --- 5. under DDP rank 0 decides whether the cache exists ----------------------------------------------------


def _small_shapes() -> ShapesConfig:
    return ShapesConfig(frames=8, resolution=16, train_size=12, val_size=4, test_size=4)


def _ddp_worker(rank: int, world: int, tmp: str) -> None:
    tmp_path = Path(tmp)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=rank,
                                         world_size=world, timeout=timedelta(seconds=60))
    out = {}
    try:
        # each rank's filesystem answers differently: rank 0's answer wins on both
        out["exists_r0_true"] = broadcast_from_rank0(lambda: rank == 0)
        out["exists_r0_false"] = broadcast_from_rank0(lambda: rank == 1)
        try:
            broadcast_from_rank0(lambda: 1 // (1 - (rank == 0)))  # fails on rank 0 only
            out["error"] = None
        except Exception as e:  # noqa: BLE001
            out["error"] = type(e).__name__
        # node-local cache folders: the file exists only on rank 0's node -> both ranks use it
        dm, det = VideoDataModule(_small_shapes()), load_detector("shapes")
        ds = dm.dataset("train")
        local = tmp_path / ("full" if rank == 0 else "empty")
        hit = rs.load_or_compute_real_set(ds, dm.dataset_cfg, "train", det, 12, 0, local, batch_size=4)
        out["hit"] = [hit.from_cache, hit.stats.mu.tolist(), hit.labels]
        # ... only on rank 1's node -> both compute (together, without hanging)
        local = tmp_path / ("empty" if rank == 0 else "full")
        miss = rs.load_or_compute_real_set(ds, dm.dataset_cfg, "train", det, 12, 0, local, batch_size=4)
        out["miss"] = [miss.from_cache, miss.stats.n]
    finally:
        (tmp_path / f"rank{rank}.json").write_text(json.dumps(out))
        torch.distributed.destroy_process_group()


def test_rank0_decides_the_cache_for_every_rank(tmp_path):
    dm, det = VideoDataModule(_small_shapes()), load_detector("shapes")
    full = rs.load_or_compute_real_set(dm.dataset("train"), dm.dataset_cfg, "train", det, 12, 0, tmp_path / "full",
                                       batch_size=4)
    assert not full.from_cache
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for r, name in ((r0, "ZeroDivisionError"), (r1, "RuntimeError")):
        assert r["exists_r0_true"] is True and r["exists_r0_false"] is False and r["error"] == name
        assert r["hit"][0] is True and np.allclose(r["hit"][1], full.stats.mu) and r["hit"][2] == full.labels
        assert r["miss"] == [False, 12]
    assert list((tmp_path / "empty").glob("real_stats/*.npz"))  # rank 0 wrote what it computed to its folder
