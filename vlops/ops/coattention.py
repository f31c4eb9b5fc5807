"""ViLBERT co-attention (both cross-attention directions in one op) as torch custom ops, and the kernel
contract every backend implements.

Kernel contract (forward; one function per backend: ``vlops._C.co_attention_fwd_cpu``,
``vlops.kernels.coattention.co_attention_fwd``, and the reference ``_ref_co_attention_fwd`` of this
module)::

    co_attention_fwd(tq, tk, tv, iq, ik, iv, t_len, i_len, t_mask, i_mask,
                     scale, mask_mode, dropout_p, seed) -> (t_out, i_out, t_lse, i_lse)

- ``tq, tk, tv`` [B, Nt, H, d] (the text stream's projected query, key, value), ``iq, ik, iv``
  [B, Nv, H, d] (the image stream's), one dtype (float32 / float16 / bfloat16; the CPU kernel and the
  reference also float64), one device. ANY strides with ``stride(-1) == 1`` (views of a fused QKV
  projection, e.g. ``qkv.view(B, N, 3, H, d)[:, :, 0]``): read in place through their four strides,
  never copied, never modified. ``B >= 1``, ``Nt, Nv >= 1``, ``H >= 1``, ``d >= 1`` (the op layer
  allows d in {16, 32, 64, 128} and, for 16-bit inputs, 256 on the Triton backend, and any d on the CPU /
  reference backends).
- Two directions, indexed ``dir``:

  - ``dir = 0`` (text): queries ``tq``, keys ``ik``, values ``iv``, the image stream's key padding
    (``i_len``, ``i_mask``); output ``t_out`` [B, Nt, H, d], ``t_lse`` [B, H, Nt].
  - ``dir = 1`` (image): queries ``iq``, keys ``tk``, values ``tv``, the text stream's key padding
    (``t_len``, ``t_mask``); output ``i_out`` [B, Nv, H, d], ``i_lse`` [B, H, Nv].

- Key validity, per stream: ``len`` is an int32 [B] contiguous tensor with values in [0, N] (always
  given: N for every image when there is no padding); ``mask`` is None or a bool [B, N] contiguous
  tensor (True = keep). Key ``j`` of batch ``b`` is valid iff ``j < len[b]`` and (``mask`` is None or
  ``mask[b, j]``). The op layer passes ``mask`` only when the user gave a boolean mask (then
  ``len = N``); lengths (right padding) are the fast path: kernels may stop at ``len[b]``.
- ``scale``: python float (the op layer resolves the default ``1 / sqrt(d)``).
- ``mask_mode``: python int.

  - ``0`` ("zero", the default): invalid keys get weight exactly 0. A query row with no valid key
    returns ``out = 0`` and ``lse = -inf`` (documented; no NaN).
  - ``1`` ("vilbert"): ViLBERT's extended additive mask: every key takes part, with score
    ``s_ij = scale * (q_i . k_j) + (0 if valid else -10000.0)``, computed in fp32 in that order
    (product, scale, then the bias). Partially masked rows equal mode 0 up to exp(-10000) = 0;
    a fully masked row is softmax over all keys (ViLBERT's uniform-shift behaviour). Such a row is
    ill-conditioned in fp32: scores near -10000 lie on a grid of 2**-10, so any fp32 implementation
    (ViLBERT's own included) is only about 1e-3 accurate there; the tests bound those rows accordingly.

- Math per (dir, b, h, query row i), in fp32 (float64 for float64 inputs), products of 16-bit
  operands exact in fp32::

      s_ij = scale * sum_c q[b, i, h, c] k[b, j, h, c]      (+ the mode-1 bias)
      lse_i = log(sum_{j counted} exp(s_ij))                 (natural log; over valid j in mode 0,
                                                              over all j in mode 1)
      p_ij = exp(s_ij - lse_i)                               (0 for invalid j in mode 0)
      p'_ij = p_ij * keep_ij / (1 - dropout_p)              (p'_ij = p_ij when dropout_p == 0)
      out[b, i, h, :] = sum_j p'_ij v[b, j, h, :]  rounded (nearest even) to the input dtype

- Dropout (``dropout_p`` in [0, 1), python float; ``seed`` python int in [0, 2**63), ignored when
  ``dropout_p == 0``): ``keep_ij = u >= dropout_p``, compared in float32 (``dropout_p`` rounded to
  float32 first), with
  ``u = uint32_to_uniform(x0)`` and ``x0`` the first output of
  ``philox4x32(c0=j, c1=i, c2=b * H + h, c3=dir, k0=seed & 0xffffffff, k1=seed >> 32)``
  (Philox4x32-10 and ``uint32_to_uniform`` exactly as in :mod:`vlops.reference.diffusion`: one Philox
  call per (query, key) pair, the other three outputs unused). Every backend draws the same mask, bit
  for bit. ``lse`` is that of the softmax before dropout.
- Returns ``t_out`` [B, Nt, H, d] and ``i_out`` [B, Nv, H, d] contiguous in the input dtype, every
  element written (also padded query rows: only keys are masked); ``t_lse`` [B, H, Nt] and ``i_lse``
  [B, H, Nv] contiguous float32 (float64 for float64 inputs).

Kernel contract (backward; ``vlops._C.co_attention_bwd_cpu``, ``vlops.kernels.coattention.co_attention_bwd``,
the reference ``_ref_co_attention_bwd``)::

    co_attention_bwd(t_dout, i_dout, tq, tk, tv, iq, ik, iv, t_out, i_out, t_lse, i_lse,
                     t_len, i_len, t_mask, i_mask, scale, mask_mode, dropout_p, seed)
        -> (d_tq, d_tk, d_tv, d_iq, d_ik, d_iv)

- The forward's arguments (same rules), its outputs ``t_out, i_out, t_lse, i_lse``, and ``t_dout``
  [B, Nt, H, d], ``i_dout`` [B, Nv, H, d] contiguous in the input dtype.
- Returns the six gradients, contiguous [B, N, H, d] in the input dtype (fp32 accumulation). Each
  belongs to one direction: d_tq, d_ik, d_iv to dir 0; d_iq, d_tk, d_tv to dir 1.
- Math per direction (``Z_ij = keep_ij / (1 - dropout_p)``, 1 without dropout; p from the saved lse)::

      D_i   = sum_c dout[i, c] out[i, c]          (out as returned, in fp32)
      dv_j  = sum_i p_ij Z_ij dout_i
      dp_ij = Z_ij (dout_i . v_j)
      ds_ij = p_ij (dp_ij - D_i)
      dq_i  = scale sum_j ds_ij k_j ;  dk_j = scale sum_i ds_ij q_i

  Invalid keys (mode 0) get dk = dv = 0; a query row with no valid key (mode 0, lse = -inf) gets
  dq = 0. Sums in a fixed order (the same result on every run on one machine).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backends
from . import direct_call, eager_autograd
from ..reference.coattention import check_lengths_range, dropout_keep

OP = "co_attention"
#: head dims the Triton kernels are built for (the CPU kernel and the reference take any d)
TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)


def _cdt(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------ reference

def _valid(length: torch.Tensor, mask: Optional[torch.Tensor], N: int) -> torch.Tensor:
    """[B, N] bool: ``j < len[b]`` and ``mask[b, j]``."""
    valid = torch.arange(N, device=length.device)[None, :] < length.to(torch.int64)[:, None]
    return valid if mask is None else valid & mask


def _probs(q, k, length, mask, scale, mode, lse=None):
    """(p [B, H, Nq, Nk], lse [B, H, Nq]) of one direction in the compute dtype; q, k [B, H, N, d] in the
    compute dtype. With ``lse`` given (the backward) p is recomputed from it."""
    cdt = q.dtype
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # product, then scale
    vk = _valid(length, mask, k.shape[2])[:, None, None, :]
    if mode == 1:  # ViLBERT's additive mask, added after the scale
        s = s + torch.where(vk, torch.zeros((), dtype=cdt, device=s.device),
                            torch.full((), -10000.0, dtype=cdt, device=s.device))
    else:
        s = s.masked_fill(~vk, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)  # -inf for a row with no valid key (mode 0)
    lse_c = lse.to(cdt)
    finite = torch.isfinite(lse_c)
    p = torch.exp(s - torch.where(finite, lse_c, torch.zeros_like(lse_c))[..., None])  # 0 where s = -inf
    return p, lse


def _drop_scale(B, H, Nq, Nk, direction, seed, dropout_p, device, cdt) -> Optional[torch.Tensor]:
    """Z = keep / (1 - p) [B, H, Nq, Nk] in the compute dtype, None without dropout."""
    if dropout_p <= 0:
        return None
    keep = dropout_keep(B, H, Nq, Nk, direction, seed, dropout_p, device=device)
    return keep.to(cdt) * (1.0 / (1.0 - dropout_p))


def _fwd_direction(q, k, v, length, mask, scale, mode, dropout_p, seed, direction):
    cdt = _cdt(q)
    B, Nq, H, d = q.shape
    qh, kh, vh = (t.to(cdt).transpose(1, 2) for t in (q, k, v))
    p, lse = _probs(qh, kh, length, mask, scale, mode)
    z = _drop_scale(B, H, Nq, k.shape[1], direction, seed, dropout_p, q.device, cdt)
    if z is not None:
        p = p * z
    out = torch.matmul(p, vh).transpose(1, 2).to(q.dtype).contiguous()
    return out, lse.contiguous()


def _ref_co_attention_fwd(tq, tk, tv, iq, ik, iv, t_len, i_len, t_mask, i_mask, scale, mask_mode, dropout_p, seed):
    """The forward contract with torch ops (the ``reference`` backend): materialises the [B, H, Nq, Nk]
    scores of each direction."""
    t_out, t_lse = _fwd_direction(tq, ik, iv, i_len, i_mask, scale, mask_mode, dropout_p, seed, 0)
    i_out, i_lse = _fwd_direction(iq, tk, tv, t_len, t_mask, scale, mask_mode, dropout_p, seed, 1)
    return t_out, i_out, t_lse, i_lse


def _bwd_direction(dout, q, k, v, out, lse, length, mask, scale, mode, dropout_p, seed, direction):
    cdt = _cdt(q)
    B, Nq, H, d = q.shape
    qh, kh, vh, doh, oh = (t.to(cdt).transpose(1, 2) for t in (q, k, v, dout, out))
    p, _ = _probs(qh, kh, length, mask, scale, mode, lse=lse)
    z = _drop_scale(B, H, Nq, k.shape[1], direction, seed, dropout_p, q.device, cdt)
    D = (doh * oh).sum(-1, keepdim=True)  # [B, H, Nq, 1]
    dp = torch.matmul(doh, vh.transpose(-1, -2))
    pz = p if z is None else p * z
    if z is not None:
        dp = dp * z
    dv = torch.matmul(pz.transpose(-1, -2), doh)
    ds = p * (dp - D)
    dq = torch.matmul(ds, kh) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qh) * scale
    return tuple(t.transpose(1, 2).to(q.dtype).contiguous() for t in (dq, dk, dv))


def _ref_co_attention_bwd(t_dout, i_dout, tq, tk, tv, iq, ik, iv, t_out, i_out, t_lse, i_lse, t_len, i_len,
                          t_mask, i_mask, scale, mask_mode, dropout_p, seed):
    """The backward contract with torch ops (the ``reference`` backend, and the fallback of a backend with
    no backward kernel)."""
    d_tq, d_ik, d_iv = _bwd_direction(t_dout, tq, ik, iv, t_out, t_lse, i_len, i_mask, scale, mask_mode, dropout_p,
                                      seed, 0)
    d_iq, d_tk, d_tv = _bwd_direction(i_dout, iq, tk, tv, i_out, i_lse, t_len, t_mask, scale, mask_mode, dropout_p,
                                      seed, 1)
    return d_tq, d_tk, d_tv, d_iq, d_ik, d_iv


# ------------------------------------------------------------------------------------------------ dispatch

def _kernels(device: torch.device, d: int, dtype: torch.dtype):
    """(backend, forward kernel, backward kernel) for ``dtype`` tensors on ``device`` with head dim ``d``; the backward
    is the reference formulas where the backend has no backward kernel."""
    backend = _backends.resolve(OP, device)
    if backend == "reference":
        return backend, _ref_co_attention_fwd, _ref_co_attention_bwd
    if backend == "cpu":
        ext = _backends.extension()
        return backend, ext.co_attention_fwd_cpu, getattr(ext, "co_attention_bwd_cpu", None) or _ref_co_attention_bwd
    if d not in TRITON_HEAD_DIMS:
        raise ValueError(f"head dim d = {d} is not supported by the triton co-attention kernels (d must be one of "
                         f"{TRITON_HEAD_DIMS}); the cpu and reference backends take any d")
    if d == 256 and dtype == torch.float32:
        raise ValueError("head dim d = 256 in float32 does not fit the triton co-attention tiles in shared memory; "
                         "use bfloat16 / float16 inputs, or the reference backend")
    from vlops.kernels import coattention as k  # triton

    return backend, k.co_attention_fwd, getattr(k, "co_attention_bwd", None) or _ref_co_attention_bwd


def _lastdim(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when ``stride(-1) == 1`` (any other strides are read in place), else a copy."""
    if t.stride(-1) == 1:
        return t
    if t.shape[-1] == 1:  # the stride of a size-1 dim is never used: a view that says 1
        return t.as_strided(t.shape, (*t.stride()[:-1], 1))
    return t.contiguous()


