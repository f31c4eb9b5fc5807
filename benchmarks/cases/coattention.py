"""Benchmark cases of the fused co-attention (``vlops.co_attention``, ``vlops.nn.CoAttention``).

- ``vqa``: ViLBERT's co-attention at VQA sizes (8 heads, d = 128, Nt = 20 text tokens, Nv = 101 image
  regions padded from random lengths 37..101), fused vs two masked ``F.scaled_dot_product_attention`` calls
  (boolean key masks) on the same [B, N, H, d] projections. The masks are built once, outside the timed
  region; the fused call gets the lengths as a CPU tensor (checked on the host, copied to the device through
  pinned memory without blocking: no device synchronisation per call). On CUDA the forward also gets a ``+graph`` row: a CUDA-graph
  replay of the fused call (with the boolean masks, which a capture can take), its GPU time without the host.
- ``vqa_vilbert``: the same sizes through the whole ``BertBiAttention`` module (six projections + both
  attentions; hidden 768 text / 1024 image, bi_hidden 1024): vilbert-multi-task's eager math
  (``vlops.reference.coattention.ViLBERTBiAttention``, extended -10000 masks) vs ``vlops.nn.CoAttention`` with
  the same weights.
- ``vqa_vilbert_attn``: the attention part of that module alone, on the same [B, N, H, d] projections as
  ``vqa``: the module's eager math (``ViLBERTBiAttention._attend``: matmul, scale, + the extended -10000
  mask, softmax, matmul, permute to [B, N, H d]) for both directions vs ``vlops.co_attention``. The six
  projections, the same GEMMs in both, are what ``vqa_vilbert`` adds.
- ``long`` (CUDA): Nt = 512, Nv = 2048 (random lengths from half to full), 8 heads, d = 128, vs SDPA.

Sizes (``--sizes``): ``headline``: batch 32 fp32 (CPU) / batch 256 bf16 (CUDA); ``long``: CUDA only, batch 8
bf16; ``small``: batch 2, 2 heads, d = 64, Nt = 8, Nv = 13, fp32 (also ``--quick``). Passes: forward, backward
(the forward run outside the timed region) and forward + backward (every input gradient; the module case:
every parameter gradient).

Floor: the attention flops, 4 H d (Nq x valid keys) per direction forward (QK^T and PV), 2.5x that for the
backward, counted over the valid keys only (plus the projection GEMMs, 2 N D_in D_out each and twice that
backward, in the module case), at the measured matmul rate of the dtype; or the bytes (q, k, v read and the
contexts written once; backward: q, k, v, the outputs and their gradients read, six gradients written),
whichever takes longer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import PASSES, Case, autograd_fns, dtype_bytes

OP = "coattention"


def _lengths(B, lo, hi, gen, device):
    return torch.randint(lo, hi + 1, (B,), generator=gen).to(device)


def _keep(lengths, N):
    return torch.arange(N, device=lengths.device)[None, :] < lengths[:, None]


def _attention_floor(B, H, d, Nt, Nv, t_len, i_len, pass_, elt):
    """(flops, bytes) of the two attentions."""
    pairs = Nt * float(i_len.sum()) + Nv * float(t_len.sum())  # (query, valid key) pairs, both directions
    flops = 4.0 * H * d * pairs * {"forward": 1.0, "backward": 2.5, "forward+backward": 3.5}[pass_]
    elems = B * (Nt + Nv) * H * d
    nbytes = elems * elt * {"forward": 4, "backward": 8, "forward+backward": 12}[pass_]
    return flops, nbytes


def _relerr(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _eager_vilbert_attention(B, H, d, Nt, Nv, t_keep, i_keep, dtype):
    """The attention math of the eager ViLBERT module on [B, N, H, d] projections (both directions)."""
    from vlops.reference.coattention import ViLBERTBiAttention, ViLBERTConfig, extended_attention_mask

    m = ViLBERTBiAttention(ViLBERTConfig(hidden_size=H * d, v_hidden_size=H * d, bi_hidden_size=H * d,
                                         bi_num_attention_heads=H)).eval()
    t_ext, i_ext = extended_attention_mask(t_keep, dtype), extended_attention_mask(i_keep, dtype)  # [B, 1, 1, N]

    def fn(ts):
        tq, tk, tv, iq, ik, iv = (t.transpose(1, 2) for t in ts)  # [B, H, N, d], as transpose_for_scores
        t_out = m._attend(tq, ik, iv, i_ext, m.dropout1)[0]
        i_out = m._attend(iq, tk, tv, t_ext, m.dropout2)[0]
        return t_out.view(B, Nt, H, d), i_out.view(B, Nv, H, d)
    return fn


def _attention_case(name, B, H, d, Nt, Nv, t_range, i_range, pass_, dtype, device, size, baseline="sdpa"):
    """Fused vs two masked SDPA calls (``baseline="sdpa"``) or vs the eager ViLBERT attention math
    (``"vilbert"``), on the same [B, N, H, d] projections."""
    import vlops

    grad = pass_ != "forward"
    gen = torch.Generator().manual_seed(0)
    t_len = _lengths(B, *t_range, gen, device)
    i_len = _lengths(B, *i_range, gen, device)
    t_keep, i_keep = _keep(t_len, Nt), _keep(i_len, Nv)
    t_mask, i_mask = t_keep[:, None, None, :], i_keep[:, None, None, :]

    def make():
        ts = [torch.randn(B, n, H, d, device=device, dtype=dtype).requires_grad_(grad)
              for n in (Nt, Nt, Nt, Nv, Nv, Nv)]
        gos = [torch.randn(B, n, H, d, device=device, dtype=dtype) for n in (Nt, Nv)] if grad else []
        return {"ts": ts, "gos": gos}

    def sdpa_fn(ts):
        tq, tk, tv, iq, ik, iv = (t.transpose(1, 2) for t in ts)  # [B, H, N, d] views
        t_out = F.scaled_dot_product_attention(tq, ik, iv, attn_mask=i_mask).transpose(1, 2)
        i_out = F.scaled_dot_product_attention(iq, tk, tv, attn_mask=t_mask).transpose(1, 2)
        return t_out, i_out

    if baseline not in ("sdpa", "vilbert"):
        raise ValueError(f"baseline must be 'sdpa' or 'vilbert', got {baseline!r}")
    eager_fn = sdpa_fn if baseline == "sdpa" else _eager_vilbert_attention(B, H, d, Nt, Nv, t_keep, i_keep, dtype)

    t_host, i_host = t_len.cpu(), i_len.cpu()  # the lengths' form that is range-checked with no device sync

    def fused_fn(ts):
        return vlops.co_attention(*ts, text_lengths=t_host, image_lengths=i_host)

    fns = autograd_fns(pass_, lambda inp: eager_fn(inp["ts"]), lambda inp: fused_fn(inp["ts"]),
                       leaves=lambda inp, fused: inp["ts"], out_grads=lambda inp, outs: inp["gos"], check=_relerr)
    if pass_ == "forward" and baseline == "sdpa":  # CUDA: also a graph replay (the GPU time alone; lengths
        # cannot be captured, the boolean masks can)
        fns["graph_fused"] = lambda inp: vlops.co_attention(*inp["ts"], text_mask=t_keep, image_mask=i_keep)
    flops, nbytes = _attention_floor(B, H, d, Nt, Nv, t_len, i_len, pass_, dtype_bytes(dtype))
    note = (f"H {H}, d {d}, text lengths {t_range[0]}..{t_range[1]} of {Nt}, image lengths "
            f"{i_range[0]}..{i_range[1]} of {Nv}; baseline: "
            + ("two SDPA calls with boolean key masks" if baseline == "sdpa"
               else "the eager ViLBERT module's attention math, -10000 masks"))
    return Case(name=name, op=OP, dtype=dtype, size=size, pass_=pass_, make=make, floor_bytes=nbytes,
                floor_flops=flops, eager_label=baseline, note=note, backends=("cpu", "triton", "reference"), **fns)


def _vilbert_case(name, B, cfg, Nt, Nv, i_range, pass_, dtype, device, size):
    import vlops
    from vlops.reference.coattention import ViLBERTBiAttention, extended_attention_mask

    grad = pass_ != "forward"
    torch.manual_seed(0)
    eager_m = ViLBERTBiAttention(cfg)
    with torch.no_grad():
        for p in eager_m.parameters():
            p.normal_(0.0, 0.02)
    eager_m = eager_m.to(device=device, dtype=dtype).eval()
    fused_m = vlops.nn.CoAttention(cfg).to(device=device, dtype=dtype).eval()
    fused_m.load_state_dict(eager_m.state_dict())
    gen = torch.Generator().manual_seed(0)
    i_len = _lengths(B, *i_range, gen, device)
    t_len = torch.full((B,), Nt, device=device)
    m1 = extended_attention_mask(_keep(i_len, Nv), dtype)  # image stream (1), [B, 1, 1, Nv]
    m2 = extended_attention_mask(_keep(t_len, Nt), dtype)  # text stream (2)

    def make():
        x1 = torch.randn(B, Nv, cfg.v_hidden_size, device=device, dtype=dtype)
        x2 = torch.randn(B, Nt, cfg.hidden_size, device=device, dtype=dtype)
        gos = [torch.randn(B, n, cfg.bi_hidden_size, device=device, dtype=dtype) for n in (Nt, Nv)] if grad else []
        return {"x1": x1, "x2": x2, "gos": gos}

    params = {False: list(eager_m.parameters()), True: list(fused_m.parameters())}
    fns = autograd_fns(pass_, lambda inp: eager_m(inp["x1"], m1, inp["x2"], m2)[:2],
                       lambda inp: fused_m(inp["x1"], m1, inp["x2"], m2)[:2],
                       leaves=lambda inp, fused: params[fused], out_grads=lambda inp, outs: inp["gos"], check=_relerr)
    bi, H = cfg.bi_hidden_size, cfg.bi_num_attention_heads
    flops, nbytes = _attention_floor(B, H, bi // H, Nt, Nv, t_len, i_len, pass_, dtype_bytes(dtype))
    gemm = 2.0 * 3 * bi * B * (Nv * cfg.v_hidden_size + Nt * cfg.hidden_size)  # the six projections
    times = {"forward": 1, "backward": 2, "forward+backward": 3}[pass_]  # backward: d input and d weight
    flops += gemm * times
    elt = dtype_bytes(dtype)
    w_bytes = 3 * bi * (cfg.v_hidden_size + cfg.hidden_size + 2) * elt
    x_bytes = B * (Nv * cfg.v_hidden_size + Nt * cfg.hidden_size) * elt
    nbytes += (w_bytes + x_bytes) * times
    note = (f"BertBiAttention hidden {cfg.hidden_size}/{cfg.v_hidden_size}, bi_hidden {bi}, {H} heads; image "
            f"lengths {i_range[0]}..{i_range[1]} of {Nv}; baseline: eager ViLBERT module, -10000 masks")
    return Case(name=name, op=OP, dtype=dtype, size=size, pass_=pass_, make=make, floor_bytes=nbytes,
                floor_flops=flops, eager_label="vilbert", note=note, backends=("cpu", "triton", "reference"), **fns)


def cases(device, quick: bool, sizes=None, dtypes=None):
    from vlops.reference.coattention import ViLBERTConfig

    device = torch.device(device)
    cuda = device.type == "cuda"
    labels = sizes or ({"small"} if quick else ({"small", "headline", "long"} if cuda else {"small", "headline"}))
    vilbert = ViLBERTConfig(hidden_size=768, v_hidden_size=1024, bi_hidden_size=1024, bi_num_attention_heads=8)
    for s in sorted(labels):
        if s == "small":
            small = dict(B=2, H=2, d=64, Nt=8, Nv=13, t=(8, 8), i=(5, 13))
            plan = [("vqa", small, [torch.float32]), ("vqa_vilbert_attn", small, [torch.float32]),
                    ("vqa_vilbert", dict(B=2, Nt=8, Nv=13, i=(5, 13),
                                         cfg=ViLBERTConfig(hidden_size=96, v_hidden_size=128, bi_hidden_size=128,
                                                           bi_num_attention_heads=2)), [torch.float32])]
        elif s == "headline":
            B, dts = (256, [torch.bfloat16]) if cuda else (32, [torch.float32])
            plan = [("vqa", dict(B=B, H=8, d=128, Nt=20, Nv=101, t=(20, 20), i=(37, 101)), dts),
                    ("vqa_vilbert_attn", dict(B=B, H=8, d=128, Nt=20, Nv=101, t=(20, 20), i=(37, 101)), dts),
                    ("vqa_vilbert", dict(B=B, Nt=20, Nv=101, i=(37, 101), cfg=vilbert), dts)]
        elif s == "long" and cuda:
            plan = [("long", dict(B=8, H=8, d=128, Nt=512, Nv=2048, t=(256, 512), i=(1024, 2048)),
                     [torch.bfloat16])]
        else:
            continue
        for name, kw, dts in plan:
            for dt in dtypes or dts:
                for pass_ in PASSES:
                    if name == "vqa_vilbert":
                        size = f"{kw['B']}x{kw['Nt']}x{kw['Nv']}x{kw['cfg'].bi_hidden_size}"
                        yield _vilbert_case(name, kw["B"], kw["cfg"], kw["Nt"], kw["Nv"], kw["i"], pass_, dt, device,
                                            size)
                    else:
                        size = f"{kw['B']}x{kw['H']}x{kw['Nt']}x{kw['Nv']}x{kw['d']}"
                        yield _attention_case(name, kw["B"], kw["H"], kw["d"], kw["Nt"], kw["Nv"], kw["t"], kw["i"],
                                              pass_, dt, device, size,
                                              baseline="vilbert" if name == "vqa_vilbert_attn" else "sdpa")
