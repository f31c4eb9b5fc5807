"""Native CPU kernels of the contrastive losses: vlops._C.contrastive_lse_cpu, clip_bwd_cpu,
siglip_fwd_cpu, siglip_bwd_cpu and siglip_fwd_bwd_cpu, called with the positional arguments of the kernel
contract (docstring of vlops/ops/contrastive.py) and compared with the contract's formulas in float64.

Bounds (DESIGN.md): relative error ||out - ref|| / ||ref|| against the float64 formulas (evaluated on
the inputs as given, i.e. already rounded to their dtype) of <= 1e-5 in fp32, <= 1e-2 in fp16 / bf16
and <= 1e-10 in fp64. Where the problem itself is ill-conditioned in fp32 (exp of logits of size
~100 amplifies the unavoidable fp32 rounding of S), the bound is raised to 2x the error of the same
formulas evaluated by eager PyTorch in fp32 (the rule DESIGN.md gives for low precision); the unit-norm
cases never need it. The log-sum-exps are measured against the larger of their norm and the norm of
``scale * max_j sum_d |a_id b_jd|`` (per row; per column for the column LSEs): the size the fp32 rounding
of S scales with, which cancellation can leave far above |S| (raw rows, D = 100, one column: an LSE of 0.05
whose terms sum to 15 in absolute value). Sums of terms of both signs (the scale and bias gradients) are
measured against the sum of their absolute terms likewise.
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch

from conftest import cpu_isa

_C = pytest.importorskip("vlops._C", reason="the compiled extension vlops._C is not built")
if not hasattr(_C, "contrastive_lse_cpu"):
    pytest.skip("vlops._C was built without the contrastive kernels", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-10}
SIZES = [1, 2, 7, 129, 300]
DIMS = [3, 64, 100]
SEED_BASE = int(os.environ.get("VLOPS_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))  # printed on failure


def _gen(*salt) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr((SEED_BASE,) + salt).encode()))


def _out_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_inputs(N, M, D, dtype, kind, *salt):
    """a [N, D], b [M, D] in `dtype`; scale in [1, 100] (float32 [1]); bias float32 [1]."""
    g = _gen(N, M, D, str(dtype), kind, *salt)
    a = torch.randn(N, D, generator=g, dtype=torch.float64)
    b = torch.randn(M, D, generator=g, dtype=torch.float64)
    if kind == "unit":
        a = a / a.norm(dim=1, keepdim=True)
        b = b / b.norm(dim=1, keepdim=True)
        scale = 1.0 + 99.0 * torch.rand((), generator=g, dtype=torch.float64).item()
    elif kind == "random":  # rows of norm ~1 (not unit), the scale still up to 100
        a = a / D ** 0.5
        b = b / D ** 0.5
        scale = 1.0 + 99.0 * torch.rand((), generator=g, dtype=torch.float64).item()
    elif kind == "raw":  # unnormalised rows (norm ~sqrt(D)), a small scale
        scale = 0.05 + 0.5 * torch.rand((), generator=g, dtype=torch.float64).item()
    elif kind == "dup":  # duplicated rows, b shares rows with a
        idx = torch.randint(0, max(1, N // 3), (N,), generator=g)
        a = (a / a.norm(dim=1, keepdim=True))[idx]
        jdx = torch.randint(0, N, (M,), generator=g)
        b = a[jdx].clone()
        scale = 1.0 + 99.0 * torch.rand((), generator=g, dtype=torch.float64).item()
    else:
        raise ValueError(kind)
    bias = -10.0 + 20.0 * torch.rand((), generator=g, dtype=torch.float64).item()
    return (a.to(dtype).contiguous(), b.to(dtype).contiguous(),
            torch.tensor([scale], dtype=torch.float32), torch.tensor([bias], dtype=torch.float32))


def relerr(out, ref):
    out = out.double()
    ref = ref.double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite output"
    # float32 outputs cannot hold values below its normal range (~1e-38; a saturated sigmoid at
    # |L| > 88): a reference that small is judged by absolute error against 1e-30
    den = max(ref.norm().item(), 1e-30)
    num = (out - ref).norm().item()
    return num / den


def _softplus(t):
    return t.clamp_min(0) + torch.log1p(torch.exp(-t.abs()))


def _z(N, M, negative_only, dtype):
    z = -torch.ones(N, M, dtype=dtype)
    if not negative_only:
        k = min(N, M)
        z[torch.arange(k), torch.arange(k)] = 1.0
    return z


# The contract's formulas, evaluated in `ct` (float64: the reference; float32: "eager fp32").
def f_lse(a, b, scale, ct):
    S = float(scale) * (a.to(ct) @ b.to(ct).T)
    return S.logsumexp(1), S.logsumexp(0)


def _centers(row_lse, col_lse):
    """Some row / column centres for the scale-gradient sum (any values; offsets avoid exact cancellation)."""
    return 0.5 * torch.tanh(row_lse) - 0.125, 0.25 * torch.tanh(col_lse) + 0.0625


def _clip_bwd(a, b, scale, row_lse, col_lse, cr, cc):
    return _C.clip_bwd_cpu(a, b, scale, row_lse, col_lse, cr, cc, *_centers(row_lse, col_lse))


def f_clip_bwd(a, b, scale, row_lse, col_lse, cr, cc, ct):
    X = a.to(ct) @ b.to(ct).T
    S = float(scale) * X
    R = cr * torch.exp(S - row_lse.to(ct)[:, None])
    C = cc * torch.exp(S - col_lse.to(ct)[None, :])
    u, v = (t.to(ct) for t in _centers(row_lse, col_lse))
    W = R + C
    return W @ b.to(ct), W.T @ a.to(ct), (R * (X - u[:, None]) + C * (X - v[None, :])).sum().reshape(1)


def f_siglip_fwd(a, b, scale, bias, neg, ct):
    X = a.to(ct) @ b.to(ct).T
    L = float(scale) * X + float(bias)
    z = _z(*X.shape, neg, ct)
    return _softplus(-z * L).sum().reshape(1)


def f_siglip_bwd(a, b, scale, bias, neg, ct):
    X = a.to(ct) @ b.to(ct).T
    L = float(scale) * X + float(bias)
    z = _z(*X.shape, neg, ct)
    W = -z * torch.sigmoid(-z * L)
    return W @ b.to(ct), W.T @ a.to(ct), (W * X).sum().reshape(1), W.sum().reshape(1)


def siglip_sum_floors(a, b, scale, bias, neg):
    """sum |terms| of SigLIP's d scale and d bias: sums of terms of both signs (e.g. 1 - 1 + 5e-13) are
    judged against the size of their terms, not against a result that may cancel to ~0."""
    X = a.double() @ b.double().T
    L = float(scale) * X + float(bias)
    z = _z(*X.shape, neg, torch.float64)
    W = -z * torch.sigmoid(-z * L)
    return {2: (W * X).abs().sum().item(), 3: W.abs().sum().item()}


def lse_floors(a, b, scale):
    """Norms of the magnitudes the row and column LSEs' fp32 rounding scales with (see the docstring)."""
    mag = float(scale) * (a.double().abs() @ b.double().abs().T)  # [N, M]
    return {0: mag.amax(1).norm().item(), 1: mag.amax(0).norm().item()} if mag.numel() else {}


