"""The fused co-attention (vlops.co_attention, vlops.nn.CoAttention / CoAttentionBlock) on every backend
against the float64 reference (vlops.reference.coattention): forward and every gradient, both mask modes,
lengths and boolean masks (0 valid keys included), dropout (the counter-based mask, bit for bit), fp32 and
bf16, strided views, bad input, opcheck / torch.compile, and the drop-in modules against the eager
ViLBERT modules with the same weights. The reference itself is checked by tests/test_coattention_reference.py."""
from __future__ import annotations

import math

import pytest
import torch

import vlops
from vlops import _backends
from vlops.ops import coattention as ops
from vlops.reference import coattention as ref

from conftest import HAS_CUDA, TOL, rel_err

OP = "co_attention"
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
BACKENDS = [pytest.param("reference", "cpu", id="reference"), pytest.param("cpu", "cpu", id="cpu"),
            pytest.param("triton", "cuda", id="triton-cuda", marks=gpu)]
TRITON_CUDA = [p for p in BACKENDS if p.id == "triton-cuda"]


def _require(backend, device):
    why = _backends.op_unavailable_reason(OP, backend, torch.device(device))
    if why and device == "cuda":
        pytest.skip(why)
    assert not why, f"backend {backend} must run {OP} on {device}: {why}"


def _inputs(B, Nt, Nv, H, d, seed=0, dtype=torch.float32, device="cpu", q_scale=2.0):
    """Six [B, N, H, d] tensors (queries scaled up for a peaked softmax), float64-generated then cast."""
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(B, n, H, d, generator=g, dtype=torch.float64) for n in (Nt, Nt, Nt, Nv, Nv, Nv)]
    ts[0] *= q_scale
    ts[3] *= q_scale
    return [t.to(device=device, dtype=dtype) for t in ts]


def _padding(kind, B, N, seed, device="cpu", empty=True):
    """``{"lengths": ...}`` / ``{"mask": ...}`` / ``{}``; with ``empty`` batch 1 has no valid key and batch 0
    is unpadded."""
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return {}
    if kind == "lengths":
        lens = torch.randint(1, N + 1, (B,), generator=g)
        lens[0] = N
        if empty and B > 1:
            lens[1] = 0
        return {"lengths": lens.to(device)}
    mask = torch.rand(B, N, generator=g) > 0.35
    mask[0] = True
    if empty and B > 1:
        mask[1] = False
    if B > 2:
        mask[2, 0] = True  # at least one valid key elsewhere
    return {"mask": mask.to(device)}


def _kw(t_pad, i_pad):
    kw = {f"text_{k}": v for k, v in t_pad.items()}
    kw.update({f"image_{k}": v for k, v in i_pad.items()})
    return kw


def _run(fn, ts, grads_out, **kw):
    xs = [t.detach().clone().requires_grad_() for t in ts]
    outs = fn(*xs, **kw)
    gs = torch.autograd.grad(outs, xs, [g.to(o.dtype) for g, o in zip(grads_out, outs)])
    return outs, gs


def _grads_out(B, Nt, Nv, H, d, seed=7, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, H, d, generator=g, dtype=torch.float64).to(device) for n in (Nt, Nv)]


NAMES = ("text_context", "image_context", "d_text_q", "d_text_k", "d_text_v", "d_image_q", "d_image_k", "d_image_v")

# (d, Nt, Nv, padding kind text, image, mask_mode, dropout_p): a sample of the grid, kept small
CASES = [
    (64, 1, 1, "lengths", "lengths", "zero", 0.0),
    (64, 5, 37, "lengths", "lengths", "zero", 0.0),
    (128, 16, 101, "mask", "lengths", "zero", 0.1),
    (64, 60, 5, "lengths", "mask", "vilbert", 0.0),
    (128, 37, 16, "none", "mask", "zero", 0.0),
    (64, 101, 60, "mask", "mask", "zero", 0.1),
    (128, 300, 37, "lengths", "none", "vilbert", 0.1),
    (64, 16, 300, "lengths", "lengths", "zero", 0.0),
]


