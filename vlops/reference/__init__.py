"""Eager PyTorch specifications of every vlops op (the ground truth the fused kernels must equal)."""
from . import coattention, contrastive, diffusion, patch_embed

__all__ = ["coattention", "contrastive", "diffusion", "patch_embed"]
