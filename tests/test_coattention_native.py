"""Native CPU kernels of ViLBERT co-attention: vlops._C.co_attention_fwd_cpu / co_attention_bwd_cpu, called with
the positional arguments of the kernel contract (docstring of vlops/ops/coattention.py) and compared with the
contract's math in float64 written here (matmul, masked softmax, dropout mask from
vlops.reference.diffusion.philox4x32 / uint32_to_uniform; gradients by float64 autograd), independent of the
kernels and of vlops.reference.coattention.

Bounds (DESIGN.md): relative error ||x - ref|| / ||ref|| of the outputs and of the six gradients <= 1e-5 in
fp32, <= 1e-10 in fp64, <= 1e-2 in fp16 / bf16 and no worse than 2x the same math done by eager PyTorch in
that dtype; lse (fp32, or fp64 for fp64 inputs) <= 1e-5 (1e-10 in fp64) with -inf exactly where a row has no
valid key. The reference runs on the inputs as given (already rounded to their dtype); in mode 1 it adds the
-10000 bias in fp32 for fp32 / 16-bit inputs, as the contract specifies, and batches with no valid key in mode 1
(scores ~ -1e4, quantised by that fp32 add) are held to 2e-3 (see check()). fp32 with scores of 100
(test_large_scores_stable) is ill-conditioned itself: the fp32 rounding of a score is up to ~2**-24 times the
sum of the absolute products in its dot product (115 to 270 there), and exp turns that absolute error into a
relative one of the weights, whatever the implementation; the nearly one-hot rows then make the gradients'
``dP - rowsum(dout * out)`` a cancellation (eager fp32 gets up to 2e-5 too). There the bound is the larger of
1e-5 and ``2**-21 * scale * max_ij sum_c |q_ic k_jc|`` (1e-5 alone failed 7 seeds in 300; over 2000 seeds the
worst gradient used 0.54 of this bound).
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch

from conftest import cpu_isa
from vlops.reference.diffusion import philox4x32, uint32_to_uniform

_C = pytest.importorskip("vlops._C", reason="the compiled extension vlops._C is not built")
if not hasattr(_C, "co_attention_fwd_cpu"):
    pytest.skip("vlops._C was built without the co-attention kernels", allow_module_level=True)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-10}
LSE_TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5, torch.float64: 1e-10}
LOW = (torch.float16, torch.bfloat16)
SEED_BASE = int(os.environ.get("VLOPS_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))  # printed on failure
NAMES = ["tq", "tk", "tv", "iq", "ik", "iv"]
FWD_ARGS = NAMES + ["t_len", "i_len", "t_mask", "i_mask", "scale", "mask_mode", "dropout_p", "seed"]
GRAD_NAMES = ["d_tq", "d_tk", "d_tv", "d_iq", "d_ik", "d_iv"]
TILES_ENV = "VLOPS_COATTENTION_TILES"  # "BM,BN": the kernels' query / key block sizes (tests, tuning)
SPLIT_ENV = "VLOPS_COATTENTION_BWD_SPLIT"  # k: the split backward with k chunks per (dir, b, h)
M32 = 0xFFFFFFFF


def _gen(*salt) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr((SEED_BASE,) + salt).encode()))


def make_case(B, Nt, Nv, H, d, dtype, *salt, t_len=None, i_len=None, t_mask=None, i_mask=None, mode=0,
              dropout_p=0.0, seed=0, scale=None):
    """The contract's arguments (dict), contiguous [B, N, H, d] inputs, t_dout / i_dout for the backward.
    Lengths default to N; masks are None unless given (bool [B, N])."""
    g = _gen(B, Nt, Nv, H, d, str(dtype), *salt)

    def rnd(N, s=1.0):
        return (s * torch.randn(B, N, H, d, generator=g, dtype=torch.float64)).to(dtype)

    a = dict(tq=rnd(Nt), tk=rnd(Nt), tv=rnd(Nt), iq=rnd(Nv), ik=rnd(Nv), iv=rnd(Nv))
    a["t_len"] = torch.full((B,), Nt, dtype=torch.int32) if t_len is None else torch.tensor(t_len, dtype=torch.int32)
    a["i_len"] = torch.full((B,), Nv, dtype=torch.int32) if i_len is None else torch.tensor(i_len, dtype=torch.int32)
    a["t_mask"], a["i_mask"] = t_mask, i_mask
    a["scale"] = d ** -0.5 if scale is None else scale
    a["mask_mode"], a["dropout_p"], a["seed"] = mode, dropout_p, seed
    a["t_dout"] = rnd(Nt)
    a["i_dout"] = rnd(Nv)
    return a


def fwd(a):
    return _C.co_attention_fwd_cpu(*[a[k] for k in FWD_ARGS])


def bwd(a, outs):
    t_out, i_out, t_lse, i_lse = outs
    return _C.co_attention_bwd_cpu(a["t_dout"], a["i_dout"], *[a[k] for k in NAMES], t_out, i_out, t_lse, i_lse,
                                   *[a[k] for k in FWD_ARGS[6:]])


# ------------------------------------------------------------------------------------------------ reference

def key_valid(lengths, mask, N):
    valid = torch.arange(N)[None, :] < lengths.to(torch.int64)[:, None]
    return valid if mask is None else valid & mask


def keep_mask(B, H, Nq, Nk, direction, seed, p):
    """[B, H, Nq, Nk] bool: the contract's dropout keep bits, from vlops.reference.diffusion's Philox4x32-10."""
    j = torch.arange(Nk, dtype=torch.int64).view(1, 1, 1, Nk)
    i = torch.arange(Nq, dtype=torch.int64).view(1, 1, Nq, 1)
    bh = torch.arange(B * H, dtype=torch.int64).view(B, H, 1, 1)
    c3 = torch.full((1, 1, 1, 1), direction, dtype=torch.int64)
    x0 = philox4x32(j, i, bh, c3, seed & M32, (seed >> 32) & M32)[0].expand(B, H, Nq, Nk)
    return uint32_to_uniform(x0) >= torch.tensor(p, dtype=torch.float32)


def direction(q, k, v, valid, scale, mode, keep, p, fp32_bias):
    """One direction of the contract in the dtype of q (differentiable). Returns (out [B, Nq, H, d],
    lse [B, H, Nq])."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    vk = valid[:, None, None, :].expand(s.shape)
    if mode == 1:
        bias = torch.where(vk, 0.0, -10000.0)
        s = (s.float() + bias.float()).to(s.dtype) if fp32_bias else s + bias.to(s.dtype)
        counted = torch.ones_like(vk)
    else:
        counted = vk
    m = s.masked_fill(~counted, float("-inf")).amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.where(counted, torch.exp(s.masked_fill(~counted, 0.0) - m), torch.zeros_like(s))
    den = e.sum(-1, keepdim=True)
    has = den > 0
    one = torch.ones_like(den)
    prob = e / torch.where(has, den, one)
    lse = torch.where(has, m + torch.log(torch.where(has, den, one)), torch.full_like(den, float("-inf")))
    if keep is not None:
        prob = prob * keep.to(prob.dtype) / (1.0 - p)
    return torch.matmul(prob, vh).transpose(1, 2), lse.squeeze(-1)


