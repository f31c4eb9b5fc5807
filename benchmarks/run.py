#!/usr/bin/env python3
"""vlops microbenchmarks: every registered op, fused vs eager, on this device.

    python benchmarks/run.py [--ops diffusion ...] [--sizes sd,headline ...] [--dtypes fp32,bf16,fp16]
                             [--device cpu|cuda] [--quick] [--out DIR] [--backends cpu,triton,cuda]
                             [--cases NAME ...] [--passes forward backward forward+backward] [--min-time S]
                             [--no-plot]

For each case (op, case, size, dtype, pass) the eager baseline and every fused backend are timed in
the same run, interleaved call by call (rotating among several input sets when the inputs fit in the
last-level cache), and for each one the runner reports:

- time: median, p20, p80 in ms. CUDA: CUDA events around each call; by default the calls are
  queued back to back as a program runs them (the host runs ahead, so host overhead is hidden
  wherever the device is the bottleneck, and counts where it is not); with --sync-each the device
  is synchronised before each call, so every call's host overhead and launch latency count. CPU:
  time.perf_counter around each call. Warm-up first; enough repetitions for >= --min-time seconds per implementation.
- peak memory beyond the inputs, in MB (a case's ``reset`` runs first, e.g. to drop the last call's
  gradients, so that the call's own outputs count). CUDA: max_memory_allocated after reset_peak_memory_stats,
  minus memory_allocated before. CPU: the process peak RSS (VmHWM, reset through
  /proc/self/clear_refs after malloc_trim) minus VmRSS before: process RSS, so allocator effects
  count.
- ratio = eager median / fused median (> 1: fused is faster), and the memory ratio eager / fused.
- achieved GB/s (TFLOP/s) from the case's counted floor bytes (flops), and the floor time from the
  ceilings MEASURED at start (copy bandwidth; matmul rate for matmul ops): pct_of_floor =
  floor_ms / median_ms * 100.

Writes: a table to stdout and <out>/<slug>.txt, rows appended to <out>/<slug>.csv, a plot of the
ratios to <out>/<slug>.png; <out> is benchmarks/results unless --out is given; <slug> is the device.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import gc
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks import cases as registry  # noqa: E402

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}

CSV_COLUMNS = [
    "timestamp_utc", "commit", "torch", "triton", "python", "device", "device_type", "threads", "loadavg",
    "op", "case", "size", "dtype", "pass", "backend", "impl", "baseline",
    "median_ms", "p20_ms", "p80_ms", "reps", "input_sets", "peak_mb", "ratio", "mem_ratio",
    "eager_median_ms", "gbps", "tflops", "floor_bytes", "floor_flops", "floor_ms", "pct_of_floor",
    "copy_gbps", "matmul_tflops", "check_relerr", "quick", "note", "error",
]

DEFAULT_BACKENDS = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}


# ----------------------------------------------------------------------------------------------------
# environment


def _split(values):
    out = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


def git_commit() -> str:
    if os.environ.get("VLOPS_COMMIT"):  # a copy of the tree without git metadata (a lent GPU machine)
        return os.environ["VLOPS_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        if sha.returncode != 0 or not sha.stdout.strip():
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=ROOT, capture_output=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.returncode == 1 else "")
    except Exception:
        return "unknown"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except Exception:
        return os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({cpu_count()} cores)"


def slug(name: str, device: torch.device) -> str:
    if device.type == "cpu":
        name = re.sub(r"\((\d+) cores\)", r"\1c", name)
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or device.type


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return ""


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:
        return "none"


def cache_bytes(device: torch.device) -> int:
    """Last-level cache: L2 on CUDA, L3 (else the largest level) on CPU."""
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return int(size) if size else 60 * 2**20
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            try:
                with open(os.path.join(base, idx, "size")) as f:
                    txt = f.read().strip()
                mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(txt[-1:].upper(), 1)
                best = max(best, int(txt.rstrip("KMGkmg")) * mult)
            except (OSError, ValueError):
                continue
    except OSError:
        pass
    return best or 32 * 2**20


# ----------------------------------------------------------------------------------------------------
# measurement primitives


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


_LIBC = None


def _malloc_trim():
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except Exception:
        pass


def peak_memory_mb(fn, device: torch.device) -> float:
    """Peak memory of one call beyond what was allocated before it (the inputs), in MB (2**20 bytes)."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return peak / 2**20
    try:
        _malloc_trim()  # give freed heap pages back, so re-touching them in the call counts
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to VmRSS
        before = _proc_status_kb("VmRSS")
        out = fn()
        peak = _proc_status_kb("VmHWM") - before
        del out
        return max(peak, 0) / 1024.0
    except (OSError, KeyError):
        return float("nan")


