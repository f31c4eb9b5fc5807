"""The fused diffusion step through the public API: parity with diffusers (the anchor), the float64
reference, every config, dtypes, odd and non-contiguous inputs, per-sample timesteps, a 50-step loop,
bad input, opcheck and torch.compile."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import vlops
from vlops.ops.diffusion import diffusion_step_op
from vlops.reference import diffusion as ref

from conftest import HAS_CUDA, assert_close_to_ref, backend_params, rel_err, require_backend

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg  # noqa: E402

from vlops.integrations.diffusers import FusedDDIMScheduler, FusedDDPMScheduler, patch_pipeline  # noqa: E402

BACKENDS = backend_params()
PRED = ["epsilon", "sample", "v_prediction"]
VAR = ["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"]
CLIP = ["none", "clip", "threshold"]


def _clip_cfg(clip):
    return dict(clip_sample=clip == "clip", clip_sample_range=1.5, thresholding=clip == "threshold",
                dynamic_thresholding_ratio=0.9, sample_max_value=2.5)


def _inputs(B, C, spatial, var_channels=False, device="cpu", dtype=torch.float32, doubled=False):
    x = torch.randn(B, C, *spatial, device=device, dtype=dtype)
    mo = torch.randn(B * (2 if doubled else 1), C * (2 if var_channels else 1), *spatial, device=device, dtype=dtype)
    if var_channels:  # learned variance channels: values in [-1, 1]; "learned" needs positive variances
        mo[:, C:] = torch.rand_like(mo[:, C:]) * 0.02
    return x, mo


def _pair(cls_d, cls_f, n_steps=50, **cfg):
    a, b = cls_d(**cfg), cls_f(**cfg)
    a.set_timesteps(n_steps)
    b.set_timesteps(n_steps)
    return a, b


# ---------------------------------------------------------------------------------------- diffusers parity


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("pred", PRED)
@pytest.mark.parametrize("var", VAR)
@pytest.mark.parametrize("clip", CLIP)
def test_ddpm_matches_diffusers(backend, device, pred, var, clip):
    require_backend(backend, device)
    a, b = _pair(DDPMScheduler, FusedDDPMScheduler, prediction_type=pred, variance_type=var, **_clip_cfg(clip))
    x, mo = _inputs(2, 3, (5, 7), var_channels=var.startswith("learned"), device=device)
    for t in (a.timesteps[3], a.timesteps[-1]):  # a noisy step and the last one (t = 0: no noise)
        r1 = a.step(mo, t, x, generator=torch.Generator(device).manual_seed(5))
        poison = torch.full_like(x, float("nan"))
        with vlops.use_backend(backend):
            r2 = b.step(mo, t, x, generator=torch.Generator(device).manual_seed(5))
        assert type(r2) is type(r1)
        assert r2.prev_sample.shape == x.shape and not torch.equal(r2.prev_sample, poison)
        assert rel_err(r2.prev_sample, r1.prev_sample) < 1e-5
        assert rel_err(r2.pred_original_sample, r1.pred_original_sample) < 1e-5


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("pred", PRED)
@pytest.mark.parametrize("eta,clipped", [(0.0, False), (0.7, False), (1.0, True)])
@pytest.mark.parametrize("clip", CLIP)
@pytest.mark.parametrize("alpha_one", [True, False])
def test_ddim_matches_diffusers(backend, device, pred, eta, clipped, clip, alpha_one):
    require_backend(backend, device)
    a, b = _pair(DDIMScheduler, FusedDDIMScheduler, prediction_type=pred, set_alpha_to_one=alpha_one,
                 **_clip_cfg(clip))
    x, mo = _inputs(3, 4, (6,), device=device)
    for t in (a.timesteps[0], a.timesteps[-1]):
        r1 = a.step(mo, t, x, eta=eta, use_clipped_model_output=clipped,
                    generator=torch.Generator(device).manual_seed(1))
        with vlops.use_backend(backend):
            r2 = b.step(mo, t, x, eta=eta, use_clipped_model_output=clipped,
                        generator=torch.Generator(device).manual_seed(1))
        assert rel_err(r2.prev_sample, r1.prev_sample) < 1e-5
        assert rel_err(r2.pred_original_sample, r1.pred_original_sample) < 1e-5
        # variance_noise keyword, return_dict=False tuple
        noise = torch.randn_like(x)
        t1 = a.step(mo, t, x, eta=eta, variance_noise=noise, return_dict=False)
        with vlops.use_backend(backend):
            t2 = b.step(mo, t, x, eta=eta, variance_noise=noise, return_dict=False)
        assert isinstance(t2, tuple) and len(t2) == 2
        assert rel_err(t2[0], t1[0]) < 1e-5


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", ["ddpm", "ddim"])
@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("learned", [False, True])
def test_guidance_matches_pipeline_lines(backend, device, mode, rescale, learned):
    """Fused guidance == the pipelines' lines (SD: chunk, guidance, rescale_noise_cfg; IF/GLIDE:
    guidance on the first C channels, variance channels from the conditional half) + diffusers step."""
    require_backend(backend, device)
    if mode == "ddpm":
        a, b = _pair(DDPMScheduler, FusedDDPMScheduler, variance_type="learned_range" if learned else "fixed_small",
                     clip_sample=True)
    else:
        a, b = _pair(DDIMScheduler, FusedDDIMScheduler, clip_sample=False)
    B, C, g = 2, 3, 6.5
    x, mo = _inputs(B, C, (4, 4), var_channels=learned, device=device, doubled=True)
    t = a.timesteps[7]
    u, c = mo.chunk(2)
    guided = u[:, :C] + g * (c[:, :C] - u[:, :C])
    if rescale:
        guided = rescale_noise_cfg(guided, c[:, :C], guidance_rescale=rescale)
    eager_in = torch.cat([guided, c[:, C:]], 1) if (learned and mode == "ddpm") else guided
    kw = dict(eta=0.3) if mode == "ddim" else {}
    r1 = a.step(eager_in, t, x, generator=torch.Generator(device).manual_seed(2), **kw)
    with vlops.use_backend(backend):
        r2 = b.guided_step(mo, t, x, g, guidance_rescale=rescale, generator=torch.Generator(device).manual_seed(2),
                           **kw)
        # the two-tensor form gives the same result
        r3 = b.guided_step(c, t, x, g, model_output_uncond=u, guidance_rescale=rescale,
                           generator=torch.Generator(device).manual_seed(2), **kw)
    assert rel_err(r2.prev_sample, r1.prev_sample) < 1e-5
    assert rel_err(r2.pred_original_sample, r1.pred_original_sample) < 1e-5
    assert torch.equal(r2.prev_sample, r3.prev_sample)


# ---------------------------------------------------------------------------------------- float64 reference


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["ddpm", "ddim"])
def test_dtypes_against_float64(backend, device, dtype, mode):
    require_backend(backend, device)
    sched = vlops.DiffusionSchedule.ddpm(num_inference_steps=25) if mode == "ddpm" else \
        vlops.DiffusionSchedule.ddim(num_inference_steps=25)
    t = int(sched.timesteps[4])
    B, C = 3, 4
    x, mo = _inputs(B, C, (9, 11), device=device, dtype=dtype, doubled=True)
    noise = torch.randn_like(x)
    kw = dict(guidance_scale=4.0, clip_sample=True, noise=noise)
    step = vlops.ddpm_step if mode == "ddpm" else vlops.ddim_step
    if mode == "ddim":
        kw["eta"] = 0.5
    with vlops.use_backend(backend):
        prev, x0 = step(mo, t, x, sched, **kw)
    assert prev.dtype == dtype and x0.dtype == dtype
    kw64 = dict(kw, noise=noise.double())
    prev64, x064 = step(mo.double(), t, x.double(), sched, **kw64)  # float64 through the same API...
    with vlops.use_backend("reference"):
        p_chk, _ = step(mo.double(), t, x.double(), sched, **kw64)  # ...equals the float64 reference
        eager_prev, eager_x0 = step(mo, t, x, sched, **kw)  # plain PyTorch at this dtype
    assert rel_err(prev64, p_chk) < 1e-12
    # the eager-at-dtype error bound: compute diffusers in this dtype
    assert_close_to_ref(prev, p_chk, dtype, eager=_eager_at_dtype(mode, mo, t, x, noise), what="prev_sample")
    assert_close_to_ref(x0, x064, dtype, what="pred_original_sample")


def _eager_at_dtype(mode, mo, t, x, noise):
    """diffusers' step plus guidance, run in the inputs' dtype (the eager error the bound allows 2x of)."""
    u, c = mo.chunk(2)
    guided = u + 4.0 * (c - u)
    if mode == "ddpm":
        s = DDPMScheduler(clip_sample=True)
        s.set_timesteps(25)
        g = torch.Generator(mo.device).manual_seed(0)
        out = s.step(guided, t, x, generator=g).prev_sample
        # diffusers draws its own noise: swap it for ours so the comparison is of the arithmetic only
        std = (s._get_variance(t) ** 0.5).to(x.dtype)
        drawn = torch.randn(x.shape, generator=torch.Generator(mo.device).manual_seed(0), dtype=x.dtype,
                            device=x.device)
        return out - std * drawn + std * noise
    s = DDIMScheduler(clip_sample=True)
    s.set_timesteps(25)
    return s.step(guided, t, x, eta=0.5, variance_noise=noise).prev_sample


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_in_kernel_noise_is_the_philox_stream(backend, device):
    require_backend(backend, device)
    sched = vlops.DiffusionSchedule.ddpm()
    B, C = 2, 3
    x, mo = _inputs(B, C, (13, 3), device=device)
    seed = 0x1234_5678_9ABC
    with vlops.use_backend(backend):
        p1, _ = vlops.ddpm_step(mo, 600, x, sched, seed=seed)
        p2, _ = vlops.ddpm_step(mo, 600, x, sched, seed=seed)
        p3, _ = vlops.ddpm_step(mo, 600, x, sched, seed=seed + 1)
    assert torch.equal(p1, p2)  # reproducible
    assert not torch.allclose(p1, p3)
    noise = ref.philox_normal(seed, x.numel(), device=device).view_as(x)
    with vlops.use_backend("reference"):
        pr, _ = vlops.ddpm_step(mo, 600, x, sched, noise=noise)
    assert rel_err(p1, pr) < 1e-5
    n = ref.philox_normal(99, 1 << 16)
    assert abs(n.mean().item()) < 0.02 and abs(n.std().item() - 1) < 0.02


def test_philox_known_answers():
    """Random123's Philox4x32-10 known-answer vectors."""
    z = torch.zeros(1, dtype=torch.int64)
    assert [int(v) for v in ref.philox4x32(z, z, z, z, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    f = torch.full((1,), 0xFFFFFFFF, dtype=torch.int64)
    assert [int(v) for v in ref.philox4x32(f, f, f, f, 0xFFFFFFFF, 0xFFFFFFFF)] == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


# ---------------------------------------------------------------------------------------- shapes and layouts


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_per_sample_timesteps(backend, device):
    """GLIDE-style: a timestep per sample, including t = 0 (no noise) in the same batch."""
    require_backend(backend, device)
    a, b = _pair(DDPMScheduler, FusedDDPMScheduler, n_steps=1000, clip_sample=True)
    ts = torch.tensor([999, 0, 1, 500])
    x, mo = _inputs(4, 3, (5, 5), device=device)
    noise = torch.randn_like(x)
    with vlops.use_backend(backend):
        prev, x0 = vlops.ddpm_step(mo, ts.to(device), x, b.vlops_schedule(), clip_sample=True, noise=noise)
    with vlops.use_backend("reference"):  # the float64 specification, per-sample timesteps and all
        p64, x064 = vlops.ddpm_step(mo.double(), ts.to(device), x.double(), b.vlops_schedule(), clip_sample=True,
                                    noise=noise.double())
    assert rel_err(prev, p64) < 1e-5 and rel_err(x0, x064) < 1e-5
    for i, t in enumerate(ts.tolist()):
        if t == 1:  # diffusers' fp32 1 - ab_t / ab_prev cancels near t = 0: compared with float64 above
            continue
        g = torch.Generator(device).manual_seed(0)
        r = a.step(mo[i:i + 1], t, x[i:i + 1], generator=g)
        drawn = torch.randn(x[i:i + 1].shape, generator=torch.Generator(device).manual_seed(0), device=device)
        std = a._get_variance(t) ** 0.5 if t > 0 else 0.0
        expect = r.prev_sample - std * drawn + std * noise[i:i + 1]
        assert rel_err(prev[i:i + 1], expect) < 1e-5, t
        assert rel_err(x0[i:i + 1], r.pred_original_sample) < 1e-5


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 3, 7, 5), (3, 5, 2, 3, 3)])
def test_odd_sizes_and_noncontiguous(backend, device, shape):
    require_backend(backend, device)
    sched = vlops.DiffusionSchedule.ddim(num_inference_steps=10)
    t = int(sched.timesteps[2])
    big = torch.randn(*shape[:-1], shape[-1] * 2, device=device)
    x = big[..., ::2]  # non-contiguous
    mo = torch.randn(shape, device=device)
    if len(shape) == 4:
        mo = mo.to(memory_format=torch.channels_last)
    noise = torch.randn(shape, device=device).transpose(0, -1).contiguous().transpose(0, -1)
    x_c, mo_c, n_c = x.clone(), mo.clone(), noise.clone()
    with vlops.use_backend(backend):
        prev, x0 = vlops.ddim_step(mo, t, x, sched, eta=0.4, noise=noise, clip_sample=True)
    with vlops.use_backend("reference"):
        p_ref, x0_ref = vlops.ddim_step(mo.contiguous(), t, x.contiguous(), sched, eta=0.4, noise=noise.contiguous(),
                                        clip_sample=True)
    assert prev.shape == torch.Size(shape)
    assert rel_err(prev, p_ref) < 1e-5 and rel_err(x0, x0_ref) < 1e-5
    assert torch.equal(x, x_c) and torch.equal(mo, mo_c) and torch.equal(noise, n_c)  # inputs untouched


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_mixed_dtypes_promote(backend, device):
    require_backend(backend, device)
    sched = vlops.DiffusionSchedule.ddpm()
    x = torch.randn(2, 3, 4, device=device)
    mo = torch.randn(2, 3, 4, device=device, dtype=torch.bfloat16)
    with vlops.use_backend(backend):
        prev, x0 = vlops.ddpm_step(mo, 10, x, sched, noise=torch.randn_like(x))
    assert prev.dtype == torch.float32 and x0.dtype == torch.float32


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", ["ddpm", "ddim"])
def test_50_step_sampling_loop_matches_diffusers(backend, device, mode):
    """A full 50-step loop with a small fixed model and classifier-free guidance."""
    require_backend(backend, device)
    torch.manual_seed(0)
    w = torch.randn(3, 3, device=device) * 0.3

    def model(z, t):
        return torch.tanh(torch.einsum("oc,bchw->bohw", w, z) + t / 1000.0)

    if mode == "ddpm":
        a, b = _pair(DDPMScheduler, FusedDDPMScheduler, clip_sample=True)
        kw = {}
    else:
        a, b = _pair(DDIMScheduler, FusedDDIMScheduler, clip_sample=False)
        kw = dict(eta=0.5)
    x_a = torch.randn(2, 3, 8, 8, device=device)
    x_b = x_a.clone()
    ga, gb = torch.Generator(device).manual_seed(7), torch.Generator(device).manual_seed(7)
    for t in a.timesteps:
        out = model(torch.cat([x_a] * 2), t)
        u, c = out.chunk(2)
        x_a = a.step(u + 3.0 * (c - u), t, x_a, generator=ga, **kw).prev_sample
        with vlops.use_backend(backend):
            x_b = b.guided_step(model(torch.cat([x_b] * 2), t), t, x_b, 3.0, generator=gb, **kw).prev_sample
    err = rel_err(x_b, x_a)
    assert err < 1e-4, err


