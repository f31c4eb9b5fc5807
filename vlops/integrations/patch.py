"""``vlops.patch(obj)``: swap every part of an existing model that vlops has a fused version of, in place.

    report = vlops.patch(model)      # timm / open_clip / Hugging Face model, an open_clip loss, a diffusers
    print(report)                    # pipeline or scheduler, or any nn.Module holding such parts
    vlops.unpatch(model)             # puts the original code back

What is replaced (recognised by class name and attributes, so importing vlops imports none of these libraries):

=========================================  =====================================================================
part                                       replaced by
=========================================  =====================================================================
timm ``VisionTransformer``                 ``patch_embed`` + ``_pos_embed`` + ``norm_pre``: :func:`vlops.patch_embed`
open_clip ``VisionTransformer``            ``conv1`` + class / position embeddings + ``ln_pre``: the same
Hugging Face ``CLIPVisionTransformer``     ``embeddings`` + ``pre_layrnorm``: the same
Hugging Face ``SiglipVisionTransformer``   ``embeddings``: the same
Hugging Face ``CLIPModel`` / ``SiglipModel``  the ``return_loss=True`` loss: :func:`vlops.clip_loss` / ``siglip_loss``
open_clip ``ClipLoss`` / ``SigLipLoss``    ``forward``: :class:`vlops.nn.ClipLoss` / ``SigLipLoss`` (the same
                                           options, across ranks too)
ViLBERT ``BertBiAttention``                ``forward``: :class:`vlops.nn.CoAttention` (ViLBERT's masking exactly)
diffusers ``DDPMScheduler`` /              ``step``: the fused step (the scheduler becomes a
``DDIMScheduler``, or a pipeline's         ``FusedDDPMScheduler`` / ``FusedDDIMScheduler``, the same object)
=========================================  =====================================================================

The weights stay where they are: no parameter or buffer is copied, moved or re-created, so state_dicts,
optimisers and checkpoints are unchanged, and ``copy.deepcopy`` of a patched model is patched too (the swapped
methods are bound to the model's own modules). The patched forward calls are plain module calls, so the patched
model also runs under ``torch.compile``. Patching twice changes nothing the second time.

Known differences from the original code: the patched ViLBERT attention returns ``(None, None)`` in place of
the attention probabilities (the fused op never forms them); the patched Hugging Face stem falls back to the
original embeddings for ``interpolate_pos_encoding=True``; a patched diffusers scheduler reports its class as
``FusedDDIMScheduler`` (``unpatch`` before ``save_pretrained`` if another install must load the config).
"""
from __future__ import annotations

import dataclasses
import types

__all__ = ["patch", "unpatch", "PatchReport", "SUPPORTED"]

_UNDO = "_vlops_undo"  # on each patched part: [(holder, attr, had_own_value, old_value)], in the order applied
_WHAT = "_vlops_patched"  # on each patched part: what was replaced

