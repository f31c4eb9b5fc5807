"""Native CPU backward kernel of the patch stem: vlops._C.patch_embed_bwd_cpu, called with the positional
arguments of the backward kernel contract (docstring of vlops/ops/patch_embed.py) and compared with float64
autograd of the contract's forward math written here (pad, reshape / permute to patches, matmul,
F.layer_norm, + pos), independent of the kernel and of vlops.reference.

Bounds (DESIGN.md): relative error ||out - ref|| / ||ref|| of every gradient <= 1e-5 in fp32, <= 1e-2 in
fp16 / bf16 and <= 1e-10 in fp64. The reference runs on the inputs as given (already rounded to their dtype).
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from test_patch_embed_native import (  # shared with the forward
    BM_ENV, DTYPES, SEED_BASE, SHAPES as FWD_SHAPES, TOL, _cdt, _gen, check_isa, over_shapes, over_stage_combinations, relerr)

_C = pytest.importorskip("vlops._C", reason="the compiled extension vlops._C is not built")
if not hasattr(_C, "patch_embed_bwd_cpu"):
    pytest.skip("vlops._C was built without the patch_embed backward kernel", allow_module_level=True)

ARG_NAMES = ["grad", "images", "weight", "bias", "pos", "pn_weight", "pn_bias", "pn_eps", "use_pn", "ln_weight",
             "ln_bias", "ln_eps", "use_ln", "patch_size", "prefix_tokens", "need_images"]
OUT_NAMES = ["images", "weight", "bias", "pos", "pn_weight", "pn_bias", "ln_weight", "ln_bias"]




def make_case(B, C, H, W, P, D, dtype, *salt, bias=True, pos=True, pn=(True, True), ln=(True, True), prefix=1,
              need_images=True, grad_dtype=None):
    """The contract's arguments (dict). pn / ln: (weight given, bias given) or None for that norm off. The
    prefix rows of grad are NaN (the kernel must not read them)."""
    g = _gen(B, C, H, W, P, D, str(dtype), *salt)
    cdt = _cdt(dtype)
    Gh, Gw = -(-H // P), -(-W // P)
    K = C * P * P

    def rnd(*shape, s=1.0, off=0.0):
        return (off + s * torch.randn(*shape, generator=g, dtype=torch.float64)).to(cdt)

    grad = torch.randn(B, prefix + Gh * Gw, D, generator=g, dtype=torch.float64).to(grad_dtype or dtype)
    grad[:, :prefix] = float("nan")
    a = dict(
        grad=grad,
        images=torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype),
        weight=(torch.randn(D, K, generator=g, dtype=torch.float64) / K ** 0.5).to(dtype),
        bias=rnd(D, s=0.5) if bias else None,
        pos=rnd(Gh * Gw, D, s=0.5) if pos else None,
        pn_weight=None, pn_bias=None, pn_eps=1e-5, use_pn=pn is not None,
        ln_weight=None, ln_bias=None, ln_eps=1e-6, use_ln=ln is not None,
        patch_size=P, prefix_tokens=prefix, need_images=need_images,
    )
    if pn is not None:
        a["pn_weight"] = rnd(D, s=0.3, off=1.0) if pn[0] else None
        a["pn_bias"] = rnd(D, s=0.3) if pn[1] else None
    if ln is not None:
        a["ln_weight"] = rnd(D, s=0.3, off=1.0) if ln[0] else None
        a["ln_bias"] = rnd(D, s=0.3) if ln[1] else None
    return a


def call(a):
    return _C.patch_embed_bwd_cpu(*[a[k] for k in ARG_NAMES])


def ref_grads(a):
    """float64 autograd of the forward math; returns the 8 gradients in OUT_NAMES order (None where the
    contract says None)."""
    leaves = {}
    for k in OUT_NAMES:
        t = a[k]
        leaves[k] = None if t is None else t.detach().double().clone().requires_grad_()
    x = leaves["images"]
    B, C, H, W = x.shape
    P, R0 = a["patch_size"], a["prefix_tokens"]
    D, K = leaves["weight"].shape
    Gh, Gw = -(-H // P), -(-W // P)
    xp = F.pad(x, (0, Gw * P - W, 0, Gh * P - H))
    patches = xp.reshape(B, C, Gh, P, Gw, P).permute(0, 2, 4, 1, 3, 5).reshape(B, Gh * Gw, K)
    e = patches @ leaves["weight"].T
    if leaves["bias"] is not None:
        e = e + leaves["bias"]
    if a["use_pn"]:
        e = F.layer_norm(e, (D,), leaves["pn_weight"], leaves["pn_bias"], a["pn_eps"])
    if leaves["pos"] is not None:
        e = e + leaves["pos"]
    if a["use_ln"]:
        e = F.layer_norm(e, (D,), leaves["ln_weight"], leaves["ln_bias"], a["ln_eps"])
    e.backward(a["grad"][:, R0:].double())
    out = []
    for k in OUT_NAMES:
        t = leaves[k]
        if t is None or (k == "images" and not a["need_images"]) or (k.startswith("pn_") and not a["use_pn"]) \
                or (k.startswith("ln_") and not a["use_ln"]):
            out.append(None)
        else:
            out.append(t.grad if t.grad is not None else torch.zeros_like(t))
    return out


def check(a, got=None):
    """Runs the kernel (unless `got` is given), checks every output's presence, shape, dtype, layout and value
    against float64 autograd; returns the outputs."""
    if got is None:
        got = call(a)
    assert isinstance(got, tuple) and len(got) == 8
    dtype = a["images"].dtype
    cdt = _cdt(dtype)
    refs = ref_grads(a)
    for name, o, r in zip(OUT_NAMES, got, refs):
        if r is None:
            assert o is None, f"d_{name} should be None"
            continue
        assert o is not None, f"d_{name} is None"
        assert o.dtype == cdt and o.is_contiguous(), (name, o.dtype)
        err = relerr(o, r)
        assert err <= TOL[dtype], f"d_{name}: relative error {err:.3e} > {TOL[dtype]:.0e} ({dtype}); seed {SEED_BASE}"
    return got


SHAPES = {k: v for k, v in FWD_SHAPES.items() if k != "vit_l14_336"}  # name: (B, C, H, W, P, D)


@over_shapes(SHAPES)
def test_shapes(shape, dtype):
    check(make_case(*SHAPES[shape], dtype, "shapes"))


@over_shapes(SHAPES)
def test_plain_projection(shape, dtype):
    check(make_case(*SHAPES[shape], dtype, "plain", bias=False, pos=False, pn=None, ln=None))
    check(make_case(*SHAPES[shape], dtype, "bias_pos", pn=None, ln=None))


@over_stage_combinations
def test_every_stage_combination(bias, pos, pn, ln, dtype):
    a = make_case(2, 3, 24, 40, 8, 48, dtype, "combo", bias, pos, str(pn), str(ln), bias=bias, pos=pos, pn=pn, ln=ln)
    check(a)


def test_norm_params_ignored_when_flag_off():
    a = make_case(2, 3, 32, 32, 8, 40, torch.float32, "ignored")
    a["use_pn"] = a["use_ln"] = False
    got = check(a)
    assert all(got[i] is None for i in (4, 5, 6, 7))
    b = dict(a, pn_weight=None, pn_bias=None, ln_weight=None, ln_bias=None)
    for x, y in zip(call(b)[:4], got[:4]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("need_images", [True, False], ids=["dimg", "nodimg"])
def test_prefix_tokens_and_need_images(prefix, need_images, dtype):
    a = make_case(3, 3, 48, 32, 16, 40, dtype, "prefix", prefix, need_images, prefix=prefix, need_images=need_images)
    got = check(a)
    assert (got[0] is not None) == need_images


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_float32_grad(dtype):
    """grad may be float32 whatever the image dtype."""
    check(make_case(2, 3, 32, 48, 16, 40, dtype, "g32", grad_dtype=torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layouts(dtype):
    """channels_last, a strided slice and a channel slice give the contiguous result; d_images contiguous."""
    a = make_case(2, 3, 45, 60, 16, 72, dtype, "layouts")
    base = check(a)
    img = a["images"]
    g = _gen("big", str(dtype))
    big = torch.randn(2, 5, 100, 140, generator=g).to(dtype)
    big[:, 1:4, 7:52, 11:131:2] = img
    big2 = torch.randn(2, 4, 50, 64, generator=g).to(dtype)
    big2[:, :3, 2:47, 1:61] = img
    layouts = {
        "channels_last": img.contiguous(memory_format=torch.channels_last),
        "slice_w2": big[:, 1:4, 7:52, 11:131:2],
        "slice_w1": big2[:, :3, 2:47, 1:61],
    }
    for name, im in layouts.items():
        assert torch.equal(im, img) and not im.is_contiguous()
        got = call(dict(a, images=im))
        assert got[0].is_contiguous(), name
        for o, r in zip(got, base):
            assert torch.equal(o, r), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_inputs_unchanged(dtype):
    a = make_case(2, 3, 32, 48, 16, 40, dtype, "unchanged")
    a["images"] = a["images"].contiguous(memory_format=torch.channels_last)
    tensors = {k: v for k, v in a.items() if isinstance(v, torch.Tensor)}
    copies = {k: (v.clone(), v.stride()) for k, v in tensors.items()}
    got = check(a)
    for k, v in tensors.items():
        assert torch.equal(v, copies[k][0]) or (k == "grad" and torch.equal(v.nan_to_num(), copies[k][0].nan_to_num()))
        assert v.stride() == copies[k][1], k
    ptrs = {v.data_ptr() for v in tensors.values()}
    assert all(o.data_ptr() not in ptrs for o in got if o is not None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("bm,B,H,W,P,prefix", [
    (7, 3, 24, 32, 8, 1),     # 12 patches per image, chunks of <= 7 rows
    (5, 2, 40, 40, 8, 0),     # 25 patches, chunks of 5 rows
    (1, 2, 16, 24, 8, 2),     # one row per tile
    (64, 11, 16, 16, 8, 1),   # 4 patches: whole images grouped per tile, partial last tile
    (64, 11, 16, 16, 8, 0),
    (10, 7, 16, 24, 8, 3),    # 6 patches, one image per tile
    (1000, 3, 48, 48, 8, 1),  # everything in one tile per image
])
def test_tiles(monkeypatch, bm, B, H, W, P, prefix, dtype):
    monkeypatch.setenv(BM_ENV, str(bm))
    check(make_case(B, 3, H, W, P, 40, dtype, "tiles", bm, prefix, prefix=prefix))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_default_tiles_many_images(dtype):
    check(make_case(9, 3, 224, 224, 16, 24, dtype, "many", pn=None))
    check(make_case(300, 3, 32, 32, 16, 40, dtype, "small"))


def test_thread_counts_and_determinism():
    a = make_case(5, 3, 64, 80, 16, 96, torch.float32, "threads")
    first = check(a)
    for _ in range(2):
        for o, r in zip(call(a), first):
            assert torch.equal(o, r)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = check(a)
    finally:
        torch.set_num_threads(old)
    for o, r in zip(single, first):
        assert relerr(o, r) <= 1e-5


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_isas(isa):
    check_isa(isa, check, make_case)


def test_empty_and_degenerate():
    a = make_case(2, 3, 32, 32, 16, 24, torch.float32, "empty")
    got = call(dict(a, images=a["images"][:0], grad=a["grad"][:0]))
    assert got[0].shape == (0, 3, 32, 32) and torch.equal(got[1], torch.zeros(24, 768))
    assert torch.equal(got[3], torch.zeros(4, 24))
    check(make_case(2, 3, 10, 7, 16, 24, torch.float32, "small"))  # smaller than one patch
    check(make_case(1, 3, 16, 16, 16, 24, torch.float32, "one"))  # a single patch, both norms


def test_argument_names_and_none():
    a = make_case(1, 3, 16, 16, 8, 16, torch.float32, "kw", bias=False, pos=False, pn=None, ln=None,
                  need_images=False)
    got = _C.patch_embed_bwd_cpu(**a)
    assert got[0] is None and got[1] is not None and all(t is None for t in got[2:])
    assert torch.equal(got[1], call(a)[1])


def test_bad_inputs_raise():
    a = make_case(2, 3, 32, 32, 16, 24, torch.float32, "bad")
    call(a)
    D = 24
    bad = [
        ("grad", a["grad"].double()),
        ("grad", a["grad"][:, 1:]),
        ("grad", a["grad"].transpose(0, 1).contiguous().transpose(0, 1)),
        ("images", a["images"].to(torch.int32)),
        ("images", a["images"][0]),
        ("weight", a["weight"].double()),
        ("weight", a["weight"][:, :-1]),
        ("bias", torch.randn(D + 1)),
        ("pos", torch.randn(5, D)),
        ("pn_weight", torch.randn(D, 1)),
        ("pn_bias", torch.randn(D).half()),
        ("ln_weight", torch.randn(D - 1)),
        ("ln_bias", torch.randn(D, dtype=torch.float64)),
        ("pn_eps", -1.0),
        ("ln_eps", float("nan")),
        ("patch_size", 0),
        ("prefix_tokens", -1),
    ]
    for name, val in bad:
        with pytest.raises((RuntimeError, ValueError), match=name):
            call(dict(a, **{name: val}))


# ------------------------------------------------------------------ the forward's saved pre-norm rows (x0)
# The forward fills x0_out with x0 = W p + bias (compute dtype, [B Gh Gw, D]); the backward given those rows
# takes the LayerNorm statistics from them instead of re-running the GEMM.

X0_TOL = {torch.float64: 1e-10}  # x0 holds exact 16-bit products accumulated in fp32: the fp32 bound for them
SAME_TOL = {torch.float64: 1e-13}  # saved vs recompute path: the two GEMMs may round differently (BLAS)


def fwd_x0(a, images=None):
    """The forward (contract arguments of `a`, images replaced by `images` if given) with x0_out, a
    NaN-poisoned [B Gh Gw, D] buffer passed positionally; returns (out, x0)."""
    img = a["images"] if images is None else images
    B, _, H, W = img.shape
    P, D = a["patch_size"], a["weight"].shape[0]
    x0 = torch.full((B * (-(-H // P)) * (-(-W // P)), D), float("nan"), dtype=_cdt(img.dtype))
    out = _C.patch_embed_fwd_cpu(img, *[a[k] for k in ARG_NAMES[2:15]], x0)
    return out, x0


def x0_ref(a):
    """float64 pre-norm rows W p + bias, [B Gh Gw, D]."""
    x = a["images"].double()
    B, C, H, W = x.shape
    P = a["patch_size"]
    Gh, Gw = -(-H // P), -(-W // P)
    xp = F.pad(x, (0, Gw * P - W, 0, Gh * P - H))
    e = xp.reshape(B, C, Gh, P, Gw, P).permute(0, 2, 4, 1, 3, 5).reshape(B * Gh * Gw, -1) @ a["weight"].double().T
    return e if a["bias"] is None else e + a["bias"].double()


X0_COMBOS = [  # (bias, pos, pn, ln)
    (True, True, None, (True, True)),     # open_clip ln_pre
    (True, True, (True, True), (True, True)),  # timm PatchEmbed norm + norm_pre
    (False, False, (False, True), None),  # patch norm only
    (True, False, None, (False, False)),  # LayerNorm without affine
    (True, True, None, None),             # no LayerNorm: x0_out still filled, the backward ignores x0
]
X0_IDS = ["ln", "pn_ln", "pn_only", "ln_plain", "no_norm"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("combo", X0_COMBOS, ids=X0_IDS)
@pytest.mark.parametrize("bm", [None, 5, 64], ids=["bm_default", "bm5", "bm64"])
def test_forward_x0_out(monkeypatch, bm, combo, dtype):
    """x0_out receives W p + bias for every row (the poison is gone), and the tokens are the same bits as
    without it (tiles within one image, whole images per tile, one tile per image)."""
    if bm is not None:
        monkeypatch.setenv(BM_ENV, str(bm))
    bias, pos, pn, ln = combo
    for B, H, W, P, prefix in ((3, 24, 40, 8, 1), (2, 30, 45, 16, 0)):
        a = make_case(B, 3, H, W, P, 40, dtype, "x0_fwd", bm, X0_IDS[X0_COMBOS.index(combo)], prefix, bias=bias,
                      pos=pos, pn=pn, ln=ln, prefix=prefix)
        plain = _C.patch_embed_fwd_cpu(*[a[k] for k in ARG_NAMES[1:15]])
        out, x0 = fwd_x0(a)
        R0 = a["prefix_tokens"]
        assert torch.equal(out[:, R0:], plain[:, R0:]), "x0_out changed the tokens"
        assert x0.dtype == _cdt(dtype) and torch.isfinite(x0).all(), "x0_out not fully written"
        err = relerr(x0, x0_ref(a))
        assert err <= X0_TOL.get(dtype, 1e-5), f"x0_out: relative error {err:.3e}; seed {SEED_BASE}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("combo", X0_COMBOS, ids=X0_IDS)
@pytest.mark.parametrize("bm", [None, 7], ids=["bm_default", "bm7"])
def test_saved_x0_backward(monkeypatch, bm, combo, dtype):
    """The backward given the forward's x0: every gradient within the float64 bound, the gradients of the
    recompute path (x0=None) up to the GEMMs' rounding, and x0 itself not modified."""
    if bm is not None:
        monkeypatch.setenv(BM_ENV, str(bm))
    bias, pos, pn, ln = combo
    a = make_case(3, 3, 30, 45, 8, 48, dtype, "x0_bwd", bm, X0_IDS[X0_COMBOS.index(combo)], bias=bias, pos=pos,
                  pn=pn, ln=ln, prefix=2)
    _, x0 = fwd_x0(a)
    kept = x0.clone()
    saved = check(a, _C.patch_embed_bwd_cpu(*[a[k] for k in ARG_NAMES], x0))
    assert torch.equal(x0, kept), "the backward modified x0"
    recomputed = call(a)
    for name, s, r in zip(OUT_NAMES, saved, recomputed):
        assert (s is None) == (r is None), name
        if s is not None:
            err = relerr(s, r)
            assert err <= SAME_TOL.get(dtype, 1e-6), f"d_{name}: saved vs recompute differ by {err:.3e}"
    kw = _C.patch_embed_bwd_cpu(**a, x0=x0)  # by keyword too
    for s, k in zip(saved, kw):
        assert (s is None and k is None) or torch.equal(s, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_saved_x0_is_used(dtype):
    """With the images A and the saved x0 of other images B, the gradients that depend only on grad and x0
    (d_bias, d_pos, d_pn_*, d_ln_*) are those of B's own saved-x0 backward, bit for bit, and those that
    depend on x0 differ from A's: the backward reads x0 and does not recompute it."""
    a = make_case(2, 3, 32, 48, 16, 40, dtype, "x0_used")
    img_b = torch.randn(a["images"].shape, generator=_gen("x0_used_b", str(dtype)), dtype=torch.float64).to(dtype)
    _, x0_b = fwd_x0(a, img_b)
    mixed = _C.patch_embed_bwd_cpu(*[a[k] for k in ARG_NAMES], x0_b)
    of_b = _C.patch_embed_bwd_cpu(*[dict(a, images=img_b)[k] for k in ARG_NAMES], x0_b)
    of_a = call(a)
    for i in range(2, 8):
        assert torch.equal(mixed[i], of_b[i]), f"d_{OUT_NAMES[i]}"
    for i in range(2, 7):  # d_ln_bias is the sum of grad, whatever x0
        assert not torch.equal(mixed[i], of_a[i]), f"d_{OUT_NAMES[i]} did not change with x0"


def test_x0_not_read_without_layernorm():
    """With both LayerNorms off x0 is not needed: a NaN x0 changes nothing."""
    a = make_case(2, 3, 32, 48, 16, 40, torch.float32, "x0_nonorm", pn=None, ln=None)
    nan = torch.full((2 * 6, 40), float("nan"))
    for s, r in zip(_C.patch_embed_bwd_cpu(*[a[k] for k in ARG_NAMES], nan), call(a)):
        assert (s is None and r is None) or torch.equal(s, r)


def test_x0_bad_inputs_raise():
    a = make_case(2, 3, 32, 32, 16, 24, torch.float32, "x0_bad")
    M, D = 2 * 4, 24
    fwd = [a[k] for k in ARG_NAMES[1:15]]
    bad = [torch.zeros(M, D + 1), torch.zeros(M + 1, D), torch.zeros(M, D, dtype=torch.float64),
           torch.zeros(M, D, dtype=torch.bfloat16), torch.zeros(D, M).T, torch.zeros(M * D)]
    for t in bad:
        with pytest.raises((RuntimeError, ValueError), match="x0_out"):
            _C.patch_embed_fwd_cpu(*fwd, t)
        with pytest.raises((RuntimeError, ValueError), match="x0"):
            _C.patch_embed_bwd_cpu(*[a[k] for k in ARG_NAMES], t)
    b = make_case(2, 3, 32, 32, 16, 24, torch.float64, "x0_bad64")  # fp64 images: fp64 rows
    with pytest.raises((RuntimeError, ValueError), match="x0_out"):
        _C.patch_embed_fwd_cpu(*[b[k] for k in ARG_NAMES[1:15]], torch.zeros(M, D))
