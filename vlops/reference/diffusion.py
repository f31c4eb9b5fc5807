"""Eager PyTorch specification of the fused diffusion denoising step.

This module is the contract every fused backend (C++ CPU, Triton, CUDA) must equal. It is written
from the math of diffusers' ``DDPMScheduler.step`` / ``DDIMScheduler.step`` and of the pipelines'
classifier-free guidance lines (``noise_pred_uncond + s * (noise_pred_text - noise_pred_uncond)``,
``rescale_noise_cfg``), with two generalisations: a timestep per sample, and coefficients looked up
on the device from the schedule (no host synchronisation).

Everything is computed in the dtype of the inputs: call it with float64 tensors for the float64
reference.

Element-wise definition (per sample ``b``, element ``i`` of the first ``C`` channels):

    t = timesteps[b]; p = prev_table[t]
    ab = alphas_cumprod[t]; ab_prev = alphas_cumprod[p] if p >= 0 else final_alpha_cumprod
    bp = 1 - ab; bp_prev = 1 - ab_prev
    e  = model_output[b, i]                          (the conditional / only prediction)
    if guided:  e = uncond[b, i] + g * (e - uncond[b, i])
    if rescale: e = e * eps_scale[b]                 (guidance_rescale, per-sample factor)
    x0 = (x - sqrt(bp) e) / sqrt(ab)        epsilon
         e                                  sample
         sqrt(ab) x - sqrt(bp) e            v_prediction
    x0 = clamp(x0, -s_b, s_b) / s_b         dynamic thresholding (s_b per sample), else
    x0 = clamp(x0, -r, r)                   clip_sample
    DDPM: a = ab / ab_prev; beta = 1 - a
          prev = sqrt(ab_prev) beta / bp * x0 + sqrt(a) bp_prev / bp * x
          if t > 0: prev += std * n, var = max(bp_prev / bp * beta, 1e-20),
             std = sqrt(var)                         fixed_small
                   exp(0.5 log var)                  fixed_small_log
                   sqrt(beta)                        fixed_large
                   sqrt(v)                           learned        (v = model_output[b, C + i])
                   exp(0.5 (f log beta + (1-f) log var)), f = (v + 1) / 2     learned_range
    DDIM: eps = e (epsilon), (x - sqrt(ab) e) / sqrt(bp) (sample), sqrt(ab) e + sqrt(bp) x (v)
          if use_clipped_model_output: eps = (x - sqrt(ab) x0) / sqrt(bp)
          std = eta * sqrt(bp_prev / bp * (1 - ab / ab_prev))
          prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - std^2) eps
          if eta > 0: prev += std * n

The in-kernel noise ``n`` is a counter-based Philox4x32-10 stream, defined by :func:`philox_normal`.
"""
from __future__ import annotations

import math

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")

_M32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values. Returns four int64 tensors (uint32 values)."""
    k0 = torch.as_tensor(k0, dtype=torch.int64)
    k1 = torch.as_tensor(k1, dtype=torch.int64)
    for _ in range(rounds):
        # int64 products of two uint32 values can overflow the signed range: split into 16-bit halves.
        hi0, lo0 = _mul_hilo(c0, _PHILOX_ROUND_A)
        hi2, lo2 = _mul_hilo(c2, _PHILOX_ROUND_B)
        n0 = (hi2 ^ c1 ^ k0) & _M32
        n2 = (hi0 ^ c3 ^ k1) & _M32
        c0, c1, c2, c3 = n0, lo2, n2, lo0
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def _mul_hilo(a: torch.Tensor, b: int):
    """High and low 32 bits of the 64-bit product of uint32 values ``a`` (int64 tensor) and ``b``."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    lo_part = a * b_lo  # < 2**48
    hi_part = a * b_hi  # < 2**48
    # product = hi_part * 2**16 + lo_part
    low = (lo_part + ((hi_part & 0xFFFF) << 16)) & _M32
    carry = (lo_part + ((hi_part & 0xFFFF) << 16)) >> 32
    high = ((hi_part >> 16) + carry) & _M32
    return high, low


def uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """uint32 (in int64) -> float32 in (0, 1): ``(x >> 8) * 2**-24 + 2**-25``."""
    return (x >> 8).to(torch.float32) * 5.9604644775390625e-08 + 2.98023223876953125e-08


def philox_normal(seed: int, numel: int, device=None) -> torch.Tensor:
    """The standard-normal stream the fused kernels draw when no noise is given.

    Element ``g`` (flat index in the [B, C, ...] output) uses Philox4x32-10 with key
    ``(seed & 0xffffffff, seed >> 32)`` and counter ``(q & 0xffffffff, q >> 32, 0, 0)`` where
    ``q = g // 4``; the four uint32 outputs become uniforms ``u0..u3`` by :func:`uint32_to_uniform`,
    and two Box-Muller pairs give ``n0 = r0 cos(2 pi u1), n1 = r0 sin(2 pi u1)`` with
    ``r0 = sqrt(-2 log u0)`` and likewise ``n2, n3`` from ``u2, u3``. Element ``g`` takes lane
    ``g % 4``. Returns float32 of shape [numel]. Computed here in float64 after the uniforms.
    """
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    g = torch.arange(numel, dtype=torch.int64, device=device)
    q = g >> 2
    c0, c1 = q & _M32, q >> 32
    zeros = torch.zeros_like(q)
    r = philox4x32(c0, c1, zeros, zeros, seed & _M32, (seed >> 32) & _M32)
    u = [uint32_to_uniform(x).double() for x in r]
    r0 = torch.sqrt(-2.0 * torch.log(u[0]))
    r1 = torch.sqrt(-2.0 * torch.log(u[2]))
    th0 = 2.0 * math.pi * u[1]
    th1 = 2.0 * math.pi * u[3]
    n = torch.stack([r0 * torch.cos(th0), r0 * torch.sin(th0), r1 * torch.cos(th1), r1 * torch.sin(th1)], dim=-1)
    lane = (g & 3).unsqueeze(-1)
    return torch.gather(n, -1, lane).squeeze(-1).to(torch.float32)


