"""The file-backed datasets (ucf101, webvid, msrvtt, folder) on tiny real files laid out as each expects."""

from __future__ import annotations

import csv
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from datamodules import DATASETS, VideoBatch, VideoDataModule
from datamodules.files import CorruptVideoWarning, FileVideoDataset
from datamodules.folder import FolderDataset
from datamodules.msrvtt import MSRVTTDataset
from datamodules.ucf101 import UCF101Dataset
from datamodules.video_io import frame_index_pattern, read_frame_index, write_video
from datamodules.webvid import WebVidDataset

N, FPS = 30, 25
FILE_DATASETS = ["ucf101", "webvid", "msrvtt", "folder"]
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "dataset"


def video(path: Path, frames: int = N) -> Path:
    return write_video(path, frame_index_pattern(frames), fps=FPS)


def truncated(path: Path) -> Path:
    data = video(path).read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


def indices(item: dict) -> tuple[list[int], bool]:
    """Frame indices carried by an item's pixels (item video is (C, T, H, W) in [-1, 1])."""
    x = ((item["video"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return read_frame_index(x.permute(1, 2, 3, 0).numpy())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    # UCF-101: three classes; the lists spell one folder with another case, as the real ones do
    ucf, lists = root / "ucf" / "UCF-101", root / "ucf" / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 HandstandPushups\n3 YoYo\n")
    train = ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "HandStandPushups/v_HandStandPushups_g08_c01.avi",
             "YoYo/v_YoYo_g08_c01.avi"]
    bad = ["YoYo/v_YoYo_g09_c01.avi", "ApplyEyeMakeup/v_ApplyEyeMakeup_g09_c01.avi"]  # zero-byte, truncated
    short = ["YoYo/v_YoYo_g10_c01.avi"]
    test = ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "YoYo/v_YoYo_g01_c01.avi"]
    for rel in train + test:
        video(ucf / rel.replace("HandStand", "Handstand", 1))
    (ucf / bad[0]).write_bytes(b"")
    truncated(ucf / bad[1])
    video(ucf / short[0], frames=5)
    labels = {"ApplyEyeMakeup": 1, "HandStandPushups": 2, "YoYo": 3}
    (lists / "trainlist01.txt").write_text("".join(f"{r} {labels[r.split('/')[0]]}\n" for r in train + bad + short))
    (lists / "testlist01.txt").write_text("".join(f"{r}\n" for r in test))

    # WebVid: one row's video never downloaded, one truncated mp4
    web = root / "webvid"
    rows = [("1001", "p1", "a red car"), ("1002", "p1", "a blue sea"), ("1003", "p2", "missing one"),
            ("1004", "p2", "cut short"), ("1005", "p2", "a green tree")]
    for vid, page, _ in rows:
        if vid == "1004":
            truncated(web / page / f"{vid}.mp4")
        elif vid != "1003":
            video(web / page / f"{vid}.mp4")
    for name, chosen in [("results_10M_train.csv", rows), ("results_10M_val.csv", rows[:2])]:
        with (web / name).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
            w.writerows([vid, f"https://x/{vid}", "PT00H00M01S", page, text] for vid, page, text in chosen)

    # MSR-VTT: official splits in the JSON; 9k/1k-A CSVs in a second copy
    vtt = root / "msrvtt"
    split = {"video0": "train", "video1": "train", "video2": "validate", "video3": "test"}
    for vid in split:
        video(vtt / "videos" / "all" / f"{vid}.mp4")
    sentences = [{"video_id": v, "sen_id": 10 * i + j, "caption": f"{v} caption {j}"}
                 for i, v in enumerate(split) for j in (2, 0, 1)]
    (vtt / "MSRVTT_data.json").write_text(json.dumps(
        {"videos": [{"video_id": v, "split": s, "category": 0} for v, s in split.items()], "sentences": sentences}))
    (root / "msrvtt9k").symlink_to(vtt, target_is_directory=True)

    # folder: MPEG-PS (no frame count), a PNG frame folder, an mp4, a zero-byte file; CSV with labels + captions
    fold = root / "folder"
    video(fold / "clips" / "a.mpg")
    video(fold / "clips" / "b.mp4")
    (fold / "clips" / "empty.mp4").write_bytes(b"")
    frames_dir = fold / "frames" / "c"
    frames_dir.mkdir(parents=True)
    for i, frame in enumerate(frame_index_pattern(N)):
        Image.fromarray(frame).save(frames_dir / f"{i:05d}.png")
    with (fold / "meta.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption", "label", "split"])
        w.writerows([["clips/a.mpg", "mpeg clip", "cat", "train"], ["frames/c", "png clip", "dog", "train"],
                     ["clips/empty.mp4", "nothing", "dog", "train"], ["clips/b.mp4", "mp4 clip", "cat", "test"]])
    return root


