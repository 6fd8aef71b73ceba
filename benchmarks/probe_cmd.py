"""Probe a trained CMD: is the content frame a frame, does the motion latent carry the motion, what does sampling cost?

    python -m benchmarks.probe_cmd run_dir=runs/cmd-shapes-<time>        # probes + cost of that run's model
    python -m benchmarks.probe_cmd scale=tiny                             # cost only (untrained weights)

Probes (shapes data: items carry the sprite's shape and colour):
- content: a small CNN trained on *real frames* to tell the sprite's shape and colour is scored on
  CMD's content frames of held-out clips (and on real frames, the ceiling); plus the L1 distance
  from the content frame to the nearest real frame of its clip.
- motion: a linear (logistic-regression) probe on the flattened motion latent z predicts the
  motion class of held-out clips (chance = 1 / classes); the same probe on the content frame
  is the contrast.
Generation (n_generate=N, class-conditional data): the shapes evaluator's motion-class accuracy
on decodes of real/generated content frames x real/generated motion latents of N held-out clips:
which of the two diffusion models loses the conditioning.
Cost: FLOPs (torch.utils.flop_counter, split by sub-network) and wall time per generated video
for CMD and the VDM baseline at the same data size, each with its own configured sampler steps.
Other key=value arguments are run-config overrides (method=..., dataset=..., scale=...).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.common import build_datamodule, build_method, data_spec
from benchmarks.config import load_config
from methods.base import Conditioning, VideoGenerator

PROBE_KEYS = ("run_dir", "n_train", "n_val", "probe_steps", "cost_batch", "out", "n_generate")


def load_run(run_dir: Path):
    """(config, datamodule, method with the last finished stage's weights) of a benchmarks.run folder."""
    from benchmarks.evaluate import _run_config
    from benchmarks.run_folder import RunFolder

    folder = RunFolder(run_dir)
    if not folder.has_run():
        raise SystemExit(f"error: {folder.config_path} not found: run_dir= wants a benchmarks.run folder")
    cfg = _run_config(run_dir, [])
    dm = build_datamodule(cfg)
    method = build_method(cfg, data_spec(cfg, dm))
    try:
        final = folder.final_checkpoint(method.stages)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    method.load_state_dict(torch.load(final, map_location="cpu", weights_only=True))
    return cfg, dm, method.eval()


def clips(dm, split: str, n: int) -> dict[str, Tensor]:
    ds = dm.dataset(split)
    items = [ds[i % len(ds)] for i in range(n)]
    out = {"video": torch.stack([it["video"] for it in items]), "label": torch.tensor([it["label"] for it in items])}
    for key in ("shape", "color"):
        if all(key in it for it in items):
            out[key] = torch.tensor([it[key] for it in items])
    return out


@torch.no_grad()
def encode_all(method, video: Tensor, batch: int = 32) -> tuple[Tensor, Tensor]:
    """(content frames in pixels (N, C, H, W), motion latents (N, D, T, S)) of videos (N, C, T, H, W)."""
    contents, zs = [], []
    for start in range(0, len(video), batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            c, z = method.encode(video[start:start + batch])
            contents.append(method.content.decode(c).float())
        zs.append(z.float())
    return torch.cat(contents), torch.cat(zs)


class AppearanceProbe(nn.Module):
    """A small CNN: frame (B, C, H, W) -> (shape logits, colour logits)."""

    def __init__(self, channels: int, shapes: int, colors: int) -> None:
        super().__init__()
        self.shapes = shapes
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, 2, 1), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
            nn.Conv2d(64, 64, 3, 2, 1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, shapes + colors))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(x)
        return out[:, : self.shapes], out[:, self.shapes:]


