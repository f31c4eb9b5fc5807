"""vlops: fused kernels for the hot paths of vision-language models.

Public API (each op: a float64-checked reference, a C++ CPU kernel, a Triton kernel and a CUDA kernel,
chosen per call by :func:`use_backend` / ``VLOPS_BACKEND`` / ``auto``):

- :func:`ddpm_step`, :func:`ddim_step`, :class:`DiffusionSchedule`: the fused diffusion denoising step.
- :func:`clip_loss` (CLIP / ALIGN / UniCL), :func:`siglip_loss`, :func:`zero_shot_classify`: tiled
  contrastive losses that never store the N x N logits.
- :func:`use_backend`, :func:`available_backends`, :func:`show_config`.
"""
from __future__ import annotations

__version__ = "0.1.0"

import torch as _torch

from ._backends import BACKENDS, BackendUnavailableError, requested_backend, unavailable_reason, use_backend
from .contrastive import clip_loss, siglip_loss, zero_shot_classify
from .diffusion import DiffusionSchedule, ddim_step, ddpm_step
from .stem import patch_embed
from . import nn  # noqa: E402  (drop-in modules; imports nothing beyond torch)

__all__ = [
    "__version__", "BACKENDS", "BackendUnavailableError", "use_backend", "requested_backend",
    "available_backends", "show_config", "DiffusionSchedule", "ddpm_step", "ddim_step", "clip_loss",
    "siglip_loss", "zero_shot_classify", "patch_embed",
]


def available_backends(device=None) -> dict:
    """``{backend: reason}`` for every backend; an empty reason means available (on ``device`` if given)."""
    return {name: unavailable_reason(name, device) for name in BACKENDS if name != "auto"}


def show_config() -> str:
    """Versions, device and each backend's availability (what ``python -m vlops`` prints)."""
    import platform

    lines = [f"vlops {__version__}", f"python {platform.python_version()}", f"torch {_torch.__version__}"
             f" (CUDA {_torch.version.cuda})"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton not installed")
    if _torch.cuda.is_available():
        lines.append(f"device: {_torch.cuda.get_device_name(0)} (cuda)")
    else:
        lines.append(f"device: cpu ({_torch.get_num_threads()} threads); no CUDA device")
    from ._backends import extension

    ext = extension()
    if ext is not None:
        lines.append(f"vlops._C: cuda part {'built' if ext.has_cuda() else 'not built'} ({ext.cuda_build_note()})")
    lines.append(f"requested backend: {requested_backend()}")
    lines.append("backends:")
    for dev in (["cpu", "cuda"] if _torch.cuda.is_available() else ["cpu"]):
        for name, why in available_backends(dev).items():
            lines.append(f"  {name:<10} on {dev:<4}: {'available' if not why else 'unavailable: ' + why}")
    return "\n".join(lines)