def _case_inputs(case, dtype, device, seed):
    d, Nt, Nv, tk, ik, mode, p = case
    B, H = 3, 2
    ts = _inputs(B, Nt, Nv, H, d, seed=seed, dtype=dtype, device=device)
    # ViLBERT mode with no valid key is the unmasked softmax shifted by -10000, computed at the fp32 rounding of
    # -10000 + s (2**-10): checked separately (test_vilbert_fully_masked_rows); here every row has a key
    empty = mode == "zero"
    kw = _kw(_padding(tk, B, Nt, seed + 1, device, empty), _padding(ik, B, Nv, seed + 2, device, empty))
    kw.update(mask_mode=mode, dropout_p=p, seed=1234 + seed if p else None)
    return ts, kw, _grads_out(B, Nt, Nv, H, d, device=device)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fp32_forward_and_every_gradient(backend, device):
    _require(backend, device)
    for i, case in enumerate(CASES):
        ts, kw, go = _case_inputs(case, torch.float32, device, seed=i)
        with vlops.use_backend(backend):
            outs, grads = _run(vlops.co_attention, ts, go, **kw)
        outs64, grads64 = _run(ref.co_attention, [t.double() for t in ts], go, **kw)
        assert [o.dtype for o in outs] == [torch.float32] * 2
        assert [o.shape for o in outs] == [o.shape for o in outs64]
        for name, a, b in zip(NAMES, list(outs) + list(grads), list(outs64) + list(grads64)):
            err = rel_err(a, b)
            assert err <= TOL[torch.float32], f"case {case}: {name} relative error {err:.2e}"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bf16_forward_and_every_gradient(backend, device):
    """bf16: <= 1e-2 of float64 and <= 2x the error of the same math run eagerly in bf16."""
    _require(backend, device)
    for i, case in enumerate([CASES[2], CASES[3], CASES[7]]):
        ts, kw, go = _case_inputs(case, torch.bfloat16, device, seed=10 + i)
        with vlops.use_backend(backend):
            outs, grads = _run(vlops.co_attention, ts, go, **kw)
        outs64, grads64 = _run(ref.co_attention, [t.double() for t in ts], go, **kw)
        eager, eager_g = _run(ref.co_attention, ts, go, compute_dtype=torch.bfloat16, **kw)
        assert [o.dtype for o in outs] == [torch.bfloat16] * 2
        for name, a, b, e in zip(NAMES, list(outs) + list(grads), list(outs64) + list(grads64),
                                 list(eager) + list(eager_g)):
            err, e_err = rel_err(a, b), rel_err(e, b)
            assert err <= TOL[torch.bfloat16], f"case {case}: {name} relative error {err:.2e}"
            assert err <= max(2 * e_err, 1e-6), f"case {case}: {name} error {err:.2e} > 2x eager bf16 {e_err:.2e}"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_zero_valid_keys_give_zeros(backend, device):
    """mask_mode "zero": a query whose keys are all masked returns 0 and passes no gradient; the keys of a
    batch with no valid key get zero gradients; padded query rows are computed like the others."""
    _require(backend, device)
    B, Nt, Nv, H, d = 3, 9, 13, 2, 64
    ts = _inputs(B, Nt, Nv, H, d, seed=3, device=device)
    lens_t = torch.tensor([9, 0, 4], device=device)
    mask_i = torch.rand(B, Nv, generator=torch.Generator().manual_seed(0)).to(device) > 0.5
    mask_i[0] = False
    mask_i[1, 3] = True
    go = _grads_out(B, Nt, Nv, H, d, device=device)
    with vlops.use_backend(backend):
        (t_out, i_out), g = _run(vlops.co_attention, ts, go, text_lengths=lens_t, image_mask=mask_i)
    assert torch.isfinite(t_out).all() and torch.isfinite(i_out).all()
    assert torch.count_nonzero(t_out[0]) == 0 and torch.count_nonzero(i_out[1]) == 0
    assert torch.count_nonzero(g[0][0]) == 0 and torch.count_nonzero(g[3][1]) == 0  # d text_q, d image_q
    assert torch.count_nonzero(g[4][0]) == 0 and torch.count_nonzero(g[5][0]) == 0  # d image_k, d image_v
    assert torch.count_nonzero(g[1][1]) == 0 and torch.count_nonzero(g[2][2, 4:]) == 0  # masked text keys
    assert torch.count_nonzero(i_out[2]) > 0 and torch.count_nonzero(t_out[1]) > 0
    assert torch.count_nonzero(t_out[2, 5:]) > 0  # text rows past text length 4 are still computed


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_vilbert_fully_masked_rows(backend, device):
    """mask_mode "vilbert" where a stream has no valid key: every score shifted by -10000 (ViLBERT's
    uniform shift: the unmasked attention over every key).
    float64 matches the reference to 1e-10; fp32 is bounded by 2x the error of ViLBERT's own fp32 math (the
    fp32 spacing at -10000 is 2**-10, so both carry ~1e-3 relative error on those rows)."""
    _require(backend, device)
    B, Nt, Nv, H, d = 2, 16, 37, 2, 64
    kw = dict(text_lengths=torch.tensor([0, 7], device=device), image_lengths=torch.tensor([0, 37], device=device),
              mask_mode="vilbert")
    ts = _inputs(B, Nt, Nv, H, d, seed=5, device=device)
    want = ref.co_attention(*[t.double() for t in ts], **kw)
    if backend != "triton":
        with vlops.use_backend(backend):
            got64 = vlops.co_attention(*[t.double() for t in ts], **kw)
        for a, b in zip(got64, want):
            assert rel_err(a, b) <= TOL[torch.float64]
    with vlops.use_backend(backend):
        got = vlops.co_attention(*ts, **kw)
    # ViLBERT's eager fp32 math: q k^T / sqrt(d) + (1 - mask) * -10000, softmax, times v
    for (q, k, v, valid, out, w) in ((ts[0], ts[4], ts[5], kw["image_lengths"], got[0], want[0]),
                                     (ts[3], ts[1], ts[2], kw["text_lengths"], got[1], want[1])):
        N = k.shape[1]
        ext = ref.extended_attention_mask((torch.arange(N, device=device)[None] < valid[:, None]).float())
        s = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1)) / math.sqrt(d) + ext
        e = torch.matmul(torch.softmax(s, -1), v.transpose(1, 2)).transpose(1, 2)
        err, e_err = rel_err(out[0], w[0]), rel_err(e[0], w[0])  # batch 0: no valid key
        assert err <= 2e-3 and err <= 2 * e_err, f"fully masked rows: {err:.2e} (eager fp32 {e_err:.2e})"
        assert rel_err(out[1], w[1]) <= TOL[torch.float32]


