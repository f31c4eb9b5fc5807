"""ViLBERT co-attention, forward and backward, flash-attention style: both cross-attentions in one launch.

The launchers :func:`co_attention_fwd` and :func:`co_attention_bwd` take the kernel contract of
:mod:`vlops.ops.coattention` (same positional arguments as the CPU kernel and the reference) and return
its outputs. Direction ``dir = 0``: text queries ``tq`` over the image keys / values ``ik, iv`` with the
image stream's key padding; ``dir = 1``: image queries ``iq`` over ``tk, tv`` with the text stream's.

Design:

- Every kernel runs both directions in one launch: grid ``(tiles, B H, 2)``, axis 2 the direction.
  A program picks its direction's pointers, strides and lengths with ``tl.where`` on ``dir``
  (``_direction``, shared by the three kernels; the alignment of the strides survives: a select keeps
  the common divisibility of both operands), so one compiled body serves both. Axis 0 (the row tiles
  of that program's sequence, ``cdiv(max(Nt, Nv), BLOCK)`` of them; the surplus tiles of the shorter
  direction return at once) is the fastest, so the programs of one head run together and its keys /
  values stay in L2.
- Inputs are read in place through their batch, token and head strides (``stride(-1) == 1``): the
  views of a fused QKV projection are never copied. The batch term of every address is int64 (``B N H
  d`` may exceed 2**31); the token offset of a tile is int64 too and the key / query loops advance
  their pointers (no ``j * stride`` product that could overflow).
- Forward (``_co_attn_fwd_kernel``, one program per ``BLOCK_M`` queries): the online softmax of flash
  attention in base 2 (``s log2(e)``, ``exp2``), over key tiles of ``BLOCK_N``. ``S = Q K^T`` and
  ``acc += P V`` are ``tl.dot`` tiles (wgmma on Hopper) with fp32 accumulation; the score matrix never
  exists in memory. Writes ``out`` (``acc / l``, rounded to nearest even to the input dtype) and ``lse
  = (m + log2 l) ln 2`` (natural log, fp32).
- Key validity. Mode 0 ("zero"): the key loop stops at ``len[b]`` (the lengths fast path: tiles past
  it are never loaded); a row with no valid key ends with ``l = 0`` and stores ``out = 0``, ``lse =
  -inf``. Mode 1 ("vilbert"): every key takes part with ``s = scale (q . k) + (0 | -10000)`` in fp32 in
  that order, no tile skipped; only keys past ``N`` are excluded. The selects (``-inf`` for invalid
  keys, the mode-1 bias) run only on the tiles that need them, behind one uniform branch per tile: the
  partial last tile, tiles reaching past ``len`` (mode 1) and tiles of a direction that has a boolean
  mask (whose bytes are read only then); a full tile costs one multiply per score. Both masks arrive as
  ``uint8`` views (no copy); a stream without one passes a stand-in pointer that is never read.
- Dropout (``DROPOUT``): ``keep_ij`` from Philox4x32-10 (``kernels/_tl_common._philox4x32_10``) with
  counter ``(j, i, b H + h, dir)`` and key ``(seed & 0xffffffff, seed >> 32)``, one call per (query,
  key) pair, the first output only. ``keep = u >= dropout_p`` with ``u = uint32_to_uniform(x0)`` is
  evaluated as ``x0 >= T << 8`` for the integer threshold ``T`` the launcher finds once per
  ``dropout_p`` (:func:`_keep_threshold`: the smallest ``x >> 8`` whose float32 ``u`` compares
  ``>= dropout_p`` as torch compares a float32 tensor with a python float), the same bits as the
  reference with no float work in the kernel. ``l`` (hence ``lse``) sums the undropped ``p``; the
  kept ``p`` go into ``P V`` and the ``1 / (1 - p)`` factor is applied once to ``acc``.
- Backward, two launches (both directions each, no atomics, every sum in a fixed order, so the same
  bits on every run):

  1. ``_co_attn_bwd_dq_kernel``, one program per ``BLOCK_M`` queries: ``D_i = sum_c dout out`` in fp32
     (the flash-attention "preprocess", fused here since this program reads its rows' ``dout`` anyway,
     which saves a launch and a pass over ``dout``; stored to an fp32 ``[B, H, N]`` buffer per direction
     for launch 2), then over the key tiles (up to ``len[b]`` in mode 0): ``P = exp2(S log2 e - lse
     log2 e)``, ``dP = dout V^T`` (times ``Z`` with dropout), ``dS = P (dP - D)``, ``dq += dS K``;
     ``dq *= scale``.
  2. ``_co_attn_bwd_dkdv_kernel``, one program per ``BLOCK_N`` keys, over all query tiles: ``P^T``
     from ``K Q^T``, ``dv += (P Z)^T dout``, ``dP^T = V dout^T``, ``dk += dS^T Q``; ``dk *= scale``. A
     mode-0 key tile past ``len[b]`` skips the loop and stores zeros (invalid keys get ``dk = dv = 0``).

  ``lse = -inf`` (mode 0, no valid key) is read as ``+inf``, so its ``P`` is exactly 0 (no NaN).
- Register budget (see :func:`block_config`): fp32 operands go through tf32x3, whose split operands
  live in registers; a whole [rows, 128] fp32 tile as the register operand beside the accumulators
  spilled. So fp32 at head dim 128 (and fp32 without 16-byte alignment from 64) computes the score
  products ``Q K^T`` / ``dout V^T`` over the head dim in ``CHUNK_D = 32`` column pieces
  (``_raw_dot_chunked``: each piece loaded where it is used), and the dk / dv kernel may split its
  output columns into ``BLOCK_DO``-wide slices (a program per slice, S and dP recomputed per slice).
  fp32 inputs with head dim > 128 are rejected (ValueError: no tile fits in shared memory); 16-bit
  head dim 256 works.

Memory: no workspace in the forward; the backward allocates ``D`` (``4 B H (Nt + Nv)`` bytes) besides its
six outputs. Traffic per direction and head: the forward reads Q once and K, V once per query tile (from
L2 after the first), writes out and lse; the backward reads Q, K, V, dout (and out once) and writes the
gradients, recomputing S and P in both launches (and the dropout mask, one Philox call per pair per
launch: ~10 rounds of 32-bit multiplies per score, which makes dropout runs bound by integer work, not
by the tensor cores).

Numerics: fp32 accumulation for every input dtype. 16-bit inputs: bf16 / fp16 ``tl.dot`` (products exact
in fp32), ``P`` (forward) and ``P Z``, ``dS`` (backward) rounded to nearest even to the input dtype as
dot operands, as flash attention does (interpreter, bf16: outputs within ~1.2x, gradients within ~2x the
error of the float64 result rounded to bf16). fp32 inputs: every dot with ``input_precision="tf32x3"``
(three tf32 wgmmas, ~fp32 accurate); ``S`` feeds ``exp``, so one tf32 pass (2**-11 relative per operand)
would put an absolute error of ~1e-3 |S| on the exponent. The scores are scaled in fp32 (``scale log2
e`` rounded once; mode 1 on tiles with invalid keys: ``(scale (q . k) + bias) log2 e``), ``exp2`` /
``log2`` in fp32. Mode 1 rows whose keys are all invalid are ill-conditioned under the contract itself:
their fp32 scores ``s - 10000`` and lse (near -10000) have a spacing of 2**-10, so their ``p`` carry
relative errors of ~5e-4 in any fp32 implementation (this one included). Under ``TRITON_INTERPRET=1``
the dots are exact fp32 (``F32_DOT``) and bf16 rounding is done on the bits (see
``kernels/_tl_common._round_to``).

Checked only by the Triton interpreter (tests/test_coattention_triton.py: small shapes, several tiles,
against float64 math of the contract) and the sm_90a AOT compile (tests/test_aot_sm90.py: wgmma in every
kernel, no spills, shared memory under the Hopper limit); not yet run on a GPU. The tile sizes of
:func:`block_config` are chosen from the AOT report (registers, spills, shared memory), not tuned on a
GPU.
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import struct

import triton
import triton.language as tl

from ._tl_common import (_check, _check_float_input, _dot, _is_int, _philox4x32_10, _round_to, _store_rounded,
                         aot_signature, cdiv, next_pow2)

__all__ = ["co_attention_fwd", "co_attention_bwd", "AOT_SPECS", "block_config"]

_LOG2E = 1.4426950408889634  # (the kernels spell their constants out: 1 / ln 2, ln 2, -10000)


# ---------------------------------------------------------------------------------------------
# device functions (_dot, _round_to, _store_rounded, _philox4x32_10: kernels/_tl_common.py)

@triton.jit
def _keep(c0, c1, bh, dirn, seed_lo, seed_hi, keep_thr):
    """The dropout keep mask of the pairs (key ``c0``, query ``c1``) (int32 tensors that broadcast to
    the tile): x0 of Philox4x32-10(c0, c1, b H + h, dir; seed) >= keep_thr (uint32 compare)."""
    x0, _, _, _ = _philox4x32_10(c0.to(tl.uint32), c1.to(tl.uint32), bh.to(tl.uint32), dirn.to(tl.uint32),
                                 seed_lo.to(tl.uint32, bitcast=True), seed_hi.to(tl.uint32, bitcast=True))
    return x0 >= keep_thr.to(tl.uint32, bitcast=True)


@triton.jit
def _along_keys(v, KEYS_ON_ROWS: tl.constexpr):
    """A per-key vector broadcast along the key axis of a score tile."""
    if KEYS_ON_ROWS:
        r = v[:, None]
    else:
        r = v[None, :]
    return r


@triton.jit
def _scores(s, start_n, n_end, klen, m_ptr, has_m, scale, scale_log2, MODE: tl.constexpr, HAS_MASK: tl.constexpr,
            KEYS_ON_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Base-2 scores of the raw ``q . k`` tile ``s`` of keys ``start_n ..`` ([queries, keys], or [keys,
    queries] when KEYS_ON_ROWS). Mode 0: ``s scale log2 e``, -inf for invalid keys (``j >= n_end = min(len,
    N)`` or masked). Mode 1: ``(s scale + bias) log2 e`` with ``bias = 0 / -10000`` (valid: ``j < len`` and
    the mask), -inf for ``j >= n_end = N``. The selects and the bias run only on the tiles that need them
    (one uniform branch per tile): the partial last tile, tiles reaching past ``len`` (mode 1) and tiles of a
    direction with a boolean mask (its bytes are read only then); full tiles cost one multiply per score."""
    cols = start_n + tl.arange(0, BLOCK_N)
    partial = start_n + BLOCK_N > n_end
    if MODE == 0:
        r = s * scale_log2
        sel = partial
        if HAS_MASK:
            sel = sel | has_m
        if sel:
            ok = cols < n_end
            if HAS_MASK:
                ok = ok & (tl.load(m_ptr + cols, mask=ok & has_m, other=1) != 0)
            r = tl.where(_along_keys(ok, KEYS_ON_ROWS), r, float("-inf"))
    else:
        biased = start_n + BLOCK_N > klen
        if HAS_MASK:
            biased = biased | has_m
        # one-armed branch (the else value computed first): triton 3.6's software pipeliner fails on an
        # if / else that yields a value in a loop with cp.async loads (16-bit aligned tiles, sm_90a)
        r = s * scale_log2
        if biased:
            valid = cols < klen
            if HAS_MASK:
                valid = valid & (tl.load(m_ptr + cols, mask=(cols < n_end) & has_m, other=1) != 0)
            bias = tl.where(valid, 0.0, -10000.0)
            r = (s * scale + _along_keys(bias, KEYS_ON_ROWS)) * 1.4426950408889634
        if partial:
            r = tl.where(_along_keys(cols < n_end, KEYS_ON_ROWS), r, float("-inf"))
    return r


