"""Train the shapes evaluator shipped in evaluation/weights/shapes_evaluator.pt.

    python -m benchmarks.train_shapes_evaluator                     # the shipped file (~5-10 min, 2 CPU cores)
    python -m benchmarks.train_shapes_evaluator --video-steps 50 --clip-steps 50 --out /tmp/e.pt   # smoke run

Two networks, both fed through the detectors' 8-bit bottleneck (evaluation.detectors.quantize):
1. `ShapesVideoNet`, cross-entropy on four heads (motion class, shape, colour, background) over
   16x32x32 clips of the train split; a quarter of the clips is rendered at 64x64 and
   area-downsampled, so 64x64 presets are scored in-distribution.
2. `ShapesCLIP`, a symmetric contrastive (InfoNCE) loss between single frames and captions;
   captions repeat within a batch, so the targets are soft: uniform over equal captions.
Held-out accuracy of every head (val split) and CLIPSIM of true vs shuffled captions are
stored in the file's `meta` and printed. bf16 autocast throughout (fast on this CPU).
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from dataclasses import asdict

import torch
import torch.nn.functional as F

from datamodules.shapes import ShapesConfig, ShapesDataset
from evaluation.detectors import file_sha256, quantize, rescale
from evaluation.shapes_evaluator import (
    HEADS,
    SHAPES_EVALUATOR_PATH,
    ShapesCLIP,
    ShapesEvaluatorConfig,
    ShapesVideoNet,
    WordTokenizer,
    prepare_input,
    save_evaluator,
)


@contextmanager
def single_thread():
    """Rendering is thousands of tiny tensor ops: one thread is ~100x faster than two contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def render_split(split: str, n: int, hires_every: int = 0, seed: int = 0) -> dict:
    """n clips of a shapes split as uint8 (n, 3, 16, 32, 32) plus label tensors and captions.

    Every `hires_every`-th clip is rendered at 64x64 and area-downsampled (0 = never).
    """
    low = ShapesDataset(ShapesConfig(seed=seed), split)
    high = ShapesDataset(ShapesConfig(seed=seed, resolution=64), split)
    n = min(n, len(low))
    videos, labels, texts = [], {k: [] for k in HEADS}, []
    with single_thread():
        for i in range(n):
            item = (high if hires_every and i % hires_every == 0 else low)[i]
            videos.append(quantize(prepare_input(item["video"][None]))[0])  # through the 8-bit bottleneck
            labels["motion"].append(item["label"])
            for k in ("shape", "color", "background"):
                labels[k].append(item[k])
            texts.append(item["text"])
    return {"video": torch.stack(videos), "text": texts,
            **{k: torch.tensor(v, dtype=torch.long) for k, v in labels.items()}}


def build_vocab(texts: list[str]) -> list[str]:
    return sorted({w for t in texts for w in WordTokenizer.words(t)})


def lr_at(step: int, steps: int, peak: float, warmup: int = 20) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item()))


@torch.no_grad()
def head_accuracy(net: ShapesVideoNet, data: dict, batch: int = 128) -> dict[str, float]:
    """Fraction correct per head on `data` (float32, no autocast: as the detector runs)."""
    net.eval()
    correct = {k: 0 for k in HEADS}
    for i in range(0, len(data["video"]), batch):
        _, logits = net(rescale(data["video"][i:i + batch]))
        for k in HEADS:
            correct[k] += int((logits[k].argmax(-1) == data[k][i:i + batch]).sum())
    return {k: c / len(data["video"]) for k, c in correct.items()}


def train_video_net(cfg: ShapesEvaluatorConfig, train: dict, steps: int, batch: int, lr: float,
                    log_every: int = 50) -> ShapesVideoNet:
    net = ShapesVideoNet(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    n = len(train["video"])
    t0 = time.time()
    for step in range(steps):
        net.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        idx = torch.randint(0, n, (batch,), generator=g)
        x = rescale(train["video"][idx])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, logits = net(x)
        losses = {k: F.cross_entropy(logits[k].float(), train[k][idx]) for k in HEADS}
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"video step {step:4d}  loss {loss.item():.4f}  "
                  + "  ".join(f"{k} {v.item():.3f}" for k, v in losses.items()) + f"  {time.time() - t0:.0f}s",
                  flush=True)
    return net.eval()


