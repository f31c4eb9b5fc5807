"""Contrastive losses across processes (``torch.distributed``): every rank runs the fused tiled kernels on
its share of the global batch, and no rank ever holds a logits matrix.

:func:`clip_loss` and :func:`siglip_loss` take open_clip's distributed options with open_clip's semantics
(``open_clip.loss.ClipLoss`` / ``SigLipLoss`` with ``rank`` and ``world_size``), plus a process ``group``:

- CLIP, ``local_loss=False``: every rank gathers the image and text features of all ranks and computes the
  loss of the whole global batch (the same value on every rank). ``local_loss=True``: rank ``r``'s loss is
  the image-to-text cross-entropy of its own images over all texts plus the text-to-image one of its own
  texts over all images. With ``gather_with_grad=True`` (the exact gradient) only the texts are gathered and
  each rank computes the tiles of its own images against all texts once per pass (the column statistics of
  its texts come from every rank's tiles through one O(N) all_reduce); ``ring=True`` computes the same loss
  with the texts travelling between neighbours instead of gathered (O(n D) features per rank, each transfer
  overlapping the tiles of the previous block). ``gather_with_grad=False``: only a rank's own features get
  gradients, through its own rows (open_clip's default: the rows of its images over the gathered texts and of
  its texts over the gathered images; this gradient is not the global one, nor is that of
  ``local_loss=False`` without gather_with_grad, which is the global one divided by the world size after DDP's
  averaging).
- SigLIP, every ``dist_impl`` (``"bidir"``, ``"shift"``, ``"reduce"``, ``"gather"``): rank ``r`` computes
  the sigmoid loss of its own images against the texts of every rank (its own with the positive diagonal,
  the others' as negatives only), the texts travelling between ranks with their gradients; the four
  differ only in how the texts travel (neighbour exchanges in both directions, neighbour exchanges in one,
  ``all_reduce`` broadcasts, one ``all_gather``).

**Exactness.** With ``local_loss=True, gather_with_grad=True`` (CLIP) and for every SigLIP ``dist_impl``,
the mean over ranks of the rank losses is the loss of one process on the concatenated global batch, and
each rank's feature gradients are those of the sum of all rank losses: after DDP averages the parameters'
gradients over ranks they equal the single-process gradients of the global loss exactly, and so do the
``logit_scale`` / ``logit_bias`` gradients (DDP's mean over ranks is the global one, no factor of the world
size). The same holds for ``local_loss=False, gather_with_grad=True``. Each rank's own ``logit_scale``
gradient is that of its own loss, as in open_clip, except for the CLIP ``local_loss=True,
gather_with_grad=True`` paths (gathered and ring): there each rank gets the scale terms of the tiles it
computed (the rows of its images and their share of every text's columns), which differ rank by rank from
open_clip's split but have the same sum over ranks.

**Unequal batches.** Local batch sizes may differ between ranks (the last batch of an epoch): the features
are padded for the collectives and the padding dropped. Each rank's loss is then weighted by ``W n_r / N``
(1 when every rank has ``n_r = N / W`` rows, open_clip's case), so that the mean over ranks stays the
global loss. A rank whose arguments are invalid (wrong shape, dtype, feature size differing from the other
ranks', empty batch) makes every rank raise the same ValueError naming that rank: no rank is left waiting
in a collective.

The image-text pairs of rank ``r`` are rows ``offset_r .. offset_r + n_r`` of the global batch, ranks in
order. Gradients of the features and of ``logit_scale`` / ``logit_bias`` are computed in the input dtype
as in the single-process ops (fp32 accumulation). These functions run eagerly (collectives and
``torch.compile`` are not combined here); the single-process ops underneath are the usual custom ops.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from . import _validate as _V
from . import contrastive as _F
from .ops import contrastive as _op

__all__ = ["clip_loss", "siglip_loss", "group_info"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------ process group and metadata
def group_info(group=None) -> tuple[object, int, int]:
    """``(group, rank, world_size)`` of ``group`` (default: the default process group). Raises RuntimeError
    when torch.distributed is not available or no process group is initialised."""
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    if not dist.is_initialized():
        raise RuntimeError("the distributed losses need an initialised process group: call "
                           "torch.distributed.init_process_group first (or use world_size=1)")
    if group is None:
        group = dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return group, rank, dist.get_world_size(group)


def _comm_device(group, t=None) -> torch.device:
    """Where the small tensors of a collective go: the CPU, except under NCCL (CUDA tensors only): ``t``'s
    device when ``t`` is a CUDA tensor, else the current CUDA device."""
    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    if isinstance(t, torch.Tensor) and t.is_cuda:
        return t.device
    return torch.device("cuda", torch.cuda.current_device())


def _exchange(group, world: int, check, device: torch.device) -> tuple[list[int], int]:
    """Runs ``check()`` (the local argument checks, returning ``(n, D, dtype)``) on every rank and shares the
    outcome in one ``all_gather``: returns (the row counts of all ranks, D), or raises on every rank when any
    rank's check failed or the ranks disagree on D or dtype."""
    err: Optional[BaseException] = None
    n = d = code = 0
    try:
        n, d, dt = check()
        code = _DTYPES.index(dt)
    except Exception as e:  # noqa: BLE001 - whatever a rank's checks raise, every rank must hear of it
        err = e
    meta = torch.tensor([0 if err is None else 1, n, d, code], dtype=torch.int64, device=device)
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta, group=group)
    rows = [m.tolist() for m in metas]
    bad = [r for r, m in enumerate(rows) if m[0]]
    if bad:  # every rank learns the messages of the failing ranks, then every rank raises
        msgs = [None] * world
        dist.all_gather_object(msgs, None if err is None else f"{type(err).__name__}: {err}", group=group)
        if err is not None:  # a failing rank raises its own error; the others name the failing ranks
            raise err
        raise ValueError("invalid arguments on rank(s) " + ", ".join(f"{r} ({msgs[r]})" for r in bad))
    if len({m[2] for m in rows}) > 1:
        raise ValueError("the feature dimension D differs between ranks: "
                         + ", ".join(f"rank {r}: {m[2]}" for r, m in enumerate(rows)))
    if len({m[3] for m in rows}) > 1:
        raise ValueError("the feature dtype differs between ranks: "
                         + ", ".join(f"rank {r}: {_DTYPES[m[3]]}" for r, m in enumerate(rows)))
    return [m[1] for m in rows], rows[0][2]