def test_patch_pipeline_swaps_scheduler():
    class Pipe:
        pass

    pipe = Pipe()
    pipe.scheduler = DDIMScheduler(clip_sample=False)
    pipe.scheduler.set_timesteps(20)
    old = patch_pipeline(pipe)
    assert isinstance(pipe.scheduler, FusedDDIMScheduler) and isinstance(pipe.scheduler, DDIMScheduler)
    assert torch.equal(pipe.scheduler.timesteps, old.timesteps)
    assert dict(pipe.scheduler.config) == dict(old.config)
    import inspect

    def params(f):
        return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]

    assert params(FusedDDIMScheduler.step) == params(DDIMScheduler.step)
    assert params(FusedDDPMScheduler.step) == params(DDPMScheduler.step)


# ---------------------------------------------------------------------------------------- bad input


def test_bad_input_errors():
    s = vlops.DiffusionSchedule.ddpm()
    x = torch.randn(2, 3, 4, 4)
    mo = torch.randn(2, 3, 4, 4)
    cases = [
        (lambda: vlops.ddpm_step(torch.randn(2, 3, 4, 5), 10, x, s), ValueError, "model_output shape"),
        (lambda: vlops.ddpm_step(torch.randn(2, 4, 4, 4), 10, x, s), ValueError, "channels"),
        (lambda: vlops.ddpm_step(mo, 10, x, s, variance_type="learned"), ValueError, "2C"),
        (lambda: vlops.ddpm_step(mo, 1000, x, s), ValueError, "timestep"),
        (lambda: vlops.ddpm_step(mo, -1, x, s), ValueError, "timestep"),
        (lambda: vlops.ddpm_step(mo, torch.tensor([1, 2, 3]), x, s), ValueError, "timestep"),
        (lambda: vlops.ddpm_step(mo, 1.5, x, s), TypeError, "timestep"),
        (lambda: vlops.ddpm_step(mo.int(), 10, x, s), TypeError, "model_output"),
        (lambda: vlops.ddpm_step(mo, 10, x.long(), s), TypeError, "sample"),
        (lambda: vlops.ddpm_step(mo, 10, x, s, noise=torch.randn(2, 3, 4)), ValueError, "noise"),
        (lambda: vlops.ddpm_step(mo, 10, x, s, noise=torch.randn(2, 3, 4, 4, device="meta")), ValueError, "noise"),
        (lambda: vlops.ddpm_step(mo, 10, x, s, noise=x, seed=1), ValueError, "at most one"),
        (lambda: vlops.ddpm_step(mo, 10, x, s, seed=-3), ValueError, "seed"),
        (lambda: vlops.ddpm_step(mo, 10, x, s, prediction_type="eps"), ValueError, "prediction_type"),
        (lambda: vlops.ddpm_step(mo, 10, x, s, variance_type="fixed_large_log"), ValueError, "variance_type"),
        (lambda: vlops.ddpm_step(mo, 10, x, s, guidance_scale=3.0), ValueError, "doubled batch"),
        (lambda: vlops.ddpm_step(torch.randn(4, 3, 4, 4), 10, x, s), ValueError, "guidance_scale"),
        (lambda: vlops.ddpm_step(mo, 10, x, s, guidance_rescale=0.5), ValueError, "guidance"),
        (lambda: vlops.ddpm_step(mo, 10, x, s, clip_sample_range=0.0), ValueError, "clip_sample_range"),
        (lambda: vlops.ddpm_step(mo, 10, x, "sched"), TypeError, "schedule"),
        (lambda: vlops.ddim_step(mo, 10, x, s, eta=-1.0), ValueError, "eta"),
        (lambda: vlops.ddim_step(mo, 10, x, vlops.DiffusionSchedule.ddim(num_inference_steps=10)), ValueError,
         "inference timesteps"),
        (lambda: vlops.DiffusionSchedule.ddim(num_inference_steps=0), ValueError, "num_inference_steps"),
        (lambda: vlops.DiffusionSchedule(torch.rand(10), torch.arange(9)), ValueError, "prev_timesteps"),
    ]
    for fn, exc, words in cases:
        with pytest.raises(exc, match=words):
            fn()