# ------------------------------------------------------------------------------------------------ dropout

@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dropout_mask_bit_for_bit_and_mean(backend, device):
    """With one-hot values (v_j = e_j) the output is the dropped-out probability matrix itself: its zero
    pattern is the contract's Philox keep mask exactly, kept entries are p / (1 - dropout_p), and the kept
    fraction and the mean match 1 - dropout_p and the undropped output."""
    _require(backend, device)
    B, H, N, d, p = 4, 4, 64, 64, 0.1
    ts = _inputs(B, N, N, H, d, seed=11, device=device, q_scale=0.5)
    eye = torch.eye(N, d, device=device)[None, :, None, :].expand(B, N, H, d).contiguous()
    ts[5] = eye  # image values: text_context[b, i, h, j] = p'_ij of the text direction
    ts[2] = eye  # text values: image_context likewise
    with vlops.use_backend(backend):
        plain = vlops.co_attention(*ts)
        drop = vlops.co_attention(*ts, dropout_p=p, seed=2**40 + 7)
    for direction in (0, 1):
        keep = ref.dropout_keep(B, H, N, N, direction, 2**40 + 7, p, device=device)  # [B, H, Nq, Nk]
        got = drop[direction].permute(0, 2, 1, 3)
        base = plain[direction].permute(0, 2, 1, 3)
        assert torch.equal(got != 0, keep), f"direction {direction}: the keep mask differs from the contract's"
        assert torch.allclose(got[keep], base[keep] / (1 - p), rtol=1e-5, atol=0)
        frac = keep.float().mean().item()
        assert abs(frac - (1 - p)) < 0.01, frac
        assert abs(got.sum().item() / base.sum().item() - 1) < 0.02
    assert not torch.equal(drop[0] != 0, drop[1] != 0)  # the directions draw different masks


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dropout_seed_reproducible(backend, device):
    _require(backend, device)
    ts = _inputs(2, 7, 11, 2, 32, seed=4, device=device)
    with vlops.use_backend(backend):
        a = vlops.co_attention(*ts, dropout_p=0.3, seed=99)
        b = vlops.co_attention(*ts, dropout_p=0.3, seed=99)
        c = vlops.co_attention(*ts, dropout_p=0.3, seed=100)
        torch.manual_seed(5)
        d1 = vlops.co_attention(*ts, dropout_p=0.3)
        torch.manual_seed(5)
        d2 = vlops.co_attention(*ts, dropout_p=0.3)
        d3 = vlops.co_attention(*ts, dropout_p=0.3)
        e = vlops.co_attention(*ts, dropout_p=0.0, seed=1)
        f = vlops.co_attention(*ts)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    assert all(torch.equal(x, y) for x, y in zip(d1, d2))
    assert not torch.equal(d1[0], d3[0])
    assert all(torch.equal(x, y) for x, y in zip(e, f))  # the seed is ignored without dropout


# ------------------------------------------------------------------------------------------------ layouts

