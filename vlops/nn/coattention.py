"""``vlops.nn.CoAttention`` and ``vlops.nn.CoAttentionBlock``: vilbert-multi-task's ``BertBiAttention`` and
``BertConnectionLayer`` (same constructor config, parameter names, state_dict keys, forward signature and
return values) with both cross-attention directions computed by the fused :func:`vlops.co_attention`.

The eager math they replace, with the same names, is :mod:`vlops.reference.coattention`
(``ViLBERTBiAttention``, ``ViLBERTConnectionLayer``). Imports nothing beyond torch and vlops.reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..reference.coattention import ViLBERTBiOutput, ViLBERTConfig, ViLBERTOutput, config_get

__all__ = ["CoAttention", "CoAttentionBlock"]

_FIELDS = {f.name for f in ViLBERTConfig.__dataclass_fields__.values()}
_ACT = {"gelu": F.gelu, "relu": F.relu, "swish": F.silu}  # ViLBERT's ACT2FN ("gelu" is the erf form)


def _config(config, overrides: dict):
    unknown = set(overrides) - _FIELDS
    if unknown:
        raise TypeError(f"unknown config field(s) {sorted(unknown)}; known: {sorted(_FIELDS)}")
    return lambda name: overrides[name] if name in overrides else config_get(config, name)


def _act(act):
    if callable(act):
        return act
    if act not in _ACT:
        raise ValueError(f"hidden_act must be one of {tuple(_ACT)} or a callable, got {act!r}")
    return _ACT[act]


def key_padding(mask, B: int, N: int, name: str, to_lengths: Optional[bool] = None) -> dict:
    """A ViLBERT-style key mask -> ``{"lengths": int32 [B]}`` on the CPU (right padding, when converted) or
    ``{"mask": bool [B, N]}`` or ``{}`` (None).

    Accepted: [B, 1, 1, N] (the extended mask ViLBERT passes), [B, 1, N] or [B, N], batch 1 broadcast.
    Floating masks are additive (ViLBERT's ``(1 - m) * -10000``, or any large negative such as
    ``finfo.min``): a value > -1 keeps the key, <= -1 masks it (other additive biases cannot be expressed as
    key padding). Bool masks: True keeps; integer masks: nonzero keeps (the raw 0 / 1 ``attention_mask``).
    ``to_lengths``: None (default) converts right-padded masks that are on the CPU, where detecting the
    padding reads no device memory, and passes masks on a GPU as they are (no synchronisation); True also
    converts GPU masks (one copy of the mask to the host per call, which waits for the GPU); False never
    converts. Under ``torch.compile`` the mask is passed as it is.
    """
    if mask is None:
        return {}
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    m = mask
    if m.ndim == 4 and m.shape[1] == 1 and m.shape[2] == 1:
        m = m[:, 0, 0]
    elif m.ndim == 3 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 2 or m.shape[-1] != N or m.shape[0] not in (1, B):
        raise ValueError(f"{name} must be a key mask of shape [B, 1, 1, N], [B, 1, N] or [B, N] with B = {B} "
                         f"(or 1) and N = {N}, got {tuple(mask.shape)} (per-query masks are not supported: only "
                         f"keys are masked)")
    m = m.expand(B, N)
    if m.dtype == torch.bool:
        keep = m
    elif m.dtype.is_floating_point:
        keep = m > -1.0
    else:
        keep = m != 0
    convert = keep.device.type == "cpu" if to_lengths is None else to_lengths
    if convert and not torch.compiler.is_compiling():
        host = keep.cpu()  # a no-op for a CPU mask; the lengths stay on the host (checked there, no sync)
        lengths = host.sum(1, dtype=torch.int32)
        if torch.equal(host, torch.arange(N)[None, :] < lengths[:, None]):
            return {"lengths": lengths}
    return {"mask": keep.contiguous()}


class CoAttention(nn.Module):
    """ViLBERT's ``BertBiAttention`` on the fused co-attention op.

    ``CoAttention(config)`` with a vilbert-multi-task ``BertConfig`` (or any object / dict with
    ``hidden_size``, ``v_hidden_size``, ``bi_hidden_size``, ``bi_num_attention_heads``,
    ``attention_probs_dropout_prob``, ``v_attention_probs_dropout_prob``; missing fields take ``BertConfig``'s
    defaults; keyword overrides such as ``CoAttention(bi_hidden_size=512)`` also work).

    Parameters (as ``BertBiAttention``): ``query1``, ``key1``, ``value1`` (image stream, ``v_hidden_size`` ->
    ``bi_hidden_size``), ``query2``, ``key2``, ``value2`` (text stream, ``hidden_size`` -> ``bi_hidden_size``);
    ``dropout1`` (``v_attention_probs_dropout_prob``, on the text queries' attention over image keys),
    ``dropout2`` (``attention_probs_dropout_prob``, the image queries' attention over text keys).

    ``forward(input_tensor1, attention_mask1, input_tensor2, attention_mask2, co_attention_mask=None,
    use_co_attention_mask=False)``: ``input_tensor1`` [B, Nv, v_hidden] (image), ``attention_mask1`` its key
    mask, ``input_tensor2`` [B, Nt, hidden] (text), ``attention_mask2`` its key mask (ViLBERT's extended
    additive [B, 1, 1, N] masks, or bool / 0-1 masks; see :func:`key_padding`; None: no padding);
    ``co_attention_mask`` is accepted and ignored, as in ViLBERT. Returns ``(context_layer1 [B, Nt, bi_hidden]
    (text queries over the image), context_layer2 [B, Nv, bi_hidden] (image queries over the text),
    (None, None))``: the fused op never forms the attention probabilities ViLBERT returns third.

    Options:
        exact_vilbert: mask with ViLBERT's -10000 additive bias (``mask_mode="vilbert"``), so a query whose
            keys are all masked attends to every key as if unmasked (the uniform -10000 shift), exactly as
            ViLBERT does. Default False: such a query
            returns zeros; wherever a query has a valid key the two agree.
        shared_weights: LXMERT's cross-attention: one attention module used in both directions, parameters
            ``query``, ``key``, ``value`` (LXMERT ``BertAttention`` names, ``hidden_size`` -> ``bi_hidden_size``;
            needs ``v_hidden_size == hidden_size``) and one ``dropout`` (``attention_probs_dropout_prob``).
        mask_to_lengths: pass right-padded masks to the op as lengths (its fast path, which skips key tiles
            past the lengths). None (default): for masks on the CPU, where detecting the padding is free;
            masks on a GPU go to the op as masks, with no synchronisation. True: on a GPU too (one copy of
            each mask to the host per call, which waits for the GPU). False: never.

    Dropout of the attention probabilities uses the op's counter-based mask seeded from torch's default
    generator (``torch.manual_seed`` makes training reproducible), not ``nn.Dropout``'s mask. When the two
    directions have different dropout probabilities the op runs once per direction.
    """

    def __init__(self, config=None, *, exact_vilbert: bool = False, shared_weights: bool = False,
                 mask_to_lengths: Optional[bool] = None, **overrides):
        super().__init__()
        cfg = _config(config, overrides)
        bi, heads = cfg("bi_hidden_size"), cfg("bi_num_attention_heads")
        if bi % heads:
            raise ValueError(f"The hidden size ({bi}) is not a multiple of the number of attention heads ({heads})")
        self.num_attention_heads = heads
        self.attention_head_size = bi // heads
        self.all_head_size = bi
        self.exact_vilbert = bool(exact_vilbert)
        self.shared_weights = bool(shared_weights)
        self.mask_to_lengths = None if mask_to_lengths is None else bool(mask_to_lengths)
        vh, th = cfg("v_hidden_size"), cfg("hidden_size")
        if self.shared_weights:
            if vh != th:
                raise ValueError(f"shared_weights needs v_hidden_size == hidden_size, got {vh} and {th}")
            self.query, self.key, self.value = nn.Linear(th, bi), nn.Linear(th, bi), nn.Linear(th, bi)
            self.dropout = nn.Dropout(cfg("attention_probs_dropout_prob"))
        else:
            self.query1, self.key1, self.value1 = nn.Linear(vh, bi), nn.Linear(vh, bi), nn.Linear(vh, bi)
            self.dropout1 = nn.Dropout(cfg("v_attention_probs_dropout_prob"))
            self.query2, self.key2, self.value2 = nn.Linear(th, bi), nn.Linear(th, bi), nn.Linear(th, bi)
            self.dropout2 = nn.Dropout(cfg("attention_probs_dropout_prob"))

    def extra_repr(self) -> str:
        return (f"heads={self.num_attention_heads}, head_dim={self.attention_head_size}, "
                f"exact_vilbert={self.exact_vilbert}, shared_weights={self.shared_weights}")

    def transpose_for_scores(self, x):
        """ViLBERT's [B, N, all_head] -> [B, H, N, d] view (kept for code that calls it)."""
        return x.view(*x.shape[:-1], self.num_attention_heads, self.attention_head_size).permute(0, 2, 1, 3)

    def _qkv(self, x, q, k, v):
        """One GEMM for the three projections; q, k, v are [B, N, H, d] views of its output (no copies)."""
        w = torch.cat([q.weight, k.weight, v.weight])
        b = None if q.bias is None else torch.cat([q.bias, k.bias, v.bias])
        y = F.linear(x, w, b).view(*x.shape[:-1], 3, self.num_attention_heads, self.attention_head_size)
        return y.unbind(-3)

    def forward(self, input_tensor1, attention_mask1, input_tensor2, attention_mask2, co_attention_mask=None,
                use_co_attention_mask=False):
        from vlops import co_attention

        for name, t in (("input_tensor1", input_tensor1), ("input_tensor2", input_tensor2)):
            if not isinstance(t, torch.Tensor) or t.ndim != 3:
                raise ValueError(f"{name} must be a [B, N, hidden] tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if input_tensor1.shape[0] != input_tensor2.shape[0]:
            raise ValueError(f"input_tensor1 and input_tensor2 must have one batch size, got {input_tensor1.shape[0]} "
                             f"and {input_tensor2.shape[0]}")
        B, Nv = input_tensor1.shape[:2]
        Nt = input_tensor2.shape[1]
        if self.shared_weights:
            iq, ik, iv = self._qkv(input_tensor1, self.query, self.key, self.value)
            tq, tk, tv = self._qkv(input_tensor2, self.query, self.key, self.value)
            p_text = p_image = self.dropout.p
        else:
            iq, ik, iv = self._qkv(input_tensor1, self.query1, self.key1, self.value1)
            tq, tk, tv = self._qkv(input_tensor2, self.query2, self.key2, self.value2)
            p_text, p_image = self.dropout1.p, self.dropout2.p
        if not self.training:
            p_text = p_image = 0.0
        kw = {}
        for stream, pad in (("image", key_padding(attention_mask1, B, Nv, "attention_mask1", self.mask_to_lengths)),
                            ("text", key_padding(attention_mask2, B, Nt, "attention_mask2", self.mask_to_lengths))):
            for kind, t in pad.items():
                kw[f"{stream}_{kind}"] = t
        kw["mask_mode"] = "vilbert" if self.exact_vilbert else "zero"
        if p_text == p_image:
            t_ctx, i_ctx = co_attention(tq, tk, tv, iq, ik, iv, dropout_p=p_text, **kw)
        else:  # one dropout probability per call: run the op once per direction
            t_ctx, _ = co_attention(tq, tk, tv, iq, ik, iv, dropout_p=p_text, **kw)
            _, i_ctx = co_attention(tq, tk, tv, iq, ik, iv, dropout_p=p_image, **kw)
        context_layer1 = t_ctx.view(B, Nt, self.all_head_size)
        context_layer2 = i_ctx.view(B, Nv, self.all_head_size)
        return context_layer1, context_layer2, (None, None)


class _Intermediate(nn.Module):
    def __init__(self, d_in, d_out, act):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.intermediate_act_fn = _act(act)

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class CoAttentionBlock(nn.Module):
    """ViLBERT's ``BertConnectionLayer`` with the fused co-attention: submodules ``biattention``
    (:class:`CoAttention`), ``biOutput`` (the two output projections, residual and LayerNorm),
    ``v_intermediate`` / ``v_output`` (the image stream's feed-forward) and ``t_intermediate`` / ``t_output``
    (the text stream's); the state_dict keys of vilbert-multi-task's ``BertConnectionLayer``.

    ``forward(input_tensor1, attention_mask1, input_tensor2, attention_mask2, co_attention_mask=None,
    use_co_attention_mask=False)`` -> ``(layer_output1 [B, Nv, v_hidden], layer_output2 [B, Nt, hidden],
    (None, None))``. ``exact_vilbert``, ``shared_weights``, ``mask_to_lengths`` and config overrides are
    passed to :class:`CoAttention`.
    """

    def __init__(self, config=None, *, exact_vilbert: bool = False, shared_weights: bool = False,
                 mask_to_lengths: Optional[bool] = None, **overrides):
        super().__init__()
        cfg = _config(config, overrides)
        self.biattention = CoAttention(config, exact_vilbert=exact_vilbert, shared_weights=shared_weights,
                                       mask_to_lengths=mask_to_lengths, **overrides)
        merged = {name: cfg(name) for name in _FIELDS}  # the config with the overrides applied
        # the output projections and the output halves of the feed-forwards are the eager modules; the
        # intermediate halves use torch's fused activations (_ACT)
        self.biOutput = ViLBERTBiOutput(merged)
        self.v_intermediate = _Intermediate(cfg("v_hidden_size"), cfg("v_intermediate_size"), cfg("v_hidden_act"))
        self.v_output = ViLBERTOutput(merged, "v")
        self.t_intermediate = _Intermediate(cfg("hidden_size"), cfg("intermediate_size"), cfg("hidden_act"))
        self.t_output = ViLBERTOutput(merged, "t")

    def forward(self, input_tensor1, attention_mask1, input_tensor2, attention_mask2, co_attention_mask=None,
                use_co_attention_mask=False):
        bi1, bi2, probs = self.biattention(input_tensor1, attention_mask1, input_tensor2, attention_mask2,
                                           co_attention_mask, use_co_attention_mask)
        a1, a2 = self.biOutput(bi2, input_tensor1, bi1, input_tensor2)  # image queries -> image stream
        layer_output1 = self.v_output(self.v_intermediate(a1), a1)
        layer_output2 = self.t_output(self.t_intermediate(a2), a2)
        return layer_output1, layer_output2, probs
