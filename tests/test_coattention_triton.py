"""The Triton co-attention kernels (kernels/coattention.py) against float64 math of the kernel contract.

Without a GPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``) on CPU tensors, in a
subprocess (``python tests/test_coattention_triton.py --worker cpu OUT.json SEED``) started once per pytest
session with the variable in its environment only, for the reasons given in tests/test_diffusion_triton.py;
this module imports neither triton nor the kernels. On a machine with a CUDA GPU the same worker also runs
compiled (``test_gpu_*``): the interpreter cases plus a few full-size ones at the default tiles (``gpu_only``:
VQA batch 32, a long sequence).

The contract is computed here, in float64, from the same (dtype-rounded) inputs and does not use
vlops.reference: per direction (0: text queries over image keys, 1: image queries over text keys) the scores
``scale q . k`` (mode 1: ``+ 0 / -10000``), the valid keys (``j < len[b]`` and the boolean mask), the softmax
(mode 0: over the valid keys, a row with none gives ``out = 0``, ``lse = -inf``), the dropout keep mask from
Philox4x32-10 (``vlops.reference.diffusion.philox4x32`` with counter ``(j, i, b H + h, dir)``, kept iff
``uint32_to_uniform(x0) >= dropout_p`` evaluated as torch evaluates it), ``out = P' V``; the six gradients by
float64 autograd of that.

Each case draws fresh inputs (contiguous, views of a fused QKV projection, or strided slices at odd offsets),
lengths (full, padded, zero valid keys) and masks, runs the launchers into outputs poisoned with NaN and
checks: relative error ``||out - ref|| / ||ref||`` of t_out, i_out, t_lse, i_lse and the six gradients, fp32
<= 1e-5 (interpreter: exact fp32 dots; GPU: tf32x3), bf16 / fp16 <= 1e-2 and, for the outputs, at most twice
the error of the same math done eagerly by PyTorch in that dtype and at most 3x the error of the float64
result rounded to the dtype; for the gradients at most the larger of twice the eager error and 4x the
rounding error (``GRAD_ROUNDED_RATIO``; no less than 2**-14): the backward forms ``rowsum(dout * out)`` from
the rounded output, as flash attention does, where eager differentiates the unrounded softmax, so on some
draws (one-hot output gradients, dropout 0.5) its error is 2x eager's and on others eager's error is 0 (an
exactly representable gradient). dq and dk may also reach twice the sum of their rounding error and the
error that forming ``delta`` from the output rounded to the dtype makes by itself (``_delta_shift``, float64:
on a bf16 draw with dropout 0.2 that alone is 9.3e-3, twice eager's 4.4e-3). dq and dk are
measured against max(their norm, a sixteenth of the size of the terms that cancel in them,
``_cancel_floors``): where a softmax row is one-hot they are exactly 0, and the same ``delta`` leaves a
residue of a few fp32 units of those terms. lse <= 1e-5 for every dtype, against max(its norm, a sixteenth
of the size of the terms of the largest score, ``_lse_floors``: one key whose score cancels to near 0 has an
lse near 0). Exact: ``lse = -inf`` and zero outputs / dq for rows with no valid key (mode 0), dk = dv = 0 for
invalid keys (mode 0). One kind of row is ill-conditioned by the
contract itself: in mode 1 a row whose keys are all invalid has scores ``s - 10000`` rounded to fp32 (a spacing
of 2**-10) and an fp32 lse near -10000 (same spacing), so its p carry ~5e-4 relative errors whatever the
implementation; such batches are checked separately at ``ILL_TOL``. Also: the dropout keep mask bit for bit
(q = 0 and one-hot values / output gradients make ``out`` and ``dv`` equal ``P' `` up to a positive factor),
inputs unchanged, strided inputs giving the bits of their contiguous copies, a second backward giving the same
bits, the keep threshold of the launcher against torch's comparison, and bad arguments raising ValueError
naming the argument. The compiled-for-Hopper check (wgmma, no spills, shared memory) is tests/test_aot_sm90.py,
which collects ``kernels/coattention.py``'s ``AOT_SPECS``.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}
LSE_TOL = 1e-5
ILL_TOL = {"float32": 2e-3, "bfloat16": 1e-2, "float16": 1e-2}  # mode 1, rows with no valid key (see above)
ROUNDED_RATIO = 3.0  # 16-bit outputs: at most 3x the error of the float64 result rounded to the dtype
GRAD_ROUNDED_RATIO = 4.0  # 16-bit gradients: at most max(2x eager, 4x rounded, 2**-14), see the docstring
GRAD_NAMES = ("d_tq", "d_tk", "d_tv", "d_iq", "d_ik", "d_iv")
# direction of each output: 0 (text queries, image keys) or 1
DIRECTION = {"t_out": 0, "t_lse": 0, "i_out": 1, "i_lse": 1, "d_tq": 0, "d_ik": 0, "d_iv": 0, "d_iq": 1,
             "d_tk": 1, "d_tv": 1}


# --------------------------------------------------------------------------------------------
# The cases (plain data: collected without importing torch / triton)

def _blocks_id(blocks: dict) -> str:
    """``{"BLOCK_M": 16, "CHUNK_D": 32}`` -> ``M16_CHUNK_D32``; per-kernel dicts -> ``bwd_dq-M16_N32.bwd_dkdv-...``."""
    if any(isinstance(v, dict) for v in blocks.values()):
        return ".".join(f"{kind}-{_blocks_id(v)}" for kind, v in blocks.items())
    return "_".join(f"{k[6:] if k.startswith('BLOCK_') else k}{v}" for k, v in blocks.items())


def _cases() -> list[dict]:
    cases = []

    def add(**kw):
        c = dict(dtype="float32", B=2, Nt=20, Nv=37, H=2, d=32, mode=0, lens="pad", masks="", p=0.0,
                 layout="contig", blocks=None, bwd=True, probe=False, twice=False, gpu_only=False)
        c.update(kw)
        c["id"] = (f"{c['dtype'].replace('float', 'f')}-B{c['B']}t{c['Nt']}v{c['Nv']}H{c['H']}d{c['d']}"
                   f"-mode{c['mode']}-{c['lens']}" + (f"-mask{c['masks']}" if c["masks"] else "")
                   + (f"-p{c['p']:g}" if c["p"] else "") + (f"-{c['layout']}" if c["layout"] != "contig" else "")
                   + ("-blk" + _blocks_id(c["blocks"]) if c["blocks"] else "")
                   + ("" if c["bwd"] else "-fwdonly") + ("-probe" if c["probe"] else "")
                   + ("-twice" if c["twice"] else ""))
        cases.append(c)

    small = {"BLOCK_M": 16, "BLOCK_N": 16}  # several query and key tiles, partial last ones
    chunked = {"BLOCK_M": 16, "BLOCK_N": 16, "CHUNK_D": 16, "BLOCK_DO": 32}  # the fp32 large-head-dim path
    # fp32: modes x lengths x masks, small tiles
    add(mode=0, lens="pad", blocks=small)
    add(mode=0, lens="zero-i", blocks=small)  # batch 0: no valid image key (text rows: out 0, lse -inf)
    add(mode=0, lens="zero-ti", masks="", blocks=small, twice=True)
    add(mode=1, lens="pad", blocks=small)
    add(mode=1, lens="zero-t", blocks=small)  # mode 1, a fully masked image row: softmax over all keys
    add(mode=0, lens="full", masks="ti", blocks=small)
    add(mode=1, lens="full", masks="i", blocks=small)
    add(mode=0, lens="pad", masks="t", blocks=small)  # lengths and a mask together
    add(mode=0, lens="full", masks="ti-empty", blocks=small)  # an all-False mask row
    # head dims 16 / 64, one tile (default tiles), partial head dim (24: BLOCK_D 32)
    add(d=16, H=3, mode=0, lens="pad")
    add(d=64, B=1, H=1, Nt=9, Nv=23, mode=1, lens="pad")
    add(d=24, H=1, mode=0, lens="pad", blocks=small)
    # tiles per kernel (the tile study's form): the forward at its defaults, dq and dk / dv each their own
    add(B=1, H=1, Nt=9, Nv=23, mode=0, lens="pad", blocks={"bwd_dq": {"BLOCK_M": 16, "BLOCK_N": 32}, "bwd_dkdv": small})
    # the chunked score products and split dk / dv columns (fp32 at head dim 128 on a GPU)
    add(d=64, B=1, H=2, Nt=17, Nv=33, mode=0, lens="pad", blocks=chunked)
    add(d=64, B=1, H=1, Nt=17, Nv=33, mode=1, lens="zero-i", masks="t", p=0.25, blocks=chunked)
    # dropout
    add(mode=0, lens="pad", p=0.3, blocks=small)
    add(mode=1, lens="pad", masks="i", p=0.1, blocks=small)
    add(B=2, Nt=24, Nv=40, H=2, d=64, mode=0, lens="full", p=0.37, probe=True, blocks=small)
    # 16-bit
    add(dtype="bfloat16", mode=0, lens="pad", blocks=small)
    add(dtype="bfloat16", mode=1, lens="zero-i", masks="t", p=0.2, blocks=small)
    add(dtype="bfloat16", d=64, B=1, H=1, Nt=24, Nv=40, mode=0, lens="full", p=0.5, probe=True, blocks=small)
    add(dtype="float16", mode=0, lens="zero-t", masks="i", blocks=small)
    add(dtype="bfloat16", d=16, H=3, mode=1, lens="pad")
    # strided inputs: views of a fused QKV projection, slices at odd offsets (no 16-byte alignment)
    add(layout="qkv", mode=0, lens="pad", blocks=small)
    add(dtype="bfloat16", layout="qkv", mode=1, lens="pad", p=0.2, blocks=small)
    add(layout="slice", mode=0, lens="pad", masks="i", blocks=small)
    add(dtype="bfloat16", layout="slice", d=64, B=1, H=1, Nt=9, Nv=23, mode=0, lens="pad",
        blocks=dict(chunked, CHUNK_D=64, BLOCK_DO=64))
    # single tokens
    add(B=1, Nt=1, Nv=1, H=1, d=16, mode=0, lens="full")
    # GPU only: ViLBERT / VQA (batch 32, 8 heads of 128; 16 heads of 64), a long sequence, fp32 at d = 128
    g = dict(gpu_only=True, blocks=None)
    add(dtype="bfloat16", B=32, Nt=20, Nv=101, H=8, d=128, mode=0, lens="pad", **g)
    add(dtype="bfloat16", B=32, Nt=36, Nv=101, H=8, d=128, mode=1, lens="pad", p=0.1, layout="qkv", **g)
    add(dtype="float16", B=32, Nt=60, Nv=37, H=16, d=64, mode=0, lens="full", masks="ti", **g)
    add(dtype="float32", B=8, Nt=20, Nv=101, H=8, d=128, mode=0, lens="pad", **g)
    add(dtype="bfloat16", B=1, Nt=512, Nv=2048, H=4, d=128, mode=0, lens="pad", **g)
    add(dtype="bfloat16", B=1, Nt=512, Nv=2048, H=2, d=64, mode=0, lens="full", p=0.1, **g)
    add(dtype="float32", B=1, Nt=256, Nv=1024, H=2, d=128, mode=0, lens="pad", **g)
    add(dtype="bfloat16", B=2, Nt=40, Nv=300, H=2, d=256, mode=0, lens="pad", **g)
    return cases


CASES = _cases()
assert len({c["id"] for c in CASES}) == len(CASES), "case ids must be unique"
INTERP_CASES = [c for c in CASES if not c["gpu_only"]]


# --------------------------------------------------------------------------------------------
# worker (runs in the subprocess)

def _load_kernel_module():
    return importlib.import_module("vlops.kernels.coattention")  # the installed package (kernels/ -> vlops.kernels)


def _rel(torch, out, ref, floor=0.0):
    """||out - ref|| / max(||ref||, floor); the absolute error where both are 0."""
    out = out.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    den = max(ref.norm().item(), float(floor))
    return (out - ref).norm().item() / den if den > 0 else (out - ref).norm().item()


def _streams(torch, c, gen, device):
    """(tq, tk, tv), (iq, ik, iv) in the case's layout and dtype, on device."""
    dt = getattr(torch, c["dtype"])
    B, H, d = c["B"], c["H"], c["d"]

    def three(n):
        if c["layout"] == "qkv":  # views of a fused projection [B, N, 3, H, d]
            fused = torch.randn(B, n, 3, H, d, generator=gen).to(dt).to(device)
            return tuple(fused[:, :, j] for j in range(3))
        if c["layout"] == "slice":  # odd offsets: no aligned base pointer or stride
            out = []
            for _ in range(3):
                big = torch.randn(B, n + 1, H, d + 5, generator=gen).to(dt).to(device)
                out.append(big[:, 1:, :, 2:d + 2])
            return tuple(out)
        return tuple(torch.randn(B, n, H, d, generator=gen).to(dt).to(device) for _ in range(3))

    t, i = three(c["Nt"]), three(c["Nv"])
    if c["layout"] != "contig":
        assert not any(x.is_contiguous() for x in t + i)
    return t, i


