"""A small reference CLIP (open_clip's ``CLIP`` layout) built on the fused vlops ops.

The image tower is a ViT: the patch stem (stride-P projection, class token, position embedding, ``ln_pre``) is
one fused :func:`vlops.patch_embed` call, then pre-LN transformer blocks, ``ln_post`` on the class token and a
projection. The text tower embeds the tokens, adds a position embedding, runs causal pre-LN blocks and
``ln_final``, and projects the features of the ``<eos>`` token (:data:`vlops.models.synthetic.EOS`). The loss
is the fused CLIP, SigLIP or UniCL loss (:class:`vlops.nn.ClipLoss`, :class:`vlops.nn.SigLipLoss`,
:class:`vlops.nn.UniClLoss`), which never stores the N x N logits, and zero-shot classification is
:func:`vlops.zero_shot_classify`.

``CLIP(config, fused=False)`` runs the same model with eager PyTorch: the stem written out as open_clip writes
it (``conv1``, class token, position embedding, ``ln_pre``) and the losses of :mod:`vlops.reference.contrastive`.
Both have the same parameters, so one state_dict loads into either. The parameter names are open_clip's
(``visual.conv1.weight``, ``visual.class_embedding``, ``transformer.resblocks.0.attn.in_proj_weight``,
``text_projection``, ``logit_scale``, ...): the state_dict loads into an open_clip ``CLIP`` built with the same
sizes and ``text_cfg.pool_type="eos"``, which then computes the same features.

    import torch
    from vlops.models import synthetic
    from vlops.models.clip import CLIP, CLIPConfig

    model = CLIP(CLIPConfig(loss="siglip"))
    g = torch.Generator().manual_seed(0)
    batch = synthetic.make_pairs(64, g)
    loss = model.loss(batch.images, batch.tokens)
    probs = model.zero_shot(batch.images, synthetic.class_captions())   # [64, 48]
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import positive_int
from ..contrastive import zero_shot_classify
from ..nn import ClipLoss, SigLipLoss, UniClLoss
from ..reference import contrastive as reference
from ..stem import patch_embed
from . import synthetic

__all__ = ["CLIPConfig", "CLIP", "LOSSES"]

#: the loss kinds of :class:`CLIPConfig`
LOSSES = ("clip", "siglip", "unicl")


def _finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"CLIPConfig.{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"CLIPConfig.{name} must be finite, got {value}")
    return float(value)


@dataclasses.dataclass
class CLIPConfig:
    """Sizes and loss of :class:`CLIP`; every field is checked on construction (errors name the field).

    Vision tower: ``image_size`` (square RGB images, a multiple of ``patch_size``), ``patch_size``,
    ``width``, ``layers``, ``heads`` (``width`` a multiple of ``heads``). Text tower: ``vocab_size``,
    ``context_length`` (the token length), ``text_width``, ``text_layers``, ``text_heads``. ``embed_dim``: the
    joint embedding size. ``mlp_ratio``: the hidden size of each block's MLP over its width.

    ``loss``: "clip" (open_clip ``ClipLoss``), "siglip" (``SigLipLoss``) or "unicl" (Florence's UniCL: pairs of
    the same concept are positives). ``init_logit_scale``: the initial log of the logit scale, ``log(10)`` when
    None (open_clip's CLIP starts from ``log(1 / 0.07)``; a small model on this data learns faster from 10, and
    SigLIP starts from 10). ``init_logit_bias``: the initial logit bias, only with ``loss="siglip"``; ``-10`` when
    None, as open_clip's SigLIP. The CLIP and UniCL models have no bias (``logit_bias`` is None).
    """

    image_size: int = 32
    patch_size: int = 8
    width: int = 64
    layers: int = 2
    heads: int = 4
    vocab_size: int = len(synthetic.VOCAB)
    context_length: int = 16
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    embed_dim: int = 64
    mlp_ratio: float = 4.0
    loss: str = "clip"
    init_logit_scale: Optional[float] = None
    init_logit_bias: Optional[float] = None

    def __post_init__(self):
        for name in ("image_size", "patch_size", "width", "layers", "heads", "vocab_size", "context_length",
                     "text_width", "text_layers", "text_heads", "embed_dim"):
            setattr(self, name, positive_int(getattr(self, name), f"CLIPConfig.{name}"))
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIPConfig.image_size must be a multiple of patch_size={self.patch_size}, "
                             f"got {self.image_size}")
        for w, h in (("width", "heads"), ("text_width", "text_heads")):
            if getattr(self, w) % getattr(self, h):
                raise ValueError(f"CLIPConfig.{w} must be a multiple of {h}={getattr(self, h)}, "
                                 f"got {getattr(self, w)}")
        if self.vocab_size <= synthetic.EOS:
            raise ValueError(f"CLIPConfig.vocab_size must hold the special tokens (> {synthetic.EOS}), "
                             f"got {self.vocab_size}")
        if self.context_length < 2:
            raise ValueError(f"CLIPConfig.context_length must be >= 2 (<bos>, <eos>), got {self.context_length}")
        self.mlp_ratio = _finite(self.mlp_ratio, "mlp_ratio")
        if int(self.mlp_ratio * min(self.width, self.text_width)) < 1:
            raise ValueError(f"CLIPConfig.mlp_ratio must give each MLP at least one hidden unit "
                             f"(mlp_ratio * width >= 1), got {self.mlp_ratio}")
        if self.loss not in LOSSES:
            raise ValueError(f"CLIPConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.init_logit_scale is None:
            self.init_logit_scale = math.log(10.0)
        self.init_logit_scale = _finite(self.init_logit_scale, "init_logit_scale")
        if self.loss == "siglip":
            self.init_logit_bias = -10.0 if self.init_logit_bias is None else self.init_logit_bias
            self.init_logit_bias = _finite(self.init_logit_bias, "init_logit_bias")
        elif self.init_logit_bias is not None:
            raise ValueError(f"CLIPConfig.init_logit_bias is only used with loss='siglip'; got "
                             f"{self.init_logit_bias!r} with loss={self.loss!r} (pass None)")

    @property
    def num_patches(self) -> int:
        """Patches per image: ``(image_size // patch_size) ** 2``."""
        return (self.image_size // self.patch_size) ** 2


class Attention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameters (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``), computed with ``F.scaled_dot_product_attention``; ``causal`` masks
    the keys after each query."""

    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, width] -> [B, T, width]."""
        B, T, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, T, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, d]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    """open_clip's block MLP: ``c_proj(gelu(c_fc(x)))``."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., width] -> [..., width]."""
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, causal: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, causal)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, width] -> [B, T, width]."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """``layers`` residual blocks (``resblocks``), initialised as open_clip initialises its text transformer."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, causal: bool):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio, causal)
                                       for _ in range(layers))
        attn_std = width ** -0.5
        proj_std = attn_std * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks in order: [B, T, width] -> [B, T, width]."""
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    """open_clip's ``VisionTransformer`` (class-token pooling, no patch dropout); ``forward(images, fused)``.

    ``fused=True``: the stem is one :func:`vlops.patch_embed` call; ``fused=False``: the eager stem
    ``ln_pre(cat(class_embedding, conv1(x) tokens) + positional_embedding)``.
    """

    def __init__(self, config: CLIPConfig):
        super().__init__()
        c = config
        scale = c.width ** -0.5
        self.image_size, self.patch_size = c.image_size, c.patch_size
        self.conv1 = nn.Conv2d(3, c.width, kernel_size=c.patch_size, stride=c.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(c.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(c.num_patches + 1, c.width))
        self.ln_pre = nn.LayerNorm(c.width)
        self.transformer = Transformer(c.width, c.layers, c.heads, c.mlp_ratio, causal=False)
        self.ln_post = nn.LayerNorm(c.width)
        self.proj = nn.Parameter(scale * torch.randn(c.width, c.embed_dim))

    def stem(self, images: torch.Tensor, fused: bool) -> torch.Tensor:
        """Patch tokens with the class token, position embedding and ``ln_pre``: [B, 1 + N, width]."""
        if fused:
            ln = (self.ln_pre.weight, self.ln_pre.bias, self.ln_pre.eps)
            return patch_embed(images, self.conv1.weight, None, cls_token=self.class_embedding,
                               pos_embed=self.positional_embedding, ln=ln)
        x = self.conv1(images).flatten(2).transpose(1, 2)  # [B, N, width]
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        return self.ln_pre(x)

    def forward(self, images: torch.Tensor, fused: bool = True) -> torch.Tensor:
        """Image features [B, embed_dim] (not normalised) of checked images [B, 3, S, S] in the model's dtype."""
        x = self.transformer(self.stem(images, fused))
        return self.ln_post(x[:, 0]) @ self.proj


