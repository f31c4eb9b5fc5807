"""The fused patch stem (vlops.patch_embed, vlops.nn.PatchEmbed, the stem swaps) against the float64
reference and against timm, open_clip and Hugging Face stems with the same (random) weights, forward and
every gradient. The kernels alone are tested by tests/test_patch_embed_native.py (cpu) and
tests/test_patch_embed_triton.py (Triton, interpreter and GPU); the reference by
tests/test_patch_embed_reference.py."""
from __future__ import annotations

import itertools

import pytest
import torch

import vlops
from vlops.ops import patch_embed as ops
from vlops.reference import patch_embed as ref

from conftest import HAS_CUDA, TOL, rel_err

gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
BACKENDS = [pytest.param("reference", "cpu", id="reference"), pytest.param("cpu", "cpu", id="cpu"),
            pytest.param("triton", "cuda", id="triton-cuda", marks=gpu)]


def _require(backend, device):
    why = vlops._backends.op_unavailable_reason("patch_embed", backend, torch.device(device))
    if why and device == "cuda":
        pytest.skip(why)
    assert not why, f"backend {backend} must run patch_embed on {device}: {why}"


def _stem(B=2, C=3, H=20, W=28, P=4, D=24, cls=True, nreg=0, pos=True, prefix_pos=True, pn=False, ln=True,
          pad=False, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device)

    Gh, Gw = -(-H // P), -(-W // P)
    R0 = int(cls) + nreg
    images = r(B, C, H, W).to(dtype)
    params = dict(weight=r(D, C, P, P) * 0.2, bias=r(D))
    kw = {}
    if cls:
        kw["cls_token"] = r(1, 1, D)
    if nreg:
        kw["reg_tokens"] = r(nreg, D)
    if pos:
        kw["pos_embed"] = r(1, (R0 if prefix_pos else 0) + Gh * Gw, D)
        kw["pos_embed_prefix"] = prefix_pos
    norms = {}
    if pn:
        norms["patch_norm"] = (1 + 0.1 * r(D), r(D), 1e-6)
    if ln:
        norms["ln"] = (1 + 0.1 * r(D), r(D), 1e-5)
    return images, params, kw, norms, dict(dynamic_pad=pad)


def _leaves(params, kw, norms, dtype):
    """Float (requires-grad) copies of every tensor argument: parameters in float32 (float64 for the
    reference run), as modules hold them."""
    out = {}
    for k, v in {**params, **kw}.items():
        out[k] = v.to(dtype).requires_grad_() if torch.is_tensor(v) else v
    for k, (w, b, eps) in norms.items():
        out[k] = (w.to(dtype).requires_grad_(), b.to(dtype).requires_grad_(), eps)
    return out


def _tensors(args):
    ts = []
    for v in args.values():
        if torch.is_tensor(v):
            ts.append(v)
        elif isinstance(v, tuple):
            ts += [t for t in v if torch.is_tensor(t)]
    return ts


def _run(fn, images, args, grad_out=None, images_grad=True):
    x = images.detach().clone().requires_grad_(images_grad)
    out = fn(x, **args)
    ts = ([x] if images_grad else []) + _tensors(args)
    g = grad_out if grad_out is not None else torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                                                         dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, ts, g.to(out.dtype))
    return out, grads, g