SYNC_EACH = False  # --sync-each


class Timer:
    """Times one call: CUDA events (the device synchronised first with --sync-each) or perf_counter."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.pending = []  # CUDA: (list, start, end)

    def time(self, fn, into: list, flush=None):
        if self.cuda:
            if flush is not None:
                flush()
            if SYNC_EACH:
                torch.cuda.synchronize(self.device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            self.pending.append((into, start, end))
        else:
            t0 = time.perf_counter()
            fn()
            into.append((time.perf_counter() - t0) * 1e3)

    def collect(self):
        if self.pending:
            torch.cuda.synchronize(self.device)
            for into, s, e in self.pending:
                into.append(s.elapsed_time(e))
            self.pending = []


def quantile(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure_copy_gbps(device: torch.device, quick: bool) -> float:
    """Device copy bandwidth: a large tensor copy_, bytes read + written, median."""
    n = (256 if device.type == "cuda" else 64) * 2**20  # fp32 elements: 1 GiB on CUDA, 256 MiB on CPU
    a = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    b = torch.empty_like(a)
    timer = Timer(device)
    times = []
    b.copy_(a)
    sync(device)
    for _ in range(5 if quick else 10):
        timer.time(lambda: b.copy_(a), times)
    timer.collect()
    del a, b
    return 2 * n * 4 / (statistics.median(times) * 1e-3) / 1e9


_MATMUL_CACHE: dict = {}


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, quick: bool) -> float:
    key = (device.type, dtype)
    if key not in _MATMUL_CACHE:
        n = 8192 if device.type == "cuda" else (1024 if quick else 2048)
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        timer = Timer(device)
        times = []
        a @ b
        sync(device)
        for _ in range(3 if quick else 10):
            timer.time(lambda: a @ b, times)
        timer.collect()
        _MATMUL_CACHE[key] = 2 * n**3 / (statistics.median(times) * 1e-3) / 1e12
    return _MATMUL_CACHE[key]


# ----------------------------------------------------------------------------------------------------
# backends


def vlops_backend_reasons(device: torch.device) -> dict:
    import vlops

    fn = getattr(vlops, "available_backends", None)
    if fn is not None:
        return dict(fn(device))
    from vlops import _backends

    return {b: _backends.unavailable_reason(b, device) for b in _backends.BACKENDS}


def use_backend(name: str):
    import vlops

    fn = getattr(vlops, "use_backend", None)
    if fn is None:
        from vlops import _backends

        fn = _backends.use_backend
    return fn(name)


def has_kernel(op: str, backend: str) -> bool:
    """Whether vlops has a ``backend`` kernel for ``op`` at all (e.g. no CUDA C++ one for the contrastive
    losses): such backends are left out of that op's rows rather than reported as errors."""
    try:
        from vlops import _backends
    except ImportError:
        return True
    return op not in _backends.OP_KERNELS or _backends.has_kernel(op, backend)


