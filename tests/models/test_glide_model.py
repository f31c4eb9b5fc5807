"""The GLIDE-style model: denoiser shapes and gradients, caption padding, fused vs eager sampling (the fused
step is the model's only fused op), one fused step against diffusers' schedulers plus the guidance lines, bad
arguments, training equality of fused and eager models, and the example's quick setting."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from vlops.models import synthetic
from vlops.models.glide import GLIDE, read_colour_and_place

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(image_size=8, model_channels=16, channel_mult=(1, 2), attention_resolutions=(4,), num_heads=2,
            text_width=32, text_layers=1, text_heads=2, beta_schedule="linear")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm()).item()


def tiny_model(fused=True, dtype=torch.float32, seed=0, **kw) -> GLIDE:
    """A tiny GLIDE whose zero-initialised output layers are perturbed, so that every layer matters."""
    torch.manual_seed(seed)
    model = GLIDE(**{**TINY, **kw}, fused=fused)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.to(dtype)


def captions(n, seed=0, image_size=8):
    return synthetic.make_pairs(n, torch.Generator().manual_seed(seed), image_size=image_size, noise=0.0)


def test_denoiser_shape_gradients_and_inputs_untouched():
    model = tiny_model()
    batch = captions(3)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 500, 999])
    x0, tok0, img0 = x.clone(), batch.tokens.clone(), batch.images.clone()
    out = model(x, t, batch.tokens)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    # the caption matters: another caption changes the prediction
    other = model(x, t, synthetic.tokenizer(["a blue square in the top right"] * 3))
    assert rel_err(other, out) > 1e-3
    loss = model.loss(batch.images, batch.tokens, torch.Generator().manual_seed(2))
    loss.backward()
    assert torch.equal(x, x0) and torch.equal(batch.tokens, tok0) and torch.equal(batch.images, img0)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_caption_padding_is_masked():
    """PAD positions are masked keys everywhere (text layers and UNet attention): changing what they hold
    (their position embedding) changes nothing; changing a word's does."""
    model = tiny_model(dtype=torch.float64)
    tokens = synthetic.tokenizer(["a red circle in the top left", "a photo of a green square in the bottom right"])
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x, 300, tokens)
        first_pad = int((tokens[0] != synthetic.PAD).sum())
        last_pad = int((tokens[1] != synthetic.PAD).sum())
        pe = model.text.positional_embedding
        g = torch.Generator().manual_seed(4)
        pe[max(first_pad, last_pad):] += torch.randn(pe[max(first_pad, last_pad):].shape, generator=g,
                                                     dtype=pe.dtype)
        assert rel_err(model(x, 300, tokens), ref) < 1e-12
        pe[1] += torch.randn(pe[1].shape, generator=g, dtype=pe.dtype)  # a word position
        assert rel_err(model(x, 300, tokens), ref) > 1e-4


