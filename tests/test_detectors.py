"""Detector loading paths: tiny stand-ins saved to a temporary folder go through the real loading code."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from evaluation.detectors import DETECTORS, env_var, file_sha256, load_detector, resolve_path
from evaluation.i3d import InceptionI3d, _same_pad, videogpt_preprocess
from evaluation.metrics import CLIPSIM

REFERENCE_KEYS = Path(__file__).parent / "data" / "i3d_state_dict_keys.tsv"  # copy of shared/reference


def _reference_keys() -> list[tuple[str, tuple[int, ...]]]:
    rows = [line.split("\t") for line in REFERENCE_KEYS.read_text().splitlines() if line.strip()]
    return [(k, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())) for k, shape in rows]


class TinyI3DScript(nn.Module):
    """The StyleGAN-V i3d_torchscript.pt call signature; insists on uint8 input and the three flags."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 400)

    def forward(self, x: Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> Tensor:
        if x.dtype != torch.uint8:
            raise RuntimeError("expected uint8 input")
        if not (rescale and resize and return_features):
            raise RuntimeError("expected rescale=True, resize=True, return_features=True")
        v = x.float() / 255 * 2 - 1
        return self.proj(v.mean(dim=(2, 3, 4)))


class TinyC3DScript(nn.Module):
    """The c3d_ucf101.pt call: uint8 (B, 3, 16, H, W), no keywords, returns probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 101)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.uint8:
            raise RuntimeError("expected uint8 input")
        return self.proj(x.float().mean(dim=(2, 3, 4)) / 255).softmax(-1)


def _video(b: int = 2, t: int = 16, r: int = 32, seed: int = 0) -> Tensor:
    return torch.rand(b, 3, t, r, r, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_registry_names():
    assert set(DETECTORS) == {"i3d_torchscript", "i3d", "c3d_torchscript", "clip", "shapes", "videomae"}


def test_i3d_torchscript_loads_and_is_called_with_stylegan_v_signature(tmp_path):
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(TinyI3DScript()).save(str(path))
    det = load_detector("i3d_torchscript", path, cache=False)
    feats = det.features(_video())
    assert feats.shape == (2, 400) and feats.dtype == torch.float32
    assert det.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert det.protocol() == {"detector": "i3d_torchscript", "detector_sha256": det.sha256}
    with pytest.raises(ValueError, match="at least 10 frames"):
        det.features(_video(t=8))
    with pytest.raises(NotImplementedError, match="no class probabilities"):
        det.probs(_video())


def test_c3d_torchscript_gives_probabilities(tmp_path):
    path = tmp_path / "c3d_ucf101.pt"
    torch.jit.script(TinyC3DScript()).save(str(path))
    det = load_detector("c3d_torchscript", path, cache=False)
    p = det.probs(_video(b=3))
    assert p.shape == (3, 101) and torch.allclose(p.sum(-1), torch.ones(3, dtype=p.dtype))
    with pytest.raises(ValueError, match="16 frames"):
        det.probs(_video(t=20))


@pytest.mark.parametrize("name,standard", [("i3d_torchscript", "i3d_torchscript.pt"), ("i3d", "i3d_pretrained_400.pt"),
                                           ("c3d_torchscript", "c3d_ucf101.pt"), ("clip", "transformers CLIP"),
                                           ("videomae", "vit_g_hybrid_pt_1200e_ssv2_ft.pth")])
def test_missing_file_error_names_file_config_key_and_standard(tmp_path, monkeypatch, name, standard):
    monkeypatch.delenv(env_var(name), raising=False)
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError) as e:
        load_detector(name, missing)
    msg = str(e.value)
    assert str(missing) in msg and f"eval.paths.{name}" in msg and standard in msg and env_var(name) in msg
    with pytest.raises(FileNotFoundError, match=f"eval.paths.{name}"):
        load_detector(name, None)  # no path configured at all


def test_environment_variable_supplies_the_path(tmp_path, monkeypatch):
    path = tmp_path / "i3d.pt"
    torch.jit.script(TinyI3DScript()).save(str(path))
    monkeypatch.setenv(env_var("i3d_torchscript"), str(path))
    assert resolve_path("i3d_torchscript") == path
    with pytest.raises(ValueError, match="choose one of"):
        resolve_path("inception")


def test_native_i3d_state_dict_equals_reference_keys_and_shapes():
    ours = [(k, tuple(v.shape)) for k, v in InceptionI3d().state_dict().items()]
    assert ours == _reference_keys()


@pytest.mark.parametrize("size,kernel,stride", [(16, 7, 2), (7, 7, 2), (224, 7, 2), (56, 3, 1), (8, 3, 2), (5, 2, 2)])
def test_tf_same_padding_gives_ceil_output_size(size, kernel, stride):
    before, after = _same_pad((size,), (kernel,), (stride,))
    assert after - before in (0, 1)  # the odd pixel goes at the end, as in TensorFlow
    assert (size + before + after - kernel) // stride + 1 == math.ceil(size / stride)


def test_native_i3d_loads_reference_state_dict_strict_and_runs(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.tensor(7) if k.endswith("num_batches_tracked")
                 else torch.rand(shape, generator=g) * 0.1 + (1.0 if k.endswith("running_var") else 0.0))
             for k, shape in _reference_keys()}
    path = tmp_path / "i3d_pretrained_400.pt"
    torch.save(state, path)
    det = load_detector("i3d", path, cache=False)
    assert torch.equal(det.net.state_dict()["Mixed_5c.b3b.conv3d.weight"], state["Mixed_5c.b3b.conv3d.weight"])
    feats = det.features(_video(b=1, t=det.min_frames, r=24))  # the shortest clip it accepts
    assert feats.shape == (1, 400) and torch.isfinite(feats).all()
    del state["logits.conv3d.bias"]
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="logits.conv3d.bias"):
        load_detector("i3d", path, cache=False)


def test_videogpt_preprocess_resizes_shorter_side_and_crops():
    x = torch.full((1, 3, 4, 30, 40), 255, dtype=torch.uint8)
    y = videogpt_preprocess(x, resolution=24)
    assert y.shape == (1, 3, 4, 24, 24) and torch.allclose(y, torch.ones_like(y))


def _tiny_clip_folder(folder: Path) -> Path:
    """A random-weight transformers CLIP and a locally built BPE tokenizer, saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: len(vocab) + i for i, c in enumerate(letters)})
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(letters)})
    vocab["re</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nr e</w>\n")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tiny = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1, **tiny),
                     vision_config=dict(image_size=32, patch_size=8, **tiny), projection_dim=16)
    torch.manual_seed(0)
    model_dir = folder / "model"
    CLIPModel(cfg).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def test_clip_loads_from_local_folder_and_feeds_clipsim(tmp_path):
    model_dir = _tiny_clip_folder(tmp_path)
    det = load_detector("clip", model_dir, cache=False)
    assert len(det.sha256) == 64 and det.sha256 == file_sha256(model_dir)
    video = _video(b=2, t=3, r=48)
    img, txt = det.clip_embeddings(video, ["a red circle", "a blue square moves left"])
    assert img.shape == (2, 3, 16) and txt.shape == (2, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2, 3), atol=1e-5)
    m = CLIPSIM()
    m.update(img, txt)
    assert -1 <= float(m.compute()) <= 1
    # the same frames and captions score the same however they are batched
    img1, txt1 = det.clip_embeddings(video[:1], ["a red circle"])
    assert torch.allclose(img1, img[:1], atol=1e-5) and torch.allclose(txt1, txt[:1], atol=1e-5)
