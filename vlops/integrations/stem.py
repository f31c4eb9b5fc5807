"""Swap the fused patch stem into existing image towers, in place, weights kept (the parameters stay where
they are, so state_dicts, optimisers and checkpoints are unchanged):

    vlops.integrations.stem.patch_stem(model)     # returns the model; unpatch_stem(model) undoes it

Supported (recognised by class name, so importing vlops imports none of them):

- timm ``VisionTransformer``: ``patch_embed`` + ``_pos_embed`` + ``norm_pre`` become one call
  (``patch_drop`` still runs, on the normalised tokens: per-token LayerNorm and token selection commute).
- open_clip ``VisionTransformer`` (``model.visual``, or a CLIP model holding it): ``conv1``,
  ``class_embedding``, ``positional_embedding``, ``ln_pre`` (``patch_dropout`` likewise after the norm).
- Hugging Face ``CLIPVisionModel`` / ``CLIPVisionTransformer`` / ``CLIPModel`` (its vision tower):
  ``embeddings`` + ``pre_layrnorm`` (forward calls with ``interpolate_pos_encoding=True`` fall back to
  the original embeddings).

The swapped model gives the same output as before (tests/test_patch_embed.py).
"""
from __future__ import annotations

from ..reference.patch_embed import from_hf, from_open_clip, from_timm
from ..stem import patch_embed

__all__ = ["patch_stem", "unpatch_stem"]

_KEY = "_vlops_stem_originals"


def _names(obj) -> set:
    return {c.__name__ for c in type(obj).__mro__}


def _identity(x, *args, **kwargs):
    return x


def _shadow(owner, holder, attr, value):
    """Shadow the method ``holder.<attr>`` by an instance attribute ``value``; remember how to undo it
    (in ``owner``)."""
    owner.__dict__.setdefault(_KEY, []).append((holder, attr, attr in holder.__dict__, holder.__dict__.get(attr)))
    holder.__dict__[attr] = value


def _patch_timm(vit):
    def _stem(x):
        return patch_embed(x, **from_timm(vit, image_size=tuple(x.shape[-2:])))

    _shadow(vit, vit.patch_embed, "forward", _stem)  # patch_embed(x) -> all tokens, normalised
    _shadow(vit, vit, "_pos_embed", _identity)
    _shadow(vit, vit.norm_pre, "forward", _identity)
    return "timm VisionTransformer: patch_embed + _pos_embed + norm_pre"


def _patch_open_clip(visual):
    def _embeds(x):
        return visual.patch_dropout(patch_embed(x, **from_open_clip(visual)))

    _shadow(visual, visual, "_embeds", _embeds)
    return "open_clip VisionTransformer: conv1 + class_embedding + positional_embedding + ln_pre"


def _patch_hf(vm):
    emb, pre = vm.embeddings, vm.pre_layrnorm
    original = emb.forward

    def forward(pixel_values, interpolate_pos_encoding=False, **kwargs):
        if interpolate_pos_encoding or kwargs:
            return pre.__class__.forward(pre, original(pixel_values, interpolate_pos_encoding, **kwargs))
        return patch_embed(pixel_values, **from_hf(vm))

    _shadow(vm, emb, "forward", forward)  # embeddings -> tokens already normalised by pre_layrnorm
    _shadow(vm, pre, "forward", _identity)
    return "Hugging Face CLIP vision: embeddings + pre_layrnorm"


def _target(model):
    names = _names(model)
    if "VisionTransformer" in names and hasattr(model, "_pos_embed") and hasattr(model, "patch_embed"):
        return model, _patch_timm
    if "VisionTransformer" in names and hasattr(model, "conv1") and hasattr(model, "_embeds"):
        return model, _patch_open_clip
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(visual, "conv1") and hasattr(visual, "_embeds"):
        return visual, _patch_open_clip
    for cand in (model, getattr(model, "vision_model", None)):
        if cand is not None and hasattr(cand, "embeddings") and hasattr(cand, "pre_layrnorm"):
            return cand, _patch_hf
    raise TypeError(f"patch_stem supports timm VisionTransformer, open_clip VisionTransformer (or a CLIP model "
                    f"with .visual) and Hugging Face CLIPVisionModel / CLIPModel; got {type(model).__name__}")


def patch_stem(model):
    """Replace the stem of ``model`` by the fused one, in place; returns ``model``. Idempotent."""
    tower, fn = _target(model)
    if tower.__dict__.get(_KEY):
        return model
    what = fn(tower)
    tower.__dict__.setdefault("_vlops_stem_report", what)
    return model


def unpatch_stem(model):
    """Undo :func:`patch_stem`."""
    tower, _ = _target(model)
    originals = tower.__dict__.get(_KEY)
    if not originals:
        raise ValueError("this model's stem was not patched by vlops")
    for holder, attr, had, value in reversed(originals):
        if had:
            holder.__dict__[attr] = value
        else:
            holder.__dict__.pop(attr, None)
    del tower.__dict__[_KEY]
    tower.__dict__.pop("_vlops_stem_report", None)
    return model