def _len_or_full(length: Optional[torch.Tensor], B: int, N: int, device) -> torch.Tensor:
    """int32 [B] lengths on ``device``. Lengths on the CPU for a GPU are staged in pinned memory, so that
    the copy is queued on the stream without waiting for the device (a copy from pageable memory may)."""
    if length is None:
        return torch.full((B,), N, dtype=torch.int32, device=device)
    length = length.to(torch.int32)
    if length.device != device:
        if device.type == "cuda":
            length = length.pin_memory()
        return length.to(device, non_blocking=True)
    return length.contiguous()


def _no_lengths_in_capture(t_len, i_len, device) -> None:
    """ValueError when lengths are given inside a CUDA graph capture: lengths on the GPU are range-checked with a
    host read, which a capture cannot do, and lengths on the CPU are copied from a temporary host buffer that a
    replay would read again after it is reused. Boolean masks work in a capture."""
    if device.type == "cuda" and (t_len is not None or i_len is not None) and torch.cuda.is_current_stream_capturing():
        name = "text_lengths" if t_len is not None else "image_lengths"
        raise ValueError(f"{name}: lengths cannot be used inside a CUDA graph capture (range-checking device lengths "
                         f"reads them on the host; host lengths are copied from a temporary buffer); pass the key "
                         f"padding as boolean masks (text_mask / image_mask) instead")


