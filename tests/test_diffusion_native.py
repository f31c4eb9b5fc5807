"""Native (compiled) backends of the fused diffusion step: vlops._C.diffusion_step_cpu and, on a GPU,
vlops._C.diffusion_step_cuda, called with the positional arguments of the kernel contract
(vlops/ops/diffusion.py) and compared with vlops.reference.diffusion.

Bounds (DESIGN.md): relative error ||out - ref|| / ||ref|| against a float64 reference of <= 1e-5 in
fp32 and <= 1e-2 in fp16 / bf16, where the fused result must also be no worse than 2x the error of
the reference computed in that dtype. Outputs are poisoned with NaN before every call.
"""
from __future__ import annotations

import itertools
import os
import random
import shutil
import zlib

import pytest
import torch

from conftest import cpu_isa

from vlops.reference import diffusion as ref

_C = pytest.importorskip("vlops._C", reason="the compiled extension vlops._C is not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-10}
T_TRAIN = 1000
STEP = 20  # a 50-step schedule: prev_table[t] = t - 20, negative for "none"
PER_SAMPLE_T = [0, 10, 21, 500, 999]  # t = 0 (no DDPM noise), prev < 0 (final_alpha), ...
SEED_BASE = int.from_bytes(os.urandom(4), "little")  # fresh inputs each run; printed on failure


def _gen(*salt) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr((SEED_BASE,) + salt).encode()))


def _schedule():
    betas = torch.linspace(1e-4, 0.02, T_TRAIN, dtype=torch.float64)
    ac = torch.cumprod(1.0 - betas, 0).to(torch.float32)
    prev = torch.arange(T_TRAIN, dtype=torch.int64) - STEP
    return ac, prev


AC, PREV = _schedule()


def make_case(*, B=5, N=105, dtype=torch.float32, mode=0, pred=0, var=0, guided=True, clip=False,
              x0_scale=False, eps_scale=False, noise_given=False, per_sample_t=True, eta=0.0,
              use_clipped=False, final_alpha=1.0, wide_eps=False, wide_uncond=False, device="cpu", salt=0):
    """The positional arguments of the contract (outputs excluded) as a dict, with random inputs."""
    g = _gen(B, N, str(dtype), mode, pred, var, guided, clip, x0_scale, eps_scale, noise_given,
             per_sample_t, eta, use_clipped, wide_eps, salt)
    learned = mode == 0 and var in (3, 4)
    M = 2 * N if (learned or wide_eps) else N
    eps = torch.randn(B, M, generator=g, dtype=torch.float64)
    if learned:  # variance channels: v > 0 (learned), v in (-1, 1) (learned_range)
        v = torch.rand(B, N, generator=g, dtype=torch.float64)
        eps[:, N:] = v + 0.05 if var == 3 else 2 * v - 1
    uncond = torch.randn(B, 2 * N if wide_uncond else N, generator=g, dtype=torch.float64) if guided else None
    sample = torch.randn(B, N, generator=g, dtype=torch.float64)
    needs_noise = mode == 0 or eta > 0
    noise = torch.randn(B, N, generator=g, dtype=torch.float64) if (noise_given and needs_noise) else None
    if per_sample_t:
        ts = torch.tensor([PER_SAMPLE_T[i % len(PER_SAMPLE_T)] for i in range(B)], dtype=torch.int64)
    else:
        ts = torch.tensor([int(torch.randint(1, T_TRAIN, (1,), generator=g))], dtype=torch.int64)
    x0s = (1.0 + torch.rand(B, generator=g)).float() if x0_scale else None
    ess = (0.7 + 0.3 * torch.rand(B, generator=g)).float() if eps_scale else None
    cast = (lambda t: None if t is None else t.to(device=device, dtype=dtype))
    dev = (lambda t: None if t is None else t.to(device))
    return dict(
        eps=cast(eps), uncond=cast(uncond), sample=cast(sample), noise=cast(noise), timesteps=dev(ts),
        prev_table=dev(PREV), alphas_cumprod=dev(AC.double() if dtype == torch.float64 else AC),
        x0_scale=dev(x0s), eps_scale=dev(ess), mode=mode, guidance_scale=float(1.0 + 6.5 * torch.rand(1, generator=g)),
        prediction_type=pred, variance_type=var, clip_sample=clip, clip_range=1.0 if not clip else 1.5,
        eta=eta, use_clipped=use_clipped, final_alpha=final_alpha,
        seed=int(torch.randint(0, 2**62, (1,), generator=g)) * 2 + 1,
    )


