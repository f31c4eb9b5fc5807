"""Benchmark cases of the fused patch stem: timm's ViT stem (``patch_embed`` conv + flatten/transpose,
``_pos_embed`` cat + add, ``norm_pre``) and open_clip's CLIP stem (``conv1`` ... ``ln_pre``) eager, against
``vlops.patch_embed`` with the same module's tensors (``vlops.reference.patch_embed.from_timm`` /
``from_open_clip``). Random weights; images normal.

Sizes (``--sizes``): ``headline`` ViT-B/16 224, batch 32, fp32 (CPU) / ViT-B/16 and ViT-L/14 224,
batch 256, bf16 (CUDA); ``small`` ViT-B/16 224 batch 4 (also ``--quick``). Passes: forward, backward (the
forward run outside the timed region) and forward + backward (gradients of every stem parameter, not of the
images). On CUDA the forward also gets a ``+graph`` row: a CUDA-graph replay of the fused call, its GPU time
without the host's.

Floor: the GEMM's 2 (B N) (C P P) D flops (the forward's projection; the backward's d_weight the same again)
at the measured matmul rate of the dtype, or the bytes (images read once, tokens (or their gradient) once,
weight once, for each of the two), whichever takes longer.
"""
from __future__ import annotations

import torch

from . import PASSES, Case, autograd_fns, dtype_bytes

OP = "patch_embed"
MODELS = {  # name: (patch, width, heads, timm-style ViT (False: open_clip CLIP tower, with ln_pre))
    "vit_b16": (16, 768, 12, True),
    "clip_b16": (16, 768, 12, False),
    "vit_l14": (14, 1024, 16, True),
}


def _model(kind, device, dtype):
    P, width, heads, timm_style = MODELS[kind]
    torch.manual_seed(0)
    if timm_style:
        from timm.models.vision_transformer import VisionTransformer

        m = VisionTransformer(img_size=224, patch_size=P, embed_dim=width, depth=1, num_heads=heads)
    else:
        from open_clip.transformer import VisionTransformer

        m = VisionTransformer(image_size=224, patch_size=P, width=width, layers=1, heads=heads, mlp_ratio=4.0,
                              output_dim=512)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.02)
    return m.to(device=device, dtype=dtype).eval()


def _case(kind, B, pass_, dtype, device):
    from vlops.reference import patch_embed as ref
    import vlops

    m = _model(kind, device, dtype)
    timm_style = MODELS[kind][3]
    params = [p for p in m.parameters() if p.requires_grad]

    def eager_stem(x):
        if timm_style:
            return m.norm_pre(m._pos_embed(m.patch_embed(x)))
        return m.ln_pre(torch.cat([m.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1),
                                   m.conv1(x).flatten(2).transpose(1, 2)], 1) + m.positional_embedding)

    def fused_stem(x):
        kw = ref.from_timm(m) if timm_style else ref.from_open_clip(m)
        return vlops.patch_embed(x, **kw)

    def make():
        return torch.randn(B, 3, 224, 224, device=device, dtype=dtype)

    def relerr(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    fns = autograd_fns(pass_, eager_stem, fused_stem, leaves=lambda x, fused: params, check=relerr)
    if pass_ == "forward":  # CUDA: also a graph replay of the fused forward (its GPU time without the host)
        fns["graph_fused"] = fns["fused"]
    P, D = MODELS[kind][0], MODELS[kind][1]
    N = (224 // P) ** 2
    K = 3 * P * P
    # the projection (forward) and d_weight (backward; no image gradient), 2 (B N) K D flops each
    flops = 2.0 * B * N * K * D * (2 if pass_ == "forward+backward" else 1)
    nbytes = (B * 3 * 224 * 224 + B * (N + 1) * D + D * K) * dtype_bytes(dtype) * (2 if pass_ == "forward+backward"
                                                                                  else 1)
    return Case(name=kind, op=OP, dtype=dtype, size=f"{B}x3x224x224", pass_=pass_, make=make,
                floor_bytes=nbytes, floor_flops=flops, eager_label="timm" if timm_style else "open_clip", **fns,
                note=f"patch {P}, width {D}" + ("" if timm_style else ", ln_pre"), backends=("cpu", "triton"))


def cases(device, quick: bool, sizes=None, dtypes=None):
    device = torch.device(device)
    try:
        import open_clip  # noqa: F401
        import timm  # noqa: F401
    except ImportError:
        return
    cuda = device.type == "cuda"
    labels = sizes or ({"small"} if quick else {"small", "headline"})
    for s in sorted(labels):
        if s == "small":
            plan = [("vit_b16", 4, [torch.float32]), ("clip_b16", 4, [torch.float32])]
        elif s == "headline":
            plan = ([("vit_b16", 256, [torch.bfloat16]), ("clip_b16", 256, [torch.bfloat16]),
                     ("vit_l14", 256, [torch.bfloat16])] if cuda
                    else [("vit_b16", 32, [torch.float32]), ("clip_b16", 32, [torch.float32])])
        else:
            continue
        for kind, B, dts in plan:
            for dt in dtypes or dts:
                for pass_ in PASSES:
                    yield _case(kind, B, pass_, dt, device)