# ------------------------------------------------------------------ collectives with autograd
# gather into one tensor: all_gather_single where torch has it (all_gather_into_tensor is deprecated there)
_ALL_GATHER_INTO = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _gather_rows(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """[sum(sizes), D]: the rows of every rank, ranks in order (padded to max(sizes) for all_gather)."""
    top = max(sizes)
    xp = x if x.shape[0] == top else torch.cat([x, x.new_zeros(top - x.shape[0], x.shape[1])])
    out = x.new_empty(top * len(sizes), x.shape[1])
    _ALL_GATHER_INTO(out, xp.contiguous(), group=group)  # no list of parts, no concatenation
    if all(n == top for n in sizes):
        return out
    return torch.cat([out[r * top:r * top + n] for r, n in enumerate(sizes)])


class _AllGatherRows(torch.autograd.Function):
    """Gather with gradient: the backward sums the gradient of every rank's gathered copy (all_reduce) and
    keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        off = sum(ctx.sizes[:ctx.rank])
        # a copy of this rank's rows, so that the [N, D] sum is freed (a view would keep it alive in x.grad)
        return g[off:off + ctx.sizes[ctx.rank]].clone(), None, None, None


def _gather(x, sizes, rank, group, with_grad: bool, keep_local: bool) -> torch.Tensor:
    """open_clip's ``gather_features`` for one tensor: with gradient, or without (the other ranks' rows
    detached; with ``keep_local`` this rank's rows are ``x`` itself, so its gradient flows through them)."""
    if with_grad:
        return _AllGatherRows.apply(x, sizes, rank, group)
    with torch.no_grad():
        full = _gather_rows(x, sizes, group)
    if not keep_local:
        return full
    off = sum(sizes[:rank])
    return torch.cat([full[:off], x, full[off + sizes[rank]:]])


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.contiguous().clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def _post(sends, recvs, group) -> list:
    """Posts every send ``(tensor, group rank)`` and receive ``(buffer, group rank)`` together; returns the
    requests (wait on them before touching the buffers)."""
    glob = lambda r: dist.get_global_rank(group, r)  # noqa: E731
    ops = [dist.P2POp(dist.isend, t.contiguous(), glob(p), group) for t, p in sends]
    ops += [dist.P2POp(dist.irecv, t, glob(p), group) for t, p in recvs]
    return dist.batch_isend_irecv(ops) if ops else []


def _p2p(sends, recvs, group):
    """:func:`_post`, then wait."""
    for req in _post(sends, recvs, group):
        req.wait()


class _Exchange(torch.autograd.Function):
    """Neighbour exchange with gradient: sends ``xs[k]`` to group rank ``to[k]`` and returns what arrives from
    ``frm[k]`` (``rows[k]`` rows each), all posted together; the backward sends each received tensor's gradient
    back to its sender and receives the gradients of ``xs`` from their receivers. Every rank must run the
    backward (as with any collective that carries gradients)."""

    @staticmethod
    def forward(ctx, to, frm, rows, group, *xs):
        ctx.to, ctx.frm, ctx.group, ctx.shapes = to, frm, group, [x.shape for x in xs]
        out = tuple(xs[0].new_empty(n, xs[0].shape[1]) for n in rows)
        _p2p(list(zip(xs, to)), list(zip(out, frm)), group)
        return out

    @staticmethod
    def backward(ctx, *grads):
        back = [grads[0].new_empty(sh) for sh in ctx.shapes]
        _p2p(list(zip(grads, ctx.frm)), list(zip(back, ctx.to)), ctx.group)
        return (None, None, None, None, *back)


# ------------------------------------------------------------------ CLIP rows of a rectangular block
class _RowsCE(torch.autograd.Function):
    """``sum_i [log sum_j exp(s a_i . b_j) - s a_i . t_i]`` for a [n, D] against b [m, D] with target vectors
    t [n, D] (the positive text of each image, or its smoothed mix): one side of open_clip's ``local_loss``
    rows (used without gather_with_grad, or with label smoothing), tiled by the contrastive kernels
    (``contrastive_lse`` and ``clip_bwd`` with the column coefficient 0), in the kernels' accumulation dtype."""

    @staticmethod
    def forward(ctx, a, b, scale, t):
        row_lse, col_lse = _op._kernel("contrastive_lse", a.device)(a, b, scale)
        dt = row_lse.dtype
        u = _op._rowdot(a, t, dt)  # the target dots: the centres of the scale gradient
        ctx.save_for_backward(a, b, scale, t, row_lse, col_lse, u)
        return row_lse.sum() - scale.to(dt)[0] * u.sum()

    @staticmethod
    def backward(ctx, g):
        a, b, scale, t, row_lse, col_lse, u = ctx.saved_tensors
        dt = row_lse.dtype
        ka, kb, ks = _op._kernel("clip_bwd", a.device)(a, b, scale, row_lse, col_lse, 1.0, 0.0, u,
                                                         torch.zeros_like(col_lse))
        g = g.to(dt)
        gs = g * scale.to(dt)
        da = ka.sub_(t.to(dt)).mul_(gs)
        dtg = a.to(dt) * (-gs)
        return (da.to(a.dtype), kb.mul_(gs).to(b.dtype), (g * ks).to(scale.dtype).reshape(scale.shape),
                dtg.to(t.dtype))


# ------------------------------------------------------------------ CLIP on a ring
class _RingClip(torch.autograd.Function):
    """The CLIP loss of ``local_loss=True, gather_with_grad=True`` with the texts travelling round the ring
    instead of being gathered: a rank holds its own features, one or two text blocks of another rank and
    O(n) statistics, never the global batch.

    Forward, W steps: rank r computes the block of its images against the text block it holds (its own
    first, then those of r - 1, r - 2, ...) with ``contrastive_lse``; the row log-sum-exps of its images
    accumulate locally, the column ones travel with the text block; the next block's transfer runs while the
    current one is computed. After W steps each text block's column statistics are complete and go home.
    Backward, the same ring: each block's ``clip_bwd`` (the row coefficient from its image owner's incoming
    gradient, the column one from its text owner's) adds to the local image gradient and to the travelling
    gradient of the text block, which goes home at the end. Work per rank: the ``n x N`` tiles of its
    images, once forward and once backward, as :class:`_GatheredClip` (which holds all the texts instead)."""

    @staticmethod
    def forward(ctx, a, b, scale, sizes, rank, world, group):
        lse = _op._kernel("contrastive_lse", a.device)
        N, n = sum(sizes), sizes[rank]
        right, left = (rank + 1) % world, (rank - 1) % world
        row = None
        t, col = b, None
        for step in range(world):
            nxt = (rank - step - 1) % world  # the owner of the block that arrives next
            reqs, t_next = [], None
            if step < world - 1:  # the next text block travels while this one is computed
                t_next = t.new_empty(sizes[nxt], t.shape[1])
                reqs = _post([(t, right)], [(t_next, left)], group)
            r_lse, c_lse = lse(a, t, scale)
            row = r_lse if row is None else torch.logaddexp(row, r_lse)
            col = c_lse if col is None else torch.logaddexp(col, c_lse)
            for q in reqs:
                q.wait()
            # the column statistics follow their block (after the last step: home, to the block's owner)
            col_in = col.new_empty(sizes[nxt if step < world - 1 else rank])
            _p2p([(col, right)], [(col_in, left)], group)
            col = col_in
            if t_next is not None:
                t = t_next
        u = _op._rowdot(a, b, row.dtype)  # the positive dots a_i . b_i
        ctx.save_for_backward(a, b, scale, row, col, u)
        ctx.sizes, ctx.rank, ctx.world, ctx.group, ctx.w = sizes, rank, world, group, world / (2.0 * N)
        return _local_value(row, col, u, scale, ctx.w)

    @staticmethod
    def backward(ctx, g):
        a, b, scale, row, col, u = ctx.saved_tensors
        sizes, rank, world, group = ctx.sizes, ctx.rank, ctx.world, ctx.group
        bwd = _op._kernel("clip_bwd", a.device)
        right, left = (rank + 1) % world, (rank - 1) % world
        # every rank's incoming gradient: the row terms of a block are its image owner's loss, the column
        # terms its text owner's
        coef = _coefficients(g, ctx.w, world, group)
        da = torch.zeros(a.shape, dtype=row.dtype, device=a.device)
        dt_acc = torch.zeros(b.shape, dtype=row.dtype, device=b.device)  # the gradient of the held text block
        ds = None
        t, t_col, t_u = b, col, u
        for step in range(world):
            q = (rank - step) % world  # the owner of the text block held now
            nxt = (rank - step - 1) % world
            reqs, nb = [], None
            if step < world - 1:
                nb = (t.new_empty(sizes[nxt], t.shape[1]), t_col.new_empty(sizes[nxt]), t_u.new_empty(sizes[nxt]))
                reqs = _post([(t, right), (t_col, right), (t_u, right)], [(x, left) for x in nb], group)
            ds = _tiles_bwd(bwd, a, t, scale, row, t_col, coef[rank], coef[q], u, t_u, da, dt_acc, ds)
            for r_ in reqs:
                r_.wait()
            acc_in = dt_acc.new_empty(sizes[nxt if step < world - 1 else rank], dt_acc.shape[1])
            _p2p([(dt_acc, right)], [(acc_in, left)], group)  # the text gradient follows its block (home at the end)
            dt_acc = acc_in
            if nb is not None:
                t, t_col, t_u = nb
        da, db = _finish(da, dt_acc, a, b, scale, coef[rank])
        return da.to(a.dtype), db.to(b.dtype), ds.to(scale.dtype).reshape(scale.shape), None, None, None, None


_TILE_ROWS = 2048  # rows of a and of T per clip_bwd call in the distributed backwards (see _tiles_bwd)


def _tiles_bwd(bwd, a, T, scale, row, colT, c_row, c_col, u, vT, da, dT, ds):
    """``clip_bwd`` of the block ``a`` [n, D] x ``T`` [m, D] in row x column pieces of at most ``_TILE_ROWS``,
    adding each piece's sums into ``da`` [n, D] and ``dT`` [m, D] (fp32, in place) and its scale sum into
    ``ds`` (None: the first); returns ``ds``.
    Pieces keep the kernel's fresh outputs to a fraction of the accumulators (each call allocates its two
    gradient sums), at the same tiles and work; the scale sum stays exact piecewise, since the centres ``u`` /
    ``vT`` enter with each piece's share of the softmax weights."""
    n, m = a.shape[0], T.shape[0]
    for i in range(0, n, _TILE_ROWS):
        ri = slice(i, min(n, i + _TILE_ROWS))
        for j in range(0, m, _TILE_ROWS):
            cj = slice(j, min(m, j + _TILE_ROWS))
            ka, kb, k = bwd(a[ri], T[cj], scale, row[ri], colT[cj], c_row, c_col, u[ri], vT[cj])
            da[ri] += ka
            dT[cj] += kb
            ds = k if ds is None else ds.add_(k)
            del ka, kb
    return ds


def _coefficients(g, w: float, world: int, group) -> list[float]:
    """``w`` times the incoming gradient of every rank's loss (one all_gather of a scalar): the coefficient of
    the row terms of a tile is its image owner's, that of the column terms its text owner's."""
    dev = _comm_device(group, g)
    gs = [torch.zeros(1, dtype=torch.float64, device=dev) for _ in range(world)]
    dist.all_gather(gs, g.detach().to(device=dev, dtype=torch.float64).reshape(1), group=group)
    return [float(x.item()) * w for x in gs]


def _local_value(row, col, u, scale, w):
    """A rank's local_loss value: ``w (sum of its images' row log-sum-exps + sum of its texts' column ones
    - 2 s sum of its positive dots)``, float32."""
    return ((row.sum() + col.sum() - 2 * scale.to(row.dtype)[0] * u.sum()) * w).float()


def _finish(ka, kb, a, b, scale, c):
    """The feature gradients of a rank's own pairs from the accumulated tile sums ``ka`` (its images) and ``kb``
    (its texts): times the scale, minus the positive term ``-2 w s sum_i a_i . b_i`` (``c`` = w times this rank's
    incoming gradient), in place (no [n, D] temporaries)."""
    s = scale.to(ka.dtype)
    pos = 2 * c * s
    return ka.mul_(s).addcmul_(b, pos, value=-1.0), kb.mul_(s).addcmul_(a, pos, value=-1.0)


def _lse_all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """log sum over ranks of exp(x), elementwise (two all_reduces: the max, then the sum of the shifted exps)."""
    m = x.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x - m)
    dist.all_reduce(e, group=group)
    return m + torch.log(e)


