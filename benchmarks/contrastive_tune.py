"""Tile study of the Triton contrastive kernels on a CUDA GPU: each kernel timed alone at one size over
a few tile configurations, next to cuBLAS products of the same shapes, plus one run at a huge batch.
The data for choosing ``kernels/contrastive.block_config`` and the kernel design; the headline
fused-vs-open_clip figures come from ``benchmarks/run.py``.

    python benchmarks/contrastive_tune.py [--n 65536] [--d 768] [--dtype bf16] [--huge 1048576]
    python benchmarks/contrastive_tune.py --only-huge --device cpu --dtype fp32 --d 512 --huge 65536 \
        --huge-backward-max-s 1000          (the CPU backend at N = 65536)

Prints one line per measurement: milliseconds (median of CUDA-event timings), the counted TFLOP/s
(the useful products: 2 N^2 D per S pass of the forward, 6 N^2 D for the loss gradient) and, for the
kernels, the TFLOP/s they execute (S recomputed once per output-feature chunk). Every kernel's output
is first checked against a float32 cuBLAS computation of the same rows.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timed(fn, reps):
    """Median milliseconds of ``reps`` calls (one warm-up call first), CUDA events."""
    fn()
    if not torch.cuda.is_available():  # the smoke run (--device cpu, TRITON_INTERPRET=1)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def line(name, ms, useful_flops, executed_flops=None, extra=""):
    t = f"{name:<52s} {ms:10.3f} ms {useful_flops / ms / 1e9:8.1f} TFLOP/s"
    if executed_flops is not None:
        t += f"  (executed {executed_flops / ms / 1e9:6.1f})"
    print(t + ("  " + extra if extra else ""), flush=True)


def ref_rows(a, b, scale, rows):
    """Float32 S rows ``scale * a[rows] @ b.T`` and their log-sum-exp (cuBLAS, fp32 inputs)."""
    s = (a[rows].float() @ b.float().T) * scale
    return s, torch.logsumexp(s, dim=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--dtype", choices=sorted(DT), default="bf16")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--huge", type=int, default=1048576, help="N of the one-off huge run (0: skip)")
    p.add_argument("--huge-backward-max-s", type=float, default=12.0,
                   help="run the huge backward only when the huge forward took less than this")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of this script under TRITON_INTERPRET=1")
    p.add_argument("--only-huge", action="store_true",
                   help="only the huge run, through vlops.clip_loss on --device (any backend; e.g. --device cpu "
                        "--dtype fp32 --d 512 --huge 65536)")
    args = p.parse_args()
    if args.only_huge:
        torch.manual_seed(0)
        huge_run(args.huge, args.d, DT[args.dtype], torch.device(args.device), args.huge_backward_max_s)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("contrastive_tune.py needs a CUDA device")
    from vlops.kernels import contrastive as K

    torch.manual_seed(0)
    dev = torch.device(args.device)
    N, D, dt = args.n, args.d, DT[args.dtype]
    a = torch.nn.functional.normalize(torch.randn(N, D, device=dev), dim=-1).to(dt)
    b = torch.nn.functional.normalize(torch.randn(N, D, device=dev), dim=-1).to(dt)
    b[: N // 2] = (a[: N // 2].float() + 0.3 * b[: N // 2].float()).to(dt)  # matched pairs score high
    scale = torch.tensor([100.0], device=dev)
    nnd = float(N) * N * D
    print(f"{torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'cpu'}  torch {torch.__version__}  N={N} D={D} {args.dtype}", flush=True)

    # cuBLAS: the full S product, and the chunk products a cuBLAS-based design would run
    line("cublas S = a @ b.T (N x N, input dtype out)", timed(lambda: a @ b.T, args.reps), 2 * nnd)
    C = min(N, 8192)
    try:
        f32_out = lambda x, y: torch.mm(x, y, out_dtype=torch.float32)  # noqa: E731
        f32_out(a[:8], b[:8].T)
    except Exception as e:  # torch without mm(out_dtype=)
        print(f"  (mm out_dtype=float32 unavailable: {type(e).__name__}; chunk products in the input dtype)")
        f32_out = torch.mm
    g = torch.randn(C, N, device=dev).to(dt)
    line(f"cublas chunk S rows [{C} x N] fp32 out", timed(lambda: f32_out(a[:C], b.T), args.reps), 2.0 * C * N * D)
    line(f"cublas chunk G @ b [{C} x N]@[N x D]", timed(lambda: f32_out(g, b), args.reps), 2.0 * C * N * D)
    line(f"cublas chunk G.T @ a [N x {C}]@[{C} x D]", timed(lambda: f32_out(g.T, a[:C]), args.reps), 2.0 * C * N * D)
    del g

    # forward: row and column log-sum-exp, checked on 256 rows
    rows = torch.arange(0, N, max(1, N // 256), device=dev)[:256]
    s_ref, lse_ref = ref_rows(a, b, scale, rows)
    col_ref = torch.logsumexp((b[rows].float() @ a.float().T) * scale, dim=1)
    variants = [("fused", {}), ("fused", dict(BLOCK_Y=64)), ("chunked", {}), ("chunked", dict(CHUNK_ROWS=2048)),
                ("chunked", dict(CHUNK_ROWS=8192))]
    for method, cfg in variants:
        try:
            row, col = K.contrastive_lse(a, b, scale, blocks=cfg, method=method)
            err = max(float((row[rows] - lse_ref).abs().max()), float((col[rows] - col_ref).abs().max()))
            ms = timed(lambda: K.contrastive_lse(a, b, scale, blocks=cfg, method=method), args.reps)
        except Exception as e:
            print(f"lse {method} {cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        line(f"lse {method} {cfg or 'default'}", ms, (4 if method == "fused" else 2) * nnd,
             extra=f"max |lse err| {err:.2e}")

    # backward: the CLIP gradient kernels (da and db), checked on 256 rows of da
    row, col = K.contrastive_lse(a, b, scale)
    center_r = torch.zeros(N, device=dev)
    center_c = torch.zeros(N, device=dev)
    cr = cc = 0.5 / N
    w = cr * torch.exp(s_ref - row[rows, None]) + cc * torch.exp(s_ref - col[None, :])
    da_ref = w @ b.float()
    variants = [("fused", {}), ("fused", dict(BLOCK_DO=512)), ("chunked", {}), ("chunked", dict(CHUNK_ROWS=2048)),
                ("chunked", dict(CHUNK_ROWS=8192))]
    for method, cfg in variants:
        full = {**K.block_config("grad", a.element_size()), **cfg}
        chunks = math.ceil(D / full["BLOCK_DO"]) if method == "fused" else 2
        try:
            da, db, ds = K.clip_bwd(a, b, scale, row, col, cr, cc, center_r, center_c, blocks=cfg, method=method)
            rel = float((da[rows] - da_ref).norm() / da_ref.norm())
            ms = timed(lambda: K.clip_bwd(a, b, scale, row, col, cr, cc, center_r, center_c, blocks=cfg,
                                          method=method), args.reps)
        except Exception as e:
            print(f"grad {method} {cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        line(f"clip grad {method} {cfg or 'default'}", ms, 4 * nnd, 2 * (chunks + 1) * 2 * nnd,
             extra=f"da rel err {rel:.2e}, dscale {float(ds):.4e}")
    del s_ref, w, da_ref

    # SigLIP forward and gradient
    bias = torch.tensor([-10.0], device=dev)
    for method in ("fused", "chunked"):
        try:
            f = float(K.siglip_fwd(a, b, scale, bias, False, method=method))
            line(f"siglip fwd {method}", timed(lambda: K.siglip_fwd(a, b, scale, bias, False, method=method),
                                                args.reps), 2 * nnd, extra=f"loss sum {f:.6e}")
            g = K.siglip_bwd(a, b, scale, bias, False, method=method)
            line(f"siglip grad {method}", timed(lambda: K.siglip_bwd(a, b, scale, bias, False, method=method),
                                                 args.reps), 4 * nnd,
                 extra=f"|da| {float(g[0].norm()):.6e} dscale {float(g[2]):.6e} dbias {float(g[3]):.6e}")
        except Exception as e:
            print(f"siglip {method}: {type(e).__name__}: {str(e)[:300]}", flush=True)

    # the whole op through vlops (autograd), forward + backward
    import vlops

    def fwd_bwd(x, y, s):
        for t in (x, y, s):
            t.grad = None
        loss = vlops.clip_loss(x, y, s)
        loss.backward()
        return loss

    a.requires_grad_(True)
    b.requires_grad_(True)
    s0 = torch.tensor(100.0, device=dev, requires_grad=True)
    line("vlops.clip_loss fwd+bwd", timed(lambda: fwd_bwd(a, b, s0), args.reps), 6 * nnd)
    del a, b
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    if args.huge:
        huge_run(args.huge, D, dt, dev, args.huge_backward_max_s)


def _cpu_peak_reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def _cpu_kb(key):
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith(key + ":"):
                return int(ln.split()[1])
    return 0


def huge_run(Nh, D, dt, dev, backward_max_s):
    """One vlops.clip_loss forward (and backward) at batch Nh: time, loss, peak memory beyond the inputs
    (CUDA: allocator peak; CPU: process peak RSS)."""
    import vlops

    cuda = dev.type == "cuda"
    w = torch.randn(min(Nh, 256), D, device=dev).to(dt).requires_grad_(True)  # warm-up: loading, compiling
    vlops.clip_loss(w, w.detach().clone(), torch.tensor(10.0, device=dev, requires_grad=True)).backward()
    del w
    gen = torch.Generator(device=dev).manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(Nh, D, device=dev, generator=gen), dim=-1).to(dt)
    y = torch.nn.functional.normalize(torch.randn(Nh, D, device=dev, generator=gen), dim=-1).to(dt)
    x.requires_grad_(True)
    y.requires_grad_(True)
    sh = torch.tensor(100.0, device=dev, requires_grad=True)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        peak_mib = lambda: (torch.cuda.max_memory_allocated() - base) / 2**20  # noqa: E731
    else:
        _cpu_peak_reset()
        base = _cpu_kb("VmRSS")
        peak_mib = lambda: (_cpu_kb("VmHWM") - base) / 1024  # noqa: E731
    t0 = time.perf_counter()
    loss = vlops.clip_loss(x, y, sh)
    sync()
    tf = time.perf_counter() - t0
    hn = float(Nh) * Nh * D
    print(f"huge N={Nh} D={D} {dt} on {dev.type}: forward {tf:.2f} s ({2 * hn / tf / 1e12:.3f} TFLOP/s of the "
          f"2 N^2 D it must do), loss {float(loss.detach()):.4f}, peak beyond inputs {peak_mib():.1f} MiB",
          flush=True)
    if tf > backward_max_s:
        print(f"huge N={Nh}: backward skipped (forward {tf:.1f} s > {backward_max_s} s)")
        return
    t0 = time.perf_counter()
    loss.backward()
    sync()
    tb = time.perf_counter() - t0
    ok = all(bool(torch.isfinite(t.grad).all()) for t in (x, y, sh))
    print(f"huge N={Nh}: backward {tb:.2f} s, grads finite: {ok}, dscale {float(sh.grad):.3e}, peak beyond "
          f"inputs {peak_mib():.1f} MiB (includes the two gradients, {2 * Nh * D * x.element_size() / 2**20:.0f} "
          f"MiB); the N x N logits alone would take {Nh * Nh * x.element_size() / 2**30:.1f} GiB", flush=True)


if __name__ == "__main__":
    main()