def test_fused_and_eager_models_share_parameters():
    fused, eager = tiny_model(fused=True), GLIDE(**TINY, fused=False)
    assert list(fused.state_dict()) == list(eager.state_dict())
    eager.load_state_dict(fused.state_dict(), strict=True)
    fused.load_state_dict(eager.state_dict(), strict=True)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0)])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_fused_sampling_equals_eager(dtype, tol, sampler, eta, beta_schedule):
    """Fused and eager sampling from the same weights, start and per-step noise (4 guided steps, clipping on;
    the cosine schedule's first step divides by sqrt(alpha_bar_999) ~ 5e-5)."""
    fused = tiny_model(fused=True, dtype=dtype, beta_schedule=beta_schedule)
    eager = GLIDE(**{**TINY, "beta_schedule": beta_schedule}, fused=False).to(dtype)
    eager.load_state_dict(fused.state_dict())
    steps, B = 4, 3
    tokens = captions(B).tokens
    g = torch.Generator().manual_seed(4)
    x_T = torch.randn(B, 3, 8, 8, generator=g, dtype=dtype)
    noise = torch.randn(steps, B, 3, 8, 8, generator=g, dtype=dtype)
    kw = dict(guidance_scale=3.0, steps=steps, sampler=sampler, eta=eta, x_T=x_T, noise=noise)
    a, b = fused.sample(tokens, **kw), eager.sample(tokens, **kw)
    assert a.dtype == dtype and a.shape == (B, 3, 8, 8)
    assert rel_err(a, x_T) > 0.1  # the samples moved
    err = rel_err(a, b)
    assert err <= tol, f"fused vs eager {sampler} eta={eta} {dtype}: {err:.2e}"
    # the same generator seed gives the same noise on both paths
    a2 = fused.sample(tokens, guidance_scale=3.0, steps=steps, sampler=sampler, eta=eta,
                      generator=torch.Generator().manual_seed(9))
    b2 = eager.sample(tokens, guidance_scale=3.0, steps=steps, sampler=sampler, eta=eta,
                      generator=torch.Generator().manual_seed(9))
    assert rel_err(a2, b2) <= tol


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_fused_flag_switches_only_the_step(monkeypatch, sampler):
    """fused=True steps with vlops.ddim_step / ddpm_step (never the eager reference), fused=False with the
    reference step (never the fused one), one call per step."""
    import vlops.diffusion
    import vlops.reference.diffusion

    calls = {"fused": 0, "eager": 0}

    def counting(fn, key):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    name = f"{sampler}_step"
    monkeypatch.setattr(vlops.diffusion, name, counting(getattr(vlops.diffusion, name), "fused"))
    monkeypatch.setattr(vlops.reference.diffusion, "diffusion_step",
                        counting(vlops.reference.diffusion.diffusion_step, "eager"))
    tokens = captions(2).tokens
    tiny_model(fused=True).sample(tokens, steps=3, sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert calls == {"fused": 3, "eager": 0}
    calls.update(fused=0, eager=0)
    tiny_model(fused=False).sample(tokens, steps=3, sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert calls == {"fused": 0, "eager": 3}


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_fused_step_matches_diffusers(sampler, beta_schedule):
    """One step of the fused path == the pipeline's guidance lines + diffusers' scheduler step on the
    same schedule (trailing spacing, clipping; DDIM re-derives epsilon from the clipped x0)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    model = tiny_model(fused=True, beta_schedule=beta_schedule)
    steps, B, s = 10, 2, 4.0
    schedule = model.sampling_schedule(sampler, steps)
    common = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule=beta_schedule,
                  timestep_spacing="trailing", clip_sample=True, clip_sample_range=1.0)
    sched = DDIMScheduler(**common, set_alpha_to_one=True) if sampler == "ddim" else DDPMScheduler(**common)
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == schedule.timesteps.tolist()
    tokens = captions(B).tokens
    g = torch.Generator().manual_seed(5)
    for i in (0, 4, steps - 1):
        t = int(sched.timesteps[i])
        x = torch.randn(B, 3, 8, 8, generator=g)
        with torch.no_grad():
            out = model.guided_eps(x, t, tokens, s)
        cond, uncond = out.chunk(2)  # GLIDE's order: conditional half first
        guided = uncond + s * (cond - uncond)
        noise = torch.randn(B, 3, 8, 8, generator=torch.Generator().manual_seed(6 + i))
        if sampler == "ddim":
            want = sched.step(guided, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
        else:
            want = sched.step(guided, t, x, generator=torch.Generator().manual_seed(6 + i)).prev_sample
        got = model.denoise_step(out, t, x, schedule, sampler=sampler, guidance_scale=s, noise=noise)
        assert rel_err(got, want) < 1e-5, (t, rel_err(got, want))


def test_bad_arguments_name_the_argument():
    model = tiny_model()
    tokens = captions(2).tokens
    cases = [
        (dict(guidance_scale=-1.0), ValueError, "guidance_scale"),
        (dict(guidance_scale="3"), TypeError, "guidance_scale"),
        (dict(steps=0), ValueError, "steps"),
        (dict(steps=2.5), ValueError, "steps"),
        (dict(steps=5000), ValueError, "steps"),
        (dict(sampler="euler"), ValueError, "sampler"),
        (dict(eta=1.5), ValueError, "eta"),
        (dict(x_T=torch.randn(2, 3, 16, 16)), ValueError, "x_T"),
        (dict(sampler="ddpm", steps=3, noise=torch.randn(2, 2, 3, 8, 8)), ValueError, "noise"),
        (dict(generator=0), TypeError, "generator"),
    ]
    for kw, exc, name in cases:
        with pytest.raises(exc, match=name):
            model.sample(tokens, **{"steps": 2, **kw})
    for bad, exc in [(tokens.float(), TypeError), (tokens[:, :5], ValueError), (tokens[0], ValueError),
                     (tokens + 1000, ValueError), (torch.zeros_like(tokens), ValueError), ([[1, 2]], TypeError)]:
        with pytest.raises(exc, match="tokens"):
            model.sample(bad, steps=2)
        with pytest.raises(exc, match="tokens"):
            model.loss(torch.zeros(2, 3, 8, 8), bad)
    with pytest.raises(ValueError, match="images"):
        model.loss(torch.zeros(2, 3, 16, 16), tokens)
    with pytest.raises(ValueError, match="images"):
        model.loss(torch.zeros(3, 3, 8, 8), tokens)
    with pytest.raises(TypeError, match="images"):
        model.loss(torch.zeros(2, 3, 8, 8, dtype=torch.int64), tokens)
    with pytest.raises(ValueError, match="x"):
        model(torch.zeros(2, 1, 8, 8), 3, tokens)
    with pytest.raises(ValueError, match="timesteps"):
        model(torch.zeros(2, 3, 8, 8), 1000, tokens)
    for kw, exc, name in [(dict(image_size=6, channel_mult=(1, 2, 2)), ValueError, "image_size"),
                          (dict(attention_resolutions=(5,)), ValueError, "attention_resolutions"),
                          (dict(p_uncond=1.0), ValueError, "p_uncond"),
                          (dict(num_heads=3), ValueError, "num_heads"),
                          (dict(model_channels=0), ValueError, "model_channels"),
                          (dict(beta_schedule="quadratic"), ValueError, "beta_schedule"),
                          (dict(fused="yes"), TypeError, "fused")]:
        with pytest.raises(exc, match=name):
            GLIDE(**{**TINY, **kw})


def test_training_converges_and_fused_flag_does_not_change_it():
    """30 steps from the same seed with fused=True and fused=False. Training has no fused op (only the
    sampler step is fused), so the two runs execute the same code and the loss curves must be identical;
    and the loss on a fixed held-out draw must fall well below its initial value (1.0: zero output layer)."""
    held_out = captions(32, seed=11)

    def held_out_loss(model):
        with torch.no_grad():
            return model.loss(held_out.images, held_out.tokens, torch.Generator().manual_seed(12)).item()

    curves, before, after = [], [], []
    for fused in (True, False):
        torch.manual_seed(0)
        model = GLIDE(**TINY, fused=fused)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(1)
        before.append(held_out_loss(model))
        losses = []
        for _ in range(30):
            batch = synthetic.make_pairs(16, g, image_size=8, noise=0.0)
            loss = model.loss(batch.images, batch.tokens, g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
        after.append(held_out_loss(model))
    assert curves[0] == curves[1], max(abs(a - b) / abs(b) for a, b in zip(*curves))
    assert after[0] == after[1]
    assert 0.8 < before[0] < 1.2
    assert after[0] < 0.5 * before[0], (before, after)


def test_read_colour_and_place_on_rendered_images():
    g = torch.Generator().manual_seed(7)
    for size in (16, 32):
        batch = synthetic.make_pairs(200, g, image_size=size, noise=0.1)
        colour, place = read_colour_and_place(batch.images)
        assert (colour == batch.colour).float().mean() >= 0.98
        assert (place == batch.place).float().mean() >= 0.98
    # the place is read from the pixels: turned images read as the opposite quadrant
    flipped = torch.flip(batch.images, dims=[2, 3])  # top left <-> bottom right, top right <-> bottom left
    assert (read_colour_and_place(flipped)[1] == batch.place).float().mean() <= 0.02


def test_example_quick(tmp_path):
    proc = subprocess.run([sys.executable, "examples/train_glide.py", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^step \d+ loss [0-9.]+$", out, re.M)
    colour = float(re.search(r"^colour accuracy: ([0-9.]+) \(chance 0.25\)$", out, re.M).group(1))
    place = float(re.search(r"^place accuracy: ([0-9.]+) \(chance 0.25\)$", out, re.M).group(1))
    assert colour >= 0.6, out  # measured 0.94 (chance 0.25)
    assert place >= 0.5, out  # measured 0.97 (other seeds 0.88-1.0)
    for name in ("glide_samples.png", "glide_loss.png"):
        assert (tmp_path / name).stat().st_size > 1000
