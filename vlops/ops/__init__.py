"""Custom-op layer: one module per op (schema, fake kernel, autograd, device dispatch)."""
from __future__ import annotations

from typing import Callable

import torch


def eager_autograd(op, setup_context: Callable, backward: Callable) -> Callable:
    """``call(*args)`` = ``op(*args)`` with the autograd that ``op.register_autograd(backward,
    setup_context=setup_context)`` gives it, at a lower host cost per call.

    When an input requires grad, eager calls go through a ``torch.autograd.Function`` whose forward runs the op
    below autograd and then ``setup_context``, and whose backward is ``backward``: the same saved tensors and
    the same backward op. This skips the generic wrapper of ``register_autograd``, which rebuilds the op's
    argument list from its schema on every call (quadratic in the number of arguments: 40 to 70 us for the
    14-argument ops on a 2-core CPU, more than the dispatch itself). Calls that need no gradient, and calls
    under ``torch.compile`` (which traces the op and its registered autograd), call the op directly."""

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            out = op(*args)
            setup_context(ctx, args, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    _Fn.__name__ = _Fn.__qualname__ = f"{getattr(op, '_name', 'op')}_eager"  # grad_fn: <co_attention_eagerBackward>

    def call(*args):
        if (torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
            return _Fn.apply(*args)
        return op(*args)

    return call
