"""``vlops.nn.PatchEmbed``: timm's ``PatchEmbed`` (same constructor, attributes and ``proj.*`` / ``norm.*``
state_dict keys) computed by the fused patch stem :func:`vlops.patch_embed`. Imports nothing beyond torch."""
from __future__ import annotations

import torch
from torch import nn


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def layer_norm_params(norm: nn.Module, where: str):
    """``(weight, bias, eps)`` of a LayerNorm over the last dim, None for an identity; anything else is not
    supported by the fused stem (a clear error)."""
    if norm is None or isinstance(norm, nn.Identity):
        return None
    if isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1:
        return norm.weight, norm.bias, norm.eps
    raise NotImplementedError(f"{where}: the fused stem supports nn.LayerNorm or nn.Identity here, got "
                              f"{type(norm).__name__}")


class PatchEmbed(nn.Module):
    """Image to patch tokens, as timm's ``PatchEmbed`` (``flatten=True``, the ViT stem's setting): a
    stride-``patch_size`` projection, optional ``norm_layer`` (LayerNorm) per token, [B, N, D] out.

    Same constructor arguments and attributes (``patch_size``, ``img_size``, ``grid_size``,
    ``num_patches``, ``flatten``, ``strict_img_size``, ``dynamic_img_pad``, ``proj``, ``norm``), so a timm
    state_dict loads as is. ``output_fmt`` other than "NLC" and ``flatten=False`` (NCHW feature maps) are
    not fused: they raise NotImplementedError. Non-square patches are not supported."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None, flatten=True,
                 output_fmt=None, bias=True, strict_img_size=True, dynamic_img_pad=False, device=None,
                 dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.patch_size = _pair(patch_size)
        if self.patch_size[0] != self.patch_size[1]:
            raise NotImplementedError(f"patch_size must be square for the fused stem, got {self.patch_size}")
        if output_fmt is not None and str(getattr(output_fmt, "value", output_fmt)) != "NLC":
            raise NotImplementedError(f"output_fmt {output_fmt!r}: the fused stem writes tokens [B, N, D] (NLC)")
        if not flatten and output_fmt is None:
            raise NotImplementedError("flatten=False (NCHW feature maps) is not fused; use timm's PatchEmbed")
        if img_size is None:
            self.img_size = self.grid_size = self.num_patches = None
        else:
            self.img_size = _pair(img_size)
            self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
            self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = True
        self.output_fmt = "NLC"
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias, **dd)
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()
        layer_norm_params(self.norm, "PatchEmbed norm_layer")  # fail early on an unsupported norm

    def dynamic_feat_size(self, img_size):
        p = self.patch_size[0]
        if self.dynamic_img_pad:
            return -(-img_size[0] // p), -(-img_size[1] // p)
        return img_size[0] // p, img_size[1] // p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from vlops.stem import patch_embed

        if x.ndim != 4:
            raise ValueError(f"PatchEmbed input must be [B, C, H, W], got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if self.img_size is not None and self.strict_img_size and (H, W) != self.img_size:
            raise ValueError(f"Input size ({H}, {W}) doesn't match model {self.img_size} (strict_img_size=True)")
        return patch_embed(x, self.proj.weight, self.proj.bias, patch_norm=layer_norm_params(self.norm, "norm"),
                           dynamic_pad=self.dynamic_img_pad)
