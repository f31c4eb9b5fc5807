"""The benchmark runner, end to end on one tiny diffusion case (CPU, quick mode, < 60 s)."""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "benchmarks", "run.py")

EXPECTED_COLUMNS = {
    "timestamp_utc", "commit", "torch", "triton", "python", "device", "op", "case", "size", "dtype", "pass",
    "backend", "impl", "baseline", "median_ms", "p20_ms", "p80_ms", "peak_mb", "ratio", "mem_ratio", "gbps",
    "floor_bytes", "floor_ms", "pct_of_floor", "copy_gbps", "check_relerr",
}


def _run(out_dir, *extra):
    cmd = [sys.executable, RUN, "--quick", "--device", "cpu", "--ops", "diffusion", "--sizes", "2x4x16x16",
           "--cases", "ddpm_cfg_clip", "--dtypes", "fp32", "--min-time", "0.02", "--out", str(out_dir), *extra]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, f"runner failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _one(path):
    files = [f for f in os.listdir(path) if f.endswith(".csv")]
    assert len(files) == 1, files
    return os.path.join(path, files[0])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = _run(out)
    with open(_one(out), newline="") as f:
        reader = csv.DictReader(f)
        return out, proc, reader.fieldnames, list(reader)


def test_csv_columns(quick_run):
    _, _, header, rows = quick_run
    assert EXPECTED_COLUMNS <= set(header), EXPECTED_COLUMNS - set(header)
    assert rows


def test_rows_eager_and_fused(quick_run):
    _, _, _, rows = quick_run
    eager = [r for r in rows if r["impl"] == "eager"]
    fused = [r for r in rows if r["impl"] == "fused"]
    assert len(eager) == 1 and fused, [(r["impl"], r["backend"], r["error"]) for r in rows]
    for r in rows:
        assert r["error"] == "", r["error"]
        assert (r["op"], r["case"], r["size"], r["dtype"], r["pass"]) == (
            "diffusion", "ddpm_cfg_clip", "2x4x16x16", "fp32", "forward")
        assert r["baseline"] in ("diffusers", "reference-eager")
        assert r["commit"] and r["torch"] and r["device"]


def test_times_finite_positive_and_ordered(quick_run):
    _, _, _, rows = quick_run
    for r in rows:
        med, p20, p80 = float(r["median_ms"]), float(r["p20_ms"]), float(r["p80_ms"])
        for v in (med, p20, p80, float(r["gbps"]), float(r["floor_ms"]), float(r["copy_gbps"])):
            assert math.isfinite(v) and v > 0, r
        assert p20 <= med <= p80, r
        assert math.isfinite(float(r["peak_mb"])) and float(r["peak_mb"]) >= 0
        # GB/s is the counted floor bytes over the median time
        assert float(r["gbps"]) == pytest.approx(float(r["floor_bytes"]) / (med * 1e-3) / 1e9, rel=1e-6)
        assert float(r["pct_of_floor"]) == pytest.approx(float(r["floor_ms"]) / med * 100, rel=1e-6)


def test_ratio_is_eager_over_fused(quick_run):
    _, _, _, rows = quick_run
    eager = next(r for r in rows if r["impl"] == "eager")
    for r in rows:
        if r["impl"] == "eager":
            continue
        expected = float(eager["median_ms"]) / float(r["median_ms"])
        assert float(r["ratio"]) == pytest.approx(expected, rel=1e-6)
        assert float(r["eager_median_ms"]) == pytest.approx(float(eager["median_ms"]), rel=1e-9)
        # fused and eager compute the same x0 (the noise differs): the check must have run
        assert float(r["check_relerr"]) < 1e-4


def test_png_and_table(quick_run):
    out, proc, _, rows = quick_run
    base = _one(out)[:-4]
    with open(base + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(base + ".txt") as f:
        table = f.read()
    assert "ddpm_cfg_clip" in table and "ratio" in table
    assert "ddpm_cfg_clip" in proc.stdout


def test_csv_appends(quick_run, tmp_path):
    out = tmp_path
    _run(out, "--no-plot")
    _run(out, "--no-plot")
    with open(_one(out), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(quick_run[3])
    assert not any(p.endswith(".png") for p in os.listdir(out))


def test_backward_pass_rows(tmp_path):
    """An op with a backward gets a row per pass (forward, backward alone, forward + backward), and in the
    backward row the check compares the inputs' gradients of the two implementations."""
    cmd = [sys.executable, RUN, "--quick", "--device", "cpu", "--ops", "coattention", "--cases", "vqa",
           "--min-time", "0.02", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, f"runner failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    with open(_one(tmp_path), newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["pass"] for r in rows} == {"forward", "backward", "forward+backward"}, rows
    for r in rows:
        assert r["error"] == "", r["error"]
        if r["impl"] == "fused":
            assert float(r["check_relerr"]) < 1e-5, r  # fp32: the same outputs / gradients as SDPA
            assert float(r["median_ms"]) > 0


def test_passes_filter_lists_only_those_passes():
    cmd = [sys.executable, RUN, "--quick", "--device", "cpu", "--ops", "coattention", "--list", "--passes", "backward"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = [ln for ln in proc.stdout.splitlines() if ln.startswith("  coattention/")]
    assert listed and all(" backward [" in ln for ln in listed), proc.stdout


@pytest.mark.parametrize("stub", [False, True], ids=["cpu", "triton-stubbed"])
def test_host_overhead_rows(stub):
    """benchmarks/host_overhead.py prints a row per op and pass with a positive time for the eager baseline
    and every backend (with --stub-triton, under the interpreter: the cpu and triton backends)."""
    if stub:
        pytest.importorskip("triton")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "host_overhead.py"), "--calls", "2", "--trials", "1"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    if stub:
        cmd.append("--stub-triton")
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split()[:3] == ["op", "pass", "eager"] and lines[1].split()[3:] == (
        ["cpu", "triton", "baseline"] if stub else ["cpu", "baseline"])
    rows = [ln.split() for ln in lines[3:] if ln.strip()]
    assert [(r[0], r[1]) for r in rows] == [(op, p) for op in ("co_attention", "patch_embed", "clip_loss",
                                                               "siglip_loss")
                                            for p in ("forward", "forward+backward")]
    n_times = 3 if stub else 2
    for r in rows:
        times = [float(x) for x in r[2:2 + n_times]]
        assert all(math.isfinite(t) and t > 0 for t in times), r