def select_backends(device: torch.device, asked) -> tuple[list[str], list[str]]:
    """(backends to run, notes)."""
    reasons = vlops_backend_reasons(device)
    notes = []
    if asked:
        run = []
        for b in asked:
            why = reasons.get(b, f"unknown backend {b!r}")
            if b == "triton" and device.type == "cpu" and not why:
                notes.append("triton on CPU runs in the interpreter (TRITON_INTERPRET=1): not a speed figure")
            if why:
                notes.append(f"backend {b!r} skipped: {why}")
            else:
                run.append(b)
        return run, notes
    run = [b for b in DEFAULT_BACKENDS.get(device.type, ()) if not reasons.get(b, "missing")]
    for b in DEFAULT_BACKENDS.get(device.type, ()):
        if reasons.get(b, "missing"):
            notes.append(f"backend {b!r} not available on {device.type}: {reasons.get(b)}")
    if not run:
        run = ["reference"]
        notes.append(f"no fused backend is available on {device.type}: benchmarking the 'reference' backend "
                     "(eager vlops.reference code behind the public API) instead")
    return run, notes


# ----------------------------------------------------------------------------------------------------
# one case


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


class Impl:
    def __init__(self, label, backend, kind, fn):
        self.label = label  # shown in the table: baseline name or backend (+graph)
        self.backend = backend  # None for eager
        self.kind = kind  # "eager" | "fused" | "fused+cudagraph"
        self.fn = fn  # fn(state) -> out
        self.states = []
        self.graphs = []
        self.graph_outs = []
        self.times = []
        self.peak_mb = float("nan")
        self.error = ""
        self.relerr = float("nan")

    def ctx(self):
        import contextlib

        return use_backend(self.backend) if self.backend else contextlib.nullcontext()

    def call(self, i):
        if self.graphs:
            return self.graphs[i].replay()
        return self.fn(self.states[i])


