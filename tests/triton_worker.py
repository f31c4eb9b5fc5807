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


def extra_tritons() -> list[str]:
    """Other tritons to compile with besides the installed one: the ``pip install --target`` directories
    ``.venv/triton-<version>`` (scripts/setup.sh puts the GPU machine's triton 3.6 there)."""
    import glob

    return sorted(d for d in glob.glob(os.path.join(ROOT, ".venv", "triton-*"))
                  if os.path.isdir(os.path.join(d, "triton")))


def subprocess_env(interpret: bool, triton_dir=None) -> dict:
    """The environment of a test subprocess: ``TRITON_INTERPRET=1`` only when ``interpret``, the checkout first on
    ``PYTHONPATH`` (and before it ``triton_dir``, a directory with another triton installed, when given)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    first = [ROOT] if triton_dir is None else [triton_dir, ROOT]
    env["PYTHONPATH"] = os.pathsep.join(first + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_worker(script: str, tag: str, tmp_path_factory, device: str, interpret: bool, triton_dir=None) -> dict:
    """The worker's results; ``triton_dir``: compile with the triton installed there (first on PYTHONPATH)."""
    pytest.importorskip("triton")
    # a fresh seed per session (printed, and named in every failure message); VLOPS_TEST_SEED reruns one
    seed = int(os.environ.get("VLOPS_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    out = str(tmp_path_factory.mktemp(f"{tag}_triton_{device}") / "results.json")
    env = subprocess_env(interpret, triton_dir)
    print(f"\n[{tag} triton] device={device} interpret={interpret} seed={seed}"
          + (f" triton from {os.path.basename(triton_dir)}" if triton_dir else ""))
    proc = subprocess.run([sys.executable, os.path.abspath(script), "--worker", device, out, str(seed)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"worker failed ({proc.returncode}), seed {seed}:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    with open(out) as f:
        res = json.load(f)
    print(f"[{tag} triton] {len(res['cases'])} cases in {res['total_s']:.1f} s")
    return res


def worker_fixtures(script: str, tag: str):
    """The three module-scoped fixtures of a Triton test module: interpreter results (always), compiled-GPU
    results (skipped without a CUDA device), and dry-run results (every launch of the worker's cases, the
    GPU-only ones included, compiled for sm_90a without a GPU: see :func:`worker_main`), once with the installed
    triton and once with each of :func:`extra_tritons`; and the module's test of the dry runs."""

    @pytest.fixture(scope="module")
    def interp_results(tmp_path_factory):
        return run_worker(script, tag, tmp_path_factory, "cpu", interpret=True)

    @pytest.fixture(scope="module")
    def gpu_results(tmp_path_factory):
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("no CUDA GPU")
        return run_worker(script, tag, tmp_path_factory, "cuda", interpret=False)

    @pytest.fixture(scope="module", params=[None] + extra_tritons(),
                    ids=lambda d: os.path.basename(d) if d else "installed-triton")
    def dry_results(request, tmp_path_factory):
        return run_worker(script, tag, tmp_path_factory, "sm90-dry", interpret=False, triton_dir=request.param)

    def test_sm90_dry_compile(dry_results):
        """Every launch of the cases, the GPU-only ones included, compiles for sm_90a through Triton's JIT (the
        specialisation a GPU run of the same calls gets), with the installed triton and with the GPU machine's
        (tests/jit_dry.py); no GPU needed."""
        assert_dry_compiled(dry_results)

    return interp_results, gpu_results, dry_results, test_sm90_dry_compile


def assert_dry_compiled(results: dict) -> None:
    """A dry run (:func:`worker_main`, device ``sm90-dry``) compiled every launch: no case raised (the launch
    path: argument checks, specialisation, compilation; the comparisons that follow only compute numbers, on
    outputs nothing wrote), there were launches, and none asks for more shared memory than a Hopper block has."""
    from jit_dry import HOPPER_SMEM_LIMIT

    errors = [f"{k}: {v['error'][-1500:]}" for key, cases in results.items() if key.endswith("cases")
              for k, v in cases.items() if isinstance(v, dict) and "error" in v]
    assert not errors, "\n\n".join(errors)
    assert results["launches"], "the dry run launched no kernel"
    big = sorted({f"{r['kernel']} ({r['num_warps']} warps, {r['num_stages']} stages): {r['shared']} B"
                  for r in results["launches"] if r["shared"] > HOPPER_SMEM_LIMIT})
    assert not big, f"shared memory over the Hopper limit ({HOPPER_SMEM_LIMIT} B):\n" + "\n".join(big)


#: set in a dry worker process (device "sm90-dry"): the GPU-only cases run too, their launches only compiled
DRY = False


def runs_case(case: dict, device: str) -> bool:
    """Whether a worker on ``device`` runs ``case``: the GPU-only cases on CUDA and in a dry run."""
    return not case.get("gpu_only") or device == "cuda" or DRY


def worker_main(worker) -> int:
    """The ``__main__`` of a Triton test module: ``python tests/<module>.py --worker cpu|cuda|sm90-dry OUT.json
    SEED``. ``sm90-dry``: the worker's cases (the GPU-only ones included) on CPU tensors with every launch
    compiled for sm_90a and not run (:mod:`jit_dry`); the results get ``"launches"``, one record per launch,
    and their comparisons are meaningless (nothing is computed)."""
    global DRY
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        device, out_json, seed = sys.argv[2], sys.argv[3], int(sys.argv[4])
        if device != "sm90-dry":
            return worker(device, out_json, seed)
        from jit_dry import dry_sm90

        DRY = True
        with dry_sm90() as launches:
            rc = worker("cpu", out_json, seed)
        with open(out_json) as f:
            res = json.load(f)
        res["launches"] = launches
        with open(out_json, "w") as f:
            json.dump(res, f, indent=1)
        return rc
    print(f"usage: {sys.argv[0]} --worker cpu|cuda|sm90-dry OUT.json SEED", file=sys.stderr)
    return 2


def assert_collected_by_aot(module: str, matmul: bool = True):
    """tests/test_aot_sm90.py compiles every kernels/*.py module's AOT_SPECS (wgmma required for the specs
    flagged matmul=True): check that ``module`` is among them and declares such specs."""
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(f"_{module}_aot_probe", os.path.join(here, "test_aot_sm90.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert module in mod.kernel_module_names()
    with open(os.path.join(os.path.dirname(here), "kernels", f"{module}.py")) as f:
        src = f.read()
    assert "AOT_SPECS = [" in src and (not matmul or '"matmul": True' in src)


def bad_input_results(bad, prefix: str = "bad") -> list[dict]:
    """Run each ``(id, name, fn)`` of ``bad`` (a call that must raise ValueError naming ``name``) and return
    one ``{"id": "<prefix>-<id>", "ok", "msg"}`` per call, for the worker's JSON."""
    out = []
    for id_, name, fn in bad:
        try:
            fn()
            out.append({"id": f"{prefix}-{id_}", "ok": False, "msg": "no error"})
        except ValueError as e:
            out.append({"id": f"{prefix}-{id_}", "ok": name in str(e), "msg": str(e)})
        except Exception as e:  # noqa: BLE001 - any other exception is a failure, reported with its type
            out.append({"id": f"{prefix}-{id_}", "ok": False, "msg": repr(e)})
    return out


def assert_bad_inputs_ok(results: dict) -> None:
    """Every bad-input record of a worker's results (see :func:`bad_input_results`) passed; all failures
    listed in one message."""
    bad = [f"{r['id']}: {r['msg']}" for r in results["bad_input"] if not r["ok"]]
    assert results["bad_input"], "the worker ran no bad-input checks"
    assert not bad, "\n".join(bad)