def reference(a, ct=torch.float64, grads=True):
    """(t_out, i_out, t_lse, i_lse, six gradients or None) of the contract's math evaluated in dtype ct."""
    B, Nt, H, _ = a["tq"].shape
    Nv = a["iq"].shape[1]
    x = [a[k].detach().to(ct).requires_grad_(grads) for k in NAMES]
    vt = key_valid(a["t_len"], a["t_mask"], Nt)
    vi = key_valid(a["i_len"], a["i_mask"], Nv)
    p = a["dropout_p"]
    keeps = [None, None]
    if p > 0:
        keeps = [keep_mask(B, H, Nt, Nv, 0, a["seed"], p), keep_mask(B, H, Nv, Nt, 1, a["seed"], p)]
    fp32_bias = a["tq"].dtype != torch.float64
    t_out, t_lse = direction(x[0], x[4], x[5], vi, a["scale"], a["mask_mode"], keeps[0], p, fp32_bias)
    i_out, i_lse = direction(x[3], x[1], x[2], vt, a["scale"], a["mask_mode"], keeps[1], p, fp32_bias)
    g = None
    if grads:
        g = torch.autograd.grad([t_out, i_out], x, [a["t_dout"].to(ct), a["i_dout"].to(ct)], allow_unused=True)
        g = [torch.zeros_like(xi) if gi is None else gi for gi, xi in zip(g, x)]
    return t_out.detach(), i_out.detach(), t_lse.detach(), i_lse.detach(), g