class _GatheredClip(torch.autograd.Function):
    """The CLIP loss of ``local_loss=True, gather_with_grad=True`` from the gathered texts: rank r computes the
    ``n x N`` tiles of its images against all N texts once per pass (the images are not gathered).

    Forward: the texts are gathered (padded ``all_gather`` into one [N, D] buffer); ``contrastive_lse`` gives
    the row log-sum-exps of its images and its images' share of every text's column log-sum-exp, which one
    log-sum-exp all_reduce (O(N) floats) completes; the positive dots of all pairs are gathered (O(N) floats).
    Backward: ``clip_bwd`` per text owner (the column coefficient is the owner's incoming gradient) gives the
    complete gradient of its images and its images' share of every text's gradient [N, D]; one all_reduce of
    that buffer, in place, sums the shares and each rank keeps its own texts' rows. The gathered texts are
    dropped before that all_reduce: at most two [N, D] buffers live at once."""

    @staticmethod
    def forward(ctx, a, b, scale, sizes, rank, world, group):
        B = _gather_rows(b, sizes, group)
        row, colpart = _op._kernel("contrastive_lse", a.device)(a, B, scale)
        col = _lse_all_reduce(colpart, group)
        u = _op._rowdot(a, b, row.dtype)
        U = _gather_rows(u[:, None], sizes, group)[:, 0]  # the positive dot of every pair: the column centres
        off, n = sum(sizes[:rank]), sizes[rank]
        ctx.save_for_backward(a, b, scale, row, col, U)
        ctx.B = B  # internal, never handed out: kept on ctx so that the backward can free it early
        ctx.sizes, ctx.rank, ctx.world, ctx.group, ctx.w = sizes, rank, world, group, world / (2.0 * sum(sizes))
        return _local_value(row, col[off:off + n], u, scale, ctx.w)

    @staticmethod
    def backward(ctx, g):
        a, b, scale, row, col, U = ctx.saved_tensors
        sizes, rank, world, group = ctx.sizes, ctx.rank, ctx.world, ctx.group
        B, ctx.B = ctx.B, None
        if B is None:  # a second backward of a retained graph: gather the texts again
            B = _gather_rows(b, sizes, group)
        bwd = _op._kernel("clip_bwd", a.device)
        coef = _coefficients(g, ctx.w, world, group)
        off, n = sum(sizes[:rank]), sizes[rank]
        u = U[off:off + n]
        dB = torch.zeros(B.shape, dtype=row.dtype, device=B.device)
        da = torch.zeros(a.shape, dtype=row.dtype, device=a.device)
        ds = None
        start = 0
        for q, m in enumerate(sizes):  # per text owner: its column coefficient
            seg = slice(start, start + m)
            ds = _tiles_bwd(bwd, a, B[seg], scale, row, col[seg], coef[rank], coef[q], u, U[seg], da, dB[seg], ds)
            start += m
        del B
        dist.all_reduce(dB, group=group)  # every rank's share of every text's gradient
        da, db = _finish(da, dB[off:off + n].clone(), a, b, scale, coef[rank])
        del dB
        return da.to(a.dtype), db.to(b.dtype), ds.to(scale.dtype).reshape(scale.shape), None, None, None, None


