"""The Triton diffusion-step kernel against the float64 reference (vlops.reference.diffusion).

Without a GPU the kernel runs under the Triton interpreter (``TRITON_INTERPRET=1``) on CPU tensors.
The interpreter is chosen when ``@triton.jit`` runs, i.e. when the kernel module is imported, and
the choice is process-wide: setting the variable in this module would either come too late (triton
and the kernels already imported by another test module) or leak into other modules (the AOT test
needs real JIT functions). So the checks run in a subprocess, ``python
tests/test_diffusion_triton.py --worker cpu OUT.json SEED``, started once per pytest session with
``TRITON_INTERPRET=1`` in its environment only; this module imports neither triton nor the kernels.
The per-case results come back as JSON and each case is its own pytest test. On a machine with a
CUDA GPU the same worker also runs compiled on ``cuda`` (``test_gpu_*``).

Inputs are fresh random numbers each run (the seed is printed); outputs are poisoned with NaN first.
Bounds (relative error ||out - ref|| / ||ref|| against the float64 reference): fp32 1e-5; bf16/fp16
1e-2 and at most twice the error of the float64 reference rounded to that dtype; fp64 1e-12.
In-kernel noise equals ``philox_normal`` within 1e-5 absolute; the Philox outputs are bit-exact.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# fp64: the float arguments travel as fp32 kernel arguments; the cases use fp32-exact values.
TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2, "float64": 1e-12}
NOISE_ABS_TOL = 1e-5
_kernel_philox = None  # set by the worker to the kernel module's Philox (see _philox_bits_check)


# --------------------------------------------------------------------------------------------
# The cases (plain data: collected without importing torch / triton)

def _cases() -> list[dict]:
    cases = []
    ns = [300, 299, 257, 64, 1]

    def add(**kw):
        c = dict(dtype="float32", mode=0, pred=0, var=0, guided=0, m2=False, clip=False, x0_scale=False,
                 eps_scale=False, noise="philox", eta=0.0, use_clipped=False, B=3, N=300, ts="mixed",
                 prev_step=20, final_alpha=1.0, write_x0=True, block=None)
        c.update(kw)
        parts = [c["dtype"].replace("float", "f").replace("bf", "bf"), "ddpm" if c["mode"] == 0 else "ddim",
                 f"p{c['pred']}"]
        if c["mode"] == 0:
            parts.append(f"v{c['var']}")
        else:
            parts.append(f"eta{c['eta']:g}" + ("_uc" if c["use_clipped"] else ""))
        parts += [f"g{c['guided']}"] + (["m2"] if c["m2"] else []) + (["clip"] if c["clip"] else [])
        parts += (["thr"] if c["x0_scale"] else []) + (["resc"] if c["eps_scale"] else [])
        if c["mode"] == 0 or c["eta"] > 0:
            parts.append(c["noise"])
        parts += [f"B{c['B']}N{c['N']}", c["ts"]] + ([] if c["write_x0"] else ["nox0"])
        parts += [f"blk{c['block']}"] if c["block"] else []
        c["id"] = "-".join(parts)
        cases.append(c)

    # fp32 DDPM: every prediction type x variance type, the other options rotated through
    i = 0
    for pred in range(3):
        for var in range(5):
            B = [3, 2, 1][i % 3]
            add(mode=0, pred=pred, var=var, guided=[0, 1, 2][i % 3], m2=var >= 3 or i % 4 == 1,
                clip=i % 2 == 0, x0_scale=i % 5 == 3, eps_scale=(i % 3 != 0) and i % 4 == 1,
                noise="philox" if i % 2 else "tensor", B=B, N=ns[i % 5],
                ts="mixed" if B > 1 else ["zero", "broadcast"][i % 2], prev_step=[1, 20][i % 2],
                write_x0=i % 7 != 6)
            i += 1
    # fp32 DDIM: every prediction type x eta 0 / > 0 x use_clipped_model_output
    i = 0
    for pred in range(3):
        for eta in (0.0, 0.5):
            for uc in (False, True):
                add(mode=1, pred=pred, eta=eta, use_clipped=uc, guided=[1, 0, 2][i % 3], m2=i % 3 == 2,
                    clip=i % 2 == 1, x0_scale=i % 4 == 2, eps_scale=i % 3 != 1 and i % 2 == 0,
                    noise="philox" if i % 3 else "tensor", B=[3, 2][i % 2], N=ns[(i + 1) % 5],
                    final_alpha=[1.0, "ac0"][i % 2], write_x0=i % 5 != 4)
                i += 1
    # bf16 / fp16
    for dt in ("bfloat16", "float16"):
        add(dtype=dt, mode=1, pred=0, guided=1, eta=0.0)
        add(dtype=dt, mode=1, pred=2, guided=1, eps_scale=True, eta=0.0, N=299)
        add(dtype=dt, mode=1, pred=1, guided=2, clip=True, eta=0.7, noise="philox", N=257)
        add(dtype=dt, mode=1, pred=0, eta=0.3, noise="tensor", use_clipped=True, clip=True, B=2)
        add(dtype=dt, mode=0, pred=0, var=0, guided=1, noise="philox")
        add(dtype=dt, mode=0, pred=2, var=2, clip=True, noise="tensor", N=299)
        add(dtype=dt, mode=0, pred=0, var=4, m2=True, guided=2, x0_scale=True, noise="philox", prev_step=1)
        add(dtype=dt, mode=0, pred=1, var=1, noise="philox", B=1, N=1, ts="zero")
    # fp64
    add(dtype="float64", mode=0, pred=0, var=4, m2=True, guided=1, noise="philox", N=299)
    add(dtype="float64", mode=0, pred=2, var=1, clip=True, noise="tensor")
    add(dtype="float64", mode=1, pred=1, guided=2, eta=0.5, noise="philox", use_clipped=True)
    add(dtype="float64", mode=1, pred=0, guided=1, eta=0.0, x0_scale=True)
    # several programs per sample (small block), aligned and shifted Philox windows
    add(mode=0, pred=0, var=0, guided=1, noise="philox", N=300, block=64)
    add(mode=0, pred=0, var=3, m2=True, noise="philox", N=299, block=64)
    add(mode=1, pred=2, eta=1.0, guided=2, noise="philox", N=257, block=32, clip=True)
    add(dtype="bfloat16", mode=0, pred=1, var=4, m2=True, noise="philox", N=298, block=64)
    add(mode=0, pred=0, var=0, noise="tensor", N=300, block=64, ts="broadcast")
    return cases


CASES = _cases()
assert len({c["id"] for c in CASES}) == len(CASES), "case ids must be unique"


# --------------------------------------------------------------------------------------------
# Worker (runs in the subprocess)

def _load_kernel_module():
    return importlib.import_module("vlops.kernels.diffusion_step")  # the installed package (kernels/ -> vlops.kernels)


def _schedule(torch, T=1000):
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0).to(torch.float32)


def _timesteps(torch, gen, kind, B, prev_step, T):
    r = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=gen))  # noqa: E731
    if kind == "zero":
        return torch.zeros(1, dtype=torch.int64)
    if kind == "broadcast":
        return torch.tensor([r(1, T)], dtype=torch.int64)
    pool = [0, r(1, prev_step) if prev_step > 1 else 1, r(prev_step, T)]  # t=0, prev < 0, ordinary
    if B == 2:
        pool = pool[1:]
    return torch.tensor(pool[:B], dtype=torch.int64)


def _reference(torch, ref, eps, uncond, x, noise, ts, prev_table, ac, x0_scale, eps_scale, c, final_alpha):
    """float64 reference on the [B, N] layout, with the contract's conventions."""
    B, N = x.shape
    d = torch.float64
    e = eps.to(d)
    if uncond is not None:
        u = uncond[:, :N].to(d)
        g = u + c["guidance_scale"] * (e[:, :N] - u)
        if eps_scale is not None:
            g = g * eps_scale.to(d)[:, None]
        e = torch.cat([g, e[:, N:]], dim=1)
    prev, x0 = ref.diffusion_step(
        e.view(B, -1, N), ts, x.to(d).view(B, 1, N), ac.to(d), prev_table,
        mode="ddpm" if c["mode"] == 0 else "ddim",
        prediction_type=ref.PREDICTION_TYPES[c["pred"]], variance_type=ref.VARIANCE_TYPES[c["var"]],
        clip_sample=c["clip"] and x0_scale is None, clip_sample_range=c["clip_range"], eta=c["eta"],
        use_clipped_model_output=c["use_clipped"], final_alpha_cumprod=final_alpha,
        noise=None if noise is None else noise.to(d).view(B, 1, N),
        x0_scale=None if x0_scale is None else x0_scale.to(d))
    return prev.view(B, N), x0.view(B, N)


