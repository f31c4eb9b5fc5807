"""vlops.patch / vlops.unpatch on random-weight models of timm, open_clip, Hugging Face, diffusers and ViLBERT code:
the patched model gives the outputs and parameter gradients of the original, keeps its weights and state_dict,
survives deepcopy and torch.compile, and unpatch restores the original code exactly."""
from __future__ import annotations

import copy

import pytest
import torch

import vlops
from conftest import rel_err
from vlops.integrations.patch import SUPPORTED


def _randomize(model):
    """Random values in every parameter (zeros from the libraries' inits would hide errors)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    return model


def _grads(model, out, weights):
    model.zero_grad(set_to_none=True)
    (out * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_grads(got: dict, ref: dict, tol: float) -> None:
    """Every parameter's gradient within ``tol`` of the reference, relative to its own norm, or to 1% of the
    largest gradient norm for gradients that are zero up to rounding (attention key biases, whose exact gradient
    is zero: the softmax ignores a shift of every score; keys of a saturated softmax)."""
    assert got.keys() == ref.keys() and ref
    floor = 1e-2 * max(float(r.norm()) for r in ref.values())
    for n, r in ref.items():
        assert float((got[n] - r).norm()) <= tol * max(float(r.norm()), floor), n


def _check_swap(model, run, expect, *, tol=1e-5, gtol=1e-4):
    """Patch ``model``: the report names ``expect``; outputs and every parameter gradient agree with the unpatched
    model; the parameters are the same objects; unpatch restores the original outputs exactly."""
    model.train(False)
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    ref = run(model)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=ref.dtype)
    ref_g = _grads(model, ref, w)
    report = vlops.patch(model)
    whats = " | ".join(what for _, what in report.replaced)
    for e in expect:
        assert e in whats, (e, str(report))
    assert len(report) == len(expect)
    out = run(model)
    assert rel_err(out, ref) <= tol
    got_g = _grads(model, out, w)
    _check_grads(got_g, ref_g, gtol)
    assert all(p is params[n] for n, p in model.named_parameters())  # weights kept, not copied
    assert list(model.state_dict()) == keys
    twin = copy.deepcopy(model)  # the copy is patched and runs on its own weights
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    assert rel_err(run(model), out) == 0.0
    assert rel_err(run(twin), out) > 1e-3
    back = vlops.unpatch(model)
    assert back.action == "restored" and len(back) == len(expect)
    assert torch.equal(run(model), ref)
    assert not any(k.startswith("_vlops") for m in model.modules() for k in m.__dict__)
    with pytest.raises(ValueError, match="nothing in this .* was patched"):
        vlops.unpatch(model)
    return report


def _timm_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    return _randomize(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                        num_classes=5, **kw))


def test_timm_vit():
    pytest.importorskip("timm")
    x = torch.randn(3, 3, 32, 32)
    _check_swap(_timm_vit(reg_tokens=1, pre_norm=True), lambda m: m(x), ["timm VisionTransformer"])


def test_timm_vit_inside_a_bigger_model_and_idempotent():
    pytest.importorskip("timm")

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _timm_vit(), _timm_vit(class_token=False, global_pool="avg")

        def forward(self, x):
            return self.a(x) + self.b(x)

    model = Two()
    x = torch.randn(2, 3, 32, 32)
    report = _check_swap(model, lambda m: m(x), ["timm VisionTransformer"] * 2)
    assert [p for p, _ in report.replaced] == ["a", "b"]
    vlops.patch(model)
    again = vlops.patch(model)
    assert len(again) == 0 and all("already patched" in why for _, why in again.kept)


def _open_clip_model():
    open_clip = pytest.importorskip("open_clip")
    model = open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16),
                           text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1))
    return _randomize(model)


def test_open_clip_model():
    model = _open_clip_model()
    x, t = torch.randn(3, 3, 32, 32), torch.randint(1, 50, (3, 8))

    def run(m):
        img, txt, _ = m(x, t)
        return torch.cat([img, txt])

    report = _check_swap(model, run, ["open_clip VisionTransformer"])
    assert report.replaced[0][0] == "visual"


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_open_clip_losses(kind):
    open_clip = pytest.importorskip("open_clip")
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-3.0)
    from open_clip.loss import ClipLoss, SigLipLoss

    loss = ClipLoss() if kind == "clip" else SigLipLoss()

    def value(fn):
        i, t, s, b = (v.clone().requires_grad_() for v in (img, txt, scale, bias))
        out = fn(i, t, s, b) if kind == "siglip" else fn(i, t, s)
        out.backward()
        return out.detach(), [v.grad for v in (i, t, s) + ((b,) if kind == "siglip" else ())]

    ref, ref_g = value(loss)
    report = vlops.patch(loss)
    assert len(report) == 1 and f"vlops.nn.{'ClipLoss' if kind == 'clip' else 'SigLipLoss'}" in str(report)
    got, got_g = value(loss)
    assert rel_err(got, ref) <= 1e-6
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(got_g, ref_g))
    out = loss(img, txt, scale, bias, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    vlops.unpatch(loss)
    assert "forward" not in loss.__dict__ and torch.equal(value(loss)[0], ref)


def test_open_clip_coca_loss_is_kept():
    open_clip = pytest.importorskip("open_clip")

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loss = open_clip.loss.CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0)
            self.vit = _timm_vit()

    report = vlops.patch(Holder())
    assert [p for p, _ in report.replaced] == ["vit"]
    assert report.kept[0][0] == "loss" and "no fused version" in report.kept[0][1]


def _hf_pair(kind):
    transformers = pytest.importorskip("transformers")
    Cfg, Model = ((transformers.CLIPConfig, transformers.CLIPModel) if kind == "clip"
                  else (transformers.SiglipConfig, transformers.SiglipModel))
    tc = dict(vocab_size=60, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
              max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    vc = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
              num_attention_heads=2)
    return _randomize(Model(Cfg(text_config=tc, vision_config=vc)))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_models(kind):
    # float64: the logit_scale gradient is a sum of terms that nearly cancel, so float32 rounding dominates it.
    # The bounds are float32's rounding (2**-24 = 6e-8): vlops' losses carry logit_scale in float32 and return a
    # float32 loss (their documented contract), everything else is float64.
    model = _hf_pair(kind).double()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)  # exp: 7.4; the random value would saturate the loss
    kw = dict(input_ids=torch.randint(2, 60, (4, 8)), pixel_values=torch.randn(4, 3, 32, 32, dtype=torch.float64),
              return_loss=True)

    def run(m):
        out = m(**kw)
        return torch.cat([out.loss.reshape(1), out.image_embeds.flatten(), out.text_embeds.flatten()])

    stem = "CLIP vision: embeddings + pre_layrnorm" if kind == "clip" else "SigLIP vision: embeddings"
    report = _check_swap(model, run, [f"{'CLIPModel' if kind == 'clip' else 'SiglipModel'} return_loss", stem],
                         tol=2e-7, gtol=1e-6)
    assert [p for p, _ in report.replaced] == ["", "vision_model"]


def test_hf_vision_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=40,
                                        num_hidden_layers=1, num_attention_heads=2)
    model = _randomize(transformers.CLIPVisionModel(cfg))
    x = torch.randn(2, 3, 32, 32)
    _check_swap(model, lambda m: m(pixel_values=x).last_hidden_state, ["CLIP vision"])


def test_vilbert_co_attention():
    from vlops.reference.coattention import ViLBERTConfig, ViLBERTConnectionLayer, extended_attention_mask

    cfg = ViLBERTConfig(hidden_size=32, v_hidden_size=24, bi_hidden_size=32, bi_num_attention_heads=4,
                        intermediate_size=40, v_intermediate_size=30, attention_probs_dropout_prob=0.0,
                        v_attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, v_hidden_dropout_prob=0.0)

    class TwoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.ModuleList([ViLBERTConnectionLayer(cfg) for _ in range(2)])

        def forward(self, v, vm, t, tm):
            for layer in self.c:
                v, t, _ = layer(v, vm, t, tm)
            return torch.cat([v.flatten(), t.flatten()])

    model = _randomize(TwoBlocks())
    v, t = torch.randn(3, 5, 24), torch.randn(3, 7, 32)
    t_keep = torch.arange(7)[None] < torch.tensor([[7], [4], [1]])
    vm = extended_attention_mask(torch.ones(3, 5, dtype=torch.bool))
    tm = extended_attention_mask(t_keep)
    report = _check_swap(model, lambda m: m(v, vm, t, tm), ["ViLBERT BertBiAttention"] * 2)
    assert [p for p, _ in report.replaced] == ["c.0.biattention", "c.1.biattention"]


def _diffusers():
    return pytest.importorskip("diffusers")


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler"])
def test_diffusers_scheduler_in_place(cls):
    diffusers = _diffusers()
    sched = getattr(diffusers, cls)(num_train_timesteps=100)
    sched.set_timesteps(10)
    twin = copy.deepcopy(sched)
    report = vlops.patch(sched)
    assert len(report) == 1 and "step -> vlops" in str(report)
    assert isinstance(sched, getattr(diffusers, cls)) and type(sched).__name__ == f"Fused{cls}"
    assert torch.equal(sched.timesteps, twin.timesteps)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    t = sched.timesteps[3]
    kw = {} if cls == "DDIMScheduler" else dict(generator=torch.Generator().manual_seed(1))
    got = sched.step(eps, t, x, **kw).pred_original_sample
    kw = {} if cls == "DDIMScheduler" else dict(generator=torch.Generator().manual_seed(1))
    want = twin.step(eps, t, x, **kw).pred_original_sample
    assert rel_err(got, want) <= 1e-5
    vlops.unpatch(sched)
    assert type(sched) is getattr(diffusers, cls) and "_vlops_schedule_obj" not in sched.__dict__


def test_diffusers_pipeline_ddim_loop():
    diffusers = _diffusers()
    torch.manual_seed(0)
    unet = _randomize(diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                            block_out_channels=(8, 16), norm_num_groups=4,
                                            down_block_types=("DownBlock2D", "DownBlock2D"),
                                            up_block_types=("UpBlock2D", "UpBlock2D")))
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(num_train_timesteps=100))
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(3), eta=0.0,
                    output_type="np").images

    want = run()
    scheduler = pipe.scheduler
    report = vlops.patch(pipe)
    assert [p for p, _ in report.replaced] == ["scheduler"] and pipe.scheduler is scheduler
    got = run()
    assert rel_err(torch.as_tensor(got), torch.as_tensor(want)) <= 1e-5
    vlops.unpatch(pipe)
    assert type(pipe.scheduler) is diffusers.DDIMScheduler


def test_diffusers_pipeline_other_scheduler_is_kept():
    diffusers = _diffusers()

    class Pipe:
        scheduler = diffusers.EulerDiscreteScheduler()

    report = vlops.patch(Pipe())
    assert len(report) == 0 and "no fused version" in report.kept[0][1]


def test_unsupported_objects_name_what_is_supported():
    for obj in (torch.nn.Linear(2, 2), object(), "model", torch.randn(2)):
        with pytest.raises(TypeError, match="vlops.patch: nothing in") as e:
            vlops.patch(obj)
        assert all(s in str(e.value) for s in SUPPORTED)
    with pytest.raises(ValueError, match="was patched"):
        vlops.unpatch(torch.nn.Linear(2, 2))


def test_patched_model_under_torch_compile():
    pytest.importorskip("timm")
    vit = _timm_vit(pre_norm=True).train(False)
    x = torch.randn(2, 3, 32, 32)
    w = torch.randn(2, 5)
    ref = vit(x)
    ref_g = _grads(vit, ref, w)
    vlops.patch(vit)
    compiled = torch.compile(vit, fullgraph=True)
    out = compiled(x)
    got_g = _grads(vit, out, w)
    assert rel_err(out, ref) <= 1e-5
    _check_grads(got_g, ref_g, 1e-4)
