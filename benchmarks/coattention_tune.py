"""Tile study of the Triton co-attention kernels (kernels/coattention.py) on a CUDA GPU: the forward, the
dq kernel and the dk / dv kernel, each over a list of tile configurations, next to PyTorch's SDPA on the
same [B, N, H, d] tensors. The data for choosing ``kernels/coattention.block_config``; the headline
fused-vs-eager figures come from ``benchmarks/run.py``.

    python benchmarks/coattention_tune.py [--cases long vqa] [--kinds fwd bwd_dq bwd_dkdv] [--reps 10]
    python benchmarks/coattention_tune.py --aot        (no GPU: compiles every candidate for sm_90a and
                                                        prints registers, spills and shared memory)
    TRITON_INTERPRET=1 python benchmarks/coattention_tune.py --device cpu --smoke   (a smoke run on CPU)

Cases (bf16, 8 heads of 128): ``long``, Nt = 512 and Nv = 2048 with every key valid (the TFLOP/s of
issue-sized long sequences); ``long_pad``, the same with random lengths from half to full; ``vqa``, batch
256 at VQA sizes (Nt = 20, Nv = 101 padded from 37..101).

Flops counted: forward 4 H d per (query, valid key) pair of both directions (QK^T and PV); backward 2.5x
that (flash attention's convention: five products, though the two kernels recompute QK^T and dout V^T
once more each). One line per measurement: milliseconds (median over trials of back-to-back calls, CUDA
events), TFLOP/s, and the relative error against SDPA (outputs, or the six gradients); a configuration
with an error over 2e-2 or that does not compile is left out of the ranking. A dq (dk / dv) candidate is
timed as the whole backward with the other kernel at its default tiles.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from tune_common import aot_check, line, measure, print_best, rel, timed


CASES = {
    "long": dict(B=8, H=8, d=128, Nt=512, Nv=2048, t=None, i=None),
    "long_pad": dict(B=8, H=8, d=128, Nt=512, Nv=2048, t=(256, 512), i=(1024, 2048)),
    "vqa": dict(B=256, H=8, d=128, Nt=20, Nv=101, t=(20, 20), i=(37, 101)),
    "smoke": dict(B=1, H=1, d=32, Nt=9, Nv=23, t=(5, 9), i=(10, 23)),
}

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel; block_config's default is timed first in any case.
# dq: BLOCK_M queries x BLOCK_N keys; dk / dv: BLOCK_N keys per program x BLOCK_M queries per step. Each
# compiles for sm_90a (bf16, head dim 128) without spills and within the shared memory limit (--aot).
LONG = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3),
            (64, 64, 4, 4), (64, 32, 4, 3), (128, 128, 8, 3)],
    "bwd_dq": [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (64, 64, 8, 3),
               (128, 32, 8, 3), (64, 128, 8, 2)],
    "bwd_dkdv": [(32, 128, 8, 2), (32, 64, 4, 2), (16, 128, 8, 2), (32, 128, 8, 3), (64, 64, 8, 2),
                 (64, 64, 8, 3), (16, 64, 4, 2), (32, 64, 8, 3)],
}
SHORT = {
    "fwd": [(64, 64, 8, 2), (64, 64, 4, 2), (64, 128, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2)],
    "bwd_dq": [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2)],
    "bwd_dkdv": [(32, 64, 8, 2), (32, 64, 4, 2), (16, 64, 4, 2), (32, 128, 8, 2), (64, 64, 8, 2),
                 (16, 128, 8, 2)],
}
SMOKE = {"fwd": [(16, 16, 4, 1)], "bwd_dq": [(16, 32, 4, 1)], "bwd_dkdv": [(16, 16, 4, 1)]}
KINDS = ("fwd", "bwd_dq", "bwd_dkdv")


def candidates(case: str) -> dict:
    return SMOKE if case == "smoke" else (SHORT if CASES[case]["Nv"] <= 128 else LONG)


def tiles(cfg) -> dict:
    bm, bn, nw, ns = cfg
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns)


def inputs(case: str, dt, dev):
    c = CASES[case]
    B, H, d, Nt, Nv = c["B"], c["H"], c["d"], c["Nt"], c["Nv"]
    g = torch.Generator().manual_seed(0)

    def lengths(rng, N):
        if rng is None:
            return torch.full((B,), N, dtype=torch.int32)
        return torch.randint(rng[0], rng[1] + 1, (B,), generator=g, dtype=torch.int32)

    t_len, i_len = lengths(c["t"], Nt).to(dev), lengths(c["i"], Nv).to(dev)
    ts = [torch.randn(B, n, H, d, generator=g).to(dev, dt) for n in (Nt, Nt, Nt, Nv, Nv, Nv)]
    dos = [torch.randn(B, n, H, d, generator=g).to(dev, dt) for n in (Nt, Nv)]
    pairs = Nt * float(i_len.sum()) + Nv * float(t_len.sum())
    return c, ts, dos, t_len, i_len, 4.0 * H * d * pairs


def sdpa(ts, t_len, i_len, Nt, Nv):
    """Both directions by SDPA on [B, H, N, d] views; boolean key masks only where a length is short."""
    tq, tk, tv, iq, ik, iv = (t.transpose(1, 2) for t in ts)
    t_keep = torch.arange(Nt, device=tq.device)[None, :] < t_len[:, None]
    i_keep = torch.arange(Nv, device=tq.device)[None, :] < i_len[:, None]
    i_mask = None if bool(i_keep.all()) else i_keep[:, None, None, :]
    t_mask = None if bool(t_keep.all()) else t_keep[:, None, None, :]
    t_out = F.scaled_dot_product_attention(tq, ik, iv, attn_mask=i_mask).transpose(1, 2)
    i_out = F.scaled_dot_product_attention(iq, tk, tv, attn_mask=t_mask).transpose(1, 2)
    return t_out, i_out


def study(case, kinds, dt, dev, reps, trials):
    from vlops.kernels import coattention as k

    c, ts, dos, t_len, i_len, flops = inputs(case, dt, dev)
    Nt, Nv, d = c["Nt"], c["Nv"], c["d"]
    scale = d ** -0.5
    args = (t_len, i_len, None, None, scale, 0, 0.0, 0)
    print(f"\n## {case}: B={c['B']} H={c['H']} d={d} Nt={Nt} Nv={Nv} lengths t {c['t'] or 'full'} i {c['i'] or 'full'} "
          f"{dt} ({flops / 1e9:.1f} GFLOP forward)", flush=True)

    # SDPA: reference outputs and gradients (in the dtype, fp32 accumulation) and its times
    leaves = [t.detach().clone().requires_grad_() for t in ts]
    ref_out = sdpa(leaves, t_len, i_len, Nt, Nv)
    torch.autograd.backward(ref_out, dos)
    ref_out = [o.detach() for o in ref_out]
    ref_grads = [x.grad for x in leaves]
    with torch.no_grad():
        line(f"{case} sdpa forward", timed(lambda: sdpa(ts, t_len, i_len, Nt, Nv), reps, trials), flops)

    def sdpa_fwd_bwd():
        for x in leaves:
            x.grad = None
        torch.autograd.backward(sdpa(leaves, t_len, i_len, Nt, Nv), dos)

    line(f"{case} sdpa forward+backward", timed(sdpa_fwd_bwd, reps, trials), 3.5 * flops)

    out = k.co_attention_fwd(*ts, *args)
    best = {}
    for kind in kinds:
        ranked = []
        for cfg in [None] + candidates(case)[kind]:
            name = f"{case} {kind} " + ("default " + _desc(k, kind, ts[0], d, max(Nt, Nv)) if cfg is None
                                        else "{}x{} w{} s{}".format(*cfg))
            blocks = None if cfg is None else (tiles(cfg) if kind == "fwd" else {kind: tiles(cfg)})
            if kind == "fwd":
                fn = lambda b=blocks: k.co_attention_fwd(*ts, *args, blocks=b)  # noqa: E731
                measure(name, fn, lambda got: rel(got[:2], ref_out), flops, reps, trials, 2e-2, ranked, cfg, " vs sdpa")
            else:
                fn = lambda b=blocks: k.co_attention_bwd(*dos, *ts, *out, *args, blocks=b)  # noqa: E731
                measure(name, fn, lambda got: rel(got, ref_grads), 2.5 * flops, reps, trials, 2e-2, ranked, cfg,
                        " vs sdpa")
        print_best(f"{case} {kind} best: ", ranked, lambda cfg: "default" if cfg is None else str(cfg))
        if ranked:
            best[kind] = ranked[0]
    return best


def _desc(k, kind, tq, d, n_max):
    cfg = k.block_config(kind, tq.element_size(), d, n_max, False, True)
    return "({}x{} w{} s{})".format(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"])


def aot_specs(cases, kinds):
    """The AOT specs (bf16) of every candidate, for ``--aot``."""
    from vlops.kernels import coattention as k

    for case in cases:
        c = CASES[case]
        for kind in kinds:
            for cfg in candidates(case)[kind]:
                spec = k._aot_spec(kind, "bf16", c["d"], n_max=max(c["Nt"], c["Nv"]), tiles=tiles(cfg))
                spec["name"] = f"{case}_{kind}_" + "{}x{}_w{}_s{}".format(*cfg)
                yield spec


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=["long", "vqa"], choices=sorted(CASES))
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1")
    p.add_argument("--smoke", action="store_true", help="the tiny 'smoke' case only (CPU check of this script)")
    p.add_argument("--aot", action="store_true", help="compile the candidates for sm_90a instead (no GPU)")
    args = p.parse_args()
    cases = ["smoke"] if args.smoke else args.cases
    if args.aot:
        sys.exit(1 if aot_check(aot_specs([c for c in cases if c != "smoke"], args.kinds)) else 0)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device (use --device cpu --smoke with TRITON_INTERPRET=1 for a smoke run)")
    if dev.type == "cuda":
        import triton

        print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    for case in cases:
        best = study(case, args.kinds, dt, dev, args.reps, args.trials)
        print(f"{case} best per kernel: {best}", flush=True)


if __name__ == "__main__":
    main()