@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_views_and_inputs_unchanged(backend, device):
    """Views of fused QKV projections are read in place; a strided last dim is copied; nothing is modified."""
    _require(backend, device)
    B, Nt, Nv, H, d = 2, 6, 10, 2, 32
    g = torch.Generator().manual_seed(0)
    tqkv = torch.randn(B, Nt, 3 * H * d, generator=g).to(device)
    iqkv = torch.randn(B, Nv, 3 * H * d, generator=g).to(device)
    before = (tqkv.clone(), iqkv.clone())
    tv_ = tqkv.view(B, Nt, 3, H, d).unbind(2)
    iv_ = iqkv.view(B, Nv, 3, H, d).unbind(2)
    assert not tv_[0].is_contiguous()
    lens = torch.tensor([Nv, 3], device=device)
    with vlops.use_backend(backend):
        got = vlops.co_attention(*tv_, *iv_, image_lengths=lens)
        want = vlops.co_attention(*[t.contiguous() for t in tv_ + iv_], image_lengths=lens)
        # last dim strided: [B, N, H, d] seen through a transpose of a [B, N, d, H] tensor
        odd = [t.contiguous().transpose(-1, -2).contiguous().transpose(-1, -2) for t in tv_ + iv_]
        assert odd[0].stride(-1) != 1
        got_odd = vlops.co_attention(*odd, image_lengths=lens)
        one = vlops.co_attention(*[t[1:] for t in tv_ + iv_], image_lengths=lens[1:])
    for a, b, c in zip(got, want, got_odd):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6) and torch.allclose(c, b, rtol=1e-6, atol=1e-6)
    assert torch.allclose(one[0][0], want[0][1], rtol=1e-6, atol=1e-6)
    assert torch.equal(tqkv, before[0]) and torch.equal(iqkv, before[1])