#: what :func:`patch` recognises (the error for an unsupported object lists these)
SUPPORTED = (
    "timm VisionTransformer (or a model holding one)",
    "open_clip CLIP / CustomTextCLIP / VisionTransformer",
    "open_clip ClipLoss / SigLipLoss",
    "Hugging Face CLIPModel / CLIPVisionModel / SiglipModel / SiglipVisionModel",
    "ViLBERT BertBiAttention / BertConnectionLayer (vilbert-multi-task names)",
    "diffusers DDPMScheduler / DDIMScheduler, or a pipeline with one as .scheduler",
)


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch` replaced (``replaced``: ``(path, what)``) and what it recognised but left as it was
    (``kept``: ``(path, why)``). ``path`` is the part's name inside the object ("" for the object itself).
    ``len(report)`` is the number of parts replaced (restored, for the report of :func:`unpatch`)."""

    replaced: list = dataclasses.field(default_factory=list)
    kept: list = dataclasses.field(default_factory=list)
    action: str = "replaced"  # "restored" for the report of unpatch

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        lines = [f"vlops: {len(self.replaced)} part(s) {self.action}"]
        lines += [f"  {path or '<root>'}: {what}" for path, what in self.replaced]
        if self.kept:
            lines.append("kept as they were:")
            lines += [f"  {path or '<root>'}: {why}" for path, why in self.kept]
        return "\n".join(lines)


def _names(obj) -> set:
    return {c.__name__ for c in type(obj).__mro__}


def shadow(part, holder, attr: str, value) -> None:
    """Set ``holder.<attr>`` to ``value`` as an instance attribute (shadowing a method or class attribute), and
    remember on ``part`` how to undo it."""
    part.__dict__.setdefault(_UNDO, []).append((holder, attr, attr in holder.__dict__, holder.__dict__.get(attr)))
    holder.__dict__[attr] = value


def bind(fn, obj):
    """``fn`` bound to ``obj`` (deepcopy of the model rebinds it to the copy)."""
    return types.MethodType(fn, obj)


def is_patched(part) -> bool:
    return bool(part.__dict__.get(_UNDO)) or _WHAT in part.__dict__


def restore(part) -> bool:
    """Undo every :func:`shadow` recorded on ``part``; False if it was not patched."""
    undo = part.__dict__.pop(_UNDO, None)
    part.__dict__.pop(_WHAT, None)
    if not undo:
        return False
    for holder, attr, had, old in reversed(undo):
        if had:
            holder.__dict__[attr] = old
        else:
            holder.__dict__.pop(attr, None)
    return True


# ------------------------------------------------------------------------------------------------------------
# the parts


def _loss_open_clip(loss) -> str:
    import vlops.nn as vnn

    names = _names(loss)
    if "SigLipLoss" in names:
        fused = vnn.SigLipLoss(cache_labels=loss.cache_labels, rank=loss.rank, world_size=loss.world_size,
                               dist_impl=getattr(loss, "dist_impl", None))
        what = "open_clip SigLipLoss.forward -> vlops.nn.SigLipLoss"
    else:
        fused = vnn.ClipLoss(local_loss=loss.local_loss, gather_with_grad=loss.gather_with_grad,
                             cache_labels=loss.cache_labels, rank=loss.rank, world_size=loss.world_size,
                             use_horovod=loss.use_horovod)
        what = "open_clip ClipLoss.forward -> vlops.nn.ClipLoss"
    shadow(loss, loss, "_vlops_fused_loss", fused)
    shadow(loss, loss, "forward", bind(_fused_loss_forward, loss))
    return what


def _fused_loss_forward(self, *args, **kwargs):
    return self._vlops_fused_loss(*args, **kwargs)


def _co_attention(att) -> str:
    from vlops.nn.coattention import CoAttention

    shadow(att, att, "shared_weights", False)
    shadow(att, att, "exact_vilbert", True)
    shadow(att, att, "mask_to_lengths", None)
    shadow(att, att, "_qkv", bind(CoAttention._qkv, att))
    shadow(att, att, "forward", bind(CoAttention.forward, att))
    return "ViLBERT BertBiAttention.forward -> vlops.co_attention (ViLBERT's masking; no attention probabilities)"


def _scheduler(sched) -> str:
    from diffusers import DDIMScheduler, DDPMScheduler

    from .diffusers import FusedDDIMScheduler, FusedDDPMScheduler

    fused = {DDPMScheduler: FusedDDPMScheduler, DDIMScheduler: FusedDDIMScheduler}[type(sched)]
    shadow(sched, sched, "_vlops_original_class", type(sched))
    sched.__class__ = fused
    return f"diffusers {fused.__mro__[1].__name__}.step -> vlops.{'ddpm' if fused is FusedDDPMScheduler else 'ddim'}" \
           "_step (guidance lines stay in the pipeline)"


def _restore_scheduler(sched) -> None:
    cls = sched.__dict__.get("_vlops_original_class")
    if cls is not None:
        sched.__class__ = cls
        sched.__dict__.pop("_vlops_schedule_obj", None)


def _scheduler_kind(obj) -> str | None:
    """"fused" for a vlops scheduler, "plain" for a diffusers DDPM / DDIM scheduler, None otherwise."""
    names = _names(obj)
    if "FusedDDPMScheduler" in names or "FusedDDIMScheduler" in names:
        return "fused"
    if type(obj).__name__ in ("DDPMScheduler", "DDIMScheduler") and type(obj).__module__.startswith("diffusers"):
        return "plain"
    return None


def _module_parts(module):
    """[(path, part, patch function or None, why not)] for the recognised parts of an nn.Module."""
    from . import stem, transformers as hf

    found = []
    for path, m in module.named_modules():
        names = _names(m)
        fn, why = None, ""
        tower = stem.tower_kind(m)
        if tower is not None:
            fn = stem.PATCHERS[tower]
        elif names & {"CLIPModel", "SiglipModel", "Siglip2Model"} and hasattr(m, "logit_scale"):
            fn = hf.patch_loss_part
        elif names & {"ClipLoss", "SigLipLoss"} and type(m).__module__.startswith("open_clip"):
            if names & {"CoCaLoss", "DistillClipLoss"}:
                why = f"{type(m).__name__}: no fused version (the caption / distillation terms)"
            else:
                fn = _loss_open_clip
        elif names & {"BertBiAttention", "ViLBERTBiAttention"} and hasattr(m, "query1") and hasattr(m, "value2"):
            fn = _co_attention
        if fn is not None or why:
            found.append((path, m, fn, why))
    return found


def patch(obj) -> PatchReport:
    """Replace, in place, every part of ``obj`` that vlops has a fused version of; returns a :class:`PatchReport`.

    ``obj``: an ``nn.Module`` (a timm, open_clip or Hugging Face model, an open_clip loss, ViLBERT code, or any
    module holding such parts), a diffusers ``DDPMScheduler`` / ``DDIMScheduler``, or a diffusers pipeline (an
    object with such a ``.scheduler``). Parts already patched are left as they are. Raises TypeError, listing
    what is supported, when nothing in ``obj`` is recognised.
    """
    import torch

    report = PatchReport()
    kind = _scheduler_kind(obj)
    if kind is not None:
        _patch_scheduler(obj, "", kind, report)
        return report
    sched = getattr(obj, "scheduler", None) if not isinstance(obj, torch.nn.Module) else None
    if sched is not None:
        kind = _scheduler_kind(sched)
        if kind is None:
            report.kept.append(("scheduler", f"{type(sched).__name__} has no fused version (DDPMScheduler and "
                                             "DDIMScheduler do)"))
        else:
            _patch_scheduler(sched, "scheduler", kind, report)
        return report
    if not isinstance(obj, torch.nn.Module):
        raise TypeError(_unsupported(obj))
    parts = _module_parts(obj)
    if not parts:
        raise TypeError(_unsupported(obj))
    for path, part, fn, why in parts:
        if fn is None:
            report.kept.append((path, why))
        elif is_patched(part):
            report.kept.append((path, f"already patched: {part.__dict__.get(_WHAT, '')}"))
        else:
            what = fn(part)
            part.__dict__[_WHAT] = what
            report.replaced.append((path, what))
    return report


def _patch_scheduler(sched, path: str, kind: str, report: PatchReport) -> None:
    if kind == "fused":
        report.kept.append((path, f"already fused: {type(sched).__name__}"))
        return
    what = _scheduler(sched)
    sched.__dict__[_WHAT] = what
    report.replaced.append((path, what))


def unpatch(obj) -> PatchReport:
    """Undo :func:`patch` on ``obj``, in place; returns a :class:`PatchReport` whose ``replaced`` lists what was
    restored. Raises ValueError when nothing in ``obj`` was patched."""
    import torch

    report = PatchReport(action="restored")
    targets = []
    if isinstance(obj, torch.nn.Module):
        targets = [(path, m) for path, m in obj.named_modules() if is_patched(m)]
    elif _scheduler_kind(obj) is not None:
        targets = [("", obj)]
    elif _scheduler_kind(getattr(obj, "scheduler", None)) is not None:
        targets = [("scheduler", obj.scheduler)]
    targets = [(p, t) for p, t in targets if is_patched(t)]
    if not targets:
        raise ValueError(f"nothing in this {type(obj).__name__} was patched by vlops")
    for path, part in targets:
        what = part.__dict__.get(_WHAT, "")
        if _scheduler_kind(part) == "fused":
            _restore_scheduler(part)
        restore(part)
        report.replaced.append((path, what))
    return report


def _unsupported(obj) -> str:
    return (f"vlops.patch: nothing in {type(obj).__module__}.{type(obj).__name__} has a fused version; supported: "
            + "; ".join(SUPPORTED))
