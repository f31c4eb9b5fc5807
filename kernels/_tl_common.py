"""Triton device helpers shared by the kernel modules of this package, and the signature builder of their
AOT specs (not a kernel module itself: the AOT check skips files starting with "_")."""
from __future__ import annotations

import numbers

import triton
import triton.language as tl


@triton.jit
def _dot(p, q, acc, F32_DOT: tl.constexpr):
    """acc + p @ q with fp32 accumulation. fp32 operands: ``tf32x3`` (three tf32 wgmmas, ~fp32 accurate;
    one tf32 pass rounds each operand to 2**-11). F32_DOT (interpreter only): 16-bit operands are widened
    first, since the interpreter's dot multiplies the raw bits of bf16 tensors."""
    if F32_DOT:
        return tl.dot(p.to(tl.float32), q.to(tl.float32), acc)
    elif p.dtype == tl.float32:
        return tl.dot(p, q, acc, input_precision="tf32x3")
    else:
        return tl.dot(p, q, acc)


@triton.jit
def _round_to(w, dtype: tl.constexpr, F32_DOT: tl.constexpr):
    """fp32 ``w`` rounded to nearest even to ``dtype`` (as a dot operand or for a store). Under the
    interpreter (F32_DOT) bf16 rounding is done on the bits (the interpreter's fp32 -> bf16 cast truncates,
    and its "rtne" mode does not carry into the exponent) and the value stays fp32 (exact in bf16, so a
    final cast is exact). ``w`` already in ``dtype`` is returned as it is."""
    if dtype == tl.float32 or w.dtype == dtype:
        return w
    elif F32_DOT and dtype == tl.bfloat16:
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return w.to(dtype, fp_downcast_rounding="rtne")


@triton.jit
def _store_rounded(ptrs, x, mask, F32_DOT: tl.constexpr):
    """Store fp32 ``x`` into ``ptrs``' dtype, rounded to nearest even."""
    dt: tl.constexpr = ptrs.dtype.element_ty
    tl.store(ptrs, _round_to(x, dt, F32_DOT).to(dt), mask=mask)


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors (counter c0..c3, key k0, k1); returns the four outputs, bit for bit
    those of :func:`vlops.reference.diffusion.philox4x32`. The operands broadcast: scalars and tensors of
    different (broadcastable) shapes may be mixed, the outputs taking the broadcast shape (the first round
    then runs on the smaller shapes)."""
    for _ in tl.static_range(10):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1
        c1 = _c2 * 0xCD9E8D57
        c3 = _c0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


def aot_signature(fn, constexprs: dict, typed_ptrs: dict, scalar_type) -> dict:
    """The ``triton.compile`` signature of ``@triton.jit`` ``fn`` for an AOT spec: "constexpr" for the
    names in ``constexprs``, ``typed_ptrs[name]`` (e.g. "*bf16") for those pointers, "*fp32" for every other
    ``*_ptr`` argument, ``scalar_type(name)`` for the remaining scalars."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in typed_ptrs:
            sig[name] = typed_ptrs[name]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = scalar_type(name)
    return sig


# ---------------------------------------------------------------------------------------------
# launcher argument checks (host side)

def _check(cond, msg):
    """Raises ValueError(msg) unless ``cond``: the launchers' argument checks. ``msg`` is a string or a
    function returning one, called only on failure (the messages format shapes and strides: formatting them
    on every launch costs more host time than the checks)."""
    if not cond:
        raise ValueError(msg() if callable(msg) else msg)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (host code: ``triton.cdiv`` is a constexpr function with a per-call cost)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of 2 >= n, for n >= 1: ``triton.next_power_of_2`` on the host."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _is_int(v):
    """A Python / numpy integer, not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_float_input(name, t, dims: str, interpreted: bool):
    """The leading input of a launcher: a torch.Tensor with ``len(dims.split(', '))`` dimensions (``dims``,
    e.g. "B, C, H, W", names them in the message), float32 / float16 / bfloat16, on a CUDA device (any device
    under the interpreter)."""
    import torch

    _check(isinstance(t, torch.Tensor), lambda: f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check(t.dim() == len(dims.split(", ")), lambda: f"{name} must be {len(dims.split(', '))}-D [{dims}], got shape "
           f"{tuple(t.shape)}")
    _check(t.dtype in (torch.float32, torch.float16, torch.bfloat16),
           lambda: f"{name} dtype must be float32 / float16 / bfloat16, got {t.dtype}")
    _check(t.is_cuda or interpreted,
           lambda: f"{name} must be a CUDA tensor (CPU tensors only under TRITON_INTERPRET=1), got {t.device}")
