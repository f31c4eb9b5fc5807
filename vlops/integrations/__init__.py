"""One-call swaps of the fused ops into timm, open_clip, transformers and diffusers (imported lazily)."""
