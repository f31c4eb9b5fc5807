"""The op layer's eager fast path (vlops.ops.direct_call / eager_autograd): in plain eager mode an op's Python
body runs without the dispatcher; under anything that watches or transforms ops (torch.compile, tracing,
functorch, torch function and dispatch modes, the profiler, tensor subclasses, meta tensors, autograd) the
custom op itself runs, so those tools see it as before."""
from __future__ import annotations

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vlops
from vlops import ops

_ROUTES: list[str] = []


def _twice_body(x: torch.Tensor, k: float) -> torch.Tensor:
    """Records who called it: the dispatcher (torch's custom-op machinery) or vlops' direct call."""
    caller = sys._getframe(1).f_code.co_filename
    _ROUTES.append("direct" if caller == ops.__file__ else "dispatcher")
    return x * k


_twice_op = torch.library.custom_op("vlops_test::twice", _twice_body, mutates_args=())


@_twice_op.register_fake
def _(x, k):
    return torch.empty_like(x)


_twice = ops.direct_call(_twice_op, _twice_body)


def _route(fn, *args):
    _ROUTES.clear()
    out = fn(*args)
    assert len(_ROUTES) == 1, _ROUTES
    return _ROUTES[0], out


class _PassThroughMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Sub(torch.Tensor):
    pass


def test_plain_eager_runs_the_body_directly():
    x = torch.randn(3)
    route, out = _route(_twice, x, 2.0)
    assert route == "direct" and torch.equal(out, x * 2)
    assert ops.dispatch_free((x, 2.0, None, [True, False]))
    with torch.no_grad():  # grad off: inputs that require grad do not matter
        assert _route(_twice, x.requires_grad_(), 2.0)[0] == "direct"
    assert _route(_twice, torch.nn.Parameter(torch.randn(2), requires_grad=False), 2.0)[0] == "direct"


@pytest.mark.parametrize("case", ["function-mode", "dispatch-mode", "profiler", "requires-grad", "subclass", "meta",
                                  "tensor-list"])
def test_watched_calls_go_through_the_dispatcher(case):
    x = torch.randn(3)
    if case == "function-mode":
        with torch.device("cpu"):  # a torch function mode
            route, out = _route(_twice, x, 2.0)
    elif case == "dispatch-mode":
        with _PassThroughMode():
            route, out = _route(_twice, x, 2.0)
    elif case == "profiler":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            route, out = _route(_twice, x, 2.0)
        assert any(e.name == "vlops_test::twice" for e in prof.events())  # the op keeps its own record
    elif case == "requires-grad":
        x.requires_grad_()
        assert not ops.dispatch_free((x,))
        route = "dispatcher"  # the test op has no autograd: calling it would only warn
        out = x.detach() * 2
    elif case == "subclass":
        route, out = _route(_twice, x.as_subclass(_Sub), 2.0)
    elif case == "meta":
        x = x.to("meta")
        _ROUTES.clear()
        out = _twice(x, 2.0)  # the fake kernel runs, not the body
        route = "dispatcher" if not _ROUTES else _ROUTES[0]
        assert out.is_meta and out.shape == x.shape
    else:
        assert not ops.dispatch_free((x, [x]))
        route, out = "dispatcher", x * 2
    assert route == "dispatcher"
    if not out.is_meta:
        assert torch.equal(out.detach(), x.detach() * 2)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning")
def test_transforms_and_tracing_are_not_dispatch_free():
    seen = []

    def probe(x):
        seen.append(ops.dispatch_free((x,)))
        return x * 2

    torch.vmap(probe)(torch.randn(4, 3))
    torch.func.grad(lambda x: probe(x).sum())(torch.randn(3))
    torch.jit.trace(probe, torch.randn(3), check_trace=False)
    assert seen == [False, False, False]
    assert ops.dispatch_free((torch.randn(3),))  # and nothing is left switched on


def test_compiled_call_uses_the_op():
    """Under torch.compile the op (with its registered autograd) is traced, not the body."""
    x = torch.randn(4, requires_grad=True)

    @torch.compile(backend="eager", fullgraph=True)
    def f(x):
        return _twice(x.detach(), 3.0) + x

    _ROUTES.clear()
    out = f(x)
    assert torch.equal(out, x.detach() * 4)
    assert _ROUTES == ["dispatcher"]  # traced with the fake kernel, run as the op


def test_co_attention_routes():
    """vlops.co_attention: the direct route in plain eager mode (forward and backward), the custom ops under
    the profiler; equal results."""
    g = torch.Generator().manual_seed(5)
    B, Nt, Nv, H, d = 2, 3, 4, 2, 8
    ts = [torch.randn(B, n, H, d, generator=g, requires_grad=True) for n in (Nt, Nt, Nt, Nv, Nv, Nv)]
    lens = dict(text_lengths=torch.tensor([3, 1]), image_lengths=torch.tensor([4, 2]))
    plain = vlops.co_attention(*ts, **lens)
    g_plain = torch.autograd.grad(sum(o.sum() for o in plain), ts)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        seen = vlops.co_attention(*ts, **lens)
        g_seen = torch.autograd.grad(sum(o.sum() for o in seen), ts)
    names = {e.name for e in prof.events()}
    assert {"vlops::co_attention", "vlops::co_attention_backward"} <= names
    for a, b in zip((*plain, *g_plain), (*seen, *g_seen)):
        assert torch.equal(a, b)
