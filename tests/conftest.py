"""Test machinery every op reuses: tolerances by dtype, relative error, poison, backends per device."""
from __future__ import annotations

import contextlib

import pytest
import torch

import vlops

# DESIGN.md "Numbers": relative error against a float64 reference.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
LOW_PRECISION = (torch.float16, torch.bfloat16)

HAS_CUDA = torch.cuda.is_available()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf (NaN never passes)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


def assert_close_to_ref(out, ref64, dtype, *, eager=None, what="output"):
    """The bound of DESIGN.md: rel error <= TOL[dtype]; for fp16/bf16 also <= 2x the eager error
    (``eager``: the same quantity computed by plain PyTorch at that dtype)."""
    err = rel_err(out, ref64)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3e} > {TOL[dtype]:.0e} ({dtype})"
    if eager is not None and dtype in LOW_PRECISION:
        e_err = rel_err(eager, ref64)
        assert err <= max(2 * e_err, 1e-6), f"{what}: error {err:.3e} > 2x eager error {e_err:.3e} ({dtype})"
    return err


def backend_params(include_reference: bool = True):
    """(backend, device) pairs to test: the CPU ones always (the cpu backend must be built), the GPU
    ones marked ``gpu`` and skipped without a CUDA device."""
    out = []
    if include_reference:
        out.append(pytest.param("reference", "cpu", id="reference-cpu"))
    out.append(pytest.param("cpu", "cpu", id="cpu"))
    gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
    out += [pytest.param(b, "cuda", id=f"{b}-cuda", marks=gpu) for b in ("triton", "cuda")]
    return out


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects: the worker GPU tests must count as ``gpu``
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu_results" in getattr(item, "fixturenames", ()) and "gpu" not in item.keywords:
            item.add_marker(pytest.mark.gpu)  # tests of the compiled Triton worker (tests/triton_worker.py)
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def require_backend(name: str, device: str):
    why = vlops.unavailable_reason(name, device)
    if why and device == "cuda":
        pytest.skip(why)
    assert not why, f"backend {name} must be available on {device}: {why}"


@contextlib.contextmanager
def cpu_isa(name: str):
    """Run the CPU kernels with instruction set ``name`` (generic, avx2, avx512) inside the block."""
    from vlops import _C

    old = _C.cpu_isa()
    _C.set_cpu_isa(name)
    try:
        yield
    finally:
        _C.set_cpu_isa(old)
