"""Public API of the fused diffusion denoising step: :class:`DiffusionSchedule`, :func:`ddpm_step`,
:func:`ddim_step`.

One call fuses classifier-free guidance, the x0 prediction, clipping or dynamic thresholding, the
posterior mean, the variance and the noise into one pass over the tensors (guidance rescale and
dynamic thresholding need a per-sample statistic first, and take one more pass). Coefficients are
looked up on the device from the schedule, so a step never synchronises with the host and can be
captured in a CUDA graph (with ``noise`` given, or a fixed ``seed``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _validate as V
from .ops import diffusion as _op
from .reference import diffusion as _ref

__all__ = ["DiffusionSchedule", "ddpm_step", "ddim_step"]

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_SPACINGS = ("leading", "trailing", "linspace")


def _betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str) -> torch.Tensor:
    T = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    # squaredcos_cap_v2 (Nichol & Dhariwal's cosine schedule, as diffusers' betas_for_alpha_bar)
    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def _inference_timesteps(T: int, n: int, spacing: str, steps_offset: int) -> torch.Tensor:
    import numpy as np

    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        ratio = T // n
        ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    else:
        ratio = T / n
        ts = np.round(np.arange(T, 0, -ratio)).astype(np.int64) - 1
    return torch.from_numpy(ts)


class DiffusionSchedule:
    """The noise schedule a step reads on the device.

    Args:
        alphas_cumprod: float tensor [T], the cumulative products of ``1 - beta``, in (0, 1].
        prev_timesteps: int64 tensor [T], the previous timestep of every timestep; a negative value
            means "none" and the step uses ``final_alpha_cumprod``.
        final_alpha_cumprod: alpha-bar used after the last step (1.0, or alphas_cumprod[0] for DDIM
            with ``set_alpha_to_one=False``).
        timesteps: optional int64 tensor of the inference timesteps (for validation only).

    Use the constructors :meth:`ddpm`, :meth:`ddim` or :meth:`from_diffusers`.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prev_timesteps: torch.Tensor, final_alpha_cumprod: float = 1.0,
                 timesteps: Optional[torch.Tensor] = None):
        V.tensor(alphas_cumprod, "alphas_cumprod", floating=True)
        V.tensor(prev_timesteps, "prev_timesteps")
        if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() == 0:
            raise ValueError(f"alphas_cumprod must be a non-empty 1-D tensor, got shape {tuple(alphas_cumprod.shape)}")
        if prev_timesteps.shape != alphas_cumprod.shape or prev_timesteps.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"prev_timesteps must be an integer tensor of shape {tuple(alphas_cumprod.shape)}, got "
                f"{prev_timesteps.dtype} {tuple(prev_timesteps.shape)}")
        ac = alphas_cumprod.detach().to("cpu", torch.float64)
        if not bool(((ac > 0) & (ac <= 1)).all()):
            raise ValueError("alphas_cumprod must lie in (0, 1]")
        pt = prev_timesteps.detach().to("cpu", torch.int64)
        T = ac.numel()
        if bool((pt >= T).any()):
            raise ValueError(f"prev_timesteps must be < {T} (negative for 'none')")
        self.final_alpha_cumprod = V.real(final_alpha_cumprod, "final_alpha_cumprod", lo=0.0, hi=1.0, lo_open=True)
        self.alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float32)
        self.prev_timesteps = torch.where(pt < 0, torch.full_like(pt, -1), pt)
        self.timesteps = None if timesteps is None else timesteps.detach().to("cpu", torch.int64)
        self.valid_timesteps = None if timesteps is None else frozenset(self.timesteps.tolist())
        self._cache: dict = {}

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def tensors(self, device: torch.device, dtype: torch.dtype = torch.float32):
        """(alphas_cumprod, prev_timesteps) on ``device``, cached (fp64 alphas for fp64 steps)."""
        key = (torch.device(device), dtype)
        hit = self._cache.get(key)
        if hit is None:
            hit = (self.alphas_cumprod.to(device=device, dtype=dtype), self.prev_timesteps.to(device))
            self._cache[key] = hit
        return hit

    def arange(self, device: torch.device) -> torch.Tensor:
        """int64 [0, 1, ..., T-1] on ``device``, cached: an int timestep becomes a view into it."""
        key = ("arange", torch.device(device))
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = torch.arange(self.num_train_timesteps, dtype=torch.int64, device=device)
        return hit

    def __repr__(self):
        n = None if self.timesteps is None else self.timesteps.numel()
        return (f"DiffusionSchedule(num_train_timesteps={self.num_train_timesteps}, inference_steps={n}, "
                f"final_alpha_cumprod={self.final_alpha_cumprod})")

    @staticmethod
    def _alphas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas):
        if trained_betas is not None:
            betas = torch.as_tensor(trained_betas, dtype=torch.float32)
        else:
            if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
                raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
            V.choice(beta_schedule, "beta_schedule", _BETA_SCHEDULES)
            betas = _betas(num_train_timesteps, beta_start, beta_end, beta_schedule)
        return torch.cumprod(1.0 - betas, dim=0)

    @classmethod
    def ddpm(cls, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
             beta_schedule: str = "linear", trained_betas=None, num_inference_steps: Optional[int] = None,
             timestep_spacing: str = "leading", steps_offset: int = 0) -> "DiffusionSchedule":
        """DDPM schedule as diffusers' DDPMScheduler (with ``set_timesteps(num_inference_steps)`` if given)."""
        ac = cls._alphas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        T = ac.numel()
        prev = torch.arange(T, dtype=torch.int64) - 1
        ts = None
        if num_inference_steps is not None:
            ts = _inference_timesteps(T, cls._steps(num_inference_steps, T), V.choice(
                timestep_spacing, "timestep_spacing", _SPACINGS), steps_offset)
            prev = _prev_from_list(ts, T)
        return cls(ac, prev, 1.0, ts)

    @classmethod
    def ddim(cls, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
             beta_schedule: str = "linear", trained_betas=None, num_inference_steps: int = 50,
             set_alpha_to_one: bool = True, timestep_spacing: str = "leading",
             steps_offset: int = 0) -> "DiffusionSchedule":
        """DDIM schedule as diffusers' DDIMScheduler after ``set_timesteps(num_inference_steps)``."""
        ac = cls._alphas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        T = ac.numel()
        n = cls._steps(num_inference_steps, T)
        ts = _inference_timesteps(T, n, V.choice(timestep_spacing, "timestep_spacing", _SPACINGS), steps_offset)
        prev = torch.arange(T, dtype=torch.int64) - T // n
        final = 1.0 if V.boolean(set_alpha_to_one, "set_alpha_to_one") else float(ac[0])
        return cls(ac, prev, final, ts)

    @staticmethod
    def _steps(n, T):
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must be an int in [1, {T}], got {n!r}")
        return n

    @classmethod
    def from_diffusers(cls, scheduler) -> "DiffusionSchedule":
        """The schedule of a diffusers DDPMScheduler or DDIMScheduler (after ``set_timesteps`` for DDIM)."""
        name = type(scheduler).__name__
        ac = getattr(scheduler, "alphas_cumprod", None)
        if not isinstance(ac, torch.Tensor):
            raise TypeError(f"scheduler must be a diffusers DDPMScheduler or DDIMScheduler, got {name}")
        T = ac.numel()
        n = getattr(scheduler, "num_inference_steps", None)
        is_ddim = hasattr(scheduler, "final_alpha_cumprod")
        if is_ddim:
            if n is None:
                raise ValueError(f"{name}: call scheduler.set_timesteps(...) before building a schedule from it")
            prev = torch.arange(T, dtype=torch.int64) - T // n
            return cls(ac, prev, float(scheduler.final_alpha_cumprod), scheduler.timesteps)
        if getattr(scheduler, "custom_timesteps", False) or n:
            return cls(ac, _prev_from_list(scheduler.timesteps, T), 1.0, scheduler.timesteps)
        return cls(ac, torch.arange(T, dtype=torch.int64) - 1, 1.0, None)


