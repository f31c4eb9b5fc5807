"""Drop-in contrastive loss modules with open_clip's constructor arguments, forward signature and
return values (``open_clip.loss.ClipLoss`` / ``SigLipLoss``), computed by the fused tiled kernels."""
from __future__ import annotations

from torch import nn

from .. import contrastive as F


def _single_process(world_size: int, cls: str):
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if world_size > 1:
        raise NotImplementedError(
            f"vlops.nn.{cls}: world_size > 1 (the distributed loss) is not yet supported; vlops runs the "
            "single-process loss only for now")


class ClipLoss(nn.Module):
    """open_clip ``ClipLoss`` (single process), fused: the N x N logits are never stored.

    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)`` returns
    the loss, or ``{"contrastive_loss": loss}``. Extra keyword ``label_smoothing``.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, label_smoothing: float = 0.0):
        super().__init__()
        _single_process(world_size, "ClipLoss")
        if use_horovod:
            raise NotImplementedError("vlops.nn.ClipLoss: horovod is not supported")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.label_smoothing = label_smoothing

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        loss = F.clip_loss(image_features, text_features, logit_scale, logit_bias,
                           label_smoothing=self.label_smoothing)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """open_clip ``SigLipLoss`` (single process), fused.

    ``forward(image_features, text_features, logit_scale, logit_bias, output_dict=False)``.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl=None):
        super().__init__()
        _single_process(world_size, "SigLipLoss")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(f"dist_impl must be one of bidir, shift, reduce, gather, got {dist_impl!r}")

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
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
