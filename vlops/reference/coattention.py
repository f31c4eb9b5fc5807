"""Eager PyTorch specification of ViLBERT co-attention: both cross-attention directions of a connection
layer (text queries over image keys / values, image queries over text keys / values), each with the other
stream's key padding, and eager versions of vilbert-multi-task's ``BertBiAttention``, ``BertBiOutput`` and
``BertConnectionLayer`` (same parameter names, same forward math), the anchor the fused modules of
:mod:`vlops.nn.coattention` are checked against.

Definition of :func:`co_attention` (per batch ``b``, head ``h``; tensors [B, N, H, d])::

    text direction  (dir 0): queries text_q,  keys image_k, values image_v, image key padding
    image direction (dir 1): queries image_q, keys text_k,  values text_v,  text key padding

    valid_j = j < lengths[b] and mask[b, j]             (key j of the key stream; both optional)
    s_ij    = scale * q_i . k_j                          scale = 1 / sqrt(d) unless given
    mask_mode "zero"   : p_ij = softmax over the valid j; invalid j get 0; a row with no valid key
                         is all zeros (its output is 0, its log-sum-exp -inf)
    mask_mode "vilbert": s_ij += 0 if valid_j else -10000, softmax over every j (ViLBERT's extended
                         additive mask: a row with no valid key has every score shifted by
                         -10000, so it equals the unmasked softmax over every key)
    dropout            : p_ij <- p_ij * keep_ij / (1 - dropout_p), keep from :func:`dropout_keep`
    out_i   = sum_j p_ij v_j

Only keys are masked: padded query rows are computed like the others.

Precision: the computation runs in ``compute_dtype`` (default float32 for float16 / bfloat16 / float32
inputs, float64 for float64 inputs: the contract of the fused kernels) and the result is rounded once to
the input dtype. ``compute_dtype=torch.bfloat16`` (etc.) gives the plain eager computation at that dtype,
the baseline the 16-bit error bound of the tests is measured against.

ViLBERT (vilbert-multi-task, ``vilbert/vilbert.py``) names the image stream 1 and the text stream 2:
``BertBiAttention.forward(input_tensor1, attention_mask1, input_tensor2, attention_mask2)`` returns
``context_layer1`` (text queries ``query2`` over image keys ``key1`` / values ``value1``, masked by the
image mask ``attention_mask1``, dropout ``dropout1`` with ``v_attention_probs_dropout_prob``) and
``context_layer2`` (image queries ``query1`` over text keys ``key2`` / values ``value2``, text mask
``attention_mask2``, dropout ``dropout2`` with ``attention_probs_dropout_prob``). Its masks are the extended
additive masks ``(1 - mask) * -10000`` of shape [B, 1, 1, N], made by ``BertModel.forward``
(:func:`extended_attention_mask`).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .diffusion import philox4x32, uint32_to_uniform

__all__ = [
    "MASK_MODES", "VILBERT_MASK_VALUE", "CoAttentionArgs", "check_args", "key_valid", "dropout_keep",
    "attention_direction", "co_attention", "extended_attention_mask", "ViLBERTConfig", "ViLBERTBiAttention",
    "ViLBERTBiOutput", "ViLBERTIntermediate", "ViLBERTOutput", "ViLBERTConnectionLayer",
]

MASK_MODES = {"zero": 0, "vilbert": 1}
VILBERT_MASK_VALUE = -10000.0
_M32 = 0xFFFFFFFF
_KEEP_CHUNK = 1 << 22  # (query, key) pairs per Philox batch in dropout_keep
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_NAMES = ("text_q", "text_k", "text_v", "image_q", "image_k", "image_v")


# ------------------------------------------------------------------------------------------------ arguments

class CoAttentionArgs(NamedTuple):
    """Checked arguments: lengths / masks in the form of the kernel contract (``*_len`` int32 [B], None when
    the stream is unpadded or given by a mask; ``*_mask`` contiguous bool [B, N] or None)."""
    B: int
    Nt: int
    Nv: int
    H: int
    d: int
    t_len: Optional[torch.Tensor]
    i_len: Optional[torch.Tensor]
    t_mask: Optional[torch.Tensor]
    i_mask: Optional[torch.Tensor]
    scale: float
    dropout_p: float
    seed: Optional[int]
    mode: int


def _lengths(x, name: str, B: int, N: int, device) -> Optional[torch.Tensor]:
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor [B], got {type(x).__name__}")
    if x.dtype not in _INTS:
        raise TypeError(f"{name} must be an integer tensor (int32 / int64 / ...), got {x.dtype}")
    if tuple(x.shape) != (B,):
        raise ValueError(f"{name} must have shape [B] = [{B}], got {tuple(x.shape)}")
    if x.device != device and x.device.type != "cpu":
        raise ValueError(f"{name} is on {x.device} but the inputs are on {device}; put them on the inputs' device "
                         f"or on the CPU")
    # int32 for the kernels: values beyond int32 saturate, so out-of-range values stay out of range (the
    # range itself is checked where the values are read: check_lengths_range)
    if x.dtype == torch.int64:
        x = x.clamp(-2**31, 2**31 - 1)
    return x.to(torch.int32).contiguous()


def _mask(x, name: str, B: int, N: int, device) -> Optional[torch.Tensor]:
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor [B, N], got {type(x).__name__}")
    if x.dtype != torch.bool and x.dtype not in _INTS:
        raise TypeError(f"{name} must be a bool tensor (True = keep) or an integer 0 / 1 tensor, got {x.dtype}")
    if tuple(x.shape) != (B, N):
        raise ValueError(f"{name} must have shape [B, N] = [{B}, {N}], got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the inputs are on {device}; put them on one device")
    return (x if x.dtype == torch.bool else x != 0).contiguous()


def check_lengths_range(t_len: Optional[torch.Tensor], i_len: Optional[torch.Tensor], Nt: int, Nv: int) -> None:
    """ValueError naming ``text_lengths`` / ``image_lengths`` when a length is outside [0, N]. Lengths on the CPU
    are read in place; lengths on a device are read with one synchronisation for both."""
    checks = [(t, n, name) for t, n, name in ((t_len, Nt, "text_lengths"), (i_len, Nv, "image_lengths"))
              if t is not None and t.numel()]
    on_host = [c for c in checks if c[0].device.type == "cpu"]
    on_device = [c for c in checks if c[0].device.type != "cpu"]
    bad = [int(lo) < 0 or int(hi) > n for (lo, hi), n in ((torch.aminmax(t), n) for t, n, _ in on_host)]
    if on_device:
        bad += torch.stack([((t < 0) | (t > n)).any() for t, n, _ in on_device]).tolist()
    for (t, n, name), b in zip(on_host + on_device, bad):
        if b:
            got = t.tolist() if t.numel() <= 16 else f"min {int(t.min())}, max {int(t.max())}"
            raise ValueError(f"{name} must be in [0, {n}] (the number of {name.split('_')[0]} tokens), got {got}")


def check_args(tensors, *, text_lengths=None, image_lengths=None, text_mask=None, image_mask=None, scale=None,
               dropout_p=0.0, seed=None, mask_mode="zero") -> CoAttentionArgs:
    """Check the arguments of :func:`co_attention` / :func:`vlops.co_attention` (``tensors``: the six inputs
    in their order); TypeError / ValueError naming the argument. Lengths are not range-checked here
    (:func:`check_lengths_range`: it needs the values)."""
    for name, t in zip(_NAMES, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, N, H, d], got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got {t.dtype}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D [B, N, H, d], got shape {tuple(t.shape)}")
        if min(t.shape) < 1:
            raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    tq = tensors[0]
    for name, t in zip(_NAMES[1:], tensors[1:]):
        if t.dtype != tq.dtype:
            raise TypeError(f"{name} is {t.dtype} but text_q is {tq.dtype}; all six inputs must have one dtype")
        if t.device != tq.device:
            raise ValueError(f"{name} is on {t.device} but text_q is on {tq.device}; put them on one device")
    B, Nt, H, d = tq.shape
    Nv = tensors[3].shape[1]
    want = ((B, Nt, H, d),) * 3 + ((B, Nv, H, d),) * 3
    if any(t.shape != w for t, w in zip(tensors, want)):  # name the first mismatch
        for what, dim in (("batch size B", 0), ("number of heads H", 2), ("head dim d", 3)):
            for name, t in zip(_NAMES[1:], tensors[1:]):
                if t.shape[dim] != tq.shape[dim]:
                    raise ValueError(f"{name} has {what} {t.shape[dim]} but text_q has {tq.shape[dim]} "
                                     f"(shapes {tuple(t.shape)} and {tuple(tq.shape)})")
        for name, t, n, stream in (("text_k", tensors[1], Nt, "text_q"), ("text_v", tensors[2], Nt, "text_q"),
                                   ("image_k", tensors[4], Nv, "image_q"), ("image_v", tensors[5], Nv, "image_q")):
            if t.shape[1] != n:
                raise ValueError(f"{name} has {t.shape[1]} tokens but {stream} has {n}; one stream's q, k, v "
                                 f"share N")
    if text_lengths is not None and text_mask is not None:
        raise ValueError("give text_lengths or text_mask, not both")
    if image_lengths is not None and image_mask is not None:
        raise ValueError("give image_lengths or image_mask, not both")
    dev = tq.device
    t_len = _lengths(text_lengths, "text_lengths", B, Nt, dev)
    i_len = _lengths(image_lengths, "image_lengths", B, Nv, dev)
    t_mask = _mask(text_mask, "text_mask", B, Nt, dev)
    i_mask = _mask(image_mask, "image_mask", B, Nv, dev)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    else:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be finite and > 0, got {scale}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number, got {type(dropout_p).__name__}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:  # also rejects NaN
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        seed = int(seed)
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if not isinstance(mask_mode, str) or mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {tuple(MASK_MODES)}, got {mask_mode!r}")
    return CoAttentionArgs(B, Nt, Nv, H, d, t_len, i_len, t_mask, i_mask, scale, dropout_p, seed,
                           MASK_MODES[mask_mode])


# ------------------------------------------------------------------------------------------------ the math

def key_valid(lengths: Optional[torch.Tensor], mask: Optional[torch.Tensor], B: int, N: int,
              device=None) -> torch.Tensor:
    """[B, N] bool: key ``j`` of batch ``b`` is valid iff ``j < lengths[b]`` and ``mask[b, j]`` (each
    condition skipped when its tensor is None)."""
    valid = torch.ones(B, N, dtype=torch.bool, device=device)
    if lengths is not None:
        lengths = lengths.to(valid.device, torch.int64, non_blocking=True)  # lengths may be on the CPU
        valid = valid & (torch.arange(N, device=valid.device)[None, :] < lengths[:, None])
    if mask is not None:
        valid = valid & mask.to(torch.bool)
    return valid


def dropout_keep(B: int, H: int, Nq: int, Nk: int, direction: int, seed: int, dropout_p: float,
                 device=None) -> torch.Tensor:
    """The dropout keep mask [B, H, Nq, Nk] (bool) of one direction, the same bit for bit in every backend.

    Pair (query ``i``, key ``j``) of batch ``b``, head ``h`` is kept iff ``u >= dropout_p`` (compared in
    float32: ``u`` is a float32 and ``dropout_p`` is rounded to float32), where ``u =
    uint32_to_uniform(x0)`` and ``x0`` is the first output of Philox4x32-10 with counter
    ``(j, i, b * H + h, direction)`` and key ``(seed & 0xffffffff, seed >> 32)``
    (:func:`vlops.reference.diffusion.philox4x32`).
    """
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    out = torch.empty(B * H, Nq, Nk, dtype=torch.bool, device=device)
    j = torch.arange(Nk, dtype=torch.int64, device=device).view(1, 1, Nk)
    i = torch.arange(Nq, dtype=torch.int64, device=device).view(1, Nq, 1)
    c3 = torch.full((1, 1, 1), direction, dtype=torch.int64, device=device)
    thr = torch.tensor(dropout_p, dtype=torch.float32, device=device)
    step = max(1, _KEEP_CHUNK // max(1, Nq * Nk))  # a few million int64 temporaries at a time
    for lo in range(0, B * H, step):
        bh = torch.arange(lo, min(B * H, lo + step), dtype=torch.int64, device=device).view(-1, 1, 1)
        x0 = philox4x32(j, i, bh, c3, k0, k1)[0]
        out[lo:lo + bh.shape[0]] = uint32_to_uniform(x0.expand(bh.shape[0], Nq, Nk)) >= thr
    return out.view(B, H, Nq, Nk)


def attention_direction(q, k, v, valid, *, scale: float, mode: int, dropout_p: float = 0.0,
                        seed: Optional[int] = None, direction: int = 0, compute_dtype=None):
    """One direction: ``q`` [B, Nq, H, d], ``k``, ``v`` [B, Nk, H, d], ``valid`` [B, Nk] bool. Returns
    (out [B, Nq, H, d], lse [B, H, Nq]) in ``compute_dtype`` (differentiable; lse is -inf for a row with no
    valid key in mode 0)."""
    cdt = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    B, Nq, H, d = q.shape
    Nk = k.shape[1]
    qh = q.to(cdt).transpose(1, 2)  # [B, H, Nq, d]
    kh = k.to(cdt).transpose(1, 2)
    vh = v.to(cdt).transpose(1, 2)
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [B, H, Nq, Nk]
    vk = valid[:, None, None, :]
    if mode == 1:
        bias = torch.where(vk, torch.zeros((), dtype=cdt, device=s.device),
                           torch.full((), VILBERT_MASK_VALUE, dtype=cdt, device=s.device))
        s = s + bias
        m = s.amax(-1, keepdim=True).detach()
    else:
        s = s.masked_fill(~vk, float("-inf"))
        m = s.amax(-1, keepdim=True).detach()
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row with no valid key: e = 0
    e = torch.exp(s - m)
    tot = e.sum(-1, keepdim=True)
    p = e / torch.where(tot > 0, tot, torch.ones_like(tot))
    lse = (m + torch.log(tot.detach())).squeeze(-1)
    if dropout_p > 0:
        if seed is None:
            raise ValueError("seed is required when dropout_p > 0")
        keep = dropout_keep(B, H, Nq, Nk, direction, seed, dropout_p, device=q.device)
        p = p * keep.to(cdt) * (1.0 / (1.0 - dropout_p))
    out = torch.matmul(p, vh)
    return out.transpose(1, 2), lse


def co_attention(text_q, text_k, text_v, image_q, image_k, image_v, *, text_lengths=None, image_lengths=None,
                 text_mask=None, image_mask=None, scale=None, dropout_p=0.0, seed=None, mask_mode="zero",
                 compute_dtype=None, return_lse=False):
    """The co-attention of the module docstring, eager and differentiable (the arguments of
    :func:`vlops.co_attention`; ``seed`` is required when ``dropout_p > 0``).

    Returns ``(text_context [B, Nt, H, d], image_context [B, Nv, H, d])`` in the input dtype, plus
    ``(text_lse [B, H, Nt], image_lse [B, H, Nv])`` in the compute dtype when ``return_lse``.
    """
    ts = (text_q, text_k, text_v, image_q, image_k, image_v)
    a = check_args(ts, text_lengths=text_lengths, image_lengths=image_lengths, text_mask=text_mask,
                   image_mask=image_mask, scale=scale, dropout_p=dropout_p, seed=seed, mask_mode=mask_mode)
    check_lengths_range(a.t_len, a.i_len, a.Nt, a.Nv)
    if a.dropout_p > 0 and a.seed is None:
        raise ValueError("the reference co_attention needs an explicit seed when dropout_p > 0")
    dev = text_q.device
    t_valid = key_valid(a.t_len, a.t_mask, a.B, a.Nt, dev)
    i_valid = key_valid(a.i_len, a.i_mask, a.B, a.Nv, dev)
    kw = dict(scale=a.scale, mode=a.mode, dropout_p=a.dropout_p, seed=a.seed, compute_dtype=compute_dtype)
    t_out, t_lse = attention_direction(text_q, image_k, image_v, i_valid, direction=0, **kw)
    i_out, i_lse = attention_direction(image_q, text_k, text_v, t_valid, direction=1, **kw)
    outs = (t_out.to(text_q.dtype), i_out.to(text_q.dtype))
    return outs + (t_lse, i_lse) if return_lse else outs


# ------------------------------------------------------------------------------------------------ ViLBERT

def extended_attention_mask(mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """ViLBERT's additive mask from a 0 / 1 (or bool) keep mask [B, N]: ``(1 - mask) * -10000`` as
    [B, 1, 1, N] in ``dtype`` (``BertModel.forward``)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * VILBERT_MASK_VALUE


