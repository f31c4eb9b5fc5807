"""Tile study of the Triton patch-stem kernels on a CUDA GPU: the forward implicit GEMM over a set of tile
configurations, next to cuBLAS on the same product (patches gathered into a contiguous [M, K] buffer
first, not timed) and cuDNN's convolution (``cudnn.benchmark`` on); the backward's d_weight GEMM over tile
configurations and row-split sizes (the whole backward of the stem without a LayerNorm timed, which is
the row kernel and that GEMM), next to cuBLAS on ``grad^T patches``; then the whole forward and backward
of the op at the default tiles, with and without a LayerNorm. The data for choosing
``kernels/patch_embed.block_config``; the headline fused-vs-eager figures come from ``benchmarks/run.py``.

    python benchmarks/patch_embed_tune.py [--batch 256] [--models vit_b16 vit_l14] [--dtype bf16]
    python benchmarks/patch_embed_tune.py --aot   (no GPU: compiles every candidate for sm_90a and prints
                                                   registers, spills and shared memory)
    TRITON_INTERPRET=1 python benchmarks/patch_embed_tune.py --device cpu --batch 1 --configs 2
                                              (a smoke run of this script on CPU tensors)

One line per measurement: milliseconds (median over trials of back-to-back calls, CUDA events), the
GEMM's 2 M K D flops as TFLOP/s, and for the Triton GEMM its relative error against cuBLAS (fp32
accumulation both; the tile configuration is dropped from the ranking when the error is over 1e-2).
"""
from __future__ import annotations

import argparse
import sys

import torch
from tune_common import aot_check, line, measure, print_best, rel, timed

DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODELS = {"vit_b16": (16, 768), "vit_l14": (14, 1024)}  # patch, width (224 px images, 3 channels)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the first is block_config's default for 16-bit D % 16 == 0.
# Every one compiles for sm_90a (bf16, ViT-B/16 and ViT-L/14) without spills (--aot); 128 x 128 with 4 warps and
# the 128 x 256 / 256 x 128 tiles spilled 0.9-1.3 KB and are left out.
CONFIGS = [
    (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 4), (128, 128, 128, 8, 2), (128, 128, 64, 8, 5),
    (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 256, 64, 8, 3), (256, 64, 64, 8, 3), (64, 64, 64, 4, 4),
    (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
]
# d_weight: (BLOCK_M token rows reduced per step, BLOCK_N of D, BLOCK_K of K, num_warps, num_stages, programs
# the row splits aim at; None: the launcher's ~264); the first is block_config's default for 16-bit D % 16 == 0
DW_CONFIGS = [
    (64, 128, 128, 8, 3, None), (64, 128, 128, 8, 3, 132), (64, 128, 128, 8, 3, 528), (64, 128, 128, 8, 4, None),
    (32, 128, 128, 8, 4, None), (64, 128, 256, 8, 3, None), (128, 128, 128, 8, 2, None), (32, 128, 128, 8, 3, None),
    (64, 128, 64, 4, 4, None), (64, 64, 128, 4, 4, None), (128, 128, 64, 8, 3, None),
]


def study(model, B, dt, dev, n_configs, reps, trials):
    from vlops.kernels import patch_embed as k

    P, D = MODELS[model]
    C, HW = 3, 224
    G = HW // P
    NP = G * G
    M, K = B * NP, C * P * P
    flops = 2.0 * M * K * D
    g = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(B, C, HW, HW, generator=g).to(dev, dt)
    weight = (torch.randn(D, K, generator=g) * K ** -0.5).to(dev, dt)
    bias = torch.randn(D, generator=g).to(dev)
    pos = torch.randn(NP, D, generator=g).to(dev)
    lnw, lnb = (1 + 0.1 * torch.randn(D, generator=g)).to(dev), (0.1 * torch.randn(D, generator=g)).to(dev)
    print(f"\n## {model}: B={B} P={P} D={D} K={K} M={M} {dt} ({flops / 1e9:.1f} GFLOP per GEMM)", flush=True)

    patches = images.reshape(B, C, G, P, G, P).permute(0, 2, 4, 1, 3, 5).reshape(M, K).contiguous()
    ref = (patches @ weight.T).float() + bias  # [M, D]
    ref_rows = (ref.view(B, NP, D) + pos).view(M, D)
    line(f"{model} cublas patches @ W.T (gathered, not timed)", timed(lambda: patches @ weight.T, reps, trials),
         flops)
    conv_w = weight.view(D, C, P, P)
    torch.backends.cudnn.benchmark = True
    line(f"{model} cudnn conv2d stride P (benchmark on)",
         timed(lambda: torch.nn.functional.conv2d(images, conv_w, stride=P), reps, trials), flops)
    torch.backends.cudnn.benchmark = False

    ranked = []
    args = (images, weight, bias, pos, None, None, 0.0, False, None, None, 0.0, False, P, 0)
    for cfg in CONFIGS[:n_configs]:
        bm, bn, bk, nw, ns = cfg
        blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
        name = f"{model} triton gemm+bias+pos {bm}x{bn}x{bk} w{nw} s{ns}"
        measure(name, lambda b=blocks: k.patch_embed_fwd(*args, blocks=b), lambda out: rel(out.view(M, D), ref_rows),
                flops, reps, trials, 1e-2, ranked, cfg)
    print_best(f"{model} best gemm tiles: ", ranked)

    # the backward's d_weight GEMM (no LayerNorm: g0 = the patch rows of grad) over tiles and row splits
    grad = torch.randn(B, 1 + NP, D, generator=g).to(dev, dt)
    gp = grad[:, 1:].reshape(M, D)
    dw_ref = gp.float().T @ patches.float()  # [D, K]
    line(f"{model} cublas grad^T @ patches (d_weight, not the op)", timed(lambda: gp.T @ patches, reps, trials), flops)
    a1 = (images, weight, bias, pos, None, None, 0.0, False, None, None, 0.0, False, P, 1)
    ranked = []
    for bm, bn, bk, nw, ns, progs in DW_CONFIGS[:n_configs]:
        blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
        if progs is not None:  # row splits of a whole number of BLOCK_M steps giving about `progs` programs
            tiles = -(-D // bn) * -(-K // bk)
            steps = -(-M // bm)
            blocks["SPLIT_M"] = -(-steps // max(1, min(steps, -(-progs // tiles)))) * bm
        name = f"{model} backward d_weight {bm}x{bn}x{bk} w{nw} s{ns}" + (f" ~{progs} progs" if progs else "")
        measure(name, lambda b=blocks: k.patch_embed_bwd(grad, *a1, False, blocks=b)[1], lambda dw: rel(dw, dw_ref),
                flops, reps, trials, 1e-2, ranked, (bm, bn, bk, nw, ns, progs))
    print_best(f"{model} best d_weight tiles: ", ranked)

    # the whole op at the default tiles: forward (with / without the LayerNorm), backward (weights only)
    for ln in (False, True):
        a = (images, weight, bias, pos, None, None, 0.0, False, lnw if ln else None, lnb if ln else None, 1e-5, ln,
             P, 1)
        tag = "ln" if ln else "no-ln"
        line(f"{model} op forward ({tag}, default tiles)", timed(lambda: k.patch_embed_fwd(*a), reps, trials), flops)
        bwd = getattr(k, "patch_embed_bwd")
        line(f"{model} op backward ({tag}, d_weight etc., no d_images)",
             timed(lambda: bwd(grad, *a, False), reps, trials), flops * (2 if ln else 1))


def aot_specs(models, dtype):
    """The AOT specs of every candidate (forward GEMM and d_weight), for ``--aot``; d_weight configurations
    differing only in the row splits compile the same and appear once."""
    from vlops.kernels import patch_embed as k

    seen = set()
    for model in models:
        P, D = MODELS[model]
        cands = [("gemm", k._aot_gemm, c) for c in CONFIGS] + [("dweight", k._aot_dweight, c[:5]) for c in DW_CONFIGS]
        for kind, make, (bm, bn, bk, nw, ns) in cands:
            name = f"{model}_{kind}_{bm}x{bn}x{bk}_w{nw}_s{ns}"
            if name not in seen:
                seen.add(name)
                spec = make(dtype, P=P, D=D, tiles=dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk))
                yield {**spec, "name": name, "num_warps": nw, "num_stages": ns}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=sorted(MODELS))
    p.add_argument("--dtype", choices=sorted(DT), default="bf16")
    p.add_argument("--configs", type=int, default=len(CONFIGS), help="how many of the tile configurations")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1")
    p.add_argument("--aot", action="store_true", help="compile the candidates for sm_90a instead (no GPU)")
    args = p.parse_args()
    if args.aot:
        sys.exit(1 if aot_check(aot_specs(args.models, args.dtype)) else 0)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device (use --device cpu with TRITON_INTERPRET=1 for a smoke run)")
    if dev.type == "cuda":
        import triton

        print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    for m in args.models:
        study(m, args.batch, DT[args.dtype], dev, args.configs, args.reps, args.trials)


if __name__ == "__main__":
    main()