def _mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if mask is None else mask.to(torch.bool).contiguous()


def _co_attention_fwd(tq: torch.Tensor, tk: torch.Tensor, tv: torch.Tensor, iq: torch.Tensor, ik: torch.Tensor,
                      iv: torch.Tensor, t_len: Optional[torch.Tensor], i_len: Optional[torch.Tensor],
                      t_mask: Optional[torch.Tensor], i_mask: Optional[torch.Tensor], scale: float, mask_mode: int,
                      dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t_out [B, Nt, H, d], i_out [B, Nv, H, d], t_lse [B, H, Nt], i_lse [B, H, Nv]): the forward contract of
    the module docstring. ``t_len`` / ``i_len`` None: no length limit (N); given ones are range-checked here
    (ValueError naming ``text_lengths`` / ``image_lengths``) before any kernel runs: on the host with no device
    synchronisation when they are on the CPU (they may be, whatever the inputs' device), else with one."""
    B, Nt, H, d = tq.shape
    Nv = iq.shape[1]
    _no_lengths_in_capture(t_len, i_len, tq.device)
    check_lengths_range(t_len, i_len, Nt, Nv)
    _, fwd, _ = _kernels(tq.device, d, tq.dtype)
    t_out, i_out, t_lse, i_lse = fwd(*(_lastdim(t) for t in (tq, tk, tv, iq, ik, iv)),
                                     _len_or_full(t_len, B, Nt, tq.device), _len_or_full(i_len, B, Nv, tq.device),
                                     _mask(t_mask), _mask(i_mask), float(scale), int(mask_mode), float(dropout_p),
                                     int(seed))
    return t_out, i_out, t_lse, i_lse


co_attention_op = torch.library.custom_op("vlops::co_attention", _co_attention_fwd, mutates_args=())


@co_attention_op.register_fake
def _(tq, tk, tv, iq, ik, iv, t_len, i_len, t_mask, i_mask, scale, mask_mode, dropout_p, seed):
    B, Nt, H, d = tq.shape
    Nv = iq.shape[1]
    ldt = _cdt(tq)
    return (tq.new_empty((B, Nt, H, d)), tq.new_empty((B, Nv, H, d)), tq.new_empty((B, H, Nt), dtype=ldt),
            tq.new_empty((B, H, Nv), dtype=ldt))


def _co_attention_bwd(t_dout: torch.Tensor, i_dout: torch.Tensor, tq: torch.Tensor, tk: torch.Tensor,
                      tv: torch.Tensor, iq: torch.Tensor, ik: torch.Tensor, iv: torch.Tensor,
                      t_out: torch.Tensor, i_out: torch.Tensor, t_lse: torch.Tensor, i_lse: torch.Tensor,
                      t_len: Optional[torch.Tensor], i_len: Optional[torch.Tensor],
                      t_mask: Optional[torch.Tensor], i_mask: Optional[torch.Tensor], scale: float,
                      mask_mode: int, dropout_p: float, seed: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                 torch.Tensor]:
    """(d_tq, d_tk, d_tv, d_iq, d_ik, d_iv), contiguous [B, N, H, d] in the input dtype: the backward contract
    of the module docstring."""
    B, Nt, H, d = tq.shape
    Nv = iq.shape[1]
    _no_lengths_in_capture(t_len, i_len, tq.device)
    _, _, bwd = _kernels(tq.device, d, tq.dtype)
    dt = tq.dtype
    grads = bwd(t_dout.to(dt).contiguous(), i_dout.to(dt).contiguous(),
                *(_lastdim(t) for t in (tq, tk, tv, iq, ik, iv)),
                t_out.contiguous(), i_out.contiguous(), t_lse.contiguous(), i_lse.contiguous(),
                _len_or_full(t_len, B, Nt, tq.device), _len_or_full(i_len, B, Nv, tq.device), _mask(t_mask),
                _mask(i_mask), float(scale), int(mask_mode), float(dropout_p), int(seed))
    return tuple(g.contiguous() for g in grads)


co_attention_backward_op = torch.library.custom_op("vlops::co_attention_backward", _co_attention_bwd,
                                                   mutates_args=())
_co_attention_backward = direct_call(co_attention_backward_op, _co_attention_bwd)


@co_attention_backward_op.register_fake
def _(t_dout, i_dout, tq, tk, tv, iq, ik, iv, t_out, i_out, t_lse, i_lse, t_len, i_len, t_mask, i_mask, scale,
      mask_mode, dropout_p, seed):
    return tuple(t.new_empty(t.shape) for t in (tq, tk, tv, iq, ik, iv))


def _setup(ctx, inputs, output):
    tq, tk, tv, iq, ik, iv, t_len, i_len, t_mask, i_mask, scale, mask_mode, dropout_p, seed = inputs
    t_out, i_out, t_lse, i_lse = output
    ctx.save_for_backward(tq, tk, tv, iq, ik, iv, t_out, i_out, t_lse, i_lse, t_len, i_len, t_mask, i_mask)
    ctx.args = (scale, mask_mode, dropout_p, seed)
    ctx.mark_non_differentiable(t_lse, i_lse)


def _backward(ctx, g_t, g_i, _g_tlse, _g_ilse):
    tq, tk, tv, iq, ik, iv, t_out, i_out, t_lse, i_lse, t_len, i_len, t_mask, i_mask = ctx.saved_tensors
    g_t = torch.zeros_like(t_out) if g_t is None else g_t
    g_i = torch.zeros_like(i_out) if g_i is None else g_i
    grads = _co_attention_backward(g_t, g_i, tq, tk, tv, iq, ik, iv, t_out, i_out, t_lse, i_lse, t_len, i_len,
                                   t_mask, i_mask, *ctx.args)
    return (*grads, None, None, None, None, None, None, None, None)


co_attention_op.register_autograd(_backward, setup_context=_setup)
co_attention = eager_autograd(co_attention_op, _setup, _backward, _co_attention_fwd)  # what vlops.co_attention calls
