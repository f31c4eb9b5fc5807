"""Fused ViT / CLIP patch stem forward: patch gather + projection GEMM + bias + LayerNorms + position
add.

The launcher :func:`patch_embed_fwd` takes the kernel contract of :mod:`vlops.ops.patch_embed`
(``images, weight, bias, pos, pn_weight, pn_bias, pn_eps, use_pn, ln_weight, ln_bias, ln_eps, use_ln,
patch_size, prefix_tokens``) and returns ``out`` [B, R0 + Gh Gw, D] in the dtype of ``images``, with
rows ``R0 ..`` of every image written and rows ``0 .. R0 - 1`` left unwritten.

Design:

- ``_patch_gemm_kernel``: an implicit GEMM. Output rows ``m = b Gh Gw + gh Gw + gw`` (one per patch
  token, ``M = B Gh Gw``), columns ``d < D``, reduction over ``k < K = C P P``. One program per
  ``[BLOCK_M, BLOCK_N]`` output tile (column tiles fastest, so the programs that share a gathered
  patch tile run together and the weight, ``D K`` elements, stays in L2). The A tile
  ``[BLOCK_M, BLOCK_K]`` is gathered straight from ``images`` through its four strides (no unfold
  buffer, no copy): ``k -> (c, ph, pw) = (k // P^2, (k // P) % P, k % P)``, row ->
  ``(b, gh, gw)``, address ``b s_b + c s_c + (gh P + ph) s_h + (gw P + pw) s_w``; pixels past H / W
  (only compiled in when ``PAD``: H or W not a multiple of P) and ``k >= K`` read as zero. ``P`` is a
  ``tl.constexpr``, so the divisions are by constants, and with ``s_w == 1`` (NCHW; Triton
  specialises a stride of 1) runs of ``P`` pixels are contiguous. The B tile is ``weight[n, k]``
  ([D, K] row-major, transposed in registers). ``tl.dot`` accumulates in fp32: bf16 / fp16 operands
  directly (their products are exact in fp32), fp32 operands with ``input_precision="tf32x3"`` (three
  tf32 wgmmas, ~fp32 accurate; one tf32 pass rounds each operand to 2**-11, far over the contract's
  ~1e-6).
  Epilogue: ``+ bias``, then either the final rows (no LayerNorm on: ``+ pos[n]``, rounded to nearest
  even to the output dtype and stored at ``out[b, R0 + n]``: one pass, the timm ViT-B / SigLIP case)
  or the pre-norm rows in fp32.
- ``_patch_norm_kernel`` (only when ``use_pn`` or ``use_ln``): a LayerNorm needs the whole D row,
  which one GEMM tile does not hold (D = 768..1280 against BLOCK_N = 128), so the GEMM writes the
  pre-norm rows in fp32 and this row-wise kernel (``ROWS`` token rows per program, the whole row in
  one ``BLOCK_D = next_power_of_2(D)`` block) applies LN1 (``use_pn``), ``+ pos``, LN2 (``use_ln``)
  in fp32 (biased variance, ``1 / sqrt_rn(var + eps)``) and stores the final rows rounded to the
  output dtype. For fp32 output the pre-norm rows are written into ``out`` itself (at their final
  rows) and normalised in place; for 16-bit output they go to an fp32 scratch ``[B Gh Gw, D]``.
  When the caller passes ``x0_out`` (the op layer does when a LayerNorm is on and a backward will
  run), the pre-norm rows go there instead, for any output dtype, and the row kernel reads them
  from there: the backward then reuses them rather than re-running the GEMM. (Given without a
  LayerNorm, the GEMM stores x0 there and the row kernel only adds pos and rounds.)

Loads (sm_90a AOT study, see AOT_SPECS): with NCHW images whose strides and base are 16-byte aligned
(224 / 336 / 384 px) and no padding, both tiles go global -> shared by ``cp.async`` (3 stages): 16-byte
pieces for P = 16; for P = 14 4-byte (A: pixel pairs) and 8-byte (weight) pieces, the kernel computing
``K = C P P`` itself so that the compiler knows 4 | K (588) for the weight rows. 16-bit channels_last
images, padding or unaligned strides (e.g. 518 px) gather A through registers (scalar loads, no
spills at the default tiles); fp32 A tiles always go by ``cp.async`` (4-byte pieces at worst).
``D % 16 != 0`` makes every epilogue access scalar: 64 x 64 tiles then (see :func:`block_config`).

Memory: no workspace when no LayerNorm is on, or for fp32 output. With a LayerNorm and 16-bit output
the scratch is ``4 B Gh Gw D`` bytes (224 px, B = 256: ViT-B/16 154 MB, ViT-L/14 268 MB); with
``x0_out`` given there is no scratch: the caller's ``x0_out`` (the same ``4 B Gh Gw D`` bytes, which the
op layer keeps until the backward) takes its place. Traffic:
with a LayerNorm the rows cross memory ``8 B Gh Gw D`` bytes more than in the one pass (16-bit: the
GEMM stores 4 bytes instead of 2, the norm pass reads 4 and stores 2; fp32: the norm pass reads and
stores 4 in place): 308 MB for ViT-B/16, B = 256, a floor of ~0.08 ms at 4 TB/s, next to the 59
GFLOP GEMM (~0.1 ms at 600 TFLOP/s). Estimates, not measurements. ``x0_out`` changes none of this
with a LayerNorm on (the same bytes, to another address).

Numerics: fp32 accumulation for every input dtype, the token kept in fp32 until the final store,
rounded once to nearest even (under the interpreter bf16 rounding is done on the bits: its fp32 ->
bf16 cast truncates; see ``_round_to``). Under ``TRITON_INTERPRET=1`` the dots are exact fp32
(``F32_DOT``: 16-bit operands are widened first, since the interpreter's dot multiplies the raw bits
of bf16 tensors). Element offsets of ``out``, the scratch and the image batch term are int64
(``B T D`` may exceed 2**31); offsets within one image are 32-bit unless a stride needs 64.

Backward (:func:`patch_embed_bwd`, the backward contract of :mod:`vlops.ops.patch_embed`), up to four launches:

1. (only when a LayerNorm is on and the forward's rows ``x0`` are not passed in) ``_patch_gemm_kernel``
   recomputes ``x0 = W p + bias`` in fp32 into a scratch [B Gh Gw, D] (tf32x3 / 16-bit dots as in
   the forward). With ``x0`` given (the op layer's path whenever a LayerNorm is on) this launch, a whole
   ``2 B Gh Gw K D``-flop GEMM, is skipped.
2. ``_patch_norm_bwd_kernel``: program (patch-row block of ``ROWS``, chunk of ``BCHUNK`` images, images in
   order) reads x0 (``x0`` or the recomputed rows, read only), recomputes LN1 / + pos / LN2 statistics of
   its rows in fp32, runs the LN2 and LN1 backwards and writes ``g0`` = the gradient of x0 in the images'
   dtype (the GEMMs' operand dtype, rounded once to nearest even: the bits they would round fp32 rows to,
   at half the traffic for 16-bit images); per-program partial sums
   (fixed order, no atomics) of
   d_bias, d_pn_*, d_ln_* ([5, programs, D]) and of d_pos per image chunk ([chunks, Gh Gw, D]), then summed
   by torch over the programs (deterministic).
3. ``_patch_dweight_kernel``: d_weight [D, K] = g0^T p, an implicit GEMM gathering the patch tiles from the
   images as the forward does, reducing over the token rows in ``SPLIT_M`` splits (about 264 programs),
   partials [splits, D, K] summed by torch in a fixed order.
4. (``need_images``) ``_patch_dimages_kernel``: dp = g0 W, each (row, k) stored straight at its pixel of a
   contiguous fp32 d_images (implicit col2im: non-overlapping patches, each pixel written exactly once, the
   padding pixels dropped).

For 16-bit inputs g0 is rounded to the input dtype as a dot operand (as flash attention rounds P), the
products exact in fp32, fp32 accumulation; fp32 uses tf32x3. Memory (beyond what the contract asks):
``g0`` [B Gh Gw, D] in the images' dtype (ViT-B/16, 224 px, B = 256, bf16: 77 MB; ViT-L/14: 134 MB; the
fp32 x0 scratch beside it only when x0 is recomputed), the d_weight partials
``4 splits D K`` bytes (ViT-B/16: ~8 x 2.4 MB) and the row-kernel partials (~1024 x 5 x D floats, plus
chunks x Gh Gw x D for d_pos). No [B Gh Gw, K] buffer. With ``x0`` given, ``g0`` is a separate buffer
from it (the saved rows are never written), so while the backward runs both exist: the caller's ``x0``
(held since the forward) and ``g0``. Not yet done: fusing the d_weight / d_images GEMMs' prologue with the row kernel.

Checked only by the interpreter (tests/test_patch_embed_triton.py) and the sm_90a AOT compile
(tests/test_aot_sm90.py: wgmma, no spills, shared memory); tile sizes are starting points, not tuned
on a GPU.
"""
from __future__ import annotations