def content_probe(train: dict, val: dict, val_content: Tensor, steps: int) -> dict:
    """Accuracy of a real-frame shape/colour classifier on content frames vs real frames."""
    torch.manual_seed(0)
    shapes, colors = int(train["shape"].max()) + 1, int(train["color"].max()) + 1
    probe = AppearanceProbe(train["video"].shape[1], shapes, colors)
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3)
    video = train["video"]
    for _ in range(steps):
        i = torch.randint(0, len(video), (64,))
        frames = video[i, :, torch.randint(0, video.shape[2], (64,))]  # one random real frame per clip (64, C, H, W)
        s_logits, c_logits = probe(frames)
        loss = nn.functional.cross_entropy(s_logits, train["shape"][i]) + nn.functional.cross_entropy(
            c_logits, train["color"][i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe.eval()

    def score(frames: Tensor) -> dict:
        with torch.no_grad():
            s_logits, c_logits = probe(frames)
        return {"shape_acc": (s_logits.argmax(-1) == val["shape"]).float().mean().item(),
                "color_acc": (c_logits.argmax(-1) == val["color"]).float().mean().item()}

    v = val["video"]
    nearest = (val_content[:, :, None] - v).abs().mean(dim=(1, 3, 4)).min(dim=1).values  # (N,) over frames
    mean_frame = (v.mean(dim=2, keepdim=True) - v).abs().mean(dim=(1, 3, 4)).min(dim=1).values
    return {"real_frame": score(v[:, :, v.shape[2] // 2]), "content_frame": score(val_content),
            "content_to_nearest_frame_l1": nearest.mean().item(), "mean_frame_to_nearest_frame_l1": mean_frame.mean().item()}


def linear_probe(x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor, steps: int = 300) -> float:
    """Held-out accuracy of multinomial logistic regression on standardised flattened features."""
    x_train, x_val = x_train.flatten(1), x_val.flatten(1)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_val = (x_train - mu) / sd, (x_val - mu) / sd
    classes = int(max(y_train.max(), y_val.max())) + 1
    lin = nn.Linear(x_train.shape[1], classes)
    opt = torch.optim.LBFGS(lin.parameters(), lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lin(x_train), y_train) + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (lin(x_val).argmax(-1) == y_val).float().mean().item()


@torch.no_grad()
def generation_probe(method, cfg, val: dict, n: int, batch: int = 16, class_names: list[str] | None = None) -> dict:
    """Where conditional accuracy is lost: the shapes evaluator's motion-class accuracy on decodes of
    (real content, real z) = reconstruction, (real content, generated z), (generated content, real z)
    and (generated content, generated z) = a sample, for held-out clips and their labels; under
    "per_class", each pair's accuracy per class (keyed by `class_names` where given): which motions a model loses.

    Generated parts use the run's samplers, steps and guidance (Algorithm 1); "generated z" is
    conditioned on the real content frame in the second pair and on the generated one in the last.
    """
    from evaluation.detectors import load_detector

    det = load_detector("shapes", None)
    c_steps, m_steps, w_c, w_m = method.sampling_settings(cfg.sample.steps, cfg.sample.guidance)
    g = torch.Generator().manual_seed(cfg.seed)
    autocast = cfg.trainer.precision.startswith("bf16")

    def motion(cond, content):
        return method.sample_motion(cond, content, steps=m_steps, guidance=w_m, generator=g)

    pair_names = ("real_content_real_z", "real_content_generated_z", "generated_content_real_z",
                  "generated_content_generated_z")
    classes = method.data.num_classes
    hits = {k: torch.zeros(classes, dtype=torch.long) for k in pair_names}  # per class
    counts = torch.zeros(classes, dtype=torch.long)
    for start in range(0, n, batch):
        video, label = val["video"][start:start + batch], val["label"][start:start + batch]
        cond = Conditioning(label=label)
        counts += torch.bincount(label, minlength=classes)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            c_real, z_real = method.encode(video)
            c_gen = method.content.sample(len(video), cond, steps=c_steps, guidance=w_c, generator=g)
            pairs = {"real_content_real_z": (c_real, z_real), "real_content_generated_z": (c_real, motion(cond, c_real)),
                     "generated_content_real_z": (c_gen, z_real),
                     "generated_content_generated_z": (c_gen, motion(cond, c_gen))}
            for key, (c, z) in pairs.items():
                decoded = method.from_space(method.autoencoder.decode(c, z)).float()
                right = det.probs(decoded).argmax(-1) == label
                hits[key] += torch.bincount(label[right], minlength=classes)
    total = int(counts.sum())
    names = class_names if class_names is not None and len(class_names) == classes else [str(c) for c in range(classes)]
    per_class = {k: {names[c]: (int(h[c]) / int(counts[c]) if counts[c] else None) for c in range(classes)}
                 for k, h in hits.items()}
    return {k: int(h.sum()) / total for k, h in hits.items()} | {"n": total, "per_class": per_class}


def sampling_cost(method: VideoGenerator, cfg, batch: int) -> dict:
    """FLOPs of one generated video (split by top-level sub-network) and wall seconds per video."""
    from torch.utils.flop_counter import FlopCounterMode

    method.eval()
    classes = method.data.num_classes

    def cond(n: int) -> Conditioning:
        return Conditioning(label=torch.arange(n) % classes) if classes else Conditioning()

    kwargs = {"steps": cfg.sample.steps, "guidance": cfg.sample.guidance, "generator": torch.Generator().manual_seed(0)}
    counter = FlopCounterMode(display=False, depth=2)
    with counter, torch.no_grad():
        method.sample(1, cond(1), **kwargs)
    # the counter keys modules by the class of the outermost module called (e.g. UNet, MotionDenoiser,
    # SpaceTimeTransformer for CMD's content model, motion model and decoder)
    split = {k: sum(v.values()) for k, v in counter.get_flop_counts().items() if "." not in k and k != "Global"}
    out = {"gflops_per_video": counter.get_total_flops() / 1e9, "gflops_by_module": {k: v / 1e9 for k, v in split.items()},
           "params": method.num_parameters()}
    autocast = cfg.trainer.precision.startswith("bf16")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        method.sample(1, cond(1), **{**kwargs, "steps": 1})  # warm-up (lazy initialisation, allocator)
    for n in sorted({1, batch}):
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            method.sample(n, cond(n), **kwargs)
        out[f"seconds_per_video_batch{n}"] = (time.perf_counter() - t0) / n
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return {}
    opts = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in PROBE_KEYS)
    overrides = [a for a in argv if a.split("=", 1)[0] not in PROBE_KEYS]
    report: dict = {}
    if "run_dir" in opts:
        cfg, dm, cmd = load_run(Path(opts["run_dir"]))
        n_train, n_val = int(opts.get("n_train", 1024)), int(opts.get("n_val", 256))
        train, val = clips(dm, "train", n_train), clips(dm, "val", n_val)
        t0 = time.perf_counter()
        train_content, train_z = encode_all(cmd, train["video"])
        val_content, val_z = encode_all(cmd, val["video"])
        classes = int(train["label"].max()) + 1
        report["motion_probe"] = {
            "z_motion_acc": linear_probe(train_z, train["label"], val_z, val["label"]),
            "content_motion_acc": linear_probe(train_content, train["label"], val_content, val["label"]),
            "chance": 1 / classes, "z_shape": list(train_z.shape[1:])}
        if "shape" in train and "color" in train:
            report["content_probe"] = content_probe(train, val, val_content, int(opts.get("probe_steps", 300)))
            report["motion_probe"]["z_color_acc"] = linear_probe(train_z, train["color"], val_z, val["color"])
        if "n_generate" in opts and cmd.data.num_classes:
            report["motion_class_accuracy"] = generation_probe(cmd, cfg, val, int(opts["n_generate"]),
                                                               class_names=getattr(dm, "class_names", None))
        report["probe_seconds"] = time.perf_counter() - t0
        cost_overrides = [f"scale={cfg.scale}", f"dataset={cfg.dataset.name}"]
    else:
        cfg = load_config(["method=cmd", *overrides])
        cmd = build_method(cfg, data_spec(cfg, build_datamodule(cfg)))
        cost_overrides = overrides
    batch = int(opts.get("cost_batch", 4))
    report["cost"] = {"cmd": sampling_cost(cmd, cfg, batch)}
    vdm_cfg = load_config(["method=vdm", *[o for o in cost_overrides if not o.startswith("method")]])
    vdm = build_method(vdm_cfg, cmd.data)
    report["cost"]["vdm"] = sampling_cost(vdm, vdm_cfg, batch)
    c, v = report["cost"]["cmd"], report["cost"]["vdm"]
    report["cost"]["vdm_over_cmd_flops"] = v["gflops_per_video"] / c["gflops_per_video"]
    report["cost"]["vdm_over_cmd_seconds"] = v[f"seconds_per_video_batch{batch}"] / c[f"seconds_per_video_batch{batch}"]
    text = json.dumps(report, indent=2)
    print(text)
    if "out" in opts:
        Path(opts["out"]).write_text(text)
    return report


if __name__ == "__main__":
    main()