@triton.jit
def _raw_dot_chunked(a_ptrs, a_ok, b_ptrs, b_ok, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                     CHUNK_D: tl.constexpr, F32_DOT: tl.constexpr):
    """``sum_c a[:, c] b[:, c]`` as an fp32 [rows of a, rows of b] tile, the head dim read in CHUNK_D column
    pieces (``a_ptrs`` / ``b_ptrs``: [rows, CHUNK_D] pointers at column 0; ``a_ok`` / ``b_ok``: row masks).
    Used for fp32 inputs at large head dims, where a whole [rows, d] fp32 tile as the register operand
    of the tf32x3 wgmmas does not fit beside the accumulators."""
    dc = tl.arange(0, CHUNK_D)
    acc = tl.zeros([a_ptrs.shape[0], b_ptrs.shape[0]], dtype=tl.float32)
    for c in tl.static_range(0, BLOCK_D, CHUNK_D):
        mc = (c + dc) < HEAD_D
        a = tl.load(a_ptrs + c, mask=a_ok[:, None] & mc[None, :], other=0.0)
        b = tl.load(b_ptrs + c, mask=b_ok[:, None] & mc[None, :], other=0.0)
        acc = _dot(a, tl.trans(b), acc, F32_DOT)
    return acc


@triton.jit
def _direction(bh, d0, Nk, H,
               tq_ptr, tk_ptr, tv_ptr, iq_ptr, ik_ptr, iv_ptr, t_len_ptr, i_len_ptr, t_mask_ptr, i_mask_ptr,
               s_tq_b, s_tq_n, s_tq_h, s_tk_b, s_tk_n, s_tk_h, s_tv_b, s_tv_n, s_tv_h,
               s_iq_b, s_iq_n, s_iq_h, s_ik_b, s_ik_n, s_ik_h, s_iv_b, s_iv_n, s_iv_h,
               MODE: tl.constexpr, T_MASK: tl.constexpr, I_MASK: tl.constexpr):
    """The operands of head ``bh = b H + h`` in the direction ``d0`` selects (``dir == 0``: ``tq`` over
    ``ik, iv`` with the image stream's length and mask; else ``iq`` over ``tk, tv`` with the text stream's),
    ``Nk`` its key count. Returns ``(b64, h, q_ptr, k_ptr, v_ptr, sqn, skn, svn, klen, m_ptr, has_m,
    n_end)``: ``b`` as int64, the head, the q / k / v pointers at token 0 of (b, h) and their token
    strides, ``klen = clamp(len[b], 0, Nk)``, the mask bytes of row b (a stand-in when the stream has
    none: ``has_m`` false) and the end of the key loop, ``n_end`` (mode 0: ``klen``, the lengths fast
    path, key tiles past ``len[b]`` are never visited; mode 1: ``Nk``)."""
    b = bh // H
    h = bh - b * H
    b64 = b.to(tl.int64)
    q_ptr = tl.where(d0, tq_ptr, iq_ptr)
    k_ptr = tl.where(d0, ik_ptr, tk_ptr)
    v_ptr = tl.where(d0, iv_ptr, tv_ptr)
    sqn = tl.where(d0, s_tq_n, s_iq_n)
    skn = tl.where(d0, s_ik_n, s_tk_n)
    svn = tl.where(d0, s_iv_n, s_tv_n)
    q_ptr += b64 * tl.where(d0, s_tq_b, s_iq_b) + h * tl.where(d0, s_tq_h, s_iq_h)
    k_ptr += b64 * tl.where(d0, s_ik_b, s_tk_b) + h * tl.where(d0, s_ik_h, s_tk_h)
    v_ptr += b64 * tl.where(d0, s_iv_b, s_tv_b) + h * tl.where(d0, s_iv_h, s_tv_h)
    klen = tl.minimum(tl.maximum(tl.load(tl.where(d0, i_len_ptr, t_len_ptr) + b), 0), Nk)
    m_ptr = tl.where(d0, i_mask_ptr, t_mask_ptr) + b64 * Nk
    has_m = tl.where(d0, I_MASK, T_MASK)
    if MODE == 0:
        n_end = klen
    else:
        n_end = Nk
    return b64, h, q_ptr, k_ptr, v_ptr, sqn, skn, svn, klen, m_ptr, has_m, n_end


