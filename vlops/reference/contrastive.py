"""Eager PyTorch specification of the contrastive losses (CLIP/ALIGN, UniCL, SigLIP) and zero-shot
classification. These materialise the N x M logits; the fused kernels must equal them without doing so.

Logits: ``L = logit_scale * image_features @ text_features.T + logit_bias`` (``logit_scale`` already
exponentiated, as open_clip passes it).

- CLIP / ALIGN: ``(CE(L, targets) + CE(L.T, targets)) / 2`` with ``targets = arange(N)``
  (open_clip ``ClipLoss``), optionally with label smoothing ``eps`` (targets ``(1 - eps) onehot +
  eps / N``, as ``F.cross_entropy(label_smoothing=eps)``).
- UniCL (Florence): integer ``labels`` [N]; every pair whose labels match is a positive; the target of
  a row (column) is spread evenly over its positives.
- SigLIP: ``-sum(logsigmoid(z * L)) / N`` with ``z = +1`` on the diagonal and ``-1`` elsewhere
  (open_clip ``SigLipLoss``); ``negative_only`` makes every ``z = -1`` (the cross-rank blocks of the
  distributed loss).
- Zero-shot: ``softmax(logit_scale * image_features @ class_embeddings.T)``, or its top-k.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def logits(image_features, text_features, logit_scale, logit_bias=None):
    out = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
        out = out + logit_bias
    return out


def clip_loss(image_features, text_features, logit_scale, logit_bias=None, *, label_smoothing: float = 0.0,
              labels=None):
    """CLIP/ALIGN loss; with ``labels`` [N] (int) the UniCL loss. Computed in the inputs' dtype."""
    L = logits(image_features, text_features, logit_scale, logit_bias)
    N = L.shape[0]
    if labels is None:
        target = torch.arange(N, device=L.device)
        return (F.cross_entropy(L, target, label_smoothing=label_smoothing)
                + F.cross_entropy(L.T, target, label_smoothing=label_smoothing)) / 2
    pos = (labels[:, None] == labels[None, :]).to(L.dtype)
    q_row = pos / pos.sum(1, keepdim=True)
    q_col = pos / pos.sum(0, keepdim=True)
    if label_smoothing:
        q_row = (1 - label_smoothing) * q_row + label_smoothing / N
        q_col = (1 - label_smoothing) * q_col + label_smoothing / N
    row = -(q_row * torch.log_softmax(L, dim=1)).sum(1).mean()
    col = -(q_col * torch.log_softmax(L, dim=0)).sum(0).mean()
    return (row + col) / 2


def siglip_loss(image_features, text_features, logit_scale, logit_bias=None, *, negative_only: bool = False):
    """SigLIP loss (open_clip ``SigLipLoss._loss``), the inputs' dtype."""
    L = logits(image_features, text_features, logit_scale, logit_bias)
    N, M = L.shape
    z = -torch.ones(N, M, device=L.device, dtype=L.dtype)
    if not negative_only:
        k = min(N, M)
        z[torch.arange(k), torch.arange(k)] = 1.0
    return -F.logsigmoid(z * L).sum() / image_features.shape[0]


def zero_shot(image_features, class_embeddings, logit_scale, *, k=None):
    """Softmax over classes of ``logit_scale * image_features @ class_embeddings.T``; with ``k`` the
    top-k ``(values, indices)`` of those probabilities."""
    p = torch.softmax(logit_scale * image_features @ class_embeddings.T, dim=-1)
    if k is None:
        return p
    return torch.topk(p, k, dim=-1)
