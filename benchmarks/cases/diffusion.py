"""Benchmark cases of the fused diffusion step (forward only).

Eager baseline: diffusers' ``DDPMScheduler.step`` / ``DDIMScheduler.step`` configured with the same
options, preceded by the pipelines' classifier-free guidance lines::

    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)

with the noise drawn by diffusers itself (``generator=None``) and the timestep passed as the
pipelines pass it (an element of ``scheduler.timesteps``, a 0-d tensor on the device). Without
diffusers (or with ``VLOPS_BENCH_BASELINE=reference``) the baseline is a faithful eager
re-implementation, :func:`vlops.reference.diffusion.diffusion_step` on the same inputs plus
``torch.randn`` noise, labelled ``reference-eager``.

Fused: ``vlops.ddpm_step`` / ``vlops.ddim_step`` on the doubled batch with ``guidance_scale``, the
noise drawn in-kernel (``seed=None``: a seed drawn from torch's global RNG, as a pipeline would call
it; the CUDA-graph rows pass a fixed seed).

Floor bytes of one step: uncond + cond + sample read, prev + x0 written (5 tensors of the latent
size, at the element size of the dtype); no noise is read (drawn in-kernel).

Cases (``size`` labels for ``--sizes``; a literal ``BxCxHxW`` also works and runs both schedulers):

=================  ===============  =======================================================
name               size label       what
=================  ===============  =======================================================
ddpm_cfg_clip      headline         (a) DDPM, guidance 7.5, fixed_small, clip_sample, 16x4x128x128
ddim_cfg           headline         (b) DDIM eta=0, guidance 7.5, 16x4x128x128
ddim_cfg           sd               (c) Stable-Diffusion latents 2x4x64x64 (+ CUDA-graph rows)
ddpm_cfg_clip      sd               (c) same size, DDPM
ddpm_cfg_clip      large            (d) CUDA only: 16x4x1024x1024 (64M elements), fp32 and bf16
=================  ===============  =======================================================
"""
from __future__ import annotations

import functools
import os
import re

import torch

from . import Case, dtype_bytes

OP = "diffusion"
GUIDANCE = 7.5
T_TRAIN = 1000
BETA_START, BETA_END = 1e-4, 0.02
DDIM_STEPS = 50

SIZES = {
    "headline": (16, 4, 128, 128),
    "sd": (2, 4, 64, 64),
    "large": (16, 4, 1024, 1024),
}

# case name -> scheduler and options
_KINDS = {
    "ddpm_cfg_clip": dict(mode="ddpm", clip_sample=True),
    "ddim_cfg": dict(mode="ddim", clip_sample=False),
}


@functools.lru_cache(maxsize=None)
def _diffusers():
    if os.environ.get("VLOPS_BENCH_BASELINE", "").strip().lower() == "reference":
        return None
    try:
        import diffusers  # noqa: F401
        from diffusers import DDIMScheduler, DDPMScheduler
    except Exception:  # not installed (e.g. the GPU machine), or broken
        return None
    return DDPMScheduler, DDIMScheduler


def baseline_label() -> str:
    return "diffusers" if _diffusers() is not None else "reference-eager"


def _shape_str(shape) -> str:
    return "x".join(str(s) for s in shape)


def _parse_shape(s: str):
    if re.fullmatch(r"\d+x\d+x\d+x\d+", s):
        return tuple(int(v) for v in s.split("x"))
    return None


def _plan(device: torch.device, quick: bool, sizes, dtypes):
    """[(case name, shape, dtype)] to run."""
    cuda = device.type == "cuda"
    plan = []

    def add(name, shape, dts):
        for dt in (dtypes or dts):
            plan.append((name, shape, dt))

    if sizes:
        for s in sorted(sizes):
            shape = SIZES.get(s) or _parse_shape(s)
            if shape is None:
                continue  # a size label of another op
            if s == "large" and not cuda:
                continue
            add("ddpm_cfg_clip", shape, [torch.float32, torch.bfloat16] if s == "large" else [torch.float32])
            add("ddim_cfg", shape, [torch.float32])
        return plan
    f32 = [torch.float32]
    add("ddim_cfg", SIZES["sd"], f32)
    add("ddpm_cfg_clip", SIZES["sd"], f32)
    add("ddpm_cfg_clip", SIZES["headline"], f32)
    add("ddim_cfg", SIZES["headline"], f32)
    if cuda and not quick:
        add("ddpm_cfg_clip", SIZES["large"], [torch.float32, torch.bfloat16])
    return plan


