"""Hugging Face swap: the ``return_loss=True`` path of ``CLIPModel`` / ``SiglipModel`` computes the
fused contrastive loss from the model's (normalised) embeddings.

    vlops.integrations.transformers.patch_contrastive_loss(model)   # in place; unpatch_... undoes it

The model's own forward still builds its logits (they are part of its output); the loss and its
backward run through vlops' tiled kernels.
"""
from __future__ import annotations

import functools

from ..contrastive import clip_loss, siglip_loss

__all__ = ["patch_contrastive_loss", "unpatch_contrastive_loss"]


def _kind(model) -> str:
    names = {c.__name__ for c in type(model).__mro__}
    if "SiglipModel" in names or "Siglip2Model" in names:
        return "siglip"
    if "CLIPModel" in names:
        return "clip"
    raise TypeError(f"patch_contrastive_loss supports transformers CLIPModel and SiglipModel (and their "
                    f"subclasses), got {type(model).__name__}")


def patch_contrastive_loss(model):
    """Make ``model(..., return_loss=True)`` compute its loss with vlops; returns the model."""
    kind = _kind(model)
    if getattr(model, "_vlops_original_forward", None) is not None:
        return model
    original = model.forward

    @functools.wraps(original)
    def forward(*args, return_loss=None, **kwargs):
        out = original(*args, return_loss=False, **kwargs)
        if return_loss:
            scale = model.logit_scale.exp()
            if kind == "siglip":
                loss = siglip_loss(out.image_embeds, out.text_embeds, scale, model.logit_bias)
            else:
                loss = clip_loss(out.image_embeds, out.text_embeds, scale)
            out["loss"] = loss
        return out

    model._vlops_original_forward = original
    model.forward = forward
    return model


def unpatch_contrastive_loss(model):
    """Undo :func:`patch_contrastive_loss`."""
    original = getattr(model, "_vlops_original_forward", None)
    if original is None:
        raise ValueError("this model was not patched by vlops")
    model.forward = original
    del model._vlops_original_forward
    return model