def relerr(out, ref):
    out, ref = out.double(), ref.double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if not torch.isfinite(out).all():
        return float("inf")
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


def lse_err(out, ref):
    """Relative error of the finite lse entries; -inf exactly where the reference has it."""
    assert out.shape == ref.shape
    assert not torch.isnan(out).any() and not (out == float("inf")).any(), "NaN / +inf in lse"
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), fin), "lse is -inf on other rows than the reference"
    assert (out[~fin] == float("-inf")).all()
    return relerr(out[fin], ref[fin]) if fin.any() else 0.0


def score_magnitude(a):
    """scale * max over both directions of sum_c |q_ic k_jc|: the size the fp32 rounding of a score scales with."""
    mags = [torch.einsum("bihc,bjhc->bhij", a[q].double().abs(), a[k].double().abs()).max().item()
            for q, k in (("tq", "ik"), ("iq", "tk")) if a[q].numel() and a[k].numel()]
    return a["scale"] * max(mags, default=0.0)


def check(a, outs=None, grads=None, do_bwd=True, eager=True, what="", ill_fp32=False):
    """Runs the kernels (unless given) and checks the layout and every value against the float64 math; returns
    (outs, grads). ``ill_fp32``: fp32 inputs whose scores are ill-conditioned in fp32 (see the module
    docstring): the bound becomes max(TOL, 2**-21 * score_magnitude(a))."""
    dtype = a["tq"].dtype
    B, Nt, H, d = a["tq"].shape
    Nv = a["iq"].shape[1]
    if outs is None:
        outs = fwd(a)
    t_out, i_out, t_lse, i_lse = outs
    ldt = torch.float64 if dtype == torch.float64 else torch.float32
    for t, shape, dt in ((t_out, (B, Nt, H, d), dtype), (i_out, (B, Nv, H, d), dtype), (t_lse, (B, H, Nt), ldt),
                         (i_lse, (B, H, Nv), ldt)):
        assert t.shape == shape and t.dtype == dt and t.is_contiguous(), (t.shape, t.dtype)
    ref = reference(a, grads=do_bwd)
    ctx = f"{what} dtype={dtype} mode={a['mask_mode']} p={a['dropout_p']} seed {SEED_BASE}"
    eag = reference(a, ct=dtype, grads=do_bwd) if (eager and dtype in LOW) else None
    ill_tol = 2.0 ** -21 * score_magnitude(a) if ill_fp32 else 0.0

    # Mode 1, a batch with no valid key in a direction: every score is (scale q.k) - 10000 in fp32, quantised
    # to 2**-10, so a last-bit difference of the dot product moves a weight by up to 1e-3, and that direction's
    # lse (fp32, ~ -1e4) carries an absolute rounding of up to 2**-11, which p recomputed from it (the
    # contract's backward) inherits: the values of those batches are held to 2e-3 (the others to the dtype's
    # bound; fp64 has the headroom).
    loose = {0: torch.zeros(B, dtype=torch.bool), 1: torch.zeros(B, dtype=torch.bool)}
    if a["mask_mode"] == 1 and dtype != torch.float64:
        loose[0] = ~key_valid(a["i_len"], a["i_mask"], Nv).any(1)
        loose[1] = ~key_valid(a["t_len"], a["t_mask"], Nt).any(1)

    def bound(name, got, want, idx, direc):
        lb = loose[direc]
        if lb.any():
            err = relerr(got[lb], want[lb])
            assert err <= max(2e-3, TOL[dtype]), f"{name} (batches without a valid key): {err:.3e}; {ctx}"
            got, want = got[~lb], want[~lb]
            if not len(got):
                return
        err = relerr(got, want)
        tol = max(TOL[dtype], ill_tol)
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}; {ctx}"
        if eag is not None:
            e = eag[idx] if idx < 4 else eag[4][idx - 4]
            e_err = relerr(e[~lb], want)
            assert err <= max(2 * e_err, 1e-6), f"{name}: error {err:.3e} > 2x eager error {e_err:.3e}; {ctx}"

    bound("t_out", t_out, ref[0], 0, 0)
    bound("i_out", i_out, ref[1], 1, 1)
    for name, got, want in (("t_lse", t_lse, ref[2]), ("i_lse", i_lse, ref[3])):
        err = lse_err(got, want)
        assert err <= LSE_TOL[dtype], f"{name}: relative error {err:.3e}; {ctx}"
    if do_bwd:
        if grads is None:
            grads = bwd(a, outs)
        assert len(grads) == 6
        for k, (name, gk, src) in enumerate(zip(GRAD_NAMES, grads, NAMES)):
            assert gk.shape == a[src].shape and gk.dtype == dtype and gk.is_contiguous(), name
            bound(name, gk, ref[4][k], 4 + k, 0 if src in ("tq", "ik", "iv") else 1)
    return outs, grads


