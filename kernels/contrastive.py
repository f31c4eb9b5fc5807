"""Contrastive losses (CLIP / ALIGN / UniCL softmax, SigLIP sigmoid), tiled like flash attention.

The launchers take the kernel contract of :mod:`vlops.ops.contrastive` (``contrastive_lse``,
``clip_bwd``, ``siglip_fwd``, ``siglip_bwd``); each allocates and returns its float32 outputs. The
``N x M`` similarity matrix ``S = scale * a @ b.T`` never exists in memory: every kernel recomputes
its ``[BLOCK_X, BLOCK_Y]`` tiles of ``S`` from ``a`` and ``b`` with ``tl.dot`` (fp32 accumulation,
a loop over ``D`` in ``BLOCK_D`` chunks, masked, so any ``D >= 1`` works) and reduces them at once.

Every kernel is written over an "x side" (the rows a program owns) and a "y side" (the rows it loops
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
- ``_siglip_grad_kernel``: like the CLIP one with ``W = -z sigmoid(-z (S + bias))``.

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

Precision of the dots: bf16 / fp16 inputs use bf16 / fp16 ``tl.dot`` (fp32 accumulation; the
products of 16-bit operands are exact in fp32, so S is as good as fp32), and ``W`` is rounded to the
input dtype for the ``W @ y`` dot (as flash attention rounds P): <= 2**-8 (fp16 2**-11) relative
per element, the gradients within ~4e-3 of the float64 contract. fp32 inputs: the S dot uses
``input_precision="tf32x3"`` (three tf32 wgmmas, ~fp32 accurate): S feeds ``exp``, which turns an
absolute error of S into a relative error of W, and a single tf32 pass (2**-11 relative per
operand) would give ~1e-3 at logit_scale 100 with unit-norm features and ~0.1 with |S| ~ 1e3. The
``W @ y`` dot is linear in its operands and uses the default tf32: gradients within ~5e-4 relative
(the DESIGN.md tf32 bound; up to ~1e-3 for 1 x 1 problems, where nothing averages out). Any fp32
implementation is further limited to ~``2**-22 * max|S|`` by the fp32 rounding of S and of the LSEs.
Under ``TRITON_INTERPRET=1`` every dot is exact fp32 (numpy), so only the last limit applies there.
The compiled accuracy has not been measured on a GPU yet (tests/test_contrastive_triton.py::test_gpu).
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["contrastive_lse", "clip_bwd", "siglip_fwd", "siglip_bwd", "AOT_SPECS", "block_config"]


# ---------------------------------------------------------------------------------------------
# device helpers

@triton.jit
def _dot(p, q, acc, F32_DOT: tl.constexpr):
    """acc + p @ q. F32_DOT (interpreter only): 16-bit operands are widened first, since the
    interpreter's dot multiplies the raw bits of bf16 tensors."""
    if F32_DOT:
        return tl.dot(p.to(tl.float32), q.to(tl.float32), acc)
    else:
        return tl.dot(p, q, acc)


@triton.jit
def _round_to(w, dtype: tl.constexpr, F32_DOT: tl.constexpr):
    """fp32 W as a dot operand of ``dtype``, rounded to nearest even. Under the interpreter
    (F32_DOT) bf16 rounding is done on the bits (the interpreter's fp32 -> bf16 cast truncates, and
    its "rtne" mode does not carry into the exponent) and the value stays fp32 (exact in bf16)."""
    if dtype == tl.float32:
        return w
    elif F32_DOT and dtype == tl.bfloat16:
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return w.to(dtype, fp_downcast_rounding="rtne")


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
        if xc.dtype == tl.float32:
            # tf32x3 (3 tf32 wgmmas, ~fp32 accurate): S feeds exp(), so its absolute error is
            # amplified by |S| (up to ~100); one tf32 pass would give ~1e-3 relative at scale 100.
            acc = tl.dot(xc, tl.trans(yc), acc, input_precision="tf32x3")
        else:
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
def _siglip_grad_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, out_ptr, part_s_ptr, part_b_ptr, NX, NY, D,
                        NEG_ONLY: tl.constexpr, WRITE_PART: tl.constexpr, BLOCK_X: tl.constexpr,
                        BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                        F32_DOT: tl.constexpr):
    """out[i, do] = sum_j W_ij y[j, do], W = -z sigmoid(-z (S + bias)); partials of dscale / dbias."""
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
        w = tl.where(mx[:, None] & my[None, :], -z * sig, 0.0)
        if WRITE_PART:
            part_s += tl.sum(w * raw, 1)
            part_b += tl.sum(w, 1)
        acc = _dot(_round_to(w, yo.dtype, F32_DOT), yo, acc, F32_DOT)
    tl.store(out_ptr + rx64[:, None] * D + do[None, :], acc, mask=mx[:, None] & mdo[None, :])
    if WRITE_PART:
        first = pid_d == 0
        tl.store(part_s_ptr + pid, tl.sum(part_s, 0), mask=first)
        tl.store(part_b_ptr + pid, tl.sum(part_b, 0), mask=first)