CONFIGS = [dict(zip(("cls", "nreg", "pos", "prefix_pos", "pn", "ln", "pad"), c))
           for c in itertools.product([False, True], [0, 3], [False, True], [False, True], [False, True],
                                      [False, True], [False, True])
           if c[3] or c[2]]  # prefix_pos only matters with a position embedding


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_matches_float64_forward_and_every_gradient(backend, device):
    _require(backend, device)
    worst = {}
    for i, cfg in enumerate(CONFIGS):
        shape = dict(H=18, W=27) if cfg["pad"] else dict(H=20, W=28)
        images, params, kw, norms, opts = _stem(**shape, **cfg, device=device, seed=i)
        args32 = {**_leaves(params, kw, norms, torch.float32), **opts}
        args64 = {**_leaves(params, kw, norms, torch.float64), **opts}
        with vlops.use_backend(backend):
            out, grads, g = _run(vlops.patch_embed, images, args32)
        out64, grads64, _ = _run(ref.patch_embed, images.double(), args64, grad_out=g.double())
        assert out.dtype == torch.float32 and out.shape == out64.shape
        errs = [rel_err(out, out64)] + [rel_err(a, b) for a, b in zip(grads, grads64)]
        worst[str(cfg)] = max(errs)
        assert max(errs) <= TOL[torch.float32], f"{cfg}: errors {errs}"
    assert len(worst) == len(CONFIGS)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_images(backend, device, dtype):
    _require(backend, device)
    images, params, kw, norms, opts = _stem(B=1, H=28, W=42, P=14, D=100, nreg=2, pn=True, dtype=dtype,
                                            device=device)
    args = {**_leaves(params, kw, norms, torch.float32), **opts}
    with vlops.use_backend(backend):
        out = vlops.patch_embed(images, **args)
    out64 = ref.patch_embed(images.double(), **{**_leaves(params, kw, norms, torch.float64), **opts})
    assert out.dtype == dtype
    assert rel_err(out, out64) <= TOL[dtype]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strides_and_inputs_unchanged(backend, device):
    _require(backend, device)
    images, params, kw, norms, opts = _stem(B=3, C=3, H=16, W=24, P=8, D=40, device=device)
    args = {**_leaves(params, kw, norms, torch.float32), **opts}
    before = {k: v.detach().clone() for k, v in args.items() if torch.is_tensor(v)}
    with vlops.use_backend(backend):
        base = vlops.patch_embed(images, **args)
        cl = vlops.patch_embed(images.to(memory_format=torch.channels_last), **args)
        wide = torch.cat([images, images], dim=3)  # a non-contiguous slice of a wider image
        sl = vlops.patch_embed(wide[..., :24], **args)
        one = vlops.patch_embed(images[1:2], **args)
    assert torch.allclose(cl, base, rtol=1e-6, atol=1e-6) and torch.allclose(sl, base, rtol=1e-6, atol=1e-6)
    assert torch.allclose(one[0], base[1], rtol=1e-6, atol=1e-6)
    for k, v in before.items():
        assert torch.equal(args[k], v), f"{k} was modified"