def run_native(fn, c, *, want_x0=True, poison=True):
    B, N = c["sample"].shape
    out_prev = torch.empty_like(c["sample"])
    out_x0 = torch.empty_like(c["sample"]) if want_x0 else None
    if poison:
        out_prev.fill_(float("nan"))
        if out_x0 is not None:
            out_x0.fill_(float("nan"))
    fn(c["eps"], c["uncond"], c["sample"], c["noise"], c["timesteps"], c["prev_table"], c["alphas_cumprod"],
       c["x0_scale"], c["eps_scale"], out_prev, out_x0, c["mode"], c["guidance_scale"], c["prediction_type"],
       c["variance_type"], c["clip_sample"], c["clip_range"], c["eta"], c["use_clipped"], c["final_alpha"],
       c["seed"])
    return out_prev, out_x0


def reference(c, cdt):
    """The contract's math in compute dtype ``cdt`` (float64: the ground truth; the input dtype: eager)."""
    B, N = c["sample"].shape
    noise = c["noise"]
    if (c["mode"] == 0 or c["eta"] > 0) and noise is None:
        noise = ref.philox_normal(c["seed"], B * N).view(B, N)
    e = c["eps"].cpu().to(cdt)
    x = c["sample"].cpu().to(cdt)
    if c["uncond"] is not None:
        u = c["uncond"].cpu()[:, :N].to(cdt)
        guided = u + c["guidance_scale"] * (e[:, :N] - u)
        if c["eps_scale"] is not None:
            guided = guided * c["eps_scale"].cpu().to(cdt)[:, None]
        e = torch.cat([guided, e[:, N:]], dim=1)
    x0s = c["x0_scale"]
    prev, x0 = ref.diffusion_step(
        e.view(B, -1, N), c["timesteps"].cpu(), x.view(B, 1, N), c["alphas_cumprod"].cpu().to(cdt),
        c["prev_table"].cpu(), mode="ddpm" if c["mode"] == 0 else "ddim",
        prediction_type=ref.PREDICTION_TYPES[c["prediction_type"]],
        variance_type=ref.VARIANCE_TYPES[c["variance_type"]],
        clip_sample=c["clip_sample"] and x0s is None, clip_sample_range=c["clip_range"], eta=c["eta"],
        use_clipped_model_output=c["use_clipped"], final_alpha_cumprod=c["final_alpha"],
        noise=None if noise is None else noise.cpu().to(cdt).view(B, 1, N),
        x0_scale=None if x0s is None else x0s.cpu().to(cdt))
    return prev.view(B, N), x0.view(B, N)


def rel_err(out, want):
    out, want = out.cpu().double(), want.double()
    den = want.norm().item()
    err = (out - want).norm().item() / (den if den > 0 else 1.0)
    return err if err == err else float("inf")  # NaN never passes


def check_against_reference(c, prev, x0, what):
    dtype = c["sample"].dtype
    msg = f"{what} (SEED_BASE={SEED_BASE})"
    assert not torch.isnan(prev).any(), f"out_prev has NaN / unwritten elements: {msg}"
    assert torch.isfinite(prev).all(), f"out_prev not finite: {msg}"
    r_prev, r_x0 = reference(c, torch.float64)
    e_prev = rel_err(prev, r_prev)
    assert e_prev <= TOL[dtype], f"prev rel err {e_prev:.3g} > {TOL[dtype]:g}: {msg}"
    if x0 is not None:
        assert not torch.isnan(x0).any(), f"out_x0 has NaN / unwritten elements: {msg}"
        e_x0 = rel_err(x0, r_x0)
        assert e_x0 <= TOL[dtype], f"x0 rel err {e_x0:.3g} > {TOL[dtype]:g}: {msg}"
    if dtype in (torch.float16, torch.bfloat16):
        d_prev, d_x0 = reference(c, dtype)
        ed_prev = rel_err(d_prev, r_prev)
        assert e_prev <= 2 * ed_prev, f"prev rel err {e_prev:.3g} > 2 x eager {dtype} error {ed_prev:.3g}: {msg}"
        if x0 is not None:
            ed_x0 = rel_err(d_x0, r_x0)
            assert e_x0 <= 2 * ed_x0, f"x0 rel err {e_x0:.3g} > 2 x eager {dtype} error {ed_x0:.3g}: {msg}"