import contextlib
import numbers

import triton
import triton.language as tl

from ._tl_common import (_check, _check_float_input, _dot, _is_int, _round_to, _store_rounded, aot_signature, cdiv,
                         next_pow2)

__all__ = ["patch_embed_fwd", "patch_embed_bwd", "AOT_SPECS", "block_config"]


# ---------------------------------------------------------------------------------------------
# device helpers (_dot, _round_to, _store_rounded: kernels/_tl_common.py)

@triton.jit
def _layer_norm(x, d, md, D, w_ptr, b_ptr, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """LayerNorm over the last axis of fp32 ``x`` [ROWS, BLOCK_D] (lanes ``d >= D`` are zero and stay
    zero): (x - mean) / sqrt(var + eps) (* w) (+ b), biased variance."""
    mean = tl.sum(x, 1) / D
    xc = tl.where(md[None, :], x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, 1) / D
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + d, mask=md, other=0.0)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + d, mask=md, other=0.0)[None, :]
    return y


# ---------------------------------------------------------------------------------------------
# kernels

@triton.jit
def _patch_rows(rm, NP, Gw, P: tl.constexpr):
    """Token rows ``m = b NP + n`` -> (image b, patch n, top row y0, left column x0 of the patch)."""
    b = rm // NP
    n = rm - b * NP
    gh = n // Gw
    gw = n - gh * Gw
    return b, n, gh * P, gw * P


@triton.jit
def _patch_cols(k, P: tl.constexpr):
    """Patch columns ``k = (c P + ph) P + pw`` -> (channel c, row ph, column pw within the patch)."""
    return k // (P * P), (k // P) % P, k % P


@triton.jit
def _pad_mask(mask, y0, x0, ph, pw, H, W, PAD: tl.constexpr):
    """``mask`` [rows, cols] without the pixels of the zero padding (right / bottom) when PAD."""
    if PAD:
        mask = mask & ((y0[:, None] + ph[None, :]) < H) & ((x0[:, None] + pw[None, :]) < W)
    return mask


