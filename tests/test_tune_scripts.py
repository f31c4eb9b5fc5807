"""The tile studies (benchmarks/*_tune.py) run end to end: on CPU tensors under the Triton interpreter, in a
subprocess, at their smoke sizes. They are GPU tools, so this checks that they launch every kernel kind
they study, time it, and agree with their own baselines (relative errors printed per configuration) with
the current launcher signatures; their timings mean nothing here."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from triton_worker import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, interpret=True, timeout=600):
    """stdout of ``python *args`` in the checkout, under the Triton interpreter or (``interpret=False``) with its
    kernels compiled for sm_90a; fails on a non-zero exit."""
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=subprocess_env(interpret), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-5000:]
    return proc.stdout


def _relerrs(out):
    return [float(x) for x in re.findall(r"relerr ([0-9.e+-]+)", out)]


def test_coattention_tune_smoke():
    out = _run(["benchmarks/coattention_tune.py", "--device", "cpu", "--smoke", "--reps", "1", "--trials", "1"])
    for kind in ("fwd", "bwd_dq", "bwd_dkdv"):
        assert f"smoke {kind} best:" in out, out
        assert re.search(rf"smoke {kind} default \(", out), out  # block_config's tiles are timed too
    errs = _relerrs(out)
    assert len(errs) == 6 and max(errs) < 1e-2, out  # 3 kinds x (default + 1 candidate), bf16 vs SDPA
    assert "sdpa forward+backward" in out


def test_patch_embed_tune_smoke():
    out = _run(["benchmarks/patch_embed_tune.py", "--device", "cpu", "--batch", "1", "--configs", "1",
                "--models", "vit_b16", "--reps", "1", "--trials", "1"])
    errs = _relerrs(out)
    assert len(errs) == 2 and max(errs) < 1e-2, out  # the forward GEMM and the d_weight GEMM, one config each
    assert "vit_b16 best gemm tiles:" in out and "vit_b16 best d_weight tiles:" in out
    assert out.count("op forward") == 2 and out.count("op backward") == 2


@pytest.mark.parametrize("script", ["benchmarks/coattention_tune.py", "benchmarks/patch_embed_tune.py"])
def test_tune_candidates_compile_for_sm90(script):
    """Every tile candidate of the study compiles for sm_90a with wgmma, no spills and shared memory within
    the Hopper limit (the study's ``--aot``: no GPU time is spent on configurations that cannot be fast)."""
    out = _run([script, "--aot"], interpret=False, timeout=900)
    rows = [r for r in out.splitlines()[1:] if r.strip()]
    assert len(rows) >= 20 and all(" yes " in r for r in rows), out[-6000:]


def test_aot_sweep_smoke():
    """benchmarks/aot_sweep.py builds its grids and compiles (here the first two of each op's) with the checks
    of tests/test_aot_sm90.py; the whole sweep is a half-hour run."""
    out = _run(["benchmarks/aot_sweep.py", "--limit", "2", "--jobs", "2"], interpret=False, timeout=900)
    for op in ("coattention", "patch_embed", "contrastive"):
        assert f"{op}: 2 compiled, 0 failed" in out, out
