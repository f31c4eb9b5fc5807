"""Runs a Triton test module's worker in a subprocess (shared by the tests/test_*_triton.py files).

The Triton interpreter is chosen when ``@triton.jit`` runs, for the whole process, so the
interpreter checks (``TRITON_INTERPRET=1``) and the compiled GPU checks each run in a fresh process
of the test file itself (``python <file> --worker DEVICE OUT_JSON SEED``); pytest never imports
triton. The worker writes its results as JSON, which the test reads back.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_worker(script: str, tag: str, tmp_path_factory, device: str, interpret: bool) -> dict:
    pytest.importorskip("triton")
    seed = int.from_bytes(os.urandom(4), "little")
    out = str(tmp_path_factory.mktemp(f"{tag}_triton_{device}") / "results.json")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    print(f"\n[{tag} triton] device={device} interpret={interpret} seed={seed}")
    proc = subprocess.run([sys.executable, os.path.abspath(script), "--worker", device, out, str(seed)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"worker failed ({proc.returncode}), seed {seed}:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    with open(out) as f:
        res = json.load(f)
    print(f"[{tag} triton] {len(res['cases'])} cases in {res['total_s']:.1f} s")
    return res


def worker_fixtures(script: str, tag: str):
    """The two module-scoped fixtures of a Triton test module: interpreter results (always) and
    compiled-GPU results (skipped without a CUDA device)."""

    @pytest.fixture(scope="module")
    def interp_results(tmp_path_factory):
        return run_worker(script, tag, tmp_path_factory, "cpu", interpret=True)

    @pytest.fixture(scope="module")
    def gpu_results(tmp_path_factory):
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("no CUDA GPU")
        return run_worker(script, tag, tmp_path_factory, "cuda", interpret=False)

    return interp_results, gpu_results