def _lengths(torch, c, gen, device):
    B, Nt, Nv = c["B"], c["Nt"], c["Nv"]
    lens = []
    for s, n in (("t", Nt), ("i", Nv)):
        if c["lens"] == "full" or s in c["masks"].split("-")[0] and c["lens"] != "pad":
            ln = torch.full((B,), n, dtype=torch.int32)
        else:
            ln = torch.randint(1, n + 1, (B,), generator=gen, dtype=torch.int32)
            ln[-1] = n if B > 1 else ln[-1]
            if c["lens"].startswith("zero") and s in c["lens"].split("-")[1]:
                ln[0] = 0
        lens.append(ln.to(device))
    masks = []
    for s, n in (("t", Nt), ("i", Nv)):
        if s not in c["masks"].split("-")[0]:
            masks.append(None)
            continue
        m = torch.rand(B, n, generator=gen) > 0.3
        m[:, 0] = True
        if c["masks"].endswith("empty"):
            m[0] = False
        masks.append(m.to(device))
    return lens, masks


def _keep_ref(torch, ref, B, H, Nq, Nk, dirn, seed, p):
    """The contract's keep mask [B, H, Nq, Nk] (bool, CPU)."""
    j = torch.arange(Nk, dtype=torch.int64).view(1, 1, 1, Nk)
    i = torch.arange(Nq, dtype=torch.int64).view(1, 1, Nq, 1)
    bh = (torch.arange(B, dtype=torch.int64).view(B, 1, 1, 1) * H + torch.arange(H, dtype=torch.int64).view(1, H, 1, 1))
    shape = (B, H, Nq, Nk)
    c0, c1, c2 = (x.expand(shape).reshape(-1) for x in (j, i, bh))
    x0 = ref.philox4x32(c0, c1, c2, torch.full_like(c0, dirn), seed & 0xFFFFFFFF, seed >> 32)[0]
    return (ref.uint32_to_uniform(x0) >= p).view(shape)  # float32 u compared as torch compares it