def run_case(case, device, backends, args, ceilings, log):
    """Measure one case; returns a list of result dicts (eager first)."""
    cuda = device.type == "cuda"
    quick = args.quick
    inputs0 = case.make()
    in_bytes = max(_nbytes(inputs0), 1)
    llc = ceilings["cache_bytes"]
    mem_cap = (4 if cuda else 1) * 2**30
    n_sets = 1
    if in_bytes < 2 * llc:
        n_sets = max(1, min(16 if cuda else 6, math.ceil(2 * llc / in_bytes), mem_cap // in_bytes))
    sets = [inputs0] + [case.make() for _ in range(n_sets - 1)]
    flush = None
    if cuda and n_sets * in_bytes < 2 * llc:  # rotation cannot evict L2: also flush it before each call
        buf = torch.empty(int(2 * llc) // 4, dtype=torch.float32, device=device)
        flush = buf.zero_

    setup = case.setup or (lambda impl, inp: inp)
    impls = [Impl(case.eager_label, None, "eager", case.eager)]
    use = [b for b in backends if (case.backends is None or b in case.backends) and has_kernel(case.op, b)]
    impls += [Impl(b, b, "fused", case.fused) for b in use]
    if cuda and case.graph_fused is not None:
        impls += [Impl(b + "+graph", b, "fused+cudagraph", case.graph_fused) for b in use]

    # setup, correctness check, warm-up (and CUDA-graph capture)
    eager_out = None
    for im in impls:
        try:
            with im.ctx():
                im.states = [setup(im.backend or "eager", inp) for inp in sets]
                out = im.fn(im.states[0])
                sync(device)
                if im.kind == "eager":
                    eager_out = out
                elif case.check is not None and eager_out is not None:
                    im.relerr = float(case.check(eager_out, out))
                del out
                for _ in range(2 if quick else 3):
                    im.fn(im.states[0])
                sync(device)
                if im.kind == "fused+cudagraph":
                    side = torch.cuda.Stream(device)
                    side.wait_stream(torch.cuda.current_stream(device))
                    with torch.cuda.stream(side):
                        for st in im.states:
                            im.fn(st)
                    torch.cuda.current_stream(device).wait_stream(side)
                    sync(device)
                    for st in im.states:
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g):
                            im.graph_outs.append(im.fn(st))  # keep the outputs (graph pool) alive
                        im.graphs.append(g)
                    for i in range(len(im.graphs)):
                        im.graphs[i].replay()
                    sync(device)
        except Exception as e:  # keep going: the row says what failed
            im.error = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
            log(f"  ! {case.op}/{case.name} {im.label}: {im.error}")
            if args.verbose:
                traceback.print_exc()
    del eager_out
    live = [im for im in impls if not im.error]
    if not live:
        return impls, n_sets

    # peak memory of one call
    for im in live:
        try:
            with im.ctx():
                if case.reset is not None:
                    case.reset(sets[0])
                im.peak_mb = peak_memory_mb(lambda: im.call(0), device)
        except Exception as e:
            im.error = f"{type(e).__name__}: {e}"[:300]
    live = [im for im in live if not im.error]
    if not live:
        return impls, n_sets

    # estimate the time of one call to choose the repetitions
    timer = Timer(device)
    est = {}
    for im in live:
        ts = []
        with im.ctx():
            for i in range(2):
                timer.time(lambda: im.call(i % n_sets), ts, flush)
        timer.collect()
        est[im] = max(min(ts), 1e-4) * 1e-3  # seconds
    target = args.min_time if args.min_time is not None else (0.1 if quick else (0.3 if cuda else 0.5))
    lo_reps = 3 if quick else 10
    hi_reps = 2000 if quick else 20000
    need_fast = math.ceil(target / min(est.values()))
    need_slow = math.ceil(target / max(est.values()))
    budget = 3 * target * len(live)  # keep one case's timing to a few seconds
    reps_budget = max(1, int(budget / sum(est.values())))
    reps = max(lo_reps, min(hi_reps, max(need_slow, min(need_fast, reps_budget))))

    # interleaved timing: each repetition runs every implementation once, in a rotating order
    # (the backend context is entered outside the timed region: Timer.time times only the call)
    # (the garbage collector is paused so that a collection does not land inside one call)
    order = list(live)
    gc.collect()
    gc.disable()
    try:
        for r in range(reps):
            i = r % n_sets
            for im in order:
                with im.ctx():
                    timer.time(lambda: im.call(i), im.times, flush)
            order = order[1:] + order[:1]
            if cuda and len(timer.pending) >= 512:
                timer.collect()
        timer.collect()
    finally:
        gc.enable()
    for im in live:
        im.reps = reps
    return impls, n_sets


def rows_for(case, impls, n_sets, ceilings, meta, args, device):
    eager = impls[0]
    e_med = statistics.median(eager.times) if eager.times else float("nan")
    mm = measure_matmul_tflops(device, case.dtype, args.quick) if case.floor_flops > 0 else float("nan")
    floor_s = case.floor_bytes / (ceilings["copy_gbps"] * 1e9)
    if case.floor_flops > 0:
        floor_s = max(floor_s, case.floor_flops / (mm * 1e12))
    rows = []
    for im in impls:
        med = statistics.median(im.times) if im.times else float("nan")
        ok = bool(im.times)
        row = dict(meta)
        row.update({
            "op": case.op, "case": case.name, "size": case.size, "dtype": DTYPE_NAMES.get(case.dtype, str(case.dtype)),
            "pass": case.pass_, "backend": im.label if im.kind == "eager" else im.backend, "impl": im.kind,
            "baseline": case.eager_label,
            "median_ms": med, "p20_ms": quantile(im.times, 0.2), "p80_ms": quantile(im.times, 0.8),
            "reps": getattr(im, "reps", 0), "input_sets": n_sets, "peak_mb": im.peak_mb,
            "ratio": (e_med / med) if ok else float("nan"),
            "mem_ratio": (eager.peak_mb / im.peak_mb) if ok and im.peak_mb > 0 else float("nan"),
            "eager_median_ms": e_med,
            "gbps": case.floor_bytes / (med * 1e-3) / 1e9 if ok else float("nan"),
            "tflops": case.floor_flops / (med * 1e-3) / 1e12 if ok and case.floor_flops else float("nan"),
            "floor_bytes": case.floor_bytes, "floor_flops": case.floor_flops, "floor_ms": floor_s * 1e3,
            "pct_of_floor": floor_s * 1e3 / med * 100 if ok else float("nan"),
            "copy_gbps": ceilings["copy_gbps"], "matmul_tflops": mm,
            "check_relerr": im.relerr, "quick": int(bool(args.quick)), "note": case.note, "error": im.error,
        })
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------
# output


def _f(v, fmt):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, fmt)


def format_table(rows, header_lines) -> str:
    head = ["op", "case", "size", "dtype", "pass", "backend", "eager ms", "fused ms", "ratio", "GB/s",
            "% floor", "eager %fl", "peak MB e/f", "relerr / error"]
    lines = []
    eager = {}
    for r in rows:
        if r["impl"] == "eager":
            eager[(r["op"], r["case"], r["size"], r["dtype"], r["pass"])] = r
    body = []
    for r in rows:
        if r["impl"] == "eager":
            continue
        e = eager.get((r["op"], r["case"], r["size"], r["dtype"], r["pass"]), {})
        be = r["backend"] + ("+graph" if r["impl"] == "fused+cudagraph" else "")
        if r["error"]:
            body.append([r["op"], r["case"], r["size"], r["dtype"], r["pass"], be, _f(e.get("median_ms"), ".3f"),
                         "ERROR", "", "", "", "", "", r["error"][:60]])
            continue
        body.append([
            r["op"], r["case"], r["size"], r["dtype"], r["pass"], be,
            _f(e.get("median_ms"), ".3f"), _f(r["median_ms"], ".3f"), _f(r["ratio"], ".2f") + "x",
            _f(r["gbps"] if not r.get("floor_flops") else r["tflops"], ".1f"),
            _f(r["pct_of_floor"], ".1f"), _f(e.get("pct_of_floor"), ".1f"),
            f"{_f(e.get('peak_mb'), '.1f')}/{_f(r['peak_mb'], '.1f')}", _f(r["check_relerr"], ".1e"),
        ])
    if not body:  # only eager rows (no backend ran): still show them
        for r in rows:
            body.append([r["op"], r["case"], r["size"], r["dtype"], r["pass"], "-", _f(r["median_ms"], ".3f"),
                         "-", "-", "-", "-", _f(r["pct_of_floor"], ".1f"), f"{_f(r['peak_mb'], '.1f')}/-",
                         r["error"][:60]])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(str(c).rjust(w) if i >= 6 else str(c).ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    lines += header_lines
    lines.append(fmt(head))
    lines.append("-" * len(lines[-1]))
    lines += [fmt(b) for b in body]
    lines.append("ratio = eager median / fused median (>1: fused faster); GB/s (TFLOP/s for matmul ops) from the "
                 "counted floor bytes (flops); % floor = floor time / median (floor from the measured ceilings); "
                 "peak MB = memory beyond the inputs of one call (CPU: process RSS); relerr = fused vs eager on "
                 "the deterministic outputs")
    return "\n".join(lines) + "\n"


def _csv_value(v):
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return format(v, ".9g")
    return v


def append_csv(path: str, rows):
    existing_rows, header = [], None
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames
            if header != CSV_COLUMNS:
                existing_rows = list(reader)
    if header is not None and header != CSV_COLUMNS:  # columns changed: rewrite with the new header
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            w.writeheader()
            for r in existing_rows:
                w.writerow(r)
        header = CSV_COLUMNS
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if header is None:
            w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k, "")) for k in CSV_COLUMNS})


