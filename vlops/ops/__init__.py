"""Custom-op layer: one module per op (schema, fake kernel, autograd, device dispatch)."""
from __future__ import annotations

from typing import Callable

import torch


def _dispatch_probes():
    """The private torch hooks :func:`dispatch_free` reads, or None where this torch lacks one of them (then
    every call goes through the dispatcher)."""
    C = torch._C
    try:
        return (C._get_tracing_state, C._len_torch_dispatch_stack, C._is_torch_function_mode_enabled,
                C._functorch.peek_interpreter_stack, C._autograd._profiler_enabled)
    except AttributeError:
        return None


_PROBES = _dispatch_probes()
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def dispatch_free(args) -> bool:
    """Whether an op's Python body may run on ``args`` directly, with the same effect as calling the custom op
    (which reaches that body through the dispatcher, at 20 to 30 us of host time per call on a 2-core CPU):

    - plain eager mode: not under torch.compile, torch.jit tracing or a functorch transform (vmap, grad), and
      no torch function mode (``with torch.device(...)`` is one) or dispatch mode (fake tensors, make_fx,
      FlopCounterMode) active, and no profiler running (a trace keeps the op's own record);
    - every tensor argument a plain dense tensor or Parameter (no subclass, no meta tensor);
    - nothing autograd would see: grad mode off or no argument requiring grad (the forward ops run inside a
      ``torch.autograd.Function``; the backward ops have no autograd of their own, so a double backward must
      still reach the dispatcher and its error).

    Anything else dispatches as usual."""
    if _PROBES is None or torch.compiler.is_compiling():  # first: Dynamo cannot trace the probes
        return False
    tracing, dispatch_modes, function_modes, transforms, profiling = _PROBES
    if tracing() is not None or dispatch_modes() or function_modes() or transforms() is not None or profiling():
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN_TENSORS or a.is_meta or (grad and a.requires_grad):
                return False
        elif isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in a):
            return False
    return True


def direct_call(op, body: Callable) -> Callable:
    """``call(*args)`` = ``op(*args)``: ``body(*args)`` (the Python function the custom op ``op`` was made
    from) when :func:`dispatch_free` says nothing could tell the difference, else the op itself."""

    def call(*args):
        return body(*args) if dispatch_free(args) else op(*args)

    call.__name__ = call.__qualname__ = f"{getattr(op, '_name', 'op')}_call"
    return call


def eager_autograd(op, setup_context: Callable, backward: Callable, body: Callable) -> Callable:
    """``call(*args)`` = ``op(*args)`` with the autograd that ``op.register_autograd(backward,
    setup_context=setup_context)`` gives it, at a lower host cost per call. ``body``: the Python function the
    custom op ``op`` was made from.

    When an input requires grad, eager calls go through a ``torch.autograd.Function`` whose forward runs the op
    below autograd and then ``setup_context``, and whose backward is ``backward``: the same saved tensors and
    the same backward op. This skips the generic wrapper of ``register_autograd``, which rebuilds the op's
    argument list from its schema on every call (quadratic in the number of arguments: 40 to 70 us for the
    14-argument ops on a 2-core CPU, more than the dispatch itself). Below autograd, and for calls that need no
    gradient, the op runs as :func:`direct_call` (its body itself in plain eager mode). Calls under
    ``torch.compile`` (which traces the op and its registered autograd) call the op."""
    forward = direct_call(op, body)

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            out = forward(*args)
            setup_context(ctx, args, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    _Fn.__name__ = _Fn.__qualname__ = f"{getattr(op, '_name', 'op')}_eager"  # grad_fn: <co_attention_eagerBackward>

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return _Fn.apply(*args)
        return forward(*args)

    return call
