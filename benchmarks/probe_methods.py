"""Probes of ED-VDM's codec loop, PVDM's clip length / long videos (issue #12 sections 3 and 4), any method's flicker and
whether an image-to-video run continues the frame it is given.

    python -m benchmarks.probe_methods edvdm-loop [run_dir=R] [n=256] [noise=0.02] [ae_steps=200] [out=DIR] [overrides]
    python -m benchmarks.probe_methods pvdm-cost [scales=test,tiny,paper] [batch=4] [time=false] [out=DIR]
    python -m benchmarks.probe_methods long-video run_dir=R [clips=4] [n=128] [out=DIR]   (pvdm-long: the same)
    python -m benchmarks.probe_methods videofusion-base run_dir=R [n=64] [out=DIR]
    python -m benchmarks.probe_methods pvdm-ae [seconds=75 | steps=N] [n=64] [overrides, e.g. stages.autoencoder.lr=3e-4]
    python -m benchmarks.probe_methods ae-seeds [seeds=0,1,2] [n=128] [out=DIR] [overrides, e.g. method=cmd scale=tiny]
    python -m benchmarks.probe_methods i2v-protocol run_dir=R [eval.num_samples=N] [sample.guidance=S] [out=DIR]
    python -m benchmarks.probe_methods flicker run_dir=R [n=32] [guidance=1,2,4,6] [steps=25,50] [out=DIR]
    python -m benchmarks.probe_methods i2v-follow run_dir=R [n=64] [seed=S] [out=DIR]

edvdm-loop: the codec's reconstruction of n held-out clips (the I-frame given, every P-frame rebuilt from
its motion vectors and its coded residual), in the open loop (residuals against the original previous
frame) and the closed loop (against the decoded previous frame), for residual coders: `noise` (the
residual plus Gaussian noise of that std: a coder whose error is known), and trained residual
autoencoders: the run's (run_dir=) or, without one, two trained here for ae_steps steps with the
method's own loss, one in each loop (fp32, AdamW at the stage's lr / batch / betas, no EMA). Writes
out/edvdm_loop.csv (coder, loop, frame, mae: mean absolute error of frame `frame` over clips, pixels in
[-1, 1]), out/edvdm_loop.png (the curves) and out/edvdm_loop.json (curves, R-FVD of each reconstruction
against its real clips with the shapes evaluator, autoencoder step costs).

pvdm-cost: per preset, the tri-plane latent and what one training step costs at the default clip length
(dataset.frames) and at the earlier one (dataset.frames / 2): latent tokens, FLOPs of one diffusion-stage
and autoencoder-stage step at `batch` (torch.utils.flop_counter), and the best of 3 timed steps (test,
tiny, unless time=false; the paper preset is counted, not timed, on a CPU).

long-video: a trained run of a method with a long-video mode generates n videos of `clips` clips with
`sample_long`, each conditioned like real val clip i: PVDM (its clip length, each clip conditioned on the
previous clip's latent; also the same number with every clip sampled independently, no previous-clip
latent: the no-memory contrast) or D-VDM / ED-VDM (the first clip from val clip i's first frame, every
further clip from the last frame generated so far). Against n real shapes clips of the same
length (dataset.frames = clips x clip length: the sprite keeps moving, wrapping at the edges), it
reports FVD of the whole videos (the shapes evaluator sees 16 evenly spaced frames), FVD per clip index
(clip k of generated vs clip k of real videos) and how appearance survives the clip boundaries: the
rate at which the shapes evaluator's colour / shape / background heads predict the same value on the
first and the last clip of a video (and, as the chance level, on the first clip of video i and the last
clip of video i+1). Written to out/<method>_long.json.

videofusion-base: a trained VideoFusion run generates n pairs of videos, the two of a pair conditioned on
two different motion classes, once with the pair sharing the base noise b of the start noise (residuals
independent) and once with independent bases; the shapes evaluator's heads give the rate at which a pair
agrees on colour / shape / background, and every video's motion-class accuracy. Written to
out/videofusion_base.json.

pvdm-ae: PVDM's autoencoder stage trained alone for `seconds` (or exactly `steps` steps: a load-independent
comparison) with the run config's settings (overrides apply), then the L1 of n val clips' reconstructions,
their R-FVD (shapes evaluator) and the evaluator's motion-class accuracy on them (printed as JSON).

ae-seeds: is an autoencoder setting reliable across initialisations? For each seed, the autoencoder stage of
`benchmarks.run <overrides> seed=<seed>` trained alone, exactly as that run trains it (the same seeding, data
order, loss, optimiser, schedule and Lightning loop: `benchmarks.run.train_stages` on a temporary run folder, so
a seed's figures are those of the whole run's autoencoder), then the L1 of n val clips' reconstructions, their
R-FVD against those clips and the shapes evaluator's motion-class accuracy on them (a failed autoencoder
loses the motion: 0.43 where the others keep 0.92 or more). One row per seed in out/<method>_ae_seeds.jsonl (appended),
then min / median / max. Default method: cmd.

i2v-protocol: a trained D-VDM / ED-VDM run scored under the earlier image-to-video protocol (first frames
of the training split's clips, which are the FVD reference's clips) and the current one (held-out val
clips), same seed and n. Written to out/i2v_protocol.json.

flicker: a trained run samples n videos (conditioned like val clips 0..n-1, the same seed) at each
sampling setting of the grid `guidance` x `steps` (default: the run's own), and reports their mean frame
change (evaluation.sanity.frame_motion) as a ratio to n real val clips' (about 1: moves like the data;
several: frames that do not follow one another) and the shapes evaluator's motion-class accuracy on them:
whether a run's flicker (benchmarks.motion_check) comes from how it is sampled or from the model.
Written to out/<method>_flicker.json.

i2v-follow: does an image-to-video run continue the frame it is given? It samples n videos conditioned like
val clips 0..n-1 (their first frame and class: what the run's samples and the evaluation are conditioned on)
and compares frame t of video i with frame t of real clip i, whose first frame it was given and whose class
it was asked for: the mean absolute error per frame (pixels in [-1, 1]), beside two references on the
same clips: `first frame held` (the given frame repeated, the static floor's video: what not moving costs)
and `another clip` (video i against clip i+1: what an unrelated video costs). Motion-class accuracy can be
high while a model redraws the sprite elsewhere instead of moving the one it was given; this shows it:
a model that follows its first frame stays below `first frame held` in the first frames. Written to
out/<method>_follow.json and out/<method>_follow.png.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.common import build_datamodule, build_method, data_spec
from benchmarks.config import load_config, stage_settings
from methods import codec
from methods.base import Conditioning

PROBE_KEYS = ("run_dir", "n", "noise", "ae_steps", "out", "scales", "batch", "clips", "batch_size", "seed", "time",
              "seconds", "steps", "guidance", "seeds")
DEFAULT_OUT = "results/probes"


# --- shared -------------------------------------------------------------------------------------


def _fvd(a: Tensor, b: Tensor) -> float:
    from evaluation.frechet import GaussianStats, fvd_from_stats

    return fvd_from_stats(GaussianStats.from_features(a.double()), GaussianStats.from_features(b.double()))


def _features(det, videos: Tensor, batch: int = 64) -> Tensor:
    return torch.cat([det.features(videos[i:i + batch]).float() for i in range(0, len(videos), batch)])


def _heads(det, videos: Tensor, batch: int = 64) -> dict[str, Tensor]:
    out: dict[str, list[Tensor]] = {}
    for i in range(0, len(videos), batch):
        for k, v in det.heads(videos[i:i + batch]).items():
            out.setdefault(k, []).append(v.argmax(-1))
    return {k: torch.cat(v) for k, v in out.items()}


def _real(cfg, split: str, n: int, frames: int | None = None) -> dict[str, Tensor]:
    """n clips of `split` (optionally `frames` long) with labels and, for shapes, their appearance attributes."""
    dm = build_datamodule(cfg)
    ds = dm.dataset(split, frames)
    items = [ds[i % len(ds)] for i in range(n)]
    out = {"video": torch.stack([it["video"] for it in items]), "label": torch.tensor([it["label"] for it in items])}
    for key in ("shape", "color", "background"):
        if all(key in it for it in items):
            out[key] = torch.tensor([it[key] for it in items])
    return out


def _load_run(run_dir: str):
    from benchmarks.probe_cmd import load_run

    return load_run(Path(run_dir))


def _trained_run(opts: dict, overrides: list[str], probe: str, takes: str, image_to_video: bool = False):
    """(cfg, dm, method) of the run_dir= run of a probe that takes no config overrides, or a clear error."""
    what = "a trained image-to-video run: method=dvdm or edvdm" if image_to_video else "a trained benchmarks.run folder"
    if "run_dir" not in opts:
        raise SystemExit(f"error: {probe} needs run_dir= ({what})")
    if overrides:
        raise SystemExit(f"error: {probe} takes {takes}; got {overrides}")
    cfg, dm, method = _load_run(opts["run_dir"])
    if image_to_video and not method.image_to_video:
        raise SystemExit(f"error: {probe} needs {what}, not {cfg.method.name}")
    return cfg, dm, method


def _plain(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def _write_json(out: Path, name: str, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(report, indent=2))
    print(f"wrote {out / name}")


# --- ED-VDM: open vs closed codec loop ----------------------------------------------------------


def codec_roundtrip(video: Tensor, block: int, search: int, code, loop: str, match: str = "original") -> Tensor:
    """The codec's reconstruction (B, C, T, H, W) of `video` with residual coder `code` (residual frames ->
    decoded residual frames) in the open or closed loop, decoded as ED-VDM decodes (clamped, from x_1)."""
    if loop == "closed":
        return codec.decompose_closed_loop(video, block, search, code, clamp=1.0, match=match)[2].float()
    mv, r = codec.decompose(video, block, search)
    r_hat = torch.stack([code(r[:, :, i]).to(r.dtype) for i in range(r.shape[2])], dim=2)
    return codec.reconstruct(video[:, :, 0], mv, r_hat, block, clamp=1.0, dtype=torch.float32)


def per_frame_error(recon: Tensor, video: Tensor) -> list[float]:
    """Mean absolute error per frame index (over clips, channels and pixels): a list of T values."""
    return (recon.float() - video.float()).abs().mean(dim=(0, 1, 3, 4)).tolist()


def train_residual_autoencoder(cfg, loop: str, steps: int, seed: int = 0) -> tuple[object, dict]:
    """An ED-VDM whose residual autoencoder trained `steps` steps in `loop` with the method's own loss."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(cfg, {"method": {"codec": {"loop": loop}}})
    dm = build_datamodule(cfg)
    torch.manual_seed(seed)
    method = build_method(cfg, data_spec(cfg, dm))
    st = stage_settings(cfg, "residual_autoencoder")
    opt = torch.optim.AdamW(method.stage_parameters("residual_autoencoder"), lr=st["lr"], betas=tuple(st["betas"]),
                            weight_decay=0.0)
    loader = dm.loader_for("train", shuffle=True, drop_last=True, batch_size=st["batch_size"], seed=seed)
    it, seconds, losses = iter(loader), [], []
    method.train()
    for step in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        t0 = time.perf_counter()
        loss = method.loss("residual_autoencoder", batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        seconds.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == steps - 1:
            print(f"  [{loop}-loop autoencoder] step {step + 1}/{steps} l1 {losses[-1]:.4f} ({seconds[-1]:.2f} s)")
    return method.eval(), {"steps": steps, "batch_size": st["batch_size"], "lr": st["lr"],
                           "median_step_seconds": sorted(seconds)[len(seconds) // 2] if seconds else None,
                           "final_l1": sum(losses[-20:]) / max(1, len(losses[-20:]))}


def autoencoder_step_flops(cfg, loop: str, batch_size: int) -> float:
    """FLOPs of one residual-autoencoder training step (forward + backward) in `loop`, at batch_size clips."""
    from omegaconf import OmegaConf
    from torch.utils.flop_counter import FlopCounterMode

    cfg = OmegaConf.merge(cfg, {"method": {"codec": {"loop": loop}}})
    dm = build_datamodule(cfg)
    method = build_method(cfg, data_spec(cfg, dm))
    batch = next(iter(dm.loader_for("train", batch_size=batch_size)))
    counter = FlopCounterMode(display=False)
    with counter:
        method.loss("residual_autoencoder", batch)["loss"].backward()
    return counter.get_total_flops()


def edvdm_loop(opts: dict, overrides: list[str]) -> dict:
    from evaluation.detectors import load_detector

    n, std = int(opts.get("n", 256)), float(opts.get("noise", 0.02))
    out = Path(opts.get("out", DEFAULT_OUT))
    if "run_dir" in opts:
        cfg, _, run_method = _load_run(opts["run_dir"])
    else:
        cfg, run_method = load_config(["method=edvdm", "scale=tiny", *overrides]), None
    if cfg.method.name != "edvdm":
        raise SystemExit(f"error: edvdm-loop probes ED-VDM, got method={cfg.method.name}")
    block, search, match = cfg.method.codec.block, cfg.method.codec.search, cfg.method.codec.match
    val = _real(cfg, "val", n)
    video = val["video"]
    det = load_detector("shapes", None)
    real_feats = _features(det, video)
    report: dict = {"n": n, "frames": video.shape[2], "resolution": video.shape[-1], "block": block, "search": search,
                    "match": match, "config_loop": cfg.method.codec.loop, "curves": {}, "r_fvd": {}, "mean_mae": {}}
    rows = []

    def score(coder: str, loop: str, recon: Tensor) -> None:
        curve = per_frame_error(recon, video)
        key = f"{coder}/{loop}"
        report["curves"][key] = curve
        report["mean_mae"][key] = sum(curve[1:]) / (len(curve) - 1)
        report["r_fvd"][key] = _fvd(_features(det, recon.clamp(-1, 1)), real_feats)
        rows.extend({"coder": coder, "loop": loop, "frame": i, "mae": e} for i, e in enumerate(curve))
        print(f"{key:>28}: mae frame 1 {curve[1]:.4f}, frame {len(curve) // 2} {curve[len(curve) // 2]:.4f}, "
              f"last {curve[-1]:.4f}; R-FVD {report['r_fvd'][key]:.2f}")

    g = torch.Generator().manual_seed(0)
    noise = f"noise{std:g}"
    for loop in ("open", "closed"):
        g.manual_seed(0)
        score(noise, loop, codec_roundtrip(video, block, search,
                                           lambda r: r + std * torch.randn(r.shape, generator=g, dtype=r.dtype),
                                           loop, match))
    trained: dict[str, object] = {}
    if run_method is not None:
        trained[f"run-ae({cfg.method.codec.loop}-trained)"] = run_method
    elif int(opts.get("ae_steps", 200)) > 0:
        report["autoencoder_training"] = {}
        steps = int(opts.get("ae_steps", 200))
        for loop in ("open", "closed"):
            saved = out / f"edvdm_loop_ae_{loop}_{steps}.pt"  # reused by a re-run with the same config and steps
            if saved.exists() and (state := torch.load(saved, weights_only=False))["config"] == _plain(cfg):
                method = build_method(cfg, data_spec(cfg, build_datamodule(cfg)))
                method.load_state_dict(state["weights"])
                method.cfg.codec.loop = loop
                method.eval()
                info = state["info"]
            else:
                method, info = train_residual_autoencoder(cfg, loop, steps)
                out.mkdir(parents=True, exist_ok=True)
                torch.save({"config": _plain(cfg), "info": info, "weights": method.state_dict()}, saved)
            trained[f"ae({loop}-trained)"] = method
            report["autoencoder_training"][loop] = info
    bs = stage_settings(cfg, "residual_autoencoder")["batch_size"]
    report["autoencoder_step_gflops"] = {loop: autoencoder_step_flops(cfg, loop, bs) / 1e9 for loop in ("open", "closed")}
    for name, method in trained.items():
        for loop in ("open", "closed"):
            method.cfg.codec.loop = loop
            with torch.no_grad():
                recon = torch.cat([method.reconstruct(video[i:i + 64]) for i in range(0, n, 64)])
            score(name, loop, recon)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "edvdm_loop.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["coder", "loop", "frame", "mae"])
        w.writeheader()
        w.writerows(rows)
    _plot_curves(report["curves"], out / "edvdm_loop.png",
                 f"ED-VDM codec reconstruction, {n} shapes val clips {video.shape[-1]}x{video.shape[-1]}x{video.shape[2]}"
                 f" (block {block}, search {search})")
    _write_json(out, "edvdm_loop.json", report)
    print(f"wrote {out / 'edvdm_loop.csv'} and {out / 'edvdm_loop.png'}")
    return report


def _plot_lines(lines: list[tuple[list[float], dict]], path: Path, title: str, xlabel: str, ylabel: str) -> None:
    """One curve per (values over the frame index, matplotlib line style) in `lines`, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for curve, style in lines:
        ax.plot(range(len(curve)), curve, marker=".", **style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_curves(curves: dict[str, list[float]], path: Path, title: str) -> None:
    """The codec-loop curves ("<coder>/<loop>"): one colour per coder, solid for the closed loop."""
    colors: dict[str, str] = {}
    lines = []
    for key, curve in curves.items():
        coder, loop = key.rsplit("/", 1)
        color = colors.setdefault(coder, f"C{len(colors)}")
        lines.append((curve, {"color": color, "linestyle": "-" if loop == "closed" else "--",
                              "label": f"{coder}, {loop} loop"}))
    _plot_lines(lines, path, title, "frame index (0 = the given I-frame)",
                "mean |reconstruction - frame|  (pixels in [-1, 1])")


# --- PVDM: the cost of the clip length ----------------------------------------------------------


def _step_cost(method, stage: str, batch, timed: bool) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    torch.manual_seed(0)
    with counter:
        method.loss(stage, batch)["loss"].backward()
    out = {"gflops": counter.get_total_flops() / 1e9}
    if timed:
        best = float("inf")
        for _ in range(3):
            torch.manual_seed(0)
            t0 = time.perf_counter()
            method.loss(stage, batch)["loss"].backward()
            best = min(best, time.perf_counter() - t0)
        out["seconds_best_of_3"] = best
    method.zero_grad(set_to_none=True)
    return out


def pvdm_cost(opts: dict, overrides: list[str]) -> dict:
    scales = opts.get("scales", "test,tiny,paper").split(",")
    bs = int(opts.get("batch", 4))
    report: dict = {"batch": bs, "scales": {}}
    for scale in scales:
        base = load_config(["method=pvdm", f"scale={scale}", *overrides])
        F = base.dataset.frames
        rows = {}
        for label, clip in (("clip=dataset.frames (default)", 0), ("clip=dataset.frames/2 (earlier default)", F // 2)):
            cfg = load_config(["method=pvdm", f"scale={scale}", f"method.clip_frames={clip}", *overrides])
            dm = build_datamodule(cfg)
            torch.manual_seed(0)
            method = build_method(cfg, data_spec(cfg, dm))
            batch = next(iter(dm.loader_for("train", batch_size=bs)))
            lay = method.layout
            row = {"clip_frames": method.clip_frames, "clips_per_video": F // method.clip_frames,
                   "train_item_frames": batch.video.shape[2], "plane_sizes": [list(s) for s in lay.shapes],
                   "latent_shape": list(method.latent_shape), "latent_tokens": lay.length,
                   "latent_numbers_per_video": lay.length * method.latent_shape[0] * F // method.clip_frames,
                   "params_m": method.num_parameters() / 1e6}
            timed = scale != "paper" and opts.get("time", "true") != "false"
            for stage in method.stages:
                row[stage] = _step_cost(method, stage, batch, timed)
            rows[label] = row
            print(f"[{scale}] {label}: {json.dumps(row)}")
        report["scales"][scale] = {"frames": F, "resolution": base.dataset.resolution, **rows}
    if "out" in opts:
        _write_json(Path(opts["out"]), "pvdm_cost.json", report)
    return report


# --- PVDM: long videos --------------------------------------------------------------------------


@torch.no_grad()
def _sample_long(method, n: int, cond: Conditioning, clips: int, steps: int, guidance: float, eta: float, seed: int,
                 batch: int, chained: bool, autocast: bool) -> Tensor:
    out = []
    g = torch.Generator().manual_seed(seed)
    for s in range(0, n, batch):
        m, c = min(n, s + batch) - s, cond.slice(s, min(n, s + batch))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if chained:
                v = method.sample_long(m, c, clips, steps=steps, guidance=guidance, generator=g, eta=eta)
            else:  # every clip on zeros: the same model without the previous clip's latent
                v = torch.cat([method.autoencoder.decode(method.sample_latent(m, c, None, steps=steps, guidance=guidance,
                                                                              generator=g, eta=eta)).float()
                               for _ in range(clips)], dim=2).clamp(-1, 1)
        out.append(v.float())
        print(f"  sampled {s + m}/{n} ({'chained' if chained else 'independent'})")
    return torch.cat(out)


def appearance_retention(det, videos: Tensor, clip: int) -> dict:
    """Rates at which the evaluator's colour / shape / background heads agree between the first and last clip."""
    first, last = _heads(det, videos[:, :, :clip]), _heads(det, videos[:, :, -clip:])
    out = {}
    keys = [k for k in ("color", "shape", "background") if k in first]
    for k in keys:
        out[f"{k}_same"] = (first[k] == last[k]).float().mean().item()
        out[f"{k}_same_chance"] = (first[k] == last[k].roll(1)).float().mean().item()  # another video's last clip
    same_all = torch.stack([first[k] == last[k] for k in ("color", "shape")]).all(0)
    out["color_and_shape_same"] = same_all.float().mean().item()
    out["first_clip"] = {k: v.tolist() for k, v in first.items() if k in keys}
    return out


def long_video(opts: dict, overrides: list[str]) -> dict:
    from evaluation.detectors import load_detector

    if "run_dir" not in opts:
        raise SystemExit("error: long-video needs run_dir= (a trained benchmarks.run folder of a method with a "
                         "long-video mode: pvdm, dvdm, edvdm)")
    cfg, _, method = _load_run(opts["run_dir"])
    if not method.long_video:
        raise SystemExit(f"error: {cfg.method.name} has no long-video mode (sample_long); pvdm chains clips on "
                         f"latents, dvdm and edvdm on their last frame")
    clips, n = int(opts.get("clips", 4)), int(opts.get("n", 128))
    T = getattr(method, "clip_frames", method.data.frames)
    frames = clips * T
    real = _real(cfg, "val", n, frames)
    det = load_detector("shapes", None)
    label = real["label"] if method.data.num_classes else None
    cond = Conditioning(label=label, first_frame=real["video"][:, :, 0] if method.image_to_video else None)
    kw = dict(steps=cfg.sample.steps, guidance=cfg.sample.guidance, eta=cfg.sample.eta, seed=int(opts.get("seed", 0)),
              batch=int(opts.get("batch_size", 32)), autocast=str(cfg.trainer.precision).startswith("bf16"))
    t0 = time.perf_counter()
    gen = {"chained": _sample_long(method, n, cond, clips, chained=True, **kw)}
    if not method.image_to_video:  # the no-memory contrast (an image-to-video clip always starts from a frame)
        gen["independent"] = _sample_long(method, n, cond, clips, chained=False, **kw)
    mode = "clip k+1 starts from clip k's last frame" if method.image_to_video else "clip k+1 conditioned on clip k's latent"
    report: dict = {"run_dir": opts["run_dir"], "method": cfg.method.name, "mode": mode, "clip_frames": T,
                    "clips": clips, "frames": frames, "n": n,
                    "sample_steps": cfg.sample.steps, "guidance": cfg.sample.guidance, "eta": cfg.sample.eta,
                    "sample_seconds": time.perf_counter() - t0}
    rv = real["video"]
    real_feats = _features(det, rv)
    real_clip_feats = [_features(det, rv[:, :, k * T:(k + 1) * T]) for k in range(clips)]
    report["real"] = {"appearance": appearance_retention(det, rv, T)}
    real_first = report["real"]["appearance"].pop("first_clip")
    report["real"]["first_clip_accuracy"] = {k: (torch.tensor(v) == real[k]).float().mean().item()
                                             for k, v in real_first.items() if k in real}
    for name, videos in gen.items():
        r = {"fvd_long": _fvd(_features(det, videos), real_feats),
             "fvd_per_clip": [_fvd(_features(det, videos[:, :, k * T:(k + 1) * T]), real_clip_feats[k])
                              for k in range(clips)],
             "appearance": appearance_retention(det, videos, T)}
        r["appearance"].pop("first_clip")
        report[name] = r
        print(f"{name}: FVD{frames} {r['fvd_long']:.1f}, per clip {[round(x, 1) for x in r['fvd_per_clip']]}, "
              f"colour kept {r['appearance']['color_same']:.3f} (chance {r['appearance']['color_same_chance']:.3f}), "
              f"shape kept {r['appearance']['shape_same']:.3f} (chance {r['appearance']['shape_same_chance']:.3f})")
    _write_json(Path(opts.get("out", DEFAULT_OUT)), f"{cfg.method.name}_long.json", report)
    return report


# --- VideoFusion: a shared base noise fixes the content -----------------------------------------


def pair_agreement(heads: dict[str, Tensor]) -> dict[str, float]:
    """Rates at which videos 2i and 2i+1 get the same colour / shape / background (and colour and shape) from the
    evaluator's heads (argmax per video)."""
    out = {}
    for k in ("color", "shape", "background"):
        if k in heads:
            out[f"{k}_same"] = (heads[k][0::2] == heads[k][1::2]).float().mean().item()
    if "color" in heads and "shape" in heads:
        out["color_and_shape_same"] = ((heads["color"][0::2] == heads["color"][1::2])
                                       & (heads["shape"][0::2] == heads["shape"][1::2])).float().mean().item()
    return out


def videofusion_base(opts: dict, overrides: list[str]) -> dict:
    """n pairs of videos conditioned on two different motion classes: pairs that share the base noise b of the
    start noise against pairs with independent bases. The paper's claim: the base carries the content (colour,
    shape, background agree), the residuals and the condition the motion (each video's class still read)."""
    from evaluation.detectors import load_detector

    if "run_dir" not in opts:
        raise SystemExit("error: videofusion-base needs run_dir= (a trained benchmarks.run folder of method=videofusion)")
    cfg, _, method = _load_run(opts["run_dir"])
    if cfg.method.name != "videofusion":
        raise SystemExit(f"error: videofusion-base probes VideoFusion, got method={cfg.method.name}")
    K = method.data.num_classes
    if not K or K < 2:
        raise SystemExit("error: videofusion-base needs a class-conditional run with at least 2 classes")
    n, batch, seed = int(opts.get("n", 64)), int(opts.get("batch_size", 32)) // 2 * 2 or 2, int(opts.get("seed", 0))
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, K, (n,), generator=g)
    labels = torch.stack([first, (first + torch.randint(1, K, (n,), generator=g)) % K], dim=1).reshape(-1)  # 2i != 2i+1
    C, H, W = method.base.image_shape
    bases = {"shared": torch.randn(n, C, H, W, generator=g).repeat_interleave(2, dim=0),
             "independent": torch.randn(2 * n, C, H, W, generator=g)}
    det = load_detector("shapes", None)
    autocast = str(cfg.trainer.precision).startswith("bf16")
    report: dict = {"run_dir": opts["run_dir"], "pairs": n, "lam": cfg.method.lam, "steps": cfg.sample.steps,
                    "guidance": cfg.sample.guidance, "eta": cfg.sample.eta}
    t0 = time.perf_counter()
    for name, base in bases.items():
        videos = []
        for s in range(0, 2 * n, batch):
            e = min(2 * n, s + batch)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                videos.append(method.sample(e - s, Conditioning(label=labels[s:e]), steps=cfg.sample.steps,
                                            guidance=cfg.sample.guidance, eta=cfg.sample.eta, generator=g,
                                            shared_base=base[s:e]).float())
        videos = torch.cat(videos)
        heads = _heads(det, videos)
        r = pair_agreement(heads)
        r["cond_acc"] = (heads["motion"] == labels).float().mean().item() if "motion" in heads else None
        report[name] = r
        print(f"{name} base: colour same {r.get('color_same', float('nan')):.3f}, shape same "
              f"{r.get('shape_same', float('nan')):.3f}, background same {r.get('background_same', float('nan')):.3f}, "
              f"motion-class accuracy {r['cond_acc']:.3f}")
    report["sample_seconds"] = time.perf_counter() - t0
    _write_json(Path(opts.get("out", DEFAULT_OUT)), "videofusion_base.json", report)
    return report


# --- PVDM: can the tri-plane autoencoder reconstruct? -----------------------------------------------


def pvdm_ae(opts: dict, overrides: list[str]) -> dict:
    """Train PVDM's autoencoder stage alone for `seconds` or, given, exactly `steps` steps (its own loss,
    optimiser groups and settings, batch size and gradient clipping per player, as `StageSystem`; bf16
    autocast), then report the L1 of `n` val clips' reconstructions, R-FVD against those clips (shapes
    evaluator) and the evaluator's motion-class accuracy on them (chance 1/8): whether the latent keeps what
    the diffusion stage will need, in a fraction of a run's time."""
    from evaluation.detectors import load_detector
    from lightning_modules.system import clip_by_player, optimizer_groups

    cfg = load_config(["method=pvdm", *overrides])
    seconds, n = float(opts.get("seconds", 75)), int(opts.get("n", 64))
    max_steps = int(opts["steps"]) if "steps" in opts else None
    dm = build_datamodule(cfg)
    dm.setup("fit")
    torch.manual_seed(int(opts.get("seed", 0)))
    method = build_method(cfg, data_spec(cfg, dm))
    st = stage_settings(cfg, "autoencoder")
    opt = torch.optim.AdamW(optimizer_groups(method, "autoencoder", st["lr"]), lr=st["lr"], betas=tuple(st["betas"]))
    loader = dm.loader_for("train", shuffle=True, drop_last=True, batch_size=st["batch_size"])
    autocast = str(cfg.trainer.precision).startswith("bf16")
    clip = float(cfg.trainer.gradient_clip_val or 0)
    method.train()
    steps, t0, last = 0, time.perf_counter(), {}

    def done() -> bool:
        return steps >= max_steps if max_steps is not None else time.perf_counter() - t0 >= seconds

    while not done():
        for batch in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = method.loss("autoencoder", batch)
            opt.zero_grad()
            out["loss"].backward()
            if clip:
                last = {f"grad_norm_{k}": v for k, v in clip_by_player(opt, clip).items()}
            opt.step()
            steps += 1
            if done():
                break
    train_seconds = time.perf_counter() - t0
    method.eval()
    real = _real(cfg, "val", n)
    recon = reconstruct(cfg, method, real["video"], batch=n)
    det = load_detector("shapes", None)
    heads = _heads(det, recon)
    report = {"overrides": overrides, "seconds": round(train_seconds, 1), "steps": steps, "lr": st["lr"],
              "betas": list(st["betas"]), "batch_size": st["batch_size"], "n": n,
              "val_l1": (recon - real["video"]).abs().mean().item(),
              "r_fvd": _fvd(_features(det, recon.clamp(-1, 1)), _features(det, real["video"])),
              "recon_motion_acc": (heads["motion"] == real["label"]).float().mean().item(),
              "last_step": {k: round(float(v), 4) for k, v in {**out, **last}.items()}}
    print(json.dumps(report))
    return report


@torch.no_grad()
def reconstruct(cfg, method, video: Tensor, batch: int = 32) -> Tensor:
    """The method's autoencoder reconstruction of `video`, at the run's precision (bf16 autocast or fp32)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=str(cfg.trainer.precision).startswith("bf16")):
        return torch.cat([method.reconstruct(video[i:i + batch]).float() for i in range(0, len(video), batch)])


def ae_seeds(opts: dict, overrides: list[str]) -> list[dict]:
    """The autoencoder stage of a run at each of `seeds`, trained as `benchmarks.run` trains it, then scored
    on n val clips (the module docstring's ae-seeds)."""
    import tempfile

    import lightning as L

    from benchmarks.results import append_row
    from benchmarks.run import train_stages
    from benchmarks.run_folder import RunFolder
    from evaluation.detectors import load_detector

    seeds = [int(s) for s in str(opts.get("seeds", opts.get("seed", "0,1,2"))).split(",") if s.strip()]
    n = int(opts.get("n", 128))
    overrides = overrides if any(o.startswith("method=") for o in overrides) else ["method=cmd", *overrides]
    if any(o.startswith("seed=") for o in overrides):
        raise SystemExit("error: ae-seeds takes its seeds as seeds=0,1,2, not seed=")
    out = Path(opts.get("out", DEFAULT_OUT))
    det, rows = None, []
    for seed in seeds:
        cfg = load_config([*overrides, f"seed={seed}"])
        if cfg.dataset.name != "shapes":
            raise SystemExit(f"error: ae-seeds scores with the shapes evaluator; dataset={cfg.dataset.name} is not shapes")
        if cfg.trainer.get("time_budget"):
            raise SystemExit("error: ae-seeds trains the stage's stages.autoencoder.max_steps; a time budget's share "
                             "depends on the whole run: drop trainer.time_budget")
        L.seed_everything(cfg.seed, workers=True, verbose=False)  # as benchmarks.run: the same initialisation
        dm = build_datamodule(cfg)
        dm.setup("fit")
        method = build_method(cfg, data_spec(cfg, dm))
        if "autoencoder" not in method.stages:
            raise SystemExit(f"error: {cfg.method.name} has no autoencoder stage (its stages: {', '.join(method.stages)})")
        with tempfile.TemporaryDirectory(prefix="ae-seeds-") as tmp:
            cfg.run_dir = tmp
            record = train_stages(cfg, method, dm, RunFolder(tmp), only="autoencoder")["autoencoder"]
        method.eval()
        real = _real(cfg, "val", n)
        recon = reconstruct(cfg, method, real["video"])
        det = det or load_detector("shapes", None)
        st = stage_settings(cfg, "autoencoder")
        row = {"method": cfg.method.name, "overrides": overrides, "seed": seed, "steps": record["steps"],
               "seconds": round(record["seconds"], 1), "lr": st["lr"], "batch_size": st["batch_size"], "n": n,
               "val_l1": (recon - real["video"]).abs().mean().item(),
               "r_fvd": _fvd(_features(det, recon.clamp(-1, 1)), _features(det, real["video"])),
               "recon_motion_acc": (_heads(det, recon)["motion"] == real["label"]).float().mean().item()}
        rows.append(row)
        print(json.dumps(row), flush=True)
        append_row(out / f"{cfg.method.name}_ae_seeds.jsonl", row)
    for key in ("r_fvd", "recon_motion_acc", "val_l1"):
        v = sorted(r[key] for r in rows)
        print(f"{key}: min {v[0]:.4g}, median {v[len(v) // 2]:.4g}, max {v[-1]:.4g} over seeds {seeds}")
    return rows


# --- image-to-video: the first-frame protocol, before and after -----------------------------------


def i2v_protocol(opts: dict, overrides: list[str]) -> dict:
    """One trained image-to-video run scored twice with the same generator seed: first frames from the
    training split's clips (the earlier protocol: clip i of the train split is also the FVD reference's
    clip i, so a model that copies its training data is rewarded) and from held-out val clips (the
    protocol now, evaluation.protocol.FIRST_FRAME_SPLIT)."""
    from evaluation import protocol

    if "run_dir" not in opts:
        raise SystemExit("error: i2v-protocol needs run_dir= (a trained image-to-video run: method=dvdm or edvdm)")
    cfg, dm, method = _load_run(opts["run_dir"])
    if not method.image_to_video:
        raise SystemExit(f"error: i2v-protocol compares first-frame protocols; {cfg.method.name} is not image-to-video")
    from omegaconf import OmegaConf

    for o in overrides:  # sampling / evaluation settings (sample.guidance=4, eval.num_samples=64, ...)
        key, _, value = o.partition("=")
        if not key.startswith(("sample.", "eval.")):
            raise SystemExit(f"error: i2v-protocol takes sample.* and eval.* overrides only, got {o!r}")
        OmegaConf.update(cfg, key, OmegaConf.create({"v": value}).v if value else value, merge=False)
    report: dict = {"run_dir": opts["run_dir"]}
    saved = protocol.FIRST_FRAME_SPLIT
    try:
        for name, split in (("old: first frames of train clips (the FVD reference's)", "train"),
                            ("new: first frames of held-out val clips", "val")):
            protocol.FIRST_FRAME_SPLIT = split
            torch.manual_seed(cfg.seed)
            out = protocol.evaluate_method(method, dm, cfg)
            report[split] = {"protocol": name, **{k: out.get(k) for k in ("fvd", "is", "cond_acc", "clipsim", "n_gen",
                                                                          "n_real", "real_split")}}
            print(f"{name}: " + ", ".join(f"{k}={out[k]:.4g}" for k in ("fvd", "cond_acc") if out.get(k) is not None))
    finally:
        protocol.FIRST_FRAME_SPLIT = saved
    _write_json(Path(opts.get("out", DEFAULT_OUT)), "i2v_protocol.json", report)
    return report


# --- any method: flicker against the sampling settings -------------------------------------------------------


def _grid_values(text: str | None, default: float, cast) -> list:
    return [cast(v) for v in str(text).split(",")] if text else [cast(default)]


def flicker(opts: dict, overrides: list[str]) -> dict:
    """Frame change (ratio to real clips') and motion-class accuracy of n samples at each sampling setting."""
    from benchmarks.run import sample_videos, val_motion
    from evaluation.detectors import load_detector
    from evaluation.sanity import frame_motion

    cfg, dm, method = _trained_run(opts, overrides, "flicker", "run_dir, n, guidance, steps, seed, out")
    n, seed = int(opts.get("n", 32)), int(opts.get("seed", cfg.seed))
    real = val_motion(dm, n)  # the first n val clips, as every run's sample_check
    if not real:
        raise SystemExit(f"error: flicker needs moving val clips of {cfg.dataset.name!r} to compare with")
    det = load_detector("shapes", None) if cfg.dataset.name == "shapes" else None
    cfg.trainer.progress_bar = False
    report: dict = {"run_dir": opts["run_dir"], "method": cfg.method.name, "n": n, "seed": seed,
                    "real_motion": real, "settings": []}
    for guidance in _grid_values(opts.get("guidance"), cfg.sample.guidance, float):
        for steps in _grid_values(opts.get("steps"), cfg.sample.steps, int):
            cfg.sample.guidance, cfg.sample.steps = guidance, steps
            videos, cond, seconds = sample_videos(cfg, method, dm, n, seed)
            motion = frame_motion(videos).mean().item()
            acc = None
            if det is not None and cond.label is not None:
                acc = (_heads(det, videos)["motion"] == cond.label).float().mean().item()
            r = {"guidance": guidance, "steps": steps, "motion": motion, "ratio": motion / real, "cond_acc": acc,
                 "sample_seconds_per_video": seconds}
            report["settings"].append(r)
            print(f"guidance {guidance:g}, {steps} steps: frame change {motion:.4f} = {motion / real:.2f} x real's"
                  + (f", motion-class accuracy {acc:.3f}" if acc is not None else ""))
    _write_json(Path(opts.get("out", DEFAULT_OUT)), f"{cfg.method.name}_flicker.json", report)
    return report


# --- image-to-video: does the video continue its first frame? ---------------------------------------


def follow_errors(videos: Tensor, real: Tensor) -> dict[str, list[float]]:
    """Per-frame mean absolute error (N, C, T, H, W) -> T values for each of: `generated` (video i against
    real clip i), `first frame held` (real clip i's frame 0 repeated, against clip i) and `another clip`
    (video i against clip i+1, wrapping; needs N >= 2)."""
    if videos.shape != real.shape:
        raise ValueError(f"generated videos {tuple(videos.shape)} and real clips {tuple(real.shape)} differ in shape")

    def mae(a: Tensor, b: Tensor) -> list[float]:
        return (a.float() - b.float()).abs().mean(dim=(0, 1, 3, 4)).tolist()

    held = real[:, :, :1].expand_as(real)
    out = {"generated": mae(videos, real), "first frame held": mae(held, real)}
    if len(real) >= 2:
        out["another clip"] = mae(videos, real.roll(-1, dims=0))  # clip i+1
    return out


def i2v_follow(opts: dict, overrides: list[str]) -> dict:
    """Per-frame error of n image-to-video samples against the real clips they were conditioned on."""
    from benchmarks.run import sample_videos
    from evaluation.detectors import load_detector

    cfg, dm, method = _trained_run(opts, overrides, "i2v-follow", "run_dir, n, seed, out", image_to_video=True)
    n, seed = int(opts.get("n", 64)), int(opts.get("seed", cfg.seed))
    if n < 2:
        raise SystemExit(f"error: i2v-follow needs n >= 2 (the `another clip` reference pairs video i with clip i+1), "
                         f"got n={n}")
    cfg.trainer.progress_bar = False
    videos, cond, seconds = sample_videos(cfg, method, dm, n, seed)
    ds = dm.dataset("val")
    real = torch.stack([ds.eval_clip(i % len(ds), cfg.eval.clip_seed)["video"] for i in range(n)])
    if not torch.equal(real[:, :, 0], cond.first_frame):
        raise RuntimeError("the real clips are not the ones the samples were conditioned on (first frames differ)")
    curves = follow_errors(videos, real)
    early = slice(1, min(4, videos.shape[2]))  # frames 1-3: where continuing the given frame matters most
    summary = {k: {"frames_1_3": sum(c[early]) / len(c[early]), "all_frames": sum(c[1:]) / (len(c) - 1)}
               for k, c in curves.items()}
    report: dict = {"run_dir": opts["run_dir"], "method": cfg.method.name, "n": n, "seed": seed,
                    "sample_seconds_per_video": seconds, "curves": curves, "summary": summary}
    if cfg.dataset.name == "shapes" and cond.label is not None:
        report["cond_acc"] = (_heads(load_detector("shapes", None), videos)["motion"] == cond.label).float().mean().item()
    for k, s in summary.items():
        print(f"{k:>17}: mean |video - real clip| {s['frames_1_3']:.4f} over frames 1-3, {s['all_frames']:.4f} over all")
    out = Path(opts.get("out", DEFAULT_OUT))
    _write_json(out, f"{cfg.method.name}_follow.json", report)
    _plot_lines([(c, {"label": k}) for k, c in curves.items()], out / f"{cfg.method.name}_follow.png",
                f"{cfg.method.name}: n={n} samples vs the val clips whose first frame and class they were given",
                "frame index (0 = the given first frame)", "mean |video - real clip|  (pixels in [-1, 1])")
    return report


COMMANDS = {"edvdm-loop": edvdm_loop, "pvdm-cost": pvdm_cost, "long-video": long_video, "pvdm-long": long_video,
            "videofusion-base": videofusion_base, "i2v-protocol": i2v_protocol, "pvdm-ae": pvdm_ae,
            "ae-seeds": ae_seeds, "flicker": flicker, "i2v-follow": i2v_follow}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"error: unknown probe {argv[0]!r}; choose one of {sorted(COMMANDS)}")
        return {}
    name, rest = argv[0], argv[1:]
    opts = dict(a.split("=", 1) for a in rest if a.split("=", 1)[0] in PROBE_KEYS)
    overrides = [a for a in rest if a.split("=", 1)[0] not in PROBE_KEYS]
    return COMMANDS[name](opts, overrides)


if __name__ == "__main__":
    main()
