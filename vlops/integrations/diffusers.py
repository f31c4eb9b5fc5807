"""Drop-in diffusers schedulers whose ``step`` runs the fused vlops kernel.

``FusedDDPMScheduler`` and ``FusedDDIMScheduler`` subclass diffusers' ``DDPMScheduler`` and
``DDIMScheduler``: same config, ``from_config`` / ``from_pretrained``, ``set_timesteps``,
``add_noise``; ``step`` keeps diffusers' exact signature, keyword names and return types, so a
pipeline takes one as ``pipe.scheduler``. ``guided_step`` also fuses the pipeline's
classifier-free guidance lines::

    pipe.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config)
    # or, in place: vlops.integrations.diffusers.patch_pipeline(pipe)

Importing this module imports diffusers; ``import vlops`` does not.
"""
from __future__ import annotations

from typing import Optional

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

from ..diffusion import DiffusionSchedule, ddim_step, ddpm_step

__all__ = ["FusedDDPMScheduler", "FusedDDIMScheduler", "patch_pipeline", "unpatch_pipeline"]


class _ScheduleCache:
    """Holds the DiffusionSchedule of a scheduler; rebuilt after each set_timesteps."""

    _vlops_schedule_obj: Optional[DiffusionSchedule] = None

    def set_timesteps(self, *args, **kwargs):
        self._vlops_schedule_obj = None
        return super().set_timesteps(*args, **kwargs)

    def vlops_schedule(self) -> DiffusionSchedule:
        if self._vlops_schedule_obj is None:
            self._vlops_schedule_obj = DiffusionSchedule.from_diffusers(self)
        return self._vlops_schedule_obj

    def _clip_kwargs(self):
        c = self.config
        return dict(prediction_type=c.prediction_type, clip_sample=bool(c.clip_sample),
                    clip_sample_range=float(c.clip_sample_range), thresholding=bool(c.thresholding),
                    dynamic_thresholding_ratio=float(c.dynamic_thresholding_ratio),
                    sample_max_value=float(c.sample_max_value))


class FusedDDPMScheduler(_ScheduleCache, DDPMScheduler):
    """diffusers ``DDPMScheduler`` with a fused ``step``."""

    def _fused_ok(self, model_output, sample) -> bool:
        vt = self.variance_type
        if vt not in ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"):
            return False  # fixed_large_log: diffusers' own path, kept as it is
        two_c = model_output.shape[1] == 2 * sample.shape[1]
        return two_c == (vt in ("learned", "learned_range"))

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True):
        if not self._fused_ok(model_output, sample):
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        prev, x0 = ddpm_step(model_output, timestep, sample, self.vlops_schedule(), variance_type=self.variance_type,
                             generator=generator, **self._clip_kwargs())
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)

    def guided_step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, guidance_scale: float,
                    guidance_rescale: float = 0.0, model_output_uncond: torch.Tensor | None = None,
                    generator: torch.Generator | None = None, seed: int | None = None, return_dict: bool = True):
        """``step`` with the pipeline's guidance fused in: ``model_output`` is the doubled batch
        (unconditional half first) unless ``model_output_uncond`` is given."""
        prev, x0 = ddpm_step(model_output, timestep, sample, self.vlops_schedule(), variance_type=self.variance_type,
                             guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                             model_output_uncond=model_output_uncond, generator=generator, seed=seed,
                             **self._clip_kwargs())
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)


class FusedDDIMScheduler(_ScheduleCache, DDIMScheduler):
    """diffusers ``DDIMScheduler`` with a fused ``step``."""

    def _check_ready(self):
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: torch.Generator | None = None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True):
        self._check_ready()
        use_clipped_model_output = bool(use_clipped_model_output)  # DDIMPipeline passes None, read as False
        if eta > 0 and variance_noise is not None and generator is not None:
            raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either `generator` "
                             "or `variance_noise` stays `None`.")
        noise_kw = dict(noise=variance_noise, generator=None if variance_noise is not None else generator) \
            if eta > 0 else {}
        prev, x0 = ddim_step(model_output, timestep, sample, self.vlops_schedule(), eta=eta,
                             use_clipped_model_output=use_clipped_model_output, **noise_kw, **self._clip_kwargs())
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)

    def guided_step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, guidance_scale: float,
                    eta: float = 0.0, guidance_rescale: float = 0.0, model_output_uncond: torch.Tensor | None = None,
                    use_clipped_model_output: bool = False, generator: torch.Generator | None = None,
                    seed: int | None = None, return_dict: bool = True):
        """``step`` with the pipeline's guidance fused in (see FusedDDPMScheduler.guided_step)."""
        self._check_ready()
        use_clipped_model_output = bool(use_clipped_model_output)
        prev, x0 = ddim_step(model_output, timestep, sample, self.vlops_schedule(), eta=eta,
                             use_clipped_model_output=use_clipped_model_output, guidance_scale=guidance_scale,
                             guidance_rescale=guidance_rescale, model_output_uncond=model_output_uncond,
                             generator=generator if eta > 0 else None, seed=seed if eta > 0 else None,
                             **self._clip_kwargs())
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)


_FUSED = {DDPMScheduler: FusedDDPMScheduler, DDIMScheduler: FusedDDIMScheduler}


def fused_scheduler(scheduler):
    """A fused copy of a diffusers DDPMScheduler / DDIMScheduler (same config, same timesteps)."""
    cls = _FUSED.get(type(scheduler))
    if cls is None:
        if isinstance(scheduler, tuple(_FUSED.values())):
            return scheduler
        raise TypeError(f"vlops has fused versions of {', '.join(c.__name__ for c in _FUSED)}; "
                        f"got {type(scheduler).__name__}")
    new = cls.from_config(scheduler.config)
    if scheduler.num_inference_steps is not None:
        new.__dict__.update({k: v for k, v in scheduler.__dict__.items() if k in (
            "timesteps", "num_inference_steps", "custom_timesteps")})
    return new


def patch_pipeline(pipe):
    """Swap ``pipe.scheduler`` for its fused version in place; returns the replaced scheduler."""
    old = pipe.scheduler
    pipe.scheduler = fused_scheduler(old)
    pipe._vlops_original_scheduler = old
    return old


def unpatch_pipeline(pipe):
    """Undo :func:`patch_pipeline`."""
    old = getattr(pipe, "_vlops_original_scheduler", None)
    if old is None:
        raise ValueError("this pipeline was not patched by vlops")
    pipe.scheduler = old
    del pipe._vlops_original_scheduler
    return pipe