def cfg_for(cls: type[FileVideoDataset], root: Path, tmp: Path, **kw):
    return cls.Config(**{"root": str(root), "frames": 8, "resolution": 32, "stride": 2,
                         "cache_dir": str(tmp / "cache"), **kw})


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptVideoWarning)
        return fn(*args, **kw)


# --------------------------------------------------------------------------------------------- ucf101


def test_ucf101_labels_captions_clips_and_skips(data, tmp_path):
    with pytest.warns(CorruptVideoWarning, match="v_YoYo_g09_c01.avi"):
        ds = UCF101Dataset(cfg_for(UCF101Dataset, data / "ucf", tmp_path), "train")
    assert ds.class_names == ["ApplyEyeMakeup", "HandstandPushups", "YoYo"]
    assert len(ds) == 3 and ds.skip_counts == {"missing": 0, "unreadable": 2, "short": 1} and ds.skipped == 2
    items = [ds[i] for i in range(3)]
    assert [it["label"] for it in items] == [0, 1, 2]
    assert items[1]["text"] == "a video of handstand pushups"
    for it in items:
        assert it["video"].shape == (3, 8, 32, 32) and it["video"].dtype == torch.float32
        assert -1 <= it["video"].min() and it["video"].max() <= 1
        idx, mirrored = indices(it)
        assert np.diff(idx).tolist() == [2] * 7 and 0 <= idx[0] <= N - 15 and not mirrored


@pytest.mark.parametrize("split,mode,n", [("val", "fold", 2), ("test", "fold", 2), ("train", "test", 2),
                                          ("test", "all", 5)])
def test_ucf101_split_mapping(data, tmp_path, split, mode, n):
    ds = quiet(UCF101Dataset, cfg_for(UCF101Dataset, data / "ucf", tmp_path, split_mode=mode), split)
    assert len(ds) == n


def test_ucf101_root_may_be_the_video_folder(data, tmp_path):
    ds = quiet(UCF101Dataset, cfg_for(UCF101Dataset, data / "ucf" / "UCF-101", tmp_path), "test")
    assert [ds[i]["label"] for i in range(len(ds))] == [0, 2]


def test_ucf101_missing_split_file_names_path_and_key(data, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        UCF101Dataset(cfg_for(UCF101Dataset, data / "ucf", tmp_path, fold=2), "train")
    assert "trainlist02.txt" in str(e.value) and "dataset.fold" in str(e.value) and "classInd.txt" in str(e.value)


@pytest.mark.parametrize("name", FILE_DATASETS)
def test_missing_root_names_path_key_and_layout(tmp_path, name):
    cls = DATASETS[name]
    with pytest.raises(FileNotFoundError) as e:
        cls(cls.Config(root=str(tmp_path / "nowhere")), "train")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "dataset.root" in msg and "Expected layout" in msg
    with pytest.raises(FileNotFoundError, match="dataset.root is not set"):
        cls(cls.Config(root=None), "train")


@pytest.mark.parametrize("name", FILE_DATASETS)
def test_config_files_match_the_dataset_schema(name):
    layer = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    schema = OmegaConf.structured(DATASETS[name].Config())
    merged = OmegaConf.merge(schema, layer.dataset, layer.scales.paper.dataset)  # an unknown key would raise
    assert merged.name == name and merged.cache_dir == "cache/clips"


# --------------------------------------------------------------------------------------------- webvid


def test_webvid_missing_rows_counted_and_corrupt_file_skipped_in_workers(data, tmp_path):
    ds = quiet(WebVidDataset, cfg_for(WebVidDataset, data / "webvid", tmp_path), "train")
    assert len(ds) == 4 and ds.skip_counts["missing"] == 1 and ds.skipped == 1
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=lambda b: b)
    items = quiet(lambda: [it for batch in loader for it in batch])
    # the truncated row (index 2) is replaced by the next good video; the workers' count reaches us
    assert [it["text"] for it in items] == ["a red car", "a blue sea", "a green tree", "a green tree"]
    assert ds.skip_counts == {"missing": 1, "unreadable": 1, "short": 0} and ds.skipped == 2
    assert WebVidDataset(cfg_for(WebVidDataset, data / "webvid", tmp_path), "val").has_captions


def test_corrupt_file_warns_once(data, tmp_path):
    ds = quiet(WebVidDataset, cfg_for(WebVidDataset, data / "webvid", tmp_path), "train")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = ds[2], ds[2]
    assert len([w for w in caught if issubclass(w.category, CorruptVideoWarning)]) == 1
    assert "1004.mp4" in str(caught[0].message)
    assert first["text"] == second["text"] == "a green tree"


