"""Drop-in contrastive loss modules with open_clip's constructor arguments, forward signature and
return values (``open_clip.loss.ClipLoss`` / ``SigLipLoss``), computed by the fused tiled kernels, in one
process or across the ranks of a torch.distributed process group."""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import nn

from .. import contrastive as F
from .. import distributed as D


def _rank_world(rank, world_size, group, cls: str) -> tuple[int, int]:
    """open_clip's ``rank`` / ``world_size``; None takes them from ``group`` (default: the default process group)
    when torch.distributed is initialised, else (0, 1). Given values must agree with the group."""
    for name, v in (("rank", rank), ("world_size", world_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise TypeError(f"vlops.nn.{cls}: {name} must be an int or None, got {type(v).__name__}")
    if world_size is not None and world_size < 1:
        raise ValueError(f"vlops.nn.{cls}: world_size must be >= 1, got {world_size}")
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised:
        if group is not None:
            raise RuntimeError(f"vlops.nn.{cls}: group given but torch.distributed is not initialised")
        if world_size is not None and world_size > 1:
            raise RuntimeError(f"vlops.nn.{cls}: world_size={world_size} needs an initialised process group "
                               "(torch.distributed.init_process_group)")
        if rank not in (None, 0):
            raise ValueError(f"vlops.nn.{cls}: rank must be 0 in a single process, got {rank}")
        return 0, 1
    g = group if group is not None else dist.group.WORLD
    g_rank, g_world = dist.get_rank(g), dist.get_world_size(g)
    if world_size == 1 and rank in (None, 0):  # explicitly single-process (open_clip's default values)
        return 0, 1
    if world_size is not None and world_size != g_world:
        raise ValueError(f"vlops.nn.{cls}: world_size={world_size} but the process group has {g_world} ranks")
    if rank is not None and rank != g_rank:
        raise ValueError(f"vlops.nn.{cls}: rank={rank} but this process is rank {g_rank} of the process group")
    return g_rank, g_world


class ClipLoss(nn.Module):
    """open_clip ``ClipLoss``, fused: the N x N logits are never stored, on one process or across ranks.

    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)`` returns
    the loss, or ``{"contrastive_loss": loss}``. ``rank`` / ``world_size`` default to those of the initialised
    process group (``group``, default the default group), or to a single process; with ``world_size > 1``
    ``local_loss`` and ``gather_with_grad`` have open_clip's meaning (see :mod:`vlops.distributed`). Extra
    keywords: ``label_smoothing``, ``ring`` (with ``local_loss=True, gather_with_grad=True``: the texts travel
    round the ranks instead of being gathered, see :func:`vlops.distributed.clip_loss`), ``group``.
    ``cache_labels`` is accepted and has no effect (no labels tensor is built).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: Optional[int] = None, world_size: Optional[int] = None, use_horovod: bool = False,
                 label_smoothing: float = 0.0, ring: bool = False, group=None):
        super().__init__()
        if use_horovod:
            raise NotImplementedError("vlops.nn.ClipLoss: horovod is not supported; use torch.distributed")
        self.rank, self.world_size = _rank_world(rank, world_size, group, "ClipLoss")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.use_horovod = use_horovod
        self.label_smoothing = label_smoothing
        self.ring = ring
        self.group = group

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if self.world_size > 1:
            loss = D.clip_loss(image_features, text_features, logit_scale, logit_bias, local_loss=self.local_loss,
                               gather_with_grad=self.gather_with_grad, label_smoothing=self.label_smoothing,
                               ring=self.ring, group=self.group)
        else:
            loss = F.clip_loss(image_features, text_features, logit_scale, logit_bias,
                               label_smoothing=self.label_smoothing)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """open_clip ``SigLipLoss``, fused, on one process or across ranks (``dist_impl``: "bidir", "shift",
    "reduce", "gather", see :func:`vlops.distributed.siglip_loss`).

    ``forward(image_features, text_features, logit_scale, logit_bias, output_dict=False)``. ``rank`` /
    ``world_size`` / ``group`` as for :class:`ClipLoss`.
    """

    def __init__(self, cache_labels: bool = False, rank: Optional[int] = None, world_size: Optional[int] = None,
                 dist_impl=None, group=None):
        super().__init__()
        self.rank, self.world_size = _rank_world(rank, world_size, group, "SigLipLoss")
        self.cache_labels = cache_labels
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in D.DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of bidir, shift, reduce, gather, got {dist_impl!r}")
        self.group = group

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        if self.world_size > 1:
            loss = D.siglip_loss(image_features, text_features, logit_scale, logit_bias, dist_impl=self.dist_impl,
                                 group=self.group)
        else:
            loss = F.siglip_loss(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss


class UniClLoss(nn.Module):
    """Florence's UniCL loss: ``forward(image_features, text_features, labels, logit_scale, logit_bias=None)``;
    every image-text pair with equal labels is a positive."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, image_features, text_features, labels, logit_scale, logit_bias=None, output_dict=False):
        loss = F.clip_loss(image_features, text_features, logit_scale, logit_bias, labels=labels,
                           label_smoothing=self.label_smoothing)
        return {"contrastive_loss": loss} if output_dict else loss