def test_bad_input_errors():
    ts = _inputs(2, 5, 7, 2, 8)
    tq, tk, tv, iq, ik, iv = ts
    ca = vlops.co_attention
    cases = [
        (lambda: ca(tq, tk, tv, iq[:1], ik, iv), ValueError, "batch size"),
        (lambda: ca(tq, tk, tv, iq, ik[:, :, :1], iv), ValueError, "number of heads"),
        (lambda: ca(tq, tk, tv, iq, ik, iv[..., :4]), ValueError, "head dim"),
        (lambda: ca(tq, tk[:, :3], tv, iq, ik, iv), ValueError, "text_k has 3 tokens"),
        (lambda: ca(tq[0], tk, tv, iq, ik, iv), ValueError, "text_q must be 4-D"),
        (lambda: ca(tq, tk.double(), tv, iq, ik, iv), TypeError, "text_k is torch.float64"),
        (lambda: ca(tq, tk, tv, iq.long(), ik, iv), TypeError, "image_q must be a float16"),
        (lambda: ca(tq, tk, tv, iq, ik.to("meta"), iv), ValueError, "image_k is on meta"),
        (lambda: ca(*ts, text_lengths=torch.tensor([6, 1])), ValueError, r"text_lengths must be in \[0, 5\]"),
        (lambda: ca(*ts, image_lengths=torch.tensor([-1, 1])), ValueError, r"image_lengths must be in \[0, 7\]"),
        (lambda: ca(*ts, image_lengths=torch.tensor([2**33, 1])), ValueError, "image_lengths must be in"),
        (lambda: ca(*ts, text_lengths=torch.tensor([1.0, 2.0])), TypeError, "text_lengths must be an integer"),
        (lambda: ca(*ts, text_lengths=torch.tensor([1, 2, 3])), ValueError, r"text_lengths must have shape \[B\]"),
        (lambda: ca(*ts, text_lengths=torch.tensor([1, 2], device="meta")), ValueError,
         "text_lengths is on meta but the inputs are on cpu; put them on the inputs' device or on the CPU"),
        (lambda: ca(*ts, image_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "image_mask must have shape"),
        (lambda: ca(*ts, text_mask=torch.ones(2, 1, 1, 5, dtype=torch.bool)), ValueError, "text_mask must have shape"),
        (lambda: ca(*ts, text_mask=torch.ones(2, 5)), TypeError, "text_mask must be a bool"),
        (lambda: ca(*ts, text_mask=torch.ones(2, 5, dtype=torch.bool), text_lengths=torch.tensor([1, 1])),
         ValueError, "not both"),
        (lambda: ca(*ts, dropout_p=1.0), ValueError, "dropout_p"),
        (lambda: ca(*ts, dropout_p=float("nan")), ValueError, "dropout_p"),
        (lambda: ca(*ts, dropout_p=0.1, seed=-1), ValueError, "seed"),
        (lambda: ca(*ts, dropout_p=0.1, seed=1.5), TypeError, "seed"),
        (lambda: ca(*ts, mask_mode="additive"), ValueError, "mask_mode"),
        (lambda: ca(*ts, scale=0.0), ValueError, "scale"),
        (lambda: ca(*ts, scale="1"), TypeError, "scale"),
        (lambda: ca(tq.numpy(), tk, tv, iq, ik, iv), TypeError, "text_q must be a torch.Tensor"),
    ]
    for fn, exc, words in cases:
        with pytest.raises(exc, match=words):
            fn()
    before = [t.clone() for t in ts]
    assert all(torch.equal(a, b) for a, b in zip(before, ts))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_eager_autograd_path_equals_registered_autograd(backend, device):
    """vlops.co_attention's eager calls go through ops.co_attention (a torch.autograd.Function built from the
    op's setup and backward, vlops.ops.eager_autograd); calling the custom op itself uses the autograd that
    register_autograd gave it. Same outputs and gradients bit for bit (a gradient on one output only too);
    no graph when nothing requires grad."""
    _require(backend, device)
    B, Nt, Nv, H, d = 2, 5, 9, 2, 16
    ts = [t.requires_grad_() for t in _inputs(B, Nt, Nv, H, d, seed=9, device=device)]
    args = (*ts, torch.tensor([5, 2], dtype=torch.int32), None, None,
            torch.rand(B, Nv, generator=torch.Generator().manual_seed(2)).to(device) > 0.3, 0.25, 0, 0.1, 77)
    go = _grads_out(B, Nt, Nv, H, d, device=device)
    with vlops.use_backend(backend):
        fast = ops.co_attention(*args)
        reg = ops.co_attention_op(*args)
        assert type(fast[0].grad_fn).__name__ != type(reg[0].grad_fn).__name__  # two routes were taken
        for outs_grads in ((0, 1), (1,)):
            g_fast = torch.autograd.grad([fast[i] for i in outs_grads], ts, [go[i] for i in outs_grads],
                                         retain_graph=True)
            g_reg = torch.autograd.grad([reg[i] for i in outs_grads], ts, [go[i] for i in outs_grads],
                                        retain_graph=True)
            for gf, gr in zip(g_fast, g_reg):
                assert torch.equal(gf, gr)
        with torch.no_grad():
            plain = ops.co_attention(*args)
    for f, r, p in zip(fast, reg, plain):
        assert torch.equal(f, r) and torch.equal(p, f.detach()) and p.grad_fn is None


def test_lengths_on_the_host():
    """Lengths may be on the CPU whatever the inputs' device (checked on the host, no device sync): the
    argument check accepts them for inputs elsewhere and range-checks them in place."""
    ts = _inputs(2, 5, 7, 2, 8)
    meta = [t.to("meta") for t in ts]
    a = ref.check_args(meta, text_lengths=torch.tensor([5, 0]), image_lengths=torch.tensor([3, 7], dtype=torch.int64))
    assert a.t_len.device.type == "cpu" and a.t_len.dtype == torch.int32 and a.t_len.tolist() == [5, 0]
    ref.check_lengths_range(a.t_len, a.i_len, 5, 7)
    with pytest.raises(ValueError, match=r"image_lengths must be in \[0, 6\] .*, got \[3, 7\]"):
        ref.check_lengths_range(a.t_len, a.i_len, 5, 6)
    with pytest.raises(ValueError, match=r"text_lengths must be in \[0, 5\] .*, got \[-1, 0\]"):
        ref.check_lengths_range(torch.tensor([-1, 0], dtype=torch.int32), None, 5, 7)


@pytest.mark.parametrize("pad", ["lengths", "mask"])
@pytest.mark.parametrize("backend,device", TRITON_CUDA)
def test_cuda_call_does_not_synchronise(backend, device, pad):
    """On CUDA, forward + backward with lengths on the host (or boolean masks on the device) queue without a
    host-device synchronisation (torch's sync debug mode turns one into an error), and equal the call with
    lengths on the device, which synchronises once to range-check them."""
    _require(backend, device)
    B, Nt, Nv, H, d = 3, 20, 37, 2, 64
    ts = _inputs(B, Nt, Nv, H, d, seed=11, device=device, dtype=torch.bfloat16)
    host_kw = _kw(_padding(pad, B, Nt, 1), _padding(pad, B, Nv, 2))  # lengths on the host (masks: moved below)
    dev_kw = {k: v.to(device) for k, v in host_kw.items()}
    kw = host_kw if pad == "lengths" else dev_kw
    g_out = _grads_out(B, Nt, Nv, H, d, device=device)
    with vlops.use_backend(backend):
        want = _run(vlops.co_attention, ts, g_out, **dev_kw)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = _run(vlops.co_attention, ts, g_out, **kw)
            if pad == "lengths":
                with pytest.raises(RuntimeError, match="synchroniz"):  # proves the debug mode sees a sync
                    _run(vlops.co_attention, ts, g_out, **dev_kw)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for a, b in zip([*got[0], *got[1]], [*want[0], *want[1]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", TRITON_CUDA)
def test_cuda_graph_capture(backend, device):
    """A CUDA graph captures the forward with boolean key masks, and its replay on new inputs equals the eager
    call; lengths (on the host or the device) inside a capture raise a ValueError naming them."""
    _require(backend, device)
    B, Nt, Nv, H, d = 3, 20, 37, 2, 64
    ts = _inputs(B, Nt, Nv, H, d, seed=12, device=device, dtype=torch.bfloat16)
    kw = {k: v.to(device) for k, v in _kw(_padding("mask", B, Nt, 3), _padding("mask", B, Nv, 4)).items()}
    static = [t.clone() for t in ts]
    with vlops.use_backend(backend):
        vlops.co_attention(*static, **kw)  # compile the kernels outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs = vlops.co_attention(*static, **kw)
        fresh = _inputs(B, Nt, Nv, H, d, seed=13, device=device, dtype=torch.bfloat16)
        for s_, f in zip(static, fresh):
            s_.copy_(f)
        g.replay()
        want = vlops.co_attention(*fresh, **kw)
        for a, b in zip(outs, want):
            assert torch.equal(a, b)
        for lengths in (torch.tensor([20, 5, 0]), torch.tensor([20, 5, 0], device=device)):
            g2 = torch.cuda.CUDAGraph()
            with pytest.raises(ValueError, match="text_lengths: lengths cannot be used inside a CUDA graph"):
                with torch.cuda.graph(g2):
                    vlops.co_attention(*static, text_lengths=lengths)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck_and_compile(backend, device):
    _require(backend, device)
    B, Nt, Nv, H, d = 2, 5, 9, 2, 16
    ts = [t.requires_grad_() for t in _inputs(B, Nt, Nv, H, d, seed=8, device=device)]
    tl = torch.tensor([5, 2], dtype=torch.int32, device=device)
    il = torch.tensor([0, 9], dtype=torch.int32, device=device)
    im = torch.rand(B, Nv, generator=torch.Generator().manual_seed(1)).to(device) > 0.4
    with vlops.use_backend(backend):
        torch.library.opcheck(ops.co_attention_op, (*ts, tl, il, None, None, 0.25, 0, 0.0, 0))
        torch.library.opcheck(ops.co_attention_op, (*ts, None, None, None, im, 0.3, 1, 0.2, 2**35 + 1))
        fn = lambda *a: vlops.co_attention(*a, text_lengths=tl, image_mask=im, dropout_p=0.1, seed=3)  # noqa: E731
        eager = fn(*ts)
        compiled = torch.compile(fn, fullgraph=True)(*ts)
        ge = torch.autograd.grad(eager[0].sum() + eager[1].square().sum(), ts)
        gc = torch.autograd.grad(compiled[0].sum() + compiled[1].square().sum(), ts)
    for a, b in zip(list(compiled) + list(gc), list(eager) + list(ge)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_dropout_draws_a_seed_per_call():
    """Under torch.compile(fullgraph=True), seed=None still draws a fresh seed per call (not one baked into
    the graph), reproducibly under torch.manual_seed."""
    ts = _inputs(2, 5, 7, 2, 8, seed=2)
    f = torch.compile(lambda *a: vlops.co_attention(*a, dropout_p=0.5), fullgraph=True)
    with vlops.use_backend("reference"):
        torch.manual_seed(3)
        a, b = f(*ts), f(*ts)
        torch.manual_seed(3)
        c = f(*ts)
    assert not torch.equal(a[0], b[0]) and torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


# ------------------------------------------------------------------------------------------------ modules

CFG = ref.ViLBERTConfig(hidden_size=48, v_hidden_size=40, bi_hidden_size=64, bi_num_attention_heads=2,
                        intermediate_size=80, v_intermediate_size=72)


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * (0.3 if p.ndim > 1 else 0.1)
                    + (1.0 if "LayerNorm" in name and name.endswith("weight") else 0.0))
    return module


def _streams(B=3, Nv=11, Nt=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(B, Nv, CFG.v_hidden_size, generator=g, dtype=torch.float64)
    x2 = torch.randn(B, Nt, CFG.hidden_size, generator=g, dtype=torch.float64)
    m1 = (torch.arange(Nv)[None] < torch.tensor([Nv, 4, 0])[:B, None]).float()  # image: right padding, one empty
    m2 = (torch.rand(B, Nt, generator=g) > 0.3).float()  # text: holes (a bool-mask call)
    m2[:, 0] = 1.0
    return x1, ref.extended_attention_mask(m1), x2, ref.extended_attention_mask(m2)


def _module_grads(module, inputs, outs_idx=(0, 1)):
    x1, e1, x2, e2 = inputs
    x1 = x1.detach().clone().requires_grad_()
    x2 = x2.detach().clone().requires_grad_()
    out = module(x1, e1, x2, e2)
    loss = sum((out[i] * torch.linspace(-1, 1, out[i].shape[-1], dtype=out[i].dtype)).sum() for i in outs_idx)
    # the key biases' gradient is zero in exact arithmetic (a shift of every score of a row): compared
    # against float64 it is pure rounding noise, so it is left out
    params = [p for n, p in sorted(module.named_parameters()) if not (n.startswith(("key", "biattention.key"))
                                                                      and n.endswith("bias"))]
    grads = torch.autograd.grad(loss, [x1, x2] + params, allow_unused=True)
    return out, grads


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.id != "triton-cuda"])
def test_nn_coattention_is_vilbert_biattention(backend, device):
    """Same parameter names; exact_vilbert=True equals ViLBERT's BertBiAttention everywhere (also a text
    query batch with no valid image key); the default equals it wherever a query has a valid key."""
    _require(backend, device)
    eager = _randomize(ref.ViLBERTBiAttention(CFG)).eval()
    inputs = _streams()
    x1, e1, x2, e2 = [t.float() for t in inputs]
    want, want_g = _module_grads(eager.double(), inputs)
    for exact in (True, False):
        fused = vlops.nn.CoAttention(CFG, exact_vilbert=exact).eval()
        assert fused.state_dict().keys() == eager.state_dict().keys()
        fused.load_state_dict(eager.state_dict())
        with vlops.use_backend(backend):
            got, got_g = _module_grads(fused, (x1, e1, x2, e2))
        assert got[2] == (None, None) and got[0].shape == want[0].shape and got[1].shape == want[1].shape
        assert rel_err(got[1], want[1]) <= TOL[torch.float32]  # image queries over text: every row has a key
        if exact:
            assert rel_err(got[0][:2], want[0][:2]) <= TOL[torch.float32]
            assert rel_err(got[0][2], want[0][2]) <= 2e-3  # no valid image key: the fp32 spacing at -10000
            for a, b in zip(got_g, want_g):
                assert rel_err(a, b) <= 2e-3
        else:
            assert rel_err(got[0][:2], want[0][:2]) <= TOL[torch.float32]
            assert torch.count_nonzero(got[0][2]) == 0
    # batch items with a valid key everywhere: every gradient matches too
    sub = [t[:2] for t in inputs]
    want, want_g = _module_grads(eager, sub)
    fused = vlops.nn.CoAttention(CFG).double().eval()
    fused.load_state_dict(eager.state_dict())
    with vlops.use_backend(backend):
        got, got_g = _module_grads(fused, sub)
    for a, b in zip(list(got[:2]) + list(got_g), list(want[:2]) + list(want_g)):
        assert rel_err(a, b) <= TOL[torch.float64]


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.id != "triton-cuda"])
def test_nn_block_is_vilbert_connection_layer(backend, device):
    _require(backend, device)
    eager = _randomize(ref.ViLBERTConnectionLayer(CFG), seed=1).double().eval()
    fused = vlops.nn.CoAttentionBlock(CFG).double().eval()
    assert list(fused.state_dict().keys()) == list(eager.state_dict().keys())
    fused.load_state_dict(eager.state_dict())
    sub = [t[:2] for t in _streams(seed=2)]
    want, want_g = _module_grads(eager, sub)
    with vlops.use_backend(backend):
        got, got_g = _module_grads(fused, sub)
    assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
    for a, b in zip(list(got[:2]) + [g for g in got_g if g is not None], list(want[:2]) + [g for g in want_g
                                                                                      if g is not None]):
        assert rel_err(a, b) <= TOL[torch.float64]
    assert sum(g is None for g in got_g) == 4  # q_dense1 / q_dense2 (weight, bias): unused, as in ViLBERT


