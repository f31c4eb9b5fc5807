"""Train the reference CLIP (vlops.models.clip) on synthetic image-caption pairs and classify held-out images
zero-shot.

    python examples/train_clip.py [--quick] [--loss clip|siglip|unicl] [--steps N] [--no-fused] [--out DIR]

Each image is a coloured shape (4 colours x 3 shapes x 4 quadrants = 48 concepts) with a caption drawn from five
templates ("a photo of a red circle in the top left", ...): vlops.models.synthetic. Every step draws a fresh
batch, computes the model's loss (the fused CLIP / SigLIP / UniCL loss and the fused patch stem; the eager
PyTorch versions with --no-fused) and takes an AdamW step with a warm-up and cosine learning rate.

At the end each held-out image (drawn from another seed) is classified among the 48 plain captions
"a {colour} {shape} in the {place}" (synthetic.class_captions()) by the model's zero-shot probabilities. It
prints ``step N loss X`` lines, then ``zero-shot accuracy: A (chance 0.021)`` and ``final loss: X``, and saves
the loss curve as clip_loss.png in --out.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch

from vlops.models import synthetic
from vlops.models.clip import CLIP, LOSSES, CLIPConfig

# (steps, batch, width, layers) of the two settings; both towers get the same width and depth
FULL = dict(steps=1000, batch=128, width=64, layers=2)
QUICK = dict(steps=300, batch=64, width=64, layers=1)


def build(args) -> CLIP:
    heads = 4 if args.width % 4 == 0 else 1
    config = CLIPConfig(width=args.width, layers=args.layers, heads=heads, text_width=args.width,
                        text_layers=args.layers, text_heads=heads, embed_dim=args.width, loss=args.loss)
    return CLIP(config, fused=args.fused)


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over the first 5% of the steps, then cosine decay to 0."""
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def train(model: CLIP, steps: int, batch: int, lr: float, seed: int, log_every: int) -> list[float]:
    """``steps`` AdamW steps on fresh synthetic batches (drawn from ``seed``); returns the loss of each step."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        data = synthetic.make_pairs(batch, g)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        loss = model.loss(data.images, data.tokens, data.concept if model.config.loss == "unicl" else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step} loss {losses[-1]:.4f}", flush=True)
    return losses


@torch.no_grad()
def zero_shot_accuracy(model: CLIP, n: int, seed: int) -> float:
    """Accuracy of zero-shot classification of ``n`` held-out images (drawn from ``seed``) among the 48 concepts."""
    data = synthetic.make_pairs(n, torch.Generator().manual_seed(seed))
    probs = model.zero_shot(data.images, synthetic.class_captions())
    return (probs.argmax(dim=-1) == data.concept).float().mean().item()


def save_curve(losses: list[float], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(len(losses)), losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small setting that runs in well under a minute on a CPU")
    p.add_argument("--steps", type=int, default=None, help=f"training steps (default {FULL['steps']}, quick "
                   f"{QUICK['steps']})")
    p.add_argument("--batch", type=int, default=None, help=f"pairs per step (default {FULL['batch']}, quick "
                   f"{QUICK['batch']})")
    p.add_argument("--width", type=int, default=None, help="width of both towers and of the joint embedding")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks per tower")
    p.add_argument("--loss", choices=LOSSES, default="clip")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval", type=int, default=1000, help="held-out images for the zero-shot accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="the vlops fused ops (default) or their eager PyTorch equivalents (--no-fused)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: these small matrices gain little from more, and lose a "
                        "lot when the cores are busy)")
    p.add_argument("--out", default=os.path.join("examples", "out"), help="folder for clip_loss.png")
    args = p.parse_args(argv)
    setting = QUICK if args.quick else FULL
    for name, value in setting.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "batch", "width", "layers", "eval", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.batch < 2:
        p.error(f"--batch must be >= 2 (a contrastive loss needs negatives), got {args.batch}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"CLIP ({args.loss} loss, {'fused' if args.fused else 'eager'}): {n_params} parameters, {args.steps} steps "
          f"of {args.batch} pairs", flush=True)
    t0 = time.perf_counter()
    losses = train(model, args.steps, args.batch, args.lr, args.seed, log_every=max(1, args.steps // 20))
    train_s = time.perf_counter() - t0
    acc = zero_shot_accuracy(model, args.eval, seed=args.seed + 10_000)

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "clip_loss.png")
    save_curve(losses, path, f"CLIP on synthetic pairs ({args.loss} loss), zero-shot accuracy {acc:.3f}")
    print(f"final loss: {sum(losses[-10:]) / len(losses[-10:]):.4f}")
    print(f"zero-shot accuracy: {acc:.3f} (chance {1 / synthetic.NUM_CONCEPTS:.3f})")
    print(f"train time s: {train_s:.1f}")
    print(f"saved: {path}")


if __name__ == "__main__":
    main()