def _valid(torch, ln, mask, n):
    v = torch.arange(n).view(1, n) < ln.long().cpu().view(-1, 1)
    return v & mask.cpu() if mask is not None else v


def _attend(torch, q, k, v, valid, mode, scale, keep, p, probs=False):
    """One direction of the contract: (out [B, Nq, H, d], lse [B, H, Nq]) in q's dtype; differentiable. With
    ``probs``: the softmax P [B, H, Nq, Nk] (before dropout) instead."""
    s = torch.einsum("bihc,bjhc->bhij", q, k) * scale
    vb = valid[:, None, None, :]
    if mode == 1:
        s = s + torch.where(vb, 0.0, -10000.0).to(s.dtype)
        lse = torch.logsumexp(s, -1)
        pr = torch.softmax(s, -1)
    else:
        has = vb.any(-1, keepdim=True)
        lse_f = torch.logsumexp(torch.where(has, torch.where(vb, s, float("-inf")), 0.0), -1)
        pr = torch.where(vb, torch.exp(s - lse_f[..., None]), 0.0)
        lse = torch.where(has[..., 0], lse_f, float("-inf"))
    if probs:
        return pr
    if keep is not None:
        pr = pr * keep.to(pr.dtype) / (1.0 - p)
    return torch.einsum("bhij,bjhc->bihc", pr, v), lse


def _cancel_floors(torch, pr, q, k, v, dout, scale, keep, p):
    """Per batch entry, float64 [B]: a sixteenth of the size of the terms whose differences form dq and dk of
    one direction, ``|| scale (P o A) |K| ||`` and ``|| scale (P o A)^T |Q| ||`` with ``A = |dO| |V|^T`` (the
    terms of ``dP' = dO V^T``; times the dropout keep / (1 - p)); ``pr``: the direction's float64 softmax P
    (before dropout), the other tensors float64 on the CPU. dq and dk are sums of
    ``P_ij (dP'_ij - delta_i)``: where the softmax is one-hot they cancel to exactly 0 in exact arithmetic,
    and an fp32 backward that forms ``delta = rowsum(dO o O)`` from the output (as flash attention does)
    leaves a rounding residue of a few 2**-24 of these terms. The gradients' errors are measured against
    max(their norm, this floor); over the cases of one run the floor is 0.06x to 4.2x the norm (median
    0.7x), so on most draws the bound is unchanged and on the others at most a few times looser, still far
    above the errors of a correct kernel (2e-7 to 3e-7)."""
    w = pr * torch.einsum("bihc,bjhc->bhij", dout.abs(), v.abs())
    if keep is not None:
        w = w * keep.to(w.dtype) / (1.0 - p)
    fq = scale * torch.einsum("bhij,bjhc->bihc", w, k.abs())
    fk = scale * torch.einsum("bhij,bihc->bjhc", w, q.abs())
    return fq.flatten(1).norm(dim=1) / 16, fk.flatten(1).norm(dim=1) / 16


