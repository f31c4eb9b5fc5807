"""Fused contrastive losses through the public API and the drop-in modules: parity with open_clip
(the anchor), the float64 reference, UniCL, label smoothing, zero-shot top-k, extremes, bad input,
opcheck and torch.compile, and the Hugging Face swap."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import vlops
from vlops import _backends
from vlops.ops import contrastive as ops
from vlops.reference import contrastive as ref

from conftest import HAS_CUDA, TOL, rel_err

open_clip = pytest.importorskip("open_clip")
from open_clip.loss import ClipLoss as OCClipLoss  # noqa: E402
from open_clip.loss import SigLipLoss as OCSigLipLoss  # noqa: E402


def _backends_for_op():
    out = [pytest.param("reference", "cpu", id="reference-cpu"), pytest.param("cpu", "cpu", id="cpu")]
    gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
    out.append(pytest.param("triton", "cuda", id="triton-cuda", marks=gpu))
    return out


BACKENDS = _backends_for_op()


def _require(backend, device):
    why = _backends.op_unavailable_reason("contrastive", backend, device)
    if why and device == "cuda":
        pytest.skip(why)
    assert not why, f"backend {backend} must run the contrastive ops on {device}: {why}"


def _feats(N, D, dtype, device, unit=True, M=None):
    a = torch.randn(N, D, device=device, dtype=torch.float64)
    b = torch.randn(M or N, D, device=device, dtype=torch.float64)
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    if not unit:  # rows of norms in [0.5, 1.5]: features as models emit them before normalisation
        a = a * (0.5 + torch.rand(a.shape[0], 1, dtype=a.dtype, device=device))
        b = b * (0.5 + torch.rand(b.shape[0], 1, dtype=b.dtype, device=device))
    return a.to(dtype), b.to(dtype)


def _loss_and_grads(fn, a, b, scale, bias, float64: bool = False):
    """Loss and gradients for (a, b, scale[, bias]); scale and bias as float32 scalars, or everything
    upcast to float64 (the reference) with ``float64=True``. A gradient autograd leaves unset is zero."""
    sdt = torch.float64 if float64 else torch.float32
    a = (a.detach().double() if float64 else a.detach().clone()).requires_grad_()
    b = (b.detach().double() if float64 else b.detach().clone()).requires_grad_()
    s = torch.tensor(scale, dtype=sdt, device=a.device, requires_grad=True)
    bb = None if bias is None else torch.tensor(bias, dtype=sdt, device=a.device, requires_grad=True)
    loss = fn(a, b, s, bb)
    wrt = [a, b, s] + ([bb] if bb is not None else [])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return loss, [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]


def _float64(fn, a, b, scale, bias):
    return _loss_and_grads(fn, a, b, scale, bias, float64=True)


def _clip_floors(a, b, scale):
    """Magnitudes of the target terms of the CLIP gradients (d a ~ scale/N b, d b ~ scale/N a, d scale ~
    mean a.b, with a.b counted as sum |a_d b_d|, the size its fp32 rounding scales with): when the softmax is
    nearly one-hot, each gradient is a small difference of such terms, and its error is judged against them
    (the same holds for eager fp32, which forms P - 1)."""
    N = a.shape[0]
    a64, b64 = a.double(), b.double()
    return [scale / N * b64.norm().item(), scale / N * a64.norm().item(),
            (a64.abs() * b64.abs()).sum(1).mean().item()]


def _siglip_floors(a, b, scale, bias, negative_only=False):
    """d scale and d bias of SigLIP are sums of terms of both signs: judged against sum |term|, with each
    a.b of d scale counted as sum |a_d b_d| (the size its fp32 rounding scales with: one pair of unit rows
    at D = 512 can give a.b = 0.01 from terms summing to 0.6)."""
    a64, b64 = a.double(), b.double()
    G = a64 @ b64.T
    L = scale * G + bias
    z = -torch.ones_like(L)
    if not negative_only:
        k = min(L.shape)
        z[torch.arange(k), torch.arange(k)] = 1.0
    W = -z * torch.sigmoid(-z * L)
    N = a.shape[0]
    return [0.0, 0.0, (W.abs() * (a64.abs() @ b64.abs().T)).sum().item() / N, W.abs().sum().item() / N]


def _check(loss, grads, loss64, grads64, dtype, eager=None, what="", floors=None):
    tol = TOL[dtype] * (50 if dtype == torch.float32 and loss.device.type == "cuda" else 1)  # tf32 dots on GPU
    # a loss near 0 is the difference of two O(logit_scale) log-sum-exp terms: it is held to the bound
    # relative to max(|loss|, 1) (absolute below 1), or to 2x the eager error at the same dtype
    err = abs(loss.double().item() - loss64.item()) / max(abs(loss64.item()), 1.0)
    lbound = tol if eager is None else max(tol, 2 * rel_err(eager[0], loss64))
    assert err <= lbound, f"{what} loss rel err {err:.2e} ({dtype})"
    for i, (g, g64) in enumerate(zip(grads, grads64)):
        if g64.abs().max() <= 1e-12:  # the CLIP bias gradient: zero (float64 rounding aside)
            assert g.abs().max() <= 10 * tol, f"{what} grad {i} should be zero"
            continue
        e = rel_err(g, g64)
        if floors is not None and i < len(floors):
            e = (g.double().cpu() - g64.double().cpu()).norm().item() / max(g64.norm().item(), floors[i])
        bound = tol
        if eager is not None:
            bound = max(bound, 2 * rel_err(eager[1][i], g64))
        assert e <= bound, f"{what} grad {i} rel err {e:.2e} > {bound:.2e}"


GRID = list(itertools.product([1, 2, 7, 129, 1000], [3, 64, 100, 512]))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,D", GRID)
def test_clip_loss_matches_open_clip_and_float64(backend, device, dtype, N, D):
    _require(backend, device)
    i = GRID.index((N, D))
    scale, bias = [1.0, 14.3, 100.0][i % 3], [None, -2.5][i % 2]
    a, b = _feats(N, D, dtype, device, unit=i % 4 != 3)
    if dtype == torch.bfloat16 and scale == 100.0 and i % 4 == 3:
        scale = 10.0  # random (non-unit) rows at scale 100 are saturated one-hots in bf16: not informative
    with vlops.use_backend(backend):
        got = _loss_and_grads(lambda *x: vlops.nn.ClipLoss()(*x), a, b, scale, bias)
    eager = _loss_and_grads(lambda *x: OCClipLoss()(*x), a, b, scale, bias)
    ref64 = _float64(lambda *x: OCClipLoss()(*x), a, b, scale, bias)
    assert got[0].dtype == torch.float32 and got[0].ndim == 0
    _check(*got, *ref64, dtype, eager=eager, what=f"{backend} N={N} D={D}", floors=_clip_floors(a, b, scale))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,D", GRID)
def test_siglip_loss_matches_open_clip_and_float64(backend, device, dtype, N, D):
    _require(backend, device)
    i = GRID.index((N, D))
    scale, bias = [1.0, 10.0, 100.0][i % 3], [-10.0, 0.7][i % 2]
    a, b = _feats(N, D, dtype, device)
    with vlops.use_backend(backend):
        got = _loss_and_grads(lambda *x: vlops.nn.SigLipLoss()(*x), a, b, scale, bias)
    eager = _loss_and_grads(lambda *x: OCSigLipLoss()(*x), a, b, scale, bias)
    ref64 = _float64(lambda *x: OCSigLipLoss()(*x), a, b, scale, bias)
    _check(*got, *ref64, dtype, eager=eager, what=f"{backend} N={N} D={D}",
           floors=_siglip_floors(a, b, scale, bias))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_unicl_and_label_smoothing(backend, device, smoothing):
    _require(backend, device)
    N, D = 37, 24
    a, b = _feats(N, D, torch.float32, device)
    labels = torch.randint(0, 6, (N,), device=device)
    with vlops.use_backend(backend):
        got = _loss_and_grads(lambda a_, b_, s, bb: vlops.clip_loss(a_, b_, s, bb, labels=labels,
                                                                     label_smoothing=smoothing), a, b, 20.0, 1.0)
    ref64 = _float64(lambda a_, b_, s, bb: ref.clip_loss(a_, b_, s, bb, labels=labels, label_smoothing=smoothing),
                     a, b, 20.0, 1.0)
    _check(*got, *ref64, torch.float32, what="unicl")
    # distinct labels == plain CLIP; plain CLIP with smoothing == F.cross_entropy(label_smoothing)
    with vlops.use_backend(backend):
        l1 = vlops.clip_loss(a, b, 20.0, labels=torch.arange(N, device=device), label_smoothing=smoothing)
        l2 = vlops.clip_loss(a, b, 20.0, label_smoothing=smoothing)
    l3 = ref.clip_loss(a.double(), b.double(), 20.0, label_smoothing=smoothing)
    assert rel_err(l1, l3) < 1e-5 and rel_err(l2, l3) < 1e-5


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_extremes(backend, device):
    _require(backend, device)
    # logit_scale 100 in bf16, duplicated rows, N = 1: finite and right
    a, b = _feats(64, 32, torch.bfloat16, device)
    a[10:20] = a[10]
    b[30:40] = b[30]
    with vlops.use_backend(backend):
        for fn, oc in ((vlops.clip_loss, OCClipLoss()), (vlops.siglip_loss, OCSigLipLoss())):
            got = _loss_and_grads(lambda *x: fn(*x), a, b, 100.0, -5.0)
            ref64 = _float64(lambda *x: oc(*x), a, b, 100.0, -5.0)
            assert all(torch.isfinite(g).all() for g in got[1]) and torch.isfinite(got[0])
            _check(*got, *ref64, torch.bfloat16, eager=_loss_and_grads(lambda *x: oc(*x), a, b, 100.0, -5.0))
        a1, b1 = _feats(1, 5, torch.float32, device)
        assert abs(vlops.clip_loss(a1, b1, 30.0).item()) < 1e-5  # one pair: the loss is log 1 = 0
        assert rel_err(vlops.siglip_loss(a1, b1, 30.0, -1.0), ref.siglip_loss(a1.double(), b1.double(), 30.0,
                                                                             -1.0)) < 1e-5


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_siglip_negative_only_and_rectangular(backend, device):
    _require(backend, device)
    a, b = _feats(9, 16, torch.float32, device, M=14)
    for neg in (False, True):
        with vlops.use_backend(backend):
            got = _loss_and_grads(lambda a_, b_, s, bb: vlops.siglip_loss(a_, b_, s, bb, negative_only=neg),
                                  a, b, 10.0, -3.0)
        ref64 = _float64(lambda a_, b_, s, bb: ref.siglip_loss(a_, b_, s, bb, negative_only=neg), a, b, 10.0, -3.0)
        _check(*got, *ref64, torch.float32, what=f"neg={neg}")


def test_zero_shot_topk_matches_full_softmax():
    a, c = _feats(50, 32, torch.float32, "cpu", M=1000)
    p = vlops.zero_shot_classify(a, c, 100.0)
    p_ref = ref.zero_shot(a.double(), c.double(), 100.0)
    assert rel_err(p, p_ref) < 1e-5
    v, i = vlops.zero_shot_classify(a, c, 100.0, k=5)
    v_ref, i_ref = torch.topk(p_ref, 5, dim=-1)
    assert torch.equal(i, i_ref) and rel_err(v, v_ref) < 1e-5
    ops._chunk_rows.cache_clear()
    orig = ops._chunk_rows
    try:  # several row chunks give the same answer
        ops._chunk_rows = lambda K: 7
        v2, i2 = vlops.zero_shot_classify(a, c, 100.0, k=5)
    finally:
        ops._chunk_rows = orig
    assert torch.equal(i2, i) and rel_err(v2, v) < 1e-5


def test_positive_dots_of_16bit_inputs_in_chunks(monkeypatch):
    """The loss's positive term and the gradient's centres are fp32 row dots of 16-bit inputs, converted a
    few rows at a time (no [N, D] fp32 copy): several chunks, a short last one, same result."""
    a, b = _feats(37, 24, torch.bfloat16, "cpu")
    want = (a.double() * b.double()).sum(1)
    one = ops._rowdot(a, b, torch.float32)
    monkeypatch.setattr(ops, "_ROWDOT_CHUNK", 24 * 5)  # 5 rows per chunk
    many = ops._rowdot(a, b, torch.float32)
    assert many.dtype == torch.float32 and torch.equal(one, many)
    assert rel_err(many, want) < 1e-6
    with vlops.use_backend("cpu"):
        got = _loss_and_grads(lambda *x: vlops.clip_loss(*x), a, b, 30.0, None)
    ref64 = _float64(lambda *x: OCClipLoss()(*x), a, b, 30.0, None)
    _check(*got, *ref64, torch.bfloat16, what="chunked positive dots")


def test_bad_input_errors():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    cases = [
        (lambda: vlops.clip_loss(a, torch.randn(5, 8), 1.0), ValueError, "batch size"),
        (lambda: vlops.clip_loss(a, torch.randn(4, 7), 1.0), ValueError, "feature dimension"),
        (lambda: vlops.clip_loss(a[None], b, 1.0), ValueError, "2-D"),
        (lambda: vlops.clip_loss(a.long(), b, 1.0), TypeError, "image_features"),
        (lambda: vlops.clip_loss(a, b, torch.ones(2)), ValueError, "logit_scale"),
        (lambda: vlops.clip_loss(a, b, "x"), TypeError, "logit_scale"),
        (lambda: vlops.clip_loss(a, b, 1.0, labels=torch.arange(3)), ValueError, "labels"),
        (lambda: vlops.clip_loss(a, b, 1.0, labels=torch.rand(4)), TypeError, "labels"),
        (lambda: vlops.clip_loss(a, b, 1.0, label_smoothing=1.5), ValueError, "label_smoothing"),
        (lambda: vlops.clip_loss(a, b.to("meta"), 1.0), ValueError, "device"),
        (lambda: vlops.siglip_loss(a, b, 1.0, torch.ones(1, 2)), ValueError, "logit_bias"),
        (lambda: vlops.zero_shot_classify(a, b, 1.0, k=9), ValueError, "k must"),
        (lambda: vlops.nn.ClipLoss(world_size=2), RuntimeError, "init_process_group"),
        (lambda: vlops.nn.SigLipLoss(world_size=4), RuntimeError, "init_process_group"),
        (lambda: vlops.nn.ClipLoss(rank=1), ValueError, "rank must be 0"),
        (lambda: vlops.nn.ClipLoss(world_size=0), ValueError, "world_size"),
        (lambda: vlops.nn.SigLipLoss(dist_impl="ring"), ValueError, "dist_impl"),
        (lambda: vlops.distributed.clip_loss(a, b, 1.0), RuntimeError, "init_process_group"),
    ]
    for fn, exc, words in cases:
        with pytest.raises(exc, match=words):
            fn()
    a0, b0 = a.clone(), b.clone()
    vlops.clip_loss(a, b, 3.0)
    assert torch.equal(a, a0) and torch.equal(b, b0)  # inputs untouched
    with vlops.use_backend("cuda"):
        with pytest.raises(vlops.BackendUnavailableError, match="contrastive"):
            vlops.clip_loss(a, b, 3.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck_and_compile(backend, device):
    _require(backend, device)
    a, b = _feats(6, 10, torch.float32, device)
    a.requires_grad_()
    b.requires_grad_()
    s = torch.tensor([7.0], device=device, requires_grad=True)
    bias = torch.tensor([-1.0], device=device, requires_grad=True)
    with vlops.use_backend(backend):
        torch.library.opcheck(ops.clip_loss_op, (a, b, s, None, 0.0))
        torch.library.opcheck(ops.clip_loss_op, (a, b, s, torch.tensor([0, 1, 0, 2, 2, 1], device=device), 0.1))
        for with_grad in (False, True):
            torch.library.opcheck(ops.siglip_loss_op, (a, b, s, bias, False, with_grad))
        torch._dynamo.reset()

        def f(a, b, s, bias):
            return vlops.clip_loss(a, b, s) + vlops.siglip_loss(a, b, s, bias)

        want = f(a, b, s, bias)
        got = torch.compile(f, fullgraph=True)(a, b, s, bias)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
        g1 = torch.autograd.grad(want, [a, b, s, bias])
        g2 = torch.autograd.grad(got, [a, b, s, bias])
        assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(g1, g2))


def test_drop_in_open_clip_training_step():
    """vlops.nn.ClipLoss in open_clip's training step: same loss and same parameter gradients."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=1, width=32, patch_size=8, image_size=32, head_width=8),
                 text_cfg=CLIPTextCfg(context_length=8, vocab_size=100, width=32, heads=4, layers=1))
    images, texts = torch.randn(6, 3, 32, 32), torch.randint(0, 100, (6, 8))
    grads = []
    for loss_fn in (OCClipLoss(), vlops.nn.ClipLoss()):
        model.zero_grad()
        image_features, text_features, logit_scale = model(images, texts)[:3]
        loss = loss_fn(image_features, text_features, logit_scale, output_dict=True)
        sum(loss.values()).backward()
        grads.append((sum(loss.values()).item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (l1, g1), (l2, g2) = grads
    assert abs(l1 - l2) <= 1e-5 * abs(l1)
    assert len(g1) == len(g2)
    for x, y in zip(g1, g2):
        assert rel_err(y, x) < 1e-4


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_transformers_swap(kind):
    transformers = pytest.importorskip("transformers")
    from vlops.integrations.transformers import patch_contrastive_loss, unpatch_contrastive_loss

    Cfg, Model = ((transformers.CLIPConfig, transformers.CLIPModel) if kind == "clip"
                  else (transformers.SiglipConfig, transformers.SiglipModel))
    tc = dict(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
              max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    vc = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
              num_attention_heads=4)
    torch.manual_seed(0)
    model = Model(Cfg(text_config=tc, vision_config=vc))
    kw = dict(input_ids=torch.randint(2, 100, (5, 7)), pixel_values=torch.randn(5, 3, 32, 32), return_loss=True)
    ref_loss = model(**kw).loss
    params = [model.logit_scale] + list(model.text_model.parameters())[-2:]
    ref_grads = torch.autograd.grad(ref_loss, params)
    patch_contrastive_loss(model)
    loss = model(**kw).loss
    grads = torch.autograd.grad(loss, params)
    assert rel_err(loss, ref_loss) < 1e-5
    assert all(rel_err(g, r) < 1e-4 for g, r in zip(grads, ref_grads))
    unpatch_contrastive_loss(model)
    assert not hasattr(model, "_vlops_original_forward")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_siglip_gradient_from_the_forward_pass(backend, device, monkeypatch):
    """With an input that requires grad, vlops.siglip_loss computes the loss and the gradient sums in one pass
    (the kernel ``siglip_fwd_bwd``) and the backward only scales them: no ``siglip_fwd`` / ``siglip_bwd``
    pass; the sums are scaled in place and dropped. Loss and gradients equal the two-pass route's bit for bit
    (the op with ``with_grad=False`` and its backward op); a second backward of a retained graph, and a
    backward that builds a graph (create_graph=True), recompute through the backward op, as before."""
    _require(backend, device)
    calls = []
    real = ops._kernel

    def spy(name, dev):
        calls.append(name)
        return real(name, dev)

    monkeypatch.setattr(ops, "_kernel", spy)
    a0, b0 = _feats(9, 12, torch.float32, device, M=7)
    s0 = torch.tensor([9.0], device=device)
    bias0 = torch.tensor([-4.0], device=device)

    def leaves():
        return [t.clone().requires_grad_() for t in (a0, b0, s0, bias0)]

    with vlops.use_backend(backend):
        ts = leaves()
        loss = vlops.siglip_loss(*ts)
        assert calls == ["siglip_fwd_bwd"]
        g1 = torch.autograd.grad(loss, ts, retain_graph=True)
        assert calls == ["siglip_fwd_bwd"]
        g2 = torch.autograd.grad(loss, ts)  # the sums are gone: recomputed
        assert calls == ["siglip_fwd_bwd", "siglip_bwd"]

        calls.clear()
        two = leaves()
        loss2 = ops.siglip_loss(*two, False, False)[0]  # the two-pass route
        g_two = torch.autograd.grad(loss2, two)
        assert calls == ["siglip_fwd", "siglip_bwd"]

        calls.clear()
        ts3 = leaves()
        g3 = torch.autograd.grad(vlops.siglip_loss(*ts3), ts3, create_graph=True)
        assert calls == ["siglip_fwd_bwd", "siglip_bwd"]

        calls.clear()
        with torch.no_grad():
            loss_ng = vlops.siglip_loss(*leaves())
        assert calls == ["siglip_fwd"]
    assert torch.equal(loss, loss2) and torch.equal(loss_ng, loss.detach())
    for x, y, z, w in zip(g1, g2, g_two, g3):
        assert torch.equal(x, y) and torch.equal(x, z) and torch.equal(x, w.detach())
