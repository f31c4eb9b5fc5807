"""Eager PyTorch specification of the fused patch stem of ViT / CLIP image towers: patch unfold, projection
GEMM, bias, optional per-patch LayerNorm, class and register tokens, position embedding and the optional
LayerNorm before the first block, written as one [B, T, D] token buffer.

It is written from the math of three anchors, and :func:`from_timm`, :func:`from_open_clip`,
:func:`from_hf` pull their tensors out so that ``patch_embed(images, **kw)`` equals:

- timm ``VisionTransformer``: ``norm_pre(_pos_embed(patch_embed(x)))`` (``PatchEmbed.proj``, its
  ``norm``, ``cls_token``, ``reg_token``, ``pos_embed``, ``no_embed_class``, ``dynamic_img_pad``);
- open_clip ``VisionTransformer``: ``ln_pre(cat(class_embedding, conv1(x) tokens) + positional_embedding)``
  (``_embeds``; ``patch_dropout`` is the identity in eval);
- Hugging Face ``CLIPVisionEmbeddings`` + ``pre_layrnorm`` (and ``SiglipVisionEmbeddings``: no class
  token, conv bias, no pre-norm).

Definition (image ``b``; ``weight`` [D, C, P, P], K = C P P):

    x      = images[b], zero-padded on the right and bottom to Gh P x Gw P    (dynamic_pad; else P | H, W)
    Gh, Gw = ceil(H / P), ceil(W / P)                                          N = Gh Gw
    p[n]   = x[:, gh P:(gh+1) P, gw P:(gw+1) P].reshape(K)                     n = gh Gw + gw (row-major)
    e[n]   = weight.reshape(D, K) @ p[n] + bias                                (Conv2d, kernel = stride = P)
    e[n]   = LN(e[n]; patch_norm)                                              (timm PatchEmbed.norm)
    tokens = [cls_token, reg_tokens[0], ..., reg_tokens[R-1], e[0], ..., e[N-1]]      T = 1 + R + N
    tokens = tokens + pos_embed            (pos_embed_prefix: all T rows; else the N patch rows only and
                                            the prefix tokens get no position: timm no_embed_class)
    out    = LN(tokens; ln)                                                    (ln_pre / norm_pre)

``LN(v; (w, b, eps)) = (v - mean(v)) / sqrt(var(v) + eps) * w + b`` over D, biased variance, ``w`` / ``b``
skipped when None.

Precision: with float64 ``images`` every step is in float64 (the float64 reference). With float32,
float16 or bfloat16 ``images``, the images and every parameter are upcast to float32 and every step
(GEMM accumulation, bias, position add, LayerNorm statistics and affine) is in float32; the result is
rounded once to ``images.dtype``. Parameters may have any float dtype. The eager modules at 16 bits round
after the conv, the add and each norm; a fused kernel keeps the token in fp32 until the store, as here.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .. import _validate

INTERPOLATION_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")


def _vector(t, name: str, D: int):
    if t is None:
        return None
    _validate.tensor(t, name, floating=True)
    if tuple(t.shape) != (D,):
        raise ValueError(f"{name} must have shape ({D},) (D = weight.shape[0]), got {tuple(t.shape)}")
    return t


def _norm_params(arg, name: str, D: int):
    """Check a ``(weight, bias, eps)`` LayerNorm tuple; returns it with eps as a float."""
    if arg is None:
        return None
    if not isinstance(arg, (tuple, list)) or len(arg) != 3:
        raise TypeError(f"{name} must be None or a (weight, bias, eps) tuple, got {type(arg).__name__}"
                        + (f" of length {len(arg)}" if isinstance(arg, (tuple, list)) else ""))
    w, b, eps = arg
    w = _vector(w, f"{name} weight", D)
    b = _vector(b, f"{name} bias", D)
    eps = _validate.real(eps, f"{name} eps", lo=0.0)
    return w, b, eps


def _rows(t, name: str, D: int, *, one_row: bool = False):
    """``[n, D]`` or ``[1, n, D]`` (``one_row``: ``[D]`` or ``[1, 1, D]``) -> a ``[n, D]`` view."""
    if t is None:
        return None
    _validate.tensor(t, name, floating=True)
    shape = tuple(t.shape)
    if one_row:
        ok = shape in ((D,), (1, 1, D))
        want = f"({D},) or (1, 1, {D})"
    else:
        ok = (t.ndim == 2 and shape[1] == D) or (t.ndim == 3 and shape[0] == 1 and shape[2] == D)
        want = f"(n, {D}) or (1, n, {D})"
    if not ok:
        raise ValueError(f"{name} must have shape {want} (D = weight.shape[0]), got {shape}")
    return t.reshape(-1, D)


def _layer_norm(x, params):
    if params is None:
        return x
    w, b, eps = params
    D = x.shape[-1]
    return F.layer_norm(x, (D,), None if w is None else w.to(x.dtype), None if b is None else b.to(x.dtype), eps)


def grid_size(height: int, width: int, patch_size: int, dynamic_pad: bool = False) -> tuple[int, int]:
    """Patch grid ``(Gh, Gw)`` of an ``height`` x ``width`` image: ceil division with ``dynamic_pad``,
    exact division otherwise."""
    if dynamic_pad:
        return -(-height // patch_size), -(-width // patch_size)
    return height // patch_size, width // patch_size


class StemArgs(NamedTuple):
    """The checked arguments of a patch stem call (see :func:`check_args`)."""

    B: int
    C: int
    H: int
    W: int
    D: int
    P: int
    Gh: int
    Gw: int
    N: int
    bias: Optional[torch.Tensor]
    cls: Optional[torch.Tensor]
    reg: Optional[torch.Tensor]
    pos: Optional[torch.Tensor]
    patch_norm: Optional[tuple]
    ln: Optional[tuple]
    n_prefix: int
    pos_embed_prefix: bool
    dynamic_pad: bool


def check_args(images, weight, bias=None, *, cls_token=None, reg_tokens=None, pos_embed=None,
               pos_embed_prefix: bool = True, patch_norm=None, ln=None, dynamic_pad: bool = False) -> StemArgs:
    """Validate the arguments of :func:`patch_embed` (errors name the argument) and return them
    normalised: ``B, C, H, W, D, P, Gh, Gw, N`` (ints), ``bias`` [D], ``cls`` [1, D], ``reg`` [R, D],
    ``pos`` [T_pos, D] (views or None), ``patch_norm`` / ``ln`` ``(weight, bias, eps)`` or None,
    ``n_prefix``, ``pos_embed_prefix``, ``dynamic_pad``. The fused op (:mod:`vlops.ops.patch_embed`)
    checks its arguments with this same function."""
    _validate.tensor(images, "images", floating=True)
    _validate.tensor(weight, "weight", floating=True)
    if images.ndim != 4:
        raise ValueError(f"images must be 4-D [B, C, H, W], got shape {tuple(images.shape)}")
    if weight.ndim != 4:
        raise ValueError(f"weight must be 4-D [D, C, P, P], got shape {tuple(weight.shape)}")
    D, C, P, P2 = weight.shape
    if P != P2:
        raise ValueError(f"weight must hold square patches [D, C, P, P], got shape {tuple(weight.shape)}")
    if D == 0 or P == 0:
        raise ValueError(f"weight must have D >= 1 and P >= 1, got shape {tuple(weight.shape)}")
    B, Ci, H, W = images.shape
    if Ci != C:
        raise ValueError(f"images has {Ci} channels but weight expects C = {C} (weight shape {tuple(weight.shape)})")
    if H == 0 or W == 0:
        raise ValueError(f"images must have a positive height and width, got shape {tuple(images.shape)}")
    _validate.boolean(pos_embed_prefix, "pos_embed_prefix")
    _validate.boolean(dynamic_pad, "dynamic_pad")
    if not dynamic_pad and (H % P or W % P):
        raise ValueError(f"images height and width ({H}, {W}) must be multiples of the patch size P = {P} "
                         f"(or pass dynamic_pad=True to zero-pad them)")
    bias = _vector(bias, "bias", D)
    cls = _rows(cls_token, "cls_token", D, one_row=True)
    reg = _rows(reg_tokens, "reg_tokens", D)
    if reg is not None and reg.shape[0] == 0:
        raise ValueError("reg_tokens must hold at least one token (pass None for none), got R = 0")
    pos = _rows(pos_embed, "pos_embed", D)
    patch_norm = _norm_params(patch_norm, "patch_norm", D)
    ln = _norm_params(ln, "ln", D)
    _validate.same_device(images, "images", weight=weight, bias=bias, cls_token=cls_token, reg_tokens=reg_tokens,
                          pos_embed=pos_embed,
                          **{f"{n} {p}": t for n, prm in (("patch_norm", patch_norm), ("ln", ln)) if prm is not None
                             for p, t in zip(("weight", "bias"), prm[:2])})

    Gh, Gw = grid_size(H, W, P, dynamic_pad)
    N = Gh * Gw
    n_prefix = (cls is not None) + (0 if reg is None else reg.shape[0])
    if pos is not None:
        expected = n_prefix + N if pos_embed_prefix else N
        if pos.shape[0] != expected:
            what = f"{n_prefix} prefix + {Gh}x{Gw} patches" if pos_embed_prefix else f"{Gh}x{Gw} patches"
            raise ValueError(f"pos_embed has {pos.shape[0]} positions but pos_embed_prefix={pos_embed_prefix} "
                             f"needs one per token: expected {expected} ({what}), got {pos.shape[0]}")

    return StemArgs(B=B, C=C, H=H, W=W, D=D, P=P, Gh=Gh, Gw=Gw, N=N, bias=bias, cls=cls, reg=reg, pos=pos,
                    patch_norm=patch_norm, ln=ln, n_prefix=n_prefix, pos_embed_prefix=pos_embed_prefix,
                    dynamic_pad=dynamic_pad)


def patch_embed(images, weight, bias=None, *, cls_token=None, reg_tokens=None, pos_embed=None,
                pos_embed_prefix: bool = True, patch_norm=None, ln=None, dynamic_pad: bool = False):
    """The patch stem: ``images`` [B, C, H, W] -> tokens [B, T, D], ``T = [cls] + R + Gh Gw``.

    Args:
        images: [B, C, H, W], any strides (channels_last and slices work); not modified.
        weight: [D, C, P, P], the patch projection (a Conv2d with kernel = stride = P); square patches.
        bias: [D] or None.
        cls_token: [D] or [1, 1, D] or None.
        reg_tokens: [R, D] or [1, R, D] (R >= 1) or None; they follow the class token.
        pos_embed: [T_pos, D] or [1, T_pos, D] or None. ``T_pos`` is the token count T with
            ``pos_embed_prefix=True`` (timm default, open_clip, HF) and the patch count ``Gh Gw`` with
            ``pos_embed_prefix=False`` (timm ``no_embed_class=True``: prefix tokens get no position).
        patch_norm: None or ``(weight, bias, eps)``: LayerNorm over D of every patch token before the
            position add (timm ``PatchEmbed.norm``); weight / bias may be None.
        ln: None or ``(weight, bias, eps)``: LayerNorm over D of every token after the position add
            (open_clip ``ln_pre``, HF ``pre_layrnorm``, timm ``norm_pre``).
        dynamic_pad: zero-pad H and W on the bottom / right up to multiples of P (timm
            ``dynamic_img_pad``); without it H and W must be multiples of P.

    Returns:
        [B, T, D] in ``images.dtype``, computed as the module docstring says (float64 for float64
        images, float32 otherwise).
    """
    a = check_args(images, weight, bias, cls_token=cls_token, reg_tokens=reg_tokens, pos_embed=pos_embed,
                   pos_embed_prefix=pos_embed_prefix, patch_norm=patch_norm, ln=ln, dynamic_pad=dynamic_pad)
    B, C, H, W, D, P, Gh, Gw, N = a.B, a.C, a.H, a.W, a.D, a.P, a.Gh, a.Gw, a.N
    bias, cls, reg, pos, patch_norm, ln = a.bias, a.cls, a.reg, a.pos, a.patch_norm, a.ln

    cdt = torch.float64 if images.dtype == torch.float64 else torch.float32
    x = images.to(cdt)
    if dynamic_pad and (Gh * P != H or Gw * P != W):
        x = F.pad(x, (0, Gw * P - W, 0, Gh * P - H))
    K = C * P * P
    patches = x.reshape(B, C, Gh, P, Gw, P).permute(0, 2, 4, 1, 3, 5).reshape(B, N, K)
    e = patches @ weight.to(cdt).reshape(D, K).T
    if bias is not None:
        e = e + bias.to(cdt)
    e = _layer_norm(e, patch_norm)
    if pos is not None and not pos_embed_prefix:
        e = e + pos.to(cdt)
    prefix = [t.to(cdt) for t in (cls, reg) if t is not None]
    tokens = torch.cat([torch.cat(prefix).expand(B, -1, -1), e], dim=1) if prefix else e
    if pos is not None and pos_embed_prefix:
        tokens = tokens + pos.to(cdt)
    tokens = _layer_norm(tokens, ln)
    return tokens.to(images.dtype)


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        v = (v, v)
    if (not isinstance(v, (tuple, list, torch.Size)) or len(v) != 2
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in v)):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints (rows, cols), got {v!r}")
    return int(v[0]), int(v[1])


def resample_pos_embed(pos_embed, new_grid, old_grid=None, num_prefix_tokens: int = 1, mode: str = "bicubic",
                       antialias: bool = True):
    """Resize the patch part of a position embedding to a new grid, as timm's ``resample_abs_pos_embed``.

    ``pos_embed`` [T, D] or [1, T, D]: ``num_prefix_tokens`` rows (kept as they are), then an
    ``old_grid`` = (rows, cols) grid in row-major order (square when None). The grid is interpolated with
    ``F.interpolate(mode, antialias, align_corners=None)`` to ``new_grid`` and the prefix rows put back in
    front. As timm does, the interpolation runs in float32 whatever the dtype (a float64 ``pos_embed``
    gets float32-rounded grid rows) and the result has ``pos_embed``'s dtype; and ``pos_embed`` itself
    is returned when the token count already matches and the grid is unchanged (``old_grid`` given and
    equal to ``new_grid``, or ``old_grid`` None and ``new_grid`` square). Returns the rank it was given.

    Hugging Face CLIP's ``interpolate_pos_encoding`` is this with ``new_grid = (H // P, W // P)``,
    ``num_prefix_tokens=1`` and ``antialias=False`` (in float32).
    """
    _validate.tensor(pos_embed, "pos_embed", floating=True)
    if not (pos_embed.ndim == 2 or (pos_embed.ndim == 3 and pos_embed.shape[0] == 1)):
        raise ValueError(f"pos_embed must have shape (T, D) or (1, T, D), got {tuple(pos_embed.shape)}")
    new_grid = _pair(new_grid, "new_grid")
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, numbers.Integral):
        raise TypeError(f"num_prefix_tokens must be an int, got {type(num_prefix_tokens).__name__}")
    _validate.choice(mode, "mode", INTERPOLATION_MODES)
    _validate.boolean(antialias, "antialias")
    if antialias and mode not in ("bilinear", "bicubic"):
        raise ValueError(f"antialias=True needs mode 'bilinear' or 'bicubic', got {mode!r}")
    squeeze = pos_embed.ndim == 2
    posemb = pos_embed.unsqueeze(0) if squeeze else pos_embed
    T, D = posemb.shape[1], posemb.shape[2]
    if not 0 <= num_prefix_tokens <= T:
        raise ValueError(f"num_prefix_tokens must be in [0, {T}] (pos_embed has T = {T}), got {num_prefix_tokens}")
    n_old = T - num_prefix_tokens
    if old_grid is not None:
        old_grid = _pair(old_grid, "old_grid")
        if old_grid[0] * old_grid[1] != n_old:
            raise ValueError(f"old_grid {old_grid} has {old_grid[0] * old_grid[1]} cells but pos_embed has "
                             f"{n_old} grid rows (T = {T} minus num_prefix_tokens = {num_prefix_tokens})")
    if new_grid[0] * new_grid[1] + num_prefix_tokens == T:
        if (old_grid is not None and old_grid == new_grid) or (old_grid is None and new_grid[0] == new_grid[1]):
            return pos_embed
    if old_grid is None:
        hw = math.isqrt(n_old)
        if hw * hw != n_old:
            raise ValueError(f"pos_embed has {n_old} grid rows (T = {T} minus num_prefix_tokens = "
                             f"{num_prefix_tokens}), not a square: pass old_grid")
        old_grid = (hw, hw)
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    g = grid.float().reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=new_grid, mode=mode, align_corners=None, antialias=antialias)
    g = g.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos_embed.dtype)
    out = torch.cat([prefix, g], dim=1) if num_prefix_tokens else g
    return out.squeeze(0) if squeeze else out


# ---------------------------------------------------------------------------------------------------------
# Extractors: the anchors' tensors (the parameters themselves, no copies) as patch_embed keyword arguments.


def _conv_weight(conv, where: str):
    import torch.nn as nn

    if not isinstance(conv, nn.Conv2d):
        raise NotImplementedError(f"{where} is a {type(conv).__name__}; only a Conv2d patch projection is supported")
    k = tuple(conv.kernel_size)
    if (k[0] != k[1] or tuple(conv.stride) != k or conv.padding not in ((0, 0), "valid")
            or tuple(conv.dilation) != (1, 1) or conv.groups != 1):
        raise NotImplementedError(
            f"{where} must be a square patchifying Conv2d (kernel = stride, no padding, dilation 1, groups 1), got "
            f"kernel {k}, stride {tuple(conv.stride)}, padding {conv.padding}, dilation {tuple(conv.dilation)}, "
            f"groups {conv.groups}")
    return conv.weight, conv.bias


def _norm_module(mod, where: str, D: int):
    import torch.nn as nn

    if mod is None or isinstance(mod, nn.Identity):
        return None
    if not isinstance(mod, nn.LayerNorm):
        raise NotImplementedError(f"{where} is a {type(mod).__name__}; only LayerNorm (or none) is supported")
    if tuple(mod.normalized_shape) != (D,):
        raise NotImplementedError(f"{where} normalizes over {tuple(mod.normalized_shape)}, not ({D},)")
    return mod.weight, mod.bias, mod.eps


def from_timm(vit, image_size=None) -> dict:
    """``patch_embed`` keyword arguments for a timm ``VisionTransformer``: ``patch_embed(x, **from_timm(vit))``
    equals ``vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))`` in eval mode (``pos_drop`` and
    ``patch_drop`` are the identity there).

    A model built with ``dynamic_img_size=True`` resamples its position embedding per input size: pass
    ``image_size=(H, W)`` of the images and the embedding is resampled as timm does (a new tensor unless
    the grid is unchanged). ``image_size`` is not used otherwise.
    """
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"vit must be a timm VisionTransformer, got {type(vit).__name__}")
    if type(vit)._pos_embed is not VisionTransformer._pos_embed:
        raise NotImplementedError(f"{type(vit).__name__} overrides VisionTransformer._pos_embed; not supported")
    pe = vit.patch_embed
    if not isinstance(pe, PatchEmbed) or type(pe).forward is not PatchEmbed.forward:
        raise NotImplementedError(f"vit.patch_embed is a {type(pe).__name__}; only timm PatchEmbed is supported")
    weight, bias = _conv_weight(pe.proj, "vit.patch_embed.proj")
    D = weight.shape[0]
    pos = vit.pos_embed
    if vit.dynamic_img_size and pos is not None:
        if image_size is None:
            raise ValueError("vit was built with dynamic_img_size=True: pass image_size=(H, W) of the images so "
                             "that its pos_embed can be resampled to their patch grid")
        H, W = _pair(image_size, "image_size")
        grid = grid_size(H, W, weight.shape[-1], pe.dynamic_img_pad)
        pos = resample_pos_embed(pos, grid, old_grid=pe.grid_size,
                                 num_prefix_tokens=0 if vit.no_embed_class else vit.num_prefix_tokens)
    return dict(weight=weight, bias=bias, cls_token=vit.cls_token, reg_tokens=vit.reg_token, pos_embed=pos,
                pos_embed_prefix=not vit.no_embed_class,
                patch_norm=_norm_module(pe.norm, "vit.patch_embed.norm", D),
                ln=_norm_module(vit.norm_pre, "vit.norm_pre", D), dynamic_pad=bool(pe.dynamic_img_pad))


def from_open_clip(visual) -> dict:
    """``patch_embed`` keyword arguments for an open_clip ``VisionTransformer`` (``model.visual``; the CLIP
    model itself is accepted too): ``patch_embed(x, **from_open_clip(visual))`` equals ``visual._embeds(x)``,
    ``ln_pre(cat(class_embedding, conv1 tokens) + positional_embedding)``, in eval mode."""
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer) and isinstance(getattr(visual, "visual", None), torch.nn.Module):
        visual = visual.visual
    if not isinstance(visual, VisionTransformer):
        raise NotImplementedError(f"{type(visual).__name__} is not an open_clip VisionTransformer; for a timm tower "
                                  "(open_clip TimmModel) use from_timm(visual.trunk)")
    embeds = getattr(type(visual), "_embeds", None)
    if embeds is not None and embeds is not VisionTransformer._embeds:
        raise NotImplementedError(f"{type(visual).__name__} overrides VisionTransformer._embeds; not supported")
    weight, bias = _conv_weight(visual.conv1, "visual.conv1")
    D = weight.shape[0]
    return dict(weight=weight, bias=bias, cls_token=visual.class_embedding, reg_tokens=None,
                pos_embed=visual.positional_embedding, pos_embed_prefix=True, patch_norm=None,
                ln=_norm_module(visual.ln_pre, "visual.ln_pre", D), dynamic_pad=False)


def from_hf(module, pre_layrnorm=None) -> dict:
    """``patch_embed`` keyword arguments for a Hugging Face CLIP vision tower: ``CLIPVisionModel``,
    ``CLIPModel`` or anything with ``vision_model`` / ``embeddings`` / ``pre_layrnorm``, or a bare
    ``CLIPVisionEmbeddings`` (then pass its ``pre_layrnorm`` module, or none). The result equals
    ``vision_model.pre_layrnorm(vision_model.embeddings(pixel_values))`` at the configured image size.
    SigLIP towers (no class embedding, conv bias, no pre-norm) work too. ``position_embedding.weight`` is
    used as is (``position_ids`` is ``arange`` in these models)."""
    import torch.nn as nn

    m = module
    while isinstance(getattr(m, "vision_model", None), nn.Module):
        m = m.vision_model
    if isinstance(getattr(m, "embeddings", None), nn.Module):
        emb = m.embeddings
        if pre_layrnorm is None:
            pre_layrnorm = getattr(m, "pre_layrnorm", None)
    else:
        emb = m
    if not isinstance(getattr(emb, "patch_embedding", None), nn.Module) or not isinstance(
            getattr(emb, "position_embedding", None), nn.Embedding):
        raise NotImplementedError(f"{type(emb).__name__} has no patch_embedding Conv2d and position_embedding "
                                  "Embedding; only CLIP-style vision embeddings are supported")
    weight, bias = _conv_weight(emb.patch_embedding, "embeddings.patch_embedding")
    D = weight.shape[0]
    return dict(weight=weight, bias=bias, cls_token=getattr(emb, "class_embedding", None), reg_tokens=None,
                pos_embed=emb.position_embedding.weight, pos_embed_prefix=True, patch_norm=None,
                ln=_norm_module(pre_layrnorm, "pre_layrnorm", D), dynamic_pad=False)