def _eager(torch, q, k, v, valid, mode, scale, keep, p):
    """The same math done eagerly in q's (16-bit) dtype, as ViLBERT's attention does under autocast."""
    s = torch.einsum("bihc,bjhc->bhij", q, k) * scale
    vb = valid[:, None, None, :]
    if mode == 1:
        s = s + torch.where(vb, 0.0, -10000.0).to(s.dtype)
    else:
        s = s.masked_fill(~vb, float("-inf"))
    pr = torch.softmax(s, -1)
    if keep is not None:
        pr = pr * keep.to(pr.dtype) / (1.0 - p)
    return torch.einsum("bhij,bjhc->bihc", pr, v)


def _delta_shift(torch, pr, q, k, v, dout, scale, keep, p, dtype):
    """float64 (dq, dk) shifts of one direction (arguments as :func:`_cancel_floors`) when
    ``delta = rowsum(dO o O)`` is formed from the output rounded to ``dtype``, as flash attention (and these
    kernels) do, instead of from the exact output: ``dS_ij = P_ij (dP'_ij - delta_i)`` moves by
    ``-P_ij (dO_i . (round(O_i) - O_i))``. The 16-bit gradients' error is bounded by twice the error this
    alone makes (plus the gradient's own rounding), besides the eager and rounding bounds."""
    prd = pr if keep is None else pr * keep.to(pr.dtype) / (1.0 - p)
    out = torch.einsum("bhij,bjhc->bihc", prd, v)
    ddelta = (dout * (out.to(dtype).double() - out)).sum(-1).permute(0, 2, 1)  # [B, H, Nq]
    w = -pr * ddelta[..., None]
    return scale * torch.einsum("bhij,bjhc->bihc", w, k), scale * torch.einsum("bhij,bihc->bjhc", w, q)


def _lse_floors(torch, q, k, valid, scale):
    """float64 [B, H, Nq]: a sixteenth of ``scale * max_j sum_c |q_ic k_jc|`` over the valid keys j, the size of
    the terms of the largest score. The fp32 rounding of the scores moves an lse by a few 2**-24 of this,
    which exceeds 1e-5 |lse| where the scores cancel to near 0 (one key: the lse is its score); the lse
    errors are measured against max(their norm, this floor)."""
    with torch.no_grad():
        a = torch.einsum("bihc,bjhc->bhij", q.detach().double().cpu().abs(), k.detach().double().cpu().abs())
        return (scale * a).masked_fill(~valid[:, None, None, :], 0.0).amax(-1) / 16


def _split_err(torch, out, ref, ill_b, batch_dim=0, floors=None):
    """(error over the regular batch entries, error over the ill-conditioned ones or None); ``floors``: None or
    a float64 [B] of per-entry norms the error is also measured against (see _cancel_floors)."""
    out = out.detach().double().cpu()
    reg = [b for b in range(out.shape[batch_dim]) if b not in ill_b]
    part = lambda t, bs: t.index_select(batch_dim, torch.tensor(bs))  # noqa: E731
    fl = (lambda bs: 0.0) if floors is None else (lambda bs: floors[torch.tensor(bs)].norm().item())  # noqa: E731
    e_reg = _rel(torch, part(out, reg), part(ref, reg), fl(reg)) if reg else 0.0
    e_ill = _rel(torch, part(out, ill_b), part(ref, ill_b), fl(ill_b)) if ill_b else None
    return e_reg, e_ill


