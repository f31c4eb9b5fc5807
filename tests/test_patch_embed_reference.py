"""The patch-stem reference (vlops.reference.patch_embed) against its anchors: timm VisionTransformer
(class / register tokens, no_embed_class, PatchEmbed norm, norm_pre, conv bias, dynamic_img_pad and
dynamic_img_size), open_clip VisionTransformer and Hugging Face CLIP / SigLIP vision embeddings, in float32
and float64, at real ViT-B/16 and ViT-L/14 stem shapes and odd small ones; strides, 16-bit inputs, bad
input, and resample_pos_embed against timm's resample_abs_pos_embed."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

from vlops.reference import patch_embed as ref

from conftest import rel_err

timm = pytest.importorskip("timm")
from timm.layers import resample_abs_pos_embed  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

F32_TOL, F64_TOL = 1e-5, 1e-12


def _randomize(model: nn.Module) -> nn.Module:
    """Fresh random values in every parameter (the modules' own inits leave class tokens near zero and
    LayerNorms at identity, which would hide mistakes)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim == 1 else 0.2))
    return model.eval()


def _timm_stem(vit, x):
    return vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))


def _check_both(model, stem, extract, x, **extract_kw):
    """The reference equals the anchor stem in float32 (<= 1e-5) and, after casting the model and the
    images to float64, in float64 (<= 1e-12)."""
    with torch.no_grad():
        want = stem(model, x)
        got = ref.patch_embed(x, **extract(model, **extract_kw))
        assert got.shape == want.shape and got.dtype == x.dtype
        assert rel_err(got, want) <= F32_TOL, rel_err(got, want)
        model = model.double()
        x64 = x.double()
        want = stem(model, x64)
        got = ref.patch_embed(x64, **extract(model, **extract_kw))
        assert got.dtype == torch.float64
        assert rel_err(got, want) <= F64_TOL, rel_err(got, want)
    return got


def _small_vit(img=(32, 48), patch=8, dim=64, in_chans=3, **kw):
    return _randomize(VisionTransformer(img_size=img, patch_size=patch, in_chans=in_chans, embed_dim=dim, depth=1,
                                        num_heads=4, num_classes=0, **kw))


# ------------------------------------------------------------------------------------------------ timm