def test_bad_input_errors():
    images, params, kw, norms, opts = _stem(H=16, W=16, P=4, D=8)
    w, b = params["weight"].float(), params["bias"].float()
    x = images.float()
    cases = [
        (lambda: vlops.patch_embed(x[0], w), ValueError, "images must be 4-D"),
        (lambda: vlops.patch_embed(x, w[:, :2]), ValueError, "channels"),
        (lambda: vlops.patch_embed(x[..., :15], w), ValueError, "multiples of the patch size"),
        (lambda: vlops.patch_embed(x, w, b[:3]), ValueError, "bias"),
        (lambda: vlops.patch_embed(x, w, pos_embed=torch.zeros(5, 8)), ValueError, "pos_embed"),
        (lambda: vlops.patch_embed(x, w, cls_token=torch.zeros(2, 8)), ValueError, "cls_token"),
        (lambda: vlops.patch_embed(x, w, ln=(torch.ones(8), None)), TypeError, "ln"),
        (lambda: vlops.patch_embed(x.long(), w), TypeError, "images"),
        (lambda: vlops.patch_embed(x, w.to("meta")), ValueError, "device"),
    ]
    for fn, exc, words in cases:
        with pytest.raises(exc, match=words):
            fn()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck_and_compile(backend, device):
    _require(backend, device)
    images, params, kw, norms, opts = _stem(B=2, H=8, W=12, P=4, D=8, nreg=1, pn=True, device=device)
    a = _leaves(params, kw, norms, torch.float32)
    x = images.detach().clone().requires_grad_()
    prefix = torch.randn(2, 8, device=device, requires_grad=True)
    pos = a["pos_embed"][0, 2:].detach().clone().requires_grad_()
    pn_w, pn_b, _ = a["patch_norm"]
    ln_w, ln_b, _ = a["ln"]
    with vlops.use_backend(backend):
        torch.library.opcheck(ops.patch_embed_op, (x, a["weight"], a["bias"], prefix, pos, pn_w, pn_b, 1e-6, True,
                                                   ln_w, ln_b, 1e-5, True))
        torch.library.opcheck(ops.patch_embed_op, (x, a["weight"], None, None, None, None, None, 0.0, False,
                                                   None, None, 0.0, False))
        # with the pre-norm rows saved for the backward (a second, non-differentiable output)
        torch.library.opcheck(ops.patch_embed_op, (x, a["weight"], a["bias"], prefix, pos, pn_w, pn_b, 1e-6, True,
                                                   ln_w, ln_b, 1e-5, True, True))
        torch.library.opcheck(ops.patch_embed_op, (x, a["weight"], a["bias"], None, pos, None, None, 0.0, False,
                                                   None, None, 1e-5, True, True))
        eager = vlops.patch_embed(x, **a, **opts)
        compiled = torch.compile(lambda t: vlops.patch_embed(t, **a, **opts), fullgraph=True)(x)
        g = torch.randn_like(eager)
        ts = [x] + _tensors(a)
        g_eager = torch.autograd.grad(eager, ts, g)
        g_compiled = torch.autograd.grad(compiled, ts, g)
    assert torch.allclose(compiled, eager, rtol=1e-6, atol=1e-6)
    for ge, gc in zip(g_eager, g_compiled):
        assert rel_err(gc, ge) <= 1e-6


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_eager_autograd_path_equals_registered_autograd(backend, device):
    """vlops.patch_embed's eager calls go through ops.patch_embed (a torch.autograd.Function built from the
    op's setup and backward, vlops.ops.eager_autograd); calling the custom op itself uses the autograd that
    register_autograd gave it. Same outputs and gradients bit for bit, with the pre-norm rows saved or not;
    no graph when nothing requires grad."""
    _require(backend, device)
    images, params, kw, norms, opts = _stem(B=2, H=8, W=12, P=4, D=8, nreg=1, pn=True, device=device)
    a = _leaves(params, kw, norms, torch.float32)
    prefix = torch.randn(2, 8, device=device, requires_grad=True)
    pos = a["pos_embed"][0, 2:].detach().clone().requires_grad_()
    pn_w, pn_b, _ = a["patch_norm"]
    ln_w, ln_b, _ = a["ln"]
    for save_x0 in (False, True):
        x = images.detach().clone().requires_grad_()
        args = (x, a["weight"], a["bias"], prefix, pos, pn_w, pn_b, 1e-6, True, ln_w, ln_b, 1e-5, True, save_x0)
        ts = [t for t in args if isinstance(t, torch.Tensor)]
        with vlops.use_backend(backend):
            fast, x0_fast = ops.patch_embed(*args)
            reg, x0_reg = ops.patch_embed_op(*args)
            g = torch.randn_like(fast)
            assert type(fast.grad_fn).__name__ != type(reg.grad_fn).__name__  # two routes were taken
            g_fast = torch.autograd.grad(fast, ts, g)
            g_reg = torch.autograd.grad(reg, ts, g)
        assert torch.equal(fast, reg) and torch.equal(x0_fast, x0_reg) and x0_fast.numel() == (2 * 6 * 8 if save_x0 else 0)
        for gf, gr in zip(g_fast, g_reg):
            assert torch.equal(gf, gr)
    with vlops.use_backend(backend), torch.no_grad():
        out, _ = ops.patch_embed(*args)
    assert out.grad_fn is None and torch.equal(out, fast.detach())