def clip_loss(model: ShapesCLIP, frames: torch.Tensor, ids: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets: `same` (B, B) marks pairs with equal captions."""
    img, txt = model.encode_image(frames), model.encode_text(ids)  # (B, D) each
    logits = model.logit_scale.exp().clamp(max=100) * img.float() @ txt.float().T  # (B, B)
    target = same.float() / same.float().sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def train_clip(cfg: ShapesEvaluatorConfig, train: dict, tokenizer: WordTokenizer, steps: int, batch: int,
               lr: float, log_every: int = 50) -> ShapesCLIP:
    model = ShapesCLIP(cfg, len(tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(2)
    ids_all = tokenizer(train["text"])  # (N, L)
    n, t = len(train["video"]), train["video"].shape[2]
    t0 = time.time()
    for step in range(steps):
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        idx = torch.randint(0, n, (batch,), generator=g)
        frame = torch.randint(0, t, (batch,), generator=g)
        frames = rescale(train["video"][idx, :, frame])  # (B, 3, H, W): one random frame per clip
        ids = ids_all[idx]
        same = (ids[:, None] == ids[None]).all(-1)  # (B, B)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = clip_loss(model, frames, ids, same)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"clip step {step:4d}  loss {loss.item():.4f}  {time.time() - t0:.0f}s", flush=True)
    return model.eval()


@torch.no_grad()
def clipsim_true_vs_shuffled(model: ShapesCLIP, tokenizer: WordTokenizer, data: dict, n: int = 256) -> tuple[float,
                                                                                                             float]:
    """Mean frame-caption cosine for the true captions and for captions shuffled across videos."""
    video = rescale(data["video"][:n])
    b, _, t = video.shape[:3]
    img = model.encode_image(video.transpose(1, 2).flatten(0, 1)).view(b, t, -1)  # (B, T, D)
    txt = model.encode_text(tokenizer(data["text"][:n]))  # (B, D)
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(0))
    true = (img * txt[:, None]).sum(-1).mean().item()
    shuffled = (img * txt[perm][:, None]).sum(-1).mean().item()
    return true, shuffled


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(SHAPES_EVALUATOR_PATH), help="where to write the weights")
    p.add_argument("--train-size", type=int, default=8192, help="train clips rendered (all of the train split)")
    p.add_argument("--val-size", type=int, default=512, help="held-out val clips for the reported accuracy")
    p.add_argument("--video-steps", type=int, default=500)
    p.add_argument("--clip-steps", type=int, default=250)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--clip-batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    train = render_split("train", args.train_size, hires_every=4)
    val = render_split("val", args.val_size, hires_every=2)
    print(f"rendered {len(train['video'])} train / {len(val['video'])} val clips in {time.time() - t0:.0f}s")

    cfg = ShapesEvaluatorConfig()
    tokenizer = WordTokenizer(build_vocab(train["text"]), cfg.max_words)
    t1 = time.time()
    video_net = train_video_net(cfg, train, args.video_steps, args.batch, args.lr)
    t2 = time.time()
    clip = train_clip(cfg, train, tokenizer, args.clip_steps, args.clip_batch, args.lr)
    t3 = time.time()

    acc = head_accuracy(video_net, val)
    true, shuffled = clipsim_true_vs_shuffled(clip, tokenizer, val)
    meta = {"val_accuracy": acc, "val_clipsim_true": true, "val_clipsim_shuffled": shuffled,
            "train_seconds": {"video": round(t2 - t1, 1), "clip": round(t3 - t2, 1)}, "args": vars(args),
            "dataset": asdict(ShapesConfig(seed=args.seed))}
    save_evaluator(args.out, video_net, clip, tokenizer, meta)
    print(f"val accuracy {acc}\nval CLIPSIM true {true:.4f} shuffled {shuffled:.4f}")
    print(f"wrote {args.out} sha256 {file_sha256(args.out)} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