# ------------------------------------------------------------------ the losses
def _prepare(image_features, text_features, logit_scale, logit_bias, group, extra=None):
    """Checks the arguments on every rank at once (see :func:`_exchange`); returns (a, b, scale, bias or None,
    sizes, rank, world, group, extra's result)."""
    group, rank, world = group_info(group)
    got = {}

    def check():
        a, b = _F._features(image_features, text_features)
        got["scale"] = _F._scalar(logit_scale, "logit_scale", a)
        got["bias"] = None if logit_bias is None else _F._scalar(logit_bias, "logit_bias", a)
        got["extra"] = extra() if extra is not None else None
        got["a"], got["b"] = a, b
        return a.shape[0], a.shape[1], a.dtype

    sizes, _ = _exchange(group, world, check, _comm_device(group, image_features))
    return got["a"], got["b"], got["scale"], got["bias"], sizes, rank, world, group, got["extra"]


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias=None, *,
              local_loss: bool = False, gather_with_grad: bool = False, label_smoothing: float = 0.0,
              ring: bool = False, group=None) -> torch.Tensor:
    """CLIP / ALIGN loss over the global batch of all ranks of ``group`` (open_clip ``ClipLoss`` with
    ``world_size > 1``), fused and tiled on every rank.

    Args:
        image_features, text_features: this rank's [n, D] pairs (n may differ between ranks; D and dtype may
            not).
        logit_scale, logit_bias: as :func:`vlops.clip_loss` (the bias cancels: zero gradient).
        local_loss: False: the loss of the whole global batch on every rank (N x N work per rank); True: this
            rank's rows and columns only (its images over all texts, its texts over all images).
        gather_with_grad: gradients flow through the gathered features back to the ranks that own them.
        label_smoothing: as :func:`vlops.clip_loss`, over the global batch's N classes.
        ring: compute the ``local_loss=True, gather_with_grad=True`` loss (pass both) with the texts travelling
            between neighbours (each transfer overlapping the previous block's tiles) instead of gathered: a
            rank holds O(n D) features at a time instead of O(N D), forward and backward, and computes each
            of its n x N tiles once per pass. The same loss and feature gradients; ``logit_scale``'s gradient
            is split differently between the ranks (each rank gets the scale terms of the tiles it computed),
            with the same sum, so DDP's mean is the same exact global gradient. No label smoothing.
        group: the process group (default: the default group).

    Returns:
        This rank's loss, float32 0-d (see the module docstring for what it is and what its gradient is).
        Every rank of the group must call this (and run the backward) with the same options.
    """
    def options():
        opts = (_V.boolean(local_loss, "local_loss"), _V.boolean(gather_with_grad, "gather_with_grad"),
                _V.real(label_smoothing, "label_smoothing", lo=0.0, hi=1.0), _V.boolean(ring, "ring"))
        if ring and not (local_loss and gather_with_grad):
            raise ValueError("ring=True computes the loss of local_loss=True, gather_with_grad=True: pass both")
        if ring and label_smoothing:
            raise ValueError("label_smoothing is not supported with ring=True (use the gathered local_loss path)")
        return opts

    a, b, scale, bias, sizes, rank, world, group, (local, with_grad, eps, on_ring) = _prepare(
        image_features, text_features, logit_scale, logit_bias, group, options)
    if on_ring and world > 1:
        loss = _RingClip.apply(a, b, scale, sizes, rank, world, group)
    elif not local:
        A = _gather(a, sizes, rank, group, with_grad, keep_local=True)
        B = _gather(b, sizes, rank, group, with_grad, keep_local=True)
        loss = _op.clip_loss(A, B, scale, None, eps)[0]
    elif with_grad and not eps:  # the exact local loss: each tile once, the images never gathered
        loss = _GatheredClip.apply(a, b, scale, sizes, rank, world, group)
    else:  # open_clip's rows: images over all texts and texts over all images (label smoothing: targets mixed)
        A = _gather(a, sizes, rank, group, with_grad, keep_local=False)
        B = _gather(b, sizes, rank, group, with_grad, keep_local=False)
        # the positives are this rank's own pairs: their rows of A / B are a and b themselves (with gradient:
        # what the gathered copy's gradient would bring home through the backward's sum; without: detached,
        # as the gathered rows are), and taking them from a / b spares the [N, D] gradient of a slice of A / B
        ta, tb = (a, b) if with_grad else (a.detach(), b.detach())
        if eps:  # cross-entropy label smoothing: the target mixes the positive and the mean over all N
            dt = _op._cdt(a)
            ta = (1 - eps) * ta.to(dt) + eps * A.to(dt).mean(0, keepdim=True)
            tb = (1 - eps) * tb.to(dt) + eps * B.to(dt).mean(0, keepdim=True)
        loss = (_RowsCE.apply(a, B, scale, tb) + _RowsCE.apply(b, A, scale, ta)) * (world / (2.0 * sum(sizes)))
        loss = loss.float()
    if bias is not None:
        loss = loss + 0.0 * bias.sum()  # the bias cancels; this keeps it in the graph (zero gradient)
    return loss


DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


class _SigBlock(torch.autograd.Function):
    """One block of the SigLIP loss, ``sum over a x t of softplus(-z (s a . t + bias)) / divisor`` (the positive
    diagonal unless ``negative_only``), on the single-process op's kernels and gradient scaling
    (``vlops.ops.contrastive``): with ``with_grad`` the loss and the kernel's gradient sums come from one pass,
    kept on ``ctx`` and scaled in place by the one backward (a second backward of a retained graph recomputes
    them). The divisor enters the backward in the compute dtype, not through the float32 loss, so that an
    unequal batch's weight ``W n / N`` (folded into the divisor ``N / W``) is not rounded to float32 in float64
    gradients."""

    @staticmethod
    def forward(ctx, a, t, scale, bias, negative_only, divisor, with_grad):
        sums = None
        if with_grad:
            s, *sums = _op._kernel("siglip_fwd_bwd", a.device)(a, t, scale, bias, negative_only)
        else:
            s = _op._kernel("siglip_fwd", a.device)(a, t, scale, bias, negative_only)
        ctx.save_for_backward(a, t, scale, bias)
        ctx.sums, ctx.negative_only, ctx.divisor = sums, negative_only, divisor
        return (s[0] / divisor).float()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        a, t, scale, bias = ctx.saved_tensors
        sums, ctx.sums = ctx.sums, None
        if sums is None:
            sums = _op._kernel("siglip_bwd", a.device)(a, t, scale, bias, ctx.negative_only)
        return (*_op._siglip_scale(g, ctx.divisor, a, t, scale, bias, *sums, True), None, None, None)


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias=None, *,
                dist_impl: str = "bidir", group=None) -> torch.Tensor:
    """SigLIP loss over the global batch of all ranks of ``group`` (open_clip ``SigLipLoss`` with
    ``world_size > 1``), fused and tiled on every rank: this rank's images against its own texts (positive
    diagonal) and against every other rank's texts (negatives), divided by its batch size (weighted by
    ``W n / N`` when batch sizes differ, see the module docstring).

    ``dist_impl``: how the texts travel: "bidir" (neighbour exchanges in both directions), "shift" (to the
    right neighbour, W - 1 steps), "reduce" (one all_reduce per rank), "gather" (one all_gather). Every one
    holds at most the texts of two ranks at a time except "gather" (all of them); all give the same loss and
    gradients. Every rank of the group must call this (and run the backward) with the same options.
    """
    impl = dist_impl
    a, b, scale, bias, sizes, rank, world, group, _ = _prepare(
        image_features, text_features, logit_scale, 0.0 if logit_bias is None else logit_bias, group,
        lambda: _V.choice(impl, "dist_impl", DIST_IMPLS))
    N, n, off = sum(sizes), sizes[rank], sum(sizes[:rank])

    with_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (a, b, scale, bias))
    divisor = N / world  # n on equal batches; the W n / N weight of unequal ones folded in

    def block(t, neg):
        return _SigBlock.apply(a, t, scale, bias, neg, divisor, with_grad)  # sum over the block / divisor

    loss = block(b, False)
    right, left = (rank + 1) % world, (rank - 1) % world
    if world == 1:
        return loss
    if impl == "gather":
        B = _gather(b, sizes, rank, group, True, keep_local=False)
        loss = loss + block(torch.cat([B[:off], B[off + n:]]), True)
    elif impl == "reduce":
        # every rank's input carries its gradient (b * 0 on the other ranks) and every output joins the loss,
        # so that every rank runs each all_reduce's backward, in the same order
        top = max(sizes)
        padded = b if top == n else torch.cat([b, b.new_zeros(top - n, b.shape[1])])
        for i in range(world):
            t = _AllReduceSum.apply(padded * float(i == rank), group)[:sizes[i]]
            loss = loss + (block(t, True) if i != rank else 0.0 * t.sum())
    elif impl == "shift":
        cur = b
        for i in range(1, world):
            (cur,) = _Exchange.apply((right,), (left,), (sizes[(rank - i) % world],), group, cur)
            loss = loss + block(cur, True)
    else:  # bidir: the texts from the left keep moving right, those from the right keep moving left
        to_left = to_right = b
        pairs, rem = divmod(world - 1, 2)
        for i in range(1, pairs + 1):
            from_left, from_right = _Exchange.apply(
                (right, left), (left, right), (sizes[(rank - i) % world], sizes[(rank + i) % world]), group,
                to_right, to_left)
            loss = loss + block(from_left, True) + block(from_right, True)
            to_right, to_left = from_left, from_right
        if rem:
            (from_left,) = _Exchange.apply((right,), (left,), (sizes[(rank - pairs - 1) % world],), group, to_right)
            loss = loss + block(from_left, True)
    return loss