def _rel(torch, out, ref):
    out = out.to(torch.float64)
    if torch.isnan(out).any():
        return float("nan")
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


def _run_case(torch, ref, k, c, gen, device):
    dt = getattr(torch, c["dtype"])
    B, N, T = c["B"], c["N"], 1000
    ac = _schedule(torch, T)
    if dt == torch.float64:
        ac = ac.to(torch.float64)
    c = dict(c, guidance_scale=7.5 if c["guided"] else 1.0, clip_range=1.0)
    final_alpha = float(ac[0]) if c["final_alpha"] == "ac0" else float(c["final_alpha"])
    prev_table = torch.arange(T, dtype=torch.int64) - c["prev_step"]
    ts = _timesteps(torch, gen, c["ts"], B, c["prev_step"], T)
    rn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    M = 2 * N if c["m2"] else N
    eps = rn(B, M)
    if c["mode"] == 0 and c["var"] == 3:
        eps[:, N:] = torch.rand(B, N, generator=gen, dtype=torch.float64) * 0.9 + 0.05  # variances > 0
    if c["mode"] == 0 and c["var"] == 4:
        eps[:, N:] = torch.rand(B, N, generator=gen, dtype=torch.float64) * 2 - 1  # in [-1, 1]
    eps = eps.to(dt)
    uncond = None if not c["guided"] else rn(B, N if c["guided"] == 1 else 2 * N).to(dt)
    x = rn(B, N).to(dt)
    needs_noise = c["mode"] == 0 or c["eta"] > 0
    noise = rn(B, N).to(dt) if needs_noise and c["noise"] == "tensor" else None
    x0_scale = (torch.rand(B, generator=gen) * 2 + 1.0) if c["x0_scale"] else None
    eps_scale = (torch.rand(B, generator=gen) * 0.5 + 0.6) if c["eps_scale"] else None
    seed = int(torch.randint(0, 2**62, (1,), generator=gen)) * 2 + 1  # lo and hi words random
    if uncond is None:
        eps_scale = None  # the guidance-rescale factor only exists with guidance

    out_prev = torch.full((B, N), float("nan"), dtype=dt)
    out_x0 = torch.full((B, N), float("nan"), dtype=dt) if c["write_x0"] else None
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    args = [dev(eps), dev(uncond), dev(x), dev(noise), dev(ts), dev(prev_table), dev(ac), dev(x0_scale),
            dev(eps_scale), dev(out_prev), dev(out_x0)]
    inputs_before = [None if a is None else a.clone() for a in args[:9]]
    t0 = time.perf_counter()
    k.diffusion_step(*args, c["mode"], c["guidance_scale"], c["pred"], c["var"], c["clip"], c["clip_range"],
                     c["eta"], c["use_clipped"], final_alpha, seed, block=c["block"])
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    unchanged = all(b is None or torch.equal(b, a) or (torch.isnan(b).all() and torch.isnan(a).all())
                    for b, a in zip(inputs_before, args[:9]))
    out_prev, out_x0 = args[9].cpu(), (None if args[10] is None else args[10].cpu())

    ref_noise = noise
    if needs_noise and noise is None:
        ref_noise = ref.philox_normal(seed, B * N).view(B, N)
    r_prev, r_x0 = _reference(torch, ref, eps, uncond, x, ref_noise, ts, prev_table, ac, x0_scale, eps_scale, c,
                              final_alpha)
    res = {"id": c["id"], "dtype": c["dtype"], "time_s": elapsed, "inputs_unchanged": unchanged,
           "nan_prev": int(torch.isnan(out_prev).sum()), "err_prev": _rel(torch, out_prev, r_prev),
           "round_prev": _rel(torch, r_prev.to(dt), r_prev)}
    if out_x0 is not None:
        res.update(nan_x0=int(torch.isnan(out_x0).sum()), err_x0=_rel(torch, out_x0, r_x0),
                   round_x0=_rel(torch, r_x0.to(dt), r_x0))
    if dt == torch.bfloat16 and _interpreting():
        # The interpreter's fp32 -> bf16 cast truncates (the compiled cast rounds to nearest even):
        # the best result it can store is the truncated reference.
        res["round_prev"] = _rel(torch, _trunc_bf16(torch, r_prev), r_prev)
        if out_x0 is not None:
            res["round_x0"] = _rel(torch, _trunc_bf16(torch, r_x0), r_x0)
    return res


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _trunc_bf16(torch, x):
    """x rounded toward zero to bfloat16 (via fp32, as the Triton interpreter does)."""
    bits = x.to(torch.float32).view(torch.int32) & -65536
    return bits.view(torch.float32).to(torch.bfloat16)