# ---------------------------------------------------------------------------------------------
# kernels

# the dropout key and threshold: never specialised (a value of 1 would become a constexpr, and each seed
# would compile its own kernel)
_NO_SPECIALIZE = ["keep_thr", "seed_lo", "seed_hi"]

@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _co_attn_fwd_kernel(
        tq_ptr, tk_ptr, tv_ptr, iq_ptr, ik_ptr, iv_ptr, t_len_ptr, i_len_ptr, t_mask_ptr, i_mask_ptr,
        t_out_ptr, i_out_ptr, t_lse_ptr, i_lse_ptr,
        s_tq_b, s_tq_n, s_tq_h, s_tk_b, s_tk_n, s_tk_h, s_tv_b, s_tv_n, s_tv_h,
        s_iq_b, s_iq_n, s_iq_h, s_ik_b, s_ik_n, s_ik_h, s_iv_b, s_iv_n, s_iv_h,
        H, Nt, Nv, scale, scale_log2, keep_thr, seed_lo, seed_hi, drop_scale,
        MODE: tl.constexpr, T_MASK: tl.constexpr, I_MASK: tl.constexpr, DROPOUT: tl.constexpr,
        HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CHUNK_D: tl.constexpr, F32_DOT: tl.constexpr):
    """out[b, i, h] = softmax_j(s_ij) (dropped) @ v and lse[b, h, i] for BLOCK_M queries of direction
    program_id(2) (0: tq over ik / iv, 1: iq over tk / tv), head (b, h) = program_id(1)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    dirn = tl.program_id(2)
    d0 = dirn == 0
    Nq = tl.where(d0, Nt, Nv)
    start_m = pid_m * BLOCK_M
    if start_m >= Nq:
        return
    Nk = tl.where(d0, Nv, Nt)
    b64, h, q_ptr, k_ptr, v_ptr, sqn, skn, svn, klen, m_ptr, has_m, n_end = _direction(
        bh, d0, Nk, H, tq_ptr, tk_ptr, tv_ptr, iq_ptr, ik_ptr, iv_ptr, t_len_ptr, i_len_ptr, t_mask_ptr, i_mask_ptr,
        s_tq_b, s_tq_n, s_tq_h, s_tk_b, s_tk_n, s_tk_h, s_tv_b, s_tv_n, s_tv_h,
        s_iq_b, s_iq_n, s_iq_h, s_ik_b, s_ik_n, s_ik_h, s_iv_b, s_iv_n, s_iv_h, MODE, T_MASK, I_MASK)
    HAS_MASK: tl.constexpr = T_MASK or I_MASK
    o_ptr = tl.where(d0, t_out_ptr, i_out_ptr)
    lse_ptr = tl.where(d0, t_lse_ptr, i_lse_ptr)

    rm = start_m + tl.arange(0, BLOCK_M)
    mm = rm < Nq
    dd = tl.arange(0, BLOCK_D)
    md = dd < HEAD_D
    rn = tl.arange(0, BLOCK_N)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    CHUNKED: tl.constexpr = CHUNK_D < BLOCK_D
    if CHUNKED:
        dc = tl.arange(0, CHUNK_D)
        qc_ptrs = q_ptr + rm64[:, None] * sqn + dc[None, :]
        kc_ptrs = k_ptr + rn64[:, None] * skn + dc[None, :]
    else:
        q = tl.load(q_ptr + rm64[:, None] * sqn + dd[None, :], mask=mm[:, None] & md[None, :], other=0.0)
        k_ptrs = k_ptr + rn64[:, None] * skn + dd[None, :]
    v_ptrs = v_ptr + rn64[:, None] * svn + dd[None, :]
    dt: tl.constexpr = v_ptr.dtype.element_ty

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, n_end, BLOCK_N):
        cols = start_n + rn
        cin = cols < n_end
        kmask = cin[:, None] & md[None, :]
        if CHUNKED:
            s = _raw_dot_chunked(qc_ptrs, mm, kc_ptrs, cin, HEAD_D, BLOCK_D, CHUNK_D, F32_DOT)
            kc_ptrs += BLOCK_N * skn
        else:
            k = tl.load(k_ptrs, mask=kmask, other=0.0)
            s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), F32_DOT)
            k_ptrs += BLOCK_N * skn
        s = _scores(s, start_n, n_end, klen, m_ptr, has_m, scale, scale_log2, MODE, HAS_MASK, False, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: p = exp2(-inf) = 0
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            p = tl.where(_keep(cols[None, :], rm[:, None], bh, dirn, seed_lo, seed_hi, keep_thr), p, 0.0)
        v = tl.load(v_ptrs, mask=kmask, other=0.0)
        acc = _dot(_round_to(p, dt, F32_DOT), v, acc, F32_DOT)
        m_i = m_new
        v_ptrs += BLOCK_N * svn

    empty = l_i == 0.0  # mode 0, no valid key: out = 0, lse = -inf
    inv = tl.where(empty, 0.0, drop_scale / tl.where(empty, 1.0, l_i))
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    row = (b64 * Nq + rm) * H + h  # contiguous [B, Nq, H, d]
    _store_rounded(o_ptr + row[:, None] * HEAD_D + dd[None, :], acc * inv[:, None], mm[:, None] & md[None, :],
                   F32_DOT)
    tl.store(lse_ptr + bh.to(tl.int64) * Nq + rm, lse, mask=mm)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _co_attn_bwd_dq_kernel(
        tq_ptr, tk_ptr, tv_ptr, iq_ptr, ik_ptr, iv_ptr, t_len_ptr, i_len_ptr, t_mask_ptr, i_mask_ptr,
        t_do_ptr, i_do_ptr, t_out_ptr, i_out_ptr, t_lse_ptr, i_lse_ptr, t_dl_ptr, i_dl_ptr, d_tq_ptr, d_iq_ptr,
        s_tq_b, s_tq_n, s_tq_h, s_tk_b, s_tk_n, s_tk_h, s_tv_b, s_tv_n, s_tv_h,
        s_iq_b, s_iq_n, s_iq_h, s_ik_b, s_ik_n, s_ik_h, s_iv_b, s_iv_n, s_iv_h,
        H, Nt, Nv, scale, scale_log2, keep_thr, seed_lo, seed_hi, drop_scale,
        MODE: tl.constexpr, T_MASK: tl.constexpr, I_MASK: tl.constexpr, DROPOUT: tl.constexpr,
        HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CHUNK_D: tl.constexpr, F32_DOT: tl.constexpr):
    """For BLOCK_M queries of direction program_id(2): D_i = sum_c dout out (stored to the delta buffer)
    and dq = scale sum_j P_ij (Z_ij dP_ij - D_i) k_j over the direction's keys."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    dirn = tl.program_id(2)
    d0 = dirn == 0
    Nq = tl.where(d0, Nt, Nv)
    start_m = pid_m * BLOCK_M
    if start_m >= Nq:
        return
    Nk = tl.where(d0, Nv, Nt)
    b64, h, q_ptr, k_ptr, v_ptr, sqn, skn, svn, klen, m_ptr, has_m, n_end = _direction(
        bh, d0, Nk, H, tq_ptr, tk_ptr, tv_ptr, iq_ptr, ik_ptr, iv_ptr, t_len_ptr, i_len_ptr, t_mask_ptr, i_mask_ptr,
        s_tq_b, s_tq_n, s_tq_h, s_tk_b, s_tk_n, s_tk_h, s_tv_b, s_tv_n, s_tv_h,
        s_iq_b, s_iq_n, s_iq_h, s_ik_b, s_ik_n, s_ik_h, s_iv_b, s_iv_n, s_iv_h, MODE, T_MASK, I_MASK)
    HAS_MASK: tl.constexpr = T_MASK or I_MASK

    rm = start_m + tl.arange(0, BLOCK_M)
    mm = rm < Nq
    dd = tl.arange(0, BLOCK_D)
    md = dd < HEAD_D
    rn = tl.arange(0, BLOCK_N)
    qmask = mm[:, None] & md[None, :]
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    row = (b64 * Nq + rm) * H + h  # contiguous [B, Nq, H, d]: dout, out, dq
    do_ptr = tl.where(d0, t_do_ptr, i_do_ptr)
    offs = row[:, None] * HEAD_D + dd[None, :]
    do = tl.load(do_ptr + offs, mask=qmask, other=0.0)
    o = tl.load(tl.where(d0, t_out_ptr, i_out_ptr) + offs, mask=qmask, other=0.0)
    CHUNKED: tl.constexpr = CHUNK_D < BLOCK_D
    if CHUNKED:
        dc = tl.arange(0, CHUNK_D)
        qc_ptrs = q_ptr + rm64[:, None] * sqn + dc[None, :]
        doc_ptrs = do_ptr + row[:, None] * HEAD_D + dc[None, :]
        kc_ptrs = k_ptr + rn64[:, None] * skn + dc[None, :]
        vc_ptrs = v_ptr + rn64[:, None] * svn + dc[None, :]
    else:
        q = tl.load(q_ptr + rm64[:, None] * sqn + dd[None, :], mask=qmask, other=0.0)
        v_ptrs = v_ptr + rn64[:, None] * svn + dd[None, :]
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lrow = bh.to(tl.int64) * Nq + rm
    tl.store(tl.where(d0, t_dl_ptr, i_dl_ptr) + lrow, delta, mask=mm)
    lse = tl.load(tl.where(d0, t_lse_ptr, i_lse_ptr) + lrow, mask=mm, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # no valid key: P = 0
    k_ptrs = k_ptr + rn64[:, None] * skn + dd[None, :]
    dt: tl.constexpr = k_ptr.dtype.element_ty

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, n_end, BLOCK_N):
        cols = start_n + rn
        cin = cols < n_end
        kmask = cin[:, None] & md[None, :]
        k = tl.load(k_ptrs, mask=kmask, other=0.0)
        if CHUNKED:
            s = _raw_dot_chunked(qc_ptrs, mm, kc_ptrs, cin, HEAD_D, BLOCK_D, CHUNK_D, F32_DOT)
            dp = _raw_dot_chunked(doc_ptrs, mm, vc_ptrs, cin, HEAD_D, BLOCK_D, CHUNK_D, F32_DOT)
            kc_ptrs += BLOCK_N * skn
            vc_ptrs += BLOCK_N * svn
        else:
            v = tl.load(v_ptrs, mask=kmask, other=0.0)
            s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), F32_DOT)
            dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), F32_DOT)
            v_ptrs += BLOCK_N * svn
        s = _scores(s, start_n, n_end, klen, m_ptr, has_m, scale, scale_log2, MODE, HAS_MASK, False, BLOCK_N)
        p = tl.exp2(s - lse2[:, None])
        if DROPOUT:
            dp = tl.where(_keep(cols[None, :], rm[:, None], bh, dirn, seed_lo, seed_hi, keep_thr),
                          dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = _dot(_round_to(ds, dt, F32_DOT), k, dq, F32_DOT)
        k_ptrs += BLOCK_N * skn
    _store_rounded(tl.where(d0, d_tq_ptr, d_iq_ptr) + offs, dq * scale, qmask, F32_DOT)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _co_attn_bwd_dkdv_kernel(
        tq_ptr, tk_ptr, tv_ptr, iq_ptr, ik_ptr, iv_ptr, t_len_ptr, i_len_ptr, t_mask_ptr, i_mask_ptr,
        t_do_ptr, i_do_ptr, t_lse_ptr, i_lse_ptr, t_dl_ptr, i_dl_ptr, d_tk_ptr, d_tv_ptr, d_ik_ptr, d_iv_ptr,
        s_tq_b, s_tq_n, s_tq_h, s_tk_b, s_tk_n, s_tk_h, s_tv_b, s_tv_n, s_tv_h,
        s_iq_b, s_iq_n, s_iq_h, s_ik_b, s_ik_n, s_ik_h, s_iv_b, s_iv_n, s_iv_h,
        H, Nt, Nv, scale, scale_log2, keep_thr, seed_lo, seed_hi, drop_scale,
        MODE: tl.constexpr, T_MASK: tl.constexpr, I_MASK: tl.constexpr, DROPOUT: tl.constexpr,
        HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CHUNK_D: tl.constexpr, BLOCK_DO: tl.constexpr, F32_DOT: tl.constexpr):
    """For BLOCK_N keys of direction program_id(2) (dir 0: image keys, dir 1: text keys), over all the
    direction's queries: dv = sum_i P_ij Z_ij dout_i, dk = scale sum_i P_ij (Z_ij dP_ij - D_i) q_i. With
    BLOCK_DO < BLOCK_D (only with CHUNK_D < BLOCK_D) program_id(0) also picks a BLOCK_DO-wide column slice
    of dk / dv; S and dP are then recomputed once per slice."""
    N_DO: tl.constexpr = BLOCK_D // BLOCK_DO
    tl.static_assert(N_DO == 1 or CHUNK_D < BLOCK_D)
    pid_n = tl.program_id(0) // N_DO
    pid_do = tl.program_id(0) % N_DO
    bh = tl.program_id(1)
    dirn = tl.program_id(2)
    d0 = dirn == 0
    Nk = tl.where(d0, Nv, Nt)
    start_n = pid_n * BLOCK_N
    if start_n >= Nk:
        return
    Nq = tl.where(d0, Nt, Nv)
    b64, h, q_ptr, k_ptr, v_ptr, sqn, skn, svn, klen, m_ptr, has_m, n_end = _direction(
        bh, d0, Nk, H, tq_ptr, tk_ptr, tv_ptr, iq_ptr, ik_ptr, iv_ptr, t_len_ptr, i_len_ptr, t_mask_ptr, i_mask_ptr,
        s_tq_b, s_tq_n, s_tq_h, s_tk_b, s_tk_n, s_tk_h, s_tv_b, s_tv_n, s_tv_h,
        s_iq_b, s_iq_n, s_iq_h, s_ik_b, s_ik_n, s_ik_h, s_iv_b, s_iv_n, s_iv_h, MODE, T_MASK, I_MASK)
    HAS_MASK: tl.constexpr = T_MASK or I_MASK
    if MODE == 0:
        m_hi = tl.where(start_n < klen, Nq, 0)  # a tile of invalid keys only: dk = dv = 0
    else:
        m_hi = Nq

    cols = start_n + tl.arange(0, BLOCK_N)
    mn = cols < Nk
    dd = pid_do * BLOCK_DO + tl.arange(0, BLOCK_DO)  # the columns of dk / dv (and of q, dout as dot operands)
    md = dd < HEAD_D
    kmask = mn[:, None] & md[None, :]
    c64 = cols.to(tl.int64)
    rm0 = tl.arange(0, BLOCK_M)
    rm64 = rm0.to(tl.int64)
    do_row = ((b64 * Nq + rm0) * H + h)[:, None] * HEAD_D
    do_ptr = tl.where(d0, t_do_ptr, i_do_ptr)
    q_ptrs = q_ptr + rm64[:, None] * sqn + dd[None, :]
    do_ptrs = do_ptr + do_row + dd[None, :]
    CHUNKED: tl.constexpr = CHUNK_D < BLOCK_D
    if CHUNKED:
        dc = tl.arange(0, CHUNK_D)
        kc_ptrs = k_ptr + c64[:, None] * skn + dc[None, :]
        vc_ptrs = v_ptr + c64[:, None] * svn + dc[None, :]
        qc_ptrs = q_ptr + rm64[:, None] * sqn + dc[None, :]
        doc_ptrs = do_ptr + do_row + dc[None, :]
    else:
        k = tl.load(k_ptr + c64[:, None] * skn + dd[None, :], mask=kmask, other=0.0)
        v = tl.load(v_ptr + c64[:, None] * svn + dd[None, :], mask=kmask, other=0.0)
    lrow = bh.to(tl.int64) * Nq
    lse_ptr = tl.where(d0, t_lse_ptr, i_lse_ptr) + lrow
    dl_ptr = tl.where(d0, t_dl_ptr, i_dl_ptr) + lrow
    dt: tl.constexpr = q_ptr.dtype.element_ty

    dk = tl.zeros([BLOCK_N, BLOCK_DO], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DO], dtype=tl.float32)
    for start_m in range(0, m_hi, BLOCK_M):
        rm = start_m + rm0
        mm = rm < Nq
        qmask = mm[:, None] & md[None, :]
        q = tl.load(q_ptrs, mask=qmask, other=0.0)
        do = tl.load(do_ptrs, mask=qmask, other=0.0)
        lse = tl.load(lse_ptr + rm, mask=mm, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(dl_ptr + rm, mask=mm, other=0.0)
        if CHUNKED:
            st = _raw_dot_chunked(kc_ptrs, mn, qc_ptrs, mm, HEAD_D, BLOCK_D, CHUNK_D, F32_DOT)
            dpt = _raw_dot_chunked(vc_ptrs, mn, doc_ptrs, mm, HEAD_D, BLOCK_D, CHUNK_D, F32_DOT)
            qc_ptrs += BLOCK_M * sqn
            doc_ptrs += BLOCK_M * H * HEAD_D
        else:
            st = _dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), F32_DOT)
            dpt = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), F32_DOT)
        st = _scores(st, start_n, n_end, klen, m_ptr, has_m, scale, scale_log2, MODE, HAS_MASK, True, BLOCK_N)
        pt = tl.exp2(st - lse2[None, :])
        if DROPOUT:
            keep = _keep(cols[:, None], rm[None, :], bh, dirn, seed_lo, seed_hi, keep_thr)
            pdt = tl.where(keep, pt * drop_scale, 0.0)
            dpt = tl.where(keep, dpt * drop_scale, 0.0)
        else:
            pdt = pt
        dv = _dot(_round_to(pdt, dt, F32_DOT), do, dv, F32_DOT)
        dst = pt * (dpt - delta[None, :])
        dk = _dot(_round_to(dst, dt, F32_DOT), q, dk, F32_DOT)
        q_ptrs += BLOCK_M * sqn
        do_ptrs += BLOCK_M * H * HEAD_D
    row = (b64 * Nk + cols) * H + h  # contiguous [B, Nk, H, d]
    offs = row[:, None] * HEAD_D + dd[None, :]
    _store_rounded(tl.where(d0, d_ik_ptr, d_tk_ptr) + offs, dk * scale, kmask, F32_DOT)
    _store_rounded(tl.where(d0, d_iv_ptr, d_tv_ptr) + offs, dv, kmask, F32_DOT)


