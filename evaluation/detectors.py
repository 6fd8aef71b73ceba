"""Feature detectors behind FVD / IS / CLIPSIM, each loaded from a local file (never downloaded).

Every detector takes videos exactly as methods emit them, (B, C, T, H, W) float in [-1, 1]
(or already-quantised uint8), and does its own quantisation and resizing. The quantisation
of generated videos happens here and only here, in `quantize` (StyleGAN-V's convention):

    uint8 = (x * 127.5 + 128).clamp(0, 255).to(uint8)

so generated and real clips reach a detector through the same 8-bit bottleneck, as real
videos decoded from files do. Registry `DETECTORS`; `load_detector(name, path)` resolves the
file from the config value, else an environment variable, else the shipped default.

| name             | file (standard)                     | provides                 |
|------------------|-------------------------------------|--------------------------|
| i3d_torchscript  | i3d_torchscript.pt (StyleGAN-V)     | features (400 logits)    |
| i3d              | i3d_pretrained_400.pt (VideoGPT)    | features, probs          |
| c3d_torchscript  | c3d_ucf101.pt (StyleGAN-V / TGAN2)  | probs (101 classes)      |
| clip             | a transformers CLIP folder          | clip                     |
| shapes           | shipped shapes_evaluator.pt         | features, probs, clip    |
| videomae         | a transformers VideoMAE folder      | features (cd-fvd)        |

Detector options (`eval.detector_options`, a detector's `config_options`) are settings that
change the numbers without changing the file (the native I3D's BatchNorm eps); they are part of
the loaded-detector cache key and of `Detector.options`, which the results row records.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from evaluation.i3d import InceptionI3d, videogpt_preprocess
from evaluation.shapes_evaluator import SHAPES_EVALUATOR_PATH, load_evaluator
from evaluation.videomae import load_videomae

CAPABILITIES = ("features", "probs", "clip")


def quantize(video: Tensor) -> Tensor:
    """(B, C, T, H, W) float in [-1, 1] -> uint8 in [0, 255]; uint8 input passes through.

    `(x * 127.5 + 128).clamp(0, 255).to(uint8)`: StyleGAN-V's rounding of generated videos.
    A real clip decoded as u and mapped to u / 127.5 - 1 comes back as exactly u.
    """
    if video.dtype == torch.uint8:
        return video
    return (video.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def rescale(video_u8: Tensor) -> Tensor:
    """uint8 [0, 255] -> float [-1, 1] as x / 255 * 2 - 1 (the I3D `rescale=True` convention)."""
    return video_u8.float() / 255 * 2 - 1


def as_rgb(video: Tensor) -> Tensor:
    """Grayscale (B, 1, T, H, W) repeated to 3 channels; RGB passes through."""
    if video.ndim != 5:
        raise ValueError(f"videos must be (B, C, T, H, W); got shape {tuple(video.shape)}")
    if video.shape[1] == 1:
        return video.expand(-1, 3, -1, -1, -1)
    if video.shape[1] != 3:
        raise ValueError(f"videos must have 1 or 3 channels; got {video.shape[1]}")
    return video


@contextmanager
def tf32_off():
    """TF32 off for CUDA matmuls and cuDNN convolutions, the previous settings restored afterwards.

    StyleGAN-V's calc_metrics sets `torch.backends.cuda.matmul.allow_tf32 = False` and
    `torch.backends.cudnn.allow_tf32 = False` before extracting features; its TorchScript detectors run under it here.
    """
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


_SHA_CACHE: dict[tuple[str, int, float], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, sorted)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h, digest = hashlib.sha256(), ""
    for f in files:
        st = f.stat()
        key = (str(f.resolve()), st.st_size, st.st_mtime)
        if key not in _SHA_CACHE:
            fh = hashlib.sha256()
            with open(f, "rb") as fp:
                for chunk in iter(lambda: fp.read(1 << 20), b""):
                    fh.update(chunk)
            _SHA_CACHE[key] = fh.hexdigest()
        digest = _SHA_CACHE[key]
        h.update(f"{f.relative_to(path)}:{digest}\n".encode() if path.is_dir() else b"")
    return h.hexdigest() if path.is_dir() else digest


class Detector(nn.Module):
    """Base: a frozen network loaded from `path`; subclasses implement what they `provide`."""

    name: str = ""
    standard_file: str = ""  # what the user must supply, in words
    provides: tuple[str, ...] = ()
    min_frames: int = 1
    config_options: dict[str, str] = {}  # eval.detector_options field -> constructor keyword

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = str(path)
        self.sha256 = file_sha256(path)
        self.options: dict = {}  # settings beyond the file that change the numbers (recorded in the row)

    @property
    def device(self) -> torch.device:
        for t in (*self.parameters(), *self.buffers()):
            return t.device
        return torch.device("cpu")

    def _check(self, video: Tensor) -> Tensor:
        video = as_rgb(video)
        if video.shape[2] < self.min_frames:
            raise ValueError(f"detector {self.name!r} needs at least {self.min_frames} frames; got {video.shape[2]}")
        return quantize(video.to(self.device))

    def features(self, video: Tensor) -> Tensor:
        """(B, C, T, H, W) in [-1, 1] (or uint8) -> (B, d) features for FVD."""
        raise NotImplementedError(f"detector {self.name!r} gives no features (it provides {self.provides})")

    def probs(self, video: Tensor) -> Tensor:
        """(B, C, T, H, W) in [-1, 1] (or uint8) -> (B, K) class probabilities for IS / accuracy."""
        raise NotImplementedError(f"detector {self.name!r} gives no class probabilities (it provides {self.provides})")

    def clip_embeddings(self, video: Tensor, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Unit-norm frame embeddings (B, T, D) and text embeddings (B, D) for CLIPSIM."""
        raise NotImplementedError(f"detector {self.name!r} gives no image-text embeddings (it provides {self.provides})")

    def protocol(self) -> dict:
        """What identifies this detector in a results row."""
        out = {"detector": self.name, "detector_sha256": self.sha256}
        return {**out, "detector_options": dict(self.options)} if self.options else out