def test_backend_selection_errors(monkeypatch):
    x = torch.randn(1, 2, 3)
    s = vlops.DiffusionSchedule.ddpm()
    with pytest.raises(ValueError, match="backend"):
        with vlops.use_backend("fast"):
            pass
    with vlops.use_backend("cuda"):
        with pytest.raises(vlops.BackendUnavailableError, match="cuda"):
            vlops.ddpm_step(x, 5, x, s, seed=0)
    monkeypatch.setenv("VLOPS_BACKEND", "nope")
    with pytest.raises(ValueError, match="VLOPS_BACKEND"):
        vlops.ddpm_step(x, 5, x, s, seed=0)
    monkeypatch.setenv("VLOPS_BACKEND", "reference")
    assert vlops.requested_backend() == "reference"
    with vlops.use_backend("cpu"):
        assert vlops.requested_backend() == "cpu"


def test_python_m_vlops_reports_backends():
    out = subprocess.run([sys.executable, "-m", "vlops"], capture_output=True, text=True, check=True).stdout
    for name in ("reference", "cpu", "triton", "cuda"):
        assert name in out
    assert "torch" in out and "device" in out


# ---------------------------------------------------------------------------------------- op contract


def _op_args(device, dtype=torch.float32, with_noise=True):
    s = vlops.DiffusionSchedule.ddpm()
    ac, pt = s.tensors(torch.device(device))
    B, N = 2, 12
    eps, unc, x = (torch.randn(B, n, device=device, dtype=dtype) for n in (N, N, N))
    noise = torch.randn(B, N, device=device, dtype=dtype) if with_noise else None
    ts = torch.tensor([5, 0], device=device)
    return (eps, unc, x, noise, ts, pt, ac, None, None, 0, 2.0, 0, 0, True, 1.0, 0.0, False, 1.0, 3, True)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("with_noise", [True, False])
