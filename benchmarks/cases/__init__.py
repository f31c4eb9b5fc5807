"""The op registry of the benchmark runner.

Each module named in :data:`MODULES` provides::

    def cases(device: torch.device, quick: bool, sizes: set[str] | None, dtypes: list[torch.dtype] | None)
        -> Iterable[Case]

- ``device``: where to run; the module skips cases that make no sense there (e.g. CUDA-only sizes).
- ``quick``: small sizes and few cases, for ``--quick`` (the whole quick run must stay under 2 min on
  a 2-core CPU).
- ``sizes``: None for the module's defaults, else the size labels asked for (``--sizes``). A module
  may also accept literal shapes such as ``2x4x16x16``.
- ``dtypes``: None for the module's defaults, else the dtypes asked for (``--dtypes``).

A :class:`Case` is one (op, case, dtype, size, pass). The runner calls ``make()`` once per input set
(several when the inputs fit in the cache, to rotate among them), then for every implementation
``setup(impl, inputs)`` once per input set outside the timed region (by default the identity; a
backward case runs its forward there), and times ``eager(state)`` and ``fused(state)``; ``fused`` is
called inside ``vlops.use_backend(backend)`` (the context is entered outside the timed region).

To add an op: write ``benchmarks/cases/<op>.py`` with ``cases(...)`` and add its name to ``MODULES``.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional

import torch

#: case modules, in the order they run (``--ops`` selects among them)
MODULES = ("diffusion", "contrastive", "patch_embed", "coattention", "e2e")

PASSES = ("forward", "backward", "forward+backward")


@dataclasses.dataclass
class Case:
    name: str  # short case name, unique within the op, e.g. "ddpm_cfg_clip"
    op: str  # the op (registry module) name, e.g. "diffusion"
    dtype: torch.dtype
    size: str  # size label, e.g. "16x4x128x128"
    pass_: str  # one of PASSES
    make: Callable[[], Any]  # fresh inputs (one input set)
    eager: Callable[[Any], Any]  # the eager baseline on one input set (after setup)
    fused: Callable[[Any], Any]  # the vlops call on one input set (after setup), run under use_backend
    floor_bytes: float  # bytes that must move (read + written) for one call
    floor_flops: float = 0.0  # flops that must be done for one call (0: bandwidth-bound op)
    eager_label: str = "eager"  # what the baseline is, e.g. "diffusers" or "reference-eager"
    # optional: per-implementation preparation outside the timed region: setup(impl, inputs) -> state,
    # impl is "eager" or a backend name (run under use_backend for backends)
    setup: Optional[Callable[[str, Any], Any]] = None
    # optional: on CUDA, also time a CUDA-graph replay of this callable (captured under the backend)
    graph_fused: Optional[Callable[[Any], Any]] = None
    # optional: restrict the fused backends (None: every one the runner selects)
    backends: Optional[tuple[str, ...]] = None
    # optional: check(eager_out, fused_out) -> relative error of the outputs that must agree (recorded
    # in the CSV as check_relerr, so a fast but wrong kernel shows)
    check: Optional[Callable[[Any, Any], float]] = None
    note: str = ""  # free text written to the CSV (e.g. the options of the case)
    # optional: reset(inputs) before the peak-memory call, outside it (e.g. drop the .grad of the last
    # call, so that the gradients the measured call allocates count instead of reusing freed ones)
    reset: Optional[Callable[[Any], None]] = None

    def __post_init__(self):
        if self.pass_ not in PASSES:
            raise ValueError(f"pass_ must be one of {PASSES}, got {self.pass_!r}")

    @property
    def matmul(self) -> bool:
        return self.floor_flops > 0


def load(name: str):
    if name not in MODULES:
        raise ValueError(f"unknown op {name!r}; registered: {', '.join(MODULES)}")
    return importlib.import_module(f"{__name__}.{name}")


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _flat(x) -> torch.Tensor:
    """A tensor, or a tuple / list of tensors flattened into one float64 vector (for checks)."""
    if isinstance(x, torch.Tensor):
        return x.detach().double().flatten()
    return torch.cat([t.detach().double().flatten() for t in x])


def autograd_fns(pass_: str, eager_fwd, fused_fwd, leaves, out_grads=None, check=None) -> dict:
    """The ``eager``, ``fused``, ``setup``, ``reset`` and ``check`` of a case whose op has a backward, for any
    pass (``Case(..., **autograd_fns(...))``).

    - ``eager_fwd(inp)`` / ``fused_fwd(inp)``: the outputs (a tensor or a tuple of tensors);
    - ``leaves(inp, fused)``: the tensors that get gradients (``fused`` False for the eager implementation: two
      modules with the same weights have different leaves); their ``.grad`` is dropped before each call;
    - ``out_grads(inp, outs)``: the gradients of the outputs (None: ones for each output);
    - ``check(a, b)``: relative error of two float64 vectors (outputs, or the leaves' gradients).

    "forward" runs the forward under no_grad and returns the outputs; "forward+backward" the forward and the
    backward, returning the outputs; "backward" runs the forward in ``setup`` (outside the timed region, under
    the implementation's backend) and keeps its graph, and each timed call runs the backward alone
    (``retain_graph``, so the next call can run it again), returning the leaves' gradients."""

    def as_tuple(outs):
        return (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)

    def grads_of(inp, outs):
        return out_grads(inp, outs) if out_grads is not None else tuple(torch.ones_like(o) for o in as_tuple(outs))

    def make_call(fwd, fused):
        if pass_ == "forward":
            def call(inp):
                with torch.no_grad():
                    return fwd(inp)
        elif pass_ == "forward+backward":
            def call(inp):
                for t in leaves(inp, fused):
                    t.grad = None
                outs = fwd(inp)
                torch.autograd.backward(as_tuple(outs), as_tuple(grads_of(inp, outs)))
                return tuple(o.detach() for o in as_tuple(outs))
        elif pass_ == "backward":
            def call(state):
                ls = leaves(state["inp"], fused)
                for t in ls:
                    t.grad = None
                torch.autograd.backward(state["outs"], state["grads"], retain_graph=True)
                return tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in ls)
        else:
            raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
        return call

    def setup(impl, inp):
        outs = as_tuple((eager_fwd if impl == "eager" else fused_fwd)(inp))
        return {"inp": inp, "outs": outs, "grads": as_tuple(grads_of(inp, outs))}

    def reset(inp):
        for fused in (False, True):
            for t in leaves(inp, fused):
                t.grad = None

    fns = {"eager": make_call(eager_fwd, False), "fused": make_call(fused_fwd, True), "reset": reset,
           "setup": setup if pass_ == "backward" else None}
    if check is not None:
        fns["check"] = lambda a, b: check(_flat(a), _flat(b))
    return fns
