"""The reference CLIP (vlops.models.clip): fused vs eager (outputs and every parameter gradient, float64 and
float32, each loss), the state_dict shared by both and by open_clip's CLIP, which ops each setting runs,
argument checks, a short training run in both settings, and the example's quick setting."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch

import vlops.contrastive
import vlops.models.clip as clip_module
from vlops.models import synthetic
from vlops.models.clip import CLIP, LOSSES, CLIPConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one CPU thread: the matrices of these tiny models are too small to gain from more, and
    on busy cores extra threads wait on each other for most of the time. The thread count is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or inf anywhere gives inf."""
    out, ref = out.detach().double(), ref.detach().double()
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        return float("inf")
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


def tiny_config(loss: str = "clip", **kw) -> CLIPConfig:
    sizes = dict(width=32, layers=2, heads=2, text_width=24, text_layers=2, text_heads=3, embed_dim=16)
    sizes.update(kw)
    return CLIPConfig(loss=loss, **sizes)


def batch(n: int, seed: int):
    return synthetic.make_pairs(n, torch.Generator().manual_seed(seed))


def fused_and_eager(loss: str, dtype: torch.dtype, seed: int = 0):
    """A fused model with random weights (LayerNorm gains and biases and the class embedding perturbed, so that
    none is at a trivial value) and an eager model holding the same state_dict."""
    torch.manual_seed(seed)
    fused = CLIP(tiny_config(loss), fused=True)
    with torch.no_grad():
        for p in fused.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    fused = fused.to(dtype)
    if dtype == torch.float64:
        # The fused losses and zero-shot take the exponentiated scale as a float32 tensor (their contract), so a
        # float64 model gives them exp(logit_scale) rounded to float32. Starting from log(10) in float64, that
        # rounding is ~2e-16, and the float64 comparison measures the fused ops, not the scale's rounding.
        fused.logit_scale.data.fill_(math.log(10.0))
    eager = CLIP(tiny_config(loss), fused=False).to(dtype)
    eager.load_state_dict(fused.state_dict())
    return fused, eager


