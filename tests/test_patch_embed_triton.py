"""The Triton patch stem (kernels/patch_embed.py) against float64 math of the kernel contract.

Without a GPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``) on CPU tensors,
in a subprocess (``python tests/test_patch_embed_triton.py --worker cpu OUT.json SEED``) started once
per pytest session with the variable in its environment only, for the reasons given in
tests/test_diffusion_triton.py; this module imports neither triton nor the kernels. On a machine with
a CUDA GPU the same worker also runs compiled (``test_gpu_*``), with the interpreter cases plus a few
full-size ViT / CLIP stems at the default tiles (``gpu_only``).

Each case draws fresh images [B, C, H, W] (contiguous, channels_last, or a strided slice of a larger
tensor), ``weight`` [D, C P P] in the images' dtype and the fp32 parameters (bias, pos, the two
LayerNorms' weight / bias, each present or None), runs ``patch_embed_fwd`` into an output poisoned
with NaN (or, where the case says so, into the output it allocates itself) and compares rows
``R0 ..`` with the contract computed here in float64 from the same (dtype-rounded) inputs: zero
padding to ``Gh P x Gw P``, the patches by reshape / permute, the GEMM, + bias, LN1, + pos, LN2.
Bounds, relative error ``||out - ref|| / ||ref||``: fp32 1e-5 (interpreter: exact fp32 dots; GPU:
tf32x3), bf16 / fp16 1e-2 and at most twice the error of the float64 result rounded to that dtype.
Also checked: rows ``0 .. R0 - 1`` still NaN (unwritten), inputs unchanged, a strided image giving
bit-for-bit the result of its contiguous copy, and bad arguments raising ValueError naming the
argument. Every forward case runs a second time with ``x0_out`` (a NaN-poisoned fp32 [B Gh Gw, D]):
the tokens must be the same bits and ``x0_out`` the float64 pre-norm rows W p + bias within 1e-5.
Every backward case with a LayerNorm on runs a second time with the forward's saved ``x0`` (the path
that skips the recompute GEMM): each gradient within the bound of float64, the same bits as the
recompute path (the same GEMM kernel made both x0), and ``x0`` left unmodified. The compiled-for-Hopper
check (wgmma, no spills, shared memory) is tests/test_aot_sm90.py, which collects
``kernels/patch_embed.py``'s ``AOT_SPECS``.
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

TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}  # interpreter and GPU (tf32x3 for fp32)
AFFINES = ("wb", "w", "b", "")  # which of a LayerNorm's weight / bias are given ("" = neither)


# --------------------------------------------------------------------------------------------
# The cases (plain data: collected without importing torch / triton)

def _cases() -> list[dict]:
    cases = []

    def add(**kw):
        c = dict(dtype="float32", B=2, C=3, H=8, W=12, P=4, D=40, R0=1, bias=True, pos=True, pn=None, ln=None,
                 layout="contig", blocks=None, poison=True, gpu_only=False)
        c.update(kw)
        norm = lambda tag, v: "" if v is None else f"-{tag}[{v}]"  # noqa: E731
        c["id"] = (f"{c['dtype'].replace('float', 'f')}-B{c['B']}C{c['C']}H{c['H']}W{c['W']}P{c['P']}D{c['D']}"
                   f"R{c['R0']}" + ("-bias" if c["bias"] else "") + ("-pos" if c["pos"] else "")
                   + norm("pn", c["pn"]) + norm("ln", c["ln"])
                   + (f"-{c['layout']}" if c["layout"] != "contig" else "")
                   + ("-blk" + "_".join(f"{v}" for v in c["blocks"].values()) if c["blocks"] else "")
                   + ("" if c["poison"] else "-alloc"))
        cases.append(c)

    # several M, N and K tiles, partial ones: BLOCK_M = BLOCK_N = BLOCK_K = 16 (the smallest tl.dot);
    # ROWS 4 / 16 token rows per norm program (16: a partial last program)
    small = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "ROWS": 4}
    small16 = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "ROWS": 16}
    # (B, C, H, W, P): M = B Gh Gw, K = C P P. 8x12 / P 4: 6 patches; 10x13: 3x4 grid, zero padding;
    # 8x12 / P 2: 24 patches, K = 8; 7x9 / P 2: 4x5 grid, padding; 3x5 / P 4: H < P
    geoms = [(2, 3, 8, 12, 4), (2, 3, 10, 13, 4), (2, 2, 8, 12, 2), (1, 3, 7, 9, 2), (2, 1, 3, 5, 4)]
    ds = (16, 40, 100)
    r0s = (0, 1, 5)
    # fp32: every combination of bias / pos / use_pn / use_ln, the LayerNorm affines rotated through
    i = 0
    for bias in (False, True):
        for pos in (False, True):
            for pn in (False, True):
                for ln in (False, True):
                    B, C, H, W, P = geoms[i % len(geoms)]
                    add(B=B, C=C, H=H, W=W, P=P, D=ds[i % 3], R0=r0s[i % 3], bias=bias, pos=pos,
                        pn=AFFINES[i % 4] if pn else None, ln=AFFINES[(i + 1) % 4] if ln else None,
                        blocks=(small, small16, None)[i % 3] if i % 5 != 4 else None)
                    i += 1
    # 16-bit images: one pass and with the LayerNorms (fp32 scratch), padding, several tiles
    for dt in ("bfloat16", "float16"):
        add(dtype=dt, D=40, R0=1, blocks=small)
        add(dtype=dt, B=2, C=3, H=10, W=13, P=4, D=100, R0=5, pn="wb", ln="b", blocks=small16)
        add(dtype=dt, B=1, C=2, H=8, W=12, P=2, D=16, R0=0, bias=False, ln="wb")
        add(dtype=dt, B=2, C=1, H=7, W=9, P=2, D=40, R0=1, pos=False, pn="", blocks=small)
    # image layouts: channels_last and a strided slice (compared with the contiguous copy as well)
    for dt, layout in (("float32", "channels_last"), ("bfloat16", "channels_last"), ("float32", "slice"),
                       ("float16", "slice"), ("bfloat16", "slice")):
        add(dtype=dt, B=2, C=3, H=10, W=13, P=4, D=40, R0=1, ln="wb", layout=layout, blocks=small)
        add(dtype=dt, B=2, C=2, H=8, W=12, P=2, D=16, R0=0, layout=layout)
    # the output the launcher allocates; a single patch (M = 1); D = 1
    add(poison=False, pn="wb", ln="wb", blocks=small)
    add(dtype="bfloat16", poison=False, R0=0)
    add(B=1, C=3, H=4, W=4, P=4, D=100, R0=1, ln="wb")
    add(B=2, C=1, H=4, W=4, P=2, D=1, R0=1, ln="b")
    # GPU only: full-size stems at the default tiles
    g = dict(gpu_only=True, B=2, C=3, H=224, W=224)
    add(dtype="bfloat16", P=16, D=768, R0=1, **g)  # timm ViT-B/16: one pass
    add(dtype="float32", P=16, D=768, R0=1, **g)
    add(dtype="float16", P=16, D=768, R0=1, pn="wb", ln="wb", **g)
    add(dtype="bfloat16", P=14, D=1024, R0=1, bias=False, ln="wb", **g)  # open_clip ViT-L/14: ln_pre
    add(dtype="float32", P=14, D=1024, R0=1, bias=False, ln="wb", **g)
    add(dtype="bfloat16", P=16, D=768, R0=5, ln="wb", layout="channels_last", **g)
    add(dtype="float16", B=3, H=230, W=221, P=16, D=768, R0=0, gpu_only=True)  # dynamic_img_pad
    add(dtype="float32", B=2, H=230, W=221, P=14, D=1024, R0=1, ln="wb", layout="slice", gpu_only=True)
    return cases


CASES = _cases()
assert len({c["id"] for c in CASES}) == len(CASES), "case ids must be unique"
INTERP_CASES = [c for c in CASES if not c["gpu_only"]]


def _bwd_cases() -> list[dict]:
    """Backward cases (``patch_embed_bwd``): every output against float64 autograd of the contract's math."""
    cases = []

    def add(**kw):
        c = dict(dtype="float32", grad_dtype=None, B=2, C=3, H=8, W=12, P=4, D=40, R0=1, bias=True, pos=True,
                 pn=None, ln=None, need_images=True, layout="contig", blocks=None, twice=False, gpu_only=False)
        c.update(kw)
        norm = lambda tag, v: "" if v is None else f"-{tag}[{v}]"  # noqa: E731
        c["id"] = ("bwd-" + c["dtype"].replace("float", "f")
                   + (f"-g{c['grad_dtype'].replace('float', 'f')}" if c["grad_dtype"] else "")
                   + f"-B{c['B']}C{c['C']}H{c['H']}W{c['W']}P{c['P']}D{c['D']}R{c['R0']}"
                   + ("-bias" if c["bias"] else "") + ("-pos" if c["pos"] else "")
                   + norm("pn", c["pn"]) + norm("ln", c["ln"]) + ("-dimg" if c["need_images"] else "")
                   + (f"-{c['layout']}" if c["layout"] != "contig" else "")
                   + ("-blk" + "_".join(f"{v}" for v in c["blocks"].values()) if c["blocks"] else ""))
        cases.append(c)

    # BLOCK_* 16: several tiles of every GEMM; ROWS 4 / 16; BCHUNK 2: two images per row-kernel program;
    # SPLIT_M 16 / 32: several d_weight splits
    small = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "ROWS": 4, "BCHUNK": 2, "SPLIT_M": 16}
    small16 = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "ROWS": 16, "SPLIT_M": 32}
    geoms = [(3, 3, 8, 12, 4), (2, 3, 10, 13, 4), (2, 2, 8, 12, 2), (1, 3, 7, 9, 2), (3, 1, 3, 5, 4)]
    ds, r0s = (16, 40, 100), (0, 1, 5)
    i = 0
    for bias in (False, True):
        for pos in (False, True):
            for pn in (False, True):
                for ln in (False, True):
                    B, C, H, W, P = geoms[i % len(geoms)]
                    add(B=B, C=C, H=H, W=W, P=P, D=ds[i % 3], R0=r0s[i % 3], bias=bias, pos=pos,
                        pn=AFFINES[i % 4] if pn else None, ln=AFFINES[(i + 1) % 4] if ln else None,
                        need_images=i % 2 == 0, blocks=(small, small16, None)[i % 3] if i % 5 != 4 else None)
                    i += 1
    for dt in ("bfloat16", "float16"):
        add(dtype=dt, D=40, R0=1, blocks=small)
        add(dtype=dt, B=2, C=3, H=10, W=13, P=4, D=100, R0=5, pn="wb", ln="wb", blocks=small16)
        add(dtype=dt, B=3, C=2, H=7, W=9, P=2, D=16, R0=0, bias=False, ln="b", need_images=False, blocks=small)
    add(dtype="bfloat16", grad_dtype="float32", B=2, C=3, H=10, W=13, P=4, D=40, R0=1, pn="w", ln="wb", blocks=small)
    for dt, layout in (("float32", "channels_last"), ("bfloat16", "channels_last"), ("float32", "slice"),
                       ("bfloat16", "slice")):
        add(dtype=dt, B=2, C=3, H=10, W=13, P=4, D=40, R0=1, ln="wb", layout=layout, blocks=small)
    add(B=3, C=3, H=10, W=13, P=4, D=40, R0=5, pn="wb", ln="wb", blocks=small, twice=True)  # deterministic
    add(B=1, C=3, H=4, W=4, P=4, D=100, R0=1, ln="wb")  # one patch
    # GPU only: full-size stems at the default tiles
    g = dict(gpu_only=True, B=2, C=3, H=224, W=224)
    add(dtype="bfloat16", P=16, D=768, R0=1, **g)
    add(dtype="float32", P=14, D=1024, R0=1, bias=False, ln="wb", **g)
    add(dtype="float16", P=16, D=768, R0=1, pn="wb", ln="wb", layout="channels_last", **g)
    add(dtype="bfloat16", B=3, H=230, W=221, P=14, D=1024, R0=1, ln="wb", layout="slice", gpu_only=True)
    return cases


