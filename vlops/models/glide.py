"""A small GLIDE-style text-conditioned diffusion model (Nichol et al. 2021, "GLIDE").

The denoiser has two parts, as in GLIDE:

- a text encoder: token + position embedding, pre-LayerNorm transformer layers whose attention ignores
  PAD keys, a final LayerNorm. The hidden state at the EOS token (the pooled caption) is projected and
  added to the timestep embedding; the whole token sequence is projected, per attention layer, to extra
  keys and values that are concatenated in front of the image keys and values (PAD keys masked);
- a UNet predicting the noise epsilon: ResBlocks (GroupNorm, SiLU, 3x3 convolutions, the timestep + text
  embedding as a scale and shift of the second GroupNorm), attention at one or two resolutions and in the
  middle block, and a skip connection from each down block to the matching up block. As in GLIDE there is
  no position embedding in the UNet: a pixel knows where it is from the convolutions' zero padding.

Training (:meth:`GLIDE.loss`) is the epsilon MSE at uniform random timesteps of a
:class:`vlops.DiffusionSchedule`, with the caption replaced by the empty caption (``<bos> <eos>`` then
PAD) with probability ``p_uncond``, which teaches the unconditional model classifier-free guidance needs.

Sampling (:meth:`GLIDE.sample`) runs DDIM or DDPM with classifier-free guidance: one model call on the
doubled batch (conditional half first, as GLIDE), then one denoising step. With ``fused=True`` the step
is :func:`vlops.ddim_step` / :func:`vlops.ddpm_step` (guidance, x0, clipping, posterior and noise in one
pass); with ``fused=False`` it is the guidance line written out and the eager reference
:func:`vlops.reference.diffusion.diffusion_step` on the same schedule. The step is the model's only
fused op: ``fused`` changes nothing in training, and the parameters are the same either way. The noise
is drawn by the model (from ``generator``) or given, never inside the step, so the two paths see the same.
A briefly trained model samples better with the stochastic DDPM sampler than with DDIM (eta 0).

    g = torch.Generator().manual_seed(0)
    model = GLIDE(image_size=16)
    batch = synthetic.make_pairs(32, g, image_size=16, noise=0.0)
    loss = model.loss(batch.images, batch.tokens, g)       # then loss.backward(), an optimiser step, ...
    images = model.sample(synthetic.tokenizer(["a red circle in the top left"]), guidance_scale=3.0,
                          steps=25, sampler="ddpm", generator=g)   # [1, 3, 16, 16] in [-1, 1]
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import diffusion as _diffusion
from .._validate import positive_int
from ..reference import diffusion as _ref
from . import synthetic

__all__ = ["GLIDE", "TextEncoder", "UNet", "timestep_embedding", "read_colour_and_place"]

SAMPLERS = ("ddim", "ddpm")


def _real(x, name: str, lo: float, hi: float, hi_open: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    v = float(x)
    if not (lo <= v <= hi) or (hi_open and v == hi) or v != v:
        raise ValueError(f"{name} must lie in [{lo}, {hi}{')' if hi_open else ']'}, got {x!r}")
    return v


def _groups(channels: int) -> int:
    """GroupNorm groups: 32 as GLIDE where the width allows, else the most (16, 8, ...) with >= 2 channels each."""
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0 and channels // g >= 2:
            return g
    return 1


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """GLIDE's sinusoidal embedding [B, dim] of timesteps ``t`` [B]: ``cat(cos(t f), sin(t f))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _attention(q, k, v, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [B, H, N, d]; ``key_mask`` [B, Nk] bool (True = attend)."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class _TextBlock(nn.Module):
    """Pre-LayerNorm transformer layer: self-attention over the caption (PAD keys ignored), then an MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, L, W = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        a = _attention(q, k, v, key_mask).transpose(1, 2).reshape(B, L, W)
        x = x + self.proj(a)
        return x + self.mlp(self.ln_2(x))


class TextEncoder(nn.Module):
    """GLIDE's caption transformer.

    Args:
        vocab_size, text_ctx: vocabulary size and caption length (the tokenizer's ``length``).
        width, layers, heads: transformer size (``width`` divisible by ``heads``).

    ``forward(tokens)`` returns ``(sequence [B, L, width], pooled [B, width], key_mask [B, L])``: the
    final-LayerNorm states, the state at each caption's (first) EOS token, and ``tokens != PAD``.
    """

    def __init__(self, vocab_size: int, text_ctx: int, width: int, layers: int, heads: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(text_ctx, width) * 0.01)
        self.blocks = nn.ModuleList(_TextBlock(width, heads) for _ in range(layers))
        self.final_ln = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor):
        key_mask = tokens != synthetic.PAD
        x = self.token_embedding(tokens) + self.positional_embedding[None]
        for block in self.blocks:
            x = block(x, key_mask)
        x = self.final_ln(x)
        eos = (tokens == synthetic.EOS).to(torch.int64).argmax(dim=1)
        pooled = x[torch.arange(x.shape[0], device=x.device), eos]
        return x, pooled, key_mask


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, then the embedding as scale and shift of the second GroupNorm (GLIDE's
    ``use_scale_shift_norm``), SiLU-dropout-conv (zero-initialised), plus the (1x1-projected) input."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm_1 = nn.GroupNorm(_groups(cin), cin)
        self.conv_1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm_2 = nn.GroupNorm(_groups(cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv_2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv_2.weight)
        nn.init.zeros_(self.conv_2.bias)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv_1(F.silu(self.norm_1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm_2(h) * (1 + scale) + shift
        h = self.conv_2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class _AttentionBlock(nn.Module):
    """Self-attention over the pixels with the caption's keys and values in front (GLIDE's ``encoder_kv``)."""

    def __init__(self, channels: int, heads: int, text_width: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.encoder_kv = nn.Linear(text_width, 2 * channels)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        nh, d = self.heads, C // self.heads
        q, k, v = self.qkv(self.norm(x)).view(B, 3, nh, d, H * W).transpose(-1, -2).unbind(1)  # [B, nh, HW, d]
        ek, ev = self.encoder_kv(text).view(B, -1, 2, nh, d).permute(2, 0, 3, 1, 4)  # [B, nh, L, d]
        k, v = torch.cat([ek, k], dim=2), torch.cat([ev, v], dim=2)
        key_mask = torch.cat([text_mask, text_mask.new_ones(B, H * W)], dim=1)
        a = _attention(q, k, v, key_mask).transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj_out(a)


class UNet(nn.Module):
    """The epsilon-predicting UNet (guided-diffusion layout, GLIDE's text hooks).

    Args:
        image_size, in_channels: input images [B, in_channels, image_size, image_size].
        model_channels: width of the first level; level ``i`` has ``model_channels * channel_mult[i]``.
        channel_mult: one entry per resolution; each level after the first halves the resolution.
        num_res_blocks: ResBlocks per level on the way down (one more on the way up).
        attention_resolutions: feature-map sizes (pixels) that get attention blocks.
        num_heads: attention heads; text_width: width of the caption states; dropout: ResBlock dropout.

    ``forward(x, emb, text, text_mask)``: emb [B, 4 * model_channels] (timestep + pooled caption).
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, channel_mult: Sequence[int],
                 num_res_blocks: int, attention_resolutions: Sequence[int], num_heads: int, text_width: int,
                 dropout: float):
        super().__init__()
        emb_dim = 4 * model_channels
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch, res = [model_channels], model_channels, image_size

        def level_block(cin, cout, res):
            blocks = nn.ModuleList([_ResBlock(cin, cout, emb_dim, dropout)])
            if res in attention_resolutions:
                blocks.append(_AttentionBlock(cout, num_heads, text_width))
            return blocks

        for i, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(level_block(ch, model_channels * mult, res))
                ch = model_channels * mult
                skips.append(ch)
            if i < len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
                res //= 2
        self.middle = nn.ModuleList([_ResBlock(ch, ch, emb_dim, dropout),
                                     _AttentionBlock(ch, num_heads, text_width),
                                     _ResBlock(ch, ch, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mult))):
            for j in range(num_res_blocks + 1):
                blocks = level_block(ch + skips.pop(), model_channels * mult, res)
                ch = model_channels * mult
                if i > 0 and j == num_res_blocks:
                    blocks.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    blocks.append(nn.Conv2d(ch, ch, 3, padding=1))
                    res *= 2
                self.up.append(blocks)
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @staticmethod
    def _run(blocks, h, emb, text, text_mask):
        for m in blocks:
            if isinstance(m, _ResBlock):
                h = m(h, emb)
            elif isinstance(m, _AttentionBlock):
                h = m(h, text, text_mask)
            else:
                h = m(h)
        return h

    def forward(self, x, emb, text, text_mask):
        h = self.conv_in(x)
        hs = [h]
        for blocks in self.down:
            h = self._run(blocks, h, emb, text, text_mask)
            hs.append(h)
        h = self._run(self.middle, h, emb, text, text_mask)
        for blocks in self.up:
            h = self._run(blocks, torch.cat([h, hs.pop()], dim=1), emb, text, text_mask)
        return self.conv_out(F.silu(self.norm_out(h)))