# Under TRITON_INTERPRET=1 @triton.jit yields an interpreted function.
_INTERPRETED = type(_lse_kernel).__name__ == "InterpretedFunction"


# ---------------------------------------------------------------------------------------------
# launch configuration

def block_config(kind: str, element_size: int) -> dict:
    """Tile sizes and launch options per kernel kind ("lse", "fwd", "grad") and input element size
    (4 fp32, 2 bf16/fp16). Chosen to compile for sm_90a with wgmma, no spills and shared memory
    well under the Hopper limit (see AOT_SPECS / tests/test_aot_sm90.py); not tuned on a GPU."""
    bd = 64 if element_size <= 2 else 32
    if kind in ("lse", "fwd"):
        return dict(BLOCK_X=128, BLOCK_Y=64, BLOCK_D=bd, num_warps=8, num_stages=3)
    if kind == "grad":
        # BLOCK_DO: output features per program; D > BLOCK_DO recomputes S per chunk. 256 for 16-bit
        # inputs (182 registers), 128 for fp32 (BLOCK_DO=256 needs 220-229 registers).
        return dict(BLOCK_X=64, BLOCK_Y=64, BLOCK_D=bd, BLOCK_DO=256 if element_size <= 2 else 128,
                    num_warps=8, num_stages=2)
    raise ValueError(f"unknown kernel kind {kind!r}")


def _check(cond, msg):
    if not cond:
        raise ValueError(msg)


def _validate(a, b, scale, bias=None):
    import torch

    _check(a.dim() == 2 and b.dim() == 2, f"a and b must be 2-D, got shapes {tuple(a.shape)}, {tuple(b.shape)}")
    _check(a.shape[1] == b.shape[1], f"a [N, D] and b [M, D] must share D, got {tuple(a.shape)}, {tuple(b.shape)}")
    _check(a.shape[0] >= 1 and b.shape[0] >= 1 and a.shape[1] >= 1,
           f"a and b must be non-empty, got {tuple(a.shape)}, {tuple(b.shape)}")
    _check(a.dtype == b.dtype, f"a and b must share a dtype, got {a.dtype}, {b.dtype}")
    _check(a.dtype in (torch.float32, torch.float16, torch.bfloat16), f"a dtype must be fp32/fp16/bf16, got {a.dtype}")
    _check(a.device == b.device, f"a and b must be on one device, got {a.device}, {b.device}")
    _check(a.is_contiguous() and b.is_contiguous(), "a and b must be contiguous")
    for name, t in (("scale", scale), ("bias", bias)):
        if t is None:
            continue
        _check(t.dtype == torch.float32 and t.numel() == 1,
               f"{name} must be a float32 tensor of shape [1], got {t.dtype} {tuple(t.shape)}")
        _check(t.device == a.device, f"{name} must be on {a.device}, got {t.device}")


def _cfg(kind, a, blocks):
    cfg = block_config(kind, a.element_size())
    if blocks:
        for k, v in blocks.items():
            if k in cfg:
                cfg[k] = int(v)
    return cfg


def _grid_args(cfg, NX, D=None):
    grid = (triton.cdiv(NX, cfg["BLOCK_X"]),) if D is None else (
        triton.cdiv(NX, cfg["BLOCK_X"]), triton.cdiv(D, cfg["BLOCK_DO"]))
    opts = {k: cfg[k] for k in cfg if k.startswith("BLOCK")}
    if D is None:
        opts.pop("BLOCK_DO", None)
    opts["F32_DOT"] = _INTERPRETED
    return grid, opts, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# ---------------------------------------------------------------------------------------------
# launchers (kernel contract of vlops.ops.contrastive)

def contrastive_lse(a, b, scale, *, blocks=None):
    """(row_lse [N], col_lse [M]) float32. ``blocks`` (keyword-only, tests): tile overrides."""
    import torch

    _validate(a, b, scale)
    N, D = a.shape
    M = b.shape[0]
    cfg = _cfg("lse", a, blocks)
    row = torch.empty(N, dtype=torch.float32, device=a.device)
    col = torch.empty(M, dtype=torch.float32, device=a.device)
    for x, y, out, NX, NY in ((a, b, row, N, M), (b, a, col, M, N)):
        grid, consts, opts = _grid_args(cfg, NX)
        _lse_kernel[grid](x, y, scale, out, NX, NY, D, **consts, **opts)
    return row, col