BWD_CASES = _bwd_cases()
assert len({c["id"] for c in BWD_CASES}) == len(BWD_CASES), "backward case ids must be unique"
INTERP_BWD_CASES = [c for c in BWD_CASES if not c["gpu_only"]]


# --------------------------------------------------------------------------------------------
# worker (runs in the subprocess)

def _load_kernel_module():
    return importlib.import_module("vlops.kernels.patch_embed")  # the installed package (kernels/ -> vlops.kernels)


def _rel(torch, out, ref):
    out = out.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return (out - ref).norm().item() / max(ref.norm().item(), 1e-30)


def _images(torch, c, gen, device):
    """images of the case's layout (on device) and its contiguous copy."""
    dt = getattr(torch, c["dtype"])
    B, C, H, W = c["B"], c["C"], c["H"], c["W"]
    if c["layout"] == "slice":
        # every other column of a wider image, channels and rows offset: strides (C' H' W', H' W', W', 2)
        big = torch.randn(B, C + 1, H + 3, 2 * W + 1, generator=gen).to(dt).to(device)
        img = big[:, 1:, 2:H + 2, 1::2]
        assert not img.is_contiguous() and tuple(img.shape) == (B, C, H, W)
    else:
        img = torch.randn(B, C, H, W, generator=gen).to(dt).to(device)
        if c["layout"] == "channels_last":
            img = img.contiguous(memory_format=torch.channels_last)
            assert not img.is_contiguous()
    return img, img.contiguous()


