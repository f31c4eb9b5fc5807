"""The fused patch stem of ViT / CLIP image towers: ``vlops.patch_embed``.

One call does what the eager stems run as four or more kernels (stride-P convolution, flatten and
transpose, class / register tokens, position embedding, LayerNorm): the patch tokens are computed by an
implicit GEMM that gathers the patches straight from the images, with bias, position embedding and
LayerNorm in its epilogue, and the [B, T, D] tokens are written once. The math is
:func:`vlops.reference.patch_embed.patch_embed` (token order, ``pos_embed_prefix``, the two LayerNorms,
``dynamic_pad``); the kernel contract is :mod:`vlops.ops.patch_embed`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops.patch_embed import patch_embed as _patch_embed_call
from .reference.patch_embed import check_args

__all__ = ["patch_embed"]


def patch_embed(images, weight, bias=None, *, cls_token=None, reg_tokens=None, pos_embed=None,
                pos_embed_prefix: bool = True, patch_norm=None, ln=None, dynamic_pad: bool = False):
    """Fused patch stem: ``images`` [B, C, H, W] -> tokens [B, T, D] in ``images.dtype``.

    Args (as :func:`vlops.reference.patch_embed.patch_embed`):
        images: [B, C, H, W] float32 / float16 / bfloat16 (float64 on CPU), any strides (channels_last
            and slices are read in place); not modified.
        weight: [D, C, P, P] patch projection (a Conv2d with kernel = stride = P); bias: [D] or None.
        cls_token: [D] / [1, 1, D] or None; reg_tokens: [R, D] / [1, R, D] or None (after the class token).
        pos_embed: [T_pos, D] / [1, T_pos, D] or None: all T tokens when ``pos_embed_prefix`` (timm's
            default, open_clip, Hugging Face), the patch tokens only otherwise (timm ``no_embed_class``).
        patch_norm: None or ``(weight, bias, eps)``: LayerNorm of each patch token before the position add
            (timm ``PatchEmbed.norm``). ln: None or ``(weight, bias, eps)``: LayerNorm of every token after
            it (open_clip ``ln_pre``, Hugging Face ``pre_layrnorm``, timm ``norm_pre``).
        dynamic_pad: zero-pad H and W on the bottom / right to multiples of P (timm ``dynamic_img_pad``);
            without it they must be multiples of P.

    Every tensor argument gets a gradient when it requires one (the images too). The computation is in
    float32 (float64 for float64 images) and rounded once to ``images.dtype``. With a LayerNorm on and a
    gradient to come (grad mode on, some tensor argument requiring grad), the forward also keeps the
    pre-norm rows W p + bias in float32 ([B Gh Gw, D], 4 bytes each: 19 MB for CLIP B/16 at batch 32)
    for the backward, which then does not run the projection GEMM a second time.
    """
    a = check_args(images, weight, bias, cls_token=cls_token, reg_tokens=reg_tokens, pos_embed=pos_embed,
                   pos_embed_prefix=pos_embed_prefix, patch_norm=patch_norm, ln=ln, dynamic_pad=dynamic_pad)
    cdt = torch.float64 if images.dtype == torch.float64 else torch.float32
    R0 = a.n_prefix
    prefix = None
    if R0:  # the prefix rows are the same for every image: computed once here (R0 x D)
        rows = [t for t in (a.cls, a.reg) if t is not None]
        prefix = rows[0].to(cdt) if len(rows) == 1 else torch.cat([t.to(cdt) for t in rows])
        if a.pos is not None and a.pos_embed_prefix:
            prefix = prefix + a.pos[:R0].to(cdt)
        if a.ln is not None:
            w, b, eps = a.ln
            prefix = F.layer_norm(prefix, (a.D,), None if w is None else w.to(cdt), None if b is None else b.to(cdt),
                                  eps)
    pos = None
    if a.pos is not None:
        pos = a.pos[R0:] if a.pos_embed_prefix else a.pos
    pn_w, pn_b, pn_eps = a.patch_norm if a.patch_norm is not None else (None, None, 0.0)
    ln_w, ln_b, ln_eps = a.ln if a.ln is not None else (None, None, 0.0)
    use_pn, use_ln = a.patch_norm is not None, a.ln is not None
    # keep x0 for the backward only when a backward kernel will run and needs it (a LayerNorm's statistics;
    # the prefix rows' gradient needs no kernel)
    save_x0 = (use_pn or use_ln) and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (images, weight, a.bias, pos, pn_w, pn_b, ln_w, ln_b))
    out, _ = _patch_embed_call(images, weight, a.bias, prefix, pos, pn_w, pn_b, float(pn_eps), use_pn, ln_w, ln_b,
                               float(ln_eps), use_ln, save_x0)
    return out