def clip_bwd(a, b, scale, row_lse, col_lse, coef_row, coef_col, row_center, col_center, *, blocks=None):
    """(da [N, D], db [M, D], dscale [1]) float32 (see the module docstring)."""
    import torch

    _validate(a, b, scale)
    N, D = a.shape
    M = b.shape[0]
    for name, t, n in (("row_lse", row_lse, N), ("col_lse", col_lse, M), ("row_center", row_center, N),
                       ("col_center", col_center, M)):
        _check(t.dtype == torch.float32 and t.dim() == 1 and t.numel() == n and t.is_contiguous(),
               f"{name} must be a contiguous float32 [{n}], got {t.dtype} {tuple(t.shape)}")
        _check(t.device == a.device, f"{name} must be on {a.device}, got {t.device}")
    cfg = _cfg("grad", a, blocks)
    da = torch.empty(N, D, dtype=torch.float32, device=a.device)
    db = torch.empty(M, D, dtype=torch.float32, device=a.device)
    grid, consts, opts = _grid_args(cfg, N, D)
    part = torch.empty(grid[0], dtype=torch.float32, device=a.device)
    cr, cc = float(coef_row), float(coef_col)
    _clip_grad_kernel[grid](a, b, scale, row_lse, col_lse, row_center, col_center, da, part, N, M, D, cr, cc,
                            WRITE_PART=True, **consts, **opts)
    grid, consts, opts = _grid_args(cfg, M, D)
    _clip_grad_kernel[grid](b, a, scale, col_lse, row_lse, col_center, row_center, db, part, M, N, D, cc, cr,
                            WRITE_PART=False, **consts, **opts)
    return da, db, part.sum().reshape(1)


def siglip_fwd(a, b, scale, bias, negative_only, *, blocks=None):
    """loss_sum [1] float32: sum_ij softplus(-z_ij (S_ij + bias))."""
    import torch

    _validate(a, b, scale, bias)
    N, D = a.shape
    M = b.shape[0]
    cfg = _cfg("fwd", a, blocks)
    grid, consts, opts = _grid_args(cfg, N)
    part = torch.empty(grid[0], dtype=torch.float32, device=a.device)
    _siglip_fwd_kernel[grid](a, b, scale, bias, part, N, M, D, NEG_ONLY=bool(negative_only), **consts, **opts)
    return part.sum().reshape(1)


def siglip_bwd(a, b, scale, bias, negative_only, *, blocks=None):
    """(da [N, D], db [M, D], dscale [1], dbias [1]) float32."""
    import torch

    _validate(a, b, scale, bias)
    N, D = a.shape
    M = b.shape[0]
    cfg = _cfg("grad", a, blocks)
    neg = bool(negative_only)
    da = torch.empty(N, D, dtype=torch.float32, device=a.device)
    db = torch.empty(M, D, dtype=torch.float32, device=a.device)
    grid, consts, opts = _grid_args(cfg, N, D)
    part_s = torch.empty(grid[0], dtype=torch.float32, device=a.device)
    part_b = torch.empty(grid[0], dtype=torch.float32, device=a.device)
    _siglip_grad_kernel[grid](a, b, scale, bias, da, part_s, part_b, N, M, D,
                              NEG_ONLY=neg, WRITE_PART=True, **consts, **opts)
    grid, consts, opts = _grid_args(cfg, M, D)
    _siglip_grad_kernel[grid](b, a, scale, bias, db, part_s, part_b, M, N, D,
                              NEG_ONLY=neg, WRITE_PART=False, **consts, **opts)
    return da, db, part_s.sum().reshape(1), part_b.sum().reshape(1)


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
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in data_ptrs:
            signature[name] = f"*{dtype}"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        else:
            signature[name] = _SCALAR_TYPES[name]
    flag_s = "".join(f"_{k.lower()}" for k, v in flags.items() if v)
    # The common case: D divisible by 16 (CLIP / SigLIP embed dims 512..1280), aligned base pointers.
    divisible = [n for n in fn.arg_names if n.endswith("_ptr")] + ["D"]
    return {"name": f"contrastive_{kernel}_{dtype}{flag_s}", "kernel": fn, "signature": signature,
            "constexprs": constexprs, "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
            "divisibility_16": divisible, "matmul": True}


AOT_SPECS = [
    *[_aot_spec("lse", dt) for dt in ("fp32", "bf16", "fp16")],
    *[_aot_spec("clip_grad", dt, WRITE_PART=True) for dt in ("fp32", "bf16", "fp16")],
    _aot_spec("clip_grad", "bf16", WRITE_PART=False),
    *[_aot_spec("siglip_fwd", dt, NEG_ONLY=False) for dt in ("fp32", "bf16", "fp16")],
    _aot_spec("siglip_fwd", "bf16", NEG_ONLY=True),
    *[_aot_spec("siglip_grad", dt, NEG_ONLY=False, WRITE_PART=True) for dt in ("fp32", "bf16", "fp16")],
    _aot_spec("siglip_grad", "bf16", NEG_ONLY=True, WRITE_PART=False),
]