class I3DTorchScript(Detector):
    """StyleGAN-V's TorchScript I3D: called on uint8 (B, 3, T, H, W) with rescale/resize/return_features."""

    name, provides, min_frames = "i3d_torchscript", ("features",), 10
    standard_file = "i3d_torchscript.pt (StyleGAN-V's TorchScript port of TF-Hub i3d-kinetics-400)"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.net = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.no_grad()
    def features(self, video: Tensor) -> Tensor:
        x = self._check(video)
        with torch.autocast(x.device.type, enabled=False), tf32_off():
            return self.net(x, rescale=True, resize=True, return_features=True).float()  # (B, 400)


class NativeI3D(Detector):
    """Inception-I3D with the `i3d_pretrained_400.pt` state dict (strict) and VideoGPT preprocessing.

    bn_eps: BatchNorm eps (`eval.detector_options.i3d_bn_eps`): 1e-3 as the TF original, 1e-5 as the
    VideoGPT / TATS / DIGAN / PVDM code that produced the published numbers (the `videogpt` preset).
    """

    name, provides, min_frames = "i3d", ("features", "probs"), 9
    standard_file = "i3d_pretrained_400.pt (the VideoGPT / TATS / DIGAN Inception-I3D Kinetics-400 state dict)"
    config_options = {"i3d_bn_eps": "bn_eps"}

    def __init__(self, path: str | Path, bn_eps: float = 1e-3) -> None:
        super().__init__(path)
        self.options = {"bn_eps": float(bn_eps)}
        self.net = InceptionI3d(num_classes=400, bn_eps=float(bn_eps))
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state, strict=True)
        self.net.eval()

    @torch.no_grad()
    def logits(self, video: Tensor) -> Tensor:
        x = videogpt_preprocess(self._check(video))  # (B, 3, T, 224, 224) in [-1, 1]
        with torch.autocast(x.device.type, enabled=False):
            return self.net(x).float()  # (B, 400)

    def features(self, video: Tensor) -> Tensor:
        return self.logits(video)

    def probs(self, video: Tensor) -> Tensor:
        return self.logits(video).softmax(-1)


