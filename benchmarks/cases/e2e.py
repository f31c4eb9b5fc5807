"""End-to-end cases: a real model of each library, unpatched (eager) against the same model after
``vlops.patch`` (fused), with the same weights.

=======================  ========  ==================================================================================
case                     baseline  what one timed call is
=======================  ========  ==================================================================================
open_clip_b32_train      open_clip one training step of open_clip's ViT-B-32 (random weights): both towers, ClipLoss,
                                   backward, AdamW step. Patched: the image stem and the loss.
hf_clip_b32_train        hf        the same with transformers' CLIPModel (ViT-B/32 sizes), ``return_loss=True``.
                                   Patched: the vision stem (embeddings + pre_layrnorm) and the loss.
timm_vit_s16_train       timm      one training step of timm's vit_small_patch16_224 (classification, cross-entropy,
                                   AdamW). Patched: patch_embed + _pos_embed + norm_pre.
diffusers_ddim20_cfg     diffusers a 20-step DDIM sampling loop with classifier-free guidance (scale 7.5) and a tiny
                                   UNet2DConditionModel, written as diffusers' pipelines write it. Patched: the
                                   scheduler's step (the pipeline's guidance lines stay as they are).
=======================  ========  ==================================================================================

The fused parts are a small share of these models' time (the transformer blocks and the UNet are not vlops
ops), so the ratios show what a user gets from one ``vlops.patch`` call, not the ops' own speed-ups (those
are the other cases). The training cases report pass "forward+backward" (an optimiser step included); the
sampling loop "forward". ``check`` compares the first call's loss (training) or samples (sampling).

Sizes: ``e2e`` (the default: batch 4 for the training steps, a few seconds each on a 2-core CPU; 4 samples of
4 x 32 x 32 for the loop). Quick mode swaps the ViT-B models for tiny ones of the same code (2 layers, width 64, 64 x 64 images;
cases ``*_tiny_train``), batch 4, and 2 samples and 4 steps for the loop (``diffusers_ddim4_cfg``). Every model is built with random weights (nothing
is downloaded); a library that is not installed skips its case.
"""
from __future__ import annotations

import copy
import importlib.util

import torch

from . import Case

OP = "e2e"
STEPS = 20
QUICK_STEPS = 4
GUIDANCE = 7.5