def threshold_scale(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Per-sample dynamic-thresholding scale ``s`` (Imagen; diffusers ``_threshold_sample``)."""
    flat = x0.reshape(x0.shape[0], -1).abs()
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat, ratio, dim=1)
    return torch.clamp(s, min=1.0, max=max_value)


def guidance_rescale_scale(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Per-sample factor k with ``rescale_noise_cfg(guided, cond, rescale) == guided * k``."""
    dims = list(range(1, guided.ndim))
    std_text = cond.std(dim=dims)
    std_cfg = guided.std(dim=dims)
    return rescale * (std_text / std_cfg) + (1.0 - rescale)


def diffusion_step(
    model_output: torch.Tensor,
    timesteps: torch.Tensor,
    sample: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prev_table: torch.Tensor,
    *,
    mode: str,
    model_output_uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
    final_alpha_cumprod: float = 1.0,
    noise: torch.Tensor | None = None,
    x0_scale: torch.Tensor | None = None,
):
    """Reference step. ``model_output`` / ``model_output_uncond`` are [B, C or 2C, ...] (the
    variance channels, if any, are read from ``model_output``), ``sample`` is [B, C, ...],
    ``timesteps`` is int64 [B] (or [1], broadcast), ``prev_table`` int64 [T], ``noise`` [B, C, ...]
    (needed whenever noise is added). ``x0_scale`` [B], if given, is the dynamic-thresholding scale
    to use instead of computing it. Returns ``(prev_sample, pred_original_sample)``."""
    B, C = sample.shape[0], sample.shape[1]
    dt = sample.dtype
    ac = alphas_cumprod.to(dt)
    t = timesteps.reshape(-1).expand(B) if timesteps.numel() == 1 else timesteps.reshape(-1)
    p = prev_table[t]
    ab = ac[t]
    ab_prev = torch.where(p >= 0, ac[p.clamp(min=0)], torch.full_like(ab, final_alpha_cumprod))
    view = (B,) + (1,) * (sample.ndim - 1)
    ab, ab_prev = ab.view(view), ab_prev.view(view)
    bp, bp_prev = 1 - ab, 1 - ab_prev

    e_raw = model_output[:, :C]
    var_ch = model_output[:, C:] if model_output.shape[1] == 2 * C else None
    e = e_raw
    if model_output_uncond is not None:
        u = model_output_uncond[:, :C]
        e = u + guidance_scale * (e_raw - u)
        if guidance_rescale > 0:
            e = e * guidance_rescale_scale(e, e_raw, guidance_rescale).view(view)
    x = sample
    if prediction_type == "epsilon":
        x0 = (x - bp.sqrt() * e) / ab.sqrt()
    elif prediction_type == "sample":
        x0 = e
    elif prediction_type == "v_prediction":
        x0 = ab.sqrt() * x - bp.sqrt() * e
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    x0_raw = x0
    if thresholding or x0_scale is not None:
        if x0_scale is None:
            x0_scale = threshold_scale(x0, dynamic_thresholding_ratio, sample_max_value)
        s = x0_scale.to(dt).view(view)
        x0 = torch.maximum(torch.minimum(x0, s), -s) / s
    elif clip_sample:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)

    if mode == "ddpm":
        a = ab / ab_prev
        beta = (ab_prev - ab) / ab_prev  # = 1 - a, without the cancellation near t = 0 in low precision
        prev = (ab_prev.sqrt() * beta / bp) * x0 + (a.sqrt() * bp_prev / bp) * x
        var = torch.clamp(bp_prev / bp * beta, min=1e-20)
        if variance_type == "fixed_small":
            std = var.sqrt()
        elif variance_type == "fixed_small_log":
            std = torch.exp(0.5 * torch.log(var))
        elif variance_type == "fixed_large":
            std = beta.sqrt()
        elif variance_type == "learned":
            std = var_ch.sqrt()
        elif variance_type == "learned_range":
            f = (var_ch + 1) / 2
            std = torch.exp(0.5 * (f * torch.log(beta) + (1 - f) * torch.log(var)))
        else:
            raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
        add = (t > 0).view(view)
        if bool(add.any()):
            prev = prev + torch.where(add, std * noise, torch.zeros_like(prev))
    elif mode == "ddim":
        if prediction_type == "epsilon":
            eps = e
        elif prediction_type == "sample":
            eps = (x - ab.sqrt() * x0_raw) / bp.sqrt()
        else:
            eps = ab.sqrt() * e + bp.sqrt() * x
        if use_clipped_model_output:
            eps = (x - ab.sqrt() * x0) / bp.sqrt()
        std = eta * (bp_prev / bp * ((ab_prev - ab) / ab_prev)).sqrt()
        prev = ab_prev.sqrt() * x0 + (1 - ab_prev - std**2).sqrt() * eps
        if eta > 0:
            prev = prev + std * noise
    else:
        raise ValueError(f"mode must be 'ddpm' or 'ddim', got {mode!r}")
    return prev, x0