class C3DTorchScript(Detector):
    """StyleGAN-V's C3D fine-tuned on UCF-101: called with no keyword arguments on uint8 (B, 3, 16, H, W)."""

    name, provides, min_frames = "c3d_torchscript", ("probs",), 16
    standard_file = "c3d_ucf101.pt (StyleGAN-V's TorchScript C3D fine-tuned on UCF-101)"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.net = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.no_grad()
    def probs(self, video: Tensor) -> Tensor:
        x = self._check(video)
        if x.shape[2] != 16:
            raise ValueError(f"c3d_torchscript scores clips of exactly 16 frames; got {x.shape[2]}")
        with torch.autocast(x.device.type, enabled=False), tf32_off():
            return self.net(x).double()  # (B, 101): already probabilities (StyleGAN-V takes their log)


OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class CLIPDetector(Detector):
    """A transformers `CLIPModel` + tokenizer from a local folder (`save_pretrained` layout).

    Frames: shorter side resized to the vision tower's size (bicubic, antialiased), centre
    crop, normalised with the folder's preprocessor mean/std (OpenAI's when absent).
    """

    name, provides = "clip", ("clip",)
    standard_file = "a local transformers CLIP folder (e.g. openai/clip-vit-base-patch32 saved with save_pretrained)"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        from transformers import AutoTokenizer, CLIPModel  # optional dependency, imported on use

        self.net = CLIPModel.from_pretrained(str(path)).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.size = self.net.config.vision_config.image_size
        self.max_len = self.net.config.text_config.max_position_embeddings
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        pre = Path(path) / "preprocessor_config.json"
        if pre.exists():
            conf = json.loads(pre.read_text())
            mean, std = conf.get("image_mean", mean), conf.get("image_std", std)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def _pixels(self, frames_u8: Tensor) -> Tensor:
        x = frames_u8.float() / 255  # (N, 3, H, W)
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        x = F.interpolate(x, size=(max(self.size, round(h * scale)), max(self.size, round(w * scale))),
                          mode="bicubic", align_corners=False, antialias=True)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        return (x - self.mean) / self.std

    @staticmethod
    def _pooled(out) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output  # transformers 4 vs 5

    @torch.no_grad()
    def clip_embeddings(self, video: Tensor, texts: list[str]) -> tuple[Tensor, Tensor]:
        x = self._check(video)
        b = x.shape[0]
        frames = self._pixels(rearrange(x, "b c t h w -> (b t) c h w"))
        img = F.normalize(self._pooled(self.net.get_image_features(pixel_values=frames)).float(), dim=-1)
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        tok = {k: v.to(x.device) for k, v in tok.items()}
        txt = F.normalize(self._pooled(self.net.get_text_features(**tok)).float(), dim=-1)
        return rearrange(img, "(b t) d -> b t d", b=b), txt  # (B, T, D), (B, D)


class ShapesDetector(Detector):
    """The project's shapes evaluator: a video net (features, motion probabilities) and a CLIP-style pair."""

    name, provides = "shapes", ("features", "probs", "clip")
    standard_file = "shapes_evaluator.pt (shipped in evaluation/weights; retrain with benchmarks/train_shapes_evaluator.py)"

    def __init__(self, path: str | Path = SHAPES_EVALUATOR_PATH) -> None:
        super().__init__(path)
        self.video_net, self.clip, self.tokenizer, self.meta = load_evaluator(path)

    def _input(self, video: Tensor) -> Tensor:
        return rescale(self._check(video))  # through the 8-bit bottleneck, back to [-1, 1]

    @torch.no_grad()
    def heads(self, video: Tensor) -> dict[str, Tensor]:
        """Logits of every head (motion, shape, color, background), each (B, K)."""
        with torch.autocast(self.device.type, enabled=False):
            return self.video_net(self._input(video))[1]

    @torch.no_grad()
    def features(self, video: Tensor) -> Tensor:
        with torch.autocast(self.device.type, enabled=False):
            return self.video_net.features(self._input(video))  # (B, feature_dim)

    def probs(self, video: Tensor) -> Tensor:
        return self.heads(video)["motion"].double().softmax(-1)  # (B, num_motions)

    @torch.no_grad()
    def clip_embeddings(self, video: Tensor, texts: list[str]) -> tuple[Tensor, Tensor]:
        x = self._input(video)
        b = x.shape[0]
        with torch.autocast(self.device.type, enabled=False):
            img = self.clip.encode_image(rearrange(x, "b c t h w -> (b t) c h w"))  # (B*T, D)
            txt = self.clip.encode_text(self.tokenizer(list(texts)).to(x.device))  # (B, D)
        return rearrange(img, "(b t) d -> b t d", b=b), txt


