"""Dry launches: every ``@triton.jit`` launch compiles for Hopper (sm_90a) through Triton's own JIT path and does
not run, on a machine with no GPU.

A launch ``kernel[grid](*args)`` specialises on the actual arguments (pointer and integer divisibility by 16,
integers equal to 1, integer widths, constexprs) before it compiles. :mod:`tests.aot` compiles hand-written
specialisations; a dry launch compiles exactly the one a GPU run of the same call would, so a launcher called
with CPU tensors under :func:`dry_sm90` shows every compile failure, and every shared-memory request over the
Hopper limit (a launch failure on the GPU), that the same call would meet there. Outputs are not written.

How: Triton's active driver is replaced by one that reports an sm_90a target (device 0, stream 0), and
``JITFunction.run`` is called with ``warmup=True`` (compile, do not launch). The launchers' CUDA-only choices
are made as on a GPU: their "CUDA tensor" check accepts the CPU tensors, and the contrastive launchers pick
their CUDA method for 16-bit inputs (the chunked one). Works with triton 3.6 - 3.8.
"""
from __future__ import annotations

import contextlib
import importlib

from aot import HOPPER_SMEM_LIMIT  # noqa: F401 - bytes of shared memory one block can use on sm_90


class _Hopper:
    """The parts of a Triton driver that the JIT's compile path asks for."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


@contextlib.contextmanager
def dry_sm90():
    """Yields a list that receives one dict per launch: ``{"kernel", "shared", "num_warps", "num_stages"}``
    (``shared``: bytes of shared memory the compiled kernel asks for)."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    modules = [importlib.import_module(f"vlops.kernels.{name}")
               for name in ("coattention", "contrastive", "patch_embed", "diffusion_step")]
    launches = []
    orig_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = orig_run(self, *args, grid=grid, warmup=True, **kwargs)
        md = kernel.metadata
        launches.append({"kernel": self.fn.__name__, "shared": int(getattr(md, "shared", 0)),
                         "num_warps": int(md.num_warps), "num_stages": int(md.num_stages)})
        return kernel

    patched = []
    for mod in modules:
        check = getattr(mod, "_check_float_input", None)
        if check is not None:
            patched.append((mod, "_check_float_input", check))
            mod._check_float_input = lambda name, t, dims, interpreted, _c=check: _c(name, t, dims, True)
        method = getattr(mod, "default_method", None)
        if method is not None:  # the contrastive launchers' choice for CUDA inputs
            patched.append((mod, "default_method", method))
            mod.default_method = lambda a: "chunked" if a.element_size() == 2 else "fused"
    prev = driver._active
    driver.set_active(_Hopper())
    JITFunction.run = run
    try:
        yield launches
    finally:
        JITFunction.run = orig_run
        driver._active = prev
        for mod, attr, value in patched:
            setattr(mod, attr, value)