class CLIP(nn.Module):
    """A small CLIP with open_clip's layout (see the module docstring); ``fused`` picks the vlops fused ops or
    their eager equivalents. Both settings have the same parameters and state_dict, and compute the same
    values (to rounding).

    Args:
        config: a :class:`CLIPConfig` (default: ``CLIPConfig()``).
        fused: True (default): the fused patch stem, losses and zero-shot classification of vlops; False: eager
            PyTorch (open_clip's stem, :mod:`vlops.reference.contrastive`). The attribute ``fused`` may be
            changed later.

    Inputs: ``images`` [B, 3, image_size, image_size] floating point (converted to the model's dtype;
    never modified); ``tokens`` [B, context_length] int64 / int32 ids in ``[0, vocab_size)`` with one
    ``<eos>`` (id :data:`~vlops.models.synthetic.EOS`) per row, as :data:`vlops.models.synthetic.tokenizer`
    makes them: the text feature is that of the first ``<eos>``.
    """

    def __init__(self, config: Optional[CLIPConfig] = None, fused: bool = True):
        super().__init__()
        if config is None:
            config = CLIPConfig()
        if not isinstance(config, CLIPConfig):
            raise TypeError(f"config must be a CLIPConfig, got {type(config).__name__}")
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool, got {type(fused).__name__}")
        self.config = config
        self.fused = fused
        c = config
        self.visual = VisionTransformer(c)
        self.transformer = Transformer(c.text_width, c.text_layers, c.text_heads, c.mlp_ratio, causal=True)
        self.context_length = c.context_length
        self.vocab_size = c.vocab_size
        self.token_embedding = nn.Embedding(c.vocab_size, c.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.text_width))
        self.ln_final = nn.LayerNorm(c.text_width)
        self.text_projection = nn.Parameter(torch.empty(c.text_width, c.embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=c.text_width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(c.init_logit_scale))
        if c.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(c.init_logit_bias))
        else:
            self.logit_bias = None

    # ------------------------------------------------------------------------------------------ checks
    def _check_images(self, images) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if not images.dtype.is_floating_point:
            raise TypeError(f"images must be a floating-point tensor, got {images.dtype}")
        S = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (S, S):
            raise ValueError(f"images must have shape [B, 3, {S}, {S}] (RGB, CLIPConfig.image_size={S}), "
                             f"got {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("images must hold at least one image, got B = 0")
        weight = self.visual.conv1.weight
        if images.device != weight.device:
            raise ValueError(f"images is on {images.device} but the model is on {weight.device}")
        return images.to(weight.dtype)

    def _check_tokens(self, tokens, name: str = "tokens") -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an int64 or int32 tensor of token ids, got {tokens.dtype}")
        L = self.context_length
        if tokens.ndim != 2 or tokens.shape[1] != L or tokens.shape[0] == 0:
            raise ValueError(f"{name} must have shape [B, {L}] with B >= 1 (CLIPConfig.context_length={L}), "
                             f"got {tuple(tokens.shape)}")
        if tokens.device != self.token_embedding.weight.device:
            raise ValueError(f"{name} is on {tokens.device} but the model is on {self.token_embedding.weight.device}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"{name} must hold ids in [0, {self.vocab_size}) (CLIPConfig.vocab_size), "
                             f"got values in [{lo}, {hi}]")
        missing = ~(tokens == synthetic.EOS).any(dim=1)
        if bool(missing.any()):
            rows = missing.nonzero().flatten()[:5].tolist()
            raise ValueError(f"{name}: every row needs an <eos> token (id {synthetic.EOS}); rows {rows} have none")
        return tokens

    # ---------------------------------------------------------------------------------------- encoders
    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(images, fused=self.fused), dim=-1)

    def _text_features(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.ln_final(self.transformer(x))
        eos = (tokens == synthetic.EOS).int().argmax(dim=-1)  # the first <eos> of each row
        x = x[torch.arange(x.shape[0], device=x.device), eos] @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image features [B, embed_dim], L2-normalised when ``normalize``."""
        x = self.visual(self._check_images(images), fused=self.fused)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Text features [B, embed_dim] (those of the ``<eos>`` token), L2-normalised when ``normalize``."""
        return self._text_features(self._check_tokens(tokens), normalize)

    def _pairs(self, images, tokens):
        images, tokens = self._check_images(images), self._check_tokens(tokens)
        if images.shape[0] != tokens.shape[0]:
            raise ValueError(f"images and tokens must hold the same number of pairs, got {images.shape[0]} "
                             f"images and {tokens.shape[0]} token rows")
        return images, tokens

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        """``(image_features, text_features, logit_scale.exp(), logit_bias)``, the features normalised
        (open_clip's ``CLIP.forward`` with ``output_dict=False``; ``logit_bias`` is None without SigLIP)."""
        images, tokens = self._pairs(images, tokens)
        return self._image_features(images), self._text_features(tokens), self.logit_scale.exp(), self.logit_bias

    # ------------------------------------------------------------------------------------ loss, zero-shot
    def loss(self, images: torch.Tensor, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None):
        """The configured contrastive loss of the batch (a 0-d tensor).

        ``labels``: int [B] concept ids, needed by ``loss="unicl"`` (pairs with equal labels are positives;
        :attr:`vlops.models.synthetic.Pairs.concept`), not accepted otherwise. The fused losses return
        float32 (float64 inputs are computed in float64 and rounded once); the eager ones the model's dtype.
        """
        images, tokens = self._pairs(images, tokens)
        kind = self.config.loss
        if kind == "unicl":
            if labels is None:
                raise ValueError("labels is required with loss='unicl': int [B] concept ids (pairs with equal "
                                 "labels are positives)")
            if not isinstance(labels, torch.Tensor):
                raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
            if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
                raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
            if tuple(labels.shape) != (images.shape[0],):
                raise ValueError(f"labels must have shape [{images.shape[0]}] (one per image), "
                                 f"got {tuple(labels.shape)}")
            labels = labels.to(images.device)
        elif labels is not None:
            raise ValueError(f"labels is only used with loss='unicl'; got labels with loss={kind!r} (pass None)")
        image_features, text_features = self._image_features(images), self._text_features(tokens)
        scale, bias = self.logit_scale.exp(), self.logit_bias
        if self.fused:
            if kind == "clip":
                return ClipLoss(rank=0, world_size=1)(image_features, text_features, scale)
            if kind == "siglip":
                return SigLipLoss(rank=0, world_size=1)(image_features, text_features, scale, bias)
            return UniClLoss()(image_features, text_features, labels, scale)
        if kind == "clip":
            return reference.clip_loss(image_features, text_features, scale)
        if kind == "siglip":
            return reference.siglip_loss(image_features, text_features, scale, bias)
        return reference.clip_loss(image_features, text_features, scale, labels=labels)

    @torch.no_grad()
    def zero_shot(self, images: torch.Tensor, class_tokens: torch.Tensor) -> torch.Tensor:
        """Zero-shot class probabilities [B, K]: ``softmax(logit_scale.exp() * image_features @ class_features.T)``
        with the class features those of ``class_tokens`` [K, context_length] (one caption per class, e.g.
        :func:`vlops.models.synthetic.class_captions`). No gradient."""
        image_features = self._image_features(self._check_images(images))
        class_features = self._text_features(self._check_tokens(class_tokens, "class_tokens"))
        scale = self.logit_scale.exp()
        if self.fused:
            return zero_shot_classify(image_features, class_features, scale)
        return reference.zero_shot(image_features, class_features, scale)
