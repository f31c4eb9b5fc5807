"""Host time per call of the fused ops at tiny sizes, where nothing but the Python, dispatch and launch path
counts: the latency floor of a small call (co-attention at VQA sizes runs a few microseconds of GPU work).

    python benchmarks/host_overhead.py                      # cpu backend and the eager baselines, on the CPU
    TRITON_INTERPRET=1 python benchmarks/host_overhead.py --stub-triton
                                                            # + the triton backend's host path, kernels stubbed
    python benchmarks/host_overhead.py --device cuda        # on a GPU: time to enqueue one call

Each row is the best over ``--trials`` of the mean time of ``--calls`` back-to-back calls, in microseconds
(the least disturbed trial: on a shared machine the noise only ever adds time):
``forward`` with no input requiring grad, ``forward+backward`` with every float input requiring grad and
``backward()`` of the outputs' sum. On CUDA the calls are queued without a synchronisation, so at these sizes
the figure is the host's time to issue a call (a device synchronisation inside a call shows as the GPU's
latency). ``--stub-triton`` (CPU tensors under ``TRITON_INTERPRET=1``) replaces every ``@triton.jit`` kernel
of ``vlops.kernels`` by a no-op, so the triton row is the host path up to the launch (argument checks,
custom-op dispatch, autograd, launcher prologue) without the interpreter's cost; its outputs are not computed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import vlops  # noqa: E402


def _co_attention(device):
    B, H, d, Nt, Nv = 2, 2, 64, 8, 13
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(B, n, H, d, generator=g).to(device) for n in (Nt, Nt, Nt, Nv, Nv, Nv)]
    t_len = torch.tensor([8, 5])  # on the host: checked with no device synchronisation
    i_len = torch.tensor([13, 9])
    t_keep = (torch.arange(Nt)[None] < t_len[:, None]).to(device)
    i_keep = (torch.arange(Nv)[None] < i_len[:, None]).to(device)

    def fused(tq, tk, tv, iq, ik, iv):
        return vlops.co_attention(tq, tk, tv, iq, ik, iv, text_lengths=t_len, image_lengths=i_len)

    def eager(tq, tk, tv, iq, ik, iv):
        sdpa = lambda q, k, v, keep: F.scaled_dot_product_attention(  # noqa: E731
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep[:, None, None, :]).transpose(1, 2)
        return sdpa(tq, ik, iv, i_keep), sdpa(iq, tk, tv, t_keep)

    return "co_attention", "two masked SDPA", x, fused, eager


def _patch_embed(device):
    B, C, S, P, D = 2, 3, 32, 16, 64
    g = torch.Generator().manual_seed(0)
    img, w, b, cls, pos, lw, lb = (torch.randn(*s, generator=g).to(device) for s in
                                   ((B, C, S, S), (D, C, P, P), (D,), (1, 1, D), (1, 1 + (S // P) ** 2, D), (D,), (D,)))

    def fused(img, w, b, cls, pos, lw, lb):
        return vlops.patch_embed(img, w, b, cls_token=cls, pos_embed=pos, ln=(lw, lb, 1e-5))

    def eager(img, w, b, cls, pos, lw, lb):
        x = F.conv2d(img, w, b, stride=P).flatten(2).transpose(1, 2)
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], 1) + pos
        return F.layer_norm(x, (D,), lw, lb, 1e-5)

    return "patch_embed", "conv, cat, add, LayerNorm", [img, w, b, cls, pos, lw, lb], fused, eager


def _contrastive(device, sig):
    N, D = 8, 32
    g = torch.Generator().manual_seed(0)
    a, t = (F.normalize(torch.randn(N, D, generator=g), dim=-1).to(device) for _ in range(2))
    scale = torch.tensor(10.0, device=device)
    bias = torch.tensor(-5.0, device=device)
    if sig:
        def fused(a, t, scale, bias):
            return vlops.siglip_loss(a, t, scale, bias)

        def eager(a, t, scale, bias):
            z = 2 * torch.eye(N, device=a.device) - 1
            return -F.logsigmoid(z * (scale * a @ t.T + bias)).sum() / N

        return "siglip_loss", "logits, logsigmoid", [a, t, scale, bias], fused, eager

    def fused(a, t, scale):
        return vlops.clip_loss(a, t, scale)

    def eager(a, t, scale):
        labels = torch.arange(N, device=a.device)
        return (F.cross_entropy(scale * a @ t.T, labels) + F.cross_entropy(scale * t @ a.T, labels)) / 2

    return "clip_loss", "logits, two cross-entropies", [a, t, scale], fused, eager


CASES = {"co_attention": _co_attention, "patch_embed": _patch_embed,
         "clip_loss": lambda dev: _contrastive(dev, False), "siglip_loss": lambda dev: _contrastive(dev, True)}


def stub_triton_kernels():
    """Replace every @triton.jit kernel of vlops.kernels (module attributes and dicts of them) by a no-op launch."""
    import importlib

    class _Stub:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    def is_kernel(v):
        return type(v).__name__ in ("JITFunction", "InterpretedFunction")

    for name in ("coattention", "contrastive", "patch_embed", "diffusion_step"):
        mod = importlib.import_module(f"vlops.kernels.{name}")
        for attr, v in list(vars(mod).items()):
            if is_kernel(v) and attr.endswith("_kernel"):
                setattr(mod, attr, _Stub())
            elif isinstance(v, dict) and v and all(is_kernel(k) for k in v.values()):
                setattr(mod, attr, {k: _Stub() for k in v})


def _sum(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return sum(o.float().sum() for o in outs)


def time_per_call(fn, inputs, pass_, device, calls, trials):
    if pass_ == "forward+backward":
        inputs = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]

        def call():
            _sum(fn(*inputs)).backward()
    else:
        inputs = [x.detach() for x in inputs]

        def call():
            fn(*inputs)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(max(10, calls // 10)):
        call()
    sync()
    runs = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        runs.append((time.perf_counter() - t0) / calls * 1e6)
        sync()
    return min(runs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--ops", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--backends", nargs="+", default=None, help="fused backends (default: cpu on CPU, triton on CUDA; "
                   "with --stub-triton: cpu and triton)")
    p.add_argument("--stub-triton", action="store_true", help="CPU tensors under TRITON_INTERPRET=1: time the triton "
                   "backend's host path with no-op kernels")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--trials", type=int, default=7)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.stub_triton:
        import os

        if args.device != "cpu" or os.environ.get("TRITON_INTERPRET") != "1":
            p.error("--stub-triton needs --device cpu and TRITON_INTERPRET=1 in the environment")
        stub_triton_kernels()
    backends = args.backends or (["cpu", "triton"] if args.stub_triton
                                 else ["triton" if device.type == "cuda" else "cpu"])
    print(f"host time per call (us), {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"best of {args.trials} x {args.calls} calls" + (" (triton kernels stubbed)" if args.stub_triton else ""))
    header = f"{'op':14s} {'pass':17s} {'eager':>8s} " + " ".join(f"{b:>8s}" for b in backends) + "  baseline"
    print(header)
    print("-" * len(header))
    for name in args.ops:
        op, label, inputs, fused, eager = CASES[name](device)
        for pass_ in ("forward", "forward+backward"):
            row = [time_per_call(eager, inputs, pass_, device, args.calls, args.trials)]
            for b in backends:
                with vlops.use_backend(b):
                    row.append(time_per_call(fused, inputs, pass_, device, args.calls, args.trials))
            print(f"{op:14s} {pass_:17s} " + " ".join(f"{v:8.1f}" for v in row) + f"  {label}")


if __name__ == "__main__":
    main()