class VideoMAEDetector(Detector):
    """A transformers VideoMAE from a local folder with content-debiased FVD's input and pooling (cd-fvd).

    Frames resized straight to the model's size (bilinear, no crop), [0, 1], not normalised; clips of
    exactly its num_frames; features fc_norm(mean of the last tokens). See evaluation/videomae.py.
    """

    name, provides = "videomae", ("features",)
    standard_file = ("a local transformers VideoMAE folder (cd-fvd: VideoMAE-v2 ViT-g SSv2 "
                     "vit_g_hybrid_pt_1200e_ssv2_ft.pth converted with `python -m evaluation.videomae`)")

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.net = load_videomae(path)
        self.min_frames = self.net.num_frames
        self.options = {"pooling": self.net.pooling}

    @torch.no_grad()
    def features(self, video: Tensor) -> Tensor:
        x = self._check(video)
        with torch.autocast(x.device.type, enabled=False):
            return self.net(x).float()  # (B, hidden)


DETECTORS: dict[str, type[Detector]] = {
    "i3d_torchscript": I3DTorchScript,
    "i3d": NativeI3D,
    "c3d_torchscript": C3DTorchScript,
    "clip": CLIPDetector,
    "shapes": ShapesDetector,
    "videomae": VideoMAEDetector,
}
DEFAULT_PATHS = {"shapes": SHAPES_EVALUATOR_PATH}  # detectors that ship with the package


def env_var(name: str) -> str:
    """The environment variable that can supply detector `name`'s file, e.g. VDB_DETECTOR_I3D_TORCHSCRIPT."""
    return f"VDB_DETECTOR_{name.upper()}"


def resolve_path(name: str, path: str | Path | None = None) -> Path:
    """The detector file: `path` (config `eval.paths.<name>`), else $VDB_DETECTOR_<NAME>, else the shipped default."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose one of: {', '.join(DETECTORS)}")
    chosen = path or os.environ.get(env_var(name)) or DEFAULT_PATHS.get(name)
    if chosen is None:
        raise FileNotFoundError(
            f"detector {name!r} needs {DETECTORS[name].standard_file}; no path given: set the config key "
            f"eval.paths.{name}=/path/to/file (or the environment variable {env_var(name)}). "
            "Nothing is downloaded.")
    chosen = Path(chosen).expanduser()
    if not chosen.exists():
        raise FileNotFoundError(
            f"detector {name!r}: file {chosen} not found (config key eval.paths.{name}, or environment variable "
            f"{env_var(name)}); it should be {DETECTORS[name].standard_file}. Nothing is downloaded.")
    return chosen


def detector_kwargs(name: str, options=None) -> dict:
    """Constructor keywords of detector `name` from `eval.detector_options` (None / missing fields: defaults)."""
    if options is None or name not in DETECTORS:
        return {}
    out = {}
    for field_name, kwarg in DETECTORS[name].config_options.items():
        value = options.get(field_name) if isinstance(options, dict) else getattr(options, field_name, None)
        if value is not None:
            out[kwarg] = value
    return out


_LOADED: dict[tuple, Detector] = {}


def load_detector(name: str, path: str | Path | None = None, device: str | torch.device = "cpu",
                  cache: bool = True, options=None) -> Detector:
    """Load detector `name` (a key of DETECTORS) from its local file, frozen, on `device`.

    options: `eval.detector_options` (a DetectorOptions, a dict or None); the fields this detector
    reads (`config_options`) become constructor keywords. Loaded detectors are kept per
    (name, file, options) in this process, so repeated evaluations don't reload a large network.
    """
    resolved = resolve_path(name, path)
    kwargs = detector_kwargs(name, options)
    key = (name, str(resolved.resolve()), tuple(sorted(kwargs.items())))
    det = _LOADED.get(key) if cache else None
    if det is None or det.sha256 != file_sha256(resolved):
        det = DETECTORS[name](resolved, **kwargs)
        det.requires_grad_(False).eval()
        if cache:
            _LOADED[key] = det
    return det.to(device)