def _run_case(torch, k, ref_mod, c, gen, device):
    dt = getattr(torch, c["dtype"])
    B, Nt, Nv, H, d, mode, p = c["B"], c["Nt"], c["Nv"], c["H"], c["d"], c["mode"], c["p"]
    (tq, tk, tv), (iq, ik, iv) = _streams(torch, c, gen, device)
    (t_len, i_len), (t_mask, i_mask) = _lengths(torch, c, gen, device)
    if c["probe"]:  # q = 0 (uniform p), one-hot values: out = P' up to a factor
        assert d >= max(Nt, Nv)
        tq, iq = torch.zeros_like(tq), torch.zeros_like(iq)
        tv = torch.eye(Nt, d).view(1, Nt, 1, d).expand(B, Nt, H, d).to(dt).to(device).contiguous()
        iv = torch.eye(Nv, d).view(1, Nv, 1, d).expand(B, Nv, H, d).to(dt).to(device).contiguous()
    scale = float(torch.empty(1).uniform_(0.5, 1.5, generator=gen)) / d ** 0.5
    seed = int(torch.randint(0, 2**62, (1,), generator=gen)) * 2 + 1
    args = (tq, tk, tv, iq, ik, iv, t_len, i_len, t_mask, i_mask, scale, mode, p, seed)
    inputs = [x for x in args if isinstance(x, torch.Tensor)]
    before = [x.clone() for x in inputs]
    nan = float("nan")
    out = (torch.full((B, Nt, H, d), nan, dtype=dt, device=device),
           torch.full((B, Nv, H, d), nan, dtype=dt, device=device),
           torch.full((B, H, Nt), nan, device=device), torch.full((B, H, Nv), nan, device=device))
    t0 = time.perf_counter()
    got = k.co_attention_fwd(*args, out=out, blocks=c["blocks"])
    if device == "cuda":
        torch.cuda.synchronize()
    res = {"id": c["id"], "dtype": c["dtype"], "fwd_s": time.perf_counter() - t0}
    res["returned_out"] = all(a is b for a, b in zip(got, out))

    # the contract in float64 (CPU)
    t_valid, i_valid = _valid(torch, t_len, t_mask, Nt), _valid(torch, i_len, i_mask, Nv)
    keeps = [None, None]
    if p > 0:
        keeps = [_keep_ref(torch, ref_mod, B, H, Nt, Nv, 0, seed, p),
                 _keep_ref(torch, ref_mod, B, H, Nv, Nt, 1, seed, p)]
    leaf = lambda x: x.detach().double().cpu().requires_grad_()  # noqa: E731
    L = [leaf(x) for x in (tq, tk, tv, iq, ik, iv)]
    t_out64, t_lse64 = _attend(torch, L[0], L[4], L[5], i_valid, mode, scale, keeps[0], p)
    i_out64, i_lse64 = _attend(torch, L[3], L[1], L[2], t_valid, mode, scale, keeps[1], p)
    # ill-conditioned batch entries per direction: mode 1 and no valid key
    ill = [[b for b in range(B) if mode == 1 and not i_valid[b].any()],
           [b for b in range(B) if mode == 1 and not t_valid[b].any()]]
    empty = [[b for b in range(B) if not i_valid[b].any()], [b for b in range(B) if not t_valid[b].any()]]
    res["ill"] = ill

    errs = {}
    for name, o, r in (("t_out", got[0], t_out64), ("i_out", got[1], i_out64)):
        e_reg, e_ill = _split_err(torch, o, r.detach(), ill[DIRECTION[name]])
        errs[name] = {"err": e_reg, "err_ill": e_ill, "nonfinite": int((~torch.isfinite(o)).sum()),
                      "shape_ok": tuple(o.shape) == tuple(r.shape) and o.dtype == dt and o.is_contiguous()}
        if dt != torch.float32:
            reg = [b for b in range(B) if b not in ill[DIRECTION[name]] and b not in empty[DIRECTION[name]]]
            if reg:
                sel = torch.tensor(reg)
                rr = r.detach()[sel]
                errs[name]["err_rounded"] = _rel(torch, rr.to(dt), rr)
                errs[name]["err_reg16"] = _rel(torch, o.cpu()[sel], rr)
    lse_floors = {"t_lse": _lse_floors(torch, L[0], L[4], i_valid, scale),
                  "i_lse": _lse_floors(torch, L[3], L[1], t_valid, scale)}
    for name, o, r in (("t_lse", got[2], t_lse64), ("i_lse", got[3], i_lse64)):
        r = r.detach()
        fin = torch.isfinite(r)
        oc = o.cpu().double()
        ib = ill[DIRECTION[name]]
        reg_rows = fin.clone()
        reg_rows[ib] = False
        fl = lse_floors[name][reg_rows].norm().item()
        errs[name] = {"err": _rel(torch, oc[reg_rows], r[reg_rows], fl) if reg_rows.any() else 0.0,
                      "err_ill": _rel(torch, oc[ib], r[ib]) if ib else None,
                      "neginf_ok": bool(torch.equal(torch.isneginf(oc), ~fin)),
                      "nonfinite": int((~torch.isfinite(oc) & fin).sum()) + int(torch.isnan(oc).sum()),
                      "shape_ok": tuple(o.shape) == tuple(r.shape) and o.dtype == torch.float32 and o.is_contiguous()}
    # mode 0, rows with no valid key: out exactly 0
    res["empty_rows_zero"] = all(
        bool((got[dirn].cpu()[b] == 0).all()) for dirn in (0, 1) for b in empty[dirn]) if mode == 0 else True
    if dt != torch.float32:  # eager error at the dtype (regular, non-empty batch entries)
        E = [x.detach().cpu().to(dt).requires_grad_() for x in (tq, tk, tv, iq, ik, iv)]
        t_e = _eager(torch, E[0], E[4], E[5], i_valid, mode, scale, keeps[0], p)
        i_e = _eager(torch, E[3], E[1], E[2], t_valid, mode, scale, keeps[1], p)
        for name, e, r in (("t_out", t_e, t_out64), ("i_out", i_e, i_out64)):
            reg = [b for b in range(B) if b not in ill[DIRECTION[name]] and b not in empty[DIRECTION[name]]]
            if reg:
                sel = torch.tensor(reg)
                errs[name]["err_eager"] = _rel(torch, e.detach()[sel], r.detach()[sel])
    res["fwd"] = errs

    if c["probe"]:  # the keep mask, bit for bit: out[b, i, h, j] != 0 iff keep (every key valid, p > 0)
        res["probe_fwd"] = [int(((got[0].cpu()[..., :Nv] != 0).permute(0, 2, 1, 3) != keeps[0]).sum()),
                            int(((got[1].cpu()[..., :Nt] != 0).permute(0, 2, 1, 3) != keeps[1]).sum())]

    if c["layout"] != "contig":
        cont = [x.contiguous() for x in (tq, tk, tv, iq, ik, iv)]
        again = k.co_attention_fwd(*cont, *args[6:], blocks=c["blocks"])
        res["same_as_contiguous"] = all(torch.equal(a, b_) for a, b_ in zip(got, again))

    if c["bwd"]:
        if c["probe"]:  # one-hot output gradients: dv[b, j, h, i] = P'_ij, nonzero iff keep
            t_do = torch.eye(Nt, d).view(1, Nt, 1, d).expand(B, Nt, H, d).to(dt).to(device).contiguous()
            i_do = torch.eye(Nv, d).view(1, Nv, 1, d).expand(B, Nv, H, d).to(dt).to(device).contiguous()
        else:
            t_do = torch.randn(B, Nt, H, d, generator=gen).to(dt).to(device)
            i_do = torch.randn(B, Nv, H, d, generator=gen).to(dt).to(device)
        bargs = (t_do, i_do, tq, tk, tv, iq, ik, iv, got[0], got[1], got[2], got[3], *args[6:])
        binputs = [x for x in bargs if isinstance(x, torch.Tensor)]
        bbefore = [x.clone() for x in binputs]
        grads = tuple(torch.full(x.shape, nan, dtype=dt, device=device) for x in (tq, tk, tv, iq, ik, iv))
        t0 = time.perf_counter()
        g = k.co_attention_bwd(*bargs, grads=grads, blocks=c["blocks"])
        if device == "cuda":
            torch.cuda.synchronize()
        res["bwd_s"] = time.perf_counter() - t0
        res["returned_grads"] = all(a is b_ for a, b_ in zip(g, grads))
        same = lambda a, b_: bool(((a == b_) | (a.isnan() & b_.isnan())).all())  # noqa: E731
        res["bwd_inputs_unchanged"] = all(same(a, b_) for a, b_ in zip(bbefore, binputs))
        torch.autograd.backward([t_out64, i_out64], [t_do.double().cpu(), i_do.double().cpu()])
        gerrs = {}
        eager_grads = None
        if dt != torch.float32:
            E = [x.detach().cpu().to(dt).requires_grad_() for x in (tq, tk, tv, iq, ik, iv)]
            t_e = _eager(torch, E[0], E[4], E[5], i_valid, mode, scale, keeps[0], p)
            i_e = _eager(torch, E[3], E[1], E[2], t_valid, mode, scale, keeps[1], p)
            # rows without a valid key are NaN in eager mode 0: their output gradients are zeroed
            gt, gi = t_do.cpu().clone(), i_do.cpu().clone()
            gt[empty[0]] = 0
            gi[empty[1]] = 0
            torch.autograd.backward([t_e, i_e], [gt, gi])
            eager_grads = [x.grad for x in E]
        # per direction, in float64 on the CPU: (P, q, k, v, dO, scale, keep, p) for the floors and shifts
        with torch.no_grad():
            D = [L[i].detach() for i in range(6)]
            dirs = [(_attend(torch, D[0], D[4], D[5], i_valid, mode, scale, None, 0.0, probs=True), D[0], D[4],
                     D[5], t_do.double().cpu(), scale, keeps[0], p),
                    (_attend(torch, D[3], D[1], D[2], t_valid, mode, scale, None, 0.0, probs=True), D[3], D[1],
                     D[2], i_do.double().cpu(), scale, keeps[1], p)]
            (fq0, fk0), (fq1, fk1) = (_cancel_floors(torch, *a) for a in dirs)
            floors = {"d_tq": fq0, "d_ik": fk0, "d_iq": fq1, "d_tk": fk1}
            if eager_grads is not None:
                (sq0, sk0), (sq1, sk1) = (_delta_shift(torch, *a, dt) for a in dirs)
                shifts = {"d_tq": sq0, "d_ik": sk0, "d_iq": sq1, "d_tk": sk1}
        for n, (name, o, l) in enumerate(zip(GRAD_NAMES, g, L)):
            dirn = DIRECTION[name]
            e_reg, e_ill = _split_err(torch, o, l.grad, ill[dirn], floors=floors.get(name))
            ge = {"err": e_reg, "err_ill": e_ill, "nonfinite": int((~torch.isfinite(o)).sum()),
                  "shape_ok": tuple(o.shape) == tuple(l.shape) and o.dtype == dt and o.is_contiguous()}
            if eager_grads is not None:
                reg = [b for b in range(B) if b not in ill[dirn] and b not in empty[dirn]]
                if reg:
                    sel = torch.tensor(reg)
                    ge["err_eager"] = _rel(torch, eager_grads[n][sel], l.grad[sel])
                    ge["err_reg16"] = _rel(torch, o.cpu()[sel], l.grad[sel])
                    ge["err_rounded"] = _rel(torch, l.grad[sel].to(dt), l.grad[sel])
                    if name in shifts:
                        ge["err_delta"] = _rel(torch, (l.grad + shifts[name])[sel], l.grad[sel])
            gerrs[name] = ge
        res["bwd"] = gerrs
        if mode == 0:
            # invalid keys: dk = dv = 0 exactly; rows without a valid key: dq = 0 exactly
            gc = [x.cpu() for x in g]
            inv_i, inv_t = ~i_valid, ~t_valid  # [B, N]
            res["invalid_keys_zero"] = bool((gc[4][inv_i] == 0).all() and (gc[5][inv_i] == 0).all()
                                            and (gc[1][inv_t] == 0).all() and (gc[2][inv_t] == 0).all())
            res["empty_rows_dq_zero"] = all(bool((gc[3 * dirn][b] == 0).all()) for dirn in (0, 1) for b in empty[dirn])
        if c["probe"]:
            res["probe_bwd"] = [int(((g[5].cpu()[..., :Nt] != 0).permute(0, 2, 3, 1) != keeps[0]).sum()),
                                int(((g[2].cpu()[..., :Nv] != 0).permute(0, 2, 3, 1) != keeps[1]).sum())]
        if c["twice"] or c["layout"] != "contig":
            src = [tq, tk, tv, iq, ik, iv]
            if c["layout"] != "contig":
                src = [x.contiguous() for x in src]
            again = k.co_attention_bwd(t_do, i_do, *src, *bargs[8:], blocks=c["blocks"])
            res["bwd_same_again"] = all(torch.equal(a, b_) for a, b_ in zip(g, again))
    res["inputs_unchanged"] = all(torch.equal(a, b_) for a, b_ in zip(before, inputs))
    return res


