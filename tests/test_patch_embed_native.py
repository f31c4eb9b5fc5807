"""Native CPU kernel of the patch stem: vlops._C.patch_embed_fwd_cpu, called with the positional arguments
of the kernel contract (docstring of vlops/ops/patch_embed.py) and compared with the contract's math in
float64 (written here with F.pad + F.unfold, independent of the kernel and of vlops.reference).

Bounds (DESIGN.md): relative error ||out - ref|| / ||ref|| over rows R0.. of <= 1e-5 in fp32, <= 1e-2 in
fp16 / bf16 (and no worse than 2x the same math done by eager PyTorch in that dtype) and <= 1e-10 in fp64.
The reference is evaluated on the inputs as given (already rounded to their dtype).
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch

from conftest import cpu_isa
import torch.nn.functional as F

_C = pytest.importorskip("vlops._C", reason="the compiled extension vlops._C is not built")
if not hasattr(_C, "patch_embed_fwd_cpu"):
    pytest.skip("vlops._C was built without the patch_embed kernel", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-10}
LOW = (torch.float16, torch.bfloat16)
SEED_BASE = int(os.environ.get("VLOPS_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))  # printed on failure
BM_ENV = "VLOPS_PATCH_EMBED_BM"  # the kernel's tile rows (tuning / test override)


def _gen(*salt) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr((SEED_BASE,) + salt).encode()))


def _cdt(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_case(B, C, H, W, P, D, dtype, *salt, bias=True, pos=True, pn=(True, True), ln=(True, True), scale=1.0):
    """The contract's arguments (dict). pn / ln: (weight given, bias given) or None for that norm off."""
    g = _gen(B, C, H, W, P, D, str(dtype), *salt)
    cdt = _cdt(dtype)
    Gh, Gw = -(-H // P), -(-W // P)
    K = C * P * P

    def rnd(*shape, s=1.0, off=0.0):
        return (off + s * torch.randn(*shape, generator=g, dtype=torch.float64)).to(cdt)

    a = dict(
        images=(scale * torch.randn(B, C, H, W, generator=g, dtype=torch.float64)).to(dtype),
        weight=(torch.randn(D, K, generator=g, dtype=torch.float64) / K ** 0.5).to(dtype),
        bias=rnd(D, s=0.5) if bias else None,
        pos=rnd(Gh * Gw, D, s=0.5) if pos else None,
        pn_weight=None, pn_bias=None, pn_eps=1e-5, use_pn=pn is not None,
        ln_weight=None, ln_bias=None, ln_eps=1e-6, use_ln=ln is not None,
        patch_size=P, prefix_tokens=1,
    )
    if pn is not None:
        a["pn_weight"] = rnd(D, s=0.3, off=1.0) if pn[0] else None
        a["pn_bias"] = rnd(D, s=0.3) if pn[1] else None
    if ln is not None:
        a["ln_weight"] = rnd(D, s=0.3, off=1.0) if ln[0] else None
        a["ln_bias"] = rnd(D, s=0.3) if ln[1] else None
    return a


ARG_NAMES = ["images", "weight", "bias", "pos", "pn_weight", "pn_bias", "pn_eps", "use_pn", "ln_weight", "ln_bias",
             "ln_eps", "use_ln", "patch_size", "prefix_tokens"]


def call(a):
    return _C.patch_embed_fwd_cpu(*[a[k] for k in ARG_NAMES])


def ref_math(a, ct=torch.float64):
    """The contract's math on the given inputs, in dtype ct (float64: the reference; the image dtype:
    "eager"). Returns the [B, Gh * Gw, D] patch rows."""
    x = a["images"].to(ct)
    B, C, H, W = x.shape
    P = a["patch_size"]
    Gh, Gw = -(-H // P), -(-W // P)
    x = F.pad(x, (0, Gw * P - W, 0, Gh * P - H))
    cols = F.unfold(x, P, stride=P).transpose(1, 2)  # [B, N, C * P * P], column (c * P + ph) * P + pw
    e = cols @ a["weight"].to(ct).T

    def cv(t):
        return None if t is None else t.to(ct)

    if a["bias"] is not None:
        e = e + cv(a["bias"])
    D = e.shape[-1]
    if a["use_pn"]:
        e = F.layer_norm(e, (D,), cv(a["pn_weight"]), cv(a["pn_bias"]), a["pn_eps"])
    if a["pos"] is not None:
        e = e + cv(a["pos"])
    if a["use_ln"]:
        e = F.layer_norm(e, (D,), cv(a["ln_weight"]), cv(a["ln_bias"]), a["ln_eps"])
    return e


def relerr(out, ref):
    out, ref = out.double(), ref.double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite output"
    den = ref.norm().item()
    return (out - ref).norm().item() / den if den > 0 else (out - ref).norm().item()


def check(a, out=None, eager=True):
    """Runs the kernel (unless `out` is given) and checks shape, dtype, layout and rows R0.. against the
    float64 math; returns the output."""
    if out is None:
        out = call(a)
    img = a["images"]
    B, _, H, W = img.shape
    P, R0, D = a["patch_size"], a["prefix_tokens"], a["weight"].shape[0]
    N = (-(-H // P)) * (-(-W // P))
    dtype = img.dtype
    assert out.shape == (B, R0 + N, D) and out.dtype == dtype and out.is_contiguous()
    ref = ref_math(a)
    err = relerr(out[:, R0:], ref)
    assert err <= TOL[dtype], f"relative error {err:.3e} > {TOL[dtype]:.0e} ({dtype}); seed {SEED_BASE}"
    if eager and dtype in LOW:
        e_err = relerr(ref_math(a, dtype), ref)
        assert err <= max(2 * e_err, 1e-6), f"error {err:.3e} > 2x eager {dtype} error {e_err:.3e}; seed {SEED_BASE}"
    return out


SHAPES = {
    # name: (B, C, H, W, P, D)
    "vit_b16_224": (2, 3, 224, 224, 16, 768),
    "vit_l14_336": (1, 3, 336, 336, 14, 1024),
    "odd_c1_28x42": (1, 1, 28, 42, 14, 100),
    "padded_30x45": (2, 3, 30, 45, 16, 64),
}


def over_shapes(shapes):
    """Parametrizes a test over ``shape`` (names of ``shapes``) and ``dtype`` (DTYPES); shared with the
    backward's tests."""
    def deco(fn):
        return pytest.mark.parametrize("dtype", DTYPES, ids=str)(pytest.mark.parametrize("shape", list(shapes), ids=str)(fn))
    return deco


@over_shapes(SHAPES)
def test_shapes(shape, dtype):
    """Every stage on (bias, LayerNorm 1, pos, LayerNorm 2), the usual stems and the odd ones."""
    check(make_case(*SHAPES[shape], dtype, "shapes"))


@over_shapes(SHAPES)
def test_plain_projection(shape, dtype):
    """The bare GEMM (no bias, pos or norms) and the timm / CLIP default (bias + pos)."""
    check(make_case(*SHAPES[shape], dtype, "plain", bias=False, pos=False, pn=None, ln=None))
    check(make_case(*SHAPES[shape], dtype, "bias_pos", pn=None, ln=None))


NORM_OPTS = [None, (True, True), (False, False), (True, False), (False, True)]


def over_stage_combinations(fn):
    """Parametrizes a test over bias x pos x patch norm x LayerNorm (off, or with / without weight and bias)
    x dtype; shared with the backward's tests."""
    marks = [
        pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str),
        pytest.mark.parametrize("ln", NORM_OPTS, ids=lambda o: "ln_off" if o is None else f"ln_w{int(o[0])}b{int(o[1])}"),
        pytest.mark.parametrize("pn", NORM_OPTS, ids=lambda o: "pn_off" if o is None else f"pn_w{int(o[0])}b{int(o[1])}"),
        pytest.mark.parametrize("pos", [False, True], ids=["nopos", "pos"]),
        pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"]),
    ]
    for m in marks:
        fn = m(fn)
    return fn


@over_stage_combinations
def test_every_stage_combination(bias, pos, pn, ln, dtype):
    """bias / pos present or absent, each LayerNorm off or on with its weight / bias present or None."""
    a = make_case(2, 3, 24, 40, 8, 48, dtype, "combo", bias, pos, str(pn), str(ln), bias=bias, pos=pos, pn=pn, ln=ln)
    check(a)


def test_norm_params_ignored_when_flag_off():
    """pn / ln weights given with use_pn / use_ln False are not applied."""
    a = make_case(2, 3, 32, 32, 8, 40, torch.float32, "ignored")
    a["use_pn"] = a["use_ln"] = False
    out = check(a)
    b = dict(a, pn_weight=None, pn_bias=None, ln_weight=None, ln_bias=None)
    assert torch.equal(call(b)[:, 1:], out[:, 1:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_prefix_tokens(prefix, dtype):
    a = make_case(3, 3, 48, 32, 16, 40, dtype, "prefix", prefix)
    a["prefix_tokens"] = prefix
    out = check(a)
    assert out.shape[1] == prefix + 6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layouts_identical(dtype):
    """channels_last, a strided slice, a channel slice and an expanded batch give the contiguous result."""
    a = make_case(2, 3, 45, 60, 16, 72, dtype, "layouts")
    base = check(a)[:, 1:]
    img = a["images"]
    g = _gen("big", str(dtype))
    big = torch.randn(2, 5, 100, 140, generator=g).to(dtype)
    big[:, 1:4, 7:52, 11:131:2] = img  # a slice with W stride 2 holding the same pixels
    layouts = {
        "channels_last": img.contiguous(memory_format=torch.channels_last),
        "slice": big[:, 1:4, 7:52, 11:131:2],
        "transposed_hw": img.transpose(2, 3).contiguous().transpose(2, 3),
    }
    assert not layouts["slice"].is_contiguous() and layouts["slice"].stride(3) == 2
    for name, im in layouts.items():
        assert torch.equal(im, img)
        out = call(dict(a, images=im))[:, 1:]
        assert torch.equal(out, base), name
    one = img[:1]
    exp = one.expand(3, -1, -1, -1)  # batch stride 0
    out = call(dict(a, images=exp))[:, 1:]
    ref_one = call(dict(a, images=one.contiguous()))[:, 1:]
    for b in range(3):
        assert torch.equal(out[b], ref_one[0])


def test_channel_slice_with_unit_w_stride():
    """A slice with W stride 1 but padded rows (the memcpy path on a non-contiguous image)."""
    a = make_case(2, 3, 40, 40, 8, 32, torch.float32, "rowpad")
    big = torch.zeros(2, 4, 50, 64)
    big[:, :3, 5:45, 10:50] = a["images"]
    im = big[:, :3, 5:45, 10:50]
    assert not im.is_contiguous() and im.stride(3) == 1
    assert torch.equal(call(dict(a, images=im))[:, 1:], call(a)[:, 1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_inputs_unchanged(dtype):
    a = make_case(2, 3, 32, 48, 16, 40, dtype, "unchanged")
    a["images"] = a["images"].contiguous(memory_format=torch.channels_last)
    tensors = {k: v for k, v in a.items() if isinstance(v, torch.Tensor)}
    copies = {k: (v.clone(), v.stride()) for k, v in tensors.items()}
    out = check(a)
    for k, v in tensors.items():
        assert torch.equal(v, copies[k][0]) and v.stride() == copies[k][1], k
    assert all(out.data_ptr() != v.data_ptr() for v in tensors.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("bm,B,H,W,P,prefix", [
    (7, 3, 24, 32, 8, 1),     # 12 patches per image, chunks of <= 7 rows (2 per image)
    (5, 2, 40, 40, 8, 0),     # 25 patches, chunks of 5 rows, R0 = 0
    (1, 2, 16, 24, 8, 2),     # one row per tile
    (64, 11, 16, 16, 8, 1),   # 4 patches: whole images grouped per tile (rows of several images), partial last tile
    (64, 11, 16, 16, 8, 0),   # the same with R0 = 0 (grouped rows contiguous in the output)
    (10, 7, 16, 24, 8, 3),    # 6 patches, BM / N = 1 image per tile
    (1000, 3, 48, 48, 8, 1),  # everything in one tile per image
])
def test_tiles(monkeypatch, bm, B, H, W, P, prefix, dtype):
    """More than one tile, partial tiles, tiles holding several images (VLOPS_PATCH_EMBED_BM sets BM)."""
    monkeypatch.setenv(BM_ENV, str(bm))
    a = make_case(B, 3, H, W, P, 40, dtype, "tiles", bm, prefix)
    a["prefix_tokens"] = prefix
    check(a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_default_tiles_many_images(dtype):
    """The default BM: 35 images of 196 patches (several tiles per thread, one image per tile) and 300
    images of 4 patches (64 images per tile, the last one partial)."""
    check(make_case(35, 3, 224, 224, 16, 24, dtype, "many", pn=None, ln=(True, True)), eager=False)
    check(make_case(300, 3, 32, 32, 16, 40, dtype, "small"), eager=False)


def test_thread_counts_and_determinism():
    a = make_case(5, 3, 64, 80, 16, 96, torch.float32, "threads")
    first = check(a)[:, 1:]
    assert torch.equal(call(a)[:, 1:], first)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = check(a)[:, 1:]
    finally:
        torch.set_num_threads(old)
    assert relerr(single, first) <= 1e-6


def check_isa(isa, check, make_case):
    """Every instruction-set path of a kernel (forward here, backward in the backward's tests): fp32 and bf16,
    D = 100 (vector body and tail) and D = 7 (tail only)."""
    if isa not in _C.cpu_isas_supported():
        pytest.skip(f"this CPU cannot run {isa}")
    with cpu_isa(isa):
        for dtype in (torch.float32, torch.bfloat16):
            check(make_case(2, 3, 30, 45, 16, 100, dtype, "isa", isa))
            check(make_case(2, 3, 32, 32, 8, 7, dtype, "isa_tiny", isa))


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_isas(isa):
    check_isa(isa, check, make_case)


def test_layernorm_two_pass_with_offset():
    """Rows whose mean is far from 0 (bias 60, spread ~1): E[x^2] - mean^2 in fp32 would lose ~4 digits."""
    a = make_case(2, 3, 32, 32, 8, 256, torch.float32, "offset", pn=(True, True), ln=(True, True))
    a["bias"] = a["bias"] + 60.0
    a["use_ln"] = False
    check(a)
    a = dict(a, use_pn=False, use_ln=True, pos=a["pos"] + 60.0)
    check(a)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_16bit_round_to_nearest_even(dtype):
    """The 16-bit output is the fp32 result rounded to nearest (even): it matches the float64 math rounded
    to the dtype except where that lands within fp32 rounding of a tie (never by truncation)."""
    a = make_case(4, 3, 64, 64, 16, 128, dtype, "rne", pn=None)
    out = call(a)[:, 1:]
    ref = ref_math(a)
    exact = ref.to(dtype)
    frac = (out != exact).double().mean().item()
    assert frac < 0.01, f"{frac:.3%} of the outputs differ from the correctly rounded value"
    # within half an ulp of the float64 value, plus the fp32 accumulation error (absolute: near-zero
    # outputs come from cancelling sums of O(1) terms)
    half_ulp = 0.5 * torch.finfo(dtype).eps * ref.abs()
    assert ((out.double() - ref).abs() <= half_ulp + 1e-6).all()


def test_large_image_values_and_requires_grad():
    a = make_case(2, 3, 32, 32, 16, 64, torch.float32, "big", scale=1e4)
    a["weight"] = a["weight"].requires_grad_()
    a["bias"] = a["bias"].requires_grad_()
    out = check(a)
    assert not out.requires_grad


def test_empty_and_degenerate():
    a = make_case(2, 3, 32, 32, 16, 24, torch.float32, "empty")
    out = call(dict(a, images=a["images"][:0]))
    assert out.shape == (0, 5, 24)
    small = make_case(2, 3, 10, 7, 16, 24, torch.float32, "small")  # smaller than one patch: one padded patch
    assert call(small).shape == (2, 2, 24)
    check(small)
    empty_hw = dict(small, images=torch.randn(2, 3, 0, 7), pos=None)
    assert call(empty_hw).shape == (2, 1, 24)
    check(make_case(1, 3, 16, 16, 16, 24, torch.float32, "one"))  # a single patch, with both norms
    no_channels = dict(small, images=torch.randn(2, 0, 10, 7), weight=torch.randn(24, 0), pos=None, use_pn=False,
                       use_ln=False)
    out = call(no_channels)  # K = 0: every patch row is the bias
    assert torch.equal(out[:, 1:], small["bias"].expand(2, 1, 24))


def test_bad_inputs_raise():
    a = make_case(2, 3, 32, 32, 16, 24, torch.float32, "bad")
    call(a)  # the good case runs
    D = 24
    bad = [
        ("images", a["images"].to(torch.int32)),
        ("images", a["images"][0]),  # 3-D
        ("images", torch.empty(2, 3, 32, 32, device="meta")),
        ("weight", a["weight"].double()),  # dtype mismatch
        ("weight", a["weight"][:, :-1]),  # wrong K
        ("weight", a["weight"].reshape(D, 3, 16, 16)),  # 4-D (the conv weight)
        ("weight", torch.randn(768, D).T),  # non-contiguous
        ("bias", torch.randn(D + 1)),
        ("bias", torch.randn(D, dtype=torch.float64)),
        ("bias", torch.randn(2 * D)[::2]),  # non-contiguous
        ("pos", torch.randn(5, D)),  # [N, D] = [4, 24]
        ("pos", torch.randn(1, 4, D)),
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
    # 16-bit images need float32 parameters (the compute dtype)
    h = make_case(1, 3, 16, 16, 16, D, torch.float16, "bad16")
    with pytest.raises((RuntimeError, ValueError), match="bias"):
        call(dict(h, bias=h["bias"].half()))
    with pytest.raises((RuntimeError, ValueError), match="weight"):
        call(dict(h, weight=h["weight"].float()))
    # eps is only checked when its norm is on
    call(dict(a, use_pn=False, pn_eps=-1.0))


@pytest.mark.parametrize("dtype", [torch.float32], ids=str)
def test_all_rows_written(dtype):
    """Rows R0.. are written for every image even when the allocator hands back memory full of NaN."""
    a = make_case(3, 3, 48, 48, 16, 40, dtype, "poison")
    for _ in range(3):
        junk = torch.full((3, 2 + 9, 40), float("nan"), dtype=dtype)
        del junk
        a["prefix_tokens"] = 2
        check(a)


def test_argument_names():
    """Keyword names are the contract's."""
    a = make_case(1, 3, 16, 16, 8, 16, torch.float32, "kw")
    out = _C.patch_embed_fwd_cpu(**a)
    assert torch.equal(out[:, 1:], call(a)[:, 1:])


def test_vit_b16_against_conv_stem():
    """The contract's column order is conv_weight.reshape(D, -1): equal to timm's conv stem."""
    g = _gen("conv")
    x = torch.randn(2, 3, 64, 48, generator=g, dtype=torch.float64)
    w4 = torch.randn(32, 3, 16, 16, generator=g, dtype=torch.float64) / 28
    b = torch.randn(32, generator=g, dtype=torch.float64)
    out = _C.patch_embed_fwd_cpu(x, w4.reshape(32, -1).contiguous(), b, None, None, None, 0.0, False, None, None,
                                 0.0, False, 16, 0)
    conv = F.conv2d(x, w4, b, stride=16).flatten(2).transpose(1, 2)
    assert relerr(out, conv) <= 1e-12
