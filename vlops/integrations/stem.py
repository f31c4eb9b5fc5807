"""Swap the fused patch stem into existing image towers, in place, weights kept (the parameters stay where
they are, so state_dicts, optimisers and checkpoints are unchanged):

    vlops.integrations.stem.patch_stem(model)     # returns the model; unpatch_stem(model) undoes it

Supported (recognised by class name, so importing vlops imports none of them):

- timm ``VisionTransformer``: ``patch_embed`` + ``_pos_embed`` + ``norm_pre`` become one call
  (``patch_drop`` still runs, on the normalised tokens: per-token LayerNorm and token selection commute).
- open_clip ``VisionTransformer`` (``model.visual``, or a CLIP model holding it): ``conv1``,
  ``class_embedding``, ``positional_embedding``, ``ln_pre`` (``patch_dropout`` likewise after the norm).
- Hugging Face ``CLIPVisionModel`` / ``CLIPVisionTransformer`` / ``CLIPModel`` (its vision tower):
  ``embeddings`` + ``pre_layrnorm``; SigLIP vision towers: ``embeddings`` (forward calls with
  ``interpolate_pos_encoding=True`` fall back to the original embeddings).

The swapped methods are bound to the tower's own modules, so ``copy.deepcopy`` of a patched model is patched
too. :func:`vlops.patch` swaps these stems and every other fused part in one call.

The swapped model gives the same output as before (tests/test_patch_embed.py).
"""
from __future__ import annotations

from torch import nn

from ..reference.patch_embed import from_hf, from_open_clip, from_timm
from ..stem import patch_embed
from .patch import bind, is_patched, restore, shadow

__all__ = ["patch_stem", "unpatch_stem", "tower_kind", "PATCHERS"]

_WHAT = "_vlops_patched"
# SigLIP vision towers (no class token, no pre-norm); transformers 5 puts the embeddings on SiglipVisionModel
_SIGLIP_TOWERS = {"SiglipVisionTransformer", "SiglipVisionModel"}


def _names(obj) -> set:
    return {c.__name__ for c in type(obj).__mro__}


def _identity(self, x, *args, **kwargs):
    return x


def _timm_stem(vit, x):  # bound to the VisionTransformer, called as its patch_embed(x)
    return patch_embed(x, **from_timm(vit, image_size=tuple(x.shape[-2:])))


def _patch_timm(vit) -> str:
    shadow(vit, vit.patch_embed, "forward", bind(_timm_stem, vit))  # patch_embed(x) -> all tokens, normalised
    shadow(vit, vit, "_pos_embed", bind(_identity, vit))
    shadow(vit, vit.norm_pre, "forward", bind(_identity, vit.norm_pre))
    return "timm VisionTransformer: patch_embed + _pos_embed + norm_pre -> vlops.patch_embed"


def _open_clip_embeds(visual, x):
    return visual.patch_dropout(patch_embed(x, **from_open_clip(visual)))


def _patch_open_clip(visual) -> str:
    shadow(visual, visual, "_embeds", bind(_open_clip_embeds, visual))
    return ("open_clip VisionTransformer: conv1 + class_embedding + positional_embedding + ln_pre -> "
            "vlops.patch_embed")


def _hf_embeddings(vm, pixel_values, interpolate_pos_encoding=False, **kwargs):  # bound to the vision tower
    if interpolate_pos_encoding or kwargs:
        out = type(vm.embeddings).forward(vm.embeddings, pixel_values, interpolate_pos_encoding, **kwargs)
        pre = getattr(vm, "pre_layrnorm", None)
        return out if pre is None else type(pre).forward(pre, out)
    return patch_embed(pixel_values.to(vm.embeddings.patch_embedding.weight.dtype), **from_hf(vm))


def _patch_hf(vm) -> str:
    shadow(vm, vm.embeddings, "forward", bind(_hf_embeddings, vm))  # embeddings -> tokens, already normalised
    if hasattr(vm, "pre_layrnorm"):
        shadow(vm, vm.pre_layrnorm, "forward", bind(_identity, vm.pre_layrnorm))
        return "Hugging Face CLIP vision: embeddings + pre_layrnorm -> vlops.patch_embed"
    return "Hugging Face SigLIP vision: embeddings -> vlops.patch_embed"


PATCHERS = {"timm": _patch_timm, "open_clip": _patch_open_clip, "hf": _patch_hf}


def tower_kind(m):
    """"timm", "open_clip" or "hf" when ``m`` itself is an image tower whose stem vlops can swap, else None."""
    names = _names(m)
    if "VisionTransformer" in names and hasattr(m, "_pos_embed") and hasattr(m, "patch_embed") and \
            hasattr(m, "norm_pre"):
        return "timm"
    if "VisionTransformer" in names and hasattr(m, "conv1") and hasattr(m, "_embeds"):
        return "open_clip"
    emb = getattr(m, "embeddings", None)
    if emb is not None and isinstance(getattr(emb, "patch_embedding", None), nn.Conv2d) and \
            hasattr(emb, "position_embedding") and (hasattr(m, "pre_layrnorm") or names & _SIGLIP_TOWERS):
        return "hf"
    return None


def _target(model):
    for cand in (model, getattr(model, "visual", None), getattr(model, "vision_model", None)):
        if cand is not None and tower_kind(cand) is not None:
            return cand
    raise TypeError(f"patch_stem supports timm VisionTransformer, open_clip VisionTransformer (or a CLIP model "
                    f"with .visual) and Hugging Face CLIP / SigLIP vision models; got {type(model).__name__}")


def patch_stem(model):
    """Replace the stem of ``model`` by the fused one, in place; returns ``model``. Idempotent."""
    tower = _target(model)
    if not is_patched(tower):
        tower.__dict__[_WHAT] = PATCHERS[tower_kind(tower)](tower)
    return model


def unpatch_stem(model):
    """Undo :func:`patch_stem` (or the stem part of :func:`vlops.patch`)."""
    if not restore(_target(model)):
        raise ValueError("this model's stem was not patched by vlops")
    return model