def _schedulers(mode: str, clip_sample: bool, device):
    """(diffusers scheduler or None, vlops schedule, timestep tensor, alphas_cumprod, prev_table)."""
    import vlops

    if mode == "ddpm":
        n_steps, k = T_TRAIN, T_TRAIN // 2  # DDPM pipeline: 1000 steps; a middle step (t = 499 > 0)
    else:
        n_steps, k = DDIM_STEPS, DDIM_STEPS // 2
    step_ratio = T_TRAIN // n_steps
    # the same table diffusers builds ("linear" betas in fp32, leading spacing, set_alpha_to_one)
    betas = torch.linspace(BETA_START, BETA_END, T_TRAIN, dtype=torch.float32)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    prev_table = torch.arange(T_TRAIN, dtype=torch.int64) - step_ratio
    timesteps = torch.arange(0, n_steps, dtype=torch.int64).flip(0) * step_ratio
    t = timesteps[k].to(device)

    classes = _diffusers()
    sched = None
    if classes is not None:
        DDPMScheduler, DDIMScheduler = classes
        common = dict(num_train_timesteps=T_TRAIN, beta_start=BETA_START, beta_end=BETA_END,
                      beta_schedule="linear", prediction_type="epsilon", clip_sample=clip_sample)
        if mode == "ddpm":
            sched = DDPMScheduler(variance_type="fixed_small", **common)
        else:
            sched = DDIMScheduler(set_alpha_to_one=True, **common)
        sched.set_timesteps(n_steps, device=device)
        t = sched.timesteps[k]
        schedule = vlops.DiffusionSchedule.from_diffusers(sched)
    elif mode == "ddpm":
        schedule = vlops.DiffusionSchedule.ddpm(num_train_timesteps=T_TRAIN, beta_start=BETA_START,
                                                beta_end=BETA_END, beta_schedule="linear")
    else:
        schedule = vlops.DiffusionSchedule.ddim(num_train_timesteps=T_TRAIN, beta_start=BETA_START,
                                                beta_end=BETA_END, beta_schedule="linear",
                                                num_inference_steps=n_steps, set_alpha_to_one=True)
    return sched, schedule, t, alphas_cumprod.to(device), prev_table.to(device)


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _case(name: str, shape, dtype: torch.dtype, device: torch.device) -> Case:
    import vlops
    from vlops.reference import diffusion as ref

    kind = _KINDS[name]
    mode, clip = kind["mode"], kind["clip_sample"]
    sched, schedule, t, alphas_cumprod, prev_table = _schedulers(mode, clip, device)
    B, C, H, W = shape
    label = baseline_label()

    def make():
        g = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31, ()).item()))
        mo = torch.randn((2 * B, C, H, W), generator=g, device=device, dtype=torch.float32).to(dtype)
        x = torch.randn((B, C, H, W), generator=g, device=device, dtype=torch.float32).to(dtype)
        return {"model_output": mo, "sample": x}

    if sched is not None:
        def eager(inp):
            noise_pred_uncond, noise_pred_text = inp["model_output"].chunk(2)
            noise_pred = noise_pred_uncond + GUIDANCE * (noise_pred_text - noise_pred_uncond)
            if mode == "ddpm":
                return sched.step(noise_pred, t, inp["sample"], generator=None, return_dict=False)
            return sched.step(noise_pred, t, inp["sample"], eta=0.0, generator=None, return_dict=False)
    else:
        t_ref = t.reshape(1)

        def eager(inp):
            noise_pred_uncond, noise_pred_text = inp["model_output"].chunk(2)
            x = inp["sample"]
            noise = torch.randn_like(x) if mode == "ddpm" else None
            return ref.diffusion_step(noise_pred_text, t_ref, x, alphas_cumprod, prev_table, mode=mode,
                                      model_output_uncond=noise_pred_uncond, guidance_scale=GUIDANCE,
                                      prediction_type="epsilon", variance_type="fixed_small",
                                      clip_sample=clip, eta=0.0, final_alpha_cumprod=1.0, noise=noise)

    opts = dict(guidance_scale=GUIDANCE, prediction_type="epsilon", clip_sample=clip)
    if mode == "ddpm":
        opts["variance_type"] = "fixed_small"
        step = vlops.ddpm_step
    else:
        opts["eta"] = 0.0
        step = vlops.ddim_step

    def fused(inp):
        return step(inp["model_output"], t, inp["sample"], schedule, seed=None, **opts)

    def graph_fused(inp):
        return step(inp["model_output"], t, inp["sample"], schedule, seed=1234, **opts)

    def check(eager_out, fused_out) -> float:
        """Relative error of the deterministic outputs: x0 (and prev for DDIM eta=0)."""
        err = _relerr(fused_out[1], eager_out[1])
        if mode == "ddim":
            err = max(err, _relerr(fused_out[0], eager_out[0]))
        return err

    n = B * C * H * W
    note = (f"{mode} guidance={GUIDANCE} eps " + ("fixed_small clip_sample " if mode == "ddpm" else "eta=0 ")
            + f"t={int(t)} noise=in-kernel")
    c = Case(name=name, op=OP, dtype=dtype, size=_shape_str(shape), pass_="forward", make=make,
             eager=eager, fused=fused, floor_bytes=5.0 * n * dtype_bytes(dtype), floor_flops=0.0,
             eager_label=label, graph_fused=graph_fused if shape == SIZES["sd"] else None, check=check,
             note=note)
    return c


def cases(device, quick: bool, sizes=None, dtypes=None):
    device = torch.device(device)
    for name, shape, dt in _plan(device, quick, sizes, dtypes):
        yield _case(name, shape, dt, device)