def ddpm_cases():
    for var, guided, clip, (x0s, es), noise_given, per_t in itertools.product(
            range(5), (False, True), (False, True), ((False, False), (True, False), (False, True), (True, True)),
            (False, True), (True, False)):
        yield dict(mode=0, var=var, guided=guided, clip=clip, x0_scale=x0s, eps_scale=es, noise_given=noise_given,
                   per_sample_t=per_t, wide_eps=not per_t, wide_uncond=clip)


def ddim_cases():
    for guided, clip, (x0s, es), (eta, noise_given), use_clipped, per_t in itertools.product(
            (False, True), (False, True), ((False, False), (True, True)), ((0.0, False), (0.7, False), (1.0, True)),
            (False, True), (True, False)):
        yield dict(mode=1, guided=guided, clip=clip, x0_scale=x0s, eps_scale=es, eta=eta, noise_given=noise_given,
                   use_clipped=use_clipped, per_sample_t=per_t, wide_eps=per_t,
                   final_alpha=1.0 if per_t else float(AC[0]))


# --------------------------------------------------------------------------------------------------
# CPU backend
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred", [0, 1, 2], ids=["epsilon", "sample", "v"])
@pytest.mark.parametrize("mode", [0, 1], ids=["ddpm", "ddim"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_cpu_matches_reference(dtype, mode, pred):
    cases = ddpm_cases() if mode == 0 else ddim_cases()
    for i, kw in enumerate(cases):
        c = make_case(dtype=dtype, pred=pred, salt=i, **kw)
        prev, x0 = run_native(_C.diffusion_step_cpu, c, want_x0=(i % 3 != 2))
        check_against_reference(c, prev, x0, f"cpu {dtype} pred={pred} {kw}")


@pytest.mark.parametrize("isa", _C.cpu_isas_supported())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_cpu_every_isa_and_long_rows(isa, dtype):
    """Each instruction-set variant, on rows longer than one block (16384) with odd lengths."""
    rng = random.Random(SEED_BASE)
    configs = [dict(mode=0, var=0, guided=True, clip=True),
               dict(mode=0, var=4, guided=False, x0_scale=True, noise_given=True),
               dict(mode=0, var=3, guided=True, eps_scale=True, per_sample_t=False),
               dict(mode=0, var=1, guided=True, wide_uncond=True),
               dict(mode=1, eta=0.5, guided=True, use_clipped=True, clip=True),
               dict(mode=1, eta=0.0, guided=False, pred=2)]
    with cpu_isa(isa):
        for i, kw in enumerate(configs):
            kw = dict(pred=rng.choice([0, 1, 2]), **kw) if "pred" not in kw else kw
            N = rng.choice([3 * 7 * 5 * 211, 1, 3, 17, 1024, 16384 + 3])
            c = make_case(B=2, N=N, dtype=dtype, salt=(isa, i), **kw)
            prev, x0 = run_native(_C.diffusion_step_cpu, c)
            check_against_reference(c, prev, x0, f"isa={isa} N={N} {kw}")


def test_cpu_single_sample_and_broadcast_timestep():
    for dtype, mode in itertools.product(DTYPES, (0, 1)):
        c = make_case(B=1, N=3 * 7 * 5, dtype=dtype, mode=mode, eta=0.3, per_sample_t=False, guided=True)
        prev, x0 = run_native(_C.diffusion_step_cpu, c)
        check_against_reference(c, prev, x0, f"B=1 {dtype} mode={mode}")


def test_cpu_empty_is_a_no_op():
    c = make_case(B=3, N=5)
    for key in ("eps", "uncond", "sample"):
        c[key] = c[key][:, :0].contiguous()
    prev, x0 = run_native(_C.diffusion_step_cpu, c)
    assert prev.shape == (3, 0)


def noise_only_case(B, N, seed, device="cpu"):
    """prediction 'sample' with e = 0, x = 0 and learned variance v = 1: prev = 1 * n exactly."""
    c = make_case(B=B, N=N, mode=0, pred=1, var=3, guided=False, per_sample_t=False, device=device)
    c["eps"] = torch.cat([torch.zeros(B, N), torch.ones(B, N)], 1).to(device)
    c["sample"] = torch.zeros(B, N, device=device)
    c["timesteps"] = torch.tensor([500], dtype=torch.int64, device=device)
    c["seed"] = seed
    return c


@pytest.mark.parametrize("isa", _C.cpu_isas_supported())
def test_cpu_noise_matches_philox_normal(isa):
    B, N = 3, 87381  # odd row length: tiles start at every phase of the 4-element groups
    with cpu_isa(isa):
        for seed in (0, 2**32 + 7, 2**63 - 1, SEED_BASE):
            c = noise_only_case(B, N, seed)
            prev, _ = run_native(_C.diffusion_step_cpu, c, want_x0=False)
            want = ref.philox_normal(seed, B * N).view(B, N)
            diff = (prev - want).abs().max().item()
            assert diff <= 1e-6, f"isa={isa} seed={seed}: in-kernel noise differs from philox_normal by {diff}"
            again, _ = run_native(_C.diffusion_step_cpu, c, want_x0=False)
            assert torch.equal(prev, again), "the noise stream is not deterministic"


def test_cpu_noise_stream_statistics_and_seed_words():
    B, N = 2, 1 << 16
    a, _ = run_native(_C.diffusion_step_cpu, noise_only_case(B, N, 5), want_x0=False)
    b, _ = run_native(_C.diffusion_step_cpu, noise_only_case(B, N, 5 + (1 << 32)), want_x0=False)
    assert abs(a.mean().item()) < 0.02 and abs(a.std().item() - 1) < 0.02
    assert (a - b).abs().max() > 1, "the high word of the seed does not change the stream"


@pytest.mark.parametrize("isa", _C.cpu_isas_supported())
def test_philox4x32_known_answers_and_bit_exact(isa):
    kat = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    with cpu_isa(isa):
        for ctr, key, want in kat:
            got = _C.philox4x32_cpu(torch.tensor([ctr], dtype=torch.int64), *key)
            assert tuple(got[0].tolist()) == want, f"{isa}: Philox4x32-10 KAT failed for ctr={ctr} key={key}"
            r = ref.philox4x32(*[torch.tensor([v], dtype=torch.int64) for v in ctr], *key)
            assert tuple(int(v) for v in r) == want, "vlops.reference.diffusion.philox4x32 KAT failed"
        g = _gen("philox", isa)
        ctr = torch.randint(0, 2**32, (1003, 4), generator=g, dtype=torch.int64)
        ctr[:, 2:] = torch.where(torch.rand(1003, 1, generator=g) < 0.5, ctr[:, 2:], 0)
        for key in ((0, 0), (12345, 0xDEADBEEF), (0xFFFFFFFF, 1)):
            got = _C.philox4x32_cpu(ctr, *key)
            want = torch.stack(ref.philox4x32(ctr[:, 0], ctr[:, 1], ctr[:, 2], ctr[:, 3], *key), 1)
            assert torch.equal(got, want), f"{isa}: Philox4x32-10 outputs are not bit-exact for key={key}"


def test_cpu_given_noise_equals_drawn_noise():
    c = make_case(B=4, N=1000, dtype=torch.float32, mode=0, var=0, guided=True, clip=True)
    drawn, _ = run_native(_C.diffusion_step_cpu, c)
    c["noise"] = ref.philox_normal(c["seed"], 4 * 1000).view(4, 1000)
    given, _ = run_native(_C.diffusion_step_cpu, c)
    assert (drawn - given).abs().max() < 1e-6


def test_cpu_inputs_are_not_modified():
    c = make_case(B=3, N=77, guided=True, noise_given=True, x0_scale=True, eps_scale=True)
    before = {k: v.clone() for k, v in c.items() if isinstance(v, torch.Tensor)}
    run_native(_C.diffusion_step_cpu, c)
    for k, v in before.items():
        assert torch.equal(v, c[k]), f"{k} was modified"


def _call(fn, c, **over):
    c = dict(c, **over)
    out_prev = over.get("out_prev", torch.empty_like(c["sample"]))
    out_x0 = over.get("out_x0", None)
    fn(c["eps"], c["uncond"], c["sample"], c["noise"], c["timesteps"], c["prev_table"], c["alphas_cumprod"],
       c["x0_scale"], c["eps_scale"], out_prev, out_x0, c["mode"], c["guidance_scale"], c["prediction_type"],
       c["variance_type"], c["clip_sample"], c["clip_range"], c["eta"], c["use_clipped"], c["final_alpha"],
       c["seed"])


def bad_inputs(c):
    B, N = c["sample"].shape
    dev = c["sample"].device
    return {
        "eps wrong width": dict(eps=torch.randn(B, N + 1, device=dev)),
        "eps wrong rows": dict(eps=torch.randn(B + 1, N, device=dev)),
        "eps dtype": dict(eps=c["eps"].half()),
        "uncond wrong width": dict(uncond=torch.randn(B, 3 * N, device=dev)),
        "sample 1-D": dict(sample=c["sample"].flatten(), out_prev=torch.empty(B * N, device=dev)),
        "sample non-contiguous": dict(sample=torch.randn(N, B, device=dev).t()),
        "sample int": dict(sample=c["sample"].long()),
        "noise wrong shape": dict(noise=torch.randn(B, N + 2, device=dev)),
        "out_prev wrong shape": dict(out_prev=torch.empty(B, N - 1, device=dev)),
        "out_prev dtype": dict(out_prev=torch.empty(B, N, device=dev, dtype=torch.float64)),
        "out_x0 wrong shape": dict(out_x0=torch.empty(B + 1, N, device=dev)),
        "timesteps int32": dict(timesteps=c["timesteps"].int()),
        "timesteps wrong length": dict(timesteps=torch.zeros(B + 1, dtype=torch.int64, device=dev)),
        "prev_table length": dict(prev_table=c["prev_table"][:-1].contiguous()),
        "prev_table float": dict(prev_table=c["prev_table"].float()),
        "alphas int": dict(alphas_cumprod=c["alphas_cumprod"].long()),
        "x0_scale length": dict(x0_scale=torch.ones(B + 1, device=dev)),
        "eps_scale int": dict(eps_scale=torch.ones(B, dtype=torch.int64, device=dev)),
        "learned without variance channels": dict(variance_type=3, eps=torch.randn(B, N, device=dev)),
        "mode": dict(mode=2),
        "prediction_type": dict(prediction_type=3),
        "variance_type": dict(variance_type=5),
        "seed negative": dict(seed=-1),
    }


def test_cpu_bad_inputs_raise():
    c = make_case(B=3, N=10, guided=True, var=0)
    _call(_C.diffusion_step_cpu, c)  # the unmodified case runs
    for name, over in bad_inputs(c).items():
        with pytest.raises(RuntimeError):
            _call(_C.diffusion_step_cpu, c, **over)
            pytest.fail(f"no error for: {name}")
    # values checked on the host by the CPU backend
    with pytest.raises(RuntimeError, match="out of range"):
        _call(_C.diffusion_step_cpu, c, timesteps=torch.tensor([T_TRAIN], dtype=torch.int64))
    with pytest.raises(RuntimeError, match="out of range"):
        _call(_C.diffusion_step_cpu, c, timesteps=torch.tensor([-1], dtype=torch.int64))
    bad_prev = PREV.clone()
    bad_prev[7] = T_TRAIN + 3
    with pytest.raises(RuntimeError, match="out of range"):
        _call(_C.diffusion_step_cpu, c, timesteps=torch.tensor([7], dtype=torch.int64), prev_table=bad_prev)
    if _C.has_cuda():  # the CUDA launcher refuses CPU tensors
        with pytest.raises(RuntimeError, match="CUDA|cuda"):
            _call(_C.diffusion_step_cuda, c)


# --------------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------------
def _build_env_has_nvcc() -> bool:
    if os.environ.get("VLOPS_BUILD_CUDA", "auto").strip() == "0" or torch.version.cuda is None:
        return False
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return shutil.which("nvcc") is not None or any(h and os.path.isfile(os.path.join(h, "bin", "nvcc")) for h in homes)


def test_build_note_is_consistent():
    note = _C.cuda_build_note()
    assert isinstance(note, str) and note
    if _C.has_cuda():
        assert note.startswith("built for"), note
        assert hasattr(_C, "diffusion_step_cuda")
    else:
        assert not hasattr(_C, "diffusion_step_cuda")


@pytest.mark.skipif(not _build_env_has_nvcc(), reason="no nvcc here (or VLOPS_BUILD_CUDA=0 / CPU-only torch)")
def test_cuda_part_built_when_nvcc_present():
    assert _C.has_cuda(), f"nvcc is available but vlops._C has no CUDA part: {_C.cuda_build_note()}"


# --------------------------------------------------------------------------------------------------
# CUDA backend (needs a GPU)
# --------------------------------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and _C.has_cuda()),
                               reason="needs a CUDA device and vlops._C built with CUDA")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("N", [105, 4096], ids=["scalar-path", "vector-path"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_cuda_matches_reference_and_cpu(dtype, N):
    cases = list(ddpm_cases())[::3] + list(ddim_cases())[::2]
    for i, kw in enumerate(cases):
        for pred in (0, 1, 2):
            c = make_case(N=N, dtype=dtype, pred=pred, device="cuda", salt=(i, pred), **kw)
            prev, x0 = run_native(_C.diffusion_step_cuda, c, want_x0=(i % 3 != 2))
            torch.cuda.synchronize()
            check_against_reference(c, prev, x0, f"cuda {dtype} N={N} pred={pred} {kw}")
            cc = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
            cprev, _ = run_native(_C.diffusion_step_cpu, cc)
            scale = cprev.double().abs().max().item() + 1
            tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)
            assert (prev.cpu().double() - cprev.double()).abs().max().item() <= tol * scale, "cuda != cpu"


@pytest.mark.gpu
@needs_gpu
def test_cuda_misaligned_and_odd_rows():
    for dtype in DTYPES:
        for off, N in ((1, 4096), (0, 4099), (3, 1)):
            c = make_case(B=3, N=N, dtype=dtype, mode=0, var=4, guided=True, clip=True, device="cuda")
            for key in ("eps", "uncond", "sample"):  # shift the data pointers by `off` elements
                t = c[key]
                buf = torch.empty(t.numel() + 8, device="cuda", dtype=dtype)
                c[key] = buf[off:off + t.numel()].view_as(t).copy_(t)
            prev, x0 = run_native(_C.diffusion_step_cuda, c)
            check_against_reference(c, prev, x0, f"cuda misaligned off={off} N={N} {dtype}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("N", [1 << 18, (1 << 18) + 3])
def test_cuda_noise_matches_philox_normal(N):
    B = 4
    for seed in (0, 2**32 + 7, 2**63 - 1):
        c = noise_only_case(B, N, seed, device="cuda")
        prev, _ = run_native(_C.diffusion_step_cuda, c, want_x0=False)
        want = ref.philox_normal(seed, B * N).view(B, N)
        diff = (prev.cpu() - want).abs().max().item()
        assert diff <= 1e-6, f"seed={seed}: CUDA noise differs from philox_normal by {diff}"
        cprev, _ = run_native(_C.diffusion_step_cpu, noise_only_case(B, N, seed), want_x0=False)
        assert (prev.cpu() - cprev).abs().max().item() <= 2e-6, "CUDA and CPU noise streams differ"


@pytest.mark.gpu
@needs_gpu
def test_cuda_bad_timestep_gives_nan_and_bad_inputs_raise():
    c = make_case(B=3, N=64, device="cuda")
    c["timesteps"] = torch.tensor([5, T_TRAIN + 1, -2], dtype=torch.int64, device="cuda")
    prev, x0 = run_native(_C.diffusion_step_cuda, c)
    assert torch.isfinite(prev[0]).all() and torch.isnan(prev[1:]).all() and torch.isnan(x0[1:]).all()
    c = make_case(B=3, N=10, guided=True, var=0, device="cuda")
    _call(_C.diffusion_step_cuda, c)
    for name, over in bad_inputs(c).items():
        with pytest.raises(RuntimeError):
            _call(_C.diffusion_step_cuda, c, **over)
            pytest.fail(f"no error for: {name}")
    with pytest.raises(RuntimeError):  # a schedule tensor left on the CPU
        _call(_C.diffusion_step_cuda, c, alphas_cumprod=AC)


@pytest.mark.gpu
@needs_gpu
def test_cuda_runs_on_the_current_stream():
    c = make_case(B=16, N=4 * 64 * 64, device="cuda", guided=True, clip=True)
    want, _ = run_native(_C.diffusion_step_cuda, c)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        got, _ = run_native(_C.diffusion_step_cuda, c)
    s.synchronize()
    assert torch.equal(want, got)