def test_nn_mask_forms_and_shared_weights():
    """Extended additive, bool, 0/1 and [B, N] masks give one result; right-padded masks become lengths;
    LXMERT's shared-weight option equals the two-module form with the weights copied to both streams."""
    cfg = ref.ViLBERTConfig(hidden_size=40, v_hidden_size=40, bi_hidden_size=32, bi_num_attention_heads=2)
    m = _randomize(vlops.nn.CoAttention(cfg)).eval()
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(2, 9, 40, generator=g), torch.randn(2, 6, 40, generator=g)
    keep1 = torch.arange(9)[None] < torch.tensor([9, 5])[:, None]
    keep2 = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    base = m(x1, ref.extended_attention_mask(keep1), x2, ref.extended_attention_mask(keep2))
    for a1, a2 in ((keep1, keep2), (keep1.long(), keep2.int()), (keep1[:, None], keep2[:, None, None]),
                   (torch.finfo(torch.float32).min * (~keep1[:, None, None]).float(), keep2)):
        out = m(x1, a1, x2, a2)
        assert torch.equal(out[0], base[0]) and torch.equal(out[1], base[1])
    from vlops.nn.coattention import key_padding

    got = key_padding(ref.extended_attention_mask(keep1), 2, 9, "m")  # CPU mask: converted by default
    assert set(got) == {"lengths"} and got["lengths"].tolist() == [9, 5] and got["lengths"].device.type == "cpu"
    assert set(key_padding(ref.extended_attention_mask(keep1), 2, 9, "m", to_lengths=False)) == {"mask"}
    assert set(key_padding(ref.extended_attention_mask(keep2), 2, 6, "m", to_lengths=True)) == {"mask"}
    assert set(key_padding(ref.extended_attention_mask(keep2), 2, 6, "m")) == {"mask"}
    m_masks = _randomize(vlops.nn.CoAttention(cfg, mask_to_lengths=False)).eval()
    out = m_masks(x1, ref.extended_attention_mask(keep1), x2, ref.extended_attention_mask(keep2))
    assert torch.allclose(out[0], base[0], rtol=1e-6, atol=1e-6) and torch.allclose(out[1], base[1], rtol=1e-6,
                                                                                    atol=1e-6)
    assert key_padding(None, 2, 6, "m") == {}
    with pytest.raises(ValueError, match="attention_mask1"):
        m(x1, torch.zeros(2, 1, 9, 9), x2, None)
    with pytest.raises(ValueError, match="one batch size"):
        m(x1[:1], None, x2, None)
    unmasked = m(x1, None, x2, None)
    explicit = m(x1, torch.ones(2, 9, dtype=torch.bool), x2, torch.ones(2, 6, dtype=torch.bool))
    assert torch.equal(unmasked[0], explicit[0])

    shared = _randomize(vlops.nn.CoAttention(cfg, shared_weights=True), seed=4).eval()
    names = [f"{n}.{w}" for n in ("query", "key", "value") for w in ("weight", "bias")]
    assert sorted(shared.state_dict()) == sorted(names)  # LXMERT BertAttention's names
    two = vlops.nn.CoAttention(cfg).eval()
    two.load_state_dict({f"{n}{i}.{w}": v for (k, v) in shared.state_dict().items() for n, w in [k.split(".")]
                         for i in (1, 2)})
    a = shared(x1, None, x2, ref.extended_attention_mask(keep2))
    b = two(x1, None, x2, ref.extended_attention_mask(keep2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="shared_weights needs"):
        vlops.nn.CoAttention(ref.ViLBERTConfig(hidden_size=40, v_hidden_size=32), shared_weights=True)
    with pytest.raises(TypeError, match="unknown config field"):
        vlops.nn.CoAttention(hiden_size=3)


def test_nn_dropout_per_direction():
    """Training: dropout1 (text queries) and dropout2 (image queries) keep their own probabilities (the op
    runs once per direction when they differ); torch.manual_seed makes it reproducible; eval has none."""
    cfg = ref.ViLBERTConfig(hidden_size=24, v_hidden_size=20, bi_hidden_size=32, bi_num_attention_heads=2,
                            v_attention_probs_dropout_prob=0.3, attention_probs_dropout_prob=0.0)
    m = _randomize(vlops.nn.CoAttention(cfg))
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(2, 9, 20, generator=g), torch.randn(2, 6, 24, generator=g)
    m.eval()
    ev = m(x1, None, x2, None)
    m.train()
    torch.manual_seed(0)
    tr = m(x1, None, x2, None)
    torch.manual_seed(0)
    tr2 = m(x1, None, x2, None)
    assert torch.equal(tr[0], tr2[0]) and torch.equal(tr[1], tr2[1])
    assert not torch.allclose(tr[0], ev[0])  # text direction: dropout 0.3
    assert torch.equal(tr[1], ev[1])  # image direction: dropout 0
    m.dropout2.p = 0.3  # equal probabilities: one call, both directions dropped
    tr3 = m(x1, None, x2, None)
    assert not torch.allclose(tr3[1], ev[1])


def test_nn_compile_fullgraph():
    """The drop-in module compiles with fullgraph=True (masks are passed as masks under compile)."""
    m = _randomize(vlops.nn.CoAttention(CFG)).eval()
    x1, e1, x2, e2 = [t.float() for t in _streams()]
    with vlops.use_backend("reference"):
        want = m(x1, e1, x2, e2)
        got = torch.compile(m, fullgraph=True)(x1, e1, x2, e2)
    assert torch.allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