@dataclasses.dataclass
class ViLBERTConfig:
    """The fields of vilbert-multi-task's ``BertConfig`` that a connection layer reads, with that class's
    defaults. Any object with these attributes (their ``BertConfig`` itself) or a dict works where a config
    is asked for."""
    hidden_size: int = 768
    v_hidden_size: int = 768
    bi_hidden_size: int = 1024
    bi_num_attention_heads: int = 16
    intermediate_size: int = 3072
    v_intermediate_size: int = 3072
    hidden_act: object = "gelu"
    v_hidden_act: object = "gelu"
    attention_probs_dropout_prob: float = 0.1
    v_attention_probs_dropout_prob: float = 0.1
    hidden_dropout_prob: float = 0.1
    v_hidden_dropout_prob: float = 0.1


def config_get(config, name: str):
    """``config.name`` (or ``config[name]``), else the ``BertConfig`` default."""
    default = getattr(ViLBERTConfig, name)
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _gelu_erf(x):
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


ACTIVATIONS = {"gelu": _gelu_erf, "relu": F.relu, "swish": lambda x: x * torch.sigmoid(x)}


def activation(act):
    if callable(act):
        return act
    if act not in ACTIVATIONS:
        raise ValueError(f"hidden_act must be one of {tuple(ACTIVATIONS)} or a callable, got {act!r}")
    return ACTIVATIONS[act]


