"""Deterministic inputs and stand-in detectors for the `videogpt` / `cd-fvd` protocol tests.

Pure numpy (legacy `RandomState`, whose streams numpy keeps fixed) so the reference implementations,
run outside the project, can rebuild exactly the same videos and weights; `fingerprint` hashes
them so a drift in the generators shows up as such, not as a wrong FVD.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

I3D_KEYS = Path(__file__).parent / "data" / "i3d_state_dict_keys.tsv"  # i3d_pretrained_400.pt's keys and shapes

# the tiny VideoMAE-v2 stand-in: cd-fvd's ViT-g layout (224 px, patch 14, 16 frames, tubelet 2, mean
# pooling, qkv bias, LayerNorm eps 1e-6, MLP ratio 48/11) at width 16, depth 2, 2 heads, 5 classes
TINY_VIDEOMAE = {"hidden": 16, "depth": 2, "heads": 2, "mlp": int(16 * 48 / 11), "patch": 14, "tubelet": 2,
                 "classes": 5, "image_size": 224, "frames": 16}


def seeded_videos(seed: int, n: int, t: int, r: int, noise: int = 40, offset: int = 0) -> np.ndarray:
    """uint8 (n, t, r, r, 3): a coarse random colour pattern per video drifting sideways, + noise in [-noise, noise] + offset."""
    rs = np.random.RandomState(seed)
    base = rs.randint(0, 256, size=(n, 1, 4, 4, 3)).astype(np.int64)
    base = base.repeat(r // 4, axis=2).repeat(r // 4, axis=3)  # (n, 1, r, r, 3)
    speed = rs.randint(-3, 4, size=n)
    noise = rs.randint(-noise, noise + 1, size=(n, t, r, r, 3))
    frames = np.stack([np.stack([np.roll(base[i, 0], speed[i] * k, axis=1) for k in range(t)]) for i in range(n)])
    return np.clip(frames + noise + offset, 0, 255).astype(np.uint8)


def write_frame_folders(root: Path, videos: np.ndarray, prefix: str = "") -> Path:
    """Each video as a folder of PNG frames (lossless: the pixels read back are exactly these)."""
    from PIL import Image

    for i, video in enumerate(videos):
        folder = root / f"{prefix}{i:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k, frame in enumerate(video):
            Image.fromarray(frame).save(folder / f"{k:03d}.png")
    return root


def i3d_keys() -> list[tuple[str, tuple[int, ...]]]:
    rows = [line.split("\t") for line in I3D_KEYS.read_text().splitlines() if line.strip()]
    return [(k, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())) for k, shape in rows]


def i3d_state_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """A random state dict with exactly i3d_pretrained_400.pt's keys and shapes (numpy, float32 / int64).

    He-scaled convolutions shrunk by c = sqrt(0.005), each BatchNorm's running variance c^2 * U(0.5, 1.5):
    activations stay O(1) through the 58 units, and the BatchNorm eps (1e-5 vs 1e-3) visibly matters.
    """
    rs = np.random.RandomState(seed)
    c2 = 0.005
    out: dict[str, np.ndarray] = {}
    for key, shape in i3d_keys():
        if key.endswith("num_batches_tracked"):
            out[key] = np.array(0, dtype=np.int64)
            continue
        if key == "logits.conv3d.weight":
            x = rs.standard_normal(shape) * np.sqrt(1.0 / np.prod(shape[1:]))
        elif key == "logits.conv3d.bias":
            x = 0.1 * rs.standard_normal(shape)
        elif key.endswith("conv3d.weight"):
            x = rs.standard_normal(shape) * np.sqrt(2.0 * c2 / np.prod(shape[1:]))
        elif key.endswith("bn.weight"):
            x = 1 + 0.1 * rs.standard_normal(shape)
        elif key.endswith("bn.bias") or key.endswith("running_mean"):
            x = 0.1 * rs.standard_normal(shape) * (np.sqrt(c2) if key.endswith("running_mean") else 1)
        elif key.endswith("running_var"):
            x = c2 * rs.uniform(0.5, 1.5, size=shape)
        else:
            raise KeyError(key)
        out[key] = np.asarray(x, dtype=np.float32)
    return out


def videomaev2_state_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """A random tiny state dict in cd-fvd's VideoMAE-v2 `VisionTransformer` layout (numpy float32)."""
    c = TINY_VIDEOMAE
    d, m = c["hidden"], c["mlp"]
    shapes = {"patch_embed.proj.weight": (d, 3, c["tubelet"], c["patch"], c["patch"]), "patch_embed.proj.bias": (d,)}
    for i in range(c["depth"]):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.q_bias": (d,), b + "attn.v_bias": (d,),
                       b + "attn.qkv.weight": (3 * d, d), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                       b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "mlp.fc1.weight": (m, d),
                       b + "mlp.fc1.bias": (m,), b + "mlp.fc2.weight": (d, m), b + "mlp.fc2.bias": (d,)})
    shapes.update({"fc_norm.weight": (d,), "fc_norm.bias": (d,), "head.weight": (c["classes"], d),
                   "head.bias": (c["classes"],)})
    rs = np.random.RandomState(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("norm1.weight") or key.endswith("norm2.weight") or key == "fc_norm.weight":
            x = 1 + 0.2 * rs.standard_normal(shape)
        elif len(shape) > 1:
            x = rs.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        else:
            x = 0.1 * rs.standard_normal(shape)
        out[key] = np.asarray(x, dtype=np.float32)
    return out


def fingerprint(*arrays_or_dicts) -> str:
    """sha256 over arrays (and dicts of arrays, by sorted key): what the golden values were computed from."""
    h = hashlib.sha256()
    for item in arrays_or_dicts:
        items = sorted(item.items()) if isinstance(item, dict) else [("", item)]
        for k, a in items:
            a = np.ascontiguousarray(a)
            h.update(f"{k}:{a.dtype}:{a.shape}\n".encode())
            h.update(a.tobytes())
    return h.hexdigest()
