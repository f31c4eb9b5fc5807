"""Eager PyTorch specifications of every vlops op (the ground truth the fused kernels must equal)."""
from . import diffusion

__all__ = ["diffusion"]
