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

from conftest import cpu_isa
from test_patch_embed_native import BM_ENV, DTYPES, NORM_OPTS, SEED_BASE, TOL, _cdt, _gen  # shared with the forward

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


def relerr(out, ref):
    out, ref = out.double(), ref.double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite output"
    den = ref.norm().item()
    return (out - ref).norm().item() / den if den > 0 else (out - ref).norm().item()


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


SHAPES = {
    # name: (B, C, H, W, P, D)
    "vit_b16_224": (2, 3, 224, 224, 16, 768),
    "odd_c1_28x42": (1, 1, 28, 42, 14, 100),
    "padded_30x45": (2, 3, 30, 45, 16, 64),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
def test_shapes(shape, dtype):
    check(make_case(*SHAPES[shape], dtype, "shapes"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
def test_plain_projection(shape, dtype):
    check(make_case(*SHAPES[shape], dtype, "plain", bias=False, pos=False, pn=None, ln=None))
    check(make_case(*SHAPES[shape], dtype, "bias_pos", pn=None, ln=None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("ln", NORM_OPTS, ids=lambda o: "ln_off" if o is None else f"ln_w{int(o[0])}b{int(o[1])}")
@pytest.mark.parametrize("pn", NORM_OPTS, ids=lambda o: "pn_off" if o is None else f"pn_w{int(o[0])}b{int(o[1])}")
@pytest.mark.parametrize("pos", [False, True], ids=["nopos", "pos"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
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
    if isa not in _C.cpu_isas_supported():
        pytest.skip(f"this CPU cannot run {isa}")
    with cpu_isa(isa):
        for dtype in (torch.float32, torch.bfloat16):
            check(make_case(2, 3, 30, 45, 16, 100, dtype, "isa", isa))  # D = 100: vector body and tail
            check(make_case(2, 3, 32, 32, 8, 7, dtype, "isa_tiny", isa))  # D < 16: tail only


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