def plot(path: str, rows, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fused = [r for r in rows if r["impl"] != "eager" and not r["error"] and r["ratio"] == r["ratio"]
             and r["ratio"] > 0]
    labels = []
    for r in fused:
        lab = f"{r['op']}/{r['case']}\n{r['size']} {r['dtype']} {r['pass']}"
        if lab not in labels:
            labels.append(lab)
    bes = []
    for r in fused:
        be = r["backend"] + ("+graph" if r["impl"] == "fused+cudagraph" else "")
        if be not in bes:
            bes.append(be)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(labels) * max(1, len(bes)) ** 0.5 + 2), 5))
    width = 0.8 / max(1, len(bes))
    for j, be in enumerate(bes):
        xs, ys = [], []
        for r in fused:
            b = r["backend"] + ("+graph" if r["impl"] == "fused+cudagraph" else "")
            if b == be:
                lab = f"{r['op']}/{r['case']}\n{r['size']} {r['dtype']} {r['pass']}"
                xs.append(labels.index(lab) + (j - (len(bes) - 1) / 2) * width)
                ys.append(r["ratio"])
        bars = ax.bar(xs, ys, width=width, label=be)
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.2f}x", (x, y), ha="center", va="bottom", fontsize=7)
        del bars
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:g}x")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    baselines = sorted({r["baseline"] for r in fused})
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel(f"speed-up vs eager ({', '.join(baselines) or '-'}): eager/fused")
    ax.set_title(title, fontsize=9)
    if bes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", help=f"ops to run (default: all of {', '.join(registry.MODULES)})")
    p.add_argument("--sizes", nargs="+", help="size labels (or literal shapes) to run, e.g. sd,headline or 2x4x16x16")
    p.add_argument("--dtypes", nargs="+", help="fp32,bf16,fp16 (default: each case's own)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions (< 2 min on a 2-core CPU)")
    p.add_argument("--out", help="write csv/png/table into this folder (default: benchmarks/results)")
    p.add_argument("--backends", nargs="+", help="fused backends to run (default: cpu on CPU; triton, cuda on CUDA)")
    p.add_argument("--cases", nargs="+", help="only cases whose name contains one of these")
    p.add_argument("--passes", nargs="+", choices=registry.PASSES,
                   help="only these passes (default: every pass each case has)")
    p.add_argument("--min-time", type=float, help="seconds of timed calls per implementation (default 0.5 CPU, "
                   "0.3 CUDA, 0.1 quick)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--list", action="store_true", help="list the cases that would run, and exit")
    p.add_argument("--replot", metavar="CSV", help="only redraw the PNG of the latest run recorded in CSV (e.g. a "
                   "results file brought back from a machine without matplotlib), next to it or into --out")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    p.add_argument("--sync-each", action="store_true", help="CUDA: synchronise before each timed call (latency "
                   "with host overhead) instead of queueing calls back to back")
    return p.parse_args(argv)