def _noise_checks(torch, ref, k, gen, device):
    """In-kernel noise against philox_normal: prev = 0.5 n exactly (x = eps = 0, 'sample' prediction,
    DDPM fixed_large with ab = 0.75, ab_prev = 1, so x0 = 0 and std = sqrt(beta) = 0.5)."""
    out = []
    seeds = [0, 2**63 - 1, 0xDEADBEEF, int(torch.randint(0, 2**62, (1,), generator=gen)) * 2 + 1]
    shapes = [(3, 300, None), (3, 299, None), (2, 257, 64), (3, 1021, 256), (1, 1, None)]
    for dt in (torch.float32, torch.float64):
        for si, (B, N, block) in enumerate(shapes):
            seed = seeds[si % len(seeds)]
            ac = torch.tensor([0.75, 0.75], dtype=torch.float64 if dt == torch.float64 else torch.float32)
            prev_table = torch.tensor([-1, -1], dtype=torch.int64)
            ts = torch.ones(1, dtype=torch.int64)
            zeros = torch.zeros(B, N, dtype=dt)
            out_prev = torch.full((B, N), float("nan"), dtype=dt, device=device)
            k.diffusion_step(zeros.to(device), None, zeros.to(device), None, ts.to(device), prev_table.to(device),
                             ac.to(device), None, None, out_prev, None, 0, 1.0, 1, 2, False, 1.0, 0.0, False, 1.0,
                             seed, block=block)
            n = out_prev.cpu().to(torch.float64) / 0.5
            want = ref.philox_normal(seed, B * N).view(B, N).to(torch.float64)
            diff = (n - want).abs()
            out.append({"id": f"noise-{str(dt).split('.')[-1]}-B{B}N{N}-blk{block}-seed{seed}",
                        "max_abs": float(diff.max()) if not torch.isnan(n).any() else float("nan"),
                        "exact_frac": float((diff == 0).double().mean())})
    return out