# --------------------------------------------------------------------------------------------- msrvtt


def test_msrvtt_official_splits_and_captions(data, tmp_path):
    train = MSRVTTDataset(cfg_for(MSRVTTDataset, data / "msrvtt", tmp_path), "train")
    assert len(train) == 2 and train.class_names == [] and train.has_captions
    torch.manual_seed(0)
    texts = {train[0]["text"] for _ in range(12)}
    assert texts == {"video0 caption 0", "video0 caption 1", "video0 caption 2"}  # a random caption per sample
    val = MSRVTTDataset(cfg_for(MSRVTTDataset, data / "msrvtt", tmp_path), "val")
    test = MSRVTTDataset(cfg_for(MSRVTTDataset, data / "msrvtt", tmp_path), "test")
    assert val[0]["text"] == "video2 caption 0" and test[0]["text"] == "video3 caption 0"  # the first (lowest sen_id)
    assert val[0]["label"] == -1


def test_msrvtt_9k_split_when_csvs_exist(data, tmp_path):
    root = tmp_path / "vtt"
    (root / "videos").mkdir(parents=True)
    (root / "videos" / "all").symlink_to(data / "msrvtt" / "videos" / "all", target_is_directory=True)
    (root / "annotation").mkdir()
    (root / "annotation" / "MSRVTT_data.json").write_text((data / "msrvtt" / "MSRVTT_data.json").read_text())
    (root / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo1\nvideo2\n")
    (root / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\nret0,msr9,video3,a thing\n")
    assert len(MSRVTTDataset(cfg_for(MSRVTTDataset, root, tmp_path), "train")) == 3
    assert len(MSRVTTDataset(cfg_for(MSRVTTDataset, root, tmp_path), "test")) == 1
    assert len(MSRVTTDataset(cfg_for(MSRVTTDataset, root, tmp_path, split_scheme="official"), "train")) == 2


# --------------------------------------------------------------------------------------------- folder


def test_folder_with_csv_mpeg_ps_and_png_frames(data, tmp_path):
    ds = quiet(FolderDataset, cfg_for(FolderDataset, data / "folder", tmp_path, csv="meta.csv"), "train")
    assert len(ds) == 2 and ds.skipped == 1 and ds.has_captions and ds.class_names == ["cat", "dog"]
    a, c = ds[0], ds[1]
    assert (a["text"], a["label"], c["text"], c["label"]) == ("mpeg clip", 0, "png clip", 1)
    for it in (a, c):
        assert np.diff(indices(it)[0]).tolist() == [2] * 7
    test = FolderDataset(cfg_for(FolderDataset, data / "folder", tmp_path, csv="meta.csv"), "val")
    assert len(test) == 1 and test[0]["text"] == "mp4 clip"


def test_folder_scan_and_split_dirs(data, tmp_path):
    ds = quiet(FolderDataset, cfg_for(FolderDataset, data / "folder", tmp_path), "train")
    assert sorted(s.path.name for s in ds.samples) == ["a.mpg", "b.mp4", "c"] and not ds.has_captions
    assert ds[0]["text"] is None and ds[0]["label"] == -1
    split = quiet(FolderDataset, cfg_for(FolderDataset, data / "folder", tmp_path, train_dir="frames",
                                         test_dir="clips", labels_from_dirs=True), "test")
    assert [s.path.name for s in split.samples] == ["a.mpg", "b.mp4"]
    labelled = quiet(FolderDataset, cfg_for(FolderDataset, data / "folder", tmp_path, labels_from_dirs=True), "train")
    assert labelled.class_names == ["clips", "frames"] and [labelled[i]["label"] for i in range(3)] == [0, 0, 1]


def test_short_videos_loop_when_asked(data, tmp_path):
    ds = quiet(UCF101Dataset, cfg_for(UCF101Dataset, data / "ucf", tmp_path, loop_short=True), "train")
    assert len(ds) == 4 and ds.skip_counts["short"] == 0
    assert indices(ds[3])[0] == [0, 2, 4, 0, 2, 4, 0, 2]  # 5 frames at stride 2: 0, 2, 4, then again


def test_random_crop_and_flip_in_training_only(data, tmp_path):
    cfg = cfg_for(FolderDataset, data / "folder", tmp_path, random_crop=True, flip=True)
    train, test = quiet(FolderDataset, cfg, "train"), quiet(FolderDataset, cfg, "test")
    torch.manual_seed(0)
    assert {indices(train[1])[1] for _ in range(12)} == {True, False}
    assert {indices(test[1])[1] for _ in range(4)} == {False}


# ---------------------------------------------------------------------------------------- evaluation


def test_eval_clip_is_a_deterministic_function_of_seed(data, tmp_path):
    ds = quiet(UCF101Dataset, cfg_for(UCF101Dataset, data / "ucf", tmp_path, split_mode="all", stride=1), "train")
    n = len(ds)
    a = [ds.eval_clip(i, seed=1) for i in range(n)]
    assert all(torch.equal(x["video"], ds.eval_clip(i, seed=1)["video"]) for i, x in enumerate(a))
    assert sorted(x["label"] for x in a) == sorted(s.label for s in ds.samples)  # one clip per real video
    starts = lambda seed: [indices(ds.eval_clip(i, seed))[0][0] for i in range(n)]  # noqa: E731
    assert starts(1) != starts(2)  # other seeds pick other offsets (and orders)
    assert all(0 <= s <= N - 8 for s in starts(3))


# --------------------------------------------------------------------------------------------- cache


def test_decode_cache_builds_resumes_and_serves(data, tmp_path, monkeypatch):
    cfg = cfg_for(UCF101Dataset, data / "ucf", tmp_path, cache=True, cache_clips=2)
    ds = quiet(UCF101Dataset, cfg, "train")
    torch.manual_seed(0)
    ds[0]  # the first pass fills entries on demand ...
    assert ds._cache.counts()["stored"] == 1
    assert ds.build_cache(progress=False) == {"todo": 0, "stored": 6, "bad": 0}  # ... and a build finishes the rest
    direct = ds._decode(1, 0.75, (0.5, 0.5))  # slot 1 of 2 sits at offset 0.75
    assert torch.equal(torch.from_numpy(np.array(ds._cache.get(3))), direct)

    def broken(*args, **kw):
        raise AssertionError("a cached dataset must not decode")

    monkeypatch.setattr("datamodules.files.read_clip", broken)
    again = quiet(UCF101Dataset, cfg, "train")  # a later run reads the same cache
    assert again._cache.dir == ds._cache.dir
    for i in range(len(again)):
        it = again[i]
        assert it["video"].shape == (3, 8, 32, 32) and np.diff(indices(it)[0]).tolist() == [2] * 7


def test_cache_marks_bad_files_and_keeps_going(data, tmp_path):
    cfg = cfg_for(WebVidDataset, data / "webvid", tmp_path, cache=True)
    ds = quiet(WebVidDataset, cfg, "train")
    assert quiet(ds.build_cache, num_workers=2, progress=False) == {"todo": 0, "stored": 3, "bad": 1}
    assert ds.skip_counts["unreadable"] == 1
    again = quiet(WebVidDataset, cfg, "train")
    assert quiet(again.__getitem__, 2)["text"] == "a green tree" and again.skipped == 2


# --------------------------------------------------------------------------------------------- datamodule


def test_datamodule_yields_video_batches(data, tmp_path):
    dm = VideoDataModule(cfg_for(UCF101Dataset, data / "ucf", tmp_path))
    dm.loader.batch_size = 2
    batch = quiet(lambda: next(iter(dm.train_dataloader())))
    assert isinstance(batch, VideoBatch) and batch.video.shape == (2, 3, 8, 32, 32)
    assert batch.label is not None and len(batch.text) == 2 and dm.num_classes == 3


def test_datamodule_prepare_data_fills_the_cache(data, tmp_path):
    dm = VideoDataModule(cfg_for(UCF101Dataset, data / "ucf", tmp_path, cache=True))
    quiet(dm.prepare_data)
    assert dm.dataset("train")._cache.counts() == {"todo": 0, "stored": 3, "bad": 0}


def test_dataset_survives_plain_pickling(data, tmp_path):
    ds = quiet(WebVidDataset, cfg_for(WebVidDataset, data / "webvid", tmp_path), "train")
    quiet(ds.__getitem__, 2)  # flags the truncated file
    copy = pickle.loads(pickle.dumps(ds))  # outside a spawn the shared flags travel as a private copy
    assert copy.skip_counts == ds.skip_counts and copy[0]["text"] == "a red car"


def test_interrupted_cache_build_resumes(data, tmp_path, monkeypatch):
    from datamodules import files

    cfg = cfg_for(UCF101Dataset, data / "ucf", tmp_path, cache=True, cache_clips=2)
    calls, real = [], files.read_clip

    def interrupt_on_third(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(files, "read_clip", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        quiet(UCF101Dataset, cfg, "train").build_cache(progress=False)
    monkeypatch.setattr(files, "read_clip", real)
    again = quiet(UCF101Dataset, cfg, "train")
    assert again._cache.counts() == {"todo": 4, "stored": 2, "bad": 0}  # the two finished entries survived
    assert again.build_cache(progress=False) == {"todo": 0, "stored": 6, "bad": 0}