class GLIDE(nn.Module):
    """A small GLIDE: caption transformer + text-conditioned UNet predicting epsilon, trained with
    caption dropout for classifier-free guidance, sampled with the fused DDIM / DDPM step.

    Args:
        image_size: square image side, divisible by ``2 ** (len(channel_mult) - 1)``.
        in_channels: image channels (3).
        model_channels, channel_mult, num_res_blocks, attention_resolutions, num_heads, dropout: the UNet
            (see :class:`UNet`; ``attention_resolutions`` are feature-map sizes that exist in it; the middle
            block, at the lowest resolution, always has attention). Like GLIDE's, the UNet has no position
            embedding: where a pixel is comes from the convolutions' zero padding.
        vocab_size, text_ctx: the tokenizer's vocabulary size and caption length (default
            :data:`vlops.models.synthetic.tokenizer`'s). Token ids PAD=0, BOS=1, EOS=2.
        text_width, text_layers, text_heads: the caption transformer.
        p_uncond: probability in [0, 1) that :meth:`loss` replaces a caption by the empty caption.
        num_train_timesteps, beta_schedule, beta_start, beta_end: the training noise schedule, as
            :meth:`vlops.DiffusionSchedule.ddpm` (``linear``, ``scaled_linear`` or ``squaredcos_cap_v2``).
        fused: sample with the fused step (:func:`vlops.ddim_step` / :func:`vlops.ddpm_step`); False uses
            the guidance line and :func:`vlops.reference.diffusion.diffusion_step` written out eagerly.
            The step is the only fused op: training, the parameters and the state_dict do not depend on it.
    """

    def __init__(self, *, image_size: int = 16, in_channels: int = 3, model_channels: int = 16,
                 channel_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1,
                 attention_resolutions: Sequence[int] = (8, 4), num_heads: int = 2, dropout: float = 0.0,
                 vocab_size: int = len(synthetic.VOCAB), text_ctx: int = synthetic.tokenizer.length,
                 text_width: int = 64, text_layers: int = 2, text_heads: int = 2, p_uncond: float = 0.2,
                 num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                 beta_start: float = 0.0001, beta_end: float = 0.02, fused: bool = True):
        super().__init__()
        for name, v in (("image_size", image_size), ("in_channels", in_channels), ("model_channels", model_channels),
                        ("num_res_blocks", num_res_blocks), ("num_heads", num_heads), ("vocab_size", vocab_size),
                        ("text_ctx", text_ctx), ("text_width", text_width), ("text_layers", text_layers),
                        ("text_heads", text_heads), ("num_train_timesteps", num_train_timesteps)):
            positive_int(v, name)
        if vocab_size <= synthetic.EOS:
            raise ValueError(f"vocab_size must exceed the EOS id {synthetic.EOS}, got {vocab_size}")
        if text_ctx < 2:
            raise ValueError(f"text_ctx must be >= 2 (BOS and EOS), got {text_ctx}")
        channel_mult = tuple(channel_mult)
        if not channel_mult or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in channel_mult):
            raise ValueError(f"channel_mult must be a non-empty sequence of positive ints, got {channel_mult!r}")
        down = 2 ** (len(channel_mult) - 1)
        if image_size % down:
            raise ValueError(f"image_size must be divisible by 2 ** (len(channel_mult) - 1) = {down}, got {image_size}")
        sizes = [image_size // 2**i for i in range(len(channel_mult))]
        attention_resolutions = tuple(attention_resolutions)
        if any(r not in sizes for r in attention_resolutions):
            raise ValueError(f"attention_resolutions must be feature-map sizes of this UNet {sizes}, "
                             f"got {attention_resolutions!r}")
        for m in channel_mult:
            if (model_channels * m) % num_heads:
                raise ValueError(f"num_heads must divide every level width {[model_channels * m for m in channel_mult]}"
                                 f", got {num_heads}")
        if text_width % text_heads:
            raise ValueError(f"text_heads must divide text_width={text_width}, got {text_heads}")
        self.p_uncond = _real(p_uncond, "p_uncond", 0.0, 1.0, hi_open=True)
        dropout = _real(dropout, "dropout", 0.0, 1.0, hi_open=True)
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool, got {type(fused).__name__}")
        self.fused = fused
        self.image_size, self.in_channels, self.model_channels = image_size, in_channels, model_channels
        self.text_ctx, self.vocab_size = text_ctx, vocab_size
        self._beta = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                          beta_start=beta_start, beta_end=beta_end)
        self.schedule = _diffusion.DiffusionSchedule.ddpm(**self._beta)

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.text = TextEncoder(vocab_size, text_ctx, text_width, text_layers, text_heads)
        self.text_proj = nn.Linear(text_width, emb_dim)
        self.unet = UNet(image_size, in_channels, model_channels, channel_mult, num_res_blocks, attention_resolutions,
                         num_heads, text_width, dropout)

    # ------------------------------------------------------------------------------------------ checks

    def _check_tokens(self, tokens, name: str = "tokens") -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(tokens).__name__}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an int64 (or int32) tensor of token ids, got {tokens.dtype}")
        if tokens.ndim != 2 or tokens.shape[1] != self.text_ctx or tokens.shape[0] == 0:
            raise ValueError(f"{name} must have shape [B, {self.text_ctx}] (B >= 1), got {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"{name} must hold ids in [0, {self.vocab_size}), got values in "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        if not bool((tokens == synthetic.EOS).any(dim=1).all()):
            raise ValueError(f"{name}: every caption needs an EOS token (id {synthetic.EOS})")
        return tokens.to(torch.int64)

    def _check_images(self, images, name: str, batch: Optional[int] = None) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
        if not images.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {images.dtype}")
        S, C = self.image_size, self.in_channels
        if images.ndim != 4 or images.shape[1:] != (C, S, S):
            raise ValueError(f"{name} must have shape [B, {C}, {S}, {S}] (image_size={S}), got {tuple(images.shape)}")
        if batch is not None and images.shape[0] != batch:
            raise ValueError(f"{name} has batch {images.shape[0]} but tokens has batch {batch}")
        return images

    def _check_timesteps(self, t, B: int, device) -> torch.Tensor:
        T = self.schedule.num_train_timesteps
        if isinstance(t, int) and not isinstance(t, bool):
            t = torch.full((B,), t, dtype=torch.int64, device=device)
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"timesteps must be an int or an integer tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.ndim > 1 or t.numel() not in (1, B):
            raise ValueError(f"timesteps must hold 1 or {B} values, got shape {tuple(t.shape)}")
        if bool(((t < 0) | (t >= T)).any()):
            raise ValueError(f"timesteps must lie in [0, {T}), got values in [{int(t.min())}, {int(t.max())}]")
        return t.reshape(-1).to(device=device, dtype=torch.int64).expand(B)

    # ------------------------------------------------------------------------------------------ model

    def empty_tokens(self, batch: int, device=None) -> torch.Tensor:
        """[batch, text_ctx] int64 tokens of the empty caption: BOS, EOS, then PAD."""
        t = torch.full((batch, self.text_ctx), synthetic.PAD, dtype=torch.int64, device=device)
        t[:, 0], t[:, 1] = synthetic.BOS, synthetic.EOS
        return t

    def forward(self, x: torch.Tensor, timesteps, tokens: torch.Tensor) -> torch.Tensor:
        """Predicted noise [B, C, S, S] for noisy images ``x`` [B, C, S, S] at ``timesteps`` (int, or
        integer tensor [1] or [B]) given captions ``tokens`` [B, text_ctx]."""
        tokens = self._check_tokens(tokens)
        x = self._check_images(x, "x", tokens.shape[0])
        return self._denoise(x, self._check_timesteps(timesteps, x.shape[0], x.device), tokens.to(x.device))

    def _denoise(self, x, t, tokens):
        dtype = self.time_embed[0].weight.dtype
        text, pooled, text_mask = self.text(tokens)
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(dtype)) + self.text_proj(pooled)
        return self.unet(x.to(dtype), emb, text, text_mask)

    def loss(self, images: torch.Tensor, tokens: torch.Tensor, generator: Optional[torch.Generator] = None):
        """Epsilon MSE (a 0-d tensor) of clean ``images`` [B, C, S, S] in [-1, 1] with captions ``tokens``.

        Draws (from ``generator``, else torch's global generator, on its device) a uniform timestep per
        image, the noise, and which captions become the empty caption (probability ``p_uncond``).
        """
        tokens = self._check_tokens(tokens)
        images = self._check_images(images, "images", tokens.shape[0])
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        B, dev = images.shape[0], images.device
        dtype = self.time_embed[0].weight.dtype
        gdev = generator.device if generator is not None else dev
        t = torch.randint(self.schedule.num_train_timesteps, (B,), generator=generator, device=gdev).to(dev)
        noise = torch.randn(images.shape, generator=generator, device=gdev, dtype=dtype).to(dev)
        drop = (torch.rand(B, generator=generator, device=gdev) < self.p_uncond).to(dev)
        tokens = torch.where(drop[:, None], self.empty_tokens(B, dev), tokens.to(dev))
        ac = self.schedule.tensors(dev, dtype)[0][t].view(B, 1, 1, 1)
        x_t = ac.sqrt() * images.to(dtype) + (1 - ac).sqrt() * noise
        return F.mse_loss(self._denoise(x_t, t, tokens), noise)

    # ------------------------------------------------------------------------------------------ sampling

    def sampling_schedule(self, sampler: str, steps: int) -> _diffusion.DiffusionSchedule:
        """The inference schedule (trailing spacing: the first step is at t = T - 1) on the training betas."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        T = self.schedule.num_train_timesteps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"steps must be an int in [1, {T}], got {steps!r}")
        make = _diffusion.DiffusionSchedule.ddim if sampler == "ddim" else _diffusion.DiffusionSchedule.ddpm
        return make(**self._beta, num_inference_steps=steps, timestep_spacing="trailing")

    def guided_eps(self, x: torch.Tensor, t: int, tokens: torch.Tensor, guidance_scale: Optional[float]):
        """The model output for one sampling step: with guidance, the doubled batch [2B, ...] (conditional
        half first, then the empty caption), else [B, ...]."""
        B = x.shape[0]
        tt = torch.full((B,), t, dtype=torch.int64, device=x.device)
        if guidance_scale is None:
            return self._denoise(x, tt, tokens)
        both = torch.cat([tokens, self.empty_tokens(B, x.device)])
        return self._denoise(torch.cat([x, x]), torch.cat([tt, tt]), both)

    def denoise_step(self, model_output: torch.Tensor, t: int, x: torch.Tensor,
                     schedule: _diffusion.DiffusionSchedule, *, sampler: str = "ddim",
                     guidance_scale: Optional[float] = 3.0, eta: float = 0.0, clip_sample: bool = True,
                     noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One sampling step: x_t [B, C, S, S] -> x_prev, from the model output of :meth:`guided_eps`.

        With ``fused`` it is one call of :func:`vlops.ddim_step` / :func:`vlops.ddpm_step` with
        ``guidance_scale`` on the doubled output (``cfg_order="cond_first"``). Otherwise the guidance line
        ``uncond + s * (cond - uncond)`` written out, then :func:`vlops.reference.diffusion.diffusion_step`
        on the same schedule. DDIM re-derives epsilon from the clipped x0 when ``clip_sample`` (as GLIDE's
        ``ddim_sample``). ``noise`` [B, C, S, S] is needed by DDPM and by DDIM with ``eta > 0``.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if self.fused:
            if sampler == "ddpm":
                x, _ = _diffusion.ddpm_step(model_output, t, x, schedule, guidance_scale=guidance_scale,
                                            cfg_order="cond_first", clip_sample=clip_sample, noise=noise,
                                            return_pred_original=False)
            else:
                x, _ = _diffusion.ddim_step(model_output, t, x, schedule, eta=eta, use_clipped_model_output=clip_sample,
                                            guidance_scale=guidance_scale, cfg_order="cond_first",
                                            clip_sample=clip_sample, noise=noise, return_pred_original=False)
            return x
        if guidance_scale is not None:
            cond, uncond = model_output.chunk(2)
            model_output = uncond + guidance_scale * (cond - uncond)
        ac, prev_table = schedule.tensors(x.device, torch.float64 if x.dtype == torch.float64 else torch.float32)
        x, _ = _ref.diffusion_step(model_output, torch.tensor([t], device=x.device), x, ac, prev_table, mode=sampler,
                                   clip_sample=clip_sample, eta=eta if sampler == "ddim" else 0.0,
                                   use_clipped_model_output=clip_sample and sampler == "ddim",
                                   final_alpha_cumprod=schedule.final_alpha_cumprod, noise=noise)
        return x

    @torch.no_grad()
    def sample(self, tokens: torch.Tensor, guidance_scale: Optional[float] = 3.0, steps: int = 25,
               sampler: str = "ddim", eta: float = 0.0, generator: Optional[torch.Generator] = None, *,
               x_T: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
               clip_sample: bool = True) -> torch.Tensor:
        """Generate images [B, C, S, S] for captions ``tokens`` [B, text_ctx].

        Args:
            guidance_scale: classifier-free guidance ``uncond + s * (cond - uncond)``, a real >= 0 (1 is
                the conditional model alone, 0 the unconditional one); None skips the doubled batch.
            steps: inference steps, trailing spacing over the training schedule (the first at t = T - 1).
            sampler: ``ddim`` (``eta`` in [0, 1]; 0 is deterministic) or ``ddpm`` (eta ignored).
            generator: draws ``x_T`` and the per-step noise when they are not given.
            x_T: the starting noise [B, C, S, S]; noise: the per-step noise [steps, B, C, S, S] (DDPM, or
                DDIM with eta > 0). Given them, fused and eager sampling are comparable element by element
                (the same generator seed does the same: the noise is drawn here, never inside the step).
            clip_sample: clamp the predicted x0 to [-1, 1] at every step.

        Each step is one model call on the doubled batch (:meth:`guided_eps`) and one :meth:`denoise_step`
        (fused or eager, as ``fused``). Returns the final samples in the parameters' dtype.
        """
        tokens = self._check_tokens(tokens)
        if guidance_scale is not None:
            guidance_scale = _real(guidance_scale, "guidance_scale", 0.0, math.inf)
        schedule = self.sampling_schedule(sampler, steps)
        eta = _real(eta, "eta", 0.0, 1.0)
        if not isinstance(clip_sample, bool):
            raise TypeError(f"clip_sample must be a bool, got {type(clip_sample).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        param = self.time_embed[0].weight
        dev, dtype = param.device, param.dtype
        B, S, C = tokens.shape[0], self.image_size, self.in_channels
        tokens = tokens.to(dev)
        gdev = generator.device if generator is not None else dev
        if x_T is None:
            x = torch.randn((B, C, S, S), generator=generator, device=gdev, dtype=dtype).to(dev)
        else:
            x = self._check_images(x_T, "x_T", B).to(dev, dtype)
        if noise is not None:
            if not isinstance(noise, torch.Tensor) or not noise.dtype.is_floating_point:
                raise TypeError(f"noise must be a floating-point tensor, got "
                                f"{noise.dtype if isinstance(noise, torch.Tensor) else type(noise).__name__}")
            if noise.shape != (steps, B, C, S, S):
                raise ValueError(f"noise must have shape [steps, B, C, S, S] = {[steps, B, C, S, S]}, "
                                 f"got {list(noise.shape)}")
            noise = noise.to(dev, dtype)
        with_noise = sampler == "ddpm" or eta > 0
        for i, t in enumerate(schedule.timesteps.tolist()):
            n = None
            if with_noise:
                n = noise[i] if noise is not None else torch.randn(
                    (B, C, S, S), generator=generator, device=gdev, dtype=dtype).to(dev)
            out = self.guided_eps(x, t, tokens, guidance_scale)
            x = self.denoise_step(out, t, x, schedule, sampler=sampler, guidance_scale=guidance_scale, eta=eta,
                                  clip_sample=clip_sample, noise=n)
        return x


def read_colour_and_place(images: torch.Tensor):
    """Colour and quadrant read from the pixels of images [B, 3, S, S] in [-1, 1] showing one coloured shape
    on a dark grey background (as :func:`vlops.models.synthetic.render`).

    Colour: the mean RGB of the most saturated 4% of pixels, matched to the nearest colour of
    :data:`synthetic.COLOURS`. Place: the quadrant (index into :data:`synthetic.PLACES`) holding the most
    saturation mass above 0.25 (all saturation when no pixel passes). Returns int64 tensors ``(colour, place)``.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3] or images.shape[2] < 2:
        raise ValueError(f"images must have shape [B, 3, S, S], got {tuple(images.shape)}")
    x = ((images.detach().double().cpu() + 1) / 2).clamp(0, 1)
    B, _, S, _ = x.shape
    sat = x.amax(1) - x.amin(1)  # [B, S, S]
    flat_sat, flat_rgb = sat.reshape(B, -1), x.reshape(B, 3, -1)
    k = max(1, round(0.04 * S * S))
    top = flat_sat.topk(k, dim=1).indices  # [B, k]
    rgb = torch.gather(flat_rgb, 2, top[:, None].expand(B, 3, k)).mean(2)  # [B, 3]
    palette = torch.tensor(list(synthetic.COLOURS.values()), dtype=torch.float64)
    colour = torch.cdist(rgb, palette).argmin(1)
    mass = (sat - 0.25).clamp(min=0)
    mass = torch.where(mass.sum((1, 2), keepdim=True) > 0, mass, sat)
    h = S // 2
    quads = torch.stack([mass[:, :h, :h].sum((1, 2)), mass[:, :h, h:].sum((1, 2)),
                         mass[:, h:, :h].sum((1, 2)), mass[:, h:, h:].sum((1, 2))], 1)
    return colour, quads.argmax(1)
