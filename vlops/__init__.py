"""vlops: fused kernels for the hot paths of vision-language models.

Public API (each op: a float64-checked reference, a C++ CPU kernel, a Triton kernel and a CUDA kernel,
chosen per call by :func:`use_backend` / ``VLOPS_BACKEND`` / ``auto``):

- :func:`ddpm_step`, :func:`ddim_step`, :class:`DiffusionSchedule`: the fused diffusion denoising step.
- :func:`clip_loss` (CLIP / ALIGN / UniCL), :func:`siglip_loss`, :func:`zero_shot_classify`: tiled
  contrastive losses that never store the N x N logits.
- :mod:`vlops.distributed`: the CLIP and SigLIP losses across the ranks of a torch.distributed process group
  (open_clip's distributed options), each rank on the fused kernels.
- :func:`co_attention`: ViLBERT's co-attention (text queries over image keys and image queries over text
  keys, each with the other stream's key padding) in one launch, forward and backward.
- :func:`patch` / :func:`unpatch`: swap the fused ops into timm, open_clip, Hugging Face, diffusers and ViLBERT
  models in place, and back.
- :mod:`vlops.models`: reference vision-language models built on the fused ops, and synthetic data.
- :func:`use_backend`, :func:`available_backends`, :func:`show_config`.
"""
from __future__ import annotations

__version__ = "0.1.0"

import torch as _torch

from ._backends import BACKENDS, BackendUnavailableError, requested_backend, unavailable_reason, use_backend
from .contrastive import clip_loss, siglip_loss, zero_shot_classify
from .diffusion import DiffusionSchedule, ddim_step, ddpm_step
from .stem import patch_embed
from . import distributed  # noqa: E402  (the losses across ranks: vlops.distributed.clip_loss / siglip_loss)
from . import nn  # noqa: E402  (drop-in modules; imports nothing beyond torch)

__all__ = [
    "__version__", "BACKENDS", "BackendUnavailableError", "use_backend", "requested_backend",
    "available_backends", "show_config", "DiffusionSchedule", "ddpm_step", "ddim_step", "clip_loss",
    "siglip_loss", "zero_shot_classify", "patch_embed", "co_attention", "patch", "unpatch",
]


def patch(obj):
    """Swap every part of ``obj`` that vlops has a fused version of into it, in place, weights kept; returns a
    report of what was replaced. ``obj``: a timm / open_clip / Hugging Face model, an open_clip loss, ViLBERT
    code, a diffusers pipeline or scheduler, or any nn.Module holding such parts (the list and the details:
    :mod:`vlops.integrations.patch`). Imports none of those libraries itself."""
    from .integrations.patch import patch as patch_call

    return patch_call(obj)


def unpatch(obj):
    """Undo :func:`patch` on ``obj``, in place; returns a report of what was restored."""
    from .integrations.patch import unpatch as unpatch_call

    return unpatch_call(obj)


def co_attention(text_q, text_k, text_v, image_q, image_k, image_v, *, text_lengths=None, image_lengths=None,
                 text_mask=None, image_mask=None, scale=None, dropout_p: float = 0.0, seed=None,
                 mask_mode: str = "zero"):
    """ViLBERT co-attention, both directions in one fused op: ``(text_context, image_context)``.

    ``text_context = softmax(scale * text_q image_k^T) image_v`` over the valid image keys and
    ``image_context = softmax(scale * image_q text_k^T) text_v`` over the valid text keys, per batch and
    head (the definition, dropout mask and mask modes: :mod:`vlops.reference.coattention`; the kernel
    contract: :mod:`vlops.ops.coattention`). Only keys are masked: padded query rows are computed too.

    Args:
        text_q, text_k, text_v: [B, Nt, H, d]; image_q, image_k, image_v: [B, Nv, H, d]. One dtype
            (float32, float16, bfloat16; float64 on the cpu / reference backends), one device. Any strides
            with ``stride(-1) == 1`` are read in place (e.g. ``qkv.view(B, N, 3, H, d)[:, :, 0]``, the
            un-permuted output of a projection); a tensor whose last dim is strided is copied first. Not
            modified. Every one of them gets a gradient when it requires one.
        text_lengths, image_lengths: integer [B] tensors in [0, N]: right padding (key ``j`` is valid iff
            ``j < lengths[b]``), the fast path. On the inputs' device or on the CPU (for GPU inputs the
            cheaper form: see below). text_mask, image_mask: bool [B, N] (True = keep; integer
            0 / 1 tensors are read as ``!= 0``), any padding pattern. At most one of the two per stream;
            none: every key is valid.
        scale: the softmax scale, default ``1 / sqrt(d)``.
        dropout_p: attention-probability dropout in [0, 1) (applied as given: pass 0 in eval mode).
        seed: the dropout seed in [0, 2**63) (a counter-based mask: the same seed gives the same mask on
            every backend); None draws one from torch's default generator (so ``torch.manual_seed`` makes
            runs reproducible). Ignored when ``dropout_p == 0``.
        mask_mode: "zero" (default): masked keys get weight exactly 0 and a query whose keys are all
            masked returns zeros (and zero gradients). "vilbert": ViLBERT's extended additive mask
            (-10000 on masked scores, softmax over all keys): the same result where a row has a valid
            key; where it has none, every score is shifted by the same -10000, so the row attends to
            every key as if none were masked (ViLBERT's behaviour).

    Returns:
        ``(text_context [B, Nt, H, d], image_context [B, Nv, H, d])``, contiguous, in the input dtype
        (fp32 accumulation; float64 for float64).

    Lengths are range-checked before any kernel runs: lengths on the CPU on the host, with no device
    synchronisation (they are then copied to the device through pinned memory, queued on the stream);
    lengths on a GPU with one synchronisation per call, which stops the host from queueing work ahead of
    the GPU.
    Under ``torch.compile`` a seed drawn for ``seed=None`` comes from the compiled program's random stream:
    a fresh one per call and reproducible with ``torch.manual_seed``, but not the value eager mode draws.
    """
    from .ops.coattention import co_attention as co_attention_call
    from .reference.coattention import check_args

    ts = (text_q, text_k, text_v, image_q, image_k, image_v)
    a = check_args(ts, text_lengths=text_lengths, image_lengths=image_lengths, text_mask=text_mask,
                   image_mask=image_mask, scale=scale, dropout_p=dropout_p, seed=seed, mask_mode=mask_mode)
    ts = tuple(t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous() for t in ts)
    seed = a.seed
    if a.dropout_p == 0.0:
        seed = 0
    elif seed is None:
        seed = int(_torch.randint(0, 2**63 - 1, (1,), dtype=_torch.int64).item())
    t_out, i_out, _, _ = co_attention_call(*ts, a.t_len, a.i_len, a.t_mask, a.i_mask, a.scale, a.mode, a.dropout_p,
                                           seed)
    return t_out, i_out


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