def clip_sum_floors(a, b, scale, row_lse, col_lse, cr, cc):
    """sum |terms| of clip_bwd's d scale (terms of both signs), as siglip_sum_floors."""
    X = a.double() @ b.double().T
    S = float(scale) * X
    R = cr * torch.exp(S - row_lse.double()[:, None])
    C = cc * torch.exp(S - col_lse.double()[None, :])
    u, v = (t.double() for t in _centers(row_lse, col_lse))
    return {2: ((R * (X - u[:, None])).abs() + (C * (X - v[None, :])).abs()).sum().item()}


def check(name, outs, refs, eager, dtype, info, floors=None):
    outs, refs, eager = ((x if isinstance(x, (tuple, list)) else (x,)) for x in (outs, refs, eager))
    assert len(outs) == len(refs) == len(eager), (name, len(outs), len(refs))
    for k, (o, r, e) in enumerate(zip(outs, refs, eager)):
        assert o.dtype == _out_dtype(dtype), (name, k, o.dtype)
        err = relerr(o, r)
        if floors and k in floors:
            err = (o.double() - r.double()).norm().item() / max(r.norm().item(), floors[k], 1e-30)
        bound = TOL[dtype]
        if dtype != torch.float64:  # ill-conditioned sums (d scale, d bias): 2x the same math in eager fp32
            bound = max(bound, 2.0 * relerr(e, r))
        assert err <= bound, f"{name} output {k}: relerr {err:.3e} > {bound:.3e} ({info}, seed {SEED_BASE})"


