"""Fused diffusion denoising step: guidance + x0 + clip/threshold + posterior mean + variance + noise.

One pass over the [B, N] latents. The launcher takes the kernel contract of
:mod:`vlops.ops.diffusion` (same positional arguments as the C++/CUDA launchers); the element-wise
math is :mod:`vlops.reference.diffusion`.

Design (memory-bound on H100/H200):

- grid ``(cdiv(N, BLOCK), B)``: program ``(c, b)`` handles elements ``[c*BLOCK, (c+1)*BLOCK)`` of
  sample ``b``, so the per-sample coefficients are scalars computed once per program from
  ``alphas_cumprod[timesteps[b]]``, ``prev_table`` and ``final_alpha`` on the device (no host sync,
  capturable in a CUDA graph);
- row bases are int64 (``b * N`` may exceed 2**31), in-row offsets int32 (a sample < 2**31);
- every option is a ``tl.constexpr`` (dead branches vanish), arithmetic in fp32 (fp64 for fp64
  tensors), stores in the tensor dtype;
- in-kernel noise is Philox4x32-10 + Box-Muller bit-compatible with
  :func:`vlops.reference.diffusion.philox_normal`: one Philox call per 4 consecutive elements, the
  four normals interleaved into the block with ``tl.join`` + ``tl.reshape``. When ``N % 4 != 0``
  the block window is shifted left by ``(b * N) % 4`` so that quads stay aligned with the global
  element index (such N cannot be 16-byte vectorised anyway). Compiled, Box-Muller uses
  cos.approx / sin.approx on an argument reduced to [-pi, pi] (normals within ~3e-6 of
  philox_normal; the precise sinf / cosf made the bf16 kernel compute-bound); the Philox uint32
  outputs are bit-exact everywhere, and with fp64 tensors the normals equal philox_normal exactly.

Measured on an H200 (triton 3.6, CUDA-graph replay, B=32, N=2**20, default BLOCK): fp32 DDIM+CFG
4.07 TB/s (4.11 with in-kernel noise), DDPM + in-kernel noise 4.00 TB/s; bf16 3.85 / 3.88 / 3.42
TB/s. The eager reference path (fp32 math, noise given) takes 7-18x longer.

Scalar float arguments (guidance_scale, clip_range, eta, final_alpha) travel as fp32 kernel
arguments (Triton's convention for Python floats); with fp64 tensors they are widened to fp64.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._tl_common import _check, _philox4x32_10, cdiv

__all__ = ["diffusion_step", "AOT_SPECS", "block_config"]


@triton.jit
def _uniform(x):
    """uint32 -> float32 in (0, 1): ``(x >> 8) * 2**-24 + 2**-25`` (the product is exact)."""
    return (x >> 8).to(tl.float32) * 5.9604644775390625e-08 + 2.98023223876953125e-08


@triton.jit
def _box_muller(ua, ub, F64: tl.constexpr, FAST: tl.constexpr):
    """Normals (r cos th, r sin th), r = sqrt(-2 log ua), th = 2 pi ub, as float32 values.

    F64: the transform runs in fp64 and is rounded to fp32, exactly like philox_normal.
    FAST (compiled fp32 only; the interpreter has no libdevice): cos(2 pi u) = -cos(2 pi (u - 1/2))
    with the argument in [-pi, pi], where cos.approx / sin.approx are within ~2**-21 absolute (the
    normal within ~3e-6 of philox_normal); the precise sinf / cosf cost ~40 instructions each and
    make the bf16 kernel compute-bound. log stays precise (its absolute error matters near u = 1)."""
    if F64:
        a = ua.to(tl.float64)
        th = 6.283185307179586 * ub.to(tl.float64)
        r = tl.sqrt(-2.0 * tl.log(a))
        return (r * tl.cos(th)).to(tl.float32), (r * tl.sin(th)).to(tl.float32)
    else:
        r = tl.sqrt(-2.0 * tl.log(ua))
        th = 6.283185307179586 * (ub - 0.5)  # in [-pi, pi]; cos(2 pi u) = -cos(th), sin(2 pi u) = -sin(th)
        if FAST:
            return -r * libdevice.fast_cosf(th), -r * libdevice.fast_sinf(th)
        else:
            return -r * tl.cos(th), -r * tl.sin(th)


@triton.jit
def _philox_normal_quads(q, seed_lo, seed_hi, F64: tl.constexpr, FAST: tl.constexpr):
    """The four normals of quads ``q`` (int64 tensor): Philox4x32-10 + two Box-Muller pairs."""
    c0 = (q & 0xFFFFFFFF).to(tl.uint32)
    c1 = (q >> 32).to(tl.uint32)
    zero = tl.zeros(q.shape, dtype=tl.uint32)
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    x0, x1, x2, x3 = _philox4x32_10(c0, c1, zero, zero, k0, k1)
    n0, n1 = _box_muller(_uniform(x0), _uniform(x1), F64, FAST)
    n2, n3 = _box_muller(_uniform(x2), _uniform(x3), F64, FAST)
    return n0, n1, n2, n3


@triton.jit
def _philox_normal_block(g0, seed_lo, seed_hi, BLOCK: tl.constexpr, QPT: tl.constexpr, F64: tl.constexpr,
                         FAST: tl.constexpr):
    """philox_normal(seed)[g0 : g0 + BLOCK] as float32, ``g0 % 4 == 0``: one Philox call per quad.

    The normals are interleaved with joins whose new (minor) dimensions are, innermost first, the
    quad parity (QPT = 2), lane bit 1 and lane bit 0; the 1-D quad tensors then carry the default
    one-element-per-thread layout and the interleaved block has 4 QPT consecutive elements per
    thread: exactly one 16-byte access of the tensors (QPT = 2 for 16-bit types, 1 otherwise), so
    no layout conversion through shared memory is needed."""
    R: tl.constexpr = BLOCK // (4 * QPT)
    q = (g0 >> 2) + tl.arange(0, R).to(tl.int64) * QPT
    if QPT == 1:
        n0, n1, n2, n3 = _philox_normal_quads(q, seed_lo, seed_hi, F64, FAST)
    else:
        a0, a1, a2, a3 = _philox_normal_quads(q, seed_lo, seed_hi, F64, FAST)  # even quads
        b0, b1, b2, b3 = _philox_normal_quads(q + 1, seed_lo, seed_hi, F64, FAST)  # odd quads
        n0 = tl.join(a0, b0)
        n1 = tl.join(a1, b1)
        n2 = tl.join(a2, b2)
        n3 = tl.join(a3, b3)
    # [..., k, m] = lane 2k + m  ->  element 4 quad + 2k + m
    n = tl.join(tl.join(n0, n2), tl.join(n1, n3))
    return tl.reshape(n, [BLOCK])


@triton.jit
def _cvt(x, F64: tl.constexpr):
    if F64:
        return tl.cast(x, tl.float64)
    else:
        return tl.cast(x, tl.float32)


@triton.jit
def _sqrt(x, F64: tl.constexpr):
    """IEEE-rounded square root (tl.sqrt_rn is fp32-only; fp64 tl.sqrt is already IEEE)."""
    if F64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _div(x, y, F64: tl.constexpr):
    """IEEE-rounded division (tl.div_rn is fp32-only; fp64 division is already IEEE)."""
    if F64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "t_stride"])
def _diffusion_step_kernel(
    eps_ptr, uncond_ptr, sample_ptr, noise_ptr, out_prev_ptr, out_x0_ptr,
    t_ptr, prev_table_ptr, ac_ptr, x0_scale_ptr, eps_scale_ptr,
    N, stride_eps, stride_unc, t_stride,
    guidance_scale, clip_range, eta, final_alpha, seed_lo, seed_hi,
    MODE: tl.constexpr,          # 0 DDPM, 1 DDIM
    PRED: tl.constexpr,          # 0 epsilon, 1 sample, 2 v_prediction
    VAR: tl.constexpr,           # DDPM variance type 0..4 (0 for DDIM)
    GUIDED: tl.constexpr,        # uncond given: classifier-free guidance
    NOISE: tl.constexpr,         # 0 no noise added, 1 noise tensor, 2 in-kernel Philox
    HAS_X0_SCALE: tl.constexpr,  # dynamic thresholding scale per sample (replaces clipping)
    HAS_EPS_SCALE: tl.constexpr,  # guidance-rescale factor per sample (only with GUIDED)
    CLIP: tl.constexpr,          # clip_sample
    USE_CLIPPED: tl.constexpr,   # DDIM use_clipped_model_output
    WRITE_X0: tl.constexpr,      # out_x0 given
    SHIFT4: tl.constexpr,        # in-kernel noise with N % 4 != 0: align the window to quads
    F64: tl.constexpr,           # fp64 arithmetic (fp64 tensors)
    BLOCK: tl.constexpr,
    QPT: tl.constexpr,           # Philox quads per 16-byte access: 16 // (4 * element size), at least 1
    FAST_TRIG: tl.constexpr,     # compiled: sin.approx / cos.approx in Box-Muller (see _box_muller)
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    row = b * N  # int64 base of sample b in sample / noise / outputs
    start = pid * BLOCK
    if SHIFT4:
        start = start - (row & 3).to(tl.int32)
    offs = start + tl.arange(0, BLOCK)
    if SHIFT4:
        mask = (offs >= 0) & (offs < N)
    else:
        mask = offs < N

    # ---- per-sample coefficients (scalars) ----
    t = tl.load(t_ptr + b * t_stride)
    p = tl.load(prev_table_ptr + t)
    ab = _cvt(tl.load(ac_ptr + t), F64)
    ab_prev = tl.where(p >= 0, _cvt(tl.load(ac_ptr + tl.maximum(p, 0)), F64), _cvt(final_alpha, F64))
    bp = 1.0 - ab
    bp_prev = 1.0 - ab_prev
    sqrt_ab = _sqrt(ab, F64)
    sqrt_bp = _sqrt(bp, F64)
    # 1 - ab / ab_prev, written so that the subtraction is exact (Sterbenz) in fp32
    beta = _div(ab_prev - ab, ab_prev, F64)

    # ---- element-wise ----
    x = _cvt(tl.load(sample_ptr + row + offs, mask=mask, other=0.0), F64)
    eps_row = eps_ptr + b * stride_eps
    e = _cvt(tl.load(eps_row + offs, mask=mask, other=0.0), F64)
    if GUIDED:
        u = _cvt(tl.load(uncond_ptr + b * stride_unc + offs, mask=mask, other=0.0), F64)
        e = u + _cvt(guidance_scale, F64) * (e - u)
        if HAS_EPS_SCALE:
            e = e * _cvt(tl.load(eps_scale_ptr + b), F64)

    if PRED == 0:
        x0 = (x - sqrt_bp * e) * _div(1.0, sqrt_ab, F64)
    elif PRED == 1:
        x0 = e
    else:
        x0 = sqrt_ab * x - sqrt_bp * e
    x0_raw = x0
    if HAS_X0_SCALE:
        s = _cvt(tl.load(x0_scale_ptr + b), F64)
        # a true division, as the reference: the clamped elements become exactly +-1
        x0 = _div(tl.maximum(tl.minimum(x0, s), -s), s, F64)
    elif CLIP:
        r = _cvt(clip_range, F64)
        x0 = tl.minimum(tl.maximum(x0, -r), r)

    if NOISE == 1:
        n = _cvt(tl.load(noise_ptr + row + offs, mask=mask, other=0.0), F64)
    elif NOISE == 2:
        n = _cvt(_philox_normal_block(row + start, seed_lo, seed_hi, BLOCK, QPT, F64, FAST_TRIG), F64)

    if MODE == 0:
        inv_bp = _div(1.0, bp, F64)
        c_x0 = _sqrt(ab_prev, F64) * beta * inv_bp
        c_x = _sqrt(_div(ab, ab_prev, F64), F64) * bp_prev * inv_bp
        prev = c_x0 * x0 + c_x * x
        if NOISE != 0:
            var = bp_prev * inv_bp * beta
            var = tl.maximum(var, tl.full([], 1e-20, var.dtype))  # 1e-20 exact in the compute dtype
            if VAR == 0:
                std = _sqrt(var, F64)
            elif VAR == 1:
                std = tl.exp(0.5 * tl.log(var))
            elif VAR == 2:
                std = _sqrt(beta, F64)
            elif VAR == 3:
                v = _cvt(tl.load(eps_row + N + offs, mask=mask, other=1.0), F64)
                std = tl.sqrt(v)
            else:
                v = _cvt(tl.load(eps_row + N + offs, mask=mask, other=0.0), F64)
                log_var = tl.log(var)
                f = (v + 1.0) * 0.5
                std = tl.exp(0.5 * (f * tl.log(beta) + (1.0 - f) * log_var))
            prev = tl.where(t > 0, prev + std * n, prev)
    else:
        inv_sqrt_bp = _div(1.0, sqrt_bp, F64)
        if USE_CLIPPED:
            ep = (x - sqrt_ab * x0) * inv_sqrt_bp
        elif PRED == 0:
            ep = e
        elif PRED == 1:
            ep = (x - sqrt_ab * x0_raw) * inv_sqrt_bp
        else:
            ep = sqrt_ab * e + sqrt_bp * x
        std = _cvt(eta, F64) * _sqrt(bp_prev * _div(1.0, bp, F64) * beta, F64)
        c_dir = _sqrt(bp_prev - std * std, F64)
        prev = _sqrt(ab_prev, F64) * x0 + c_dir * ep
        if NOISE != 0:
            prev = prev + std * n

    tl.store(out_prev_ptr + row + offs, prev.to(out_prev_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(out_x0_ptr + row + offs, x0.to(out_x0_ptr.dtype.element_ty), mask=mask)


# Under TRITON_INTERPRET=1 @triton.jit yields an interpreted function, which cannot call libdevice.
_INTERPRETED = type(_diffusion_step_kernel).__name__ == "InterpretedFunction"


def block_config(element_size: int):
    """(BLOCK, num_warps) for the element size in bytes: two 16-byte accesses per thread per tensor
    (4 warps x 32 threads x 16 / 8 / 4 elements for 16-bit / fp32 / fp64). On an H200 this was the
    best or within 2% of the best of (1024, 4), (2048, 4), (2048, 8), (4096, 8)."""
    if element_size <= 2:
        return 2048, 4
    if element_size == 4:
        return 1024, 4
    return 512, 4


def diffusion_step(eps, uncond, sample, noise, timesteps, prev_table, alphas_cumprod, x0_scale, eps_scale,
                   out_prev, out_x0, mode, guidance_scale, prediction_type, variance_type, clip_sample,
                   clip_range, eta, use_clipped, final_alpha, seed, *, block=None):
    """Launch the fused step (kernel contract of :mod:`vlops.ops.diffusion`). Writes ``out_prev``
    and, if given, ``out_x0``; returns None. No host synchronisation.

    ``block`` (keyword-only, tests): elements per program instead of :func:`block_config`'s choice;
    a power of two >= 16."""
    import torch

    _check(sample.dim() == 2, lambda: f"sample must be [B, N], got shape {tuple(sample.shape)}")
    B, N = sample.shape
    _check(B >= 1 and N >= 1, lambda: f"sample must be non-empty, got shape {tuple(sample.shape)}")
    dt = sample.dtype
    _check(dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64),
           lambda: f"sample dtype must be fp16/bf16/fp32/fp64, got {dt}")
    _check(mode in (0, 1), lambda: f"mode must be 0 (DDPM) or 1 (DDIM), got {mode!r}")
    _check(prediction_type in (0, 1, 2), lambda: f"prediction_type must be 0, 1 or 2, got {prediction_type!r}")
    _check(variance_type in (0, 1, 2, 3, 4), lambda: f"variance_type must be in 0..4, got {variance_type!r}")
    _check(0 <= int(seed) < 2**63, lambda: f"seed must be in [0, 2**63), got {seed}")
    _check(B <= 65535, lambda: f"batch size must be <= 65535, got {B}")
    _check(N < 2**31 - 8192, lambda: f"a sample must have < 2**31 - 8192 elements, got {N}")

    def _row_tensor(name, x, widths):
        _check(x.dim() == 2 and x.shape[0] == B and x.shape[1] in widths,
               lambda: f"{name} must be [B={B}, {' or '.join(map(str, widths))}], got shape {tuple(x.shape)}")
        _check(x.dtype == dt, lambda: f"{name} must have dtype {dt} like sample, got {x.dtype}")
        _check(x.device == sample.device, lambda: f"{name} must be on {sample.device}, got {x.device}")
        _check(x.stride(1) == 1 or x.shape[1] == 1, lambda: f"{name} must have a unit inner stride")

    _row_tensor("eps", eps, (N, 2 * N))
    _check(sample.is_contiguous(), "sample must be contiguous")
    _row_tensor("out_prev", out_prev, (N,))
    _check(out_prev.is_contiguous(), "out_prev must be contiguous")
    if uncond is not None:
        _row_tensor("uncond", uncond, (N, 2 * N))
    if out_x0 is not None:
        _row_tensor("out_x0", out_x0, (N,))
        _check(out_x0.is_contiguous(), "out_x0 must be contiguous")
    learned = mode == 0 and variance_type in (3, 4)
    if learned:
        _check(eps.shape[1] == 2 * N, lambda: f"variance_type {variance_type} (learned) needs eps of [B, 2N={2 * N}], "
                                      f"got {tuple(eps.shape)}")
    needs_noise = mode == 0 or eta > 0
    if needs_noise and noise is not None:
        _row_tensor("noise", noise, (N,))
        _check(noise.is_contiguous(), "noise must be contiguous")
    _check(timesteps.dim() == 1 and timesteps.numel() in (1, B),
           lambda: f"timesteps must be [B={B}] or [1], got shape {tuple(timesteps.shape)}")
    for name, s in (("x0_scale", x0_scale), ("eps_scale", eps_scale)):
        if s is not None:
            _check(s.dim() == 1 and s.numel() == B, lambda: f"{name} must be [B={B}], got shape {tuple(s.shape)}")
            s_stride = s.stride(0)
            _check(s_stride == 1 or B == 1, lambda: f"{name} must be contiguous")

    noise_mode = 0 if not needs_noise else (1 if noise is not None else 2)
    guided = uncond is not None
    has_x0_scale = x0_scale is not None
    seed = int(seed)
    lo = seed & 0xFFFFFFFF
    seed_lo = lo - 2**32 if lo >= 2**31 else lo  # the same 32 bits as a signed int32 argument
    seed_hi = seed >> 32
    shift4 = noise_mode == 2 and N % 4 != 0
    BLOCK, num_warps = block_config(sample.element_size())
    if block is not None:
        _check(block >= 16 and block & (block - 1) == 0, lambda: f"block must be a power of two >= 16, got {block}")
        BLOCK = int(block)
    grid = (cdiv(N + (3 if shift4 else 0), BLOCK), B)
    _diffusion_step_kernel[grid](
        eps, uncond if guided else sample, sample, noise if noise_mode == 1 else sample,
        out_prev, out_x0 if out_x0 is not None else out_prev,
        timesteps, prev_table, alphas_cumprod,
        x0_scale if has_x0_scale else alphas_cumprod,
        eps_scale if (guided and eps_scale is not None) else alphas_cumprod,
        N, eps.stride(0), (uncond.stride(0) if guided else 0), (0 if timesteps.numel() == 1 else 1),
        float(guidance_scale), float(clip_range), float(eta), float(final_alpha), seed_lo, seed_hi,
        MODE=int(mode), PRED=int(prediction_type), VAR=int(variance_type) if mode == 0 else 0,
        GUIDED=guided, NOISE=noise_mode, HAS_X0_SCALE=has_x0_scale,
        HAS_EPS_SCALE=guided and eps_scale is not None,
        CLIP=bool(clip_sample) and not has_x0_scale, USE_CLIPPED=bool(use_clipped) and mode == 1,
        WRITE_X0=out_x0 is not None, SHIFT4=shift4, F64=dt == torch.float64, BLOCK=BLOCK,
        QPT=max(1, 4 // sample.element_size()), FAST_TRIG=not _INTERPRETED,
        num_warps=num_warps,
    )


# ---------------------------------------------------------------------------------------------
# AOT specialisations (compiled for sm_90 by tests/test_aot_sm90.py, no GPU needed)

_ARG_TYPES = {
    "t_ptr": "*i64", "prev_table_ptr": "*i64", "ac_ptr": "*fp32", "x0_scale_ptr": "*fp32",
    "eps_scale_ptr": "*fp32", "N": "i32", "stride_eps": "i32", "stride_unc": "i32", "t_stride": "i32",
    "guidance_scale": "fp32", "clip_range": "fp32", "eta": "fp32", "final_alpha": "fp32",
    "seed_lo": "i32", "seed_hi": "i32",
}
_DATA_PTRS = ("eps_ptr", "uncond_ptr", "sample_ptr", "noise_ptr", "out_prev_ptr", "out_x0_ptr")
_ELEM_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}


def _aot_spec(dtype, mode, pred=0, var=0, guided=False, noise=2, x0_scale=False, eps_scale=False,
              clip=False, use_clipped=False, write_x0=True, shift4=False):
    block, num_warps = block_config(_ELEM_SIZE[dtype])
    constexprs = dict(MODE=mode, PRED=pred, VAR=var, GUIDED=guided, NOISE=noise, HAS_X0_SCALE=x0_scale,
                      HAS_EPS_SCALE=eps_scale, CLIP=clip, USE_CLIPPED=use_clipped, WRITE_X0=write_x0,
                      SHIFT4=shift4, F64=dtype == "fp64", BLOCK=block, QPT=max(1, 4 // _ELEM_SIZE[dtype]),
                      FAST_TRIG=True)
    signature = {}
    for name in _diffusion_step_kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _DATA_PTRS:
            signature[name] = f"*{dtype}"
        else:
            signature[name] = _ARG_TYPES[name]
    if dtype == "fp64":
        signature["ac_ptr"] = "*fp64"
    noise_name = {0: "nonoise", 1: "noisetensor", 2: "philox"}[noise]
    name = (f"diffusion_step_{dtype}_{'ddpm' if mode == 0 else 'ddim'}_pred{pred}"
            + (f"_var{var}" if mode == 0 else "") + ("_cfg" if guided else "") + f"_{noise_name}"
            + ("_thr" if x0_scale else "") + ("_rescale" if eps_scale else "") + ("_clip" if clip else "")
            + ("_useclipped" if use_clipped else "") + ("" if write_x0 else "_nox0") + ("_shift4" if shift4 else ""))
    # The common case: N, the row strides and every base pointer divisible by 16 (latents of 4x64x64).
    divisible = list(_DATA_PTRS) + ["N", "stride_eps", "stride_unc"]
    return {"name": name, "kernel": _diffusion_step_kernel, "signature": signature, "constexprs": constexprs,
            "num_warps": num_warps, "divisibility_16": divisible, "matmul": False, "vectorized": not shift4}


AOT_SPECS = [
    # SD / SDXL sampling: DDIM, epsilon, CFG, eta 0 (no noise) and eta > 0 (in-kernel noise)
    *[_aot_spec(dt, 1, guided=True, noise=0) for dt in ("fp32", "bf16", "fp16")],
    *[_aot_spec(dt, 1, guided=True, noise=2) for dt in ("fp32", "bf16", "fp16")],
    _aot_spec("bf16", 1, pred=2, guided=True, noise=0, eps_scale=True, write_x0=False),  # v-pred + rescale
    _aot_spec("fp32", 1, pred=1, noise=1, clip=True, use_clipped=True),
    # DDPM: fixed_small with in-kernel noise / noise tensor, with and without CFG
    *[_aot_spec(dt, 0, var=0, guided=False, noise=2) for dt in ("fp32", "bf16", "fp16")],
    *[_aot_spec(dt, 0, var=0, guided=True, noise=2, clip=True) for dt in ("fp32", "bf16", "fp16")],
    _aot_spec("fp32", 0, var=0, guided=True, noise=1),
    _aot_spec("bf16", 0, var=0, guided=False, noise=1, write_x0=False),
    # DDPM learned_range (GLIDE / DeepFloyd IF) with thresholding, and the other variance types
    _aot_spec("fp16", 0, var=4, guided=True, noise=2, x0_scale=True),
    _aot_spec("fp32", 0, var=3, noise=2),
    _aot_spec("fp32", 0, var=1, noise=2),
    _aot_spec("bf16", 0, var=2, pred=2, noise=2),
    # odd N with in-kernel noise (window shifted onto quads; no 16-byte alignment)
    _aot_spec("fp32", 0, var=0, noise=2, shift4=True),
]
AOT_SPECS[-1]["divisibility_16"] = list(_DATA_PTRS)  # odd N: only the base pointers are aligned
