"""Triton kernels of vlops, one module per op (installed as ``vlops.kernels``).

Each module holds ``@triton.jit`` kernels and a launcher taking the op's kernel contract (see the
op module in ``vlops/ops``), and exports ``AOT_SPECS``: the specialisations that
``tests/test_aot_sm90.py`` compiles for sm_90 without a GPU. A kernel module knows nothing of
autograd or dispatch.

Importing this package imports nothing (no triton import): ``import vlops`` never needs triton.
"""

__all__ = ["diffusion_step", "contrastive", "patch_embed"]