class _KernelSpy:
    """Wraps the op layer's kernel lookups (vlops.ops.patch_embed._kernel / _bwd_kernel) and records the
    x0_out the forward kernel gets, and the x0 the backward kernel gets with its values before and after."""

    def __init__(self, monkeypatch):
        self.fwd, self.bwd = [], []
        real_fwd, real_bwd = ops._kernel, ops._bwd_kernel

        def fwd(device):
            fn = real_fwd(device)

            def run(*args):
                self.fwd.append(args[14] if len(args) > 14 else None)
                return fn(*args)
            return run

        def bwd(device):
            fn = real_bwd(device)

            def run(*args):
                x0 = args[16] if len(args) > 16 else None
                before = None if x0 is None else x0.clone()
                out = fn(*args)
                self.bwd.append((x0, before, None if x0 is None else x0.clone()))
                return out
            return run

        monkeypatch.setattr(ops, "_kernel", fwd)
        monkeypatch.setattr(ops, "_bwd_kernel", bwd)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_backward_reuses_the_saved_prenorm_rows(backend, device, monkeypatch):
    """With grad on and a LayerNorm on, the forward kernel fills an x0_out buffer (W p + bias) and the
    backward kernel gets that very tensor as x0, so it does not run the projection GEMM again; the backward
    leaves it unmodified and the gradients equal those of the recompute path. Without a gradient to come, or
    without a LayerNorm, nothing is saved (x0_out and x0 None). The public function returns the tokens only."""
    _require(backend, device)
    spy = _KernelSpy(monkeypatch)
    images, params, kw, norms, opts = _stem(B=2, H=16, W=24, P=8, D=40, nreg=1, pn=True, device=device)
    a = _leaves(params, kw, norms, torch.float32)
    with vlops.use_backend(backend):
        out, grads, g = _run(vlops.patch_embed, images, {**a, **opts})
        assert isinstance(out, torch.Tensor) and out.shape == (2, 2 + 6, 40)
        assert len(spy.fwd) == 1 and len(spy.bwd) == 1
        x0_out = spy.fwd[0]
        x0, before, after = spy.bwd[0]
        assert x0_out is not None and x0_out.shape == (2 * 6, 40) and x0_out.dtype == torch.float32
        assert x0 is not None and x0.data_ptr() == x0_out.data_ptr(), "the backward did not get the saved rows"
        assert torch.equal(before, after), "the backward modified the saved rows"
        w = a["weight"].detach().reshape(40, -1).double()
        patches = images.double().reshape(2, 3, 2, 8, 3, 8).permute(0, 2, 4, 1, 3, 5).reshape(12, -1)
        assert rel_err(before, patches @ w.T + a["bias"].detach().double()) <= 1e-6

        # the op directly: save_x0 False (recompute) gives the same gradients; x0 is not differentiable
        x = images.detach().clone().requires_grad_()
        pn_w, pn_b, pn_eps = a["patch_norm"]
        ln_w, ln_b, ln_eps = a["ln"]
        pos = a["pos_embed"][0, 2:]
        prefix = torch.zeros(2, 40, device=device)
        res = {}
        for save in (True, False):
            o, x0s = ops.patch_embed_op(x, a["weight"], a["bias"], prefix, pos, pn_w, pn_b, pn_eps, True, ln_w, ln_b,
                                        ln_eps, True, save)
            assert not x0s.requires_grad
            assert x0s.shape == ((12, 40) if save else (0,))
            ts = [x, a["weight"], a["bias"], pn_w, pn_b, ln_w, ln_b]
            res[save] = torch.autograd.grad(o, ts, g.to(o))
        assert spy.bwd[-2][0] is not None and spy.bwd[-1][0] is None
        for s, r in zip(res[True], res[False]):
            assert rel_err(s, r) <= 1e-6

        spy.fwd.clear()
        with torch.no_grad():
            vlops.patch_embed(images, **a, **opts)
        frozen = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in a.items()}  # grad on, none required
        for k in ("patch_norm", "ln"):
            frozen[k] = tuple(t.detach() if torch.is_tensor(t) else t for t in a[k])
        vlops.patch_embed(images, **frozen, **opts)
        assert spy.fwd == [None, None], "x0 saved though no gradient will be computed"

        spy.fwd.clear()
        spy.bwd.clear()
        no_norm = {k: v for k, v in a.items() if k not in ("patch_norm", "ln")}
        _run(vlops.patch_embed, images, {**no_norm, **opts})
        assert spy.fwd == [None] and len(spy.bwd) == 1 and spy.bwd[0][0] is None, "x0 saved without a LayerNorm"


# ------------------------------------------------------------------ the anchors, through the fused op

def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 and "weight" in str(p.shape) else 0))
    return module


def _check_anchor(stem_fn, kw, images, params_of):
    """Fused (cpu backend) vs the anchor's own stem: output and the gradients of its parameters and images."""
    x1 = images.clone().requires_grad_()
    x2 = images.clone().requires_grad_()
    want = stem_fn(x1)
    with vlops.use_backend("cpu"):
        got = vlops.patch_embed(x2, **kw)
    assert got.shape == want.shape
    assert rel_err(got, want) <= TOL[torch.float32]
    g = torch.randn_like(want)
    ps = params_of()
    gw = torch.autograd.grad(want, [x1] + ps, g)
    gg = torch.autograd.grad(got, [x2] + ps, g)
    for a, b in zip(gg, gw):
        assert rel_err(a, b) <= TOL[torch.float32]


def test_timm_vit_stem():
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    for cfg in (dict(class_token=True, reg_tokens=0, no_embed_class=False, pre_norm=False),
                dict(class_token=True, reg_tokens=4, no_embed_class=True, pre_norm=True),
                dict(class_token=False, reg_tokens=0, no_embed_class=False, pre_norm=True, global_pool="avg")):
        vit = _randomize(VisionTransformer(img_size=28, patch_size=14, embed_dim=64, depth=1, num_heads=2, **cfg)).eval()
        kw = ref.from_timm(vit)
        images = torch.randn(2, 3, 28, 28)
        _check_anchor(lambda x: vit.norm_pre(vit._pos_embed(vit.patch_embed(x))), kw, images, lambda: _tensors(kw))
    assert timm.__version__