def _have(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _relerr(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _pair(model, extra=None):
    """(eager model, patched deepcopy) with the same weights; ``extra`` (a loss module) is copied and patched
    too. Returns (eager, fused, eager_extra, fused_extra, report text)."""
    import vlops

    fused = copy.deepcopy(model)
    report = [str(vlops.patch(fused))]
    fused_extra = None
    if extra is not None:
        fused_extra = copy.deepcopy(extra)
        report.append(str(vlops.patch(fused_extra)))
    lines = [line.strip() for r in report for line in r.split("\n")[1:]]
    return model, fused, extra, fused_extra, "; ".join(lines)


def _train_case(name, label, size, B, device, build, step_fn, make):
    """A training-step case: ``build()`` -> (model, loss module or None); ``step_fn(model, loss, opt, inp)`` ->
    the loss (before the optimiser step)."""
    model, loss = build()
    model = model.to(device).train()
    em, fm, el, fl, what = _pair(model, loss)
    opts = {False: torch.optim.AdamW(em.parameters(), lr=1e-5), True: torch.optim.AdamW(fm.parameters(), lr=1e-5)}

    def call(fused):
        m, lo, opt = (fm, fl, opts[True]) if fused else (em, el, opts[False])

        def run(inp):
            opt.zero_grad(set_to_none=True)
            value = step_fn(m, lo, inp)
            value.backward()
            opt.step()
            return value.detach()
        return run

    def reset(inp):
        for opt in opts.values():
            opt.zero_grad(set_to_none=True)

    return Case(name=name, op=OP, dtype=torch.float32, size=size, pass_="forward+backward", make=make,
                eager=call(False), fused=call(True), floor_bytes=0.0, eager_label=label, check=_relerr,
                reset=reset, backends=("cpu", "triton"), note=f"patched: {what}")


def _images(B, device, S=224, L=77):
    def make():
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
        return {"images": torch.randn(B, 3, S, S, generator=g).to(device),
                "tokens": torch.randint(1, 1000, (B, L), generator=g).to(device),
                "labels": torch.randint(0, 1000, (B,), generator=g).to(device)}
    return make


def _open_clip(B, device, quick):
    import open_clip
    from open_clip.loss import ClipLoss

    def build():
        torch.manual_seed(0)
        if quick:
            return open_clip.CLIP(embed_dim=64, vision_cfg=dict(image_size=S, patch_size=16, width=64, layers=2,
                                                                head_width=32),
                                  text_cfg=dict(context_length=L, vocab_size=1000, width=64, heads=2, layers=2)), \
                ClipLoss()
        return open_clip.create_model("ViT-B-32", pretrained=None), ClipLoss()

    def step(m, lo, inp):
        img, txt, scale = m(inp["images"], inp["tokens"])
        return lo(img, txt, scale)

    S, L = (64, 16) if quick else (224, 77)
    return _train_case("open_clip_tiny_train" if quick else "open_clip_b32_train", "open_clip", f"{B}x3x{S}x{S}",
                       B, device, build, step, _images(B, device, S, L))


def _hf_clip(B, device, quick):
    import transformers

    S, L = (64, 16) if quick else (224, 77)

    def build():
        torch.manual_seed(0)
        if quick:
            small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
            cfg = transformers.CLIPConfig(text_config=dict(max_position_embeddings=L, **small),
                                          vision_config=dict(patch_size=16, image_size=S, **small), projection_dim=64)
        else:
            cfg = transformers.CLIPConfig(text_config=dict(max_position_embeddings=L),
                                          vision_config=dict(patch_size=32, image_size=S))
        return transformers.CLIPModel(cfg), None

    def step(m, lo, inp):
        return m(input_ids=inp["tokens"] % 49408, pixel_values=inp["images"], return_loss=True).loss

    return _train_case("hf_clip_tiny_train" if quick else "hf_clip_b32_train", "hf", f"{B}x3x{S}x{S}", B, device,
                       build, step, _images(B, device, S, L))


def _timm(B, device, quick):
    import timm

    S = 64 if quick else 224

    def build():
        torch.manual_seed(0)
        if quick:
            return timm.models.vision_transformer.VisionTransformer(img_size=S, patch_size=16, embed_dim=64, depth=2,
                                                                    num_heads=2), None
        return timm.create_model("vit_small_patch16_224", pretrained=False), None

    def step(m, lo, inp):
        return torch.nn.functional.cross_entropy(m(inp["images"]), inp["labels"])

    return _train_case("timm_vit_tiny_train" if quick else "timm_vit_s16_train", "timm", f"{B}x3x{S}x{S}", B, device,
                       build, step, _images(B, device, S))


def _ddim_loop(B, device, quick):
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).to(device).eval()
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False,
                                    set_alpha_to_one=False, steps_offset=1)
    fused_sched = copy.deepcopy(sched)
    import vlops

    what = "; ".join(line.strip() for line in str(vlops.patch(fused_sched)).split("\n")[1:])

    def make():
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
        return {"latents": torch.randn(B, 4, 32, 32, generator=g).to(device),
                "cond": torch.randn(B, 8, 32, generator=g).to(device), "uncond": torch.zeros(B, 8, 32).to(device)}

    steps = QUICK_STEPS if quick else STEPS

    def loop(scheduler):
        def run(inp):  # diffusers' pipeline loop (StableDiffusionPipeline's lines, with a DDIM scheduler)
            scheduler.set_timesteps(steps, device=device)
            latents = inp["latents"] * scheduler.init_noise_sigma
            embeds = torch.cat([inp["uncond"], inp["cond"]])
            with torch.no_grad():
                for t in scheduler.timesteps:
                    latent_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                    noise_pred = unet(latent_in, t, encoder_hidden_states=embeds, return_dict=False)[0]
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + GUIDANCE * (noise_pred_text - noise_pred_uncond)
                    latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            return latents
        return run

    return Case(name=f"diffusers_ddim{steps}_cfg", op=OP, dtype=torch.float32, size=f"{B}x4x32x32", pass_="forward",
                make=make, eager=loop(sched), fused=loop(fused_sched), floor_bytes=0.0, eager_label="diffusers",
                check=_relerr, backends=("cpu", "triton"), note=f"{steps} steps, tiny UNet; patched: {what}")


_CASES = {  # name: (library, builder, batch, quick batch)
    "open_clip_b32_train": ("open_clip", _open_clip, 4, 4),
    "hf_clip_b32_train": ("transformers", _hf_clip, 4, 4),
    "timm_vit_s16_train": ("timm", _timm, 4, 4),
    "diffusers_ddim20_cfg": ("diffusers", _ddim_loop, 4, 2),
}


def cases(device: torch.device, quick: bool, sizes, dtypes):
    if sizes and "e2e" not in sizes:
        return
    if dtypes and torch.float32 not in dtypes:
        return
    for lib, build, B, Bq in _CASES.values():
        if _have(lib):
            yield build(Bq if quick else B, device, quick)