def _prev_from_list(ts: torch.Tensor, T: int) -> torch.Tensor:
    """prev[ts[i]] = ts[i + 1], the last one -1; timesteps outside the list step back by one."""
    prev = torch.arange(T, dtype=torch.int64) - 1
    ts = ts.to("cpu", torch.int64)
    prev[ts[:-1]] = ts[1:]
    prev[ts[-1]] = -1
    return prev


def _timesteps(timestep, B: int, schedule: DiffusionSchedule, device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """int64 [1] or [B] tensor on ``device``; also the host values when known without a sync."""
    T = schedule.num_train_timesteps
    if (isinstance(timestep, torch.Tensor) and timestep.device.type == "cpu" and timestep.numel() == 1
            and not timestep.dtype.is_floating_point and not torch.compiler.is_compiling()):
        timestep = int(timestep)  # a 0-d host tensor, as pipelines pass scheduler.timesteps[i]
    if isinstance(timestep, bool):
        raise TypeError("timestep must be an int or an integer tensor, got bool")
    if isinstance(timestep, int):
        if not 0 <= timestep < T:
            raise ValueError(f"timestep must lie in [0, {T}) for this schedule, got {timestep}")
        if schedule.valid_timesteps is not None and timestep not in schedule.valid_timesteps:
            raise ValueError(f"timestep {timestep} is not one of the schedule's inference timesteps")
        # a view into a cached device arange: no host-to-device copy (a synchronising one) per step
        return schedule.arange(device)[timestep:timestep + 1], torch.tensor([timestep], dtype=torch.int64)
    elif isinstance(timestep, torch.Tensor):
        if timestep.dtype.is_floating_point or timestep.dtype.is_complex or timestep.dtype == torch.bool:
            if timestep.dtype.is_floating_point and timestep.device.type == "cpu" and bool(
                    (timestep == timestep.round()).all()):
                timestep = timestep.to(torch.int64)  # diffusers pipelines sometimes pass float timesteps
            else:
                raise TypeError(f"timestep must be an int or an integer tensor, got {timestep.dtype}")
        if timestep.numel() not in (1, B):
            raise ValueError(f"timestep must hold 1 or {B} (batch) values, got shape {tuple(timestep.shape)}")
        if timestep.device.type != "cpu" or torch.compiler.is_compiling():
            # no host sync (and nothing data-dependent under torch.compile): values are trusted
            return timestep.reshape(-1).to(device=device, dtype=torch.int64), None
        host = timestep.reshape(-1).to(torch.int64)
    else:
        raise TypeError(f"timestep must be an int or an integer tensor, got {type(timestep).__name__}")
    if bool(((host < 0) | (host >= T)).any()):
        raise ValueError(f"timestep must lie in [0, {T}) for this schedule, got {host.tolist()[:8]}")
    if schedule.timesteps is not None:
        bad = ~torch.isin(host, schedule.timesteps)
        if bool(bad.any()):
            raise ValueError(f"timestep {host[bad].tolist()[:8]} is not one of the schedule's inference timesteps")
    return host.to(device), host


def _split_guidance(model_output, model_output_uncond, guidance_scale, cfg_order, B):
    """(cond, uncond or None, g) with cond/uncond [B, ...]."""
    if guidance_scale is None:
        if model_output_uncond is not None:
            raise ValueError("model_output_uncond was given without guidance_scale")
        if model_output.shape[0] != B:
            raise ValueError(f"model_output has batch {model_output.shape[0]} but sample has batch {B}; a doubled "
                             "batch needs guidance_scale")
        return model_output, None, 1.0
    g = V.real(guidance_scale, "guidance_scale")
    V.choice(cfg_order, "cfg_order", ("uncond_first", "cond_first"))
    if model_output_uncond is None:
        if model_output.shape[0] != 2 * B:
            raise ValueError(f"with guidance_scale and no model_output_uncond, model_output must be the doubled batch "
                             f"[2 * {B}, ...], got batch {model_output.shape[0]}")
        a, b = model_output[:B], model_output[B:]
        return (b, a, g) if cfg_order == "uncond_first" else (a, b, g)
    V.tensor(model_output_uncond, "model_output_uncond", floating=True)
    if model_output.shape[0] != B or model_output_uncond.shape[0] != B:
        raise ValueError(f"model_output and model_output_uncond must both have batch {B}, got "
                         f"{model_output.shape[0]} and {model_output_uncond.shape[0]}")
    if model_output_uncond.shape[2:] != model_output.shape[2:] or model_output_uncond.shape[1] not in (
            model_output.shape[1], model_output.shape[1] // 2 if model_output.shape[1] % 2 == 0 else -1):
        raise ValueError(f"model_output_uncond shape {tuple(model_output_uncond.shape)} does not match model_output "
                         f"{tuple(model_output.shape)}")
    return model_output, model_output_uncond, g


def _step(mode, model_output, timestep, sample, schedule, *, guidance_scale, model_output_uncond, cfg_order,
          guidance_rescale, prediction_type, variance_type, clip_sample, clip_sample_range, thresholding,
          dynamic_thresholding_ratio, sample_max_value, eta, use_clipped_model_output, noise, seed, generator,
          return_pred_original):
    V.tensor(sample, "sample", floating=True, ndim_min=2)
    V.tensor(model_output, "model_output", floating=True, ndim_min=2)
    if not isinstance(schedule, DiffusionSchedule):
        raise TypeError(f"schedule must be a vlops.DiffusionSchedule, got {type(schedule).__name__}")
    V.same_device(sample, "sample", model_output=model_output, model_output_uncond=model_output_uncond, noise=noise)
    if model_output.ndim != sample.ndim or model_output.shape[2:] != sample.shape[2:]:
        raise ValueError(f"model_output shape {tuple(model_output.shape)} does not match sample shape "
                         f"{tuple(sample.shape)} (expected [B or 2B, C or 2C, {', '.join(map(str, sample.shape[2:]))}])")
    B, C = sample.shape[0], sample.shape[1]
    V.choice(prediction_type, "prediction_type", _ref.PREDICTION_TYPES)
    V.choice(variance_type, "variance_type", _ref.VARIANCE_TYPES)
    if model_output.shape[1] not in (C, 2 * C):
        raise ValueError(f"model_output has {model_output.shape[1]} channels; sample has {C}, so it needs {C} "
                         f"(or {2 * C} with predicted variance)")
    if mode == 0 and variance_type in _ref.LEARNED_VARIANCE_TYPES and model_output.shape[1] != 2 * C:
        raise ValueError(f"variance_type={variance_type!r} needs model_output with 2C = {2 * C} channels (C "
                         f"predicted-noise channels then C variance channels), got {model_output.shape[1]}")
    V.boolean(clip_sample, "clip_sample")
    V.boolean(thresholding, "thresholding")
    V.boolean(return_pred_original, "return_pred_original")
    clip_range = V.real(clip_sample_range, "clip_sample_range", lo=0.0, lo_open=True)
    rescale = V.real(guidance_rescale, "guidance_rescale", lo=0.0, hi=1.0)
    eta = V.real(eta, "eta", lo=0.0)
    if thresholding:
        V.real(dynamic_thresholding_ratio, "dynamic_thresholding_ratio", lo=0.0, hi=1.0)
        V.real(sample_max_value, "sample_max_value", lo=1.0)
    cond, uncond, g = _split_guidance(model_output, model_output_uncond, guidance_scale, cfg_order, B)
    if rescale > 0 and uncond is None:
        raise ValueError("guidance_rescale needs classifier-free guidance (guidance_scale)")

    dt = torch.promote_types(sample.dtype, model_output.dtype)
    dev = sample.device
    ts, host_ts = _timesteps(timestep, B, schedule, dev)
    needs_noise = (mode == 0 and (host_ts is None or bool((host_ts > 0).any()))) or (mode == 1 and eta > 0)
    given = [n for n, v in (("noise", noise), ("seed", seed), ("generator", generator)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of noise, seed and generator, got {', '.join(given)}")
    if noise is not None:
        V.tensor(noise, "noise", floating=True)
        if noise.shape != sample.shape:
            raise ValueError(f"noise must have the shape of sample {tuple(sample.shape)}, got {tuple(noise.shape)}")
    elif generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if needs_noise:  # drawn as diffusers' randn_tensor does, so results match it sample for sample
            noise = torch.randn(sample.shape, generator=generator, device=generator.device,
                                dtype=model_output.dtype).to(dev)
    if seed is None:
        if needs_noise and noise is None:
            if torch.compiler.is_compiling():
                raise ValueError("under torch.compile, pass seed=, noise= or generator= (a random seed would be "
                                 "baked into the compiled graph)")
            seed = int(torch.randint(0, 2**62, (1,)).item())
        else:
            seed = 0
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")

    flat = lambda t: None if t is None else t.to(dt).reshape(t.shape[0], -1).contiguous()  # noqa: E731
    eps, unc, x = flat(cond), flat(uncond), flat(sample)
    nz = flat(noise) if needs_noise else None
    ac, prev_table = schedule.tensors(dev, torch.float64 if dt == torch.float64 else torch.float32)
    eps_scale = None
    if rescale > 0:
        N = x.shape[1]
        guided = unc[:, :N].float() + g * (eps[:, :N].float() - unc[:, :N].float())
        eps_scale = _ref.guidance_rescale_scale(guided, eps[:, :N].float(), rescale).float()
    pt = _ref.PREDICTION_TYPES.index(prediction_type)
    vt = _ref.VARIANCE_TYPES.index(variance_type)
    args = (eps, unc, x, nz, ts, prev_table, ac)
    tail = (mode, g, pt, vt, clip_sample, clip_range, eta, bool(use_clipped_model_output),
            schedule.final_alpha_cumprod, seed)
    x0_scale = None
    if thresholding:  # first pass: the unclipped x0, for the per-sample quantile
        _, x0_raw = _op.diffusion_step(*args, None, eps_scale, mode, g, pt, vt, False, clip_range, eta,
                                          bool(use_clipped_model_output), schedule.final_alpha_cumprod, seed, True)
        x0_scale = _ref.threshold_scale(x0_raw, dynamic_thresholding_ratio, sample_max_value).float()
    prev, x0 = _op.diffusion_step(*args, x0_scale, eps_scale, *tail, return_pred_original)
    prev = prev.view(sample.shape)
    return prev, (x0.view(sample.shape) if return_pred_original else None)


def ddpm_step(model_output: torch.Tensor, timestep, sample: torch.Tensor, schedule: DiffusionSchedule, *,
              guidance_scale: Optional[float] = None, model_output_uncond: Optional[torch.Tensor] = None,
              cfg_order: str = "uncond_first", guidance_rescale: float = 0.0, prediction_type: str = "epsilon",
              variance_type: str = "fixed_small", clip_sample: bool = False, clip_sample_range: float = 1.0,
              thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
              noise: Optional[torch.Tensor] = None, seed: Optional[int] = None,
              generator: Optional[torch.Generator] = None, return_pred_original: bool = True):
    """One fused DDPM step (diffusers ``DDPMScheduler.step`` plus the pipeline's guidance lines).

    Args:
        model_output: [B, C, ...] model prediction, or [B, 2C, ...] with predicted variance channels
            (needed by ``variance_type`` ``learned`` / ``learned_range``); with ``guidance_scale`` and
            no ``model_output_uncond``, the doubled batch [2B, ...] (``cfg_order`` says which half is
            unconditional; diffusers puts it first, GLIDE second).
        timestep: int, 0-d tensor, or int64 tensor [B] (a timestep per sample, GLIDE-style). CUDA
            tensors are used as they are, without a host synchronisation.
        sample: [B, C, ...] current sample x_t.
        schedule: :class:`DiffusionSchedule`.
        guidance_scale: classifier-free guidance ``uncond + s * (cond - uncond)`` on the first C channels
            (the variance channels come from the conditional half, as GLIDE and DeepFloyd IF do).
        guidance_rescale: diffusers' ``rescale_noise_cfg`` factor in [0, 1].
        prediction_type: ``epsilon``, ``sample`` or ``v_prediction``.
        variance_type: ``fixed_small``, ``fixed_small_log``, ``fixed_large``, ``learned``, ``learned_range``.
        clip_sample, clip_sample_range: clamp x0 to [-range, range].
        thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen's dynamic thresholding
            (replaces clipping; takes a second pass for the per-sample quantile).
        noise: the standard-normal noise to add, shape of ``sample``; else ``generator`` draws it as
            diffusers does; else it is drawn inside the kernel from ``seed`` (reproducible, the same
            on every backend; a random seed from torch's global generator when None).
        return_pred_original: also return the predicted x0 (set False to save one write).

    Returns:
        ``(prev_sample, pred_original_sample)`` in the promoted input dtype (x0 None when not asked).
    """
    return _step(0, model_output, timestep, sample, schedule, guidance_scale=guidance_scale,
                 model_output_uncond=model_output_uncond, cfg_order=cfg_order, guidance_rescale=guidance_rescale,
                 prediction_type=prediction_type, variance_type=variance_type, clip_sample=clip_sample,
                 clip_sample_range=clip_sample_range, thresholding=thresholding,
                 dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value, eta=0.0,
                 use_clipped_model_output=False, noise=noise, seed=seed, generator=generator,
                 return_pred_original=return_pred_original)


def ddim_step(model_output: torch.Tensor, timestep, sample: torch.Tensor, schedule: DiffusionSchedule, *,
              eta: float = 0.0, use_clipped_model_output: bool = False, guidance_scale: Optional[float] = None,
              model_output_uncond: Optional[torch.Tensor] = None, cfg_order: str = "uncond_first",
              guidance_rescale: float = 0.0, prediction_type: str = "epsilon", clip_sample: bool = False,
              clip_sample_range: float = 1.0, thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
              sample_max_value: float = 1.0, noise: Optional[torch.Tensor] = None, seed: Optional[int] = None,
              generator: Optional[torch.Generator] = None, return_pred_original: bool = True):
    """One fused DDIM step (diffusers ``DDIMScheduler.step`` plus the pipeline's guidance lines).

    Arguments as :func:`ddpm_step`, plus ``eta`` (0 is deterministic DDIM, 1 is DDPM-like noise) and
    ``use_clipped_model_output`` (re-derive epsilon from the clipped x0). Predicted-variance channels
    in ``model_output`` ([B, 2C, ...]) are ignored. Noise is added only when ``eta > 0``.

    Returns:
        ``(prev_sample, pred_original_sample)``.
    """
    V.boolean(use_clipped_model_output, "use_clipped_model_output")
    return _step(1, model_output, timestep, sample, schedule, guidance_scale=guidance_scale,
                 model_output_uncond=model_output_uncond, cfg_order=cfg_order, guidance_rescale=guidance_rescale,
                 prediction_type=prediction_type, variance_type="fixed_small", clip_sample=clip_sample,
                 clip_sample_range=clip_sample_range, thresholding=thresholding,
                 dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value, eta=eta,
                 use_clipped_model_output=use_clipped_model_output, noise=noise, seed=seed, generator=generator,
                 return_pred_original=return_pred_original)