# Under TRITON_INTERPRET=1 @triton.jit yields an interpreted function.
_INTERPRETED = type(_co_attn_fwd_kernel).__name__ == "InterpretedFunction"


# ---------------------------------------------------------------------------------------------
# launch configuration

def block_config(kind: str, element_size: int = 2, head_dim: int = 64, n_max: int | None = None,
                 dropout: bool = False, aligned: bool = True) -> dict:
    """Tiles and launch options of kernel ``kind`` ("fwd", "bwd_dq", "bwd_dkdv") for inputs of
    ``element_size`` bytes (4 fp32, 2 bf16 / fp16), head dim ``head_dim``, the longer sequence ``n_max =
    max(Nt, Nv)`` (None: long), with or without dropout, and whether every base pointer and stride is a
    multiple of 16 (``aligned``: what Triton specialises on, and what 16-byte loads need).

    Keys: BLOCK_M (queries per tile), BLOCK_N (keys per tile), BLOCK_D = ``max(16,
    next_power_of_2(head_dim))``, CHUNK_D (the head-dim piece of the score products; < BLOCK_D: read in
    pieces, see ``_raw_dot_chunked``), BLOCK_DO (dk / dv only: the output columns per program), num_warps,
    num_stages.

    - Forward, 16-bit: long sequences 128-query tiles (8 warps: two warpgroups of 64 rows) over 128 keys
      (head dim <= 64, no dropout) or 64 keys; short ones (``n_max <= 128``, ViLBERT / VQA: Nt 16..60,
      Nv 37..101) 64-query tiles, the smallest wgmma M of one warpgroup (a text tile of 20..60 queries
      wastes at most 44 rows, not 108).
    - Backward, 16-bit: dq 128 x 32 (head dim 128) / 128 x 64 tiles, dk / dv 128 keys x 32 queries (the
      tiles of flash attention 2's Triton backward); 64-query / 64-key tiles for short sequences.
    - fp32 (tf32x3: each dot is three wgmmas on split operands, the split A operand in registers) and
      head dim 256: smaller tiles. fp32 at head dim 128 reads the score products in 32-column pieces, dq
      takes 64 x 16 tiles and dk / dv 64 keys x 16 queries in 64-column slices (32 with dropout): a whole
      [rows, 128] fp32 register operand beside the accumulators spilled. 16-bit head dim 256: the dk / dv
      score products in 64-column pieces, 128-column slices.
    - Strides or pointers not multiples of 16 (one address per element, no 16-byte loads): 64-query
      tiles over 16..64 keys, 8 warps (4 for the smaller fp32 forward tiles), fp32 in 32-column pieces
      from head dim 64, dk / dv of fp32 in 32-column slices.

    Every choice was compiled for sm_90a with triton 3.6 (the GPU machine's) and 3.8 for head dims 64 / 128 /
    256 (fp32 up to 128), long and short, aligned or not, mode 0 and 1, without masks and with both, with and
    without dropout (480 specialisations per triton), and the branches changed by that check also at head dims
    16 / 32 and with one mask: wgmma, no register spills, shared memory under the Hopper limit. AOT_SPECS holds a
    subset, compiled by tests/test_aot_sm90.py with both tritons (benchmarks/results/aot_sm90*.txt list their
    registers and shared memory). Not tuned on a GPU. fp32 inputs with head dim > 128 have no configuration
    (their shared memory went over the limit)."""
    bd = max(16, next_pow2(max(int(head_dim), 1)))
    f32 = element_size >= 4
    short = n_max is not None and n_max <= 128
    if f32 and bd > 128:
        raise ValueError(f"no Triton co-attention configuration for fp32 inputs with head dim {head_dim} > 128")
    # the score products read in 32-column pieces for fp32 from head dim 128 on (64 without 16-byte loads)
    chunk = 32 if f32 and (bd >= 128 or (bd >= 64 and not aligned)) else bd
    do = bd  # dk / dv columns per program
    if kind == "fwd":
        if not aligned:
            if f32:
                cfg = dict(BLOCK_M=64, BLOCK_N=32 if bd <= 32 else 16, num_warps=8 if bd >= 128 else 4, num_stages=2)
            else:  # d 256: 32-key tiles spilled up to 172 B with triton 3.6
                cfg = dict(BLOCK_M=64, BLOCK_N=64 if bd <= 64 else (32 if bd <= 128 else 16), num_warps=8,
                           num_stages=2)
                chunk = 64 if bd >= 256 else bd
        elif f32:
            cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
        elif bd >= 256:
            cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
        elif short:
            cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=8 if bd >= 128 else 4, num_stages=2)
        else:
            cfg = dict(BLOCK_M=128, BLOCK_N=128 if bd <= 64 and not dropout else 64, num_warps=8, num_stages=3)
    elif kind == "bwd_dq":
        if not aligned:
            if f32:  # one stage: two spilled 4 to 36 B at d 128 with dropout
                cfg = dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=1)
            else:
                cfg = dict(BLOCK_M=64, BLOCK_N=32 if bd <= 128 else 16, num_warps=8, num_stages=2)
                chunk = 64 if bd >= 256 else bd
        elif f32:
            cfg = dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=2) if bd >= 128 else \
                dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
        elif bd >= 256:
            cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
        elif short:  # with dropout at d 128, 64 x 32 tiles and 8 warps: 64 x 64 spilled 12 to 24 B (4 or 8 warps)
            cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2) if dropout and bd >= 128 else \
                dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
        else:
            cfg = dict(BLOCK_M=128, BLOCK_N=32 if bd >= 128 else 64, num_warps=8, num_stages=2)
    elif kind == "bwd_dkdv":
        if not aligned:
            if f32:
                cfg = dict(BLOCK_M=16 if bd >= 64 else 32, BLOCK_N=64, num_warps=8, num_stages=2)
                do = 32 if bd >= 64 else bd
            else:
                cfg = dict(BLOCK_M=32 if bd <= 128 else 16, BLOCK_N=64, num_warps=8, num_stages=2)
                chunk, do = (64, 128) if bd >= 256 else (bd, bd)
        elif f32:
            if bd >= 128:
                cfg = dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=1)
                do = 32 if dropout else 64
            else:  # 16 x 128 tiles: 32 x 64 spilled 96 to 630 B (triton 3.6 and 3.8)
                cfg = dict(BLOCK_M=16, BLOCK_N=128, num_warps=8, num_stages=2)
        elif bd >= 256:
            cfg = dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2)
            chunk, do = 64, 128
        elif short:
            cfg = dict(BLOCK_M=32, BLOCK_N=64, num_warps=8 if bd >= 128 else 4, num_stages=2)
        else:  # 16-query tiles with dropout: 32 spilled 48 to 72 B at d 128 with triton 3.6
            cfg = dict(BLOCK_M=16 if dropout else 32, BLOCK_N=128, num_warps=8, num_stages=2)
        cfg["BLOCK_DO"] = do
    else:
        raise ValueError(f"unknown kernel kind {kind!r}")
    cfg["BLOCK_D"] = bd
    cfg["CHUNK_D"] = chunk
    return cfg