class ViLBERTBiAttention(nn.Module):
    """Eager ``BertBiAttention``: parameters ``query1/key1/value1`` (image stream, ``v_hidden_size`` in),
    ``query2/key2/value2`` (text stream, ``hidden_size`` in), dropouts ``dropout1`` / ``dropout2``.

    ``forward(input_tensor1, attention_mask1, input_tensor2, attention_mask2, co_attention_mask=None,
    use_co_attention_mask=False)`` -> ``(context_layer1 [B, Nt, bi_hidden], context_layer2 [B, Nv, bi_hidden],
    (attention_probs1, attention_probs2))``; the masks are additive [B, 1, 1, N]; ``co_attention_mask`` is
    accepted and unused (as in ViLBERT)."""

    def __init__(self, config=None):
        super().__init__()
        bi, heads = config_get(config, "bi_hidden_size"), config_get(config, "bi_num_attention_heads")
        if bi % heads:
            raise ValueError(f"bi_hidden_size ({bi}) must be a multiple of bi_num_attention_heads ({heads})")
        self.num_attention_heads = heads
        self.attention_head_size = bi // heads
        self.all_head_size = bi
        vh, th = config_get(config, "v_hidden_size"), config_get(config, "hidden_size")
        self.query1, self.key1, self.value1 = nn.Linear(vh, bi), nn.Linear(vh, bi), nn.Linear(vh, bi)
        self.dropout1 = nn.Dropout(config_get(config, "v_attention_probs_dropout_prob"))
        self.query2, self.key2, self.value2 = nn.Linear(th, bi), nn.Linear(th, bi), nn.Linear(th, bi)
        self.dropout2 = nn.Dropout(config_get(config, "attention_probs_dropout_prob"))

    def transpose_for_scores(self, x):
        return x.view(*x.shape[:-1], self.num_attention_heads, self.attention_head_size).permute(0, 2, 1, 3)

    def _attend(self, q, k, v, mask, dropout):
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        scores = scores + mask
        probs = dropout(torch.softmax(scores, dim=-1))
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(*ctx.shape[:-2], self.all_head_size), probs

    def forward(self, input_tensor1, attention_mask1, input_tensor2, attention_mask2, co_attention_mask=None,
                use_co_attention_mask=False):
        q1, k1, v1 = (self.transpose_for_scores(f(input_tensor1)) for f in (self.query1, self.key1, self.value1))
        q2, k2, v2 = (self.transpose_for_scores(f(input_tensor2)) for f in (self.query2, self.key2, self.value2))
        ctx1, probs1 = self._attend(q2, k1, v1, attention_mask1, self.dropout1)  # text queries, image keys
        ctx2, probs2 = self._attend(q1, k2, v2, attention_mask2, self.dropout2)  # image queries, text keys
        return ctx1, ctx2, (probs1, probs2)


