"""The fused diffusion step as a torch custom op: schema, fake kernel, device dispatch.

Kernel contract (the same positional arguments for every backend launcher:
``vlops._C.diffusion_step_cpu``, ``vlops._C.diffusion_step_cuda``,
``vlops.kernels.diffusion_step.diffusion_step``)::

    launch(eps, uncond, sample, noise, timesteps, prev_table, alphas_cumprod, x0_scale, eps_scale,
           out_prev, out_x0, mode, guidance_scale, prediction_type, variance_type, clip_sample,
           clip_range, eta, use_clipped, final_alpha, seed)

- ``eps``: contiguous [B, M] model output, M = N (C channels) or 2N (C + C variance channels);
  ``N = sample.shape[1]``. The variance channels are ``eps[:, N:]``.
- ``uncond``: None, or contiguous [B, Mu] (Mu = N or 2N); only ``uncond[:, :N]`` is read.
  Guidance is applied iff it is given: ``e = u + guidance_scale * (e - u)``.
- ``sample``: contiguous [B, N]. ``noise``: None or contiguous [B, N]. All of eps, uncond, sample,
  noise, out_prev, out_x0 share one floating dtype; arithmetic is fp32 (fp64 for fp64 tensors).
- ``timesteps``: int64 [B] or [1] (broadcast). ``prev_table``: int64 [T], the previous timestep of
  each timestep, negative for "none" (then ``final_alpha`` is used). ``alphas_cumprod``: float32 [T]
  (float64 for float64 tensors).
- ``x0_scale``: None or float32 [B] (dynamic thresholding: ``x0 = clamp(x0, -s, s) / s``, replaces
  clipping). ``eps_scale``: None or float32 [B] (guidance rescale factor, multiplies the guided e).
- ``out_prev``: [B, N] written. ``out_x0``: None, or [B, N] written with the final x0.
- ``mode``: 0 DDPM, 1 DDIM. ``prediction_type``: 0 epsilon, 1 sample, 2 v_prediction.
  ``variance_type`` (DDPM): 0 fixed_small, 1 fixed_small_log, 2 fixed_large, 3 learned,
  4 learned_range. DDPM adds noise where t > 0; DDIM where eta > 0.
- ``seed``: int in [0, 2**63); used when noise is needed and not given: element ``g = b * N + i``
  takes ``vlops.reference.diffusion.philox_normal(seed, ...)[g]``.

The element-wise math is :mod:`vlops.reference.diffusion`.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backends
from ..reference import diffusion as ref
from . import direct_call

OP = "diffusion_step"
_MODES = {"ddpm": 0, "ddim": 1}


def _launcher(backend: str):
    if backend == "cpu":
        return _backends.extension().diffusion_step_cpu
    if backend == "cuda":
        return _backends.extension().diffusion_step_cuda
    if backend == "triton":
        from vlops.kernels import diffusion_step as k

        return k.diffusion_step
    raise AssertionError(backend)


def _reference(eps, uncond, sample, noise, timesteps, prev_table, alphas_cumprod, x0_scale, eps_scale,
               mode, guidance_scale, prediction_type, variance_type, clip_sample, clip_range, eta,
               use_clipped, final_alpha, seed):
    """The reference path on the flattened [B, *] layout, with the same per-sample scales."""
    N = sample.shape[1]
    B = sample.shape[0]
    cdt = torch.float64 if sample.dtype == torch.float64 else torch.float32
    needs_noise = (mode == 0) or eta > 0
    if needs_noise and noise is None:
        noise = ref.philox_normal(seed, B * N, device=sample.device).view(B, N)
    e = eps.to(cdt)
    u = None if uncond is None else uncond[:, :N].to(cdt)
    x = sample.to(cdt)
    if u is not None:
        guided = u + guidance_scale * (e[:, :N] - u)
        if eps_scale is not None:
            guided = guided * eps_scale.to(cdt)[:, None]
        e = torch.cat([guided, e[:, N:]], dim=1)
    prev, x0 = ref.diffusion_step(
        e.view(B, -1, N), timesteps, x.view(B, 1, N), alphas_cumprod.to(cdt), prev_table,
        mode="ddpm" if mode == 0 else "ddim",
        prediction_type=ref.PREDICTION_TYPES[prediction_type],
        variance_type=ref.VARIANCE_TYPES[variance_type],
        clip_sample=clip_sample and x0_scale is None, clip_sample_range=clip_range,
        eta=eta, use_clipped_model_output=use_clipped, final_alpha_cumprod=final_alpha,
        noise=None if noise is None else noise.to(cdt).view(B, 1, N),
        x0_scale=None if x0_scale is None else x0_scale.to(cdt),
    )
    return prev.view(B, N), x0.view(B, N)


def diffusion_step_impl(
    eps: torch.Tensor,
    uncond: Optional[torch.Tensor],
    sample: torch.Tensor,
    noise: Optional[torch.Tensor],
    timesteps: torch.Tensor,
    prev_table: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    x0_scale: Optional[torch.Tensor],
    eps_scale: Optional[torch.Tensor],
    mode: int,
    guidance_scale: float,
    prediction_type: int,
    variance_type: int,
    clip_sample: bool,
    clip_range: float,
    eta: float,
    use_clipped: bool,
    final_alpha: float,
    seed: int,
    return_x0: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    backend = _backends.resolve(OP, sample.device)
    B, N = sample.shape
    if backend == "reference":
        prev, x0 = _reference(eps, uncond, sample, noise, timesteps, prev_table, alphas_cumprod, x0_scale,
                              eps_scale, mode, guidance_scale, prediction_type, variance_type, clip_sample,
                              clip_range, eta, use_clipped, final_alpha, seed)
        # fresh tensors: a custom op's outputs may not alias its inputs (x0 is the input for "sample")
        prev = prev.to(sample.dtype, copy=True)
        x0 = x0.to(sample.dtype, copy=True) if return_x0 else sample.new_empty((0,))
        return prev, x0
    out_prev = torch.empty_like(sample)
    out_x0 = torch.empty_like(sample) if return_x0 else None
    _launcher(backend)(eps, uncond, sample, noise, timesteps, prev_table, alphas_cumprod, x0_scale, eps_scale,
                       out_prev, out_x0, mode, guidance_scale, prediction_type, variance_type, clip_sample,
                       clip_range, eta, use_clipped, final_alpha, seed)
    return out_prev, (out_x0 if return_x0 else sample.new_empty((0,)))


diffusion_step_op = torch.library.custom_op("vlops::diffusion_step", diffusion_step_impl, mutates_args=())


# what vlops.diffusion calls: the implementation itself in plain eager mode (it saves the dispatcher's per-call
# cost on small latents), the op under torch.compile, export, modes and the profiler (vlops.ops.dispatch_free)
diffusion_step = direct_call(diffusion_step_op, diffusion_step_impl)


@diffusion_step_op.register_fake
def _(eps, uncond, sample, noise, timesteps, prev_table, alphas_cumprod, x0_scale, eps_scale, mode,
      guidance_scale, prediction_type, variance_type, clip_sample, clip_range, eta, use_clipped,
      final_alpha, seed, return_x0):
    return torch.empty_like(sample), (torch.empty_like(sample) if return_x0 else sample.new_empty((0,)))