def _f32(x: float) -> float:
    """x rounded to the nearest float32 (ties to even), as a python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


@functools.lru_cache(maxsize=256)
def _keep_threshold(p: float) -> int:
    """The smallest ``k`` in [0, 2**24) such that ``uint32_to_uniform(k << 8) >= p`` as torch evaluates it
    (``u = float32(float32(k) 2**-24 + 2**-25)``, compared with ``p`` rounded to float32): a uint32 ``x``
    is kept iff ``x >> 8 >= k``, i.e. iff ``x >= k << 8``. ``u`` is non-decreasing in ``k`` and ``u(2**24
    - 1) = 1.0 >= float32(p)`` for ``p < 1``."""
    p32 = _f32(float(p))
    lo, hi = 0, 2**24 - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _f32(mid * 2.0**-24 + 2.0**-25) >= p32:  # exact sum in fp64, rounded once: torch's fp32 add
            hi = mid
        else:
            lo = mid + 1
    return lo


def _as_i32(x: int) -> int:
    """The int32 with the bits of uint32 ``x`` (kernel argument)."""
    return x - 2**32 if x >= 2**31 else x


def _check_contiguous(name, t, shape, dtype, device):
    """ValueError naming ``name`` unless ``t`` is a contiguous ``dtype`` tensor of ``shape`` on ``device``."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != shape or t.dtype != dtype:
        raise ValueError(f"{name} must be a {dtype} tensor of shape {shape}, got {t.dtype} {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (tq), got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _validate(tq, tk, tv, iq, ik, iv, t_len, i_len, t_mask, i_mask, scale, mask_mode, dropout_p, seed):
    """Checks every forward argument (ValueError naming it); returns (B, Nt, Nv, H, d). Plain ``if`` tests,
    messages formatted only on failure: this runs on every launch."""
    import torch

    ts = (("tq", tq), ("tk", tk), ("tv", tv), ("iq", iq), ("ik", ik), ("iv", iv))
    for name, t in ts:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, N, H, d], got shape {tuple(t.shape)}")
    _check_float_input("tq", tq, "B, N, H, d", _INTERPRETED)
    B, Nt, H, d = tq.shape
    Nv = iq.shape[1]
    if not (B >= 1 and Nt >= 1 and H >= 1 and d >= 1):
        raise ValueError(f"tq must have B, Nt, H, d >= 1, got shape {tuple(tq.shape)}")
    if Nv < 1:
        raise ValueError(f"iq must have Nv >= 1, got shape {tuple(iq.shape)}")
    if d > 256:
        raise ValueError(f"tq: head dim d must be <= 256 for the Triton kernels, got {d}")
    if d > 128 and tq.element_size() > 2:
        raise ValueError(f"tq: head dim d must be <= 128 for float32 inputs in the Triton kernels, got {d}")
    if B * H > 65535:
        raise ValueError(f"tq: B * H must be <= 65535 (grid axis 1), got {B} * {H}")
    dt, dev = tq.dtype, tq.device
    t_shape, i_shape = (B, Nt, H, d), (B, Nv, H, d)
    for (name, t), shape in zip(ts, (t_shape,) * 3 + (i_shape,) * 3):
        if t.shape != shape:
            raise ValueError(f"{name} must have shape {shape} ([B, N, H, d] of tq / iq), got {tuple(t.shape)}")
        if t.dtype != dt:
            raise ValueError(f"{name} must have the dtype of tq ({dt}), got {t.dtype}")
        if t.device != dev:
            raise ValueError(f"{name} must be on {dev} (tq), got {t.device}")
        st = t.stride()
        if st[3] != 1 and d != 1:
            raise ValueError(f"{name} must have stride(-1) == 1, got strides {st}")
        if min(st) < 0:
            raise ValueError(f"{name} must have non-negative strides, got {st}")
        if (t.shape[1] - 1) * st[1] + (H - 1) * st[2] + d >= 2**31 or BLOCK_TOKEN_LIMIT * st[1] >= 2**31:
            raise ValueError(f"{name}: the elements of one batch entry must span < 2**31 (token / head strides {st})")
    _check_contiguous("t_len", t_len, (B,), torch.int32, dev)
    _check_contiguous("i_len", i_len, (B,), torch.int32, dev)
    if t_mask is not None:
        _check_contiguous("t_mask", t_mask, (B, Nt), torch.bool, dev)
    if i_mask is not None:
        _check_contiguous("i_mask", i_mask, (B, Nv), torch.bool, dev)
    if not (isinstance(scale, numbers.Real) and not isinstance(scale, bool) and math.isfinite(float(scale))):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    if not (_is_int(mask_mode) and mask_mode in (0, 1)):
        raise ValueError(f"mask_mode must be 0 (zero) or 1 (vilbert), got {mask_mode!r}")
    if not (isinstance(dropout_p, numbers.Real) and not isinstance(dropout_p, bool) and 0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if not (_is_int(seed) and 0 <= seed < 2**63):
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return B, Nt, Nv, H, d


# a tile advances its token pointers by at most this many rows at a time (32-bit step: BLOCK * stride)
BLOCK_TOKEN_LIMIT = 128


def _aligned(*tensors) -> bool:
    """Every base pointer 16-byte aligned and every stride (in elements) a multiple of 16: what Triton
    specialises on (and so what the compiled kernel can assume)."""
    for t in tensors:
        if t.data_ptr() % 16:
            return False
        for s in t.stride()[:-1]:
            if s % 16:
                return False
    return True


_KINDS = ("fwd", "bwd_dq", "bwd_dkdv")


def _cfg(kind, tq, d, n_max, dropout, aligned, blocks):
    """block_config plus the test / tuning overrides ``blocks`` (BLOCK_M, BLOCK_N, CHUNK_D, BLOCK_DO:
    powers of 2; num_warps, num_stages), or a dict of such overrides per kernel kind ({"bwd_dq": {...},
    "bwd_dkdv": {...}}; a kind not named keeps its defaults)."""
    cfg = block_config(kind, tq.element_size(), d, n_max, dropout, aligned)
    if blocks and any(k in _KINDS for k in blocks):
        _check(all(k in _KINDS for k in blocks),
               lambda: f"blocks: mixes kernel kinds {_KINDS} with tile keys: {blocks!r}")
        blocks = blocks.get(kind)
        _check(blocks is None or isinstance(blocks, dict), lambda: f"blocks[{kind!r}] must be a dict, got {blocks!r}")
    for k, v in (blocks or {}).items():
        _check(k in ("BLOCK_M", "BLOCK_N", "CHUNK_D", "BLOCK_DO", "num_warps", "num_stages"),
               lambda: f"blocks: unknown key {k!r}")
        _check(_is_int(v) and v >= 1, lambda: f"blocks[{k!r}] must be an int >= 1, got {v!r}")
        if k in cfg:
            cfg[k] = int(v)
    bd = cfg["BLOCK_D"]
    for k, hi in (("BLOCK_M", BLOCK_TOKEN_LIMIT), ("BLOCK_N", BLOCK_TOKEN_LIMIT), ("CHUNK_D", bd),
                  ("BLOCK_DO", bd)):
        v = cfg.get(k, 16)
        _check(16 <= v <= hi and v & (v - 1) == 0, lambda: f"blocks[{k!r}] must be a power of 2 in [16, {hi}], got {v}")
    _check(cfg.get("BLOCK_DO", bd) == bd or cfg["CHUNK_D"] < bd,
           "blocks['BLOCK_DO'] < BLOCK_D needs blocks['CHUNK_D'] < BLOCK_D")
    return cfg


def _common_args(tq, tk, tv, iq, ik, iv, t_len, i_len, t_mask, i_mask, scale, mask_mode, dropout_p, seed, d):
    """(pointer args, stride / scalar args, constexprs) shared by the three kernels."""
    import torch

    # a stream without a mask passes a stand-in byte pointer (never read: its loads are predicated off)
    mt = t_mask.view(torch.uint8) if t_mask is not None else None
    mi = i_mask.view(torch.uint8) if i_mask is not None else None
    stand_in = mt if mt is not None else (mi if mi is not None else t_len.view(torch.uint8))
    ptrs = [tq, tk, tv, iq, ik, iv, t_len, i_len, stand_in if mt is None else mt, stand_in if mi is None else mi]
    strides = [s for t in (tq, tk, tv, iq, ik, iv) for s in t.stride()[:3]]
    drop = float(dropout_p) > 0.0
    thr = _keep_threshold(float(dropout_p)) << 8 if drop else 0
    seed = int(seed) if drop else 0
    lo = seed & 0xFFFFFFFF
    scalars = [float(scale), float(scale) * _LOG2E, _as_i32(thr), _as_i32(lo), seed >> 32,
               1.0 / (1.0 - float(dropout_p))]
    consts = dict(MODE=int(mask_mode), T_MASK=t_mask is not None, I_MASK=i_mask is not None, DROPOUT=drop,
                  HEAD_D=int(d), F32_DOT=_INTERPRETED)
    return ptrs, strides, scalars, consts


# ---------------------------------------------------------------------------------------------
# launchers (kernel contract of vlops.ops.coattention)

def _outputs(name, given, specs, device):
    """The output tensors: ``given`` (a tuple of preallocated contiguous tensors, checked against
    ``specs`` = [(name, shape, dtype)]) or fresh ones."""
    import torch

    if given is None:
        return [torch.empty(shape, dtype=dt, device=device) for _, shape, dt in specs]
    _check(isinstance(given, (tuple, list)) and len(given) == len(specs),
           lambda: f"{name} must be a tuple of {len(specs)} tensors ({', '.join(n for n, _, _ in specs)}), "
                   f"got {given!r:.80}")
    for t, (n, shape, dt) in zip(given, specs):
        _check(isinstance(t, torch.Tensor) and tuple(t.shape) == shape and t.dtype == dt and t.device == device
               and t.is_contiguous(),
               lambda: f"{name}: {n} must be a contiguous {dt} tensor of shape {shape} on {device}, got "
               + (f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__))
    return list(given)


def co_attention_fwd(tq, tk, tv, iq, ik, iv, t_len, i_len, t_mask, i_mask, scale, mask_mode, dropout_p, seed, *,
                     out=None, blocks=None):
    """(t_out [B, Nt, H, d], i_out [B, Nv, H, d] in the input dtype, t_lse [B, H, Nt], i_lse [B, H, Nv]
    float32), all contiguous and every element written (see the forward contract in
    vlops/ops/coattention.py and the module docstring). Keyword-only (tests, tuning): ``out`` the four
    outputs preallocated (written and returned); ``blocks`` overrides of BLOCK_M, BLOCK_N (powers of 2 in
    [16, 128]), CHUNK_D (see :func:`block_config`), num_warps, num_stages."""
    import torch

    B, Nt, Nv, H, d = _validate(tq, tk, tv, iq, ik, iv, t_len, i_len, t_mask, i_mask, scale, mask_mode,
                                dropout_p, seed)
    drop = float(dropout_p) > 0.0
    aligned = _aligned(tq, tk, tv, iq, ik, iv)
    cfg = _cfg("fwd", tq, d, max(Nt, Nv), drop, aligned, blocks)
    dev = tq.device
    t_out, i_out, t_lse, i_lse = _outputs("out", out, [
        ("t_out", (B, Nt, H, d), tq.dtype), ("i_out", (B, Nv, H, d), tq.dtype),
        ("t_lse", (B, H, Nt), torch.float32), ("i_lse", (B, H, Nv), torch.float32)], dev)
    ptrs, strides, scalars, consts = _common_args(tq, tk, tv, iq, ik, iv, t_len, i_len, t_mask, i_mask, scale,
                                                  mask_mode, dropout_p, seed, d)
    grid = (cdiv(max(Nt, Nv), cfg["BLOCK_M"]), B * H, 2)
    with torch.cuda.device(dev) if tq.is_cuda else contextlib.nullcontext():
        _co_attn_fwd_kernel[grid](*ptrs, t_out, i_out, t_lse, i_lse, *strides, H, Nt, Nv, *scalars,
                                  BLOCK_D=cfg["BLOCK_D"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                  CHUNK_D=cfg["CHUNK_D"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                                  **consts)
    return t_out, i_out, t_lse, i_lse


def _validate_bwd(t_dout, i_dout, t_out, i_out, t_lse, i_lse, B, Nt, Nv, H, d, dtype, device):
    import torch

    for name, t, shape, dt in (("t_dout", t_dout, (B, Nt, H, d), dtype), ("i_dout", i_dout, (B, Nv, H, d), dtype),
                               ("t_out", t_out, (B, Nt, H, d), dtype), ("i_out", i_out, (B, Nv, H, d), dtype),
                               ("t_lse", t_lse, (B, H, Nt), torch.float32),
                               ("i_lse", i_lse, (B, H, Nv), torch.float32)):
        _check_contiguous(name, t, shape, dt, device)


def co_attention_bwd(t_dout, i_dout, tq, tk, tv, iq, ik, iv, t_out, i_out, t_lse, i_lse, t_len, i_len, t_mask,
                     i_mask, scale, mask_mode, dropout_p, seed, *, grads=None, blocks=None):
    """(d_tq, d_tk, d_tv, d_iq, d_ik, d_iv), contiguous [B, N, H, d] in the input dtype (see the backward
    contract in vlops/ops/coattention.py and "Backward" in the module docstring). Keyword-only: ``grads``
    the six outputs preallocated; ``blocks`` overrides as for :func:`co_attention_fwd`, applied to both
    backward kernels (BLOCK_M: queries per tile, BLOCK_N: keys per tile), and BLOCK_DO (dk / dv columns per
    program, < BLOCK_D only with CHUNK_D < BLOCK_D); or ``{"bwd_dq": {...}, "bwd_dkdv": {...}}``, one set
    per kernel."""
    import torch

    B, Nt, Nv, H, d = _validate(tq, tk, tv, iq, ik, iv, t_len, i_len, t_mask, i_mask, scale, mask_mode,
                                dropout_p, seed)
    _validate_bwd(t_dout, i_dout, t_out, i_out, t_lse, i_lse, B, Nt, Nv, H, d, tq.dtype, tq.device)
    n_max, drop = max(Nt, Nv), float(dropout_p) > 0.0
    aligned = _aligned(tq, tk, tv, iq, ik, iv, t_dout, i_dout, t_out, i_out)
    qcfg = _cfg("bwd_dq", tq, d, n_max, drop, aligned, blocks)
    kcfg = _cfg("bwd_dkdv", tq, d, n_max, drop, aligned, blocks)
    dev = tq.device
    d_tq, d_tk, d_tv, d_iq, d_ik, d_iv = _outputs("grads", grads, [
        (n, (B, N, H, d), tq.dtype) for n, N in (("d_tq", Nt), ("d_tk", Nt), ("d_tv", Nt), ("d_iq", Nv),
                                                  ("d_ik", Nv), ("d_iv", Nv))], dev)
    t_dl = torch.empty(B, H, Nt, dtype=torch.float32, device=dev)
    i_dl = torch.empty(B, H, Nv, dtype=torch.float32, device=dev)
    ptrs, strides, scalars, consts = _common_args(tq, tk, tv, iq, ik, iv, t_len, i_len, t_mask, i_mask, scale,
                                                  mask_mode, dropout_p, seed, d)
    with torch.cuda.device(dev) if tq.is_cuda else contextlib.nullcontext():
        _co_attn_bwd_dq_kernel[(cdiv(n_max, qcfg["BLOCK_M"]), B * H, 2)](
            *ptrs, t_dout, i_dout, t_out, i_out, t_lse, i_lse, t_dl, i_dl, d_tq, d_iq, *strides, H, Nt, Nv, *scalars,
            BLOCK_D=qcfg["BLOCK_D"], BLOCK_M=qcfg["BLOCK_M"], BLOCK_N=qcfg["BLOCK_N"], CHUNK_D=qcfg["CHUNK_D"],
            num_warps=qcfg["num_warps"], num_stages=qcfg["num_stages"], **consts)
        n_do = kcfg["BLOCK_D"] // kcfg["BLOCK_DO"]
        _co_attn_bwd_dkdv_kernel[(cdiv(n_max, kcfg["BLOCK_N"]) * n_do, B * H, 2)](
            *ptrs, t_dout, i_dout, t_lse, i_lse, t_dl, i_dl, d_tk, d_tv, d_ik, d_iv, *strides, H, Nt, Nv, *scalars,
            BLOCK_D=kcfg["BLOCK_D"], BLOCK_M=kcfg["BLOCK_M"], BLOCK_N=kcfg["BLOCK_N"], CHUNK_D=kcfg["CHUNK_D"],
            BLOCK_DO=kcfg["BLOCK_DO"],
            num_warps=kcfg["num_warps"], num_stages=kcfg["num_stages"], **consts)
    return d_tq, d_tk, d_tv, d_iq, d_ik, d_iv


# ---------------------------------------------------------------------------------------------
# AOT specialisations (compiled for sm_90a by tests/test_aot_sm90.py, no GPU needed)

_ELEM_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2}
_KERNELS = {"fwd": _co_attn_fwd_kernel, "bwd_dq": _co_attn_bwd_dq_kernel, "bwd_dkdv": _co_attn_bwd_dkdv_kernel}
_FLOAT_SCALARS = ("scale", "scale_log2", "drop_scale")


def _aot_spec(kind: str, dtype: str, d: int, n_max: int | None = None, mode: int = 0, masks: str = "",
              dropout: bool = False, aligned: bool = True, tiles: dict | None = None):
    """One kernel specialisation: ``kind`` ("fwd", "bwd_dq", "bwd_dkdv"), input ``dtype``, head dim ``d``,
    the tiles :func:`block_config` picks for ``n_max``, mask ``mode``, boolean masks on ``masks`` ("t",
    "i", "ti"), dropout. ``aligned``: the token / head / batch strides divisible by 16 (contiguous
    tensors or views of a fused QKV projection with H d a multiple of 16; Triton specialises such
    integers at run time too). ``tiles``: overrides of the block_config entries (tile studies)."""
    fn = _KERNELS[kind]
    cfg = {**block_config(kind, _ELEM_SIZE[dtype], d, n_max, dropout, aligned), **(tiles or {})}
    constexprs = dict(MODE=mode, T_MASK="t" in masks, I_MASK="i" in masks, DROPOUT=dropout, HEAD_D=d,
                      BLOCK_D=cfg["BLOCK_D"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                      CHUNK_D=cfg["CHUNK_D"], F32_DOT=False)
    if "BLOCK_DO" in cfg:
        constexprs["BLOCK_DO"] = cfg["BLOCK_DO"]
    data = [n for n in fn.arg_names if n.endswith("_ptr") and not any(x in n for x in ("len", "mask", "lse", "dl"))]
    typed = {n: f"*{dtype}" for n in data}
    typed.update({n: "*i32" for n in ("t_len_ptr", "i_len_ptr")}, **{n: "*u8" for n in ("t_mask_ptr", "i_mask_ptr")})
    signature = aot_signature(fn, constexprs, typed, lambda n: "fp32" if n in _FLOAT_SCALARS else "i32")
    divisible = data + [n for n in fn.arg_names if n.endswith(("lse_ptr", "dl_ptr"))]
    if aligned:
        divisible += [n for n in fn.arg_names if n.startswith("s_")]
    tag = ("_short" if n_max is not None and n_max <= 128 else "") + (f"_mode{mode}" if mode else "") + \
        (f"_mask{masks}" if masks else "") + ("_dropout" if dropout else "") + ("" if aligned else "_unaligned")
    if tiles:
        tag += "_" + "_".join(f"{k}{v}" for k, v in sorted(tiles.items()))
    return {"name": f"coattention_{kind}_{dtype}_d{d}{tag}", "kernel": fn, "signature": signature,
            "constexprs": constexprs, "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
            "divisibility_16": divisible, "matmul": True}


AOT_SPECS = [
    # long sequences (Nt = 512, Nv = 2048): bf16 d = 64 / 128 and fp32 d = 128, the forward and both backward
    # kernels; then with dropout, the vilbert mask mode and boolean masks on both streams
    *[_aot_spec(kind, dt, d) for kind in _KERNELS for dt, d in (("bf16", 64), ("bf16", 128), ("fp32", 128))],
    *[_aot_spec(kind, "bf16", 128, mode=1, masks="ti", dropout=True) for kind in _KERNELS],
    *[_aot_spec(kind, "fp32", 128, mode=1, masks="ti", dropout=True) for kind in ("bwd_dq", "bwd_dkdv")],
    # fp32 at head dim 64 (dk / dv: 16 x 128 tiles), and 16-bit dropout tiles of dq (short) and dk / dv (long)
    _aot_spec("bwd_dkdv", "fp32", 64, dropout=True),
    _aot_spec("bwd_dkdv", "fp32", 64, n_max=101, mode=1, masks="ti"),
    _aot_spec("bwd_dq", "bf16", 128, n_max=101, mode=1, dropout=True),
    _aot_spec("bwd_dkdv", "bf16", 128, dropout=True),
    # ViLBERT / VQA (Nt 16..60, Nv 37..101): 64-query tiles
    *[_aot_spec(kind, "bf16", 128, n_max=101) for kind in _KERNELS],
    _aot_spec("fwd", "bf16", 128, n_max=101, mode=1, masks="i", dropout=True),
    _aot_spec("fwd", "fp16", 64, n_max=101, masks="ti"),
    _aot_spec("bwd_dkdv", "fp16", 64, n_max=101, masks="t"),
    # head dim 256 (16-bit only)
    *[_aot_spec(kind, "bf16", 256) for kind in _KERNELS],
    # strides or base pointers that are not multiples of 16 (views at odd offsets): one address per element
    _aot_spec("fwd", "bf16", 128, aligned=False),
    _aot_spec("bwd_dkdv", "bf16", 256, mode=1, masks="ti", dropout=True, aligned=False),
    *[_aot_spec(kind, "fp32", 128, aligned=False) for kind in _KERNELS],
]
