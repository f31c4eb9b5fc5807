"""Benchmark cases of the fused contrastive losses (CLIP and SigLIP), forward, backward and forward+backward.

Eager baseline: open_clip's ``ClipLoss`` / ``SigLipLoss`` (single process), which materialise the
N x N logits; fused: ``vlops.clip_loss`` / ``vlops.siglip_loss``. Unit-norm features,
logit_scale 100 (CLIP's clamp) and SigLIP's bias -10, as trained models use them.

Peak memory counts the gradients the call allocates (the last call's are dropped before it:
``Case.reset``), 2 N D elements of the input dtype for each implementation.

Floor: the three N x N x D matrix products a loss and its gradient need at the least (logits,
d image, d text: 6 N^2 D flops for forward+backward, 2 N^2 D for forward, 4 N^2 D for the backward alone)
at the measured matmul rate of the dtype; bytes: the features read and their gradients written.

Sizes (``--sizes``): ``headline`` N=8192 D=512 fp32 (CPU) / N=65536 D=768 bf16 (CUDA); ``small``
N=1024 D=256 (also the ``--quick`` size); a literal ``NxD`` (e.g. ``4096x512``).
"""
from __future__ import annotations

import re

import torch

from . import PASSES, Case, autograd_fns, dtype_bytes

OP = "contrastive"
SCALE, BIAS = 100.0, -10.0


def _sizes(device, quick, sizes, dtypes):
    cuda = device.type == "cuda"
    head = (65536, 768) if cuda else (8192, 512)
    head_dt = [torch.bfloat16] if cuda else [torch.float32]
    plan = []
    labels = sizes or ({"small"} if quick else {"small", "headline"})
    for s in sorted(labels):
        if s == "headline":
            plan.append((head, dtypes or head_dt))
        elif s == "small":
            plan.append(((1024, 256), dtypes or [torch.float32]))
        elif re.fullmatch(r"\d+x\d+", s):
            n, d = (int(v) for v in s.split("x"))
            plan.append(((n, d), dtypes or head_dt))
    return plan


def _relerr(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _case(kind, pass_, N, D, dtype, device):
    import vlops
    from open_clip.loss import ClipLoss, SigLipLoss

    eager_loss = ClipLoss() if kind == "clip" else SigLipLoss()
    fused_loss = vlops.clip_loss if kind == "clip" else vlops.siglip_loss
    grad = pass_ != "forward"

    def make():
        a = torch.nn.functional.normalize(torch.randn(N, D, device=device), dim=-1).to(dtype)
        b = torch.nn.functional.normalize(torch.randn(N, D, device=device), dim=-1).to(dtype)
        s = torch.tensor(SCALE, device=device)
        bias = torch.tensor(BIAS, device=device)
        return [t.requires_grad_(grad) for t in (a, b, s, bias)]

    fns = autograd_fns(pass_, lambda inp: eager_loss(*inp), lambda inp: fused_loss(*inp),
                       leaves=lambda inp, fused: inp, check=_relerr)
    # forward: the logits (2 N^2 D); backward: d image and d text (4 N^2 D, the logits recomputed on top)
    flops = {"forward": 2.0, "backward": 4.0, "forward+backward": 6.0}[pass_] * N * N * D
    nbytes = (4.0 if grad else 2.0) * N * D * dtype_bytes(dtype)
    return Case(name=f"{kind}_loss", op=OP, dtype=dtype, size=f"{N}x{D}", pass_=pass_, make=make,
                floor_bytes=nbytes, floor_flops=flops, eager_label="open_clip", **fns,
                note=f"unit-norm features, logit_scale={SCALE}" + (f", bias={BIAS}" if kind == "siglip" else ""))


def cases(device, quick: bool, sizes=None, dtypes=None):
    device = torch.device(device)
    try:
        import open_clip  # noqa: F401
    except ImportError:
        return
    for (N, D), dts in _sizes(device, quick, sizes, dtypes):
        for dt in dts:
            for kind in ("clip", "siglip"):
                for pass_ in PASSES:
                    yield _case(kind, pass_, N, D, dt, device)