def _threshold_checks(torch, k, ref):
    """The launcher's integer keep threshold T(p) against torch: u(x) >= p iff x >> 8 >= T, tested on the
    x >> 8 around T and at the ends, for p on both sides of float32 values and of the u grid."""
    import struct

    f32 = lambda x: struct.unpack("f", struct.pack("f", x))[0]  # noqa: E731
    ps = [0.1, 0.3, 0.5, 0.75, 0.9, 0.999, 1e-9, 0.5 - 2**-30]
    for u in (0.2, 0.6, 0.3000000119):  # just above / below float32 values
        x = f32(u)
        ps += [x, x * (1 + 2**-40), x * (1 - 2**-40)]
    ps += [(2 * 7000001 + 1) * 2.0**-25, (2 * 9000001 + 1) * 2.0**-25 + 2**-50]  # on / next to the u grid
    bad = []
    for p in ps:
        T = k._keep_threshold(p)
        ks = torch.tensor(sorted({max(0, min(2**24 - 1, T + o)) for o in (-3, -2, -1, 0, 1, 2, 3)} | {0, 2**24 - 1}),
                          dtype=torch.int64)
        want = ref.uint32_to_uniform(ks << 8) >= p
        also = ref.uint32_to_uniform((ks << 8) | 0xFF) >= p  # the low 8 bits do not matter
        got = ks >= T
        if not (torch.equal(want, got) and torch.equal(also, got)):
            bad.append(f"p={p!r}: T={T}")
    return {"id": "keep-threshold", "ok": not bad, "msg": "; ".join(bad)}


