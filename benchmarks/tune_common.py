"""Helpers shared by the tile studies (benchmarks/*_tune.py): timing, one printed line per measurement,
relative error."""
from __future__ import annotations

import statistics
import time

import torch


def timed(fn, reps=20, trials=5):
    """Median milliseconds per call: ``trials`` runs of ``reps`` calls queued back to back (CUDA events on a
    GPU, wall clock on the CPU), after one untimed call."""
    fn()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    per = []
    for _ in range(trials):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(reps):
                fn()
            e.record()
            e.synchronize()
            per.append(s.elapsed_time(e) / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            per.append((time.perf_counter() - t0) * 1e3 / reps)
    return statistics.median(per)


def line(name, ms, flops, extra=""):
    """``name  ms  TFLOP/s  extra`` (``flops`` per call)."""
    print(f"{name:<58s} {ms:9.4f} ms {flops / ms / 1e9:8.1f} TFLOP/s" + (f"  {extra}" if extra else ""), flush=True)


def rel(a, b):
    """||a - b|| / ||b|| in fp32 (tensors or sequences of tensors, compared pairwise as one vector)."""
    if isinstance(a, (tuple, list)):
        num = sum(float((x.float() - y.float()).norm()) ** 2 for x, y in zip(a, b)) ** 0.5
        den = sum(float(y.float().norm()) ** 2 for y in b) ** 0.5
        return num / max(den, 1e-30)
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def aot_check(specs) -> int:
    """Compile each AOT spec (the tests/aot.py format, named) for sm_90a without a GPU and print its report
    row (registers, spills, shared memory, wgmma) and what fails the checks; returns how many failed."""
    import os
    import sys

    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("--aot cannot run under TRITON_INTERPRET=1")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import aot

    print(aot.AotReport.header())
    bad = 0
    for spec in specs:
        rep, fails = aot.check_spec(spec)
        bad += bool(fails)
        if rep is None:
            print(f"{spec['name']:<64} FAILED: {fails[0].splitlines()[0][:160]}", flush=True)
        else:
            print(rep.row() + ("  " + "; ".join(fails) if fails else ""), flush=True)
    return bad


def measure(name, fn, err_of, flops, reps, trials, tol, ranked, key, vs=""):
    """One tile configuration: ``fn()`` once (the first call compiles; its output goes to ``err_of`` for the
    relative error), then timed; prints one line (or FAILED when it does not compile or launch) and
    appends ``(ms, key)`` to ``ranked`` when the error is within ``tol``."""
    try:
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        err = err_of(out)
        ms = timed(fn, reps, trials)
    except Exception as e:  # noqa: BLE001 - a configuration that does not compile or launch is reported
        print(f"{name:<58s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
        return
    line(name, ms, flops, f"relerr {err:.1e}{vs} (first call {first_s:.1f} s)")
    if err <= tol:
        ranked.append((ms, key))


def print_best(label, ranked, show=str):
    """``label`` and the three fastest of ``ranked`` ((ms, key) pairs), keys shown by ``show``."""
    if ranked:
        ranked.sort(key=lambda r: r[0])
        print(label + ", ".join(f"{show(key)} {ms:.4f} ms" for ms, key in ranked[:3]), flush=True)