def replot(csv_path: str, out_dir=None) -> int:
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        print(f"error: no rows in {csv_path}", file=sys.stderr)
        return 1
    last = max(r["timestamp_utc"] for r in rows)
    rows = [r for r in rows if r["timestamp_utc"] == last]
    for r in rows:
        try:
            r["ratio"] = float(r["ratio"])
        except ValueError:
            r["ratio"] = float("nan")
    base = os.path.splitext(os.path.basename(csv_path))[0]
    out_dir = out_dir or os.path.dirname(os.path.abspath(csv_path))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, base + ".png")
    plot(path, rows, f"vlops fused vs eager on {rows[0]['device']} ({rows[0]['commit']}, {last})")
    print(f"wrote {path} ({len(rows)} rows of the run at {last})")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.replot:
        return replot(args.replot, args.out)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda asked but no CUDA device is available", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    ops = _split(args.ops) or list(registry.MODULES)
    for op in ops:
        if op not in registry.MODULES:
            print(f"error: unknown op {op!r}; registered: {', '.join(registry.MODULES)}", file=sys.stderr)
            return 2
    sizes = set(_split(args.sizes)) or None
    try:
        dtypes = [DTYPES[d.lower()] for d in _split(args.dtypes)] or None
    except KeyError as e:
        print(f"error: unknown dtype {e}; use fp32, bf16, fp16", file=sys.stderr)
        return 2
    case_filter = _split(args.cases)
    out_dir = args.out or os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)

    import vlops  # noqa: F401  (fail early and clearly if the package is not importable)

    dname = device_name(device)
    dslug = slug(dname, device)
    meta = {
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(), "torch": torch.__version__, "triton": triton_version(),
        "python": platform.python_version(), "device": dname, "device_type": device.type,
        "threads": torch.get_num_threads() if device.type == "cpu" else "",
        "loadavg": loadavg(),  # other work on the machine at start (1-min load average): CPU figures are noisy above ~0.5
    }

    def log(msg):
        print(msg, flush=True)

    global SYNC_EACH
    SYNC_EACH = bool(args.sync_each)
    backends, notes = select_backends(device, _split(args.backends))
    ceilings = {"cache_bytes": cache_bytes(device), "copy_gbps": float("nan") if args.list else measure_copy_gbps(device, args.quick)}
    header = [
        f"vlops benchmarks on {dname} [{device.type}], torch {torch.__version__}, triton {meta['triton']}, "
        f"python {meta['python']}, commit {meta['commit']}"
        + (f", {meta['threads']} threads, load average {meta['loadavg']}" if device.type == "cpu" else ""),
        f"measured copy bandwidth {ceilings['copy_gbps']:.1f} GB/s (read+write); last-level cache "
        f"{ceilings['cache_bytes'] / 2**20:.0f} MB; fused backends: {', '.join(backends) or 'none'}"
        + ("; QUICK mode" if args.quick else "")
        + ("" if device.type == "cpu" else ("; timing: synchronised before each call" if SYNC_EACH
                                            else "; timing: calls queued back to back")),
    ] + [f"note: {n}" for n in notes]
    for line in header:
        log(line)

    all_rows = []
    for op in ops:
        mod = registry.load(op)
        try:
            gen = mod.cases(device, args.quick, sizes, dtypes)
            case_list = []
            for case in gen:
                if case_filter and not any(f in case.name for f in case_filter):
                    continue
                if args.passes and case.pass_ not in args.passes:
                    continue
                case_list.append(case)
        except Exception as e:
            log(f"! op {op}: could not build its cases: {type(e).__name__}: {e}")
            if args.verbose:
                traceback.print_exc()
            continue
        if args.list:
            for case in case_list:
                log(f"  {op}/{case.name} {case.size} {DTYPE_NAMES.get(case.dtype)} {case.pass_} "
                    f"[baseline {case.eager_label}; floor {case.floor_bytes / 1e6:.1f} MB"
                    + (f", {case.floor_flops / 1e9:.1f} GFLOP" if case.floor_flops else "") + "]"
                    + (" +cudagraph" if case.graph_fused is not None and device.type == "cuda" else ""))
            continue
        for case in case_list:
            t0 = time.perf_counter()
            try:
                impls, n_sets = run_case(case, device, backends, args, ceilings, log)
                rows = rows_for(case, impls, n_sets, ceilings, meta, args, device)
            except Exception as e:
                log(f"! {op}/{case.name} {case.size} {DTYPE_NAMES.get(case.dtype)}: {type(e).__name__}: {e}")
                if args.verbose:
                    traceback.print_exc()
                continue
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            all_rows += rows
            brief = ", ".join(f"{r['backend'] if r['impl'] != 'fused+cudagraph' else r['backend'] + '+graph'} "
                              f"{_f(r['median_ms'], '.3f')} ms" for r in rows)
            log(f"  {op}/{case.name} {case.size} {DTYPE_NAMES.get(case.dtype)} {case.pass_}: {brief} "
                f"[{time.perf_counter() - t0:.1f} s]")

    if args.list:
        return 0
    if not all_rows:
        log("no results")
        return 1
    table = format_table(all_rows, header)
    print()
    print(table, end="")
    base = os.path.join(out_dir, dslug)
    with open(base + ".txt", "w") as f:
        f.write(table)
    append_csv(base + ".csv", all_rows)
    written = [base + ".txt", base + ".csv"]
    if not args.no_plot:
        try:
            plot(base + ".png", all_rows, f"vlops fused vs eager on {dname} ({meta['commit']}, {meta['timestamp_utc']})")
            written.append(base + ".png")
        except Exception as e:
            log(f"! plot failed: {type(e).__name__}: {e}")
    log(f"wrote {', '.join(written)}  (total {time.perf_counter() - t_start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