def _bad_input_checks(torch, k, device):
    B, Nt, Nv, H, d = 2, 5, 7, 2, 16
    mk = lambda n, dt=torch.float32: torch.randn(B, n, H, d, dtype=dt, device=device)  # noqa: E731
    tq, tk, tv, iq, ik, iv = mk(Nt), mk(Nt), mk(Nt), mk(Nv), mk(Nv), mk(Nv)
    t_len = torch.full((B,), Nt, dtype=torch.int32, device=device)
    i_len = torch.full((B,), Nv, dtype=torch.int32, device=device)
    base = dict(tq=tq, tk=tk, tv=tv, iq=iq, ik=ik, iv=iv, t_len=t_len, i_len=i_len, t_mask=None, i_mask=None,
                scale=0.25, mask_mode=0, dropout_p=0.0, seed=0)
    outs = k.co_attention_fwd(*base.values())

    def fwd(**kw):
        a = dict(base)
        extra = {x: kw.pop(x) for x in ("out", "blocks") if x in kw}
        a.update(kw)
        return lambda: k.co_attention_fwd(*a.values(), **extra)

    def bwd(**kw):
        a = dict(t_dout=mk(Nt), i_dout=mk(Nv), tq=tq, tk=tk, tv=tv, iq=iq, ik=ik, iv=iv, t_out=outs[0], i_out=outs[1],
                 t_lse=outs[2], i_lse=outs[3], t_len=t_len, i_len=i_len, t_mask=None, i_mask=None, scale=0.25,
                 mask_mode=0, dropout_p=0.0, seed=0)
        extra = {x: kw.pop(x) for x in ("grads", "blocks") if x in kw}
        a.update(kw)
        return lambda: k.co_attention_bwd(*a.values(), **extra)

    bad = [
        ("tq-3d", "tq", fwd(tq=tq[0])),
        ("tq-dtype", "tq", fwd(**{n: base[n].double() for n in ("tq", "tk", "tv", "iq", "ik", "iv")})),
        ("tk-shape", "tk", fwd(tk=mk(Nt + 1))),
        ("iq-heads", "iq", fwd(iq=torch.randn(B, Nv, H + 1, d, device=device))),
        ("iv-dtype", "iv", fwd(iv=iv.half())),
        ("ik-stride", "ik", fwd(ik=torch.randn(B, Nv, H, 2 * d, device=device)[..., ::2])),
        ("t_len-dtype", "t_len", fwd(t_len=t_len.long())),
        ("i_len-shape", "i_len", fwd(i_len=torch.full((B + 1,), Nv, dtype=torch.int32, device=device))),
        ("t_mask-dtype", "t_mask", fwd(t_mask=torch.ones(B, Nt, dtype=torch.uint8, device=device))),
        ("i_mask-shape", "i_mask", fwd(i_mask=torch.ones(B, Nt, dtype=torch.bool, device=device))),
        ("scale-nan", "scale", fwd(scale=float("nan"))),
        ("scale-str", "scale", fwd(scale="0.1")),
        ("mask_mode", "mask_mode", fwd(mask_mode=2)),
        ("dropout_p-1", "dropout_p", fwd(dropout_p=1.0)),
        ("dropout_p-neg", "dropout_p", fwd(dropout_p=-0.1)),
        ("seed-neg", "seed", fwd(seed=-1)),
        ("seed-big", "seed", fwd(seed=2**63)),
        ("head-dim", "tq", fwd(**{n: torch.randn(B, N, H, 512, device=device) for n, N in
                                  (("tq", Nt), ("tk", Nt), ("tv", Nt), ("iq", Nv), ("ik", Nv), ("iv", Nv))})),
        ("fp32-d256", "tq", fwd(**{n: torch.randn(B, N, H, 256, device=device) for n, N in
                                   (("tq", Nt), ("tk", Nt), ("tv", Nt), ("iq", Nv), ("ik", Nv), ("iv", Nv))})),
        ("out", "out", fwd(out=(outs[0], outs[1], outs[2], outs[2]))),
        ("blocks", "blocks", fwd(blocks={"BLOCK_M": 24})),
        ("blocks-mixed", "blocks", fwd(blocks={"fwd": {"BLOCK_M": 16}, "BLOCK_N": 16})),
        ("blocks-kind", "blocks", bwd(blocks={"bwd_dq": 16})),
        ("t_dout-shape", "t_dout", bwd(t_dout=mk(Nv))),
        ("i_dout-dtype", "i_dout", bwd(i_dout=mk(Nv, torch.float16))),
        ("t_out-contiguous", "t_out", bwd(t_out=torch.randn(B, Nt, d, H, device=device).transpose(2, 3))),
        ("i_lse-dtype", "i_lse", bwd(i_lse=outs[3].double())),
        ("t_lse-shape", "t_lse", bwd(t_lse=outs[3])),
        ("bwd-mask_mode", "mask_mode", bwd(mask_mode=-1)),
        ("grads", "grads", bwd(grads=(tq,) * 5)),
    ]
    out = []
    from triton_worker import bad_input_results

    return out + bad_input_results(bad)


