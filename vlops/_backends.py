"""Which implementations exist on this machine, and which one an op uses.

Backends: ``reference`` (eager PyTorch, any device), ``cpu`` (C++ in vlops._C, CPU tensors),
``triton`` (kernels/, CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``), ``cuda``
(CUDA C++ in vlops._C, CUDA tensors). ``auto`` picks per call from the tensors' device.

Selection, strongest first: ``with vlops.use_backend(name):``, then ``VLOPS_BACKEND=name``, then
``auto``. Asking for a backend that cannot run the call raises :class:`BackendUnavailableError`
with the reason.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("vlops_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call; the message says why."""


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block with backend ``name`` (one of :data:`BACKENDS`)."""
    token = _override.set(_check_name(name, "backend"))
    try:
        yield
    finally:
        _override.reset(token)


def requested_backend() -> str:
    """The backend asked for now: context manager, else ``VLOPS_BACKEND``, else ``auto``."""
    name = _override.get()
    if name is not None:
        return name
    env = os.environ.get("VLOPS_BACKEND", "").strip()
    if env:
        return _check_name(env, "VLOPS_BACKEND")
    return "auto"


@functools.lru_cache(maxsize=None)
def _extension():
    """(module or None, reason)."""
    try:
        from vlops import _C  # noqa: F401
    except ImportError as e:  # not built
        return None, f"the compiled extension vlops._C is not built ({e}); run `pip install -e .` with a compiler"
    return _C, ""


def extension():
    """The compiled extension module, or None."""
    return _extension()[0]


@functools.lru_cache(maxsize=None)
def _triton_reason() -> str:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    return ""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(name: str, device: torch.device | None = None) -> str:
    """Empty string if backend ``name`` can run on ``device`` (or on some device if None), else why not."""
    dev = None if device is None else torch.device(device).type
    if name == "reference":
        return ""
    if name == "cpu":
        mod, why = _extension()
        if mod is None:
            return why
        if dev not in (None, "cpu"):
            return f"the cpu backend runs on CPU tensors, got {dev} tensors"
        return ""
    if name == "triton":
        why = _triton_reason()
        if why:
            return why
        if dev == "cpu" or (dev is None and not torch.cuda.is_available()):
            if triton_interpret():
                return ""
            return "triton runs on CUDA tensors (CPU tensors only with TRITON_INTERPRET=1)"
        if dev is None or dev == "cuda":
            return "" if torch.cuda.is_available() else "no CUDA device is available"
        return f"triton does not run on {dev} tensors"
    if name == "cuda":
        mod, why = _extension()
        if mod is None:
            return why
        if not mod.has_cuda():
            return "vlops._C was built without its CUDA part (" + mod.cuda_build_note() + ")"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        if dev not in (None, "cuda"):
            return f"the cuda backend runs on CUDA tensors, got {dev} tensors"
        return ""
    if name == "auto":
        return ""
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def available(name: str, device: torch.device | None = None) -> bool:
    return unavailable_reason(name, device) == ""


# Preference of ``auto`` on CUDA tensors, per op: fastest measured first (benchmarks/results).
AUTO_CUDA_ORDER: dict[str, tuple[str, ...]] = {
    "diffusion_step": ("cuda", "triton"),
    "contrastive": ("triton",),
    "patch_embed": ("triton",),
    "co_attention": ("triton",),
}

# Per op: the symbol that proves the compiled kernels exist (``<symbol>_cpu`` / ``<symbol>_cuda`` in
# vlops._C) and the Triton module in vlops.kernels; None where a backend has no kernel for the op.
OP_KERNELS: dict[str, dict[str, str | None]] = {
    "diffusion_step": {"cpu": "diffusion_step", "cuda": "diffusion_step", "triton": "diffusion_step"},
    "contrastive": {"cpu": "contrastive_lse", "cuda": None, "triton": "contrastive"},
    "patch_embed": {"cpu": "patch_embed_fwd", "cuda": None, "triton": "patch_embed"},
    "co_attention": {"cpu": "co_attention_fwd", "cuda": None, "triton": "coattention"},
}


@functools.lru_cache(maxsize=None)
def _triton_module_reason(module: str) -> str:
    import importlib

    try:
        importlib.import_module(f"vlops.kernels.{module}")
    except ImportError as e:
        return f"vlops.kernels.{module} cannot be imported ({e})"
    return ""


def has_kernel(op: str, name: str) -> bool:
    """Whether vlops has a backend ``name`` kernel for ``op`` at all, built or not (the reference always)."""
    return name == "reference" or OP_KERNELS.get(op, {}).get(name) is not None


def op_unavailable_reason(op: str, name: str, device) -> str:
    """Why backend ``name`` cannot run ``op`` on ``device`` ('' if it can)."""
    why = unavailable_reason(name, device)
    if why or name == "reference":
        return why
    kernels = OP_KERNELS.get(op, {})
    sym = kernels.get(name)
    if not has_kernel(op, name):
        return f"vlops has no {name} kernel for {op} (backends with one: reference, " + ", ".join(
            b for b, v in kernels.items() if v) + ")"
    if name in ("cpu", "cuda") and not hasattr(extension(), f"{sym}_{name}"):
        return f"vlops._C was built without {sym}_{name}; rebuild with `pip install --no-build-isolation -e .`"
    if name == "triton":
        return _triton_module_reason(sym)
    return ""


@functools.lru_cache(maxsize=None)
def _reason_cached(op: str, name: str, dev_type: str, interpret: bool) -> str:
    """op_unavailable_reason for a device type: what it checks (the extension, triton, CUDA) does not change
    while the process runs, except TRITON_INTERPRET, which is part of the key."""
    return op_unavailable_reason(op, name, torch.device(dev_type))


def resolve(op: str, device: torch.device) -> str:
    """The backend that runs ``op`` on tensors of ``device`` now (availability is looked up once per op,
    backend and device type: this runs on every call)."""
    name = requested_backend()
    dev = device if isinstance(device, torch.device) else torch.device(device)
    interpret = triton_interpret()
    if name != "auto":
        why = _reason_cached(op, name, dev.type, interpret)
        if why:
            raise BackendUnavailableError(f"vlops backend {name!r} cannot run {op} on {dev.type}: {why}")
        return name
    if dev.type == "cpu":
        return "cpu" if not _reason_cached(op, "cpu", "cpu", interpret) else "reference"
    if dev.type == "cuda":
        for cand in AUTO_CUDA_ORDER.get(op, ("triton", "cuda")):
            if not _reason_cached(op, cand, "cuda", interpret):
                return cand
    return "reference"