@pytest.mark.parametrize("name,img,batch", [
    ("vit_base_patch16_224", 224, 2),
    ("vit_base_patch16_224", 336, 1),
    ("vit_large_patch14_clip_224", 224, 1),  # CLIP layout: pre_norm, no conv bias
    ("vit_large_patch14_clip_224", 336, 1),  # 24 x 24 patches
])
def test_timm_real_shapes(name, img, batch):
    vit = _randomize(timm.create_model(name, pretrained=False, depth=1, img_size=img))
    out = _check_both(vit, _timm_stem, ref.from_timm, torch.randn(batch, 3, img, img))
    P = vit.patch_embed.patch_size[0]
    assert out.shape == (batch, 1 + (img // P) ** 2, vit.embed_dim)


VARIANTS = {
    "plain": {},
    "pre_norm": dict(pre_norm=True),  # norm_pre, and timm then drops the conv bias
    "patch_norm": dict(embed_norm_layer=nn.LayerNorm),
    "patch_norm+pre_norm": dict(embed_norm_layer="layernorm", pre_norm=True),
}


@pytest.mark.parametrize("class_token,reg_tokens,no_embed_class,variant",
                         list(itertools.product([True, False], [0, 4], [False, True], VARIANTS)))
def test_timm_variants(class_token, reg_tokens, no_embed_class, variant):
    kw = dict(VARIANTS[variant], class_token=class_token, reg_tokens=reg_tokens, no_embed_class=no_embed_class)
    if not class_token:
        kw["global_pool"] = "avg"
    vit = _small_vit(**kw)
    n_prefix = int(class_token) + reg_tokens
    assert vit.num_prefix_tokens == n_prefix
    out = _check_both(vit, _timm_stem, ref.from_timm, torch.randn(2, 3, 32, 48))
    assert out.shape == (2, n_prefix + 4 * 6, 64)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_timm_conv_bias_toggled(pre_norm):
    """timm drops the conv bias exactly when pre_norm is set; here the other way round: a conv bias with
    norm_pre, and none without it."""
    vit = _small_vit(pre_norm=pre_norm, reg_tokens=2)
    proj = vit.patch_embed.proj
    assert (proj.bias is None) == pre_norm
    proj.bias = nn.Parameter(torch.randn(proj.out_channels)) if pre_norm else None
    kw = ref.from_timm(vit)
    assert (kw["bias"] is None) == (not pre_norm) and (kw["ln"] is None) == (not pre_norm)
    _check_both(vit, _timm_stem, ref.from_timm, torch.randn(2, 3, 32, 48))


def test_timm_layer_norms_without_affine():
    vit = _small_vit(reg_tokens=1)
    vit.patch_embed.norm = nn.LayerNorm(64, bias=False, eps=1e-3)
    vit.norm_pre = nn.LayerNorm(64, elementwise_affine=False, eps=1e-6)
    _randomize(vit)
    kw = ref.from_timm(vit)
    assert kw["patch_norm"][1] is None and kw["ln"][:2] == (None, None)
    _check_both(vit, _timm_stem, ref.from_timm, torch.randn(1, 3, 32, 48))


def test_timm_no_pos_embed_dynamic_pad():
    """pos_embed='none' with dynamic_img_pad at the model's own (non-multiple) size: 37 x 50 -> 5 x 7."""
    vit = _small_vit(img=(37, 50), pos_embed="none", dynamic_img_pad=True, pre_norm=True)
    kw = ref.from_timm(vit)
    assert kw["pos_embed"] is None and kw["dynamic_pad"]
    out = _check_both(vit, _timm_stem, ref.from_timm, torch.randn(2, 3, 37, 50))
    assert out.shape == (2, 1 + 5 * 7, 64)


@pytest.mark.parametrize("size,pad", [((40, 56), False), ((37, 50), True), ((32, 32), False), ((30, 17), True)])
@pytest.mark.parametrize("no_embed_class,reg_tokens", [(False, 0), (True, 2), (False, 3)])
def test_timm_dynamic_img_size(size, pad, no_embed_class, reg_tokens):
    vit = _small_vit(img=32, dynamic_img_size=True, dynamic_img_pad=pad, no_embed_class=no_embed_class,
                     reg_tokens=reg_tokens)
    x = torch.randn(2, 3, *size)
    out = _check_both(vit, _timm_stem, ref.from_timm, x, image_size=size)
    grid = ref.grid_size(*size, 8, pad)
    assert out.shape == (2, 1 + reg_tokens + grid[0] * grid[1], 64)
    if size == (32, 32):  # unchanged grid: timm's own parameter, no copy
        assert ref.from_timm(vit, image_size=size)["pos_embed"] is vit.pos_embed


def test_timm_extractor_returns_the_parameters():
    vit = _small_vit(reg_tokens=2, embed_norm_layer=nn.LayerNorm, pre_norm=True)
    kw = ref.from_timm(vit)
    assert kw["weight"] is vit.patch_embed.proj.weight and kw["cls_token"] is vit.cls_token
    assert kw["reg_tokens"] is vit.reg_token and kw["pos_embed"] is vit.pos_embed
    assert kw["patch_norm"][0] is vit.patch_embed.norm.weight and kw["ln"][1] is vit.norm_pre.bias
    # and gradients reach them
    ref.patch_embed(torch.randn(1, 3, 32, 48), **kw).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in (vit.patch_embed.proj.weight, vit.cls_token, vit.reg_token, vit.pos_embed, vit.norm_pre.weight))


def test_timm_unsupported():
    from timm.layers import RmsNorm

    with pytest.raises(NotImplementedError, match="patch_embed.norm"):
        ref.from_timm(_small_vit(embed_norm_layer=RmsNorm))
    with pytest.raises(ValueError, match="image_size"):
        ref.from_timm(_small_vit(img=32, dynamic_img_size=True))
    vit = _small_vit()
    vit.patch_embed.proj = nn.Conv2d(3, 64, kernel_size=8, stride=4)
    with pytest.raises(NotImplementedError, match="kernel = stride"):
        ref.from_timm(vit)
    with pytest.raises(TypeError, match="vit"):
        ref.from_timm(nn.Linear(2, 2))


# -------------------------------------------------------------------------------------------- open_clip


def _oc_stem(visual, x):
    return visual._embeds(x)


def _oc_visual(image_size, patch_size, width, **kw):
    from open_clip.transformer import VisionTransformer as OCVisionTransformer

    return _randomize(OCVisionTransformer(image_size=image_size, patch_size=patch_size, width=width, layers=1,
                                          heads=max(1, width // 64), mlp_ratio=1.0, output_dim=32, **kw))


@pytest.mark.parametrize("img,patch,width,batch", [(224, 16, 768, 2), (336, 16, 768, 1), (224, 14, 1024, 1),
                                                   (336, 14, 1024, 1)])
def test_open_clip_real_shapes(img, patch, width, batch):
    pytest.importorskip("open_clip")
    visual = _oc_visual(img, patch, width)
    out = _check_both(visual, _oc_stem, ref.from_open_clip, torch.randn(batch, 3, img, img))
    assert out.shape == (batch, 1 + (img // patch) ** 2, width)


def test_open_clip_create_model():
    """The factory's ViT-B-16 (the whole CLIP model is accepted too)."""
    open_clip = pytest.importorskip("open_clip")
    model = _randomize(open_clip.create_model("ViT-B-16", pretrained=None))
    kw = ref.from_open_clip(model)
    assert kw["weight"] is model.visual.conv1.weight and kw["bias"] is None
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(ref.patch_embed(x, **kw), model.visual._embeds(x)) <= F32_TOL


@pytest.mark.parametrize("kw", [dict(no_ln_pre=True), dict(pos_embed_type="sin_cos_2d"), dict(patch_dropout=0.5)])
def test_open_clip_options(kw):
    pytest.importorskip("open_clip")
    visual = _oc_visual(56, 14, 100, **kw)  # patch_dropout is the identity in eval
    out = _check_both(visual, _oc_stem, ref.from_open_clip, torch.randn(2, 3, 56, 56))
    assert out.shape == (2, 17, 100)
    assert (ref.from_open_clip(visual)["ln"] is None) == bool(kw.get("no_ln_pre"))


def test_open_clip_unsupported():
    pytest.importorskip("open_clip")
    with pytest.raises(NotImplementedError, match="from_timm"):
        ref.from_open_clip(nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------ Hugging Face


def _hf_tower(m):
    while hasattr(m, "vision_model"):
        m = m.vision_model
    return m


def _hf_stem(model, x):
    m = _hf_tower(model)
    pre = getattr(m, "pre_layrnorm", None)
    h = m.embeddings(x)
    return h if pre is None else pre(h)


def _hf_clip(img, patch, dim, channels=3):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(hidden_size=dim, patch_size=patch, image_size=img, num_channels=channels,
                                        num_hidden_layers=1, num_attention_heads=max(1, dim // 64),
                                        intermediate_size=32)
    return _randomize(transformers.CLIPVisionModel(cfg))


@pytest.mark.parametrize("img,patch,width,batch", [(224, 16, 768, 2), (336, 16, 768, 1), (224, 14, 1024, 1),
                                                   (336, 14, 1024, 1)])
def test_hf_clip_real_shapes(img, patch, width, batch):
    model = _hf_clip(img, patch, width)
    out = _check_both(model, _hf_stem, ref.from_hf, torch.randn(batch, 3, img, img))
    assert out.shape == (batch, 1 + (img // patch) ** 2, width)


def test_hf_clip_model_and_bare_embeddings():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=96, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=42, patch_size=14))
    model = _randomize(transformers.CLIPModel(cfg))
    tower = _hf_tower(model)
    x = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        want = tower.pre_layrnorm(tower.embeddings(x))
        assert rel_err(ref.patch_embed(x, **ref.from_hf(model)), want) <= F32_TOL
        bare = ref.from_hf(tower.embeddings, tower.pre_layrnorm)
        assert bare["ln"][0] is tower.pre_layrnorm.weight
        assert rel_err(ref.patch_embed(x, **bare), want) <= F32_TOL
        no_ln = ref.from_hf(tower.embeddings)
        assert no_ln["ln"] is None
        assert rel_err(ref.patch_embed(x, **no_ln), tower.embeddings(x)) <= F32_TOL


def test_hf_siglip():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SiglipVisionConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=48, patch_size=16)
    model = _randomize(transformers.SiglipVisionModel(cfg))
    kw = ref.from_hf(model)
    assert kw["cls_token"] is None and kw["bias"] is not None and kw["ln"] is None
    out = _check_both(model, _hf_stem, ref.from_hf, torch.randn(2, 3, 48, 48))
    assert out.shape == (2, 9, 64)


def test_hf_interpolate_pos_encoding_recipe():
    """HF CLIP's interpolate_pos_encoding=True is resample_pos_embed(antialias=False) to (H // P, W // P)."""
    model = _hf_clip(42, 14, 96)
    tower = _hf_tower(model)
    x = torch.randn(2, 3, 70, 56)
    kw = ref.from_hf(model)
    kw["pos_embed"] = ref.resample_pos_embed(kw["pos_embed"], (5, 4), num_prefix_tokens=1, antialias=False)
    with torch.no_grad():
        want = tower.pre_layrnorm(tower.embeddings(x, interpolate_pos_encoding=True))
        assert rel_err(ref.patch_embed(x, **kw), want) <= F32_TOL


# ------------------------------------------------------------------------------------- odd sizes, strides


@pytest.mark.parametrize("channels", [3, 1])
def test_odd_sizes(channels):
    """P = 14, D = 100, B = 1, non-square 42 x 70 image, C = 3 and C = 1."""
    vit = _small_vit(img=(42, 70), patch=14, dim=100, in_chans=channels, reg_tokens=1, pre_norm=True)
    out = _check_both(vit, _timm_stem, ref.from_timm, torch.randn(1, channels, 42, 70))
    assert out.shape == (1, 2 + 3 * 5, 100)
    model = _hf_clip(42, 14, 100, channels=channels)
    out = _check_both(model, _hf_stem, ref.from_hf, torch.randn(1, channels, 42, 42))
    assert out.shape == (1, 10, 100)


def _full_kwargs(D=48, C=3, P=7, R=2, n_patches=None, dtype=torch.float32):
    g = dict(dtype=dtype)
    return dict(weight=torch.randn(D, C, P, P, **g), bias=torch.randn(D, **g), cls_token=torch.randn(1, 1, D, **g),
                reg_tokens=torch.randn(1, R, D, **g), pos_embed=torch.randn(1, 1 + R + n_patches, D, **g),
                patch_norm=(torch.randn(D, **g), torch.randn(D, **g), 1e-5),
                ln=(torch.randn(D, **g), torch.randn(D, **g), 1e-6), dynamic_pad=True)


def test_strides_and_inputs_untouched():
    """channels_last, a slice, and a stride-0 batch give exactly the contiguous result; nothing is modified."""
    H, W = 30, 20  # pads to 35 x 21: 5 x 3 patches
    kw = _full_kwargs(n_patches=15)
    base = torch.randn(2, 3, H, W)
    big = torch.randn(2, 5, H + 6, W + 9)
    big[:, 1:4, 3:3 + H, 5:5 + W] = base
    variants = {
        "channels_last": base.to(memory_format=torch.channels_last),
        "slice": big[:, 1:4, 3:3 + H, 5:5 + W],
        "transposed": base.transpose(2, 3).contiguous().transpose(2, 3),
    }
    tensors = [base, big] + [t for v in kw.values() if isinstance(v, (torch.Tensor, tuple))
                             for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, torch.Tensor)]
    before = [t.clone() for t in tensors]
    want = ref.patch_embed(base, **kw)
    assert want.shape == (2, 3 + 15, 48) and want.is_contiguous()
    for name, x in variants.items():
        assert not x.is_contiguous(), name
        assert torch.equal(ref.patch_embed(x, **kw), want), name
    one = ref.patch_embed(base[:1], **kw)
    assert torch.equal(ref.patch_embed(base[:1].expand(3, -1, -1, -1), **kw), one.expand(3, -1, -1))
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))


def test_shapes_of_token_arguments():
    """[D] / [1, 1, D] class token, [R, D] / [1, R, D] registers, [T, D] / [1, T, D] positions are equivalent."""
    kw = _full_kwargs(R=3, n_patches=6)
    x = torch.randn(2, 3, 14, 21)
    want = ref.patch_embed(x, **kw)
    flat = dict(kw, cls_token=kw["cls_token"].reshape(-1), reg_tokens=kw["reg_tokens"][0], pos_embed=kw["pos_embed"][0])
    assert torch.equal(ref.patch_embed(x, **flat), want)


def test_pos_embed_prefix_false_leaves_prefix_tokens_unpositioned():
    D, R = 16, 2
    kw = _full_kwargs(D=D, R=R, n_patches=4)
    kw.update(pos_embed=torch.randn(4, D), pos_embed_prefix=False, ln=None, patch_norm=None)
    x = torch.randn(1, 3, 14, 14)
    out = ref.patch_embed(x, **kw)
    assert torch.equal(out[0, 0], kw["cls_token"].reshape(D)) and torch.equal(out[0, 1:3], kw["reg_tokens"][0])
    no_pos = ref.patch_embed(x, **dict(kw, pos_embed=None))
    torch.testing.assert_close(out[0, 3:] - no_pos[0, 3:], kw["pos_embed"])


# ---------------------------------------------------------------------------------------- 16-bit inputs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    """bf16/fp16 in, same dtype out, one rounding: within 1e-2 of float64 and no worse than 2x eager."""
    vit = _small_vit(img=(48, 64), dim=96, reg_tokens=2, embed_norm_layer=nn.LayerNorm, pre_norm=True)
    vit.patch_embed.proj.bias = nn.Parameter(torch.randn(96))
    vit = vit.to(dtype)
    x = torch.randn(2, 3, 48, 64, dtype=dtype)
    with torch.no_grad():
        out = ref.patch_embed(x, **ref.from_timm(vit))
        eager = _timm_stem(vit, x)
        want = ref.patch_embed(x.double(), **ref.from_timm(vit.double()))
    assert out.dtype == dtype and eager.dtype == dtype
    err, e_err = rel_err(out, want), rel_err(eager, want)
    assert err <= 1e-2, err
    assert err <= 2 * e_err, (err, e_err)
    # the definition: everything in float32 and one rounding at the end; parameters of another float dtype
    # (here float32 holding the same values) are upcast the same way, and the output keeps the images' dtype
    with torch.no_grad():
        one_rounding = ref.patch_embed(x.float(), **ref.from_timm(vit.float())).to(dtype)
        mixed = ref.patch_embed(x, **ref.from_timm(vit))
    assert torch.equal(out, one_rounding)
    assert mixed.dtype == dtype and torch.equal(mixed, out)


# -------------------------------------------------------------------------------------------- bad input


def _bad_cases():
    D, C, P = 32, 3, 8
    good = dict(weight=torch.randn(D, C, P, P), bias=torch.randn(D), cls_token=torch.randn(D),
                reg_tokens=torch.randn(2, D), pos_embed=torch.randn(3 + 4, D),
                patch_norm=(torch.randn(D), torch.randn(D), 1e-6), ln=(torch.randn(D), None, 1e-6))
    x = torch.randn(2, C, 16, 16)
    meta = torch.device("meta")
    cases = {
        "images_ndim": (x[0], {}, ValueError, r"images must be 4-D"),
        "images_int": (x.to(torch.int32), {}, TypeError, r"images must be a float16"),
        "images_not_tensor": (x.tolist(), {}, TypeError, r"images must be a torch.Tensor"),
        "channels": (torch.randn(2, 4, 16, 16), {}, ValueError, r"images has 4 channels but weight expects C = 3"),
        "weight_non_square": (x, dict(weight=torch.randn(D, C, P, P + 1)), ValueError, r"weight must hold square"),
        "weight_ndim": (x, dict(weight=torch.randn(D, C * P * P)), ValueError, r"weight must be 4-D"),
        "weight_int": (x, dict(weight=torch.ones(D, C, P, P, dtype=torch.int64)), TypeError, r"weight must be a"),
        "not_divisible": (torch.randn(2, C, 20, 16), {}, ValueError, r"images height and width \(20, 16\).*P = 8"),
        "pos_len": (x, dict(pos_embed=torch.randn(6, D)), ValueError, r"pos_embed .*expected 7 .*got 6"),
        "pos_len_no_prefix": (x, dict(pos_embed_prefix=False), ValueError, r"pos_embed .*expected 4 .*got 7"),
        "pos_D": (x, dict(pos_embed=torch.randn(7, D + 1)), ValueError, r"pos_embed must have shape"),
        "bias_D": (x, dict(bias=torch.randn(D - 1)), ValueError, r"bias must have shape \(32,\)"),
        "bias_int": (x, dict(bias=torch.ones(D, dtype=torch.int32)), TypeError, r"bias must be a"),
        "cls_D": (x, dict(cls_token=torch.randn(1, 1, D + 2)), ValueError, r"cls_token must have shape"),
        "cls_two": (x, dict(cls_token=torch.randn(2, D)), ValueError, r"cls_token must have shape"),
        "reg_D": (x, dict(reg_tokens=torch.randn(2, D - 4)), ValueError, r"reg_tokens must have shape"),
        "reg_empty": (x, dict(reg_tokens=torch.randn(0, D)), ValueError, r"reg_tokens must hold at least one"),
        "patch_norm_D": (x, dict(patch_norm=(torch.randn(D + 1), None, 1e-5)), ValueError, r"patch_norm weight"),
        "ln_bias_D": (x, dict(ln=(None, torch.randn(D, 1), 1e-5)), ValueError, r"ln bias must have shape"),
        "ln_tuple": (x, dict(ln=torch.randn(D)), TypeError, r"ln must be None or a \(weight, bias, eps\)"),
        "ln_eps": (x, dict(ln=(None, None, -1.0)), ValueError, r"ln eps must be >= 0"),
        "pos_prefix_type": (x, dict(pos_embed_prefix=1), TypeError, r"pos_embed_prefix must be a bool"),
        "device_weight": (x, dict(weight=torch.randn(D, C, P, P, device=meta)), ValueError,
                          r"weight is on meta but images is on cpu"),
        "device_pos": (x, dict(pos_embed=torch.randn(7, D, device=meta)), ValueError, r"pos_embed is on meta"),
        "device_ln": (x, dict(ln=(torch.randn(D, device=meta), None, 1e-5)), ValueError, r"ln weight is on meta"),
    }
    return good, cases


_GOOD, _CASES = _bad_cases()


@pytest.mark.parametrize("case", list(_CASES))
def test_bad_input(case):
    x, over, exc, match = _CASES[case]
    assert ref.patch_embed(torch.randn(2, 3, 16, 16), **_GOOD).shape == (2, 7, 32)  # the base call is valid
    with pytest.raises(exc, match=match):
        ref.patch_embed(x, **dict(_GOOD, **over))


# ------------------------------------------------------------------------------------ resample_pos_embed


@pytest.mark.parametrize("T,D,new,old,prefix,mode,antialias", [
    (1 + 14 * 14, 64, (24, 24), None, 1, "bicubic", True),
    (16 * 16, 32, (20, 12), None, 0, "bicubic", True),
    (5 + 16 * 16, 32, (20, 12), (16, 16), 5, "bicubic", True),
    (1 + 6 * 10, 16, (3, 4), (6, 10), 1, "bilinear", False),
    (16 * 16, 8, (32, 8), None, 0, "bicubic", False),  # same token count, new shape: still resampled
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resample_matches_timm(T, D, new, old, prefix, mode, antialias, dtype):
    pos = torch.randn(1, T, D, dtype=dtype)
    want = resample_abs_pos_embed(pos, new_size=list(new), old_size=None if old is None else list(old),
                                  num_prefix_tokens=prefix, interpolation=mode, antialias=antialias)
    got = ref.resample_pos_embed(pos, new, old, num_prefix_tokens=prefix, mode=mode, antialias=antialias)
    assert got.shape == (1, prefix + new[0] * new[1], D) and got.dtype == dtype
    assert torch.equal(got, want)
    assert torch.equal(got[:, :prefix], pos[:, :prefix])
    got2 = ref.resample_pos_embed(pos[0], new, old, num_prefix_tokens=prefix, mode=mode, antialias=antialias)
    assert got2.shape == got.shape[1:] and torch.equal(got2, got[0])


def test_resample_unchanged_and_errors():
    pos = torch.randn(1, 1 + 49, 8)
    assert ref.resample_pos_embed(pos, 7) is pos
    assert ref.resample_pos_embed(pos, (7, 7), (7, 7)) is pos
    assert ref.resample_pos_embed(pos, (7, 7), num_prefix_tokens=1).shape == (1, 50, 8)
    with pytest.raises(ValueError, match="old_grid"):
        ref.resample_pos_embed(torch.randn(1, 1 + 48, 8), (8, 8))
    with pytest.raises(ValueError, match=r"old_grid \(6, 7\) has 42 cells"):
        ref.resample_pos_embed(pos, (8, 8), (6, 7))
    with pytest.raises(ValueError, match="new_grid"):
        ref.resample_pos_embed(pos, (0, 8))
    with pytest.raises(ValueError, match="mode"):
        ref.resample_pos_embed(pos, (8, 8), mode="cubic")
    with pytest.raises(ValueError, match="antialias"):
        ref.resample_pos_embed(pos, (8, 8), mode="nearest")
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        ref.resample_pos_embed(pos, (8, 8), num_prefix_tokens=51)
    with pytest.raises(ValueError, match=r"pos_embed must have shape"):
        ref.resample_pos_embed(torch.randn(2, 50, 8), (8, 8))