def _philox_bits_check(torch, ref, k, gen, device):
    """The kernel's Philox4x32-10 on random counters and keys equals philox4x32 bit for bit."""
    import triton
    import triton.language as tl

    global _kernel_philox  # @triton.jit resolves names in the module globals, not in closures
    _kernel_philox = k._philox4x32_10

    @triton.jit
    def _probe(c_ptr, out_ptr, k0, k1, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        c0 = tl.load(c_ptr + 4 * i + 0).to(tl.uint32)
        c1 = tl.load(c_ptr + 4 * i + 1).to(tl.uint32)
        c2 = tl.load(c_ptr + 4 * i + 2).to(tl.uint32)
        c3 = tl.load(c_ptr + 4 * i + 3).to(tl.uint32)
        x0, x1, x2, x3 = _kernel_philox(c0, c1, c2, c3, k0.to(tl.uint32, bitcast=True), k1.to(tl.uint32, bitcast=True))
        tl.store(out_ptr + 4 * i + 0, x0.to(tl.int64))
        tl.store(out_ptr + 4 * i + 1, x1.to(tl.int64))
        tl.store(out_ptr + 4 * i + 2, x2.to(tl.int64))
        tl.store(out_ptr + 4 * i + 3, x3.to(tl.int64))

    n = 256
    cnt = torch.randint(0, 2**32, (n, 4), generator=gen, dtype=torch.int64)
    cnt[0] = 0
    cnt[1] = 2**32 - 1
    key = [int(torch.randint(0, 2**32, (1,), generator=gen)), 2**32 - 1]
    signed = [v - 2**32 if v >= 2**31 else v for v in key]
    out = torch.zeros(n, 4, dtype=torch.int64, device=device)
    _probe[(1,)](cnt.to(device), out, signed[0], signed[1], BLOCK=n)
    want = torch.stack(ref.philox4x32(cnt[:, 0], cnt[:, 1], cnt[:, 2], cnt[:, 3], key[0], key[1]), dim=1)
    got = out.cpu()
    return {"id": "philox-bits", "mismatches": int((got != want).sum()), "numel": got.numel()}


def _bad_input_checks(torch, k):
    """The launcher's ValueErrors name the argument."""
    x = torch.zeros(2, 8)
    ts = torch.zeros(2, dtype=torch.int64)
    pt = torch.zeros(4, dtype=torch.int64)
    ac = torch.ones(4)
    base = [x, None, x, None, ts, pt, ac, None, None, torch.empty(2, 8), None, 1, 1.0, 0, 0, False, 1.0, 0.0,
            False, 1.0, 0]
    bad = {
        "eps": (0, torch.zeros(2, 5)),
        "uncond": (1, torch.zeros(2, 8, dtype=torch.float64)),
        "timesteps": (4, torch.zeros(3, dtype=torch.int64)),
        "mode": (11, 2),
        "seed": (20, -1),
    }
    out = []
    for name, (i, v) in bad.items():
        args = list(base)
        args[i] = v
        try:
            k.diffusion_step(*args)
            out.append({"id": f"bad-{name}", "ok": False, "msg": "no error"})
        except ValueError as e:
            out.append({"id": f"bad-{name}", "ok": name in str(e), "msg": str(e)})
        except Exception as e:  # noqa: BLE001
            out.append({"id": f"bad-{name}", "ok": False, "msg": repr(e)})
    return out


def _worker(device: str, out_json: str, seed: int) -> int:
    import torch

    from vlops.reference import diffusion as ref

    k = _load_kernel_module()
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    results = {"cases": {}, "noise": [], "seed": seed}
    for c in CASES:
        try:
            results["cases"][c["id"]] = _run_case(torch, ref, k, c, gen, device)
        except Exception as e:  # noqa: BLE001 - reported per case
            import traceback

            results["cases"][c["id"]] = {"id": c["id"], "error": traceback.format_exc(limit=3) + repr(e)}
    results["noise"] = _noise_checks(torch, ref, k, gen, device)
    results["philox"] = _philox_bits_check(torch, ref, k, gen, device)
    results["bad_input"] = _bad_input_checks(torch, k)
    results["total_s"] = time.perf_counter() - t0
    with open(out_json, "w") as f:
        json.dump(results, f, indent=1)
    return 0


# --------------------------------------------------------------------------------------------
# pytest side (no triton import here)

from triton_worker import assert_bad_inputs_ok, worker_fixtures  # noqa: E402

interp_results, gpu_results, dry_results, test_sm90_dry_compile = worker_fixtures(__file__, "diffusion")


def _check_case(res, case):
    r = res["cases"][case["id"]]
    assert "error" not in r, r["error"]
    tol = TOL[case["dtype"]]
    assert r["inputs_unchanged"], "the launcher modified an input"
    outs = ["prev"] + (["x0"] if case["write_x0"] else [])
    for o in outs:
        assert r[f"nan_{o}"] == 0, f"{o}: {r[f'nan_{o}']} elements not written (NaN poison left), seed {res['seed']}"
        err = r[f"err_{o}"]
        assert err <= tol, f"{o}: relative error {err:.3e} > {tol:g}, seed {res['seed']}"
        if case["dtype"] in ("bfloat16", "float16"):
            bound = 2 * r[f"round_{o}"] + 1e-7
            assert err <= bound, (f"{o}: relative error {err:.3e} > 2x the rounding error of the reference "
                                  f"({r[f'round_{o}']:.3e}), seed {res['seed']}")


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_interpreter(interp_results, case):
    _check_case(interp_results, case)


def _check_noise(res):
    for r in res["noise"]:
        assert r["max_abs"] <= NOISE_ABS_TOL, f"{r['id']}: in-kernel noise differs from philox_normal by {r['max_abs']}"
    assert res["philox"]["mismatches"] == 0, res["philox"]


def test_interpreter_noise_matches_philox_normal(interp_results):
    _check_noise(interp_results)


def test_interpreter_bad_input(interp_results):
    assert_bad_inputs_ok(interp_results)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_gpu(gpu_results, case):
    _check_case(gpu_results, case)


def test_gpu_noise_matches_philox_normal(gpu_results):
    _check_noise(gpu_results)


if __name__ == "__main__":
    from triton_worker import worker_main

    sys.exit(worker_main(_worker))
