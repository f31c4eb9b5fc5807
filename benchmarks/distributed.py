"""The contrastive losses across processes: fused (vlops) vs open_clip with the same flags, time and peak memory per
rank, forward + backward, W processes of one machine (gloo on CPU, NCCL with one GPU per rank).

    python benchmarks/distributed.py [--world 2] [--batch 16384] [--dim 512] [--reps 3] [--out FILE]

``--batch`` is the global batch N (each rank holds N / W pairs). One line per configuration: the median over
``--reps`` of the slowest rank's forward + backward time (the ranks start each repetition together), the ratio
eager / fused, and the largest peak memory of one forward + backward over the ranks, beyond the inputs (CPU: the
process's peak RSS, VmHWM, reset before the call, minus its RSS before; CUDA: max_memory_allocated), which counts
the feature gradients the call allocates. On CPU the RSS also holds what glibc's heap keeps of freed tensors;
``--mmap-threshold-mb 1`` makes every allocation of 1 MiB or more go back to the OS when freed, so that the peak
follows the live tensors (both sides measured the same way). fp32, unit-norm features, logit_scale 100 (CLIP's
clamp), SigLIP's bias -10. Each rank uses ``cpu_count / W`` threads on CPU.

Configurations: CLIP with local_loss False / True (gather_with_grad True, the exact gradient) for open_clip and the
fused gathered path, the fused ring (``ring=True``: the local_loss loss with the texts travelling between ranks),
and SigLIP's bidir exchange.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def configs(rank, world):
    import vlops
    from open_clip.loss import ClipLoss, SigLipLoss

    kw = dict(rank=rank, world_size=world)
    for local in (False, True):
        flags = f"local_loss={local} gather_with_grad=True"
        fused = [("fused", vlops.nn.ClipLoss(local_loss=local, gather_with_grad=True))]
        if local:
            fused.append(("fused ring", vlops.nn.ClipLoss(local_loss=True, gather_with_grad=True, ring=True)))
        yield "clip", flags, ClipLoss(local_loss=local, gather_with_grad=True, **kw), fused
    yield "siglip", "dist_impl=bidir", SigLipLoss(dist_impl="bidir", **kw), [
        ("fused", vlops.nn.SigLipLoss(dist_impl="bidir"))]


def measure(fn, make, reps, device, peak_memory_mb):
    """(median seconds of the slowest rank, peak MB of this rank)."""
    _fwd_bwd(fn, *make())  # warm-up
    times = []
    for _ in range(reps):
        a, b, s, bias = make()
        dist.barrier()
        t0 = time.perf_counter()
        fn(a, b, s, bias).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64,
                          device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        times.append(dt.item())
        del a, b, s, bias
    args = make()
    peak = peak_memory_mb(lambda: _fwd_bwd(fn, *args), device)
    return statistics.median(times), peak


def _max_over_ranks(x: float, world: int) -> float:
    xs = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(xs, torch.tensor([x], dtype=torch.float64))
    return max(v.item() for v in xs)


def _fwd_bwd(fn, a, b, s, bias):
    fn(a, b, s, bias).backward()
    return a.grad, b.grad


def _fix_mmap_threshold(mib: float) -> bool:
    """glibc: serve every allocation of at least ``mib`` MiB by mmap and return it to the OS when freed (a fixed
    threshold also turns off glibc's raising of it after such frees), so that the process RSS follows the live
    tensors instead of what the heap keeps cached."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(mib * 2**20)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def worker(rank, world, init, args):
    backend = "nccl" if args.device == "cuda" else "gloo"
    if args.device == "cpu" and args.mmap_threshold_mb is not None and not _fix_mmap_threshold(args.mmap_threshold_mb):
        raise RuntimeError("--mmap-threshold-mb: mallopt(M_MMAP_THRESHOLD) failed (not glibc?)")
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world)
    from run import git_commit, peak_memory_mb  # the runner's commit label and memory probe

    commit = git_commit()  # the code measured (read before the measurements)
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    n, D = args.batch // world, args.dim
    g = torch.Generator().manual_seed(rank)
    img = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=-1).to(device)
    txt = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=-1).to(device)

    def make():
        return (img.clone().requires_grad_(), txt.clone().requires_grad_(),
                torch.tensor(100.0, device=device, requires_grad=True),
                torch.tensor(-10.0, device=device, requires_grad=True))

    rows = []
    for kind, flags, eager, fused in configs(rank, world):
        def eager_fn(a, b, s, bias, eager=eager, kind=kind):
            return eager(a, b, s, bias) if kind == "siglip" else eager(a, b, s)

        te, me = measure(eager_fn, make, args.reps, device, peak_memory_mb)
        me_max = _max_over_ranks(me, world)
        for name, mod in fused:
            tf, mf = measure(lambda a, b, s, bias, mod=mod: mod(a, b, s, bias), make, args.reps, device,
                             peak_memory_mb)
            rows.append((kind, flags, name, te, tf, me_max, _max_over_ranks(mf, world)))
    if rank == 0:
        mem = ("max_memory_allocated" if device.type == "cuda" else
               "process RSS, glibc's default heap" if args.mmap_threshold_mb is None else
               f"process RSS, glibc mmap threshold fixed at {args.mmap_threshold_mb:g} MiB")
        lines = [f"vlops distributed losses: {world} processes ({backend}), global batch {args.batch}, D = {D}, fp32, "
                 f"forward + backward; torch {torch.__version__}; {_machine(device)}; commit {commit}; "
                 f"memory: {mem}",
                 f"{'loss':<7} {'open_clip flags':<38} {'fused':<11} {'open_clip s':>11} {'fused s':>8} {'ratio':>6} "
                 f"{'open_clip MB':>12} {'fused MB':>9} {'mem ratio':>9}"]
        for kind, flags, name, te, tf, me, mf in rows:
            lines.append(f"{kind:<7} {flags:<38} {name:<11} {te:>11.3f} {tf:>8.3f} {te / tf:>5.2f}x {me:>12.1f} "
                         f"{mf:>9.1f} {me / max(mf, 1e-9):>8.1f}x")
        text = "\n".join(lines)
        print(text, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n\n")
    dist.barrier()
    dist.destroy_process_group()


def _machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = "cpu"
    return f"{name}, {os.cpu_count()} cores"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--batch", type=int, default=16384, help="the global batch N")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default=None, help="append the table to this file")
    p.add_argument("--mmap-threshold-mb", type=float, default=None,
                   help="CPU: fix glibc's mmap threshold (e.g. 1), so that freed tensors leave the RSS at once and the "
                        "peak RSS tracks live tensors, as max_memory_allocated does on CUDA (default: glibc's policy)")
    args = p.parse_args()
    if args.world < 2 or args.batch % args.world:
        p.error("--world must be >= 2 and divide --batch")
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(args.world, os.path.join(d, "init"), args), nprocs=args.world)


if __name__ == "__main__":
    main()
