"""Hugging Face swap: the ``return_loss=True`` path of ``CLIPModel`` / ``SiglipModel`` computes the
fused contrastive loss from the model's (normalised) embeddings.

    vlops.integrations.transformers.patch_contrastive_loss(model)   # in place; unpatch_... undoes it

The model's own forward still builds its logits (they are part of its output); the loss and its
backward run through vlops' tiled kernels.
"""
from __future__ import annotations

from ..contrastive import clip_loss, siglip_loss
from .patch import bind, is_patched, restore, shadow

__all__ = ["patch_contrastive_loss", "unpatch_contrastive_loss", "patch_loss_part"]

_WHAT = "_vlops_patched"


def _kind(model) -> str:
    names = {c.__name__ for c in type(model).__mro__}
    if "SiglipModel" in names or "Siglip2Model" in names:
        return "siglip"
    if "CLIPModel" in names:
        return "clip"
    raise TypeError(f"patch_contrastive_loss supports transformers CLIPModel and SiglipModel (and their "
                    f"subclasses), got {type(model).__name__}")


def _forward(model, *args, return_loss=None, **kwargs):  # bound to the model
    out = type(model).forward(model, *args, return_loss=False, **kwargs)
    if return_loss:
        scale = model.logit_scale.exp()
        if _kind(model) == "siglip":
            loss = siglip_loss(out.image_embeds, out.text_embeds, scale, model.logit_bias)
        else:
            loss = clip_loss(out.image_embeds, out.text_embeds, scale)
        out["loss"] = loss
    return out


def patch_loss_part(model) -> str:
    """Shadow ``model.forward`` by one whose ``return_loss=True`` loss is vlops'; returns what was replaced."""
    kind = _kind(model)
    shadow(model, model, "forward", bind(_forward, model))
    return f"Hugging Face {type(model).__name__} return_loss -> vlops.{kind}_loss"


def patch_contrastive_loss(model):
    """Make ``model(..., return_loss=True)`` compute its loss with vlops; returns the model. Idempotent."""
    _kind(model)
    if not is_patched(model):
        model.__dict__[_WHAT] = patch_loss_part(model)
    return model


def unpatch_contrastive_loss(model):
    """Undo :func:`patch_contrastive_loss`. (A model patched by :func:`vlops.patch` is restored whole by
    :func:`vlops.unpatch`; this restores every part patched on the model object itself.)"""
    if not restore(model):
        raise ValueError("this model was not patched by vlops")
    return model