class ViLBERTBiOutput(nn.Module):
    """Eager ``BertBiOutput``: ``dense1`` / ``LayerNorm1`` / ``dropout1`` (to the image stream),
    ``dense2`` / ``LayerNorm2`` / ``dropout2`` (to the text stream), and the unused ``q_dense1``,
    ``q_dense2`` (present in ViLBERT's state_dict). ``forward(hidden_states1, input_tensor1, hidden_states2,
    input_tensor2)`` -> ``(LayerNorm1(dropout1(dense1(h1)) + x1), LayerNorm2(dropout2(dense2(h2)) + x2))``."""

    def __init__(self, config=None):
        super().__init__()
        bi, vh, th = (config_get(config, n) for n in ("bi_hidden_size", "v_hidden_size", "hidden_size"))
        pv, pt = config_get(config, "v_hidden_dropout_prob"), config_get(config, "hidden_dropout_prob")
        self.dense1 = nn.Linear(bi, vh)
        self.LayerNorm1 = nn.LayerNorm(vh, eps=1e-12)
        self.dropout1 = nn.Dropout(pv)
        self.q_dense1 = nn.Linear(bi, vh)
        self.q_dropout1 = nn.Dropout(pv)
        self.dense2 = nn.Linear(bi, th)
        self.LayerNorm2 = nn.LayerNorm(th, eps=1e-12)
        self.dropout2 = nn.Dropout(pt)
        self.q_dense2 = nn.Linear(bi, th)
        self.q_dropout2 = nn.Dropout(pt)

    def forward(self, hidden_states1, input_tensor1, hidden_states2, input_tensor2):
        h1 = self.LayerNorm1(self.dropout1(self.dense1(hidden_states1)) + input_tensor1)
        h2 = self.LayerNorm2(self.dropout2(self.dense2(hidden_states2)) + input_tensor2)
        return h1, h2