@triton.jit
def _patch_gemm_kernel(img_ptr, w_ptr, bias_ptr, pos_ptr, out_ptr,
                       M, D, C, H, W, NP, Gw, s_b, s_c, s_h, s_w, T, R0,
                       P: tl.constexpr, PAD: tl.constexpr, HAS_BIAS: tl.constexpr, ADD_POS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       F32_DOT: tl.constexpr):
    """out[b * T + R0 + n, d] = sum_k weight[d, k] patch[b, n, k] (+ bias[d]) (+ pos[n, d]), fp32
    accumulation, stored in out's dtype (rounded to nearest even); m = b * NP + n, NP = Gh * Gw."""
    K = C * P * P  # so that the compiler knows K's divisibility (P * P; 4 for P = 14, where K = 588)
    pid = tl.program_id(0)
    num_n = tl.cdiv(D, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = rm < M
    b, n, y0, x0 = _patch_rows(rm, NP, Gw, P)
    a_row = b.to(tl.int64) * s_b + y0 * s_h + x0 * s_w  # [BLOCK_M]

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < D
    w_row = rn.to(tl.int64) * K  # [BLOCK_N]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mk = k < K
        c, ph, pw = _patch_cols(k, P)
        a_col = c * s_c + ph * s_h + pw * s_w  # [BLOCK_K]
        a_mask = mm[:, None] & mk[None, :]
        a_mask = _pad_mask(a_mask, y0, x0, ph, pw, H, W, PAD)
        a = tl.load(img_ptr + a_row[:, None] + a_col[None, :], mask=a_mask, other=0.0)
        w = tl.load(w_ptr + w_row[:, None] + k[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
        acc = _dot(a, tl.trans(w), acc, F32_DOT)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mn, other=0.0)[None, :]
    omask = mm[:, None] & mn[None, :]
    if ADD_POS:
        acc += tl.load(pos_ptr + n.to(tl.int64)[:, None] * D + rn[None, :], mask=omask, other=0.0)
    o_row = (b.to(tl.int64) * T + R0 + n) * D
    _store_rounded(out_ptr + o_row[:, None] + rn[None, :], acc, omask, F32_DOT)


@triton.jit
def _patch_norm_kernel(x_ptr, pos_ptr, pn_w_ptr, pn_b_ptr, ln_w_ptr, ln_b_ptr, out_ptr,
                       M, D, NP, XT, XR0, T, R0, pn_eps, ln_eps,
                       USE_PN: tl.constexpr, PN_W: tl.constexpr, PN_B: tl.constexpr, HAS_POS: tl.constexpr,
                       USE_LN: tl.constexpr, LN_W: tl.constexpr, LN_B: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK_D: tl.constexpr, F32_DOT: tl.constexpr):
    """Token rows m = b * NP + n: x = x_ptr[b * XT + XR0 + n] (fp32 pre-norm rows); LN1 (USE_PN),
    + pos[n] (HAS_POS), LN2 (USE_LN), all in fp32; out[b * T + R0 + n] = x in out's dtype, rounded to
    nearest even. x_ptr may be out_ptr (fp32 output: in place, each program reads its rows first)."""
    rm = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mm = rm < M
    b = rm // NP
    n = rm - b * NP
    b64 = b.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    md = d < D
    mask = mm[:, None] & md[None, :]
    x_row = (b64 * XT + XR0 + n) * D
    x = tl.load(x_ptr + x_row[:, None] + d[None, :], mask=mask, other=0.0)
    if USE_PN:
        x = _layer_norm(x, d, md, D, pn_w_ptr, pn_b_ptr, pn_eps, PN_W, PN_B)
    if HAS_POS:
        x += tl.load(pos_ptr + n.to(tl.int64)[:, None] * D + d[None, :], mask=mask, other=0.0)
    if USE_LN:
        x = _layer_norm(x, d, md, D, ln_w_ptr, ln_b_ptr, ln_eps, LN_W, LN_B)
    o_row = (b64 * T + R0 + n) * D
    _store_rounded(out_ptr + o_row[:, None] + d[None, :], x, mask, F32_DOT)



@triton.jit
def _ln_bwd(g, xhat, rstd, d, md, mask, D, w_ptr, HAS_W: tl.constexpr):
    """LayerNorm backward over the last axis (fp32, [ROWS, BLOCK_D]): rstd (gx - mean(gx) - xhat mean(gx xhat)),
    gx = g * w (g when no weight); zero outside ``mask``."""
    gx = g
    if HAS_W:
        gx = gx * tl.load(w_ptr + d, mask=md, other=0.0)[None, :]
    c1 = tl.sum(gx * xhat, 1) / D
    c2 = tl.sum(gx, 1) / D
    return tl.where(mask, rstd[:, None] * (gx - c2[:, None] - xhat * c1[:, None]), 0.0)


@triton.jit
def _ln_stats(x, md, mask, D, eps):
    """xhat (zero outside ``mask``) and rstd of fp32 rows ``x`` [ROWS, BLOCK_D]."""
    mean = tl.sum(x, 1) / D
    xc = tl.where(md[None, :], x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, 1) / D
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    return tl.where(mask, xc * rstd[:, None], 0.0), rstd


@triton.jit
def _patch_norm_bwd_kernel(grad_ptr, x0_ptr, g0_ptr, pos_ptr, pn_w_ptr, pn_b_ptr, ln_w_ptr, ln_b_ptr, part_ptr,
                           dpos_ptr,
                           B, D, NP, T, R0, BCHUNK, NPROG, pn_eps, ln_eps,
                           USE_PN: tl.constexpr, PN_W: tl.constexpr, PN_B: tl.constexpr, HAS_POS: tl.constexpr,
                           USE_LN: tl.constexpr, LN_W: tl.constexpr, LN_B: tl.constexpr,
                           ROWS: tl.constexpr, BLOCK_D: tl.constexpr, F32_DOT: tl.constexpr):
    """Program (pid_n, pid_b): patches n in [pid_n ROWS, + ROWS) of images b in [pid_b BCHUNK, + BCHUNK), b in
    order. Per row m = b NP + n: g = grad[b T + R0 + n] (fp32); when a LayerNorm is on, x0 = x0_ptr[m] (the
    forward's saved rows or the recomputed x0 = W p + bias) and the forward's LN1 / + pos / LN2 statistics are
    recomputed; LN2 backward, LN1 backward; g0[m] = the gradient of x0, stored in g0's dtype (the images'
    dtype for 16-bit images: the operand both backward GEMMs round it to anyway, so rounding once here
    gives the same bits and halves g0's traffic), rounded to nearest even; x0 is only read. Partial sums of the program (fixed order, no
    atomics), part[j, pid, :] for j = 0 d_bias, 1 d_pn_weight, 2 d_pn_bias, 3 d_ln_weight, 4 d_ln_bias
    (pid = pid_b * num_n + pid_n, NPROG programs), and dpos[pid_b, n] = sum over the program's b of the
    gradient at the position add."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid = pid_b * tl.num_programs(0) + pid_n
    n = pid_n * ROWS + tl.arange(0, ROWS)
    mn = n < NP
    d = tl.arange(0, BLOCK_D)
    md = d < D
    NORM: tl.constexpr = USE_PN or USE_LN
    s_bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    s_pnw = tl.zeros([BLOCK_D], dtype=tl.float32)
    s_pnb = tl.zeros([BLOCK_D], dtype=tl.float32)
    s_lnw = tl.zeros([BLOCK_D], dtype=tl.float32)
    s_lnb = tl.zeros([BLOCK_D], dtype=tl.float32)
    s_pos = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for bi in range(0, BCHUNK):
        b = pid_b * BCHUNK + bi
        mask = (mn & (b < B))[:, None] & md[None, :]
        b64 = b.to(tl.int64)
        g_row = (b64 * T + R0 + n) * D
        g = tl.load(grad_ptr + g_row[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
        x_row = (b64 * NP + n) * D
        if NORM:
            x = tl.load(x0_ptr + x_row[:, None] + d[None, :], mask=mask, other=0.0)
            if USE_PN:
                xh1, rs1 = _ln_stats(x, md, mask, D, pn_eps)
                x = xh1
                if PN_W:
                    x = x * tl.load(pn_w_ptr + d, mask=md, other=0.0)[None, :]
                if PN_B:
                    x = x + tl.load(pn_b_ptr + d, mask=md, other=0.0)[None, :]
            if USE_LN:
                if HAS_POS:
                    x += tl.load(pos_ptr + n.to(tl.int64)[:, None] * D + d[None, :], mask=mask, other=0.0)
                xh2, rs2 = _ln_stats(x, md, mask, D, ln_eps)
                s_lnw += tl.sum(g * xh2, 0)
                s_lnb += tl.sum(g, 0)
                g = _ln_bwd(g, xh2, rs2, d, md, mask, D, ln_w_ptr, LN_W)
        s_pos += g
        if USE_PN:
            s_pnw += tl.sum(g * xh1, 0)
            s_pnb += tl.sum(g, 0)
            g = _ln_bwd(g, xh1, rs1, d, md, mask, D, pn_w_ptr, PN_W)
        s_bias += tl.sum(g, 0)
        _store_rounded(g0_ptr + x_row[:, None] + d[None, :], g, mask, F32_DOT)
    part = part_ptr + pid.to(tl.int64) * D + d
    stride = tl.cast(NPROG, tl.int64) * D
    tl.store(part, s_bias, mask=md)
    if USE_PN:
        if PN_W:
            tl.store(part + stride, s_pnw, mask=md)
        if PN_B:
            tl.store(part + 2 * stride, s_pnb, mask=md)
    if USE_LN:
        if LN_W:
            tl.store(part + 3 * stride, s_lnw, mask=md)
        if LN_B:
            tl.store(part + 4 * stride, s_lnb, mask=md)
    if HAS_POS:
        p_row = (pid_b.to(tl.int64) * NP + n) * D
        tl.store(dpos_ptr + p_row[:, None] + d[None, :], s_pos, mask=mn[:, None] & md[None, :])


@triton.jit
def _patch_dweight_kernel(img_ptr, g0_ptr, dw_ptr, M, D, C, H, W, NP, Gw, s_b, s_c, s_h, s_w, M_SPLIT,
                          P: tl.constexpr, PAD: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          F32_DOT: tl.constexpr):
    """dw[s, d, k] = sum over rows m in [s M_SPLIT, (s + 1) M_SPLIT) of g0[m, d] patch[m, k] (an implicit GEMM
    reducing over the token rows: the patch tile gathered from the images as in the forward; g0 rounded to
    the images' dtype for the dot). One program per [BLOCK_N, BLOCK_K] tile of split s (axis 1)."""
    K = C * P * P
    pid = tl.program_id(0)
    s = tl.program_id(1)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_n = pid // num_k
    pid_k = pid % num_k
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < D
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mk = rk < K
    c, ph, pw = _patch_cols(rk, P)
    a_col = c * s_c + ph * s_h + pw * s_w  # [BLOCK_K]
    m_lo = s * M_SPLIT
    m_hi = tl.minimum(m_lo + M_SPLIT, M)
    dt: tl.constexpr = img_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mm = rm < m_hi
        b, n, y0, x0 = _patch_rows(rm, NP, Gw, P)
        a_row = b.to(tl.int64) * s_b + y0 * s_h + x0 * s_w
        a_mask = mm[:, None] & mk[None, :]
        a_mask = _pad_mask(a_mask, y0, x0, ph, pw, H, W, PAD)
        a = tl.load(img_ptr + a_row[:, None] + a_col[None, :], mask=a_mask, other=0.0)
        g = tl.load(g0_ptr + rm.to(tl.int64)[None, :] * D + rn[:, None], mask=mn[:, None] & mm[None, :], other=0.0)
        acc = _dot(_round_to(g, dt, F32_DOT), a, acc, F32_DOT)
    o_row = (s.to(tl.int64) * D + rn) * K
    tl.store(dw_ptr + o_row[:, None] + rk[None, :], acc, mask=mn[:, None] & mk[None, :])


@triton.jit
def _patch_dimages_kernel(g0_ptr, w_ptr, dimg_ptr, M, D, C, H, W, NP, Gw,
                          P: tl.constexpr, PAD: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          F32_DOT: tl.constexpr):
    """dp[m, k] = sum_d g0[m, d] weight[d, k] (g0 rounded to the weight's dtype for the dot), each (m, k)
    stored straight at its pixel of the contiguous fp32 d_images [B, C, H, W] (implicit col2im: patches do
    not overlap, so every pixel is written exactly once; the zero-padding pixels are dropped). One program
    per [BLOCK_M, BLOCK_K] tile, reduction over D in BLOCK_N steps."""
    K = C * P * P
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_m = pid // num_k
    pid_k = pid % num_k
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = rm < M
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mk = rk < K
    dt: tl.constexpr = w_ptr.dtype.element_ty
    g_row = rm.to(tl.int64) * D
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_N):
        rd = d0 + tl.arange(0, BLOCK_N)
        md = rd < D
        g = tl.load(g0_ptr + g_row[:, None] + rd[None, :], mask=mm[:, None] & md[None, :], other=0.0)
        w = tl.load(w_ptr + rd.to(tl.int64)[:, None] * K + rk[None, :], mask=md[:, None] & mk[None, :], other=0.0)
        acc = _dot(_round_to(g, dt, F32_DOT), w, acc, F32_DOT)
    b, n, y0, x0 = _patch_rows(rm, NP, Gw, P)
    c, ph, pw = _patch_cols(rk, P)
    o_row = b.to(tl.int64) * C * H * W + y0 * W + x0
    o_col = c * (H * W) + ph * W + pw
    mask = mm[:, None] & mk[None, :]
    mask = _pad_mask(mask, y0, x0, ph, pw, H, W, PAD)
    tl.store(dimg_ptr + o_row[:, None] + o_col[None, :], acc, mask=mask)


# Under TRITON_INTERPRET=1 @triton.jit yields an interpreted function.
_INTERPRETED = type(_patch_gemm_kernel).__name__ == "InterpretedFunction"


# ---------------------------------------------------------------------------------------------
# launch configuration

def block_config(kind: str, element_size: int = 2, D: int | None = None, pad: bool = False) -> dict:
    """Tile sizes and launch options per kernel kind.

    "gemm" (by input element size, 4 fp32 or 2 bf16 / fp16, and D): 128 x 128 output tiles, BLOCK_K 64
    (16-bit) / 32 (fp32), 8 warps, 3 stages. With ``D % 16 != 0`` (Triton then knows no alignment of
    the output rows: one 64-bit address per element in the epilogue) 64 x 64 tiles and BLOCK_K 32
    (128 x 64 tiles needed 255 registers for fp32 and spilled for 16-bit images with no aligned
    stride or pointer; 64 x 64: 64..130 registers).
    "norm" (by D): the whole row in one ``BLOCK_D = next_power_of_2(D)`` block, ``ROWS`` rows per
    program (about 4096 fp32 values per program).
    "dweight" / "dimages" (the backward GEMMs; ``pad``: H or W not a multiple of P): see below.

    Chosen to compile for sm_90a with wgmma, no spills and shared memory well under the Hopper limit with
    triton 3.6 and 3.8 (see AOT_SPECS / tests/test_aot_sm90.py; the GEMMs were also compiled for P 14 / 16,
    D 768 / 1000, every layout and padding, and the row kernels for D 768 / 1000 / 1280 and every
    LayerNorm combination, with both tritons, none spilling); not tuned on a GPU."""
    if kind == "gemm":
        if D is not None and D % 16:
            return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3)
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64 if element_size <= 2 else 32, num_warps=8, num_stages=3)
    if kind in ("dweight", "dimages"):
        # backward GEMMs; the reduction tile (dweight: BLOCK_M token rows, dimages: BLOCK_N of D) 64 (16-bit) /
        # 32 (fp32), outputs 128 x 128 (64 x 64 when D % 16 != 0 or with padding: the padding masks of 128 x 128
        # d_images tiles spilled 0.9 to 2.8 KB, and d_weight's up to 64 B with triton 3.6): 96 KiB of shared
        # memory in 3 stages
        red = 64 if element_size <= 2 else 32
        out = 64 if (D is not None and D % 16) or pad else 128
        if kind == "dweight":
            return dict(BLOCK_M=red, BLOCK_N=out, BLOCK_K=out, num_warps=8, num_stages=3)
        return dict(BLOCK_M=out, BLOCK_N=red, BLOCK_K=out, num_warps=8, num_stages=3)
    if kind == "norm_bwd":
        # half the forward's rows, 4 warps up to BLOCK_D 2048: the forward's rows with 8 warps spilled 8 B at
        # D 768 / 1000 with both LayerNorms and triton 3.6; other mixes of rows and warps spilled elsewhere
        cfg = block_config("norm", 4, D)
        cfg["ROWS"] = max(1, cfg["ROWS"] // 2)
        cfg["num_warps"] = 4 if cfg["BLOCK_D"] <= 2048 else 8
        return cfg
    if kind == "norm":
        if D is None:
            raise ValueError("block_config('norm') needs D")
        bd = next_pow2(max(int(D), 1))
        rows = max(1, min(16, 4096 // bd))
        return dict(BLOCK_D=bd, ROWS=rows, num_warps=8 if bd >= 2048 else 4, num_stages=1)
    raise ValueError(f"unknown kernel kind {kind!r}")


def _validate(images, weight, bias, pos, pn_weight, pn_bias, pn_eps, use_pn, ln_weight, ln_bias, ln_eps, use_ln,
              patch_size, prefix_tokens, out):
    """Checks every argument (ValueError naming it); returns (B, C, H, W, D, K, P, R0, Gh, Gw)."""
    import torch

    _check_float_input("images", images, "B, C, H, W", _INTERPRETED)
    B, C, H, W = images.shape
    _check(C >= 1 and H >= 1 and W >= 1, lambda: f"images must have C, H, W >= 1, got shape {tuple(images.shape)}")
    _check(_is_int(patch_size) and patch_size >= 1, lambda: f"patch_size must be an int >= 1, got {patch_size!r}")
    _check(_is_int(prefix_tokens) and prefix_tokens >= 0,
           lambda: f"prefix_tokens must be an int >= 0, got {prefix_tokens!r}")
    P, R0 = int(patch_size), int(prefix_tokens)
    K = C * P * P
    _check(isinstance(weight, torch.Tensor), lambda: f"weight must be a torch.Tensor, got {type(weight).__name__}")
    _check(weight.dim() == 2 and weight.shape[1] == K and weight.shape[0] >= 1,
           lambda: f"weight must be [D, K] with K = C * P * P = {C} * {P} * {P} = {K}, got shape {tuple(weight.shape)}")
    _check(weight.dtype == images.dtype,
           lambda: f"weight must have the dtype of images ({images.dtype}), got {weight.dtype}")
    _check(weight.device == images.device, lambda: f"weight must be on {images.device} (images), got {weight.device}")
    _check(weight.is_contiguous(), "weight must be contiguous")
    D = weight.shape[0]
    Gh, Gw = -(-H // P), -(-W // P)
    for name, t, shape in (("bias", bias, (D,)), ("pos", pos, (Gh * Gw, D)), ("pn_weight", pn_weight, (D,)),
                           ("pn_bias", pn_bias, (D,)), ("ln_weight", ln_weight, (D,)), ("ln_bias", ln_bias, (D,))):
        if t is None:
            continue
        _check(isinstance(t, torch.Tensor), lambda: f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        _check(tuple(t.shape) == shape,
               lambda: f"{name} must have shape {shape} (D = weight.shape[0] = {D}, Gh x Gw = {Gh} x {Gw}), "
               f"got {tuple(t.shape)}")
        _check(t.dtype == torch.float32, lambda: f"{name} must be float32 (the compute dtype), got {t.dtype}")
        _check(t.device == images.device, lambda: f"{name} must be on {images.device} (images), got {t.device}")
        _check(t.is_contiguous(), lambda: f"{name} must be contiguous")
    for name, v in (("use_pn", use_pn), ("use_ln", use_ln)):
        _check(isinstance(v, bool), lambda: f"{name} must be a bool, got {type(v).__name__}")
    for name, v in (("pn_eps", pn_eps), ("ln_eps", ln_eps)):
        _check(isinstance(v, numbers.Real) and not isinstance(v, bool) and float(v) >= 0.0 and v == v,
               lambda: f"{name} must be a float >= 0, got {v!r}")
    if out is not None:
        shape = (B, R0 + Gh * Gw, D)
        _check(isinstance(out, torch.Tensor) and tuple(out.shape) == shape and out.dtype == images.dtype
               and out.device == images.device and out.is_contiguous(),
               lambda: f"out must be a contiguous {images.dtype} tensor of shape {shape} on {images.device}, got "
               + (f"{out.dtype} {tuple(out.shape)} on {out.device}" if isinstance(out, torch.Tensor)
                  else type(out).__name__))
    return B, C, H, W, D, K, P, R0, Gh, Gw


def _check_x0(name, x0, images, M, D):
    """``x0_out`` / ``x0``: None or a contiguous fp32 [M = B Gh Gw, D] tensor on the device of images."""
    import torch

    if x0 is None:
        return
    _check(isinstance(x0, torch.Tensor) and tuple(x0.shape) == (M, D) and x0.dtype == torch.float32
           and x0.device == images.device and x0.is_contiguous(),
           lambda: f"{name} must be None or a contiguous float32 tensor of shape {(M, D)} ([B * Gh * Gw, D]) on "
           f"{images.device}, got " + (f"{x0.dtype} {tuple(x0.shape)} on {x0.device}"
                                      + ("" if x0.is_contiguous() else ", not contiguous")
                                      if isinstance(x0, torch.Tensor) else type(x0).__name__))


def _cfg(kind, element_size, D, blocks, pad=False):
    cfg = block_config(kind, element_size, D, pad)
    if blocks:
        for k, v in blocks.items():
            if k in cfg:
                cfg[k] = int(v)
                _check(not (k.startswith("BLOCK") or k == "ROWS") or (cfg[k] >= 1 and cfg[k] & (cfg[k] - 1) == 0),
                       lambda: f"blocks[{k!r}] must be a power of 2, got {v!r}")
    return cfg


# ---------------------------------------------------------------------------------------------
# launcher (kernel contract of vlops.ops.patch_embed)

def patch_embed_fwd(images, weight, bias, pos, pn_weight, pn_bias, pn_eps, use_pn, ln_weight, ln_bias, ln_eps,
                    use_ln, patch_size, prefix_tokens, x0_out=None, *, out=None, blocks=None):
    """out [B, R0 + Gh * Gw, D] in images' dtype, rows R0.. written (see the module docstring and the
    contract in vlops/ops/patch_embed.py). ``x0_out``: None or a contiguous fp32 [B Gh Gw, D] that receives
    the pre-norm rows W p + bias (with a LayerNorm on they are staged there instead of in a scratch or in
    ``out``: no extra traffic; without one a second pass adds pos and rounds). Keyword-only (tests, tuning):
    ``out`` a preallocated contiguous output to write into (returned); ``blocks`` tile overrides (BLOCK_M,
    BLOCK_N, BLOCK_K, num_warps, num_stages of the GEMM; ROWS of the norm kernel; powers of 2)."""
    import torch

    B, C, H, W, D, K, P, R0, Gh, Gw = _validate(images, weight, bias, pos, pn_weight, pn_bias, pn_eps, use_pn,
                                                ln_weight, ln_bias, ln_eps, use_ln, patch_size, prefix_tokens, out)
    _check_x0("x0_out", x0_out, images, B * Gh * Gw, D)
    cfg = _cfg("gemm", images.element_size(), D, blocks)
    ncfg = _cfg("norm", 4, D, {k: v for k, v in (blocks or {}).items() if k == "ROWS"})
    NP = Gh * Gw
    T = R0 + NP
    M = B * NP
    if out is None:
        out = torch.empty(B, T, D, dtype=images.dtype, device=images.device)
    if M == 0:
        return out
    norm = use_pn or use_ln
    if x0_out is not None:  # the pre-norm rows go to the caller's x0_out, the row kernel finishes them
        stage, XT, XR0 = x0_out, NP, 0
    elif not norm or images.dtype == torch.float32:
        stage, XT, XR0 = out, T, R0  # final rows, or fp32 pre-norm rows normalised in place
    else:
        stage, XT, XR0 = torch.empty(M, D, dtype=torch.float32, device=images.device), NP, 0
    two_pass = norm or x0_out is not None
    opt = lambda t: stage if t is None else t  # noqa: E731 - stands in for an absent pointer (never read)
    s_b, s_c, s_h, s_w = images.stride()

    with torch.cuda.device(images.device) if images.is_cuda else contextlib.nullcontext():
        grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(D, cfg["BLOCK_N"]),)
        _patch_gemm_kernel[grid](
            images, weight, opt(bias), opt(pos), stage,
            M, D, C, H, W, NP, Gw, s_b, s_c, s_h, s_w, XT, XR0,
            P=P, PAD=(H % P != 0 or W % P != 0), HAS_BIAS=bias is not None, ADD_POS=pos is not None and not two_pass,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], F32_DOT=_INTERPRETED,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        if two_pass:
            _patch_norm_kernel[(cdiv(M, ncfg["ROWS"]),)](
                stage, opt(pos), opt(pn_weight), opt(pn_bias), opt(ln_weight), opt(ln_bias), out,
                M, D, NP, XT, XR0, T, R0, float(pn_eps), float(ln_eps),
                USE_PN=use_pn, PN_W=pn_weight is not None, PN_B=pn_bias is not None, HAS_POS=pos is not None,
                USE_LN=use_ln, LN_W=ln_weight is not None, LN_B=ln_bias is not None,
                ROWS=ncfg["ROWS"], BLOCK_D=ncfg["BLOCK_D"], F32_DOT=_INTERPRETED,
                num_warps=ncfg["num_warps"], num_stages=ncfg["num_stages"])
    return out


def _validate_bwd(grad, images, weight, bias, pos, pn_weight, pn_bias, pn_eps, use_pn, ln_weight, ln_bias, ln_eps,
                  use_ln, patch_size, prefix_tokens, need_images):
    import torch

    dims = _validate(images, weight, bias, pos, pn_weight, pn_bias, pn_eps, use_pn, ln_weight, ln_bias, ln_eps,
                     use_ln, patch_size, prefix_tokens, None)
    B, C, H, W, D, K, P, R0, Gh, Gw = dims
    shape = (B, R0 + Gh * Gw, D)
    _check(isinstance(grad, torch.Tensor), lambda: f"grad must be a torch.Tensor, got {type(grad).__name__}")
    _check(tuple(grad.shape) == shape,
           lambda: f"grad must have shape {shape} ([B, R0 + Gh * Gw, D]), got {tuple(grad.shape)}")
    _check(grad.dtype in (images.dtype, torch.float32),
           lambda: f"grad must have the dtype of images ({images.dtype}) or float32, got {grad.dtype}")
    _check(grad.device == images.device, lambda: f"grad must be on {images.device} (images), got {grad.device}")
    _check(grad.is_contiguous(), "grad must be contiguous")
    _check(isinstance(need_images, bool), lambda: f"need_images must be a bool, got {type(need_images).__name__}")
    return dims


def patch_embed_bwd(grad, images, weight, bias, pos, pn_weight, pn_bias, pn_eps, use_pn, ln_weight, ln_bias, ln_eps,
                    use_ln, patch_size, prefix_tokens, need_images, x0=None, *, blocks=None):
    """(d_images, d_weight, d_bias, d_pos, d_pn_weight, d_pn_bias, d_ln_weight, d_ln_bias), float32 and
    contiguous, None for an absent input (see the backward contract in vlops/ops/patch_embed.py and
    "Backward" in the module docstring). ``x0``: None or the forward's ``x0_out`` (fp32 [B Gh Gw, D], read
    only): with a LayerNorm on, the recompute GEMM is skipped. ``blocks``: tile overrides as for
    :func:`patch_embed_fwd` (BLOCK_M,
    BLOCK_N, BLOCK_K, num_warps, num_stages of the GEMMs, ROWS of the row kernel) plus ``BCHUNK`` (images per
    row-kernel program) and ``SPLIT_M`` (token rows per d_weight split, a multiple of BLOCK_M)."""
    import torch

    B, C, H, W, D, K, P, R0, Gh, Gw = _validate_bwd(grad, images, weight, bias, pos, pn_weight, pn_bias, pn_eps,
                                                    use_pn, ln_weight, ln_bias, ln_eps, use_ln, patch_size,
                                                    prefix_tokens, need_images)
    _check_x0("x0", x0, images, B * Gh * Gw, D)
    blocks = dict(blocks or {})
    bchunk = blocks.pop("BCHUNK", None)
    split_m = blocks.pop("SPLIT_M", None)
    es = images.element_size()
    cfg = _cfg("gemm", es, D, blocks)
    PAD = H % P != 0 or W % P != 0
    wcfg = _cfg("dweight", es, D, blocks, PAD)
    icfg = _cfg("dimages", es, D, blocks, PAD)
    ncfg = _cfg("norm_bwd", 4, D, {k: v for k, v in blocks.items() if k == "ROWS"})
    NP = Gh * Gw
    T = R0 + NP
    M = B * NP
    dev = images.device
    f32 = dict(dtype=torch.float32, device=dev)
    norm = use_pn or use_ln
    if M == 0:  # empty batch: every sum is zero
        z = lambda t: None if t is None else torch.zeros_like(t, dtype=torch.float32)  # noqa: E731
        return (torch.zeros(B, C, H, W, **f32) if need_images else None, torch.zeros(D, K, **f32), z(bias), z(pos),
                z(pn_weight) if use_pn else None, z(pn_bias) if use_pn else None,
                z(ln_weight) if use_ln else None, z(ln_bias) if use_ln else None)
    # g0, the gradient of x0, in the dtype both GEMMs take it in (see _patch_norm_bwd_kernel); x0 recomputed in
    # fp32 into its own buffer when a LayerNorm is on and the forward did not save it
    g0 = torch.empty(M, D, dtype=images.dtype, device=dev)
    x0_in = x0 if x0 is not None else (torch.empty(M, D, **f32) if norm else g0)  # g0: never read (no norm)
    s_b, s_c, s_h, s_w = images.stride()
    # row kernel grid: (patch-row blocks, image chunks); about 1024 programs, images in order within each
    n_prog_n = cdiv(NP, ncfg["ROWS"])
    if bchunk is None:
        bchunk = cdiv(B, max(1, min(B, cdiv(1024, n_prog_n))))
    _check(_is_int(bchunk) and bchunk >= 1, lambda: f"blocks['BCHUNK'] must be an int >= 1, got {bchunk!r}")
    n_prog_b = cdiv(B, bchunk)
    nprog = n_prog_n * n_prog_b
    part = torch.empty(5, nprog, D, **f32)
    opt = lambda t: part if t is None else t  # noqa: E731 - an fp32 stand-in for an absent pointer (never read)
    dpos_part = torch.empty(n_prog_b, NP, D, **f32) if pos is not None else None
    # d_weight splits over the token rows: about 264 programs (2 per H100 / H200 SM)
    bm = wcfg["BLOCK_M"]
    m_blocks = cdiv(M, bm)
    if split_m is None:
        tiles = cdiv(D, wcfg["BLOCK_N"]) * cdiv(K, wcfg["BLOCK_K"])
        split_m = cdiv(m_blocks, max(1, min(m_blocks, cdiv(264, tiles)))) * bm
    _check(_is_int(split_m) and split_m >= bm and split_m % bm == 0,
           lambda: f"blocks['SPLIT_M'] must be a multiple of BLOCK_M = {bm}, got {split_m!r}")
    n_split = cdiv(M, split_m)
    dw_part = torch.empty(n_split, D, K, **f32)
    d_images = torch.empty(B, C, H, W, **f32) if need_images else None
    kw = lambda c: dict(BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],  # noqa: E731
                        F32_DOT=_INTERPRETED, num_warps=c["num_warps"], num_stages=c["num_stages"])

    with torch.cuda.device(dev) if images.is_cuda else contextlib.nullcontext():
        if norm and x0 is None:  # x0 = W p + bias, fp32, recomputed
            _patch_gemm_kernel[(cdiv(M, cfg["BLOCK_M"]) * cdiv(D, cfg["BLOCK_N"]),)](
                images, weight, opt(bias), x0_in, x0_in,
                M, D, C, H, W, NP, Gw, s_b, s_c, s_h, s_w, NP, 0,
                P=P, PAD=PAD, HAS_BIAS=bias is not None, ADD_POS=False, **kw(cfg))
        _patch_norm_bwd_kernel[(n_prog_n, n_prog_b)](
            grad, x0_in, g0, opt(pos), opt(pn_weight), opt(pn_bias), opt(ln_weight), opt(ln_bias), part,
            opt(dpos_part),
            B, D, NP, T, R0, bchunk, nprog, float(pn_eps), float(ln_eps),
            USE_PN=use_pn, PN_W=pn_weight is not None, PN_B=pn_bias is not None, HAS_POS=pos is not None,
            USE_LN=use_ln, LN_W=ln_weight is not None, LN_B=ln_bias is not None,
            ROWS=ncfg["ROWS"], BLOCK_D=ncfg["BLOCK_D"], F32_DOT=_INTERPRETED, num_warps=ncfg["num_warps"],
            num_stages=ncfg["num_stages"])
        _patch_dweight_kernel[(cdiv(D, wcfg["BLOCK_N"]) * cdiv(K, wcfg["BLOCK_K"]), n_split)](
            images, g0, dw_part, M, D, C, H, W, NP, Gw, s_b, s_c, s_h, s_w, split_m, P=P, PAD=PAD, **kw(wcfg))
        if need_images:
            _patch_dimages_kernel[(cdiv(M, icfg["BLOCK_M"]) * cdiv(K, icfg["BLOCK_K"]),)](
                g0, weight, d_images, M, D, C, H, W, NP, Gw, P=P, PAD=PAD, **kw(icfg))
    # the partial sums, added in a fixed order (torch's reductions are deterministic)
    d_weight = dw_part[0] if n_split == 1 else dw_part.sum(0)
    sums = lambda j: part[j].sum(0)  # noqa: E731
    return (d_images, d_weight,
            sums(0) if bias is not None else None,
            None if pos is None else (dpos_part[0] if n_prog_b == 1 else dpos_part.sum(0)),
            sums(1) if use_pn and pn_weight is not None else None,
            sums(2) if use_pn and pn_bias is not None else None,
            sums(3) if use_ln and ln_weight is not None else None,
            sums(4) if use_ln and ln_bias is not None else None)


# ---------------------------------------------------------------------------------------------
# AOT specialisations (compiled for sm_90a by tests/test_aot_sm90.py, no GPU needed)

_ELEM_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


def _norm_scalar_type(name: str) -> str:
    return "fp32" if name.endswith("eps") else "i32"


def _int_scalar(name: str) -> str:
    return "i32"


def _aot_gemm(dtype: str, P: int = 16, out: str | None = None, layout: str = "nchw", pad: bool = False,
              bias: bool = True, pos: bool = True, D: int = 768, tiles: dict | None = None):
    """The GEMM kernel for ``dtype`` images, patch size ``P``, output ``out`` (default: ``dtype``, the
    one-pass case; "fp32" for pre-norm rows). ``layout`` "nchw": s_w = 1 (Triton specialises a
    stride of 1 to a constant), "nhwc" (channels_last): s_c = 1, "any": no unit stride and no
    alignment of the images or their strides (a strided slice at an odd offset). ``tiles``: overrides of
    the block_config entries (tile studies)."""
    fn = _patch_gemm_kernel
    out = out or dtype
    cfg = {**block_config("gemm", _ELEM_SIZE[dtype], D), **(tiles or {})}
    unit = {"nchw": {"s_w": 1}, "nhwc": {"s_c": 1}, "any": {}}[layout]
    constexprs = dict(P=P, PAD=pad, HAS_BIAS=bias, ADD_POS=pos and out == dtype, BLOCK_M=cfg["BLOCK_M"],
                      BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], F32_DOT=False, **unit)
    ptrs = {"img_ptr": dtype, "w_ptr": dtype, "bias_ptr": "fp32", "pos_ptr": "fp32", "out_ptr": out}
    signature = aot_signature(fn, constexprs, {a: f"*{t}" for a, t in ptrs.items()}, _int_scalar)
    # ViT shapes (224 px, C = 3): the strides other than the unit one divisible by 16 (channels_last
    # s_w = C = 3 is not); the kernel computes K = C P P itself
    divisible = [p for p in ptrs if layout != "any" or p != "img_ptr"] + (["D"] if D % 16 == 0 else [])
    divisible += [s for s in ("s_b", "s_c", "s_h") if s not in unit and layout != "any"]
    return {"name": f"patch_embed_gemm_{dtype}_p{P}_d{D}_out{out}_{layout}" + ("_pad" if pad else ""),
            "kernel": fn, "signature": signature, "constexprs": constexprs, "num_warps": cfg["num_warps"],
            "num_stages": cfg["num_stages"], "divisibility_16": divisible, "matmul": True}


def _aot_norm(out: str, D: int, use_pn: bool = False, use_ln: bool = True, affine: bool = True, pos: bool = True):
    fn = _patch_norm_kernel
    cfg = block_config("norm", 4, D)
    constexprs = dict(USE_PN=use_pn, PN_W=use_pn and affine, PN_B=use_pn and affine, HAS_POS=pos, USE_LN=use_ln,
                      LN_W=use_ln and affine, LN_B=use_ln and affine, ROWS=cfg["ROWS"], BLOCK_D=cfg["BLOCK_D"],
                      F32_DOT=False)
    signature = aot_signature(fn, constexprs, {"out_ptr": f"*{out}"}, _norm_scalar_type)
    flags = ("_pn" if use_pn else "") + ("_ln" if use_ln else "")
    return {"name": f"patch_embed_norm_{out}_d{D}{flags}", "kernel": fn, "signature": signature,
            "constexprs": constexprs, "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
            "divisibility_16": [a for a in fn.arg_names if a.endswith("_ptr")] + ["D"], "matmul": False,
            "vectorized": True}


def _aot_dweight(dtype: str, P: int = 16, layout: str = "nchw", pad: bool = False, D: int = 768,
                 tiles: dict | None = None):
    """The backward's d_weight GEMM (g0^T patches, reduction over token rows), as :func:`_aot_gemm`."""
    fn = _patch_dweight_kernel
    cfg = {**block_config("dweight", _ELEM_SIZE[dtype], D, pad), **(tiles or {})}
    unit = {"nchw": {"s_w": 1}, "nhwc": {"s_c": 1}, "any": {}}[layout]
    constexprs = dict(P=P, PAD=pad, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                      F32_DOT=False, **unit)
    ptrs = {"img_ptr": dtype, "g0_ptr": dtype, "dw_ptr": "fp32"}
    signature = aot_signature(fn, constexprs, {a: f"*{t}" for a, t in ptrs.items()}, _int_scalar)
    divisible = [p for p in ptrs if layout != "any" or p != "img_ptr"] + (["D"] if D % 16 == 0 else [])
    divisible += [s for s in ("s_b", "s_c", "s_h") if s not in unit and layout != "any"] + ["M_SPLIT"]
    return {"name": f"patch_embed_dweight_{dtype}_p{P}_d{D}_{layout}" + ("_pad" if pad else ""),
            "kernel": fn, "signature": signature, "constexprs": constexprs, "num_warps": cfg["num_warps"],
            "num_stages": cfg["num_stages"], "divisibility_16": divisible, "matmul": True}


def _aot_dimages(dtype: str, P: int = 16, pad: bool = False, D: int = 768):
    """The backward's d_images GEMM (g0 W scattered to the pixels of a contiguous fp32 d_images)."""
    fn = _patch_dimages_kernel
    cfg = block_config("dimages", _ELEM_SIZE[dtype], D, pad)
    constexprs = dict(P=P, PAD=pad, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                      F32_DOT=False)
    ptrs = {"g0_ptr": dtype, "w_ptr": dtype, "dimg_ptr": "fp32"}
    signature = aot_signature(fn, constexprs, {a: f"*{t}" for a, t in ptrs.items()}, _int_scalar)
    divisible = list(ptrs) + (["D"] if D % 16 == 0 else []) + ([] if pad else ["H", "W"])
    return {"name": f"patch_embed_dimages_{dtype}_p{P}_d{D}" + ("_pad" if pad else ""),
            "kernel": fn, "signature": signature, "constexprs": constexprs, "num_warps": cfg["num_warps"],
            "num_stages": cfg["num_stages"], "divisibility_16": divisible, "matmul": True}


def _aot_norm_bwd(grad: str, D: int, use_pn: bool = False, use_ln: bool = True, affine: bool = True,
                  pos: bool = True):
    """The backward's row kernel (LayerNorm backward(s) and the partial sums), ``grad`` and g0 in ``grad``'s
    dtype (the images')."""
    fn = _patch_norm_bwd_kernel
    cfg = block_config("norm_bwd", 4, D)
    constexprs = dict(USE_PN=use_pn, PN_W=use_pn and affine, PN_B=use_pn and affine, HAS_POS=pos, USE_LN=use_ln,
                      LN_W=use_ln and affine, LN_B=use_ln and affine, ROWS=cfg["ROWS"], BLOCK_D=cfg["BLOCK_D"],
                      F32_DOT=False)
    signature = aot_signature(fn, constexprs, {"grad_ptr": f"*{grad}", "g0_ptr": f"*{grad}"}, _norm_scalar_type)
    flags = ("_pn" if use_pn else "") + ("_ln" if use_ln else "") + ("_pos" if pos else "")
    return {"name": f"patch_embed_norm_bwd_{grad}_d{D}{flags}", "kernel": fn, "signature": signature,
            "constexprs": constexprs, "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
            "divisibility_16": [a for a in fn.arg_names if a.endswith("_ptr")] + ["D"], "matmul": False}


AOT_SPECS = [
    # one pass (no LayerNorm): timm ViT-B/16, SigLIP; fp32 / bf16 / fp16 images, NCHW
    *[_aot_gemm(dt) for dt in ("fp32", "bf16", "fp16")],
    # pre-norm rows in fp32 (a LayerNorm follows): CLIP ViT-L/14 (P = 14, K = 588) and ViT-B/16
    _aot_gemm("bf16", P=14, out="fp32", pos=False, D=1024),
    _aot_gemm("fp32", P=14, out="fp32", pos=False, D=1024),
    _aot_gemm("bf16", P=16, out="fp32", pos=False),
    # channels_last images, and H / W not multiples of P (dynamic_img_pad)
    _aot_gemm("bf16", layout="nhwc"),
    _aot_gemm("fp16", pad=True),
    # the slow path: no unit stride, nothing aligned, padding, D % 16 != 0 (64 x 64 tiles)
    *[_aot_gemm(dt, P=14, layout="any", pad=True, D=1000) for dt in ("fp32", "bf16")],
    # the row-wise norm pass: CLIP ln_pre (ViT-B D = 768, ViT-L D = 1024), timm patch norm + norm_pre
    _aot_norm("bf16", 768),
    _aot_norm("bf16", 1024),
    _aot_norm("fp32", 1024),
    _aot_norm("fp16", 768, use_pn=True, use_ln=True),
    # backward: the row kernel (LayerNorm backwards, partial sums), d_weight and d_images GEMMs
    _aot_norm_bwd("bf16", 768),
    _aot_norm_bwd("fp32", 1024, pos=False),
    _aot_norm_bwd("fp16", 768, use_pn=True, use_ln=True),
    _aot_norm_bwd("bf16", 768, use_ln=False),
    *[_aot_dweight(dt) for dt in ("fp32", "bf16", "fp16")],
    _aot_dweight("bf16", P=14, D=1024),
    _aot_dweight("bf16", layout="nhwc"),
    *[_aot_dweight(dt, P=14, layout="any", pad=True, D=1000) for dt in ("fp32", "bf16")],
    *[_aot_dimages(dt) for dt in ("fp32", "bf16", "fp16")],
    _aot_dimages("bf16", P=14, D=1024),
    *[_aot_dimages(dt, P=16, pad=True) for dt in ("fp32", "bf16")],
    _aot_dweight("bf16", P=14, layout="nhwc", pad=True),
    *[_aot_dimages(dt, P=14, pad=True, D=1000) for dt in ("fp32", "bf16")],
]
