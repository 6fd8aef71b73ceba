"""The shipped shapes evaluator: held-out accuracy, and FVD / IS / CLIPSIM behave as the protocol intends."""

from __future__ import annotations

import pytest
import torch

from datamodules.shapes import MOTIONS, ShapesConfig, ShapesDataset
from evaluation.detectors import ShapesDetector, file_sha256, load_detector
from evaluation.frechet import frechet_distance
from evaluation.metrics import CLIPSIM, inception_score
from evaluation.shapes_evaluator import HEADS, SHAPES_EVALUATOR_PATH


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small convolutions on a CPU shared with other jobs: one thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def detector() -> ShapesDetector:
    return load_detector("shapes")


def _render(split: str, n: int, resolution: int = 32, start: int = 0) -> dict:
    """n clips of a shapes split: video (n, 3, 16, R, R) in [-1, 1], per-head labels, captions."""
    ds = ShapesDataset(ShapesConfig(resolution=resolution), split)
    items = [ds[start + i] for i in range(n)]
    return {"video": torch.stack([it["video"] for it in items]), "text": [it["text"] for it in items],
            "motion": torch.tensor([it["label"] for it in items]),
            **{k: torch.tensor([it[k] for it in items]) for k in ("shape", "color", "background")}}


@pytest.fixture(scope="module")
def test_clips() -> dict:
    return _render("test", 320)


@pytest.fixture(scope="module")
def fvd_sets(detector) -> dict:
    """Features of 160 train clips (the reference) and 160 val clips, plus the val videos to corrupt."""
    train, val = _render("train", 160), _render("val", 160)
    return {"train": detector.features(train["video"]).double(), "val": detector.features(val["video"]).double(),
            "val_video": val["video"]}


def _fvd(a: torch.Tensor, b: torch.Tensor) -> float:
    from evaluation.frechet import feature_stats

    return frechet_distance(*feature_stats(a), *feature_stats(b))


def test_shipped_weights_are_small_and_identified(detector):
    assert SHAPES_EVALUATOR_PATH.stat().st_size < 5e6
    assert detector.sha256 == file_sha256(SHAPES_EVALUATOR_PATH)
    assert detector.protocol()["detector"] == "shapes"


def test_heldout_accuracy_of_every_head(detector, test_clips):
    logits = detector.heads(test_clips["video"])
    for head in HEADS:
        acc = (logits[head].argmax(-1) == test_clips[head]).float().mean().item()
        assert acc >= 0.95, f"{head} head: held-out accuracy {acc:.3f} < 0.95"


def test_accepts_64px_and_other_frame_counts(detector):
    clips = _render("test", 64, resolution=64, start=400)
    acc = (detector.probs(clips["video"]).argmax(-1) == clips["motion"]).float().mean().item()
    assert acc >= 0.95
    assert detector.features(clips["video"][:2, :, :12]).shape == (2, detector.video_net.cfg.feature_dim)


def test_inception_score_of_real_data_is_near_the_number_of_classes(detector, test_clips):
    probs = detector.probs(test_clips["video"]).numpy()
    single, _ = inception_score(probs, splits=1)
    assert len(MOTIONS) * 0.9 < single <= len(MOTIONS)
    ten, _ = inception_score(probs)  # StyleGAN-V's 10 splits of 32: class marginals are noisier
    assert len(MOTIONS) * 0.75 < ten <= len(MOTIONS)


def test_clipsim_true_captions_beat_shuffled(detector, test_clips):
    video, text = test_clips["video"][:96], test_clips["text"][:96]
    true, shuffled = CLIPSIM(), CLIPSIM()
    true.update(*detector.clip_embeddings(video, text))
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(0))
    shuffled.update(*detector.clip_embeddings(video, [text[i] for i in perm]))
    assert float(true.compute()) > float(shuffled.compute()) + 0.3


def _noise(v: torch.Tensor, level: float) -> torch.Tensor:
    return (v + level * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)


def _shuffle(v: torch.Tensor, window: int) -> torch.Tensor:
    """Permute the order of `window` consecutive frames (the same window and permutation for every clip)."""
    g = torch.Generator().manual_seed(2)
    start = int(torch.randint(0, v.shape[2] - window + 1, (1,), generator=g))
    order = torch.arange(v.shape[2])
    order[start:start + window] = start + torch.randperm(window, generator=g)
    return v[:, :, order]


def _freeze(v: torch.Tensor, frozen: int) -> torch.Tensor:
    """The clip stops moving: its last `frozen` frames repeat the frame before them."""
    t = v.shape[2]
    order = torch.arange(t).clamp(max=t - frozen - 1)
    return v[:, :, order]


@pytest.mark.parametrize("corrupt,levels", [(_noise, [0.1, 0.2, 0.4]), (_shuffle, [4, 8, 16]),
                                            (_freeze, [4, 8, 15])])
def test_fvd_grows_monotonically_with_corruption(detector, fvd_sets, corrupt, levels):
    clean = _fvd(fvd_sets["val"], fvd_sets["train"])
    scores = [_fvd(detector.features(corrupt(fvd_sets["val_video"], lv)).double(), fvd_sets["train"]) for lv in levels]
    print(f"{corrupt.__name__}: clean {clean:.3f} -> {[round(x, 3) for x in scores]}")
    assert all(a < b for a, b in zip([clean, *scores], scores)), f"{corrupt.__name__}: clean {clean:.2f} -> {scores}"
    assert scores[-1] > 3 * clean


def test_fvd_of_real_val_against_real_train_is_small(detector, fvd_sets):
    clean = _fvd(fvd_sets["val"], fvd_sets["train"])
    frozen = _fvd(detector.features(_freeze(fvd_sets["val_video"], 15)).double(), fvd_sets["train"])
    assert clean < 0.2 * frozen  # same distribution, different clips: a fraction of a static-video FVD