# float64: the two settings must agree to float64 rounding. Three exceptions, from the fused losses' contract:
# they return the loss in float32 (rounding: relative 2**-24 = 6e-8), and take the scale and the bias as float32
# tensors, so the gradients of logit_scale and logit_bias come back rounded to float32.
# float32: outputs and losses 1e-4, gradients 1e-3 (tiled fp32 sums against eager fp32 sums).
TOL = {torch.float64: dict(out=1e-10, loss=1e-7, grad=1e-10, scalar_grad=1e-6),
       torch.float32: dict(out=1e-4, loss=1e-4, grad=1e-3, scalar_grad=1e-3)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("loss", LOSSES)
def test_fused_matches_eager(loss, dtype):
    tol = TOL[dtype]
    fused, eager = fused_and_eager(loss, dtype)
    data = batch(24, seed=1)
    assert data.concept.unique().numel() < 24  # concepts repeat: UniCL has positives off the diagonal
    images, tokens, labels = data.images.clone(), data.tokens.clone(), data.concept.clone()
    lab = labels if loss == "unicl" else None

    for name in ("encode_image", "encode_text"):
        x = images if name == "encode_image" else tokens
        a, b = getattr(fused, name)(x, normalize=False), getattr(eager, name)(x, normalize=False)
        assert a.dtype == b.dtype == dtype
        assert rel_err(a, b) <= tol["out"], f"{name}: relative error {rel_err(a, b):.2e}"

    out_f, out_e = fused(images, tokens), eager(images, tokens)
    assert len(out_f) == len(out_e) == 4
    for what, a, b in zip(("image_features", "text_features", "logit_scale"), out_f[:3], out_e[:3]):
        assert rel_err(a, b) <= tol["out"], f"{what}: relative error {rel_err(a, b):.2e}"
    if loss == "siglip":
        assert out_f[3] is fused.logit_bias and out_e[3] is eager.logit_bias
    else:
        assert out_f[3] is None and out_e[3] is None

    lf, le = fused.loss(images, tokens, lab), eager.loss(images, tokens, lab)
    assert lf.ndim == 0 and le.ndim == 0
    assert rel_err(lf, le) <= tol["loss"], f"loss: relative error {rel_err(lf, le):.2e} ({lf.item()}, {le.item()})"
    lf.backward()
    le.backward()
    params_e = dict(eager.named_parameters())
    assert set(params_e) == {n for n, _ in fused.named_parameters()}
    for name, p in fused.named_parameters():
        q = params_e[name]
        assert p.grad is not None and q.grad is not None, f"{name}: no gradient"
        assert q.grad.abs().sum() > 0, f"{name}: zero gradient in the eager model"
        bound = tol["scalar_grad"] if name in ("logit_scale", "logit_bias") else tol["grad"]
        err = rel_err(p.grad, q.grad)
        assert err <= bound, f"d loss / d {name}: relative error {err:.2e} > {bound:.0e} ({dtype})"

    pf = fused.zero_shot(images, synthetic.class_captions())
    pe = eager.zero_shot(images, synthetic.class_captions())
    assert pf.shape == (24, synthetic.NUM_CONCEPTS) and not pf.requires_grad
    assert torch.allclose(pf.sum(-1).double(), torch.ones(24, dtype=torch.float64), atol=1e-5)
    assert rel_err(pf, pe) <= tol["out"], f"zero_shot: relative error {rel_err(pf, pe):.2e}"

    # inputs are never modified
    assert torch.equal(images, data.images) and torch.equal(tokens, data.tokens) and torch.equal(labels, data.concept)


def test_fused_flag_selects_the_ops(monkeypatch):
    """fused=True runs the fused stem, losses and zero-shot; fused=False none of them but the eager references."""
    calls = []

    def spy(module, name, tag):
        fn = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls.append(tag)
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    spy(clip_module, "patch_embed", "fused stem")
    spy(clip_module, "zero_shot_classify", "fused zero-shot")
    spy(vlops.contrastive, "clip_loss", "fused clip_loss")  # what vlops.nn.ClipLoss / UniClLoss call
    spy(vlops.contrastive, "siglip_loss", "fused siglip_loss")
    for name in ("clip_loss", "siglip_loss", "zero_shot"):
        spy(clip_module.reference, name, f"eager {name}")
    data = batch(6, seed=2)
    expect_loss = {"clip": "clip_loss", "siglip": "siglip_loss", "unicl": "clip_loss"}
    for loss in LOSSES:
        torch.manual_seed(0)
        model = CLIP(tiny_config(loss))
        for fused in (True, False):
            model.fused = fused
            calls.clear()
            model.loss(data.images, data.tokens, data.concept if loss == "unicl" else None)
            model.zero_shot(data.images, synthetic.class_captions())
            if fused:
                assert sorted(calls) == sorted(["fused stem", "fused stem", f"fused {expect_loss[loss]}",
                                                "fused zero-shot"]), (loss, calls)
            else:
                assert sorted(calls) == sorted([f"eager {expect_loss[loss]}", "eager zero_shot"]), (loss, calls)


@pytest.mark.parametrize("loss", LOSSES)
def test_state_dict_round_trip(loss, tmp_path):
    torch.manual_seed(3)
    fused = CLIP(tiny_config(loss), fused=True)
    torch.manual_seed(4)  # other weights: loading must overwrite every one
    eager = CLIP(tiny_config(loss), fused=False)
    assert list(fused.state_dict()) == list(eager.state_dict())
    assert ("logit_bias" in fused.state_dict()) == (loss == "siglip")
    data = batch(5, seed=5)
    before = fused(data.images, data.tokens)

    path = tmp_path / "clip.pt"
    torch.save(fused.state_dict(), path)
    eager.load_state_dict(torch.load(path), strict=True)
    for k, v in fused.state_dict().items():
        assert torch.equal(v, eager.state_dict()[k]), k
    for a, b in zip(before[:3], eager(data.images, data.tokens)[:3]):
        assert rel_err(a, b) <= 1e-4

    # and back: an eager model's weights into a fresh fused one
    with torch.no_grad():
        for p in eager.parameters():
            p.mul_(1.5)
    torch.manual_seed(6)
    fused2 = CLIP(tiny_config(loss), fused=True)
    fused2.load_state_dict(eager.state_dict(), strict=True)
    for a, b in zip(fused2(data.images, data.tokens)[:3], eager(data.images, data.tokens)[:3]):
        assert rel_err(a, b) <= 1e-4


def test_state_dict_loads_into_open_clip():
    """The parameter names and the math are open_clip's: an open_clip CLIP of the same sizes (text pooled at
    <eos>, SigLIP bias) loads the state_dict strictly and computes the same forward in float64."""
    from open_clip.model import CLIP as OpenClipCLIP
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    c = tiny_config("siglip")
    torch.manual_seed(7)
    model = CLIP(c).double()
    vision = CLIPVisionCfg(layers=c.layers, width=c.width, head_width=c.width // c.heads, mlp_ratio=c.mlp_ratio,
                           patch_size=c.patch_size, image_size=c.image_size)
    text = CLIPTextCfg(context_length=c.context_length, vocab_size=c.vocab_size, width=c.text_width,
                       heads=c.text_heads, layers=c.text_layers, mlp_ratio=c.mlp_ratio, pool_type="eos",
                       eos_id=synthetic.EOS)
    oc = OpenClipCLIP(c.embed_dim, vision, text, init_logit_bias=0.0).double().eval()
    oc.load_state_dict(model.state_dict(), strict=True)
    data = batch(6, seed=8)
    ours = model(data.images, data.tokens)
    theirs = oc(data.images.double(), data.tokens)
    for what, a, b in zip(("image_features", "text_features", "logit_scale", "logit_bias"), ours, theirs):
        assert rel_err(a, b) <= 1e-10, f"{what}: relative error {rel_err(a, b):.2e} against open_clip"


@pytest.mark.parametrize("loss", LOSSES)
def test_training_curves_agree(loss):
    """30 AdamW steps from the same weights on the same batches, fused and eager, in float32.

    The two losses of a step differ by float32 rounding (tiled sums against eager sums, measured <= 3e-7 over
    these 30 steps); Adam carries the weight differences forward but they stay at rounding level, so
    max |a_i - b_i| / |b_i| <= 1e-3 leaves a wide margin, while a wrong fused op (a missing term, a wrong
    gradient) moves the curves apart by far more. In 30 steps this tiny model goes from its initial loss
    to about the loss of equal logits (log N for CLIP / UniCL) and SigLIP's loss halves; learning the concepts
    takes longer (the example's test checks that)."""
    curves = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = CLIP(tiny_config(loss, layers=1, text_layers=1), fused=fused)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(30):
            data = synthetic.make_pairs(32, g)
            value = model.loss(data.images, data.tokens, data.concept if loss == "unicl" else None)
            opt.zero_grad()
            value.backward()
            opt.step()
            losses.append(value.item())
        curves[fused] = torch.tensor(losses, dtype=torch.float64)
    a, b = curves[True], curves[False]
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    worst = ((a - b).abs() / b.abs()).max().item()
    assert worst <= 1e-3, f"fused and eager training curves differ by {worst:.2e} (relative) at some step"
    first, last = a[0].item(), a[-5:].mean().item()
    assert last <= 0.9 * first, f"loss did not fall: {first:.3f} at step 0, {last:.3f} over the last 5 steps"


@pytest.mark.parametrize("kw, name, error", [
    (dict(image_size=30), "image_size", ValueError),
    (dict(patch_size=0), "patch_size", ValueError),
    (dict(width=30, heads=4), "width", ValueError),
    (dict(text_width=30, text_heads=4), "text_width", ValueError),
    (dict(layers=0), "layers", ValueError),
    (dict(heads=2.0), "heads", TypeError),
    (dict(vocab_size=2), "vocab_size", ValueError),
    (dict(context_length=1), "context_length", ValueError),
    (dict(embed_dim=-1), "embed_dim", ValueError),
    (dict(mlp_ratio=0.0), "mlp_ratio", ValueError),
    (dict(mlp_ratio="4"), "mlp_ratio", TypeError),
    (dict(loss="infonce"), "loss", ValueError),
    (dict(init_logit_scale=float("nan")), "init_logit_scale", ValueError),
    (dict(init_logit_bias=-5.0), "init_logit_bias", ValueError),  # a bias without SigLIP
])
def test_config_is_checked(kw, name, error):
    with pytest.raises(error, match=name):
        CLIPConfig(**kw)


def test_config_defaults():
    c = CLIPConfig()
    assert (c.image_size, c.patch_size, c.context_length, c.vocab_size) == (32, 8, 16, len(synthetic.VOCAB))
    assert c.init_logit_scale == pytest.approx(math.log(10)) and c.init_logit_bias is None
    s = CLIPConfig(loss="siglip")
    assert s.init_logit_scale == pytest.approx(math.log(10)) and s.init_logit_bias == -10.0
    m = CLIP(s)
    assert m.logit_bias.item() == -10.0 and m.logit_scale.exp().item() == pytest.approx(10.0, rel=1e-6)


def test_arguments_are_checked():
    with pytest.raises(TypeError, match="config"):
        CLIP({"width": 32})
    with pytest.raises(TypeError, match="fused"):
        CLIP(tiny_config(), fused=1)
    torch.manual_seed(0)
    model = CLIP(tiny_config("unicl"))
    data = batch(4, seed=9)
    img, tok, lab = data.images, data.tokens, data.concept
    bad_images = [
        (img[:, :, :16, :16], ValueError),  # wrong size
        (img[:, :1], ValueError),  # one channel
        (img[0], ValueError),  # 3-D
        (img[:0], ValueError),  # no image
        ((img * 100).to(torch.uint8), TypeError),  # not floating point
        (img.numpy(), TypeError),
    ]
    for x, error in bad_images:
        with pytest.raises(error, match="images"):
            model.encode_image(x)
        with pytest.raises(error, match="images"):
            model.loss(x, tok, lab)
    no_eos = tok.clone()
    no_eos[1][no_eos[1] == synthetic.EOS] = synthetic.PAD
    too_big = tok.clone()
    too_big[0, 3] = len(synthetic.VOCAB)
    bad_tokens = [
        (tok.float(), TypeError),  # float ids
        (tok[:, :10], ValueError),  # wrong length
        (tok[0], ValueError),  # 1-D
        (too_big, ValueError),  # id out of the vocabulary
        (-tok, ValueError),
        (no_eos, ValueError),  # a row without <eos>
        (tok.tolist(), TypeError),
    ]
    for t, error in bad_tokens:
        with pytest.raises(error, match="tokens"):
            model.encode_text(t)
        with pytest.raises(error, match="tokens"):
            model.loss(img, t, lab)
        with pytest.raises(error, match="class_tokens"):
            model.zero_shot(img, t)
    with pytest.raises(ValueError, match="images and tokens"):
        model(img, tok[:3])
    with pytest.raises(ValueError, match="labels"):
        model.loss(img, tok)  # UniCL needs labels
    with pytest.raises(ValueError, match="labels"):
        model.loss(img, tok, lab[:3])
    with pytest.raises(TypeError, match="labels"):
        model.loss(img, tok, lab.float())
    clip_model = CLIP(tiny_config("clip"))
    with pytest.raises(ValueError, match="labels"):
        clip_model.loss(img, tok, lab)  # labels only with UniCL


def test_example_quick(tmp_path):
    """The example's quick setting learns: zero-shot accuracy over 48 concepts (chance 0.021) of at least 0.25.

    Measured with seed 0 on a 2-core CPU: 0.91 (seeds 1-3: 0.76, 0.71, 0.50), about 16 s of training; 0.25
    is half the worst of those."""
    cmd = [sys.executable, os.path.join("examples", "train_clip.py"), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    steps = [(int(s), float(v)) for s, v in re.findall(r"^step (\d+) loss ([0-9.]+)$", out, re.M)]
    assert len(steps) >= 10 and steps[0][0] == 0, out
    acc = re.search(r"^zero-shot accuracy: ([0-9.]+) \(chance ([0-9.]+)\)$", out, re.M)
    assert acc is not None, out
    assert float(acc.group(2)) == pytest.approx(1 / 48, abs=1e-3)
    assert float(acc.group(1)) >= 0.25, out
    final = re.search(r"^final loss: ([0-9.]+)$", out, re.M)
    assert final is not None and float(final.group(1)) < 0.7 * steps[0][1], out
    png = tmp_path / "clip_loss.png"
    assert png.is_file() and png.stat().st_size > 1000