# ------------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_modes_lengths(dtype, mode):
    """Every dtype and mask mode; image lengths 0 (no valid key), partial and full, text lengths 1, N, 0."""
    a = make_case(3, 7, 37, 2, 64, dtype, "dtypes", mode, t_len=[1, 7, 0], i_len=[0, 37, 20], mode=mode)
    check(a, what="dtypes")


@pytest.mark.parametrize("d", [3, 32, 64, 128])
@pytest.mark.parametrize("Nt,Nv", [(1, 5), (5, 37), (37, 101), (101, 300)])
def test_head_dims_and_sizes(Nt, Nv, d):
    """d below, at and above the vector width; N from 1 to 300 (several query and key blocks at N = 300)."""
    a = make_case(2, Nt, Nv, 2, d, torch.float32, "sizes", t_len=[Nt, max(0, Nt - 3)], i_len=[Nv // 2, Nv])
    check(a, what=f"Nt={Nt} Nv={Nv} d={d}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_long_sequences_other_dtypes(dtype):
    """N = 300 (several key blocks: the online softmax rescales) in fp64 and bf16, d = 128."""
    a = make_case(1, 300, 45, 2, 128, dtype, "long", t_len=[260], i_len=[45], mode=0)
    check(a, what="long", eager=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_large_outputs(dtype):
    """Outputs of 4 MiB or more (written with streaming stores), several query and key blocks."""
    a = make_case(2, 64, 448, 8, 128, dtype, "large", t_len=[64, 50], i_len=[448, 301])
    nbytes = sum(a[k].numel() * a[k].element_size() for k in ("t_dout", "i_dout"))
    assert nbytes >= 4 << 20
    check(a, what="large outputs")


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("tiles", ["1,1", "5,7", "64,16", "3,300"])
def test_block_sizes(monkeypatch, tiles, mode):
    """Query / key blocks of other sizes (VLOPS_COATTENTION_TILES): many key blocks per row (the online
    softmax's rescaling), one-row blocks, key blocks longer than the keys; results equal the default blocks up
    to rounding."""
    a = make_case(2, 9, 40, 2, 24, torch.float32, "tiles", mode, t_len=[9, 4], i_len=[40, 13], mode=mode,
                  dropout_p=0.2, seed=11)
    base = fwd(a)
    monkeypatch.setenv(TILES_ENV, tiles)
    outs, grads = check(a, what=f"tiles={tiles}")
    for x, y in zip(outs, base):
        assert relerr(x[torch.isfinite(y)], y[torch.isfinite(y)]) <= 1e-6


@pytest.mark.parametrize("chunks", [2, 3, 7])
@pytest.mark.parametrize("mode", [0, 1])
def test_split_backward_bit_identical(monkeypatch, chunks, mode):
    """The split backward (key chunks for dk / dv, query chunks for dq) gives the single-pass gradients bit for
    bit (every sum runs in the same order)."""
    a = make_case(2, 23, 150, 2, 40, torch.float32, "split", mode, t_len=[23, 0], i_len=[150, 61], mode=mode,
                  dropout_p=0.1, seed=5)
    monkeypatch.setenv(TILES_ENV, "16,32")
    outs = fwd(a)
    monkeypatch.setenv(SPLIT_ENV, "1")
    single = bwd(a, outs)
    monkeypatch.setenv(SPLIT_ENV, str(chunks))
    split = bwd(a, outs)
    for name, x, y in zip(GRAD_NAMES, split, single):
        assert torch.equal(x, y), name
    check(a, outs=outs, grads=split, what=f"split {chunks}")


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_boolean_masks(dtype, mode):
    """Boolean key masks (lengths = N, as the op layer passes them): random masks, an all-False row (no valid
    key), an all-True row; and masks combined with lengths (valid iff both)."""
    B, Nt, Nv = 4, 11, 53
    g = _gen("masks", str(dtype), mode)
    tm = torch.rand(B, Nt, generator=g) < 0.6
    im = torch.rand(B, Nv, generator=g) < 0.5
    tm[1] = False
    im[2] = False
    tm[3] = True
    im[0] = True
    a = make_case(B, Nt, Nv, 2, 48, dtype, "masks", mode, t_mask=tm, i_mask=im, mode=mode)
    check(a, what="masks")
    b = dict(a, t_len=torch.tensor([11, 5, 0, 7], dtype=torch.int32), i_len=torch.tensor([53, 9, 53, 30],
                                                                                         dtype=torch.int32))
    check(b, what="masks+lengths")


def test_fully_masked_rows():
    """Mode 0: no valid key -> out = 0, lse = -inf, zero gradients for that batch (dk / dv of the masked keys are
    0 in every batch). Mode 1: a fully masked row is softmax over all keys (the uniform shift)."""
    a = make_case(2, 6, 21, 2, 32, torch.float32, "empty", t_len=[0, 6], i_len=[0, 10])
    (t_out, i_out, t_lse, i_lse), g = check(a, what="empty")
    assert torch.equal(t_out[0], torch.zeros_like(t_out[0])) and torch.equal(i_out[0], torch.zeros_like(i_out[0]))
    assert (t_lse[0] == float("-inf")).all() and (i_lse[0] == float("-inf")).all()
    assert torch.isfinite(t_lse[1]).all() and torch.isfinite(i_lse[1]).all()
    for name, gk in zip(GRAD_NAMES, g):
        assert torch.equal(gk[0], torch.zeros_like(gk[0])), name
    assert torch.equal(g[4][1, 10:], torch.zeros_like(g[4][1, 10:]))  # d_ik of the padded image keys
    assert torch.equal(g[5][1, 10:], torch.zeros_like(g[5][1, 10:]))
    m1 = dict(a, mask_mode=1)
    (t_out, i_out, t_lse, i_lse), g = check(m1, what="empty mode 1")
    assert torch.isfinite(t_lse).all() and torch.isfinite(i_lse).all()
    assert t_out[0].abs().sum() > 0  # every key takes part


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("seed", [0, 123456789, (7 << 40) + 99])
def test_dropout_keep_bit_exact(seed, mode, isa):
    """q = 0 makes p uniform and one-hot values read the kept weights back: out[b, i, h, j] = keep_ij /
    ((1 - p) n) for valid keys j, 0 otherwise. The keep bits must equal the contract's Philox mask exactly,
    in both directions (counter (j, i, b * H + h, dir), key (seed & 0xffffffff, seed >> 32))."""
    B, H, Nt, Nv = 2, 3, 13, 40
    d = Nv
    p = 0.37
    t_len, i_len = [13, 8], [40, 17]
    a = make_case(B, Nt, Nv, H, d, torch.float32, "keep", seed, t_len=t_len, i_len=i_len, mode=mode,
                  dropout_p=p, seed=seed)
    a["tq"] = torch.zeros_like(a["tq"])
    a["iq"] = torch.zeros_like(a["iq"])
    eye = torch.eye(Nv)
    a["tv"] = eye[:Nt].view(1, Nt, 1, d).expand(B, Nt, H, d).contiguous()
    a["iv"] = eye.view(1, Nv, 1, d).expand(B, Nv, H, d).contiguous()
    if isa not in _C.cpu_isas_supported():
        pytest.skip(f"this CPU cannot run {isa}")
    with cpu_isa(isa):
        t_out, i_out, _, _ = fwd(a)
    for out, Nq, Nk, lens, direc in ((t_out, Nt, Nv, i_len, 0), (i_out, Nv, Nt, t_len, 1)):
        keep = keep_mask(B, H, Nq, Nk, direc, seed, p)  # [B, H, Nq, Nk]
        got = out.transpose(1, 2)[..., :Nk]  # [B, H, Nq, Nk]
        for b in range(B):
            n = lens[b]  # mode 1: the invalid keys carry exp(-10000) = 0 weight too
            want_kept = keep[b] & (torch.arange(Nk) < n)
            assert torch.equal(got[b] > 0, want_kept), f"keep mask differs: dir {direc} b {b} seed {seed}"
            vals = got[b][want_kept].double()
            assert torch.allclose(vals, torch.full_like(vals, 1.0 / ((1 - p) * n)), rtol=1e-6, atol=0)
    assert 0.5 < keep_mask(B, H, Nt, Nv, 0, seed, p).double().mean().item() < 0.75


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_dropout_values_and_gradients(dtype, mode):
    a = make_case(2, 10, 33, 2, 32, dtype, "drop", mode, t_len=[10, 3], i_len=[20, 33], mode=mode, dropout_p=0.25,
                  seed=2**33 + 17)
    check(a, what="dropout")
    assert not torch.equal(fwd(a)[0], fwd(dict(a, seed=1))[0])  # the mask depends on the seed


def _views(a, layout):
    """The six inputs as strided views holding the same values: a fused QKV projection [B, N, 3, H, d] or a
    [B, H, N, d] tensor transposed to [B, N, H, d]."""
    out = dict(a)
    for stream, names in (("t", ("tq", "tk", "tv")), ("i", ("iq", "ik", "iv"))):
        x = [a[k] for k in names]
        B, N, H, d = x[0].shape
        if layout == "fused_qkv":
            qkv = torch.full((B, N, 3, H, d), float("nan"), dtype=x[0].dtype)
            for j in range(3):
                qkv[:, :, j] = x[j]
            views = [qkv[:, :, j] for j in range(3)]
        else:
            views = [xi.transpose(1, 2).contiguous().transpose(1, 2) for xi in x]
        for k, v in zip(names, views):
            assert not v.is_contiguous() and v.stride(-1) == 1 and torch.equal(v, a[k])
            out[k] = v
    return out


@pytest.mark.parametrize("layout", ["fused_qkv", "bhnd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_views_identical(dtype, layout):
    """Views read in place through their strides give the contiguous result bit for bit; an expanded batch
    (stride 0) gives each batch the single-batch result."""
    a = make_case(2, 9, 31, 3, 40, dtype, "views", layout, t_len=[9, 4], i_len=[31, 12], dropout_p=0.1, seed=3)
    outs = fwd(a)
    grads = bwd(a, outs)
    v = _views(a, layout)
    outs_v = fwd(v)
    grads_v = bwd(v, outs_v)
    for x, y in zip(outs_v + grads_v, outs + grads):
        assert torch.equal(x, y)
    one = make_case(1, 5, 17, 2, 16, dtype, "expand")
    exp = dict(one, **{k: one[k].expand(3, -1, -1, -1) for k in NAMES + ["t_dout", "i_dout"]},
               t_len=one["t_len"].expand(3).contiguous(), i_len=one["i_len"].expand(3).contiguous())
    o1, o3 = fwd(one), fwd(exp)
    g1, g3 = bwd(one, o1), bwd(exp, o3)
    for x, y in zip(o3 + g3, o1 + g1):
        for b in range(3):
            assert torch.equal(x[b], y[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_inputs_unchanged(dtype):
    a = make_case(2, 8, 30, 2, 20, dtype, "unchanged", t_len=[8, 2], i_len=[5, 30], dropout_p=0.2, seed=9)
    a = _views(a, "fused_qkv")
    tensors = {k: v for k, v in a.items() if isinstance(v, torch.Tensor)}
    copies = {k: (v.clone(), v.stride()) for k, v in tensors.items()}
    outs = fwd(a)
    saved = [o.clone() for o in outs]
    grads = bwd(a, outs)
    for k, v in tensors.items():
        assert torch.equal(v.isnan(), copies[k][0].isnan()), k
        assert torch.equal(v.nan_to_num(), copies[k][0].nan_to_num()) and v.stride() == copies[k][1], k
    for o, s in zip(outs, saved):
        assert torch.equal(o, s)
    ptrs = {v.data_ptr() for v in tensors.values()}
    assert all(x.data_ptr() not in ptrs for x in list(outs) + list(grads))


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_isas(isa):
    """Each instruction set of the run-time dispatch, fp32, bf16 and fp16 (F16C conversions on AVX2 / AVX-512,
    c10's on the baseline), d with and without a vector tail, both modes, dropout on (vectorised Philox on
    AVX-512, scalar elsewhere)."""
    if isa not in _C.cpu_isas_supported():
        pytest.skip(f"this CPU cannot run {isa}")
    with cpu_isa(isa):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for d, mode in ((40, 0), (128, 1), (7, 0)):
                a = make_case(2, 13, 70, 2, d, dtype, "isa", isa, d, t_len=[13, 6], i_len=[70, 33], mode=mode,
                              dropout_p=0.15 if d == 40 else 0.0, seed=4)
                check(a, what=f"isa={isa} d={d}")


def test_determinism_and_thread_counts():
    """Two runs give the same bits; so do one and two threads (items own their outputs; every sum has a
    fixed order)."""
    a = make_case(3, 20, 101, 4, 64, torch.float32, "det", t_len=[20, 11, 3], i_len=[101, 37, 64], dropout_p=0.1,
                  seed=77)
    outs = fwd(a)
    grads = bwd(a, outs)
    again = fwd(a)
    for x, y in zip(again + bwd(a, again), outs + grads):
        assert torch.equal(x, y)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = fwd(a)
        one_g = bwd(a, one)
    finally:
        torch.set_num_threads(old)
    for x, y in zip(one + one_g, outs + grads):
        assert torch.equal(x, y)


def test_all_outputs_written():
    """Every output element is written (also padded query rows and masked keys) even when the allocator hands
    back memory full of NaN."""
    for _ in range(2):
        a = make_case(2, 12, 45, 3, 24, torch.float32, "poison", t_len=[12, 5], i_len=[0, 20])
        for shape in [(2, 12, 3, 24), (2, 45, 3, 24), (2, 3, 12), (2, 3, 45)] * 2:
            junk = torch.full(shape, float("nan"))
            del junk
        outs, grads = check(a, what="poison")
        for t in list(outs[:2]) + list(grads):
            assert not t.isnan().any()


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_16bit_round_to_nearest_even(dtype):
    """16-bit outputs are the fp32 results rounded once to nearest (even): within half an ulp of the float64
    value plus the fp32 accumulation error, and mostly equal to the correctly rounded value."""
    a = make_case(2, 16, 64, 4, 64, dtype, "rne", i_len=[64, 50])
    t_out = fwd(a)[0]
    ref = reference(a, grads=False)[0]
    frac = (t_out != ref.to(dtype)).double().mean().item()
    assert frac < 0.01, f"{frac:.3%} of the outputs differ from the correctly rounded value"
    half_ulp = 0.5 * torch.finfo(dtype).eps * ref.abs()
    assert ((t_out.double() - ref).abs() <= half_ulp + 1e-6).all()


def test_large_scores_stable():
    """Scores up to 100 (scale 1; exp would overflow fp32 above 88): the max-shifted softmax neither overflows
    nor loses the row sums; mode 1 with a fully masked batch as well. The queries are scaled so that the
    largest score of each direction is 100 (about, after rounding), whatever the draw."""
    a = make_case(2, 6, 25, 2, 16, torch.float32, "big", t_len=[6, 0], i_len=[25, 7], scale=1.0, mode=1)
    for k in NAMES:
        a[k] = a[k] * 3
    for q, k in (("tq", "ik"), ("iq", "tk")):
        s = torch.einsum("bihc,bjhc->bhij", a[q].double(), a[k].double())
        a[q] = (a[q].double() * (100.0 / s.abs().max().item())).float()
        s = torch.einsum("bihc,bjhc->bhij", a[q].double(), a[k].double())
        assert 99 < s.abs().max() < 101
    check(a, what="large", ill_fp32=True)


def test_argument_names():
    """Keyword names are the contract's."""
    a = make_case(1, 3, 5, 1, 8, torch.float32, "kw")
    outs = _C.co_attention_fwd_cpu(**{k: a[k] for k in FWD_ARGS})
    assert torch.equal(outs[0], fwd(a)[0])
    t_out, i_out, t_lse, i_lse = outs
    g = _C.co_attention_bwd_cpu(t_dout=a["t_dout"], i_dout=a["i_dout"], t_out=t_out, i_out=i_out, t_lse=t_lse,
                                i_lse=i_lse, **{k: a[k] for k in FWD_ARGS})
    for x, y in zip(g, bwd(a, outs)):
        assert torch.equal(x, y)


def test_bad_inputs_raise():
    a = make_case(2, 4, 9, 2, 8, torch.float32, "bad")
    outs = fwd(a)
    bwd(a, outs)  # the good case runs
    bad = [
        ("tq", a["tq"].to(torch.int32)),
        ("tq", a["tq"][0]),  # 3-D
        ("tk", a["tk"].double()),  # dtype mismatch
        ("tv", a["tv"][:, :3]),  # wrong Nt
        ("iq", torch.empty(2, 9, 2, 8, device="meta")),
        ("ik", a["ik"][..., :4]),  # wrong d
        ("iv", a["iv"].transpose(2, 3).contiguous().transpose(2, 3)),  # stride(-1) != 1
        ("ik", torch.randn(2, 9, 3, 8)),  # wrong H
        ("t_len", a["t_len"].long()),
        ("t_len", torch.tensor([4, 5], dtype=torch.int32)),  # > Nt
        ("i_len", torch.tensor([-1, 2], dtype=torch.int32)),
        ("i_len", torch.tensor([9], dtype=torch.int32)),
        ("t_mask", torch.ones(2, 4, dtype=torch.int32)),
        ("t_mask", torch.ones(2, 5, dtype=torch.bool)),
        ("i_mask", torch.ones(9, 2, dtype=torch.bool).T),  # non-contiguous
        ("scale", float("nan")),
        ("mask_mode", 2),
        ("dropout_p", 1.0),
        ("dropout_p", -0.1),
        ("seed", -1),
    ]
    for name, val in bad:
        with pytest.raises((RuntimeError, ValueError), match=name):
            fwd(dict(a, **{name: val}))
        with pytest.raises((RuntimeError, ValueError), match=name):
            bwd(dict(a, **{name: val}), outs)
    t_out, i_out, t_lse, i_lse = outs
    bad_bwd = [
        ("t_dout", dict(a, t_dout=a["t_dout"][:, :2]), outs),
        ("i_dout", dict(a, i_dout=a["i_dout"].half()), outs),
        ("t_out", a, (t_out.double(), i_out, t_lse, i_lse)),
        ("i_out", a, (t_out, i_out[:1], t_lse, i_lse)),
        ("t_lse", a, (t_out, i_out, t_lse.double(), i_lse)),
        ("i_lse", a, (t_out, i_out, t_lse, i_lse.transpose(1, 2).contiguous())),
        ("i_lse", a, (t_out, i_out, t_lse, i_lse.transpose(0, 1).contiguous().transpose(0, 1))),
    ]
    for name, args, o in bad_bwd:
        with pytest.raises((RuntimeError, ValueError), match=name):
            bwd(args, o)
