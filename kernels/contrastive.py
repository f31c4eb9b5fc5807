"""Contrastive losses (CLIP / ALIGN / UniCL softmax, SigLIP sigmoid), tiled like flash attention.

The launchers take the kernel contract of :mod:`vlops.ops.contrastive` (``contrastive_lse``,
``clip_bwd``, ``siglip_fwd``, ``siglip_bwd``); each allocates and returns its float32 outputs. The
``N x M`` similarity matrix ``S = scale * a @ b.T`` never exists in memory. Two methods, chosen per
call by ``method=`` (default :func:`default_method`):

- **fused** (fp32 inputs, CPU tensors under the interpreter): every kernel recomputes its
  ``[BLOCK_X, BLOCK_Y]`` tiles of ``S`` from ``a`` and ``b`` with ``tl.dot`` (fp32 accumulation, a loop
  over ``D`` in ``BLOCK_D`` chunks, masked, so any ``D >= 1`` works) and reduces them at once; no
  workspace at all.
- **chunked** (16-bit inputs on CUDA): ``R`` rows of ``a`` at a time. The forward computes
  ``raw = a[rows] @ b.T`` with cuBLAS into an fp32 workspace (16-bit products are exact in fp32,
  fp32 accumulation) and one elementwise Triton pass reduces it (``_chunk_lse_kernel``: row
  partials and running column statistics; ``_chunk_siglip_kernel``: the loss). The backward computes
  ``W`` for the chunk straight from ``tl.dot`` tiles into a workspace of the input dtype
  (``_chunk_clip_w_kernel``, ``_chunk_siglip_kernel`` with ``GRAD``), then ``da[rows] = W @ b`` and
  ``db += W.T @ a[rows]`` are cuBLAS products with fp32 output. The workspace is at most
  ``WORKSPACE_BYTES`` (256 MiB; at least ``MIN_CHUNK_ROWS`` rows). Why: with ``D = 768`` a fused
  gradient kernel cannot hold a ``[BLOCK_X, D]`` fp32 accumulator in registers, so it recomputes S
  once per ``BLOCK_DO`` output features; on an H200 (N = 65536, D = 768, bf16) the fused CLIP
  gradient took 325 ms (242 ms with ``BLOCK_DO=512``) and the chunked one 45 ms
  (benchmarks/results/contrastive_tune_h200.txt).

Every fused kernel is written over an "x side" (the rows a program owns) and a "y side" (the rows it loops
over), so one kernel serves both directions: ``S.T = scale * b @ a.T``, and the SigLIP targets are
symmetric (``i == j``), so the column pass is the row pass with ``a`` and ``b`` swapped.

- ``_lse_kernel``: program per ``BLOCK_X`` rows of x; loop over y blocks with the online max /
  sum-exp of flash attention; writes ``log sum_j exp(S_ij)``. Launched twice (rows: x=a, y=b;
  columns: x=b, y=a), so S is computed twice: a single pass would need a cross-program reduction of
  the column sums (atomics and a second rescaling pass); two passes are deterministic and simple.
- ``_clip_grad_kernel``: program per (``BLOCK_X`` rows of x, ``BLOCK_DO`` output features); loop
  over y blocks: recompute S, ``W = c_x exp(S - lse_x) + c_y exp(S - lse_y)`` (<= |c_x| + |c_y|,
  no overflow), accumulate ``W @ y`` (second ``tl.dot``, W cast to the input dtype as flash
  attention does with P). Launched for ``da`` (x=a) and ``db`` (x=b). With ``D > BLOCK_DO`` the
  output features are split over ``cdiv(D, BLOCK_DO)`` programs, each recomputing its S tiles
  (a [BLOCK_X, D] fp32 accumulator for D = 512..1280 does not fit in registers).
- ``_siglip_fwd_kernel``: program per ``BLOCK_X`` rows; ``softplus(-z (S + bias))`` summed into
  one fp32 partial per program; the launcher sums the partials (deterministic, no atomics).
- ``_siglip_grad_kernel``: like the CLIP one with ``W = -z sigmoid(-z (S + bias))``. With ``LOSS`` the
  x=a launch also sums the loss terms (from the exp the sigmoid needs): ``siglip_fwd_bwd``, the forward of
  a call that needs gradients, is the backward's two launches and no ``_siglip_fwd_kernel`` pass (the
  chunked method likewise: ``_chunk_siglip_kernel`` with ``GRAD`` and ``LOSS``, no cuBLAS forward product).

``dscale = sum_ij R_ij (a_i . b_j - row_center_i) + C_ij (a_i . b_j - col_center_j)`` uses the raw
fp32 dot accumulator (the tile before it is
multiplied by ``scale``): exact to the dot's own rounding, no division by ``scale`` (which would
amplify rounding and need a guard for ``scale == 0``), and free. ``dscale`` / ``dbias`` come from
one fp32 partial per program (written by the ``pid_d == 0`` programs of the x=a launch) summed by
``torch.sum`` on the device: deterministic, no atomics, no host sync.

Numerics: ``scale`` and ``bias`` are loaded from their fp32 [1] device tensors inside the kernels
(no ``.item()``). Transcendentals are fp32 ``tl.exp`` / ``tl.log``. softplus(t) =
``max(t, 0) + log1p(exp(-|t|))`` with ``log1p(u) = log(1 + u) * u / ((1 + u) - 1)`` (exact for tiny
``u``; the interpreter has no libdevice), sigmoid(t) = ``1 / (1 + e)`` or ``e / (1 + e)`` with
``e = exp(-|t|)``: finite for any |S| (logit_scale 100 with unit-norm features gives |S| <= 100).
Row offsets are int64 (``N * D`` may exceed 2**31).

Precision of the dots: bf16 / fp16 inputs use bf16 / fp16 ``tl.dot`` or cuBLAS products (fp32
accumulation; the products of 16-bit operands are exact in fp32, so S is as good as fp32), and ``W``
is rounded to the input dtype for the ``W @ y`` product (as flash attention rounds P): <= 2**-8
(fp16 2**-11) relative per element, the gradients within ~4e-3 of the float64 contract. fp32
inputs: both dots use ``input_precision="tf32x3"`` (three tf32 wgmmas, ~fp32 accurate). S feeds
``exp``, which turns an absolute error of S into a relative error of W: a single tf32 pass (2**-11
relative per operand) would give ~1e-3 at logit_scale 100 with unit-norm features and ~0.1 with
|S| ~ 1e3; a single tf32 ``W @ y`` pass gave gradient errors of 5e-4..8e-4 on an H200, over the fp32
bound. Any fp32 implementation is further limited to ~``2**-22 * max|S|`` by the fp32 rounding of S
and of the LSEs. Under ``TRITON_INTERPRET=1`` every dot is exact fp32 (numpy), so only the last
limit applies there. On an H200 (torch 2.11, triton 3.6) tests/test_contrastive.py and
tests/test_contrastive_triton.py passed at commit 31f27f6 (fp32 fused, 16-bit chunked with the
backward's raw from cuBLAS); the backward that computes W from ``tl.dot`` tiles came after and was
checked there only by benchmarks/contrastive_tune.py (da within 2.9e-4 of an fp32 computation on 256
rows, dscale equal to the fused kernel's) and by the runner's comparison with open_clip.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._tl_common import _check, _dot, _round_to, _store_rounded, aot_signature, cdiv

__all__ = ["contrastive_lse", "clip_bwd", "siglip_fwd", "siglip_bwd", "siglip_fwd_bwd", "AOT_SPECS", "block_config",
           "default_method"]


# ---------------------------------------------------------------------------------------------
# device helpers (_dot, _round_to, _store_rounded: kernels/_tl_common.py)

@triton.jit
def _raw_dot(x_ptr, y_ptr, rx64, ry64, mx, my, D,
             BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr, F32_DOT: tl.constexpr):
    """``x[rx] @ y[ry].T`` as a [BLOCK_X, BLOCK_Y] fp32 tile (masked rows / features read as 0)."""
    acc = tl.zeros([BLOCK_X, BLOCK_Y], dtype=tl.float32)
    xp = x_ptr + rx64[:, None] * D
    yp = y_ptr + ry64[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        md = d < D
        xc = tl.load(xp + d[None, :], mask=mx[:, None] & md[None, :], other=0.0)
        yc = tl.load(yp + d[None, :], mask=my[:, None] & md[None, :], other=0.0)
        # fp32: tf32x3 (see _dot): S feeds exp(), so its absolute error is amplified by |S| (up to
        # ~100); one tf32 pass would give ~1e-3 relative at scale 100
        acc = _dot(xc, tl.trans(yc), acc, F32_DOT)
    return acc


@triton.jit
def _log1p_small(u):
    """log(1 + u) for u in [0, 1], accurate for tiny u (Goldberg's trick; no libdevice needed)."""
    v = 1.0 + u
    return tl.where(v == 1.0, u, tl.log(v) * (u / tl.where(v == 1.0, 1.0, v - 1.0)))


@triton.jit
def _siglip_t(raw, scale, bias, rx, ry, NEG_ONLY: tl.constexpr):
    """(t, z) with t = -z (S + bias): the argument of softplus / sigmoid, z = +-1."""
    logit = raw * scale + bias
    if NEG_ONLY:
        z = tl.full(logit.shape, -1.0, tl.float32)
    else:
        z = tl.where(rx[:, None] == ry[None, :], 1.0, -1.0)
    return -z * logit, z


# ---------------------------------------------------------------------------------------------
# kernels

@triton.jit
def _lse_kernel(x_ptr, y_ptr, scale_ptr, out_ptr, NX, NY, D,
                BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr, F32_DOT: tl.constexpr):
    """out[i] = log sum_j exp(scale * x_i . y_j), online over y blocks."""
    pid = tl.program_id(0)
    rx = pid * BLOCK_X + tl.arange(0, BLOCK_X)
    mx = rx < NX
    rx64 = rx.to(tl.int64)
    scale = tl.load(scale_ptr).to(tl.float32)
    m = tl.full([BLOCK_X], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_X], dtype=tl.float32)
    for y0 in range(0, NY, BLOCK_Y):
        ry = y0 + tl.arange(0, BLOCK_Y)
        my = ry < NY
        s = _raw_dot(x_ptr, y_ptr, rx64, ry.to(tl.int64), mx, my, D, BLOCK_X, BLOCK_Y, BLOCK_D, F32_DOT) * scale
        s = tl.where(my[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every y block has a valid column
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m = m_new
    tl.store(out_ptr + rx64, m + tl.log(l), mask=mx)


@triton.jit
def _clip_grad_kernel(x_ptr, y_ptr, scale_ptr, lse_x_ptr, lse_y_ptr, ctr_x_ptr, ctr_y_ptr, out_ptr, part_ptr,
                      NX, NY, D, c_x, c_y,
                      WRITE_PART: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, F32_DOT: tl.constexpr):
    """out[i, do] = sum_j W_ij y[j, do], W = c_x exp(S - lse_x[i]) + c_y exp(S - lse_y[j]);
    part[pid] = sum_{i in block, j} R_ij (x_i . y_j - ctr_x[i]) + C_ij (x_i . y_j - ctr_y[j]) with
    R = c_x exp(S - lse_x[i]), C = c_y exp(S - lse_y[j]) (WRITE_PART, by the pid_d == 0 programs)."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    rx = pid * BLOCK_X + tl.arange(0, BLOCK_X)
    mx = rx < NX
    rx64 = rx.to(tl.int64)
    do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mdo = do < D
    scale = tl.load(scale_ptr).to(tl.float32)
    lse_x = tl.load(lse_x_ptr + rx64, mask=mx, other=0.0)
    if WRITE_PART:
        ctr_x = tl.load(ctr_x_ptr + rx64, mask=mx, other=0.0)
    acc = tl.zeros([BLOCK_X, BLOCK_DO], dtype=tl.float32)
    part = tl.zeros([BLOCK_X], dtype=tl.float32)
    for y0 in range(0, NY, BLOCK_Y):
        ry = y0 + tl.arange(0, BLOCK_Y)
        my = ry < NY
        ry64 = ry.to(tl.int64)
        # issued before the S loop so that its latency hides behind it (only the inner loop is pipelined)
        yo = tl.load(y_ptr + ry64[:, None] * D + do[None, :], mask=my[:, None] & mdo[None, :], other=0.0)
        raw = _raw_dot(x_ptr, y_ptr, rx64, ry64, mx, my, D, BLOCK_X, BLOCK_Y, BLOCK_D, F32_DOT)
        s = raw * scale
        lse_y = tl.load(lse_y_ptr + ry64, mask=my, other=0.0)
        wr = c_x * tl.exp(s - lse_x[:, None])
        wc = c_y * tl.exp(s - lse_y[None, :])
        valid = mx[:, None] & my[None, :]
        w = tl.where(valid, wr + wc, 0.0)
        if WRITE_PART:
            ctr_y = tl.load(ctr_y_ptr + ry64, mask=my, other=0.0)
            t = wr * (raw - ctr_x[:, None]) + wc * (raw - ctr_y[None, :])
            part += tl.sum(tl.where(valid, t, 0.0), 1)
        acc = _dot(_round_to(w, yo.dtype, F32_DOT), yo, acc, F32_DOT)
    tl.store(out_ptr + rx64[:, None] * D + do[None, :], acc, mask=mx[:, None] & mdo[None, :])
    if WRITE_PART:
        tl.store(part_ptr + pid, tl.sum(part, 0), mask=pid_d == 0)


@triton.jit
def _siglip_fwd_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, part_ptr, NX, NY, D,
                       NEG_ONLY: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr,
                       BLOCK_D: tl.constexpr, F32_DOT: tl.constexpr):
    """part[pid] = sum_{i in block, j} softplus(-z_ij (S_ij + bias))."""
    pid = tl.program_id(0)
    rx = pid * BLOCK_X + tl.arange(0, BLOCK_X)
    mx = rx < NX
    rx64 = rx.to(tl.int64)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    part = tl.zeros([BLOCK_X], dtype=tl.float32)
    for y0 in range(0, NY, BLOCK_Y):
        ry = y0 + tl.arange(0, BLOCK_Y)
        my = ry < NY
        raw = _raw_dot(x_ptr, y_ptr, rx64, ry.to(tl.int64), mx, my, D, BLOCK_X, BLOCK_Y, BLOCK_D, F32_DOT)
        t, z = _siglip_t(raw, scale, bias, rx, ry, NEG_ONLY)
        sp = tl.maximum(t, 0.0) + _log1p_small(tl.exp(-tl.abs(t)))
        part += tl.sum(tl.where(mx[:, None] & my[None, :], sp, 0.0), 1)
    tl.store(part_ptr + pid, tl.sum(part, 0))


@triton.jit
def _siglip_grad_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, out_ptr, part_s_ptr, part_b_ptr, part_l_ptr, NX, NY, D,
                        NEG_ONLY: tl.constexpr, WRITE_PART: tl.constexpr, LOSS: tl.constexpr,
                        BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DO: tl.constexpr, F32_DOT: tl.constexpr):
    """out[i, do] = sum_j W_ij y[j, do], W = -z sigmoid(-z (S + bias)); partials of dscale / dbias
    (WRITE_PART) and, with LOSS too, of the loss sum softplus(-z (S + bias)) (_siglip_fwd_kernel's, from the
    same exp), by the pid_d == 0 programs."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    rx = pid * BLOCK_X + tl.arange(0, BLOCK_X)
    mx = rx < NX
    rx64 = rx.to(tl.int64)
    do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mdo = do < D
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    acc = tl.zeros([BLOCK_X, BLOCK_DO], dtype=tl.float32)
    part_s = tl.zeros([BLOCK_X], dtype=tl.float32)
    part_b = tl.zeros([BLOCK_X], dtype=tl.float32)
    part_l = tl.zeros([BLOCK_X], dtype=tl.float32)
    for y0 in range(0, NY, BLOCK_Y):
        ry = y0 + tl.arange(0, BLOCK_Y)
        my = ry < NY
        ry64 = ry.to(tl.int64)
        # issued before the S loop so that its latency hides behind it (only the inner loop is pipelined)
        yo = tl.load(y_ptr + ry64[:, None] * D + do[None, :], mask=my[:, None] & mdo[None, :], other=0.0)
        raw = _raw_dot(x_ptr, y_ptr, rx64, ry64, mx, my, D, BLOCK_X, BLOCK_Y, BLOCK_D, F32_DOT)
        t, z = _siglip_t(raw, scale, bias, rx, ry, NEG_ONLY)
        e = tl.exp(-tl.abs(t))
        sig = tl.where(t >= 0, 1.0, e) / (1.0 + e)  # sigmoid(t), stable both ways
        valid = mx[:, None] & my[None, :]
        w = tl.where(valid, -z * sig, 0.0)
        if WRITE_PART:
            part_s += tl.sum(w * raw, 1)
            part_b += tl.sum(w, 1)
            if LOSS:
                part_l += tl.sum(tl.where(valid, tl.maximum(t, 0.0) + _log1p_small(e), 0.0), 1)
        acc = _dot(_round_to(w, yo.dtype, F32_DOT), yo, acc, F32_DOT)
    tl.store(out_ptr + rx64[:, None] * D + do[None, :], acc, mask=mx[:, None] & mdo[None, :])
    if WRITE_PART:
        first = pid_d == 0
        tl.store(part_s_ptr + pid, tl.sum(part_s, 0), mask=first)
        tl.store(part_b_ptr + pid, tl.sum(part_b, 0), mask=first)
        if LOSS:
            tl.store(part_l_ptr + pid, tl.sum(part_l, 0), mask=first)


# Under TRITON_INTERPRET=1 @triton.jit yields an interpreted function.
_INTERPRETED = type(_lse_kernel).__name__ == "InterpretedFunction"


# ---------------------------------------------------------------------------------------------
# chunked kernels: elementwise passes over a [R, M] block of raw dots computed by a matrix product
# (cuBLAS on CUDA), R rows of a at a time (see _chunked_* below)

@triton.jit
def _chunk_lse_kernel(raw_ptr, R, M, scale_ptr, pm_ptr, pl_ptr, cm_ptr, cl_ptr, P_STRIDE,
                      BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program per BLOCK_M columns of raw [R, M]: t = scale * raw. Row partials over its columns
    (pm/pl[pid, r] = max_j t, sum_j exp(t - max)) and the running column statistics cm/cl[j]
    (max, sum exp(t - max) over every row seen so far) merged with these R rows."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mc = cols < M
    scale = tl.load(scale_ptr).to(tl.float32)
    c_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    c_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mr = rows < R
        valid = mr[:, None] & mc[None, :]
        t = tl.load(raw_ptr + rows.to(tl.int64)[:, None] * M + cols[None, :], mask=valid, other=0.0) * scale
        t = tl.where(valid, t, float("-inf"))
        r_m = tl.max(t, 1)
        r_m_safe = tl.where(mr, r_m, 0.0)
        r_l = tl.sum(tl.exp(t - r_m_safe[:, None]), 1)
        tl.store(pm_ptr + pid * P_STRIDE + rows, r_m, mask=mr)
        tl.store(pl_ptr + pid * P_STRIDE + rows, r_l, mask=mr)
        b_m = tl.max(t, 0)
        new_m = tl.where(mc, tl.maximum(c_m, b_m), 0.0)
        c_l = c_l * tl.exp(c_m - new_m) + tl.sum(tl.exp(t - new_m[None, :]), 0)
        c_m = tl.where(mc, new_m, float("-inf"))
    old_m = tl.load(cm_ptr + cols, mask=mc, other=float("-inf"))
    old_l = tl.load(cl_ptr + cols, mask=mc, other=0.0)
    new_m = tl.where(mc, tl.maximum(old_m, c_m), 0.0)
    new_l = old_l * tl.exp(old_m - new_m) + c_l * tl.exp(c_m - new_m)
    tl.store(cm_ptr + cols, new_m, mask=mc)
    tl.store(cl_ptr + cols, new_l, mask=mc)


@triton.jit
def _chunk_tile(R, M, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    """The [BLOCK_R, BLOCK_M] tile of program (pid_r, pid_m) in an [R, M] row-major chunk: rows, cols,
    their masks, the tile mask and the int64 element offsets."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mr = rows < R
    mc = cols < M
    return rows, cols, mr, mc, mr[:, None] & mc[None, :], rows.to(tl.int64)[:, None] * M + cols[None, :]


@triton.jit
def _chunk_clip_w_kernel(x_ptr, y_ptr, D, w_ptr, R, M, row0, scale_ptr, lse_r_ptr, lse_c_ptr, ctr_r_ptr, ctr_c_ptr,
                         part_ptr, c_r, c_c, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_D: tl.constexpr, F32_DOT: tl.constexpr):
    """w[i, j] = c_r exp(S - lse_r[row0 + i]) + c_c exp(S - lse_c[j]) in w's dtype (rounded to nearest
    even), S = scale * raw, raw = x[i] . y[j] (x: the chunk's R rows, tl.dot tiles);
    part[program] = sum R_ij (raw_ij - ctr_r) + C_ij (raw_ij - ctr_c)."""
    rows, cols, mr, mc, valid, offs = _chunk_tile(R, M, BLOCK_R, BLOCK_M)
    raw = _raw_dot(x_ptr, y_ptr, rows.to(tl.int64), cols.to(tl.int64), mr, mc, D, BLOCK_R, BLOCK_M, BLOCK_D,
                   F32_DOT)
    scale = tl.load(scale_ptr).to(tl.float32)
    s = raw * scale
    g = row0 + rows
    lse_r = tl.load(lse_r_ptr + g, mask=mr, other=0.0)
    lse_c = tl.load(lse_c_ptr + cols, mask=mc, other=0.0)
    wr = c_r * tl.exp(s - lse_r[:, None])
    wc = c_c * tl.exp(s - lse_c[None, :])
    _store_rounded(w_ptr + offs, wr + wc, valid, F32_DOT)
    ctr_r = tl.load(ctr_r_ptr + g, mask=mr, other=0.0)
    ctr_c = tl.load(ctr_c_ptr + cols, mask=mc, other=0.0)
    t = wr * (raw - ctr_r[:, None]) + wc * (raw - ctr_c[None, :])
    pidx = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(part_ptr + pidx, tl.sum(tl.sum(tl.where(valid, t, 0.0), 1), 0))


@triton.jit
def _chunk_siglip_kernel(raw_ptr, x_ptr, y_ptr, D, w_ptr, R, M, row0, scale_ptr, bias_ptr, part_ptr, part_b_ptr,
                         part_l_ptr, NEG_ONLY: tl.constexpr, GRAD: tl.constexpr, LOSS: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, F32_DOT: tl.constexpr):
    """Not GRAD: raw [R, M] read from raw_ptr, part[program] = sum softplus(-z (S + bias)). GRAD: raw =
    x[i] . y[j] (tl.dot tiles), w = -z sigmoid(-z (S + bias)) in w's dtype, part[program] = sum w * raw,
    part_b[program] = sum w (z = +1 where row0 + i == j), and with LOSS part_l[program] = the loss sum."""
    rows, cols, mr, mc, valid, offs = _chunk_tile(R, M, BLOCK_R, BLOCK_M)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    if GRAD:
        raw = _raw_dot(x_ptr, y_ptr, rows.to(tl.int64), cols.to(tl.int64), mr, mc, D, BLOCK_R, BLOCK_M, BLOCK_D,
                       F32_DOT)
    else:
        raw = tl.load(raw_ptr + offs, mask=valid, other=0.0)
    t, z = _siglip_t(raw, scale, bias, row0 + rows, cols, NEG_ONLY)
    pidx = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    if GRAD:
        e = tl.exp(-tl.abs(t))
        w = tl.where(valid, -z * (tl.where(t >= 0, 1.0, e) / (1.0 + e)), 0.0)
        _store_rounded(w_ptr + offs, w, valid, F32_DOT)
        tl.store(part_ptr + pidx, tl.sum(tl.sum(w * raw, 1), 0))
        tl.store(part_b_ptr + pidx, tl.sum(tl.sum(w, 1), 0))
        if LOSS:
            sp = tl.maximum(t, 0.0) + _log1p_small(e)
            tl.store(part_l_ptr + pidx, tl.sum(tl.sum(tl.where(valid, sp, 0.0), 1), 0))
    else:
        sp = tl.maximum(t, 0.0) + _log1p_small(tl.exp(-tl.abs(t)))
        tl.store(part_ptr + pidx, tl.sum(tl.sum(tl.where(valid, sp, 0.0), 1), 0))


# ---------------------------------------------------------------------------------------------
# launch configuration

def block_config(kind: str, element_size: int) -> dict:
    """Tile sizes and launch options per kernel kind ("lse", "fwd", "grad") and input element size
    (4 fp32, 2 bf16/fp16). Chosen to compile for sm_90a with wgmma, no spills and shared memory
    well under the Hopper limit (see AOT_SPECS / tests/test_aot_sm90.py); not tuned on a GPU."""
    half = element_size <= 2
    bd = 64 if half else 32
    if kind in ("lse", "fwd"):
        # 16-bit: BLOCK_Y=128 ran the row + column LSE of N=65536, D=768 bf16 in 31 ms on an H200
        # against 48 ms with BLOCK_Y=64 (benchmarks/contrastive_tune.py)
        return dict(BLOCK_X=128, BLOCK_Y=128 if half else 64, BLOCK_D=bd, num_warps=8, num_stages=3)
    if kind == "grad":
        # BLOCK_DO: output features per program; D > BLOCK_DO recomputes S per chunk. 256 for 16-bit
        # inputs (182 registers), 64 for fp32 (both dots tf32x3: BLOCK_DO=128 spills). 16-bit:
        # num_stages=3 took 327 ms against 482 ms with 2 (same H200 study). fp32: BLOCK_Y=32 (172 to 192
        # registers with triton 3.6 and 3.8); 64 x 64 tiles took 255 registers and spilled 72 to 184 bytes
        # with triton 3.6, the GPU machine's version (not timed on a GPU).
        return dict(BLOCK_X=64, BLOCK_Y=64 if half else 32, BLOCK_D=bd, BLOCK_DO=256 if half else 64,
                    num_warps=8, num_stages=3 if half else 2)
    raise ValueError(f"unknown kernel kind {kind!r}")


def _validate(a, b, scale, bias=None):
    import torch

    _check(a.dim() == 2 and b.dim() == 2, lambda: f"a and b must be 2-D, got shapes {tuple(a.shape)}, {tuple(b.shape)}")
    _check(a.shape[1] == b.shape[1],
           lambda: f"a [N, D] and b [M, D] must share D, got {tuple(a.shape)}, {tuple(b.shape)}")
    _check(a.shape[0] >= 1 and b.shape[0] >= 1 and a.shape[1] >= 1,
           lambda: f"a and b must be non-empty, got {tuple(a.shape)}, {tuple(b.shape)}")
    _check(a.dtype == b.dtype, lambda: f"a and b must share a dtype, got {a.dtype}, {b.dtype}")
    _check(a.dtype in (torch.float32, torch.float16, torch.bfloat16),
           lambda: f"a dtype must be fp32/fp16/bf16, got {a.dtype}")
    _check(a.device == b.device, lambda: f"a and b must be on one device, got {a.device}, {b.device}")
    _check(a.is_contiguous() and b.is_contiguous(), "a and b must be contiguous")
    for name, t in (("scale", scale), ("bias", bias)):
        if t is None:
            continue
        _check(t.dtype == torch.float32 and t.numel() == 1,
               lambda: f"{name} must be a float32 tensor of shape [1], got {t.dtype} {tuple(t.shape)}")
        _check(t.device == a.device, lambda: f"{name} must be on {a.device}, got {t.device}")


def _cfg(kind, a, blocks):
    cfg = block_config(kind, a.element_size())
    if blocks:
        for k, v in blocks.items():
            if k in cfg:
                cfg[k] = int(v)
    return cfg


def _grid_args(cfg, NX, D=None):
    grid = (cdiv(NX, cfg["BLOCK_X"]),) if D is None else (
        cdiv(NX, cfg["BLOCK_X"]), cdiv(D, cfg["BLOCK_DO"]))
    opts = {k: cfg[k] for k in cfg if k.startswith("BLOCK")}
    if D is None:
        opts.pop("BLOCK_DO", None)
    opts["F32_DOT"] = _INTERPRETED
    return grid, opts, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# ---------------------------------------------------------------------------------------------
# launchers (kernel contract of vlops.ops.contrastive)

def contrastive_lse(a, b, scale, *, blocks=None, method=None):
    """(row_lse [N], col_lse [M]) float32. Keyword-only (tests, tuning): ``blocks`` tile overrides,
    ``method`` "fused" / "chunked" (default: see :func:`default_method`)."""
    import torch

    _validate(a, b, scale)
    if _method(a, method) == "chunked":
        return _chunked_lse(a, b, scale, blocks)
    N, D = a.shape
    M = b.shape[0]
    cfg = _cfg("lse", a, blocks)
    row = torch.empty(N, dtype=torch.float32, device=a.device)
    col = torch.empty(M, dtype=torch.float32, device=a.device)
    for x, y, out, NX, NY in ((a, b, row, N, M), (b, a, col, M, N)):
        grid, consts, opts = _grid_args(cfg, NX)
        _lse_kernel[grid](x, y, scale, out, NX, NY, D, **consts, **opts)
    return row, col


def clip_bwd(a, b, scale, row_lse, col_lse, coef_row, coef_col, row_center, col_center, *, blocks=None,
             method=None):
    """(da [N, D], db [M, D], dscale [1]) float32 (see the module docstring)."""
    import torch

    _validate(a, b, scale)
    N, D = a.shape
    M = b.shape[0]
    for name, t, n in (("row_lse", row_lse, N), ("col_lse", col_lse, M), ("row_center", row_center, N),
                       ("col_center", col_center, M)):
        _check(t.dtype == torch.float32 and t.dim() == 1 and t.numel() == n and t.is_contiguous(),
               lambda: f"{name} must be a contiguous float32 [{n}], got {t.dtype} {tuple(t.shape)}")
        _check(t.device == a.device, lambda: f"{name} must be on {a.device}, got {t.device}")
    cr, cc = float(coef_row), float(coef_col)
    if _method(a, method) == "chunked":
        return _chunked_clip_bwd(a, b, scale, row_lse, col_lse, cr, cc, row_center, col_center, blocks)
    cfg = _cfg("grad", a, blocks)
    da = torch.empty(N, D, dtype=torch.float32, device=a.device)
    db = torch.empty(M, D, dtype=torch.float32, device=a.device)
    grid, consts, opts = _grid_args(cfg, N, D)
    part = torch.empty(grid[0], dtype=torch.float32, device=a.device)
    _clip_grad_kernel[grid](a, b, scale, row_lse, col_lse, row_center, col_center, da, part, N, M, D, cr, cc,
                            WRITE_PART=True, **consts, **opts)
    grid, consts, opts = _grid_args(cfg, M, D)
    _clip_grad_kernel[grid](b, a, scale, col_lse, row_lse, col_center, row_center, db, part, M, N, D, cc, cr,
                            WRITE_PART=False, **consts, **opts)
    return da, db, part.sum().reshape(1)


def siglip_fwd(a, b, scale, bias, negative_only, *, blocks=None, method=None):
    """loss_sum [1] float32: sum_ij softplus(-z_ij (S_ij + bias))."""
    import torch

    _validate(a, b, scale, bias)
    if _method(a, method) == "chunked":
        return _chunked_siglip_fwd(a, b, scale, bias, bool(negative_only), blocks)
    N, D = a.shape
    M = b.shape[0]
    cfg = _cfg("fwd", a, blocks)
    grid, consts, opts = _grid_args(cfg, N)
    part = torch.empty(grid[0], dtype=torch.float32, device=a.device)
    _siglip_fwd_kernel[grid](a, b, scale, bias, part, N, M, D, NEG_ONLY=bool(negative_only), **consts, **opts)
    return part.sum().reshape(1)


def siglip_bwd(a, b, scale, bias, negative_only, *, blocks=None, method=None):
    """(da [N, D], db [M, D], dscale [1], dbias [1]) float32."""
    return _siglip_grads(a, b, scale, bias, negative_only, False, blocks, method)


def siglip_fwd_bwd(a, b, scale, bias, negative_only, *, blocks=None, method=None):
    """(loss_sum [1], da [N, D], db [M, D], dscale [1], dbias [1]) float32: :func:`siglip_fwd` and
    :func:`siglip_bwd` from the backward's pass alone (the loss terms come from the exp the gradient
    computes anyway), one pass over S fewer."""
    da, db, ds, dbias, loss = _siglip_grads(a, b, scale, bias, negative_only, True, blocks, method)
    return loss, da, db, ds, dbias


def _siglip_grads(a, b, scale, bias, negative_only, loss, blocks, method):
    """(da, db, dscale, dbias) and with ``loss`` the loss sum too, as a fifth [1] tensor."""
    import torch

    _validate(a, b, scale, bias)
    neg = bool(negative_only)
    if _method(a, method) == "chunked":
        return _chunked_siglip_bwd(a, b, scale, bias, neg, blocks, loss)
    N, D = a.shape
    M = b.shape[0]
    cfg = _cfg("grad", a, blocks)
    da = torch.empty(N, D, dtype=torch.float32, device=a.device)
    db = torch.empty(M, D, dtype=torch.float32, device=a.device)
    grid, consts, opts = _grid_args(cfg, N, D)
    parts = [torch.empty(grid[0], dtype=torch.float32, device=a.device) for _ in range(3 if loss else 2)]
    part_l = parts[2] if loss else parts[0]  # never written without LOSS
    _siglip_grad_kernel[grid](a, b, scale, bias, da, parts[0], parts[1], part_l, N, M, D,
                              NEG_ONLY=neg, WRITE_PART=True, LOSS=bool(loss), **consts, **opts)
    grid, consts, opts = _grid_args(cfg, M, D)
    _siglip_grad_kernel[grid](b, a, scale, bias, db, parts[0], parts[1], part_l, M, N, D,
                              NEG_ONLY=neg, WRITE_PART=False, LOSS=False, **consts, **opts)
    return (da, db, *(p.sum().reshape(1) for p in parts))


# ---------------------------------------------------------------------------------------------
# the chunked method: R rows of a at a time, raw = a[rows] @ b.T by a matrix product into an fp32
# workspace [R, M] (cuBLAS on CUDA: 16-bit products are exact in fp32, fp32 accumulation), then one
# elementwise Triton pass over it; the backward's W @ b and W.T @ a are matrix products too. The
# workspace (raw in fp32 and W in the input dtype, ``(4 + element size) * R * M`` bytes) is bounded by
# WORKSPACE_BYTES: never the N x M matrix, unless it fits in that bound.

WORKSPACE_BYTES = 256 << 20
MIN_CHUNK_ROWS = 256  # below this the matrix products lose their efficiency
_CHUNK_BLOCKS = dict(BLOCK_R=32, BLOCK_M=128, num_warps=4)
_MM_DTYPE = {"ok": None}  # whether torch.mm(..., out_dtype=float32) works on CUDA (torch >= 2.8)


def default_method(a) -> str:
    """"chunked" for 16-bit inputs on a CUDA device (the products go through cuBLAS at full tensor-core
    rate), "fused" otherwise (fp32 inputs, whose fused tf32x3 dots are ~fp32 accurate; the interpreter)."""
    return "chunked" if a.is_cuda and a.element_size() == 2 and not _INTERPRETED else "fused"


def _method(a, method):
    if method is None:
        return default_method(a)
    _check(method in ("fused", "chunked"), lambda: f"method must be 'fused' or 'chunked', got {method!r}")
    return method


def _chunk_rows(a, M, blocks, elem_bytes):
    N = a.shape[0]
    if blocks and "CHUNK_ROWS" in blocks:
        return max(1, min(N, int(blocks["CHUNK_ROWS"])))
    return max(1, min(N, max(MIN_CHUNK_ROWS, WORKSPACE_BYTES // (M * elem_bytes))))


def _mm_f32(x, y, out, accumulate=False):
    """out (float32) = x @ y, or out += x @ y: products of the inputs' dtype, fp32 accumulation."""
    import torch

    if x.is_cuda and x.dtype != torch.float32 and _MM_DTYPE["ok"] is not False:
        try:
            if accumulate:
                torch.ops.aten.addmm.dtype_out(out, x, y, torch.float32, out=out)
            else:
                torch.ops.aten.mm.dtype_out(x, y, torch.float32, out=out)
            _MM_DTYPE["ok"] = True
            return
        except (RuntimeError, NotImplementedError, AttributeError):
            if _MM_DTYPE["ok"]:
                raise
            _MM_DTYPE["ok"] = False  # this torch has no fp32-output 16-bit products: widen instead
    x32, y32 = x.float(), y.float()  # exact widening
    if accumulate:
        torch.addmm(out, x32, y32, out=out)
    else:
        torch.mm(x32, y32, out=out)


def _dot_blocks(element_size: int, loss: bool = False) -> dict:
    """Tiles of the chunk kernels that compute raw with tl.dot: the fused LSE kernel's; 64 columns instead of
    128 for the SigLIP pass that also sums the loss (``LOSS``: 128 spilled 200 to 500 B at 255 registers on
    sm_90a, 64 uses 187 to 201 and none)."""
    cfg = block_config("lse", element_size)
    return dict(BLOCK_R=cfg["BLOCK_X"], BLOCK_M=64 if loss else cfg["BLOCK_Y"], BLOCK_D=cfg["BLOCK_D"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _chunk_grid(R, M, blk):
    return (cdiv(R, blk["BLOCK_R"]), cdiv(M, blk["BLOCK_M"]))


def _chunk_consts():
    return dict(BLOCK_R=_CHUNK_BLOCKS["BLOCK_R"], BLOCK_M=_CHUNK_BLOCKS["BLOCK_M"],
                num_warps=_CHUNK_BLOCKS["num_warps"])


def _chunked_lse(a, b, scale, blocks):
    import torch

    N, M = a.shape[0], b.shape[0]
    C = _chunk_rows(a, M, blocks, 4)
    f32 = dict(dtype=torch.float32, device=a.device)
    raw = torch.empty(C, M, **f32)
    n_cb = cdiv(M, _CHUNK_BLOCKS["BLOCK_M"])
    pm = torch.empty(n_cb, C, **f32)
    pl = torch.empty(n_cb, C, **f32)
    cm = torch.full((M,), float("-inf"), **f32)
    cl = torch.zeros(M, **f32)
    row = torch.empty(N, **f32)
    bt = b.t()
    for r0 in range(0, N, C):
        R = min(C, N - r0)
        _mm_f32(a[r0:r0 + R], bt, raw[:R])
        _chunk_lse_kernel[(n_cb,)](raw, R, M, scale, pm, pl, cm, cl, C, **_chunk_consts())
        torch.logsumexp(pm[:, :R] + torch.log(pl[:, :R]), 0, out=row[r0:r0 + R])
    return row, cm + torch.log(cl)


def _chunked_grads(a, b, blocks, n_parts, launch, loss=False):
    """The chunked backward: per chunk of R rows, ``launch(grid, ac, w, R, r0, parts, blk)`` writes W (the
    input dtype, from tl.dot tiles) and ``n_parts`` per-program partial sums; then ``da[rows] = W @ b`` and
    ``db += W.T @ a[rows]`` (cuBLAS, fp32 output). Returns da, db and the ``n_parts`` totals [1]."""
    import torch

    (N, D), M = a.shape, b.shape[0]
    C = _chunk_rows(a, M, blocks, a.element_size())
    f32 = dict(dtype=torch.float32, device=a.device)
    w = torch.empty(C, M, dtype=a.dtype, device=a.device)
    da = torch.empty(N, D, **f32)
    db = torch.zeros(M, D, **f32)
    blk = _dot_blocks(a.element_size(), loss)
    sums = [[] for _ in range(n_parts)]
    for r0 in range(0, N, C):
        R = min(C, N - r0)
        ac = a[r0:r0 + R]
        grid = _chunk_grid(R, M, blk)
        parts = [torch.empty(grid[0] * grid[1], **f32) for _ in range(n_parts)]
        launch(grid, ac, w, R, r0, parts, blk)
        for acc, part in zip(sums, parts):
            acc.append(part.sum())
        _mm_f32(w[:R], b, da[r0:r0 + R])
        _mm_f32(w[:R].t(), ac, db, accumulate=True)
    return (da, db, *(torch.stack(acc).sum().reshape(1) for acc in sums))


def _chunked_clip_bwd(a, b, scale, row_lse, col_lse, cr, cc, row_center, col_center, blocks):
    D, M = a.shape[1], b.shape[0]

    def launch(grid, ac, w, R, r0, parts, blk):
        _chunk_clip_w_kernel[grid](ac, b, D, w, R, M, r0, scale, row_lse, col_lse, row_center, col_center,
                                   parts[0], cr, cc, F32_DOT=_INTERPRETED, **blk)

    return _chunked_grads(a, b, blocks, 1, launch)


def _chunked_siglip_bwd(a, b, scale, bias, neg, blocks, loss=False):
    """(da, db, dscale, dbias) and with ``loss`` the loss sum (from the same W passes) as a fifth."""
    D, M = a.shape[1], b.shape[0]

    def launch(grid, ac, w, R, r0, parts, blk):
        _chunk_siglip_kernel[grid](w, ac, b, D, w, R, M, r0, scale, bias, parts[0], parts[1], parts[-1],
                                   NEG_ONLY=neg, GRAD=True, LOSS=bool(loss), F32_DOT=_INTERPRETED, **blk)

    return _chunked_grads(a, b, blocks, 3 if loss else 2, launch, loss)


def _chunked_siglip_fwd(a, b, scale, bias, neg, blocks):
    """The loss from raw = a[rows] @ b.T (cuBLAS, fp32 workspace) and one elementwise pass per chunk."""
    import torch

    (N, D), M = a.shape, b.shape[0]
    C = _chunk_rows(a, M, blocks, 4)
    f32 = dict(dtype=torch.float32, device=a.device)
    raw = torch.empty(C, M, **f32)
    blk = dict(_CHUNK_BLOCKS, BLOCK_D=16)
    bt = b.t()
    sums = []
    for r0 in range(0, N, C):
        R = min(C, N - r0)
        ac = a[r0:r0 + R]
        _mm_f32(ac, bt, raw[:R])
        grid = _chunk_grid(R, M, blk)
        part = torch.empty(grid[0] * grid[1], **f32)
        _chunk_siglip_kernel[grid](raw, ac, b, D, raw, R, M, r0, scale, bias, part, part, part, NEG_ONLY=neg,
                                   GRAD=False, LOSS=False, F32_DOT=_INTERPRETED, **blk)
        sums.append(part.sum())
    return torch.stack(sums).sum().reshape(1)


# ---------------------------------------------------------------------------------------------
# AOT specialisations (compiled for sm_90a by tests/test_aot_sm90.py, no GPU needed)

_ELEM_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2}
_KERNELS = {
    "lse": (_lse_kernel, "lse", ("x_ptr", "y_ptr")),
    "clip_grad": (_clip_grad_kernel, "grad", ("x_ptr", "y_ptr")),
    "siglip_fwd": (_siglip_fwd_kernel, "fwd", ("x_ptr", "y_ptr")),
    "siglip_grad": (_siglip_grad_kernel, "grad", ("x_ptr", "y_ptr")),
}
_SCALAR_TYPES = {"NX": "i32", "NY": "i32", "D": "i32", "c_x": "fp32", "c_y": "fp32"}


def _aot_spec(kernel: str, dtype: str, **flags):
    fn, kind, data_ptrs = _KERNELS[kernel]
    cfg = block_config(kind, _ELEM_SIZE[dtype])
    constexprs = {k: v for k, v in cfg.items() if k.startswith("BLOCK") and k in fn.arg_names}
    constexprs.update(flags, F32_DOT=False)
    signature = aot_signature(fn, constexprs, {n: f"*{dtype}" for n in data_ptrs}, _SCALAR_TYPES.__getitem__)
    flag_s = "".join(f"_{k.lower()}" for k, v in flags.items() if v)
    # The common case: D divisible by 16 (CLIP / SigLIP embed dims 512..1280), aligned base pointers.
    divisible = [n for n in fn.arg_names if n.endswith("_ptr")] + ["D"]
    return {"name": f"contrastive_{kernel}_{dtype}{flag_s}", "kernel": fn, "signature": signature,
            "constexprs": constexprs, "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
            "divisibility_16": divisible, "matmul": True}


def _aot_chunk_spec(kernel, dtype, **flags):
    fn = {"chunk_lse": _chunk_lse_kernel, "chunk_clip_w": _chunk_clip_w_kernel,
          "chunk_siglip": _chunk_siglip_kernel}[kernel]
    dot = kernel == "chunk_clip_w" or flags.get("GRAD", False)
    blk = (_dot_blocks(_ELEM_SIZE[dtype], flags.get("LOSS", False)) if dot
           else dict(_CHUNK_BLOCKS, BLOCK_D=16, num_stages=1))
    constexprs = {k: v for k, v in blk.items() if k in fn.arg_names}
    constexprs.update(flags)
    if "F32_DOT" in fn.arg_names:
        constexprs["F32_DOT"] = False
    ints = {"R", "M", "row0", "P_STRIDE", "D"}
    signature = aot_signature(fn, constexprs, {n: f"*{dtype}" for n in ("w_ptr", "x_ptr", "y_ptr")},
                              lambda n: "i32" if n in ints else "fp32")
    flag_s = "".join(f"_{k.lower()}" for k, v in flags.items() if v)
    return {"name": f"contrastive_{kernel}_{dtype}{flag_s}", "kernel": fn, "signature": signature,
            "constexprs": constexprs, "num_warps": blk["num_warps"], "num_stages": blk["num_stages"],
            "divisibility_16": [n for n in fn.arg_names if n.endswith("_ptr") or n in ("M", "D")], "matmul": dot}


AOT_SPECS = [
    _aot_chunk_spec("chunk_lse", "bf16"),
    *[_aot_chunk_spec("chunk_clip_w", dt) for dt in ("bf16", "fp16")],
    _aot_chunk_spec("chunk_siglip", "bf16", NEG_ONLY=False, GRAD=False, LOSS=False),
    _aot_chunk_spec("chunk_siglip", "bf16", NEG_ONLY=False, GRAD=True, LOSS=False),
    _aot_chunk_spec("chunk_siglip", "bf16", NEG_ONLY=False, GRAD=True, LOSS=True),  # siglip_fwd_bwd
    *[_aot_spec("lse", dt) for dt in ("fp32", "bf16", "fp16")],
    *[_aot_spec("clip_grad", dt, WRITE_PART=True) for dt in ("fp32", "bf16", "fp16")],
    _aot_spec("clip_grad", "bf16", WRITE_PART=False),
    *[_aot_spec("siglip_fwd", dt, NEG_ONLY=False) for dt in ("fp32", "bf16", "fp16")],
    _aot_spec("siglip_fwd", "bf16", NEG_ONLY=True),
    *[_aot_spec("siglip_grad", dt, NEG_ONLY=False, WRITE_PART=True, LOSS=False) for dt in ("fp32", "bf16", "fp16")],
    _aot_spec("siglip_grad", "bf16", NEG_ONLY=True, WRITE_PART=False, LOSS=False),
    *[_aot_spec("siglip_grad", dt, NEG_ONLY=False, WRITE_PART=True, LOSS=True) for dt in ("fp32", "bf16")],
]