def _layer_norm64(torch, x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased
    y = (x - mean) / torch.sqrt(var + eps)
    if w is not None:
        y = y * w.double()
    if b is not None:
        y = y + b.double()
    return y


def _reference(torch, img, weight, bias, pos, pn, ln, P):
    """The contract in float64: patch rows [B, Gh Gw, D]."""
    import torch.nn.functional as F

    B, C, H, W = img.shape
    D = weight.shape[0]
    Gh, Gw = -(-H // P), -(-W // P)
    x = F.pad(img.double().cpu(), (0, Gw * P - W, 0, Gh * P - H))
    patches = x.reshape(B, C, Gh, P, Gw, P).permute(0, 2, 4, 1, 3, 5).reshape(B, Gh * Gw, C * P * P)
    e = patches @ weight.double().cpu().T
    if bias is not None:
        e = e + bias.double().cpu()
    if pn is not None:
        e = _layer_norm64(torch, e, *(None if t is None else t.cpu() for t in pn[:2]), pn[2])
    if pos is not None:
        e = e + pos.double().cpu()
    if ln is not None:
        e = _layer_norm64(torch, e, *(None if t is None else t.cpu() for t in ln[:2]), ln[2])
    assert e.shape == (B, Gh * Gw, D)
    return e


def _run_case(torch, k, c, gen, device):
    dt = getattr(torch, c["dtype"])
    B, C, H, W, P, D, R0 = c["B"], c["C"], c["H"], c["W"], c["P"], c["D"], c["R0"]
    Gh, Gw = -(-H // P), -(-W // P)
    K = C * P * P
    f32 = dict(dtype=torch.float32)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, **f32) * scale).to(device)  # noqa: E731
    img, img_c = _images(torch, c, gen, device)
    weight = (torch.randn(D, K, generator=gen) / K ** 0.5).to(dt).to(device)
    bias = rnd(D, scale=0.5) if c["bias"] else None
    pos = rnd(Gh * Gw, D, scale=0.5) if c["pos"] else None

    def norm(spec):
        if spec is None:
            return None
        eps = float(10 ** torch.empty(1).uniform_(-6, -4, generator=gen))
        w = (1.0 + rnd(D, scale=0.3)) if "w" in spec else None
        b = rnd(D, scale=0.3) if "b" in spec else None
        return w, b, eps

    pn, ln = norm(c["pn"]), norm(c["ln"])
    args = (weight, bias, pos, *(pn or (None, None, 1e-5)), pn is not None, *(ln or (None, None, 1e-5)),
            ln is not None, P, R0)
    inputs = [t for t in (img, weight, bias, pos, *(pn or ())[:2], *(ln or ())[:2]) if isinstance(t, torch.Tensor)]
    before = [t.clone() for t in inputs]
    T = R0 + Gh * Gw

    def launch(images):
        o = torch.full((B, T, D), float("nan"), dtype=dt, device=device) if c["poison"] else None
        return k.patch_embed_fwd(images, *args, out=o, blocks=c["blocks"])

    t0 = time.perf_counter()
    out = launch(img)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0

    ref = _reference(torch, img, weight, bias, pos, pn, ln, P)
    res = {"id": c["id"], "dtype": c["dtype"], "time_s": elapsed,
           "inputs_unchanged": all(torch.equal(a, b) for a, b in zip(before, inputs)),
           "shape_ok": tuple(out.shape) == (B, T, D) and out.dtype == dt and out.is_contiguous()
           and out.device == img.device}
    rows = out[:, R0:]
    res["nonfinite"] = int((~torch.isfinite(rows)).sum())
    res["prefix_unwritten"] = bool(torch.isnan(out[:, :R0]).all()) if c["poison"] else True
    res["err"] = _rel(torch, rows, ref)
    res["err_rounded"] = _rel(torch, ref.to(dt), ref)  # the float64 result rounded to the dtype
    if c["layout"] != "contig":
        res["same_as_contiguous"] = bool(torch.equal(launch(img_c)[:, R0:], rows))
    # again with x0_out (positional, after prefix_tokens): the same tokens, and the pre-norm rows W p + bias
    x0 = torch.full((B * Gh * Gw, D), float("nan"), dtype=torch.float32, device=device)
    o = torch.full((B, T, D), float("nan"), dtype=dt, device=device)
    out2 = k.patch_embed_fwd(img, *args, x0, out=o, blocks=c["blocks"])
    res["x0_same_out"] = bool(torch.equal(out2[:, R0:], rows))
    res["x0_nonfinite"] = int((~torch.isfinite(x0)).sum())
    res["x0_err"] = _rel(torch, x0, _reference(torch, img, weight, bias, None, None, None, P).reshape(-1, D))
    return res


BWD_NAMES = ("d_images", "d_weight", "d_bias", "d_pos", "d_pn_weight", "d_pn_bias", "d_ln_weight", "d_ln_bias")


def _run_bwd_case(torch, k, c, gen, device):
    dt = getattr(torch, c["dtype"])
    gdt = getattr(torch, c["grad_dtype"] or c["dtype"])
    B, C, H, W, P, D, R0 = c["B"], c["C"], c["H"], c["W"], c["P"], c["D"], c["R0"]
    Gh, Gw = -(-H // P), -(-W // P)
    K = C * P * P
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(device)  # noqa: E731
    img, img_c = _images(torch, c, gen, device)
    weight = (torch.randn(D, K, generator=gen) / K ** 0.5).to(dt).to(device)
    bias = rnd(D, scale=0.5) if c["bias"] else None
    pos = rnd(Gh * Gw, D, scale=0.5) if c["pos"] else None

    def norm(spec):
        if spec is None:
            return None
        eps = float(10 ** torch.empty(1).uniform_(-6, -4, generator=gen))
        return ((1.0 + rnd(D, scale=0.3)) if "w" in spec else None, rnd(D, scale=0.3) if "b" in spec else None, eps)

    pn, ln = norm(c["pn"]), norm(c["ln"])
    T = R0 + Gh * Gw
    grad = torch.randn(B, T, D, generator=gen).to(gdt).to(device)
    grad[:, :R0] = float("nan")  # the prefix rows' gradient is the caller's: never read
    need = c["need_images"]
    args = (weight, bias, pos, *(pn or (None, None, 1e-5)), pn is not None, *(ln or (None, None, 1e-5)),
            ln is not None, P, R0, need)
    inputs = [t for t in (grad, img, weight, bias, pos, *(pn or ())[:2], *(ln or ())[:2])
              if isinstance(t, torch.Tensor)]
    before = [t.clone() for t in inputs]
    t0 = time.perf_counter()
    outs = k.patch_embed_bwd(grad, img, *args, blocks=c["blocks"])
    if device == "cuda":
        torch.cuda.synchronize()
    same = lambda a, b: bool(((a == b) | (a.isnan() & b.isnan())).all())  # noqa: E731 - NaN prefix rows of grad
    res = {"id": c["id"], "dtype": c["dtype"], "time_s": time.perf_counter() - t0,
           "inputs_unchanged": all(same(a, b) for a, b in zip(before, inputs))}
    # float64 autograd of the contract's math, from the same (dtype-rounded) inputs
    leaf = lambda t: None if t is None else t.detach().double().cpu().requires_grad_()  # noqa: E731
    img64, w64, b64, pos64 = leaf(img), leaf(weight), leaf(bias), leaf(pos)
    pn64 = None if pn is None else (leaf(pn[0]), leaf(pn[1]), pn[2])
    ln64 = None if ln is None else (leaf(ln[0]), leaf(ln[1]), ln[2])
    rows = _reference(torch, img64, w64, b64, pos64, pn64, ln64, P)
    rows.backward(grad[:, R0:].double().cpu())
    refs = (img64 if need else None, w64, b64, pos64, *(pn64[:2] if pn64 else (None, None)),
            *(ln64[:2] if ln64 else (None, None)))
    shapes = ((B, C, H, W), (D, K), (D,), (Gh * Gw, D), (D,), (D,), (D,), (D,))
    res["outputs"] = {}
    for name, o, r, shape in zip(BWD_NAMES, outs, refs, shapes):
        if r is None:
            res["outputs"][name] = {"none_ok": o is None}
            continue
        if o is None:
            res["outputs"][name] = {"none_ok": False}
            continue
        res["outputs"][name] = {
            "none_ok": True,
            "shape_ok": tuple(o.shape) == shape and o.dtype == torch.float32 and o.is_contiguous()
            and o.device == img.device,
            "nonfinite": int((~torch.isfinite(o)).sum()),
            "err": _rel(torch, o, r.grad),
        }
    if c["layout"] != "contig" or c["twice"]:
        again = k.patch_embed_bwd(grad, img_c if c["layout"] != "contig" else img, *args, blocks=c["blocks"])
        res["same_as_contiguous"] = all((a is None and b is None) or torch.equal(a, b) for a, b in zip(outs, again))
    if pn is not None or ln is not None:  # the saved-x0 path: x0 from the forward, no recompute GEMM
        x0 = torch.full((B * Gh * Gw, D), float("nan"), dtype=torch.float32, device=device)
        k.patch_embed_fwd(img, *args[:-1], x0, blocks=c["blocks"])
        x0_before = x0.clone()
        saved = k.patch_embed_bwd(grad, img, *args, x0, blocks=c["blocks"])
        res["x0_unchanged"] = bool(torch.equal(x0, x0_before))
        res["saved_same_bits"] = all((a is None and b is None)
                                     or (a is not None and b is not None and torch.equal(a, b))
                                     for a, b in zip(outs, saved))
        res["saved_outputs"] = {}
        for name, o, r in zip(BWD_NAMES, saved, refs):
            if r is None:
                res["saved_outputs"][name] = {"none_ok": o is None}
            elif o is None:
                res["saved_outputs"][name] = {"none_ok": False}
            else:
                res["saved_outputs"][name] = {"none_ok": True, "nonfinite": int((~torch.isfinite(o)).sum()),
                                              "err": _rel(torch, o, r.grad)}
    return res


def _x0_used_check(torch, k, device):
    """The backward takes the LayerNorm statistics from the ``x0`` it is given, not from a recompute: with
    images A and the saved x0 of other images B, the gradients that depend only on grad and x0 (d_bias, d_pos,
    d_pn_*, d_ln_*) are those of images B (the same bits), and those that depend on x0 differ from A's."""
    gen = torch.Generator().manual_seed(7)
    B, C, H, W, P, D, R0 = 2, 3, 8, 12, 4, 40, 1
    N = (H // P) * (W // P)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    img_a, img_b = rnd(B, C, H, W), rnd(B, C, H, W)
    w = rnd(D, C * P * P) / (C * P * P) ** 0.5
    args = (w, rnd(D), rnd(N, D), 1 + 0.3 * rnd(D), rnd(D), 1e-5, True, 1 + 0.3 * rnd(D), rnd(D), 1e-6, True, P, R0)
    grad = rnd(B, R0 + N, D)
    x0_b = torch.full((B * N, D), float("nan"), device=device)
    k.patch_embed_fwd(img_b, *args, x0_b)
    mixed = k.patch_embed_bwd(grad, img_a, *args, False, x0_b)
    of_b = k.patch_embed_bwd(grad, img_b, *args, False)
    of_a = k.patch_embed_bwd(grad, img_a, *args, False)
    # d_bias, d_pos, d_pn_weight, d_pn_bias, d_ln_weight depend on x0; d_ln_bias (the sum of grad) does not
    return {"same_as_b": all(torch.equal(mixed[i], of_b[i]) for i in range(2, 8)),
            "differs_from_a": all(not torch.equal(mixed[i], of_a[i]) for i in range(2, 7))}


def _bad_bwd_checks(torch, k, device):
    B, C, H, W, P, D = 2, 3, 8, 12, 4, 16
    K, N = C * P * P, (H // P) * (W // P)
    img = torch.randn(B, C, H, W, device=device)
    w = torch.randn(D, K, device=device)
    vec = torch.randn(D, device=device)
    grad = torch.randn(B, N + 1, D, device=device)

    def call(**kw):
        a = dict(grad=grad, images=img, weight=w, bias=vec, pos=None, pn_weight=None, pn_bias=None, pn_eps=1e-5,
                 use_pn=False, ln_weight=vec, ln_bias=vec, ln_eps=1e-6, use_ln=True, patch_size=P, prefix_tokens=1,
                 need_images=True, x0=None)
        a.update(kw)
        return lambda: k.patch_embed_bwd(*a.values())

    bad = [
        ("grad-shape", "grad", call(grad=torch.randn(B, N, D, device=device))),
        ("grad-dtype", "grad", call(grad=grad.half())),
        ("grad-contiguous", "grad", call(grad=torch.randn(B, D, N + 1, device=device).transpose(1, 2))),
        ("grad-type", "grad", call(grad=None)),
        ("need_images", "need_images", call(need_images=1)),
        ("weight-shape", "weight", call(weight=torch.randn(D, K + 1, device=device))),
        ("ln_bias-dtype", "ln_bias", call(ln_bias=vec.double())),
        ("prefix_tokens", "prefix_tokens", call(prefix_tokens=-1)),
        ("x0-shape", "x0", call(x0=torch.zeros(B * N, D + 1, device=device))),
        ("x0-dtype", "x0", call(x0=torch.zeros(B * N, D, device=device, dtype=torch.float16))),
        ("x0-contiguous", "x0", call(x0=torch.zeros(D, B * N, device=device).T)),
    ]
    out = []
    try:  # an empty batch: zero gradients, nothing launched
        o = k.patch_embed_bwd(grad[:0], img[:0], w, vec, None, None, None, 1e-5, False, vec, None, 1e-6, True, P, 1,
                              True)
        ok = (tuple(o[0].shape) == (0, C, H, W) and tuple(o[1].shape) == (D, K) and not o[1].any()
              and not o[2].any() and o[3] is None and o[4] is None and o[5] is None and not o[6].any()
              and o[7] is None)
        out.append({"id": "bwd-empty-batch", "ok": ok, "msg": f"got {[None if t is None else tuple(t.shape) for t in o]}"})
    except Exception as e:  # noqa: BLE001
        out.append({"id": "bwd-empty-batch", "ok": False, "msg": repr(e)})
    from triton_worker import bad_input_results

    return out + bad_input_results(bad, prefix="bwd-bad")


def _bad_input_checks(torch, k, device):
    B, C, H, W, P, D = 2, 3, 8, 12, 4, 16
    K, N = C * P * P, (H // P) * (W // P)
    img = torch.randn(B, C, H, W, device=device)
    w = torch.randn(D, K, device=device)
    vec = torch.randn(D, device=device)
    pos = torch.randn(N, D, device=device)

    def call(**kw):
        a = dict(images=img, weight=w, bias=vec, pos=pos, pn_weight=vec, pn_bias=vec, pn_eps=1e-5, use_pn=True,
                 ln_weight=vec, ln_bias=vec, ln_eps=1e-6, use_ln=True, patch_size=P, prefix_tokens=1, x0_out=None)
        out = kw.pop("out", None)
        a.update(kw)
        return lambda: k.patch_embed_fwd(*a.values(), out=out)

    bad = [
        ("images-3d", "images", call(images=img[0])),
        ("images-dtype", "images", call(images=img.double(), weight=w.double())),
        ("weight-shape", "weight", call(weight=torch.randn(D, K + 1, device=device))),
        ("weight-dtype", "weight", call(weight=w.half())),
        ("weight-contiguous", "weight", call(weight=torch.randn(K, D, device=device).T)),
        ("bias-shape", "bias", call(bias=torch.randn(D + 1, device=device))),
        ("pos-rows", "pos", call(pos=torch.randn(N + 1, D, device=device))),
        ("pos-D", "pos", call(pos=torch.randn(N, D - 1, device=device))),
        ("pn_weight-dtype", "pn_weight", call(pn_weight=vec.half())),
        ("pn_bias-dtype", "pn_bias", call(pn_bias=vec.double())),
        ("ln_weight-contiguous", "ln_weight", call(ln_weight=torch.randn(2 * D, device=device)[::2])),
        ("ln_bias-device", "ln_bias", call(ln_bias=torch.empty(D, device="meta"))),
        ("patch_size-zero", "patch_size", call(patch_size=0)),
        ("patch_size-bool", "patch_size", call(patch_size=True)),
        ("patch_size-K", "weight", call(patch_size=2)),
        ("prefix_tokens", "prefix_tokens", call(prefix_tokens=-1)),
        ("pn_eps", "pn_eps", call(pn_eps=-1.0)),
        ("ln_eps", "ln_eps", call(ln_eps=float("nan"))),
        ("use_ln", "use_ln", call(use_ln=1)),
        ("use_pn", "use_pn", call(use_pn=None)),
        ("out-shape", "out", call(out=torch.empty(B, N, D, device=device))),
        ("out-dtype", "out", call(out=torch.empty(B, N + 1, D, device=device, dtype=torch.float16))),
        ("x0_out-shape", "x0_out", call(x0_out=torch.empty(B, N, D, device=device))),
        ("x0_out-dtype", "x0_out", call(x0_out=torch.empty(B * N, D, device=device, dtype=torch.float64))),
        ("x0_out-device", "x0_out", call(x0_out=torch.empty(B * N, D, device="meta"))),
    ]
    out = []
    # an empty batch is not an error: an empty [0, R0 + Gh Gw, D] output, nothing launched
    try:
        o = k.patch_embed_fwd(img[:0], w, vec, pos, None, None, 1e-5, False, None, None, 1e-6, True, P, 1)
        ok = tuple(o.shape) == (0, N + 1, D) and o.dtype == img.dtype
        out.append({"id": "empty-batch", "ok": ok, "msg": f"got {o.dtype} {tuple(o.shape)}"})
    except Exception as e:  # noqa: BLE001
        out.append({"id": "empty-batch", "ok": False, "msg": repr(e)})
    from triton_worker import bad_input_results

    return out + bad_input_results(bad)


def _worker(device: str, out_json: str, seed: int) -> int:
    import warnings

    import torch

    warnings.simplefilter("ignore", RuntimeWarning)  # numpy warnings of masked lanes (interpreter)
    k = _load_kernel_module()
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    results = {"cases": {}, "seed": seed}
    for c in CASES:
        if not triton_worker.runs_case(c, device):
            continue
        try:
            results["cases"][c["id"]] = _run_case(torch, k, c, gen, device)
        except Exception as e:  # noqa: BLE001 - reported per case
            import traceback

            results["cases"][c["id"]] = {"id": c["id"], "error": traceback.format_exc(limit=4) + repr(e)}
    results["bwd_cases"] = {}
    for c in BWD_CASES:
        if not triton_worker.runs_case(c, device):
            continue
        try:
            results["bwd_cases"][c["id"]] = _run_bwd_case(torch, k, c, gen, device)
        except Exception as e:  # noqa: BLE001 - reported per case
            import traceback

            results["bwd_cases"][c["id"]] = {"id": c["id"], "error": traceback.format_exc(limit=4) + repr(e)}
    results["bad_input"] = _bad_input_checks(torch, k, device) + _bad_bwd_checks(torch, k, device)
    try:
        results["x0_used"] = _x0_used_check(torch, k, device)
    except Exception as e:  # noqa: BLE001
        results["x0_used"] = {"error": repr(e)}
    results["total_s"] = time.perf_counter() - t0
    with open(out_json, "w") as f:
        json.dump(results, f, indent=1)
    return 0


# --------------------------------------------------------------------------------------------
# pytest side (no triton import here)

import triton_worker  # noqa: E402
from triton_worker import assert_bad_inputs_ok, assert_collected_by_aot, worker_fixtures  # noqa: E402

interp_results, gpu_results, dry_results, test_sm90_dry_compile = worker_fixtures(__file__, "patch_embed")


def _check_case(res, case):
    r = res["cases"][case["id"]]
    assert "error" not in r, r["error"]
    assert r["shape_ok"], "wrong output shape, dtype, device or layout"
    assert r["inputs_unchanged"], "the launcher modified an input"
    assert r["prefix_unwritten"], "rows 0 .. R0 - 1 were written"
    assert r["nonfinite"] == 0, f"{r['nonfinite']} NaN / inf (unwritten?) patch outputs, seed {res['seed']}"
    tol = TOL[case["dtype"]]
    assert r["err"] <= tol, f"relative error {r['err']:.3e} > {tol:g}, seed {res['seed']}"
    if case["dtype"] != "float32":
        bound = max(2 * r["err_rounded"], 1e-6)
        assert r["err"] <= bound, (f"relative error {r['err']:.3e} > 2x that of the rounded float64 result "
                                   f"({r['err_rounded']:.3e}), seed {res['seed']}")
    if "same_as_contiguous" in r:
        assert r["same_as_contiguous"], f"{case['layout']} images differ from their contiguous copy"
    assert r["x0_same_out"], "the tokens differ when x0_out is given"
    assert r["x0_nonfinite"] == 0, f"{r['x0_nonfinite']} NaN / inf (unwritten?) x0_out entries, seed {res['seed']}"
    assert r["x0_err"] <= 1e-5, f"x0_out: relative error {r['x0_err']:.3e} > 1e-5, seed {res['seed']}"


def _check_bwd_case(res, case):
    r = res["bwd_cases"][case["id"]]
    assert "error" not in r, r["error"]
    assert r["inputs_unchanged"], "the launcher modified an input (grad included)"
    tol = TOL[case["dtype"]]
    for name, o in r["outputs"].items():
        assert o["none_ok"], f"{name}: None where the contract wants a tensor, or a tensor where it wants None"
        if "err" not in o:
            continue
        assert o["shape_ok"], f"{name}: wrong shape, dtype (float32), device or layout"
        assert o["nonfinite"] == 0, f"{name}: {o['nonfinite']} NaN / inf, seed {res['seed']}"
        assert o["err"] <= tol, f"{name}: relative error {o['err']:.3e} > {tol:g}, seed {res['seed']}"
    if "same_as_contiguous" in r:
        assert r["same_as_contiguous"], ("a second run (the contiguous copy of strided images) gave different "
                                         "bits")
    assert ("saved_outputs" in r) == (case["pn"] is not None or case["ln"] is not None)
    if "saved_outputs" in r:
        assert r["x0_unchanged"], "the backward modified the saved x0"
        for name, o in r["saved_outputs"].items():
            assert o["none_ok"], f"{name} (saved x0): None where the contract wants a tensor, or the reverse"
            if "err" in o:
                assert o["nonfinite"] == 0, f"{name} (saved x0): {o['nonfinite']} NaN / inf, seed {res['seed']}"
                assert o["err"] <= tol, f"{name} (saved x0): relative error {o['err']:.3e} > {tol:g}"
        assert r["saved_same_bits"], "the saved-x0 path and the recompute path gave different gradients"


@pytest.mark.parametrize("case", INTERP_CASES, ids=[c["id"] for c in INTERP_CASES])
def test_interpreter(interp_results, case):
    _check_case(interp_results, case)


@pytest.mark.parametrize("case", INTERP_BWD_CASES, ids=[c["id"] for c in INTERP_BWD_CASES])
def test_interpreter_bwd(interp_results, case):
    _check_bwd_case(interp_results, case)


@pytest.mark.parametrize("case", BWD_CASES, ids=[c["id"] for c in BWD_CASES])
def test_gpu_bwd(gpu_results, case):
    _check_bwd_case(gpu_results, case)


def _check_x0_used(res):
    r = res["x0_used"]
    assert "error" not in r, r["error"]
    assert r["same_as_b"], "with the saved x0 of other images, the LayerNorm / pos / bias gradients are not theirs"
    assert r["differs_from_a"], "the backward ignored the saved x0 (gradients of the images it was given)"


def test_interpreter_x0_used(interp_results):
    _check_x0_used(interp_results)


def test_gpu_x0_used(gpu_results):
    _check_x0_used(gpu_results)


def test_interpreter_bad_input(interp_results):
    """Bad arguments raise ValueError naming the argument (and an empty batch gives an empty output)."""
    assert_bad_inputs_ok(interp_results)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_gpu(gpu_results, case):
    _check_case(gpu_results, case)


def test_gpu_bad_input(gpu_results):
    assert_bad_inputs_ok(gpu_results)


def test_aot_collects_patch_embed():
    assert_collected_by_aot("patch_embed")


if __name__ == "__main__":
    from triton_worker import worker_main

    sys.exit(worker_main(_worker))