class ViLBERTIntermediate(nn.Module):
    """``BertIntermediate`` (``stream="t"``) / ``BertImageIntermediate`` (``"v"``): ``act(dense(x))``."""

    def __init__(self, config=None, stream: str = "t"):
        super().__init__()
        p = "v_" if stream == "v" else ""
        self.dense = nn.Linear(config_get(config, p + "hidden_size"), config_get(config, p + "intermediate_size"))
        self.intermediate_act_fn = activation(config_get(config, p + "hidden_act"))

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class ViLBERTOutput(nn.Module):
    """``BertOutput`` / ``BertImageOutput``: ``LayerNorm(dropout(dense(h)) + x)``."""

    def __init__(self, config=None, stream: str = "t"):
        super().__init__()
        p = "v_" if stream == "v" else ""
        hidden = config_get(config, p + "hidden_size")
        self.dense = nn.Linear(config_get(config, p + "intermediate_size"), hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(config_get(config, p + "hidden_dropout_prob"))

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class ViLBERTConnectionLayer(nn.Module):
    """Eager ``BertConnectionLayer``: ``biattention``, ``biOutput``, ``v_intermediate``, ``v_output``,
    ``t_intermediate``, ``t_output``. ``forward(input_tensor1, attention_mask1, input_tensor2, attention_mask2,
    co_attention_mask=None, use_co_attention_mask=False)`` -> ``(layer_output1 [B, Nv, v_hidden],
    layer_output2 [B, Nt, hidden], co_attention_probs)``."""

    def __init__(self, config=None):
        super().__init__()
        self.biattention = ViLBERTBiAttention(config)
        self.biOutput = ViLBERTBiOutput(config)
        self.v_intermediate = ViLBERTIntermediate(config, "v")
        self.v_output = ViLBERTOutput(config, "v")
        self.t_intermediate = ViLBERTIntermediate(config, "t")
        self.t_output = ViLBERTOutput(config, "t")

    def forward(self, input_tensor1, attention_mask1, input_tensor2, attention_mask2, co_attention_mask=None,
                use_co_attention_mask=False):
        bi1, bi2, probs = self.biattention(input_tensor1, attention_mask1, input_tensor2, attention_mask2,
                                           co_attention_mask, use_co_attention_mask)
        # bi2 (image queries) feeds the image stream, bi1 (text queries) the text stream
        a1, a2 = self.biOutput(bi2, input_tensor1, bi1, input_tensor2)
        out1 = self.v_output(self.v_intermediate(a1), a1)
        out2 = self.t_output(self.t_intermediate(a2), a2)
        return out1, out2, probs
