"""Contrastive losses as torch custom ops: tiled, the N x M logits never stored.

Kernel contract (the same positional arguments for every backend; ``vlops._C.<name>_cpu``,
``vlops.kernels.contrastive.<name>``). ``a`` [N, D] and ``b`` [M, D] are contiguous, one dtype
(fp32, fp16, bf16; fp64 on the cpu backend), accumulation in fp32 (fp64 for fp64). ``scale`` and
``bias`` are float32 tensors of shape [1] on the inputs' device (read on the device: no host sync).
``S_ij = scale * a_i . b_j``. Every output is float32 (float64 for fp64 inputs), freshly written.

``contrastive_lse(a, b, scale) -> (row_lse [N], col_lse [M])``
    ``row_lse_i = log sum_j exp(S_ij)``, ``col_lse_j = log sum_i exp(S_ij)`` (no bias: it cancels
    in every softmax).

``clip_bwd(a, b, scale, row_lse, col_lse, coef_row, coef_col, row_center, col_center)
-> (da [N, D], db [M, D], dscale [1])``
    ``R_ij = coef_row * exp(S_ij - row_lse_i)``, ``C_ij = coef_col * exp(S_ij - col_lse_j)``,
    ``W = R + C`` (python floats coef_row, coef_col), ``da_i = sum_j W_ij b_j``,
    ``db_j = sum_i W_ij a_i``, ``dscale = sum_ij R_ij (a_i . b_j - row_center_i)
    + C_ij (a_i . b_j - col_center_j)`` (``row_center`` [N], ``col_center`` [M] float32/float64: the
    target dots, so that the scale gradient is a sum of small terms, not a difference of two large
    ones).

``siglip_fwd(a, b, scale, bias, negative_only) -> loss_sum [1]``
    ``sum_ij softplus(-z_ij (S_ij + bias))`` with ``z_ij = +1`` where ``i == j`` (unless
    ``negative_only``) and ``-1`` elsewhere.

``siglip_bwd(a, b, scale, bias, negative_only) -> (da [N, D], db [M, D], dscale [1], dbias [1])``
    ``W_ij = -z_ij * sigmoid(-z_ij (S_ij + bias))`` (d loss_ij / d L_ij), ``da_i = sum_j W_ij b_j``,
    ``db_j = sum_i W_ij a_i``, ``dscale = sum_ij W_ij (a_i . b_j)``, ``dbias = sum_ij W_ij``.

``siglip_fwd_bwd(a, b, scale, bias, negative_only) -> (loss_sum [1], da, db, dscale [1], dbias [1])``
    ``siglip_fwd`` and ``siglip_bwd`` from one pass over S (the forward of a call that needs gradients).

Everything else (the diagonal / target terms, label smoothing, UniCL's class means, the 1/N and the
incoming gradient) is O(N D) work done with torch ops in this module.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import _backends
from . import direct_call, eager_autograd

OP = "contrastive"


# ------------------------------------------------------------------ reference backend (materialises S)
def _cdt(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _ref_S(a, b, scale):
    dt = _cdt(a)
    return scale.to(dt) * (a.to(dt) @ b.to(dt).T)


def _ref_lse(a, b, scale):
    S = _ref_S(a, b, scale)
    return torch.logsumexp(S, 1), torch.logsumexp(S, 0)


def _ref_clip_bwd(a, b, scale, row_lse, col_lse, coef_row, coef_col, row_center, col_center):
    dt = _cdt(a)
    S = _ref_S(a, b, scale)
    R = coef_row * torch.exp(S - row_lse[:, None])
    C = coef_col * torch.exp(S - col_lse[None, :])
    W = R + C
    af, bf = a.to(dt), b.to(dt)
    G = af @ bf.T
    ds = (R * (G - row_center.to(dt)[:, None])).sum() + (C * (G - col_center.to(dt)[None, :])).sum()
    return W @ bf, W.T @ af, ds.reshape(1)


def _z(N, M, negative_only, dt, device):
    z = -torch.ones(N, M, dtype=dt, device=device)
    if not negative_only:
        k = min(N, M)
        z[torch.arange(k), torch.arange(k)] = 1.0
    return z


def _ref_siglip_fwd(a, b, scale, bias, negative_only):
    dt = _cdt(a)
    L = _ref_S(a, b, scale) + bias.to(dt)
    z = _z(L.shape[0], L.shape[1], negative_only, dt, L.device)
    return torch.nn.functional.softplus(-z * L).sum().reshape(1)


def _ref_siglip_bwd(a, b, scale, bias, negative_only):
    dt = _cdt(a)
    af, bf = a.to(dt), b.to(dt)
    L = _ref_S(a, b, scale) + bias.to(dt)
    z = _z(L.shape[0], L.shape[1], negative_only, dt, L.device)
    W = -z * torch.sigmoid(-z * L)
    return W @ bf, W.T @ af, (W * (af @ bf.T)).sum().reshape(1), W.sum().reshape(1)


def _ref_siglip_fwd_bwd(a, b, scale, bias, negative_only):
    return (_ref_siglip_fwd(a, b, scale, bias, negative_only), *_ref_siglip_bwd(a, b, scale, bias, negative_only))


_REF = {"contrastive_lse": _ref_lse, "clip_bwd": _ref_clip_bwd, "siglip_fwd": _ref_siglip_fwd,
        "siglip_bwd": _ref_siglip_bwd, "siglip_fwd_bwd": _ref_siglip_fwd_bwd}


def _kernel(name: str, device: torch.device):
    backend = _backends.resolve(OP, device)
    if backend == "reference":
        return _REF[name]
    if backend == "cpu":
        return getattr(_backends.extension(), name + "_cpu")
    from vlops.kernels import contrastive as k  # triton

    return getattr(k, name)


# ------------------------------------------------------------------ CLIP / ALIGN / UniCL
_ROWDOT_CHUNK = 1 << 22  # elements of x converted at a time by _rowdot


def _rowdot(x: torch.Tensor, y: torch.Tensor, dt: Optional[torch.dtype] = None) -> torch.Tensor:
    """[N] row-wise dot products in ``dt`` (default: x's dtype) without an [N, D] temporary: inputs of
    another dtype are converted a few million elements at a time."""
    dt = dt or x.dtype
    if x.dtype == dt and y.dtype == dt:
        return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).view(-1)
    N, D = x.shape
    out = torch.empty(N, dtype=dt, device=x.device)
    step = max(1, _ROWDOT_CHUNK // max(D, 1))
    for i in range(0, N, step):
        xs, ys = x[i:i + step].to(dt), y[i:i + step].to(dt)
        torch.bmm(xs.unsqueeze(1), ys.unsqueeze(2), out=out[i:i + step].view(-1, 1, 1))
    return out


def _targets(a32, b32, labels: Optional[torch.Tensor], eps: float):
    """(t_row, t_col): t_row_i = sum_j q_ij b_j, t_col_j = sum_i q_ij a_i (q symmetric)."""
    if labels is None:
        t_row, t_col = b32, a32
    else:
        N = labels.shape[0]
        uniq, inv = torch.unique(labels, return_inverse=True)
        cnt = torch.zeros(uniq.shape[0], dtype=a32.dtype, device=a32.device).index_add_(
            0, inv, torch.ones(N, dtype=a32.dtype, device=a32.device))
        mb = torch.zeros(uniq.shape[0], b32.shape[1], dtype=a32.dtype, device=a32.device).index_add_(0, inv, b32)
        ma = torch.zeros(uniq.shape[0], a32.shape[1], dtype=a32.dtype, device=a32.device).index_add_(0, inv, a32)
        t_row, t_col = (mb / cnt[:, None])[inv], (ma / cnt[:, None])[inv]
    if eps:
        t_row = (1 - eps) * t_row + eps * b32.mean(0, keepdim=True)
        t_col = (1 - eps) * t_col + eps * a32.mean(0, keepdim=True)
    return t_row, t_col


def _clip_loss_fwd(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, labels: Optional[torch.Tensor],
                   label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [] fp32, row_lse [N], col_lse [N]). The bias cancels in the loss (targets sum to one)."""
    row_lse, col_lse = _kernel("contrastive_lse", a.device)(a, b, scale)
    dt = row_lse.dtype
    if labels is None and not label_smoothing:  # the common case: no [N, D] copies in the compute dtype
        pos = _rowdot(a, b, dt).sum()
    else:
        t_row, _ = _targets(a.to(dt), b.to(dt), labels, label_smoothing)
        pos = _rowdot(a.to(dt), t_row).sum()
    N = a.shape[0]
    pos = pos * scale.to(dt)[0]
    loss = (row_lse.sum() + col_lse.sum()) / (2 * N) - pos / N
    return loss.float(), row_lse, col_lse


clip_loss_op = torch.library.custom_op("vlops::clip_loss", _clip_loss_fwd, mutates_args=())


@clip_loss_op.register_fake
def _(a, b, scale, labels, label_smoothing):
    dt = torch.float64 if a.dtype == torch.float64 else torch.float32
    return a.new_empty((), dtype=torch.float32), a.new_empty((a.shape[0],), dtype=dt), a.new_empty(
        (b.shape[0],), dtype=dt)


def _clip_loss_bwd(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                   row_lse: torch.Tensor, col_lse: torch.Tensor, labels: Optional[torch.Tensor],
                   label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N = a.shape[0]
    c = 0.5 / N
    dt = row_lse.dtype
    # centres u_i = a_i . t_row_i, v_j = b_j . t_col_j: dscale = c sum R (G - u) + c sum C (G - v),
    # since sum_j P_row_ij = 1 and c (sum u + sum v) = 2 c sum_i a_i . t_row_i (the target term)
    if labels is None and not label_smoothing:  # targets b and a themselves: no [N, D] copies
        t_row, t_col = b, a
        u = v = _rowdot(a, b, dt)
    else:
        a32, b32 = a.to(dt), b.to(dt)
        t_row, t_col = _targets(a32, b32, labels, label_smoothing)
        u, v = _rowdot(a32, t_row), _rowdot(b32, t_col)
    ka, kb, ks = _kernel("clip_bwd", a.device)(a, b, scale, row_lse, col_lse, c, c, u, v)
    gs = grad.to(dt) * scale.to(dt)
    da = ka.sub_(t_row, alpha=2 * c).mul_(gs)  # in place on the kernel's fresh outputs: no [N, D] temporaries
    db = kb.sub_(t_col, alpha=2 * c).mul_(gs)
    dscale = grad.to(dt) * ks
    return da.to(a.dtype), db.to(b.dtype), dscale.to(scale.dtype).reshape(scale.shape)


clip_loss_backward_op = torch.library.custom_op("vlops::clip_loss_backward", _clip_loss_bwd, mutates_args=())
_clip_loss_backward = direct_call(clip_loss_backward_op, _clip_loss_bwd)


@clip_loss_backward_op.register_fake
def _(grad, a, b, scale, row_lse, col_lse, labels, label_smoothing):
    return torch.empty_like(a), torch.empty_like(b), torch.empty_like(scale)


def _clip_setup(ctx, inputs, output):
    a, b, scale, labels, eps = inputs
    _, row_lse, col_lse = output
    ctx.save_for_backward(a, b, scale, row_lse, col_lse, labels)
    ctx.mark_non_differentiable(row_lse, col_lse)
    ctx.eps = eps


def _clip_backward(ctx, grad_loss, _g_row, _g_col):
    a, b, scale, row_lse, col_lse, labels = ctx.saved_tensors
    da, db, dscale = _clip_loss_backward(grad_loss, a, b, scale, row_lse, col_lse, labels, ctx.eps)
    return da, db, dscale, None, None


clip_loss_op.register_autograd(_clip_backward, setup_context=_clip_setup)
clip_loss = eager_autograd(clip_loss_op, _clip_setup, _clip_backward, _clip_loss_fwd)  # what vlops.clip_loss calls


# ------------------------------------------------------------------ SigLIP
def _siglip_loss_fwd(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                     negative_only: bool, with_grad: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [] fp32, ka, kb, ks, kbias). ``with_grad``: the loss and the kernel's gradient sums (``siglip_bwd``'s
    four outputs) from one pass over S (``siglip_fwd_bwd``); the backward only scales them by the incoming
    gradient (the loss is a scalar, and SigLIP's gradient needs no statistic of the whole matrix, unlike the
    CLIP loss's log-sum-exps). Without it, the loss alone and four empty [0] tensors."""
    if with_grad:
        s, ka, kb, ks, kbias = _kernel("siglip_fwd_bwd", a.device)(a, b, scale, bias, negative_only)
    else:
        s = _kernel("siglip_fwd", a.device)(a, b, scale, bias, negative_only)
        ka, kb, ks, kbias = (s.new_empty((0,)) for _ in range(4))
    return (s[0] / a.shape[0]).float(), ka, kb, ks, kbias


siglip_loss_op = torch.library.custom_op("vlops::siglip_loss", _siglip_loss_fwd, mutates_args=())


@siglip_loss_op.register_fake
def _(a, b, scale, bias, negative_only, with_grad):
    dt = _cdt(a)
    shapes = [a.shape, b.shape, (1,), (1,)] if with_grad else [(0,)] * 4
    return (a.new_empty((), dtype=torch.float32), *(a.new_empty(sh, dtype=dt) for sh in shapes))


def _siglip_scale(grad, N, a, b, scale, bias, ka, kb, ks, kbias, in_place: bool):
    """The four gradients from the kernel's sums and the incoming gradient of the loss (``loss = sum / N``);
    ``in_place``: ``ka`` / ``kb`` are not needed again and take the product (no [N, D] temporaries)."""
    dt = ka.dtype
    g = grad.to(dt) / N
    gs = g * scale.to(dt)
    da, db = (ka.mul_(gs), kb.mul_(gs)) if in_place else (ka * gs, kb * gs)
    return (da.to(a.dtype), db.to(b.dtype), (g * ks).to(scale.dtype).reshape(scale.shape),
            (g * kbias).to(bias.dtype).reshape(bias.shape))


def _siglip_loss_bwd(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor, negative_only: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ka, kb, ks, kbias = _kernel("siglip_bwd", a.device)(a, b, scale, bias, negative_only)
    return _siglip_scale(grad, a.shape[0], a, b, scale, bias, ka, kb, ks, kbias, True)


siglip_loss_backward_op = torch.library.custom_op("vlops::siglip_loss_backward", _siglip_loss_bwd, mutates_args=())
_siglip_loss_backward = direct_call(siglip_loss_backward_op, _siglip_loss_bwd)


@siglip_loss_backward_op.register_fake
def _(grad, a, b, scale, bias, negative_only):
    return torch.empty_like(a), torch.empty_like(b), torch.empty_like(scale), torch.empty_like(bias)


def _siglip_setup(ctx, inputs, output, stash: bool = False):
    """Saves what the backward needs. The forward's gradient sums (``with_grad``) are saved tensors, or with
    ``stash`` (the eager path) kept on ``ctx`` for one backward, which scales them in place and drops them: the
    backward then allocates no [N, D] products beside them. A second backward of a retained graph recomputes."""
    a, b, scale, bias, negative_only, with_grad = inputs
    _, ka, kb, ks, kbias = output
    ctx.mark_non_differentiable(ka, kb, ks, kbias)
    ctx.set_materialize_grads(False)  # no zero-filled [N, D] "gradients" of the sums in the backward
    sums = (ka, kb, ks, kbias) if with_grad else ()
    ctx.save_for_backward(a, b, scale, bias, *(() if stash else sums))
    ctx.sums = sums if stash else ()
    ctx.negative_only = negative_only


def _siglip_backward(ctx, grad, *_unused):
    if grad is None:  # the loss got no gradient (grads are not materialised); the sums are not differentiable
        return (None,) * 6
    a, b, scale, bias, *saved = ctx.saved_tensors
    stashed, ctx.sums = ctx.sums, ()
    if not torch.is_grad_enabled() and (stashed or saved):  # the forward's sums
        return (*_siglip_scale(grad, a.shape[0], a, b, scale, bias, *(stashed or saved), bool(stashed)), None, None)
    # no sums left, or a backward that builds a graph (create_graph=True): the backward op, as before
    da, db, dscale, dbias = _siglip_loss_backward(grad, a, b, scale, bias, ctx.negative_only)
    return da, db, dscale, dbias, None, None


siglip_loss_op.register_autograd(_siglip_backward, setup_context=_siglip_setup)
siglip_loss = eager_autograd(siglip_loss_op, functools.partial(_siglip_setup, stash=True), _siglip_backward,
                             _siglip_loss_fwd)  # what vlops.siglip_loss calls


# ------------------------------------------------------------------ zero-shot
@functools.lru_cache(maxsize=None)
def _chunk_rows(K: int) -> int:
    return max(1, min(4096, (1 << 24) // max(K, 1)))  # at most 16M logits live at a time


def zero_shot(image_features, class_embeddings, logit_scale, k):
    """Row chunks: the [N, K] probabilities only when asked for; with k, O(chunk x K) memory."""
    N = image_features.shape[0]
    step = _chunk_rows(class_embeddings.shape[0])
    cdt = _cdt(image_features)
    cls = class_embeddings.to(cdt)
    s = logit_scale.to(cdt)
    outs = []
    for i in range(0, N, step):
        p = torch.softmax(s * (image_features[i:i + step].to(cdt) @ cls.T), dim=-1)
        outs.append(p if k is None else torch.topk(p, k, dim=-1))
    if k is None:
        return torch.cat(outs).to(image_features.dtype)
    return torch.cat([v for v, _ in outs]).to(image_features.dtype), torch.cat([i for _, i in outs])
