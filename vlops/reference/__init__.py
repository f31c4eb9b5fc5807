"""Eager PyTorch specifications of every vlops op (the ground truth the fused kernels must equal)."""
from . import contrastive, diffusion, patch_embed

__all__ = ["contrastive", "diffusion", "patch_embed"]