def run_case(fn, N, M, D, dtype, kind, neg=False, salt=0):
    a, b, scale, bias = make_inputs(N, M, D, dtype, kind, fn, salt)
    info = f"N={N} M={M} D={D} {dtype} {kind} scale={scale.item():.3g} neg={neg}"
    if fn == "lse":
        out = _C.contrastive_lse_cpu(a, b, scale)
        check(fn, out, f_lse(a, b, scale, torch.float64), f_lse(a, b, scale, torch.float32), dtype, info,
              floors=lse_floors(a, b, scale))
    elif fn == "clip_bwd":
        od = _out_dtype(dtype)
        rl, cl = (t.to(od) for t in f_lse(a, b, scale, torch.float64))
        g = _gen(fn, N, M, salt)
        cr, cc = (torch.rand(2, generator=g, dtype=torch.float64) + 0.1).tolist()
        if salt % 3 == 1:
            cr = 0.0
        elif salt % 3 == 2:
            cc = 0.0
        out = _clip_bwd(a, b, scale, rl, cl, cr, cc)
        check(fn, out, f_clip_bwd(a, b, scale, rl, cl, cr, cc, torch.float64),
              f_clip_bwd(a, b, scale, rl, cl, cr, cc, torch.float32), dtype, info,
              floors=clip_sum_floors(a, b, scale, rl, cl, cr, cc))
    elif fn == "siglip_fwd":
        out = _C.siglip_fwd_cpu(a, b, scale, bias, neg)
        assert out.shape == (1,)
        check(fn, out, f_siglip_fwd(a, b, scale, bias, neg, torch.float64),
              f_siglip_fwd(a, b, scale, bias, neg, torch.float32), dtype, info)
    elif fn == "siglip_bwd":
        out = _C.siglip_bwd_cpu(a, b, scale, bias, neg)
        check(fn, out, f_siglip_bwd(a, b, scale, bias, neg, torch.float64),
              f_siglip_bwd(a, b, scale, bias, neg, torch.float32), dtype, info,
              floors=siglip_sum_floors(a, b, scale, bias, neg))
    elif fn == "siglip_fwd_bwd":
        out = _C.siglip_fwd_bwd_cpu(a, b, scale, bias, neg)
        check(fn, out, (f_siglip_fwd(a, b, scale, bias, neg, torch.float64),
                        *f_siglip_bwd(a, b, scale, bias, neg, torch.float64)),
              (f_siglip_fwd(a, b, scale, bias, neg, torch.float32), *f_siglip_bwd(a, b, scale, bias, neg, torch.float32)),
              dtype, info, floors={k + 1: v for k, v in siglip_sum_floors(a, b, scale, bias, neg).items()})
        # the one pass computes what the forward and backward kernels compute, to the bit
        apart = (_C.siglip_fwd_cpu(a, b, scale, bias, neg), *_C.siglip_bwd_cpu(a, b, scale, bias, neg))
        assert all(torch.equal(o, w) for o, w in zip(out, apart)), info
    else:
        raise ValueError(fn)


