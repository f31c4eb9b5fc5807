"""The Triton contrastive kernels (kernels/contrastive.py) against float64 math of the kernel contract.

Without a GPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``) on CPU tensors,
in a subprocess (``python tests/test_contrastive_triton.py --worker cpu OUT.json SEED``) started once
per pytest session with the variable in its environment only, for the reasons given in
tests/test_diffusion_triton.py; this module imports neither triton nor the kernels. On a machine with
a CUDA GPU the same worker also runs compiled (``test_gpu_*``).

Each case draws fresh ``a`` [N, D], ``b`` [M, D] (unit-norm rows or plain normal rows) and runs all
launchers (``contrastive_lse``, ``clip_bwd`` fed the float64 LSEs rounded to fp32,
``siglip_fwd``, ``siglip_bwd``, and ``siglip_fwd_bwd``, whose five outputs are checked like theirs), by the
default method or, where the case names one, by the "fused" or
the "chunked" method; the reference builds ``S = scale * a @ b.T`` in float64 from the
same (dtype-rounded) inputs and applies the contract's formulas. Bounds, relative error
``||out - ref|| / ||ref||``: fp32 1e-5 interpreted (numpy fp32 dots), 5e-4 compiled (tf32 in the
``W @ y`` dots; 1e-3 when N or M is 1, where the tf32 rounding does not average out), in both cases at least ``2**-22 * max|S|`` (the fp32 rounding of S and of the LSEs,
amplified by exp, bounds any fp32 implementation: 2.4e-5 at |S| = 100); bf16 / fp16 1e-2, the feature
gradients measured against ``max(|ref|, (|W| @ |y|) / 2)`` elementwise (the kernels round the pair weights W
to the input dtype as dot operands, up to 2**-8 of each term for bf16, which a cancelling sum keeps). The scalar outputs (dscale, dbias, the SigLIP loss) are sums of terms of both
signs, so their error is measured against the sum of the absolute terms (the quantity fp32 rounding
scales with); likewise the LSEs are measured against ``max(|lse|, scale * max_j sum_d |a_id b_jd|)``, since
the rounding of ``S`` scales with the sum of the absolute products, which cancellation can leave far
above ``|S|``. NaN / inf never passes. The compiled-for-Hopper check (wgmma, no spills, shared memory)
is tests/test_aot_sm90.py, which collects ``kernels/contrastive.py``'s ``AOT_SPECS``.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TOL_INTERP = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}
TOL_GPU = {"float32": 5e-4, "bfloat16": 1e-2, "float16": 1e-2}
FP32_S_FACTOR = 2.0 ** -22
TINY = 1e-30
OUTPUTS = ["row_lse", "col_lse", "clip_da", "clip_db", "clip_dscale", "sig_loss", "sig_da", "sig_db", "sig_dscale",
           "sig_dbias"]


# --------------------------------------------------------------------------------------------
# The cases (plain data)

def _cases() -> list[dict]:
    cases = []

    def add(**kw):
        c = dict(dtype="float32", N=7, M=7, D=16, scale=1.0, unit=True, neg=False, dup=False, blocks=None,
                 method=None)
        c.update(kw)
        c["id"] = (f"{c['dtype'].replace('float', 'f')}-N{c['N']}M{c['M']}D{c['D']}-s{c['scale']:g}"
                   f"-{'unit' if c['unit'] else 'randn'}" + ("-neg" if c["neg"] else "")
                   + ("-dup" if c["dup"] else "") + ("-blk" + "_".join(f"{v}" for v in c["blocks"].values())
                                                     if c["blocks"] else "")
                   + (f"-{c['method']}" if c["method"] else ""))
        cases.append(c)

    shapes = [(1, 1), (7, 7), (33, 70), (70, 33), (70, 70), (1, 7), (7, 1)]
    ds = [3, 16, 100]
    scales = [1.0, 30.0, 100.0]
    i = 0
    for dt in ("float32", "bfloat16"):
        for N, M in shapes:
            for D in ds:
                add(dtype=dt, N=N, M=M, D=D, scale=scales[i % 3], unit=(i % 4) != 3, neg=(i % 5) in (1, 3))
                i += 1
    add(dtype="float16", N=33, M=33, D=100, scale=30.0)
    add(dtype="float16", N=70, M=7, D=16, scale=100.0, neg=True)
    # extremes: logit_scale 100 in bf16 with b == a (diagonal S = 100), random rows at scale 100 (|S| ~ 1e3)
    add(dtype="bfloat16", N=70, M=70, D=100, scale=100.0, dup=True)
    add(dtype="float32", N=33, M=70, D=100, scale=100.0, unit=False)
    add(dtype="bfloat16", N=70, M=33, D=16, scale=100.0, unit=False, neg=True)
    # duplicated rows (a has repeated rows, b == a: ties in every softmax)
    add(dtype="float32", N=33, M=33, D=16, scale=30.0, dup=True)
    add(dtype="float32", N=70, M=70, D=3, scale=1.0, dup=True, neg=True)
    # small tiles: several y blocks, D chunks and output-feature chunks (pid_d > 0) per program
    small = {"BLOCK_X": 16, "BLOCK_Y": 16, "BLOCK_D": 16, "BLOCK_DO": 32}
    add(dtype="float32", N=70, M=33, D=100, scale=30.0, blocks=small)
    add(dtype="bfloat16", N=33, M=70, D=100, scale=100.0, neg=True, blocks=small)
    add(dtype="float32", N=1, M=70, D=3, scale=100.0, unit=False, blocks=small)
    # both methods explicitly (the default is "fused" on CPU tensors and for fp32, "chunked" for 16-bit
    # CUDA tensors); CHUNK_ROWS below N: several chunks, a short last one, the column statistics merged
    for dt in ("float32", "bfloat16", "float16"):
        for method in ("fused", "chunked"):
            add(dtype=dt, N=70, M=33, D=100, scale=100.0, method=method, neg=method == "chunked")
    for blocks in ({"CHUNK_ROWS": 16}, {"CHUNK_ROWS": 1}):
        add(dtype="bfloat16", N=70, M=70, D=100, scale=100.0, dup=True, method="chunked", blocks=blocks)
        add(dtype="float32", N=33, M=70, D=16, scale=30.0, unit=False, method="chunked", blocks=blocks)
    add(dtype="bfloat16", N=1, M=7, D=3, scale=1.0, method="chunked")
    add(dtype="float32", N=7, M=1, D=16, scale=100.0, method="chunked", neg=True)
    return cases


CASES = _cases()


# --------------------------------------------------------------------------------------------
# worker (runs in the subprocess)

def _load_kernel_module():
    return importlib.import_module("vlops.kernels.contrastive")  # the installed package (kernels/ -> vlops.kernels)


def _rel_mag(torch, out, ref, mag):
    """||out - ref|| / ||max(|ref|, mag)||: the relative error against the larger of each element and the
    magnitude ``mag`` its rounding error scales with (``mag`` 0: the plain relative error)."""
    out = out.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    # values below fp32's range (exp(-700) of a saturated sigmoid) count as zero: floor 1e-30
    return (out - ref).norm().item() / max(torch.maximum(ref.abs(), mag).norm().item(), TINY)


def _rel_scalar(torch, out, ref, abs_terms):
    out = out.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return abs(out.item() - ref.item()) / max(abs_terms, TINY)


def _inputs(torch, c, gen):
    dt = getattr(torch, c["dtype"])
    N, M, D = c["N"], c["M"], c["D"]
    a = torch.randn(N, D, generator=gen, dtype=torch.float64)
    if c["dup"]:
        a[1::3] = a[0::3][: a[1::3].shape[0]]  # every third row repeated
        b = a[:M].clone() if M <= N else torch.cat([a, torch.randn(M - N, D, generator=gen, dtype=torch.float64)])
    else:
        b = torch.randn(M, D, generator=gen, dtype=torch.float64)
    if c["unit"]:
        a = a / a.norm(dim=1, keepdim=True)
        b = b / b.norm(dim=1, keepdim=True)
    return a.to(dt).contiguous(), b.to(dt).contiguous()


def _run_case(torch, k, c, gen, device):
    a, b = _inputs(torch, c, gen)
    N, M, D = c["N"], c["M"], c["D"]
    scale = torch.tensor([c["scale"]], dtype=torch.float32)
    bias = torch.tensor([float(torch.empty(1).uniform_(-10.0, 2.0, generator=gen))], dtype=torch.float32)
    coef_row = float(torch.empty(1).uniform_(0.2, 1.0, generator=gen)) / N
    coef_col = float(torch.empty(1).uniform_(0.2, 1.0, generator=gen)) / M
    da_, db_ = a.to(device), b.to(device)
    before = (da_.clone(), db_.clone())
    sc, bi = scale.to(device), bias.to(device)
    kw = dict(blocks=c["blocks"], method=c["method"])

    # float64 contract math from the same (rounded) inputs
    A, B = a.double(), b.double()
    raw = A @ B.T
    s64, b64 = float(scale), float(bias)
    S = s64 * raw
    row_ref, col_ref = S.logsumexp(1), S.logsumexp(0)
    R = coef_row * torch.exp(S - row_ref[:, None])
    Cc = coef_col * torch.exp(S - col_ref[None, :])
    W = R + Cc
    # any centres: the kernel subtracts them inside the scale-gradient sum (offsets keep the terms
    # away from exact cancellation, which would make the relative error meaningless)
    ctr_r = 0.5 * raw.mean(1) - 0.25
    ctr_c = 0.25 * raw.mean(0) + 0.125
    z = -torch.ones(N, M, dtype=torch.float64)
    if not c["neg"]:
        n = min(N, M)
        z[torch.arange(n), torch.arange(n)] = 1.0
    L = S + b64
    sp = torch.nn.functional.softplus(-z * L)
    Ws = -z * torch.sigmoid(-z * L)

    t0 = time.perf_counter()
    row, col = k.contrastive_lse(da_, db_, sc, **kw)
    cda, cdb, cds = k.clip_bwd(da_, db_, sc, row_ref.float().to(device), col_ref.float().to(device), coef_row,
                               coef_col, ctr_r.float().to(device), ctr_c.float().to(device), **kw)
    loss = k.siglip_fwd(da_, db_, sc, bi, c["neg"], **kw)
    sda, sdb, sds, sdbias = k.siglip_bwd(da_, db_, sc, bi, c["neg"], **kw)
    fb = k.siglip_fwd_bwd(da_, db_, sc, bi, c["neg"], **kw)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0

    outs = dict(row_lse=row, col_lse=col, clip_da=cda, clip_db=cdb, clip_dscale=cds, sig_loss=loss, sig_da=sda,
                sig_db=sdb, sig_dscale=sds, sig_dbias=sdbias, fb_loss=fb[0], fb_da=fb[1], fb_db=fb[2], fb_dscale=fb[3],
                fb_dbias=fb[4])
    shapes = dict(row_lse=(N,), col_lse=(M,), clip_da=(N, D), clip_db=(M, D), clip_dscale=(1,), sig_loss=(1,),
                  sig_da=(N, D), sig_db=(M, D), sig_dscale=(1,), sig_dbias=(1,))
    shapes.update({"fb_" + n[4:]: shapes[n] for n in ("sig_loss", "sig_da", "sig_db", "sig_dscale", "sig_dbias")})
    res = {"id": c["id"], "dtype": c["dtype"], "time_s": elapsed, "max_abs_s": S.abs().max().item(),
           "inputs_unchanged": torch.equal(before[0], da_) and torch.equal(before[1], db_),
           "bad_shape": [n for n, o in outs.items() if tuple(o.shape) != shapes[n] or o.dtype != torch.float32],
           "nonfinite": [n for n, o in outs.items() if not torch.isfinite(o).all()]}
    err = res["err"] = {}
    # fp32 rounding of S_ij scales with scale * sum_d |a_id b_jd|, not with |S_ij| (which cancellation can make
    # far smaller: one unit-vector pair gave |S| = 1.8e-4 at scale 100): the LSEs are compared relative to
    # max(|lse|, that magnitude), and the SigLIP scale gradient's terms counted with |raw| replaced by it
    raw_abs = A.abs() @ B.abs().T
    err["row_lse"] = _rel_mag(torch, row, row_ref, s64 * raw_abs.max(1).values)
    err["col_lse"] = _rel_mag(torch, col, col_ref, s64 * raw_abs.max(0).values)
    # 16-bit inputs: the kernels round the pair weights (W, Ws) to the input dtype as dot operands (as flash
    # attention rounds P), up to 2**-8 of each term for bf16, and a sum over the pairs that cancels keeps that
    # absolute error (seed 496086627, bf16 N = 1, M = 7, D = 3: 1.08e-2 of |W b| with 1e-2 allowed): the
    # gradients are measured against max(|ref|, half the size of their terms), elementwise, for 16-bit inputs
    half = 0.5 if c["dtype"] != "float32" else 0.0
    err["clip_da"] = _rel_mag(torch, cda, W @ B, half * (W.abs() @ B.abs()))
    err["clip_db"] = _rel_mag(torch, cdb, W.T @ A, half * (W.abs().T @ A.abs()))
    # two terms per pair, each rounded at its own size: their absolute values count separately (one pair,
    # N = M = 1, can have terms of 0.13 and -0.13 whose sum is 4e-4)
    ds_r, ds_c = R * (raw - ctr_r[:, None]), Cc * (raw - ctr_c[None, :])
    err["clip_dscale"] = _rel_scalar(torch, cds, (ds_r + ds_c).sum(), (ds_r.abs() + ds_c.abs()).sum().item())
    for pre, (ls, g_a, g_b, g_s, g_bias) in (("sig", (loss, sda, sdb, sds, sdbias)), ("fb", fb)):
        err[pre + "_loss"] = _rel_scalar(torch, ls, sp.sum(), sp.abs().sum().item())
        err[pre + "_da"] = _rel_mag(torch, g_a, Ws @ B, half * (Ws.abs() @ B.abs()))
        err[pre + "_db"] = _rel_mag(torch, g_b, Ws.T @ A, half * (Ws.abs().T @ A.abs()))
        err[pre + "_dscale"] = _rel_scalar(torch, g_s, (Ws * raw).sum(), (Ws.abs() * raw_abs).sum().item())
        err[pre + "_dbias"] = _rel_scalar(torch, g_bias, Ws.sum(), Ws.abs().sum().item())
    return res


def _bad_input_checks(torch, k):
    a = torch.randn(4, 8)
    b = torch.randn(5, 8)
    s = torch.ones(1)
    out = []
    bad = {
        "share D": lambda: k.contrastive_lse(a, torch.randn(5, 7), s),
        "scale": lambda: k.contrastive_lse(a, b, torch.ones(1, dtype=torch.float64)),
        "bias": lambda: k.siglip_fwd(a, b, s, torch.ones(2), False),
        "row_lse": lambda: k.clip_bwd(a, b, s, torch.zeros(3), torch.zeros(5), 1.0, 1.0, torch.zeros(4),
                                      torch.zeros(5)),
        "dtype": lambda: k.siglip_bwd(a, b.double(), s, s, False),
        "D": lambda: k.siglip_fwd_bwd(a, torch.randn(5, 7), s, s, False),
        "contiguous": lambda: k.contrastive_lse(torch.randn(8, 4).T, b, s),
        "method": lambda: k.clip_bwd(a, b, s, torch.zeros(4), torch.zeros(5), 1.0, 1.0, torch.zeros(4),
                                     torch.zeros(5), method="tiled"),
    }
    from triton_worker import bad_input_results

    return out + bad_input_results((name, name, fn) for name, fn in bad.items())


def _worker(device: str, out_json: str, seed: int) -> int:
    import warnings

    import torch

    warnings.simplefilter("ignore", RuntimeWarning)  # numpy exp/log warnings of masked lanes (interpreter)
    k = _load_kernel_module()
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    results = {"cases": {}, "seed": seed}
    for c in CASES:
        try:
            results["cases"][c["id"]] = _run_case(torch, k, c, gen, device)
        except Exception as e:  # noqa: BLE001 - reported per case
            import traceback

            results["cases"][c["id"]] = {"id": c["id"], "error": traceback.format_exc(limit=4) + repr(e)}
    results["bad_input"] = _bad_input_checks(torch, k)
    results["total_s"] = time.perf_counter() - t0
    with open(out_json, "w") as f:
        json.dump(results, f, indent=1)
    return 0


# --------------------------------------------------------------------------------------------
# pytest side (no triton import here)

from triton_worker import assert_bad_inputs_ok, assert_collected_by_aot, worker_fixtures  # noqa: E402

interp_results, gpu_results, dry_results, test_sm90_dry_compile = worker_fixtures(__file__, "contrastive")


def _check_case(res, case, tol_table):
    r = res["cases"][case["id"]]
    assert "error" not in r, r["error"]
    assert r["inputs_unchanged"], "a launcher modified an input"
    assert not r["bad_shape"], f"wrong shape or dtype (want float32): {r['bad_shape']}"
    assert not r["nonfinite"], f"NaN / inf in {r['nonfinite']}, seed {res['seed']}"
    tol = tol_table[case["dtype"]]
    if tol_table is TOL_GPU and case["dtype"] == "float32" and min(case["N"], case["M"]) == 1:
        tol = 1e-3  # tf32 W @ y: the 2**-11 operand rounding does not average out over one term
    if case["dtype"] == "float32":
        # S_ij in fp32 (and the fp32 LSEs) carry an absolute error ~|S| 2**-24 that exp() turns into a
        # relative one: any fp32 implementation is limited to ~|S|max * 2**-22 (2.4e-5 at |S| = 100).
        tol = max(tol, FP32_S_FACTOR * r["max_abs_s"])
    bad = {n: e for n, e in r["err"].items() if not (e <= tol)}  # NaN fails too
    assert not bad, f"relative errors above {tol:g}: {bad}, seed {res['seed']}"


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_interpreter(interp_results, case):
    _check_case(interp_results, case, TOL_INTERP)


def test_interpreter_bad_input(interp_results):
    assert_bad_inputs_ok(interp_results)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_gpu(gpu_results, case):
    _check_case(gpu_results, case, TOL_GPU)


def test_aot_collects_contrastive():
    assert_collected_by_aot("contrastive")


if __name__ == "__main__":
    from triton_worker import worker_main

    sys.exit(worker_main(_worker))
