"""The co-attention reference (vlops.reference.coattention) in float64: against torch SDPA (two masked calls)
forward and every gradient, against ViLBERT's eager BertBiAttention math with its -10000 extended masks, the
two mask modes against each other, the dropout mask against a scalar Philox evaluation, and the ops-layer
reference (the kernel contract's forward and backward formulas) against autograd through the reference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlops.ops import coattention as ops
from vlops.reference import coattention as ref
from vlops.reference.diffusion import philox4x32, uint32_to_uniform

from conftest import TOL, rel_err

F64 = TOL[torch.float64]


def _err(a, b):
    """Relative error, with an absolute floor for tensors that are zero in exact arithmetic (e.g. the query
    gradient when a single key is valid: the softmax is constant)."""
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / max(b.norm().item(), 1e-3)).item()


def _inputs(B, Nt, Nv, H, d, seed):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(B, n, H, d, generator=g, dtype=torch.float64) for n in (Nt, Nt, Nt, Nv, Nv, Nv)]
    ts[0] *= 2.0
    ts[3] *= 2.0
    return ts


def _valid(B, N, seed, kind):
    """[B, N] keep mask: right padding ("lengths", returned with the lengths) or holes ("mask"); batch 1 has
    no valid key when B > 1."""
    g = torch.Generator().manual_seed(seed)
    if kind == "lengths":
        lens = torch.randint(1, N + 1, (B,), generator=g)
        if B > 1:
            lens[1] = 0
        return torch.arange(N)[None] < lens[:, None], lens
    keep = torch.rand(B, N, generator=g) > 0.4
    if B > 1:
        keep[1] = False
    return keep, None


def _grad(fn, ts, go):
    xs = [t.detach().clone().requires_grad_() for t in ts]
    outs = fn(*xs)
    return list(outs) + list(torch.autograd.grad(outs, xs, go))


def _sdpa_pair(tq, tk, tv, iq, ik, iv, t_keep, i_keep, scale=None):
    """Two masked SDPA calls; a row with no valid key is computed over every key and then zeroed (the zero
    convention, whatever SDPA itself does with a fully masked row), so it passes no gradient."""
    def one(q, k, v, keep):
        has = keep.any(-1)
        safe = torch.where(has[:, None], keep, torch.ones_like(keep))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=safe[:, None, None, :], scale=scale).transpose(1, 2)
        return o * has[:, None, None, None].to(o.dtype)
    return one(tq, ik, iv, i_keep), one(iq, tk, tv, t_keep)


@pytest.mark.parametrize("d", [64, 128])
def test_matches_sdpa_forward_and_every_gradient(d):
    g = torch.Generator().manual_seed(d)
    combos = [(1, 1), (5, 300), (16, 37), (37, 101), (60, 5), (101, 16), (300, 60)]
    for i, (Nt, Nv) in enumerate(combos):
        B, H = 3, 2
        ts = _inputs(B, Nt, Nv, H, d, seed=100 * d + i)
        kind_t, kind_i = ("lengths", "mask") if i % 2 else ("mask", "lengths")
        t_keep, t_len = _valid(B, Nt, i, kind_t)
        i_keep, i_len = _valid(B, Nv, i + 50, kind_i)
        kw = dict(text_lengths=t_len) if t_len is not None else dict(text_mask=t_keep)
        kw.update(dict(image_lengths=i_len) if i_len is not None else dict(image_mask=i_keep))
        scale = None if i % 3 else 0.7 / math.sqrt(d)
        go = [torch.randn(B, n, H, d, generator=g, dtype=torch.float64) for n in (Nt, Nv)]
        got = _grad(lambda *a: ref.co_attention(*a, scale=scale, **kw), ts, go)
        want = _grad(lambda *a: _sdpa_pair(*a, t_keep, i_keep, scale=scale), ts, go)
        for j, (a, b) in enumerate(zip(got, want)):
            assert _err(a, b) <= F64, f"Nt={Nt} Nv={Nv} d={d}: output/grad {j}: {_err(a, b):.2e}"


def _vilbert_eager(ts, t_keep, i_keep, d):
    """ViLBERT's BertBiAttention forward after its projections (the same math as
    ref.ViLBERTBiAttention._attend): scores / sqrt(d) + extended mask, softmax, times values."""
    tq, tk, tv, iq, ik, iv = (t.transpose(1, 2) for t in ts)  # [B, H, N, d]

    def att(q, k, v, keep):
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)
        s = s + ref.extended_attention_mask(keep, torch.float64)
        return torch.matmul(torch.softmax(s, dim=-1), v).transpose(1, 2)
    return att(tq, ik, iv, i_keep), att(iq, tk, tv, t_keep)


def test_vilbert_mode_is_vilbert_math():
    """mask_mode "vilbert" equals ViLBERT's extended-mask attention everywhere (rows with no valid key
    included), and ref.ViLBERTBiAttention equals the same math on its projections."""
    B, H, d = 3, 4, 32
    g = torch.Generator().manual_seed(0)
    for Nt, Nv in ((16, 37), (5, 101), (60, 1)):
        ts = _inputs(B, Nt, Nv, H, d, seed=Nt)
        t_keep, t_len = _valid(B, Nt, 1, "lengths")
        i_keep, _ = _valid(B, Nv, 2, "mask")
        go = [torch.randn(B, n, H, d, generator=g, dtype=torch.float64) for n in (Nt, Nv)]
        got = _grad(lambda *a: ref.co_attention(*a, text_lengths=t_len, image_mask=i_keep, mask_mode="vilbert"),
                    ts, go)
        want = _grad(lambda *a: _vilbert_eager(a, t_keep, i_keep, d), ts, go)
        for j, (a, b) in enumerate(zip(got, want)):
            assert _err(a, b) <= F64, f"output/grad {j}: {_err(a, b):.2e}"
    # the module: projections + the same attention
    cfg = ref.ViLBERTConfig(hidden_size=24, v_hidden_size=20, bi_hidden_size=16, bi_num_attention_heads=2)
    m = ref.ViLBERTBiAttention(cfg).double().eval()
    x1 = torch.randn(2, 9, 20, dtype=torch.float64, generator=g)
    x2 = torch.randn(2, 6, 24, dtype=torch.float64, generator=g)
    k1 = torch.arange(9)[None] < torch.tensor([[9], [0]])
    k2 = torch.tensor([[1, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    c1, c2, (p1, p2) = m(x1, ref.extended_attention_mask(k1, torch.float64), x2,
                         ref.extended_attention_mask(k2, torch.float64))
    proj = [f(x).view(x.shape[0], x.shape[1], 2, 8) for f, x in ((m.query2, x2), (m.key2, x2), (m.value2, x2),
                                                                 (m.query1, x1), (m.key1, x1), (m.value1, x1))]
    t_ctx, i_ctx = ref.co_attention(*proj, text_mask=k2, image_mask=k1, mask_mode="vilbert")
    assert rel_err(c1, t_ctx.reshape(2, 6, 16)) <= F64 and rel_err(c2, i_ctx.reshape(2, 9, 16)) <= F64
    assert p1.shape == (2, 2, 6, 9) and p2.shape == (2, 2, 9, 6)
    # no valid image key in batch 1: every score shifted by -10000, i.e. the unmasked attention (ViLBERT)
    unmasked = ref.co_attention(*proj, text_mask=k2)[0]
    assert rel_err(c1[1], unmasked[1].reshape(6, 16)) <= F64


def test_zero_and_vilbert_modes_agree_where_a_key_is_valid():
    B, Nt, Nv, H, d = 3, 37, 16, 2, 64
    ts = _inputs(B, Nt, Nv, H, d, seed=9)
    t_keep, t_len = _valid(B, Nt, 3, "lengths")
    i_keep, _ = _valid(B, Nv, 4, "mask")
    kw = dict(text_lengths=t_len, image_mask=i_keep)
    z_t, z_i, zl_t, zl_i = ref.co_attention(*ts, return_lse=True, **kw)
    v_t, v_i, vl_t, vl_i = ref.co_attention(*ts, mask_mode="vilbert", return_lse=True, **kw)
    rows_t, rows_i = i_keep.any(-1), t_keep.any(-1)  # which batches have a valid key, per direction
    assert rel_err(z_t[rows_t], v_t[rows_t]) <= F64 and rel_err(z_i[rows_i], v_i[rows_i]) <= F64
    assert torch.count_nonzero(z_t[~rows_t]) == 0 and torch.count_nonzero(z_i[~rows_i]) == 0
    assert torch.isinf(zl_t[~rows_t]).all() and (zl_t[~rows_t] < 0).all() and torch.isfinite(vl_t).all()
    assert torch.isfinite(zl_t[rows_t]).all()
    assert torch.count_nonzero(v_t[~rows_t]) > 0  # ViLBERT's mode attends to every key there


def test_dropout_keep_is_the_contract_philox(monkeypatch):
    """Entries of dropout_keep equal a direct Philox4x32-10 evaluation with counter (j, i, b*H + h, dir),
    key (seed lo, seed hi); the kept fraction is 1 - p; the directions, seeds and heads differ."""
    B, H, Nq, Nk, p = 2, 3, 17, 29, 0.25
    seed = (123 << 32) + 456
    for direction in (0, 1):
        keep = ref.dropout_keep(B, H, Nq, Nk, direction, seed, p)
        g = torch.Generator().manual_seed(direction)
        for _ in range(12):
            b, h, i, j = (int(torch.randint(0, n, (1,), generator=g)) for n in (B, H, Nq, Nk))
            x0 = philox4x32(*(torch.tensor([c], dtype=torch.int64) for c in (j, i, b * H + h, direction)),
                            456, 123)[0]
            u = float(uint32_to_uniform(x0))
            assert bool(keep[b, h, i, j]) == (u >= p), (b, h, i, j)
    big = ref.dropout_keep(4, 4, 64, 64, 0, 7, 0.1)
    assert abs(big.float().mean().item() - 0.9) < 0.01
    assert not torch.equal(big, ref.dropout_keep(4, 4, 64, 64, 1, 7, 0.1))
    assert not torch.equal(big, ref.dropout_keep(4, 4, 64, 64, 0, 8, 0.1))
    assert not torch.equal(big[0, 0], big[0, 1])
    whole = ref.dropout_keep(3, 2, 40, 50, 1, 7, 0.1)
    monkeypatch.setattr(ref, "_KEEP_CHUNK", 3000)  # 1 (b, h) pair per chunk
    assert torch.equal(ref.dropout_keep(3, 2, 40, 50, 1, 7, 0.1), whole)


def test_reference_dropout_math():
    """With dropout the reference is softmax * keep / (1 - p) times the values (written out here)."""
    B, Nt, Nv, H, d, p, seed = 2, 11, 23, 2, 16, 0.3, 77
    ts = _inputs(B, Nt, Nv, H, d, seed=1)
    i_keep, i_len = _valid(B, Nv, 5, "lengths")
    t_ctx, i_ctx = ref.co_attention(*ts, image_lengths=i_len, dropout_p=p, seed=seed)
    tq, tk, tv, iq, ik, iv = (t.transpose(1, 2) for t in ts)
    s = torch.matmul(tq, ik.transpose(-1, -2)) / math.sqrt(d)
    s = s.masked_fill(~i_keep[:, None, None, :], float("-inf"))
    has = i_keep.any(-1)[:, None, None, None]
    prob = torch.where(has, torch.softmax(torch.where(has, s, torch.zeros_like(s)), -1), torch.zeros_like(s))
    keep = ref.dropout_keep(B, H, Nt, Nv, 0, seed, p).double()
    want_t = torch.matmul(prob * keep / (1 - p), iv).transpose(1, 2)
    s2 = torch.matmul(iq, tk.transpose(-1, -2)) / math.sqrt(d)
    keep2 = ref.dropout_keep(B, H, Nv, Nt, 1, seed, p).double()
    want_i = torch.matmul(torch.softmax(s2, -1) * keep2 / (1 - p), tv).transpose(1, 2)
    assert rel_err(t_ctx, want_t) <= F64 and rel_err(i_ctx, want_i) <= F64
    with pytest.raises(ValueError, match="seed"):
        ref.co_attention(*ts, dropout_p=0.1)


@pytest.mark.parametrize("mode", [0, 1])
def test_ops_reference_is_the_contract(mode):
    """The ops layer's reference kernels (the contract's forward, lse and backward formulas: D = dout . out,
    ds = p (dp - D), ...) equal autograd through the reference, with dropout, masks and empty rows."""
    B, Nt, Nv, H, d = 3, 13, 21, 2, 32
    ts = _inputs(B, Nt, Nv, H, d, seed=mode)
    t_keep, t_len = _valid(B, Nt, 6, "lengths")
    i_keep, _ = _valid(B, Nv, 7, "mask")
    if mode == 1:  # ViLBERT mode: give every row a valid key (the -10000 rows are checked above)
        t_len = t_len.clamp(min=1)
        i_keep[:, 0] = True
    scale, p, seed = 0.2, 0.15, 2**50 + 3
    g = torch.Generator().manual_seed(5)
    go = [torch.randn(B, n, H, d, generator=g, dtype=torch.float64) for n in (Nt, Nv)]
    mode_name = ("zero", "vilbert")[mode]
    kw = dict(text_lengths=t_len, image_mask=i_keep, scale=scale, dropout_p=p, seed=seed, mask_mode=mode_name)
    want = _grad(lambda *a: ref.co_attention(*a, **kw)[:2], ts, go)
    _, _, want_tl, want_il = ref.co_attention(*ts, return_lse=True, **kw)
    t_len32, full_i = t_len.to(torch.int32), torch.full((B,), Nv, dtype=torch.int32)
    t_out, i_out, t_lse, i_lse = ops._ref_co_attention_fwd(*ts, t_len32, full_i, None, i_keep, scale, mode, p, seed)
    assert t_lse.shape == (B, H, Nt) and i_lse.shape == (B, H, Nv) and t_lse.dtype == torch.float64
    assert rel_err(t_out, want[0]) <= F64 and rel_err(i_out, want[1]) <= F64
    fin = torch.isfinite(want_tl)
    assert torch.equal(torch.isfinite(t_lse), fin) and rel_err(t_lse[fin], want_tl[fin]) <= F64
    fin = torch.isfinite(want_il)
    assert torch.equal(torch.isfinite(i_lse), fin) and rel_err(i_lse[fin], want_il[fin]) <= F64
    grads = ops._ref_co_attention_bwd(go[0], go[1], *ts, t_out, i_out, t_lse, i_lse, t_len32, full_i, None, i_keep,
                                      scale, mode, p, seed)
    for j, (a, b) in enumerate(zip(grads, want[2:])):
        assert a.is_contiguous() and a.shape == b.shape
        assert rel_err(a, b) <= F64, f"gradient {j}: {rel_err(a, b):.2e}"


def test_vilbert_modules_state_dict_names():
    """The eager modules carry vilbert-multi-task's parameter names (BertConnectionLayer's state_dict)."""
    layer = ref.ViLBERTConnectionLayer(ref.ViLBERTConfig(hidden_size=8, v_hidden_size=12, bi_hidden_size=8,
                                                         bi_num_attention_heads=2, intermediate_size=16,
                                                         v_intermediate_size=20))
    want = []
    for n in ("query1", "key1", "value1", "query2", "key2", "value2"):
        want += [f"biattention.{n}.weight", f"biattention.{n}.bias"]
    for n in ("dense1", "LayerNorm1", "q_dense1", "dense2", "LayerNorm2", "q_dense2"):
        want += [f"biOutput.{n}.weight", f"biOutput.{n}.bias"]
    for s in ("v", "t"):
        want += [f"{s}_intermediate.dense.weight", f"{s}_intermediate.dense.bias", f"{s}_output.dense.weight",
                 f"{s}_output.dense.bias", f"{s}_output.LayerNorm.weight", f"{s}_output.LayerNorm.bias"]
    assert list(layer.state_dict().keys()) == want
    sd = layer.state_dict()
    assert sd["biattention.query1.weight"].shape == (8, 12) and sd["biattention.query2.weight"].shape == (8, 8)
    assert sd["biOutput.dense1.weight"].shape == (12, 8) and sd["v_intermediate.dense.weight"].shape == (20, 12)
    with pytest.raises(ValueError, match="multiple"):
        ref.ViLBERTBiAttention(ref.ViLBERTConfig(bi_hidden_size=10, bi_num_attention_heads=4))
