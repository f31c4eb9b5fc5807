"""Public API of the fused contrastive losses: :func:`clip_loss` (CLIP / ALIGN, UniCL with
``labels``), :func:`siglip_loss`, and :func:`zero_shot_classify`.

The losses are computed tile by tile: the N x N logits, their softmax and their gradient never
exist in memory (O(N D) memory instead of O(N^2)). Forward keeps only the per-row and per-column
log-sum-exp; backward recomputes the tiles.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from . import _validate as V
from .ops import contrastive as _op

__all__ = ["clip_loss", "siglip_loss", "zero_shot_classify"]


def _features(image_features, text_features, *, same_n: bool = True):
    V.tensor(image_features, "image_features", floating=True)
    V.tensor(text_features, "text_features", floating=True)
    for name, t in (("image_features", image_features), ("text_features", text_features)):
        if t.ndim != 2:
            raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(t.shape)}")
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"image_features and text_features must have the same feature dimension D, got "
                         f"{image_features.shape[1]} and {text_features.shape[1]}")
    if same_n and image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"image_features and text_features must have the same batch size N, got "
                         f"{image_features.shape[0]} and {text_features.shape[0]}")
    V.same_device(image_features, "image_features", text_features=text_features)
    dt = torch.promote_types(image_features.dtype, text_features.dtype)
    return image_features.to(dt).contiguous(), text_features.to(dt).contiguous()


def _scalar(x, name: str, like: torch.Tensor) -> torch.Tensor:
    """A python number or a one-element tensor -> float32 [1] on ``like``'s device (autograd kept)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.ndim > 1:
            raise ValueError(f"{name} must be a scalar (0-d or one-element tensor), got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.device != like.device:
            raise ValueError(f"{name} is on {x.device} but the features are on {like.device}")
        return x.reshape(1).float()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a number or a scalar tensor, got {type(x).__name__}")
    return torch.tensor([float(x)], dtype=torch.float32, device=like.device)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias=None, *,
              labels: Optional[torch.Tensor] = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE loss of CLIP / ALIGN, fused and tiled (open_clip ``ClipLoss``).

    ``mean(CE(L, arange(N)) + CE(L.T, arange(N))) / 2`` with ``L = logit_scale * I @ T.T + logit_bias``.

    Args:
        image_features, text_features: [N, D] (fp32, fp16 or bf16; fp32 accumulation).
        logit_scale: the already-exponentiated scale (number or scalar tensor; gets a gradient).
        logit_bias: optional bias (ALIGN / SigLIP-style); it cancels in the loss, so its gradient is
            a zero tensor.
        labels: optional int [N] class labels: UniCL (Florence), every pair of equal labels is a
            positive, the target of each row / column spread evenly over its positives.
        label_smoothing: as ``F.cross_entropy(label_smoothing=...)``, in [0, 1].

    Returns:
        The loss, a float32 0-d tensor.
    """
    a, b = _features(image_features, text_features)
    scale = _scalar(logit_scale, "logit_scale", a)
    eps = V.real(label_smoothing, "label_smoothing", lo=0.0, hi=1.0)
    if labels is not None:
        V.tensor(labels, "labels")
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.shape != (a.shape[0],):
            raise ValueError(f"labels must have shape [{a.shape[0]}], got {tuple(labels.shape)}")
        V.same_device(a, "image_features", labels=labels)
        labels = labels.long()
    loss = _op.clip_loss(a, b, scale, labels, eps)[0]
    if logit_bias is not None:
        bias = _scalar(logit_bias, "logit_bias", a)
        loss = loss + 0.0 * bias.sum()  # the bias cancels; this keeps it in the graph (zero gradient)
    return loss


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias=None, *,
                negative_only: bool = False) -> torch.Tensor:
    """Pairwise sigmoid loss of SigLIP, fused and tiled (open_clip ``SigLipLoss`` single process).

    ``-sum(logsigmoid(z * L)) / N`` with ``z = +1`` on the diagonal, ``-1`` elsewhere (all ``-1``
    with ``negative_only``). ``text_features`` may have another batch size M than the images.

    Returns:
        The loss, a float32 0-d tensor; ``logit_scale`` and ``logit_bias`` get real gradients.
    """
    a, b = _features(image_features, text_features, same_n=False)
    scale = _scalar(logit_scale, "logit_scale", a)
    bias = _scalar(0.0 if logit_bias is None else logit_bias, "logit_bias", a)
    neg = V.boolean(negative_only, "negative_only")
    with_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (a, b, scale, bias))
    return _op.siglip_loss(a, b, scale, bias, neg, with_grad)[0]


def zero_shot_classify(image_features: torch.Tensor, class_embeddings: torch.Tensor, logit_scale, *,
                       k: Optional[int] = None):
    """Zero-shot classification: ``softmax(logit_scale * image_features @ class_embeddings.T)``.

    With ``k``, returns only the top-k ``(probabilities, indices)`` per image, computed in row chunks so
    the full [N, K] matrix is never stored.
    """
    a, c = _features(image_features, class_embeddings, same_n=False)
    scale = _scalar(logit_scale, "logit_scale", a)
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= c.shape[0]:
            raise ValueError(f"k must be an int in [1, {c.shape[0]}] (the number of classes), got {k!r}")
    with torch.no_grad():
        return _op.zero_shot(a, c, scale, k)