def test_open_clip_stem():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer

    vis = _randomize(VisionTransformer(image_size=28, patch_size=14, width=64, layers=1, heads=2, mlp_ratio=2.0,
                                       output_dim=32)).eval()
    kw = ref.from_open_clip(vis)
    images = torch.randn(2, 3, 28, 28)

    def stem(x):
        t = vis.conv1(x).flatten(2).transpose(1, 2)
        cls = vis.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
        return vis.ln_pre(torch.cat([cls, t], 1) + vis.positional_embedding)

    _check_anchor(stem, kw, images, lambda: _tensors(kw))
    assert open_clip.__version__


def test_hf_clip_vision_stem():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=1, num_attention_heads=2)
    model = _randomize(transformers.CLIPVisionModel(cfg)).eval()
    kw = ref.from_hf(model)
    vm = getattr(model, "vision_model", model)
    images = torch.randn(2, 3, 28, 28)
    _check_anchor(lambda x: vm.pre_layrnorm(vm.embeddings(x)), kw, images, lambda: _tensors(kw))


# ------------------------------------------------------------------ drop-in module and stem swaps

def test_nn_patch_embed_is_timm_patch_embed():
    pytest.importorskip("timm")
    from timm.layers import PatchEmbed as TimmPatchEmbed

    for kw in (dict(img_size=28, patch_size=14, in_chans=3, embed_dim=40),
               dict(img_size=30, patch_size=8, in_chans=1, embed_dim=24, norm_layer=torch.nn.LayerNorm,
                    strict_img_size=False, dynamic_img_pad=True, bias=False)):
        theirs = _randomize(TimmPatchEmbed(**kw)).eval()
        ours = vlops.nn.PatchEmbed(**kw)
        ours.load_state_dict(theirs.state_dict())  # same keys, same shapes
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        for attr in ("img_size", "grid_size", "num_patches", "patch_size", "strict_img_size", "dynamic_img_pad"):
            assert getattr(ours, attr) == getattr(theirs, attr), attr
        x = torch.randn(2, kw["in_chans"], kw["img_size"], kw["img_size"])
        assert rel_err(ours(x), theirs(x)) <= TOL[torch.float32]
    with pytest.raises(ValueError, match="doesn't match"):
        vlops.nn.PatchEmbed(img_size=28, patch_size=14)(torch.randn(1, 3, 14, 14))
    with pytest.raises(NotImplementedError, match="NCHW"):
        vlops.nn.PatchEmbed(flatten=False)


def _swap_roundtrip(model, images, run):
    from vlops.integrations.stem import patch_stem, unpatch_stem

    keys = list(model.state_dict().keys())
    with torch.no_grad():
        want = run(model, images)
        patch_stem(model)
        got = run(model, images)
        assert list(model.state_dict().keys()) == keys  # weights kept where they were
        unpatch_stem(model)
        again = run(model, images)
    assert rel_err(got, want) <= TOL[torch.float32]
    assert torch.equal(again, want)
    with pytest.raises(ValueError, match="not patched"):
        unpatch_stem(model)


def test_patch_stem_timm():
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    vit = _randomize(VisionTransformer(img_size=28, patch_size=14, embed_dim=64, depth=1, num_heads=2,
                                       reg_tokens=2, pre_norm=True)).eval()
    _swap_roundtrip(vit, torch.randn(2, 3, 28, 28), lambda m, x: m.forward_features(x))


def test_patch_stem_open_clip():
    pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer

    vis = _randomize(VisionTransformer(image_size=28, patch_size=14, width=64, layers=1, heads=2, mlp_ratio=2.0,
                                       output_dim=32)).eval()
    _swap_roundtrip(vis, torch.randn(2, 3, 28, 28), lambda m, x: m(x))


def test_patch_stem_hf():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=1, num_attention_heads=2)
    model = _randomize(transformers.CLIPVisionModel(cfg)).eval()
    _swap_roundtrip(model, torch.randn(2, 3, 28, 28), lambda m, x: m(pixel_values=x).last_hidden_state)


def test_patch_stem_unknown_model():
    from vlops.integrations.stem import patch_stem

    with pytest.raises(TypeError, match="patch_stem supports"):
        patch_stem(torch.nn.Linear(2, 2))
