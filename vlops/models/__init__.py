"""Thin reference vision-language models built from vlops.nn, and the synthetic data they train on.

- :mod:`vlops.models.clip`: a CLIP (ViT image tower on the fused patch stem, causal text transformer) trained with
  the fused CLIP, SigLIP or UniCL loss; zero-shot classification with the fused softmax.
- :mod:`vlops.models.vilbert`: a two-stream ViLBERT with a VQA head (fused patch stem for the image regions, fused
  co-attention blocks).
- :mod:`vlops.models.glide`: a GLIDE-style text-conditioned diffusion model (caption transformer, UNet with text
  keys and values in its attention), sampled with classifier-free guidance through the fused DDPM / DDIM step.
- :mod:`vlops.models.synthetic`: images of coloured shapes with captions, questions and answers, made in-process.

Each model takes ``fused=True/False``: the fused ops, or eager PyTorch with the same parameters and results.
"""
from . import clip, glide, synthetic, vilbert

__all__ = ["clip", "glide", "synthetic", "vilbert"]
