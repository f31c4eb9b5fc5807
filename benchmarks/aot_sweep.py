"""Compile the Triton kernels for sm_90a (no GPU) over the specialisations a run can reach, not only the
AOT_SPECS sample: the same checks as tests/test_aot_sm90.py (compile errors, register spills, shared memory
over the Hopper limit, wgmma) over a product of the constexpr choices the launchers make.

    python benchmarks/aot_sweep.py [--ops coattention patch_embed contrastive] [--jobs 2]
    PYTHONPATH=.venv/triton-3.6 python benchmarks/aot_sweep.py     # with the GPU machine's triton

Grids:

- co-attention: the three kernels x bf16 / fp32 x head dims 64 / 128 / 256 (fp32 up to 128) x short (VQA,
  n_max 101) / long x aligned or not x mask mode 0 / 1 x no mask / both masks x with and without dropout,
  each at the tiles ``block_config`` picks (480 specialisations);
- patch stem: the forward GEMM (P 14 / 16, 16-bit output or fp32 pre-norm rows, NCHW / channels_last /
  strided, with and without padding, D 768 / 1000), the d_weight and d_images GEMMs likewise, and the row
  kernels (D 768 / 1000 / 1280, every LayerNorm combination, with and without affine parameters);
- contrastive: every fused and chunked kernel with each of its flags, fp32 / bf16 / fp16.

Prints one line per failing specialisation and a count per op; exits 1 when any failed. The co-attention
grid took about 30 minutes per triton on 2 cores, the other two about 5 each. ``--limit N`` compiles the
first N of each op (a smoke run, tests/test_tune_scripts.py).
"""
from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import sys
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P = itertools.product


def _coattention():
    from vlops.kernels import coattention as k

    for kind, dt, d, n_max, aligned, mode, masks, dropout in P(
            ("fwd", "bwd_dq", "bwd_dkdv"), ("bf16", "fp32"), (64, 128, 256), (101, None), (True, False), (0, 1),
            ("", "ti"), (False, True)):
        if not (dt == "fp32" and d > 128):
            yield partial(k._aot_spec, kind, dt, d, n_max=n_max, mode=mode, masks=masks, dropout=dropout,
                          aligned=aligned)


def _patch_embed():
    from vlops.kernels import patch_embed as k

    for dt, p, out, layout, pad, D in P(("fp32", "bf16"), (14, 16), (None, "fp32"), ("nchw", "nhwc", "any"),
                                         (False, True), (768, 1000)):
        if not (dt == "fp32" and out == "fp32"):
            yield partial(k._aot_gemm, dt, P=p, out=out, layout=layout, pad=pad, D=D)
    for dt, p, layout, pad, D in P(("fp32", "bf16"), (14, 16), ("nchw", "nhwc", "any"), (False, True), (768, 1000)):
        yield partial(k._aot_dweight, dt, P=p, layout=layout, pad=pad, D=D)
    for dt, p, pad, D in P(("fp32", "bf16"), (14, 16), (False, True), (768, 1000)):
        yield partial(k._aot_dimages, dt, P=p, pad=pad, D=D)
    for out, D, (pn, ln), affine in P(("fp32", "bf16"), (768, 1000, 1280), ((True, False), (False, True), (True, True)),
                                      (True, False)):
        yield partial(k._aot_norm, out, D, use_pn=pn, use_ln=ln, affine=affine)
        yield partial(k._aot_norm_bwd, out, D, use_pn=pn, use_ln=ln, affine=affine)


def _contrastive():
    from vlops.kernels import contrastive as k

    for dt in ("fp32", "bf16", "fp16"):
        yield partial(k._aot_spec, "lse", dt)
        for neg in (True, False):
            yield partial(k._aot_spec, "siglip_fwd", dt, NEG_ONLY=neg)
        for part in (True, False):
            yield partial(k._aot_spec, "clip_grad", dt, WRITE_PART=part)
            for neg, loss in P((True, False), (False, True) if part else (False,)):
                yield partial(k._aot_spec, "siglip_grad", dt, NEG_ONLY=neg, WRITE_PART=part, LOSS=loss)
    for dt in ("bf16", "fp16"):
        yield partial(k._aot_chunk_spec, "chunk_lse", dt)
        yield partial(k._aot_chunk_spec, "chunk_clip_w", dt)
        for neg, grad, loss in P((True, False), (True, False), (False, True)):
            if grad or not loss:
                yield partial(k._aot_chunk_spec, "chunk_siglip", dt, NEG_ONLY=neg, GRAD=grad, LOSS=loss)


GRIDS = {"coattention": _coattention, "patch_embed": _patch_embed, "contrastive": _contrastive}


def _specs(op, limit):
    makers = list(GRIDS[op]())
    return makers[:limit] if limit else makers


def _job(task):
    """(op, index) -> (op, spec name, failures): compiled in a pool worker (stderr of the compiler silenced)."""
    op, i, limit = task
    sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]
    import aot

    spec = _specs(op, limit)[i]()
    fd = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        fails = aot.check_spec(spec)[1]
    finally:
        os.dup2(fd, 2)
        os.close(fd)
    return op, f"{op} #{i} {spec['name']}", fails


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--limit", type=int, default=0, help="compile only the first N specialisations of each op")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("cannot run under TRITON_INTERPRET=1 (the kernels must be JIT functions)")
    sys.path.insert(0, ROOT)
    import triton

    tasks = [(op, i, args.limit) for op in args.ops for i in range(len(_specs(op, args.limit)))]
    print(f"triton {triton.__version__}: {len(tasks)} specialisations", flush=True)
    done = {op: 0 for op in args.ops}
    failed = {op: 0 for op in args.ops}
    with multiprocessing.get_context("spawn").Pool(max(1, args.jobs)) as pool:
        for op, name, fails in pool.imap_unordered(_job, tasks):
            done[op] += 1
            failed[op] += bool(fails)
            for f in fails:
                print(f"FAIL [{name}] {f}", flush=True)
    for op in args.ops:
        print(f"{op}: {done[op]} compiled, {failed[op]} failed")
    return 1 if any(failed.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