def test_opcheck(backend, device, with_noise):
    require_backend(backend, device)
    with vlops.use_backend(backend):
        torch.library.opcheck(diffusion_step_op, _op_args(device, with_noise=with_noise))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    require_backend(backend, device)
    torch._dynamo.reset()
    sched = vlops.DiffusionSchedule.ddim(num_inference_steps=20)
    x, mo = _inputs(2, 4, (8, 8), device=device, doubled=True)
    t = torch.tensor(int(sched.timesteps[3]))

    def f(mo, t, x):
        return vlops.ddim_step(mo, t, x, sched, guidance_scale=5.0, eta=0.5, seed=11, clip_sample=True)

    with vlops.use_backend(backend):
        want = f(mo, t, x)
        got = torch.compile(f, fullgraph=True)(mo, t, x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture_and_no_sync(backend):
    """One step captured in a CUDA graph and replayed (no host sync inside a step)."""
    require_backend(backend, "cuda")
    sched = vlops.DiffusionSchedule.ddim(num_inference_steps=50)
    x, mo = _inputs(2, 4, (64, 64), device="cuda", doubled=True)
    t = torch.tensor([int(sched.timesteps[5])], device="cuda")
    noise = torch.randn_like(x)
    with vlops.use_backend(backend):
        want, _ = vlops.ddim_step(mo, t, x, sched, guidance_scale=7.5, eta=0.3, noise=noise)
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            vlops.ddim_step(mo, t, x, sched, guidance_scale=7.5, eta=0.3, noise=noise)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out, _ = vlops.ddim_step(mo, t, x, sched, guidance_scale=7.5, eta=0.3, noise=noise)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    with vlops.use_backend(backend):
        vlops.ddim_step(mo, int(t), x, sched, guidance_scale=7.5, eta=0.3, noise=noise)  # caches the schedule
        torch.cuda.set_sync_debug_mode("error")
        try:  # neither a device timestep nor an int one, nor the in-kernel noise, syncs with the host
            vlops.ddim_step(mo, t, x, sched, guidance_scale=7.5, eta=0.3, noise=noise)
            vlops.ddim_step(mo, int(t), x, sched, guidance_scale=7.5, eta=0.3, seed=5)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_backends_agree_on_in_kernel_noise():
    sched = vlops.DiffusionSchedule.ddpm()
    x, mo = _inputs(3, 4, (33, 17), device="cuda")
    outs = {}
    for b in ("triton", "cuda"):
        if vlops.unavailable_reason(b, "cuda"):
            continue
        with vlops.use_backend(b):
            outs[b] = vlops.ddpm_step(mo, 700, x, sched, seed=42)[0]
    with vlops.use_backend("cpu"):
        outs["cpu"] = vlops.ddpm_step(mo.cpu(), 700, x.cpu(), sched, seed=42)[0]
    for b, o in outs.items():
        assert rel_err(o, outs["cpu"]) < 1e-5, b


def test_env_backend_subprocess():
    """VLOPS_BACKEND reaches a fresh process."""
    env = dict(os.environ, VLOPS_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", "import vlops; print(vlops.requested_backend())"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "reference"


@pytest.mark.parametrize("mode", ["ddpm", "ddim"])
@pytest.mark.parametrize("shape", [(2, 4, 256, 256), (3, 3, 257, 255)])
def test_large_cpu_step_streaming_path(mode, shape):
    """Outputs of several MiB take the cpu kernel's streaming-store path (fused in-kernel noise too):
    same answer as the reference, every element written."""
    require_backend("cpu", "cpu")
    sched = vlops.DiffusionSchedule.ddpm() if mode == "ddpm" else vlops.DiffusionSchedule.ddim(num_inference_steps=50)
    t = 500 if mode == "ddpm" else int(sched.timesteps[10])
    B = shape[0]
    x = torch.randn(shape)
    mo = torch.randn((2 * B,) + shape[1:])
    step = vlops.ddpm_step if mode == "ddpm" else vlops.ddim_step
    kw = dict(guidance_scale=7.5, clip_sample=True, seed=77)
    if mode == "ddim":
        kw["eta"] = 0.6
    with vlops.use_backend("cpu"):
        prev, x0 = step(mo, t, x, sched, **kw)
    with vlops.use_backend("reference"):
        p_ref, x0_ref = step(mo, t, x, sched, **kw)
    assert torch.isfinite(prev).all() and torch.isfinite(x0).all()
    assert rel_err(prev, p_ref) < 1e-5 and rel_err(x0, x0_ref) < 1e-5