FNS = ["lse", "clip_bwd", "siglip_fwd", "siglip_bwd", "siglip_fwd_bwd"]


@pytest.mark.parametrize("kind", ["unit", "random", "raw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fn", FNS)
def test_against_formulas(fn, dtype, kind):
    """Every (N, M) pair of SIZES (N != M included), D cycling through DIMS."""
    k = 0
    for N in SIZES:
        for M in SIZES:
            D = DIMS[(k + len(kind)) % len(DIMS)]
            run_case(fn, N, M, D, dtype, kind, neg=(k % 2 == 1), salt=k)
            k += 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fn", FNS)
def test_duplicated_rows(fn, dtype):
    for k, (N, M, D) in enumerate([(7, 7, 3), (129, 300, 64), (300, 129, 100), (2, 7, 64)]):
        run_case(fn, N, M, D, dtype, "dup", neg=bool(k % 2), salt=k)


@pytest.mark.parametrize("neg", [False, True])
@pytest.mark.parametrize("fn", ["siglip_fwd", "siglip_bwd", "siglip_fwd_bwd"])
def test_negative_only(fn, neg):
    for k, (N, M, D) in enumerate([(1, 1, 3), (129, 129, 64), (300, 7, 100), (7, 300, 100)]):
        run_case(fn, N, M, D, torch.float32, "unit", neg=neg, salt=100 + k)
        run_case(fn, N, M, D, torch.float64, "raw", neg=neg, salt=100 + k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("fn", FNS)
def test_many_tiles(fn, dtype):
    """Several row / column groups and partial tiles (fp32 tiles are 256 x 512, fp64 128 x 256)."""
    run_case(fn, 1100, 1337, 64, dtype, "unit", neg=False, salt=7)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_isas(isa):
    if isa not in _C.cpu_isas_supported():
        pytest.skip(f"this CPU cannot run {isa}")
    with cpu_isa(isa):
        for k, fn in enumerate(FNS):
            run_case(fn, 300, 129, 64, torch.float32, "unit", neg=False, salt=200 + k)
            run_case(fn, 129, 300, 100, torch.bfloat16, "random", neg=True, salt=200 + k)


def _all_outputs(a, b, scale, bias):
    rl, cl = _C.contrastive_lse_cpu(a, b, scale)
    return ([rl, cl] + list(_clip_bwd(a, b, scale, rl, cl, 0.5, 0.25))
            + [_C.siglip_fwd_cpu(a, b, scale, bias, False)] + list(_C.siglip_bwd_cpu(a, b, scale, bias, False)))


def test_deterministic_and_thread_count_independent():
    a, b, scale, bias = make_inputs(1000, 1500, 64, torch.float32, "unit", "det")
    first = _all_outputs(a, b, scale, bias)
    again = _all_outputs(a, b, scale, bias)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _all_outputs(a, b, scale, bias)
    finally:
        torch.set_num_threads(old)
    for x, y, z in zip(first, again, single):
        assert torch.equal(x, y)
        assert torch.equal(x, z)


def test_inputs_not_modified_and_fresh_outputs():
    a, b, scale, bias = make_inputs(129, 300, 64, torch.float32, "unit", "fresh")
    copies = [t.clone() for t in (a, b, scale, bias)]
    outs = _all_outputs(a, b, scale, bias)
    for t, c in zip((a, b, scale, bias), copies):
        assert torch.equal(t, c)
    ptrs = {t.data_ptr() for t in outs}
    assert len(ptrs) == len(outs)
    assert not ptrs & {a.data_ptr(), b.data_ptr(), scale.data_ptr(), bias.data_ptr()}


def test_extreme_scale_bf16():
    """logit_scale 100 on bf16 features, perfectly aligned pairs (huge logit gaps)."""
    a = torch.nn.functional.normalize(torch.randn(300, 64, generator=_gen("ext")), dim=1)
    a16 = a.to(torch.bfloat16)
    scale = torch.tensor([100.0])
    bias = torch.tensor([-10.0])
    rl, cl = _C.contrastive_lse_cpu(a16, a16, scale)
    ref = f_lse(a16, a16, scale, torch.float64)
    assert relerr(rl, ref[0]) <= 1e-2 and relerr(cl, ref[1]) <= 1e-2
    da, db, ds = _clip_bwd(a16, a16, scale, rl, cl, 0.5, 0.5)
    for o, r in zip((da, db, ds), f_clip_bwd(a16, a16, scale, rl, cl, 0.5, 0.5, torch.float64)):
        assert relerr(o, r) <= 1e-2
    for o, r in zip(_C.siglip_bwd_cpu(a16, a16, scale, bias, False),
                    f_siglip_bwd(a16, a16, scale, bias, False, torch.float64)):
        assert relerr(o, r) <= 1e-2
    assert relerr(_C.siglip_fwd_cpu(a16, a16, scale, bias, False),
                  f_siglip_fwd(a16, a16, scale, bias, False, torch.float64)) <= 1e-2


def test_bad_inputs_raise():
    a = torch.randn(5, 8)
    b = torch.randn(6, 8)
    s = torch.tensor([2.0])
    bias = torch.tensor([0.0])
    rl, cl = _C.contrastive_lse_cpu(a, b, s)
    bad_pairs = [
        (torch.randn(5, 8, 1), b),  # 3-D
        (a, torch.randn(6, 9)),  # different D
        (a, torch.randn(8, 6).T),  # non-contiguous
        (a, b.double()),  # dtype mismatch
        (a.to(torch.int32), b.to(torch.int32)),  # not floating
        (torch.randn(5), b),  # 1-D
    ]
    for x, y in bad_pairs:
        with pytest.raises(RuntimeError):
            _C.contrastive_lse_cpu(x, y, s)
        with pytest.raises(RuntimeError):
            _C.siglip_fwd_cpu(x, y, s, bias, False)
        with pytest.raises(RuntimeError):
            _C.siglip_bwd_cpu(x, y, s, bias, False)
        with pytest.raises(RuntimeError):
            _C.siglip_fwd_bwd_cpu(x, y, s, bias, False)
        with pytest.raises(RuntimeError):
            _clip_bwd(x, y, s, rl, cl, 0.5, 0.5)
    for bad_scale in (torch.tensor([2.0, 3.0]), torch.tensor(2.0), torch.tensor([2.0], dtype=torch.float64),
                      torch.tensor([[2.0]])):
        with pytest.raises(RuntimeError):
            _C.contrastive_lse_cpu(a, b, bad_scale)
        with pytest.raises(RuntimeError):
            _C.siglip_fwd_cpu(a, b, s, bad_scale, False)
        with pytest.raises(RuntimeError):
            _C.siglip_bwd_cpu(a, b, bad_scale, bias, True)
        with pytest.raises(RuntimeError):
            _C.siglip_fwd_bwd_cpu(a, b, s, bad_scale, True)
        with pytest.raises(RuntimeError):
            _clip_bwd(a, b, bad_scale, rl, cl, 0.5, 0.5)
    for brl, bcl in ((cl, cl), (rl, rl), (rl.double(), cl), (rl, cl[None]), (rl.half(), cl)):
        with pytest.raises(RuntimeError):
            _clip_bwd(a, b, s, brl, bcl, 0.5, 0.5)
    with pytest.raises(RuntimeError):  # fp64 inputs need fp64 LSEs
        _clip_bwd(a.double(), b.double(), s, rl, cl, 0.5, 0.5)
    with pytest.raises(TypeError):  # wrong arity goes through pybind
        _C.contrastive_lse_cpu(a, b)
