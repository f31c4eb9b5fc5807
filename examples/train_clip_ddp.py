"""Train a small CLIP on synthetic image-text pairs with DistributedDataParallel and the fused distributed loss.

    torchrun --nproc_per_node=2 examples/train_clip_ddp.py [--steps 150] [--batch 64] [--loss clip|ring|siglip]

Runs on CPU (gloo) or, with one GPU per process, on CUDA (NCCL). Each image is a 32 x 32 picture of a coloured
square in one of four quadrants on a noisy background; its caption names the colour and the quadrant ("red top
left"), as two word tokens among distractor words. The image tower is the fused ViT patch stem
(``vlops.nn.PatchEmbed``, 8 x 8 patches) and a linear head; the text tower an embedding bag and a linear head.
The loss is ``vlops.nn.ClipLoss(local_loss=True, gather_with_grad=True)`` (``--loss ring``: the same loss with
the texts travelling between ranks; ``--loss siglip``: ``vlops.nn.SigLipLoss``): every rank holds its ``--batch``
pairs, the loss is that of the global batch, and DDP averages the exact gradients.

At the end rank 0 prints the zero-shot accuracy on held-out images: each image against the 16 captions
(4 colours x 4 quadrants), chance 1/16, as ``zero-shot accuracy: 0.xxx (chance 0.062)``.
"""
from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import vlops

COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.1, 0.2, 1.0), "yellow": (1.0, 0.9, 0.1)}
PLACES = ["top left", "top right", "bottom left", "bottom right"]
FILLER = 24  # distractor word tokens ("a", "photo", "of", ...): random, carry no signal
VOCAB = len(COLOURS) + len(PLACES) + FILLER


def make_batch(n: int, g: torch.Generator):
    """n images [n, 3, 32, 32], caption tokens [n, 5] and the concept id (colour * 4 + place) of each."""
    colour = torch.randint(len(COLOURS), (n,), generator=g)
    place = torch.randint(len(PLACES), (n,), generator=g)
    rgb = torch.tensor(list(COLOURS.values()))[colour]  # [n, 3]
    img = 0.3 * torch.rand(n, 3, 32, 32, generator=g)
    y0 = (place // 2) * 16 + torch.randint(0, 7, (n,), generator=g)
    x0 = (place % 2) * 16 + torch.randint(0, 7, (n,), generator=g)
    rows = torch.arange(32)
    inside = ((rows[None, :] >= y0[:, None]) & (rows[None, :] < y0[:, None] + 9))[:, :, None] & \
             ((rows[None, :] >= x0[:, None]) & (rows[None, :] < x0[:, None] + 9))[:, None, :]  # [n, 32, 32]
    img = torch.where(inside[:, None], rgb[:, :, None, None].expand(n, 3, 32, 32), img)
    filler = len(COLOURS) + len(PLACES) + torch.randint(FILLER, (n, 3), generator=g)
    tokens = torch.cat([colour[:, None], len(COLOURS) + place[:, None], filler], 1)
    return img, tokens[:, torch.randperm(5, generator=g)], colour * len(PLACES) + place


class TinyClip(torch.nn.Module):
    def __init__(self, dim: int = 64):
        super().__init__()
        self.patch = vlops.nn.PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=dim)
        self.img_head = torch.nn.Sequential(torch.nn.GELU(), torch.nn.Flatten(), torch.nn.Linear(16 * dim, dim))
        self.words = torch.nn.EmbeddingBag(VOCAB, dim, mode="mean")
        self.txt_head = torch.nn.Sequential(torch.nn.GELU(), torch.nn.Linear(dim, dim))
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.3))  # log(10), exponentiated as CLIP does
        self.logit_bias = torch.nn.Parameter(torch.tensor(-5.0))  # SigLIP's bias (the CLIP loss ignores it)

    def encode_image(self, img):
        return F.normalize(self.img_head(self.patch(img)), dim=-1)

    def encode_text(self, tokens):
        return F.normalize(self.txt_head(self.words(tokens)), dim=-1)

    def forward(self, img, tokens):
        return self.encode_image(img), self.encode_text(tokens), self.logit_scale.exp(), self.logit_bias


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=64, help="pairs per rank")
    p.add_argument("--loss", choices=["clip", "ring", "siglip"], default="clip")
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = TinyClip().to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    if args.loss == "siglip":
        loss_fn = vlops.nn.SigLipLoss()  # rank and world size from the process group
    else:
        loss_fn = vlops.nn.ClipLoss(local_loss=True, gather_with_grad=True, ring=args.loss == "ring")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1000 + rank)  # each rank draws its own pairs
    for step in range(1, args.steps + 1):
        img, tokens, _ = make_batch(args.batch, g)
        loss = loss_fn(*ddp(img.to(device), tokens.to(device)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 1 or step % 25 == 0 or step == args.steps:
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            if rank == 0:
                print(f"step {step:4d}  loss {mean.item() / world:.4f}", flush=True)

    if rank == 0:  # zero-shot on held-out images: each against the 16 captions "<colour> <place>"
        model.eval()
        with torch.no_grad():
            img, _, concept = make_batch(1024, torch.Generator().manual_seed(7))
            captions = torch.tensor([[c, len(COLOURS) + q] for c in range(len(COLOURS)) for q in range(len(PLACES))])
            probs = vlops.zero_shot_classify(model.encode_image(img.to(device)), model.encode_text(captions.to(device)),
                                             model.logit_scale.exp())
            acc = (probs.argmax(-1).cpu() == concept).float().mean().item()
        print(f"zero-shot accuracy: {acc:.3f} (chance {1 / len(captions):.3f})", flush=True)
    # leave together, and release DDP (its reducer holds the process group) while the group is still alive
    del ddp, opt
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
