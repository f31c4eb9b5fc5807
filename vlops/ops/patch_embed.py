"""The fused patch stem as torch custom ops, and the kernel contract every backend implements.

Kernel contract (forward; one function per backend: ``vlops._C.patch_embed_fwd_cpu``,
``vlops.kernels.patch_embed.patch_embed_fwd``, the reference ``_ref_patch_embed_fwd`` below)::

    patch_embed_fwd(images, weight, bias, pos, pn_weight, pn_bias, pn_eps, use_pn,
                    ln_weight, ln_bias, ln_eps, use_ln, patch_size, prefix_tokens, x0_out=None) -> out

- ``images`` [B, C, H, W], float32 / float16 / bfloat16 (the CPU kernel and the reference also
  float64), ANY strides (contiguous, channels_last, slices): read in place, never copied, never
  modified.
- ``weight`` [D, K], K = C * P * P, contiguous, the dtype of ``images``; column
  ``k = (c * P + ph) * P + pw`` (that is ``conv_weight.reshape(D, -1)``).
- ``bias`` [D] or None; ``pos`` [Gh * Gw, D] or None (the position embedding of the patch tokens
  only); ``pn_weight``, ``pn_bias``, ``ln_weight``, ``ln_bias`` [D] or None. All of these are
  contiguous and in the compute dtype (float32; float64 for float64 images).
- ``pn_eps``, ``ln_eps``: python floats; ``use_pn``, ``use_ln``: python bools (a LayerNorm whose
  weight and bias are both None is still applied when its flag is set).
- ``patch_size`` P (python int), ``prefix_tokens`` R0 >= 0 (python int).
- ``Gh = ceil(H / P)``, ``Gw = ceil(W / P)``: pixels past H or W read as zero (bottom / right zero
  padding; the op layer has already checked divisibility unless the caller asked for padding).
- Returns ``out`` [B, R0 + Gh * Gw, D] in the dtype of ``images``, contiguous. The kernel writes
  rows ``R0 ..`` of every image (row ``R0 + n`` for patch ``n = gh * Gw + gw``, row-major) and leaves
  rows ``0 .. R0 - 1`` unwritten (the op layer fills them: the prefix tokens do not depend on the
  image).
- Math for patch ``n`` of image ``b``, in the compute dtype (float32 accumulation for every input
  dtype; float64 for float64)::

      x[d] = sum_k weight[d, k] * images[b, c, gh*P + ph, gw*P + pw]  (+ bias[d])
      if use_pn: x = (x - mean(x)) / sqrt(var(x) + pn_eps) (* pn_weight) (+ pn_bias)   # over D, biased var
      if pos is not None: x = x + pos[n]
      if use_ln: x = (x - mean(x)) / sqrt(var(x) + ln_eps) (* ln_weight) (+ ln_bias)
      out[b, R0 + n] = x rounded (nearest even) to the dtype of images

  Accuracy: float32 within ~1e-6 relative of the float64 math (Triton: ``tf32x3`` dots for float32),
  16-bit inputs within the dtype's rounding of the result (products of 16-bit operands are exact in
  float32).
- ``x0_out`` (optional, last; None by default): None, or a contiguous tensor [B * Gh * Gw, D] in the
  compute dtype (float32; float64 for float64 images) on the device of ``images``, which the kernel fills
  with the pre-norm rows ``x0[b * Gh * Gw + n] = weight p + bias`` (the first line of the math above,
  before any LayerNorm or position add), exactly the values the LayerNorm statistics were computed from.
  It is written whatever the flags, but only pays when a LayerNorm is on: the backward then takes it
  instead of re-running the GEMM (the op layer asks for it only then, and only when a gradient will be
  needed). Cost: the ``4 B Gh Gw D`` bytes of the tensor itself (8 for float64), kept from the forward to
  the backward; no extra GEMM, and no extra traffic in the Triton forward (the pre-norm rows it already
  stages in fp32 go there instead of to a scratch or into ``out``).
- No [B * Gh * Gw, K] unfold buffer: patches are gathered from ``images`` tile by tile.

Kernel contract (backward; ``vlops._C.patch_embed_bwd_cpu``, ``vlops.kernels.patch_embed.patch_embed_bwd``)::

    patch_embed_bwd(grad, images, weight, bias, pos, pn_weight, pn_bias, pn_eps, use_pn,
                    ln_weight, ln_bias, ln_eps, use_ln, patch_size, prefix_tokens, need_images, x0=None)
        -> (d_images, d_weight, d_bias, d_pos, d_pn_weight, d_pn_bias, d_ln_weight, d_ln_bias)

- The forward's arguments (same rules), plus ``grad`` [B, R0 + Gh * Gw, D] contiguous (the dtype of
  ``images`` or float32): only its rows ``R0 ..`` are read (the prefix rows' gradient is the caller's).
- Returns, all in the compute dtype (float32; float64 for float64 images) and contiguous:
  ``d_weight`` [D, K]; ``d_bias`` [D]; ``d_pos`` [Gh * Gw, D] (the sum over the batch); ``d_pn_weight``,
  ``d_pn_bias`` (when ``use_pn``), ``d_ln_weight``, ``d_ln_bias`` (when ``use_ln``) [D]; ``d_images``
  [B, C, H, W] contiguous when ``need_images`` (pixels in the zero padding dropped); an output whose
  input is absent (None, or its norm off, or ``need_images`` False) is None. The caller skips what it
  does not need: every tensor output may be computed.
- ``x0`` (optional, last; None by default): None, or the pre-norm rows the forward stored in its
  ``x0_out`` (same shape, dtype and device rules), read only, never modified. Given and a LayerNorm on,
  the backward takes the LayerNorms' statistics from it and does not re-run the projection GEMM; None
  (or no LayerNorm on: x0 is then not needed), it recomputes x0 as below. The gradients are the same
  either way, up to the rounding of the two GEMMs.
- Math: the forward is recomputed per tile (x0 = W p + bias unless ``x0`` is given, the LayerNorms'
  mean / rstd), then with ``g`` = grad rows in the compute dtype::

      use_ln:  d_ln_weight += sum g * xhat2, d_ln_bias += sum g;  g = rstd2 (gx - mean(gx) - xhat2 mean(gx xhat2)),
               gx = g * ln_weight (g when ln_weight is None)
      pos:     d_pos[n] += g                      (over the batch)
      use_pn:  the same LayerNorm backward with pn_*, xhat1, rstd1
      bias:    d_bias += g;  d_weight += g^T p;  d_images (scattered back to the patches' pixels) = g W

  Sums over rows in a fixed order (the same result on every run at a given thread count).
- Memory: no [B * Gh * Gw, K] patch buffer. The Triton backward holds one fp32 [B * Gh * Gw, D]
  scratch (the recomputed pre-norm rows, then their gradient; with ``x0`` given, only the gradient); the
  CPU backward works tile by tile.

The op (``vlops::patch_embed``) takes a last argument ``save_x0`` (the public function sets it when grad
mode is on, some tensor argument requires a gradient and a LayerNorm is on) and returns ``(out, x0)``:
x0 the [B * Gh * Gw, D] pre-norm rows when ``save_x0`` and a LayerNorm is on, an empty tensor (shape [0])
otherwise. x0 is saved for the backward (its cost: ``4 B Gh Gw D`` bytes, e.g. 19 MB for CLIP B/16 at
224 px, batch 32; 154 MB at batch 256) and is not differentiable; the public function returns only the
tokens.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _backends
from . import direct_call, eager_autograd

OP = "patch_embed"


def _cdt(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _patch_rows(images, weight2d, bias, pos, pn_weight, pn_bias, pn_eps, use_pn, ln_weight, ln_bias, ln_eps,
                use_ln, patch_size, x0_out=None):
    """The contract's math for the patch rows, [B, Gh * Gw, D] in the compute dtype, with torch ops;
    ``x0_out`` (None or [B Gh Gw, D]) receives the pre-norm rows W p + bias."""
    B, C, H, W = images.shape
    P = patch_size
    D, K = weight2d.shape
    cdt = _cdt(images)
    Gh, Gw = -(-H // P), -(-W // P)
    x = images.to(cdt)
    if Gh * P != H or Gw * P != W:
        x = F.pad(x, (0, Gw * P - W, 0, Gh * P - H))
    patches = x.reshape(B, C, Gh, P, Gw, P).permute(0, 2, 4, 1, 3, 5).reshape(B, Gh * Gw, K)
    e = patches @ weight2d.to(cdt).T
    if bias is not None:
        e = e + bias
    if x0_out is not None:
        x0_out.copy_(e.reshape(B * Gh * Gw, D))
    if use_pn:
        e = F.layer_norm(e, (D,), pn_weight, pn_bias, pn_eps)
    if pos is not None:
        e = e + pos
    if use_ln:
        e = F.layer_norm(e, (D,), ln_weight, ln_bias, ln_eps)
    return e


def _check_x0(name, x0, images, weight, patch_size):
    """``x0_out`` / ``x0`` of the contract: None, or a contiguous [B Gh Gw, D] tensor in the compute dtype on
    the device of ``images`` (ValueError naming it otherwise)."""
    if x0 is None:
        return
    B, _, H, W = images.shape
    P = patch_size
    shape = (B * (-(-H // P)) * (-(-W // P)), weight.shape[0])
    if not (isinstance(x0, torch.Tensor) and tuple(x0.shape) == shape and x0.dtype == _cdt(images)
            and x0.device == images.device and x0.is_contiguous()):
        got = (f"{x0.dtype} {tuple(x0.shape)} on {x0.device}" + ("" if x0.is_contiguous() else ", not contiguous")
               if isinstance(x0, torch.Tensor) else type(x0).__name__)
        raise ValueError(f"{name} must be None or a contiguous {_cdt(images)} tensor of shape {shape} "
                         f"([B * Gh * Gw, D]) on {images.device}, got {got}")


def _ref_patch_embed_fwd(images, weight, bias, pos, pn_weight, pn_bias, pn_eps, use_pn, ln_weight, ln_bias, ln_eps,
                         use_ln, patch_size, prefix_tokens, x0_out=None):
    """The contract with torch ops (the ``reference`` backend)."""
    _check_x0("x0_out", x0_out, images, weight, patch_size)
    rows = _patch_rows(images, weight, bias, pos, pn_weight, pn_bias, pn_eps, use_pn, ln_weight, ln_bias, ln_eps,
                       use_ln, patch_size, x0_out)
    B, N, D = rows.shape
    out = torch.empty(B, prefix_tokens + N, D, dtype=images.dtype, device=images.device)
    out[:, prefix_tokens:] = rows
    return out


def _kernel(device: torch.device):
    backend = _backends.resolve(OP, device)
    if backend == "reference":
        return _ref_patch_embed_fwd
    if backend == "cpu":
        return _backends.extension().patch_embed_fwd_cpu
    from vlops.kernels import patch_embed as k  # triton

    return k.patch_embed_fwd


def _compute(t: Optional[torch.Tensor], cdt) -> Optional[torch.Tensor]:
    if t is None or (t.dtype == cdt and t.is_contiguous()):
        return t
    return t.to(cdt).contiguous()


def _saves_x0(save_x0: bool, use_pn: bool, use_ln: bool) -> bool:
    """Whether the op stores the pre-norm rows x0: asked for, and a LayerNorm on (without one the backward
    does not need x0)."""
    return bool(save_x0) and (bool(use_pn) or bool(use_ln))


def _patch_embed_fwd(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     prefix: Optional[torch.Tensor], pos: Optional[torch.Tensor], pn_weight: Optional[torch.Tensor],
                     pn_bias: Optional[torch.Tensor], pn_eps: float, use_pn: bool, ln_weight: Optional[torch.Tensor],
                     ln_bias: Optional[torch.Tensor], ln_eps: float, use_ln: bool,
                     save_x0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, R0 + Gh Gw, D] in ``images.dtype``, x0). ``weight`` [D, C, P, P] (any float dtype; the
    kernel gets it as [D, K] in ``images.dtype``), ``prefix`` [R0, D]: the final rows of the prefix tokens
    (identical for every image, computed by the caller), ``pos`` [Gh Gw, D] (patch rows only); the
    LayerNorm parameters in any float dtype. x0: the pre-norm rows [B Gh Gw, D] in the compute dtype when
    ``save_x0`` and a LayerNorm is on (kept for the backward, not differentiable), else an empty [0] tensor."""
    cdt = _cdt(images)
    D, P = weight.shape[0], weight.shape[-1]
    w2d = weight.reshape(D, -1).to(images.dtype).contiguous()
    R0 = 0 if prefix is None else prefix.shape[0]
    save = _saves_x0(save_x0, use_pn, use_ln)
    if save:
        B, _, H, W = images.shape
        x0 = torch.empty(B * (-(-H // P)) * (-(-W // P)), D, dtype=cdt, device=images.device)
    else:
        x0 = torch.empty(0, dtype=cdt, device=images.device)
    out = _kernel(images.device)(images, w2d, _compute(bias, cdt), _compute(pos, cdt), _compute(pn_weight, cdt),
                                 _compute(pn_bias, cdt), float(pn_eps), bool(use_pn), _compute(ln_weight, cdt),
                                 _compute(ln_bias, cdt), float(ln_eps), bool(use_ln), int(P), int(R0),
                                 x0 if save else None)
    if R0:
        out[:, :R0].copy_(prefix)  # one kernel: the broadcast copy rounds to out.dtype as it goes
    return out, x0


patch_embed_op = torch.library.custom_op("vlops::patch_embed", _patch_embed_fwd, mutates_args=())


@patch_embed_op.register_fake
def _(images, weight, bias, prefix, pos, pn_weight, pn_bias, pn_eps, use_pn, ln_weight, ln_bias, ln_eps, use_ln,
      save_x0=False):
    B, _, H, W = images.shape
    D, P = weight.shape[0], weight.shape[-1]
    R0 = 0 if prefix is None else prefix.shape[0]
    n = (-(-H // P)) * (-(-W // P))
    cdt = _cdt(images)
    x0 = images.new_empty((B * n, D), dtype=cdt) if _saves_x0(save_x0, use_pn, use_ln) else \
        images.new_empty((0,), dtype=cdt)
    return images.new_empty((B, R0 + n, D)), x0


def _ref_patch_embed_bwd(grad, images, weight, bias, pos, pn_weight, pn_bias, pn_eps, use_pn, ln_weight, ln_bias,
                         ln_eps, use_ln, patch_size, prefix_tokens, need_images, x0=None):
    """The backward contract with torch ops (the ``reference`` backend, and the fallback of backends with
    no backward kernel): takes x0 = W p + bias from ``x0`` (the forward's saved pre-norm rows) or recomputes
    it (only when a LayerNorm is on), the LayerNorms' x-hat, then the LayerNorm and GEMM backward formulas.
    It materialises the [B Gh Gw, C P P] patches."""
    _check_x0("x0", x0, images, weight, patch_size)
    cdt = _cdt(images)
    B, C, H, W = images.shape
    P = patch_size
    D, K = weight.shape
    Gh, Gw = -(-H // P), -(-W // P)
    N = Gh * Gw
    x = images.to(cdt)
    if Gh * P != H or Gw * P != W:
        x = F.pad(x, (0, Gw * P - W, 0, Gh * P - H))
    patches = x.reshape(B, C, Gh, P, Gw, P).permute(0, 2, 4, 1, 3, 5).reshape(B * N, K)
    w2d = weight.to(cdt)
    e = None
    if use_pn or use_ln:  # x0 feeds only the LayerNorm statistics
        if x0 is not None:
            e = x0
        else:
            e = patches @ w2d.T
            if bias is not None:
                e = e + bias

    def ln_fwd(v, eps):
        mu = v.mean(-1, keepdim=True)
        rstd = torch.rsqrt(v.var(-1, unbiased=False, keepdim=True) + eps)
        return (v - mu) * rstd, rstd

    def ln_bwd(g, xhat, rstd, w):
        gx = g if w is None else g * w
        return rstd * (gx - gx.mean(-1, keepdim=True) - xhat * (gx * xhat).mean(-1, keepdim=True))

    xh1 = rs1 = xh2 = rs2 = None
    if use_pn:
        xh1, rs1 = ln_fwd(e, pn_eps)
        e = xh1 if pn_weight is None else xh1 * pn_weight
        e = e if pn_bias is None else e + pn_bias
    if use_ln:
        if pos is not None:
            e = (e.view(B, N, D) + pos).view(B * N, D)
        xh2, rs2 = ln_fwd(e, ln_eps)
    del e
    g = grad[:, prefix_tokens:].reshape(B * N, D).to(cdt)
    d_ln_w = d_ln_b = d_pn_w = d_pn_b = d_pos = d_bias = d_images = None
    if use_ln:
        d_ln_w = (g * xh2).sum(0) if ln_weight is not None else None
        d_ln_b = g.sum(0) if ln_bias is not None else None
        g = ln_bwd(g, xh2, rs2, ln_weight)
    if pos is not None:
        d_pos = g.view(B, N, D).sum(0)
    if use_pn:
        d_pn_w = (g * xh1).sum(0) if pn_weight is not None else None
        d_pn_b = g.sum(0) if pn_bias is not None else None
        g = ln_bwd(g, xh1, rs1, pn_weight)
    if bias is not None:
        d_bias = g.sum(0)
    d_weight = g.T @ patches
    if need_images:
        gp = (g @ w2d).view(B, Gh, Gw, C, P, P).permute(0, 3, 1, 4, 2, 5).reshape(B, C, Gh * P, Gw * P)
        d_images = gp[:, :, :H, :W].contiguous()
    return d_images, d_weight, d_bias, d_pos, d_pn_w, d_pn_b, d_ln_w, d_ln_b


def _bwd_kernel(device: torch.device):
    """The backward kernel of the backend that runs the op; the torch formulas where that backend has
    no backward kernel yet."""
    backend = _backends.resolve(OP, device)
    if backend == "cpu":
        fn = getattr(_backends.extension(), "patch_embed_bwd_cpu", None)
    elif backend == "triton":
        from vlops.kernels import patch_embed as k

        fn = getattr(k, "patch_embed_bwd", None)
    else:
        fn = None
    return fn or _ref_patch_embed_bwd


def _patch_embed_bwd(grad: torch.Tensor, images: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor], prefix: Optional[torch.Tensor], pos: Optional[torch.Tensor],
                     pn_weight: Optional[torch.Tensor], pn_bias: Optional[torch.Tensor], pn_eps: float,
                     use_pn: bool, ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
                     ln_eps: float, use_ln: bool, needs: list[bool],
                     x0: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
    """Gradients of those of (images, weight, bias, prefix, pos, pn_weight, pn_bias, ln_weight, ln_bias) that
    are given and ``needs`` asks for, in that order, each in its input's dtype (the backward contract of
    the module docstring; the prefix rows' gradient is the sum of their incoming gradients). ``x0``: the
    forward's pre-norm rows (None: the kernel recomputes them); read only."""
    cdt = _cdt(images)
    D, P = weight.shape[0], weight.shape[-1]
    R0 = 0 if prefix is None else prefix.shape[0]
    out: list[Optional[torch.Tensor]] = [None] * 9
    if needs[3] and prefix is not None:
        out[3] = grad[:, :R0].to(cdt).sum(0).to(prefix.dtype)
    if any(needs[i] for i in (0, 1, 2, 4, 5, 6, 7, 8)):
        w2d = weight.reshape(D, -1).to(images.dtype).contiguous()
        got = _bwd_kernel(images.device)(
            grad.contiguous(), images, w2d, _compute(bias, cdt), _compute(pos, cdt), _compute(pn_weight, cdt),
            _compute(pn_bias, cdt), float(pn_eps), bool(use_pn), _compute(ln_weight, cdt), _compute(ln_bias, cdt),
            float(ln_eps), bool(use_ln), int(P), int(R0), bool(needs[0]), x0)
        d_images, d_weight, d_bias, d_pos, d_pn_w, d_pn_b, d_ln_w, d_ln_b = got
        given = (images, weight, bias, None, pos, pn_weight, pn_bias, ln_weight, ln_bias)
        for i, g in ((0, d_images), (1, d_weight), (2, d_bias), (4, d_pos), (5, d_pn_w), (6, d_pn_b), (7, d_ln_w),
                     (8, d_ln_b)):
            if needs[i] and given[i] is not None:
                out[i] = g.reshape(given[i].shape).to(given[i].dtype)
    return [t for t in out if t is not None]


patch_embed_backward_op = torch.library.custom_op("vlops::patch_embed_backward", _patch_embed_bwd, mutates_args=())
_patch_embed_backward = direct_call(patch_embed_backward_op, _patch_embed_bwd)


@patch_embed_backward_op.register_fake
def _(grad, images, weight, bias, prefix, pos, pn_weight, pn_bias, pn_eps, use_pn, ln_weight, ln_bias, ln_eps,
      use_ln, needs, x0=None):
    ts = (images, weight, bias, prefix, pos, pn_weight, pn_bias, ln_weight, ln_bias)
    return [torch.empty_like(t) for t, n in zip(ts, needs) if t is not None and n]


def _setup(ctx, inputs, output):
    (images, weight, bias, prefix, pos, pn_weight, pn_bias, pn_eps, use_pn, ln_weight, ln_bias, ln_eps,
     use_ln, save_x0) = inputs
    x0 = output[1]
    ctx.mark_non_differentiable(x0)
    ctx.set_materialize_grads(False)  # no zero-filled [B Gh Gw, D] "gradient" of x0 in the backward
    saved = _saves_x0(save_x0, use_pn, use_ln)
    ctx.save_for_backward(images, weight, bias, prefix, pos, pn_weight, pn_bias, ln_weight, ln_bias,
                          x0 if saved else None)
    ctx.flags = (pn_eps, use_pn, ln_eps, use_ln)


def _backward(ctx, grad, _grad_x0):
    if grad is None:  # the tokens got no gradient (grads are not materialised); x0 is not differentiable
        return (None,) * 14
    images, weight, bias, prefix, pos, pn_weight, pn_bias, ln_weight, ln_bias, x0 = ctx.saved_tensors
    pn_eps, use_pn, ln_eps, use_ln = ctx.flags
    nig = ctx.needs_input_grad
    needs = [nig[0], nig[1], nig[2], nig[3], nig[4], nig[5], nig[6], nig[9], nig[10]]
    ts = (images, weight, bias, prefix, pos, pn_weight, pn_bias, ln_weight, ln_bias)
    needs = [bool(n and t is not None) for n, t in zip(needs, ts)]
    got = iter(_patch_embed_backward(grad.contiguous(), images, weight, bias, prefix, pos, pn_weight, pn_bias,
                                     pn_eps, use_pn, ln_weight, ln_bias, ln_eps, use_ln, needs, x0))
    g = [next(got) if n else None for n in needs]
    return g[0], g[1], g[2], g[3], g[4], g[5], g[6], None, None, g[7], g[8], None, None, None


patch_embed_op.register_autograd(_backward, setup_context=_setup)
patch_embed = eager_autograd(patch_embed_op, _setup, _backward, _patch_embed_fwd)  # what vlops.patch_embed calls
