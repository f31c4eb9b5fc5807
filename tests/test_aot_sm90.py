"""AOT-compile every Triton kernel specialisation for Hopper (sm_90a) without a GPU.

Every module ``kernels/*.py`` exports ``AOT_SPECS`` (format in ``tests/aot.py``). Each spec is
compiled with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``; the report (registers, spills,
shared memory, wgmma, vectorised global accesses) is printed and written to
``benchmarks/results/aot_sm90.txt``. A spec fails on register spills, shared memory above the
Hopper limit (232448 B), a missing wgmma when flagged ``matmul=True``, or no 16-byte global load
when flagged ``vectorized=True``.

The compilation runs in a subprocess (``python tests/test_aot_sm90.py --worker OUT.json REPORT``) with
``TRITON_INTERPRET`` removed from its environment: under the interpreter ``@triton.jit`` yields
interpreted functions that cannot be compiled, and another test module of the same pytest session
may have set it or imported the kernels in interpreted form.

Two toolchains: the installed triton (CI's), and every other triton that ``scripts/setup.sh`` puts in
``.venv/triton-<version>`` (the GPU machine's triton 3.6, which has its own compiler passes: its software
pipeliner once rejected kernels that triton 3.8 compiles). The second is run with that directory first on
``PYTHONPATH`` and reported in ``benchmarks/results/aot_sm90_triton-<version>.txt``; the same checks apply.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from triton_worker import extra_tritons, subprocess_env

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KERNELS = os.path.join(ROOT, "kernels")
RESULTS = os.path.join(ROOT, "benchmarks", "results", "aot_sm90.txt")


def kernel_module_names() -> list[str]:
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(KERNELS, "*.py"))
                  if not os.path.basename(p).startswith("_"))


def _load_by_path(modname: str, path: str):
    if modname in sys.modules:
        return sys.modules[modname]
    spec = importlib.util.spec_from_file_location(modname, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    spec.loader.exec_module(mod)
    return mod


def import_kernel_module(name: str):
    """``vlops.kernels.<name>`` (the installed package: kernel modules import their shared helpers from
    ``vlops.kernels._tl_common``)."""
    return importlib.import_module(f"vlops.kernels.{name}")


def _worker(out_json: str, report_path: str) -> int:
    aot = _load_by_path("_vlops_tests_aot", os.path.join(HERE, "aot.py"))
    import triton

    results = []
    for modname in kernel_module_names():
        try:
            mod = import_kernel_module(modname)
            specs = list(getattr(mod, "AOT_SPECS"))
        except Exception as e:  # a module that does not import or has no AOT_SPECS fails its test
            results.append({"module": modname, "name": f"{modname}:<import>", "error": repr(e), "failures": [repr(e)]})
            continue
        for spec in specs:
            entry = {"module": modname, "name": spec["name"]}
            rep, entry["failures"] = aot.check_spec(spec)
            if rep is None:
                entry["error"] = entry["failures"][0]
            else:
                entry.update({k: v for k, v in rep.__dict__.items() if k not in ("ptx", "ptxas_log")})
                entry["row"] = rep.row()
            results.append(entry)

    ptxas = aot._ptxas_path(90)
    ptxas_version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    lines = [
        "# AOT compile report for sm_90a (Hopper), no GPU: tests/test_aot_sm90.py",
        f"# triton {triton.__version__}; ptxas {ptxas_version[-1] if ptxas_version else '?'} "
        f"({'bundled with triton' if 'triton' in ptxas else 'CUDA toolkit'})",
        "# regs: registers per thread; spills: bytes of spill stores + loads; smem: shared memory bytes",
        "# (Triton allocation); stack: ptxas stack frame bytes; ld/st v4/v2/s: 16-byte / 8-byte / scalar",
        "# global load and store instructions in the PTX",
        "",
        aot.AotReport.header(),
    ]
    for r in results:
        lines.append(r.get("row") or f"{r['name']:<64} ERROR {r.get('error')}")
    table = "\n".join(lines) + "\n"
    print(table)
    os.makedirs(os.path.dirname(report_path), exist_ok=True)
    with open(report_path, "w") as f:
        f.write(table)
    with open(out_json, "w") as f:
        json.dump(results, f, indent=1)
    return 0


def _run_worker(tmp_path_factory, triton_dir=None):
    """The worker's results (a list of dicts), compiled with the installed triton or, given ``triton_dir``,
    with the triton installed there."""
    pytest.importorskip("triton")
    out = str(tmp_path_factory.mktemp("aot") / "aot.json")
    env = subprocess_env(False, triton_dir)
    report = RESULTS if triton_dir is None else RESULTS.replace(".txt", f"_{os.path.basename(triton_dir)}.txt")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", out, report], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    print(proc.stdout)
    if proc.returncode != 0:
        pytest.fail(f"AOT worker failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    return _run_worker(tmp_path_factory)


@pytest.fixture(scope="module", params=extra_tritons() or [None], ids=lambda p: os.path.basename(p) if p else "none")
def aot_results_extra(request, tmp_path_factory):
    if request.param is None:
        pytest.skip("no extra triton in .venv/triton-<version> (scripts/setup.sh installs the GPU machine's)")
    return _run_worker(tmp_path_factory, request.param)


def test_every_kernel_module_has_specs():
    names = kernel_module_names()
    assert names, "no kernel modules found in kernels/"


def _check_module(results, module):
    mine = [r for r in results if r["module"] == module]
    assert mine, f"kernels/{module}.py exports no AOT_SPECS"
    failures = [f for r in mine for f in r["failures"]]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("module", kernel_module_names())
def test_aot_sm90(aot_results, module):
    _check_module(aot_results, module)


@pytest.mark.parametrize("module", kernel_module_names())
def test_aot_sm90_extra_triton(aot_results_extra, module):
    """The same specs and checks with the GPU machine's triton (see the module docstring)."""
    _check_module(aot_results_extra, module)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2], sys.argv[3]))
    print(f"usage: {sys.argv[0]} --worker OUT.json REPORT.txt", file=sys.stderr)
    sys.exit(2)