def _worker(device: str, out_json: str, seed: int) -> int:
    import warnings

    import torch

    from vlops.reference import diffusion as ref

    warnings.simplefilter("ignore", RuntimeWarning)  # numpy warnings of masked lanes (interpreter)
    k = _load_kernel_module()
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    results = {"cases": {}, "seed": seed}
    for c in CASES:
        if not triton_worker.runs_case(c, device):
            continue
        try:
            results["cases"][c["id"]] = _run_case(torch, k, ref, c, gen, device)
        except Exception as e:  # noqa: BLE001 - reported per case
            import traceback

            results["cases"][c["id"]] = {"id": c["id"], "error": traceback.format_exc(limit=6) + repr(e)}
    results["threshold"] = _threshold_checks(torch, k, ref)
    results["bad_input"] = _bad_input_checks(torch, k, device)
    results["total_s"] = time.perf_counter() - t0
    with open(out_json, "w") as f:
        json.dump(results, f, indent=1)
    return 0


# --------------------------------------------------------------------------------------------
# pytest side (no triton import here)

import triton_worker  # noqa: E402
from triton_worker import assert_bad_inputs_ok, assert_collected_by_aot, worker_fixtures  # noqa: E402

interp_results, gpu_results, dry_results, test_sm90_dry_compile = worker_fixtures(__file__, "coattention")


def _check_err(what, e, dtype, seed, grad=False):
    tol = TOL[dtype]
    assert e["shape_ok"], f"{what}: wrong shape, dtype or layout"
    assert e["nonfinite"] == 0, f"{what}: {e['nonfinite']} NaN / inf (unwritten?) elements, seed {seed}"
    assert e["err"] <= tol, f"{what}: relative error {e['err']:.3e} > {tol:g}, seed {seed}"
    if e.get("err_ill") is not None:
        assert e["err_ill"] <= ILL_TOL[dtype], (f"{what}: relative error {e['err_ill']:.3e} > {ILL_TOL[dtype]:g} "
                                                f"on the mode-1 rows with no valid key, seed {seed}")
    if "err_eager" in e:
        if grad:
            bound = max(2 * e["err_eager"], GRAD_ROUNDED_RATIO * e["err_rounded"], 2.0 ** -14,
                        2 * (e.get("err_delta", 0.0) + e["err_rounded"]))
        else:
            bound = max(2 * e["err_eager"], 1e-6)
        assert e["err_reg16"] <= bound, (f"{what}: relative error {e['err_reg16']:.3e} > {bound:.3e}: 2x the eager "
                                         f"{dtype} error ({e['err_eager']:.3e})"
                                         + (f" or {GRAD_ROUNDED_RATIO}x the rounding error ({e['err_rounded']:.3e})"
                                            f" or 2x (that of delta from the rounded output "
                                            f"({e.get('err_delta', 0.0):.3e}) + the rounding error)"
                                            if grad else "") + f", seed {seed}")


def _check_case(res, case):
    r = res["cases"][case["id"]]
    seed = res["seed"]
    assert "error" not in r, r["error"]
    assert r["inputs_unchanged"], "the forward launcher modified an input"
    assert r["returned_out"], "the forward did not return the preallocated outputs"
    dt = case["dtype"]
    for name in ("t_out", "i_out"):
        e = r["fwd"][name]
        _check_err(name, e, dt, seed)
        if "err_rounded" in e:
            bound = max(ROUNDED_RATIO * e["err_rounded"], 1e-6)
            assert e["err_reg16"] <= bound, (f"{name}: relative error {e['err_reg16']:.3e} > {ROUNDED_RATIO}x that of "
                                             f"the rounded float64 result ({e['err_rounded']:.3e}), seed {seed}")
    for name in ("t_lse", "i_lse"):
        e = r["fwd"][name]
        assert e["shape_ok"], f"{name}: wrong shape, dtype (float32) or layout"
        assert e["neginf_ok"], f"{name}: -inf exactly where a row has no valid key (mode 0), nowhere else"
        assert e["nonfinite"] == 0, f"{name}: NaN or inf (unwritten?) elements, seed {seed}"
        assert e["err"] <= LSE_TOL, f"{name}: relative error {e['err']:.3e} > {LSE_TOL:g}, seed {seed}"
        if e.get("err_ill") is not None:
            assert e["err_ill"] <= ILL_TOL["float32"], f"{name}: mode-1 rows with no valid key, {e['err_ill']:.3e}"
    assert r["empty_rows_zero"], "a row with no valid key (mode 0) must give out = 0 exactly"
    if "probe_fwd" in r:
        assert r["probe_fwd"] == [0, 0], f"forward keep mask differs from the Philox reference: {r['probe_fwd']} bits"
    if "same_as_contiguous" in r:
        assert r["same_as_contiguous"], f"{case['layout']} inputs give other bits than their contiguous copies"
    if case["bwd"]:
        assert r["bwd_inputs_unchanged"], "the backward launcher modified an input"
        assert r["returned_grads"], "the backward did not return the preallocated gradients"
        for name in GRAD_NAMES:
            _check_err(name, r["bwd"][name], dt, seed, grad=True)
        if case["mode"] == 0:
            assert r["invalid_keys_zero"], "invalid keys (mode 0) must get dk = dv = 0 exactly"
            assert r["empty_rows_dq_zero"], "a row with no valid key (mode 0) must get dq = 0 exactly"
        if "probe_bwd" in r:
            assert r["probe_bwd"] == [0, 0], f"backward keep mask differs from the Philox reference: {r['probe_bwd']}"
        if "bwd_same_again" in r:
            assert r["bwd_same_again"], "a second backward (or the contiguous copies) gave other bits"


@pytest.mark.parametrize("case", INTERP_CASES, ids=[c["id"] for c in INTERP_CASES])
def test_interpreter(interp_results, case):
    _check_case(interp_results, case)


def test_interpreter_keep_threshold(interp_results):
    r = interp_results["threshold"]
    assert r["ok"], r["msg"]


def test_interpreter_bad_input(interp_results):
    """Bad arguments raise ValueError naming the argument."""
    assert_bad_inputs_ok(interp_results)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_gpu(gpu_results, case):
    _check_case(gpu_results, case)


def test_gpu_bad_input(gpu_results):
    assert_bad_inputs_ok(gpu_results)


def test_aot_collects_coattention():
    assert_collected_by_aot("coattention")


if __name__ == "__main__":
    from triton_worker import worker_main

    sys.exit(worker_main(_worker))
