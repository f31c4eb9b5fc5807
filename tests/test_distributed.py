"""The contrastive losses across processes (vlops.distributed, vlops.nn.ClipLoss / SigLipLoss with world_size > 1):
2 and 4 processes of a gloo process group on CPU, started here (tests/dist_worker.py, one per rank); the same
with NCCL and one CUDA device per rank where there are enough devices.

Each rank checks, for every CLIP flag combination and every SigLIP dist_impl, with equal and unequal batch
sizes: parity with open_clip's losses in the same process group (equal sizes), the exact global loss and
gradients against the single-process fused loss on the concatenated batch, DDP-averaged parameter gradients of a
small two-tower model against single-process training, a subgroup (4 processes), and bad input on one rank raising
on every rank (a hang fails by the timeout).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from triton_worker import ROOT, subprocess_env

TOL_FP32 = 1e-5  # DESIGN.md: fp32 relative error bound
TOL_FP64 = 1e-10  # and the float64 one (tests/conftest.py TOL)
TIMEOUT_S = 240


def _nccl(world):
    import torch

    enough = torch.cuda.is_available() and torch.cuda.device_count() >= world
    return pytest.param(("nccl", world), id=f"{world}proc-nccl",
                        marks=[pytest.mark.gpu, pytest.mark.skipif(not enough, reason=f"needs {world} CUDA devices")])


@pytest.fixture(scope="module", params=[pytest.param(("gloo", 2), id="2proc"), pytest.param(("gloo", 4), id="4proc"),
                                        _nccl(2), _nccl(4)])
def ranks(request, tmp_path_factory):
    pytest.importorskip("open_clip")
    backend, world = request.param
    d = tmp_path_factory.mktemp(f"dist{world}{backend}")
    init = str(d / "init")
    outs = [str(d / f"rank{r}.json") for r in range(world)]
    env = subprocess_env(interpret=False)
    env["OMP_NUM_THREADS"] = "1"
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "dist_worker.py"), str(r), str(world), init,
                               outs[r], backend], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{world} ranks did not finish in {TIMEOUT_S} s (a hang in a collective?)")
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} of {world} failed:\n{logs[r][-4000:]}"
    results = []
    for path in outs:
        with open(path) as f:
            results.append(json.load(f))
    return world, results


def _checked(results, prefix):
    errs = {}
    for r, res in enumerate(results):
        errs.update({f"rank {r}: {k}": v for k, v in res["errs"].items() if k.startswith(prefix)})
    return errs


def _assert_within(errs, what):
    assert errs, f"no {what} checks ran"
    bad = {k: v for k, v in errs.items() if not v <= TOL_FP32}
    assert not bad, f"{what}: relative errors over {TOL_FP32:.0e}: {bad}"


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_parity_with_open_clip(ranks, loss):
    world, results = ranks
    errs = {k: v for k, v in _checked(results, f"{loss}/equal/").items() if "/open_clip/" in k}
    # CLIP: local_loss x gather_with_grad; SigLIP: the four dist_impls; on every rank
    assert len({k.split("/open_clip/")[0] for k in errs}) == 4 * world
    _assert_within(errs, f"{loss} vs open_clip")


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_single_process_reference_is_open_clip(ranks, loss):
    """The single-process reference of the exactness checks against open_clip's loss on the concatenated batch."""
    world, results = ranks
    errs = {k: v for k, v in _checked(results, f"{loss}/").items() if "/open_clip single process/" in k}
    assert len({k.split("/open_clip single process/")[0] for k in errs}) >= 4 * world
    _assert_within(errs, f"single-process fused {loss} vs open_clip on the concatenated batch")


@pytest.mark.parametrize("sizes", ["equal", "unequal"])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_exact_global_loss_and_gradients(ranks, loss, sizes):
    world, results = ranks
    errs = {k: v for k, v in _checked(results, f"{loss}/{sizes}/").items() if "/single/" in k}
    # CLIP: local_loss False (both gather modes), local_loss + gather_with_grad, and with label smoothing; SigLIP:
    # every dist_impl (4 cases each); CLIP also the ring; loss, both feature gradients, scale (and SigLIP's bias)
    assert len({k.split("/single/")[0] for k in errs}) == (5 if loss == "clip" else 4) * world
    assert any("dscale" in k for k in errs) and any("dtext" in k for k in errs)
    _assert_within(errs, f"{loss} ({sizes} batches) vs the single-process loss on the global batch")


def test_ddp_gradients_equal_single_process(ranks):
    world, results = ranks
    errs = _checked(results, "ddp/")
    for kind in ("clip", "ring", "siglip"):
        for sizes in ("equal", "unequal"):
            assert any(k.endswith(f"ddp/{kind}/{sizes}/dimg.weight") for k in errs), (kind, sizes)
    assert any("dlogit_scale" in k for k in errs) and any("siglip/equal/dlogit_bias" in k for k in errs)
    _assert_within(errs, "DDP-averaged parameter gradients vs single-process training")


@pytest.mark.parametrize("sizes", ["equal", "unequal"])
def test_ring_equals_the_gathered_local_loss(ranks, sizes):
    world, results = ranks
    errs = {k: v for k, v in _checked(results, f"clip/{sizes}/ring/gathered/").items()}
    assert len(errs) == 5 * world  # loss, both feature gradients, the scale and (zero) bias gradients, every rank
    _assert_within(errs, f"the ring vs the gathered local_loss path ({sizes} batches)")


def test_float64_against_the_reference(ranks):
    """The exact paths with float64 features against vlops.reference.contrastive on the global batch: the feature
    gradients to the float64 bound; the loss and the logit_scale gradient are float32 by contract (the fp32 bound)."""
    world, results = ranks
    errs = _checked(results, "f64/")
    assert len(errs) == 2 * 4 * 4 * world  # sizes x paths x (loss, dimage, dtext, dscale), every rank
    grads = {k: v for k, v in errs.items() if k.endswith(("/dimage", "/dtext"))}
    bad = {k: v for k, v in grads.items() if not v <= TOL_FP64}
    assert not bad, f"float64 feature gradients over {TOL_FP64:.0e}: {bad}"
    _assert_within({k: v for k, v in errs.items() if k not in grads}, "float64 loss and scale gradient (fp32)")


def test_second_backward_of_a_retained_graph(ranks):
    world, results = ranks
    errs = _checked(results, "retain_graph/")
    assert len(errs) == 6 * world  # gathered CLIP, ring, SigLIP shift: both feature gradients, every rank
    _assert_within(errs, "a second backward (retain_graph=True)")


def test_subgroup(ranks):
    world, results = ranks
    if world < 4:
        pytest.skip("the subgroup case needs 4 ranks")
    errs = _checked(results, "subgroup/")
    assert {k.split(": ")[0] for k in errs} == {"rank 1", "rank 3"}  # the members only
    _assert_within(errs, "a subgroup of ranks 1 and 3")


def test_rank_and_world_size_default_to_the_group(ranks):
    world, results = ranks
    assert all(res["errs"]["defaults from the group (0 = right)"] == 0.0 for res in results)
    for res in results:
        assert "process group has" in (res["raised"]["world_size mismatch"] or "")


def test_bad_input_on_one_rank_raises_on_every_rank(ranks):
    world, results = ranks
    expect = {  # case -> words every rank's message must hold
        "D differs on the last rank": [f"rank {world - 1}: 23", "feature dimension"],
        "3-D features on rank 0": ["image_features must be 2-D"],
        "image and text batch differ on rank 0": ["same batch size"],
        "dtype differs on rank 1": ["dtype differs", "rank 1: torch.float64"],
        "ring without local_loss on every rank": ["ring=True", "local_loss=True"],
    }
    for case, words in expect.items():
        for r, res in enumerate(results):
            msg = res["raised"][case]
            assert msg is not None, f"{case}: rank {r} raised nothing"
            assert msg.startswith("ValueError"), f"{case}: rank {r}: {msg}"
            for w in words:
                assert w in msg, f"{case}: rank {r}: {msg!r} lacks {w!r}"
            if case.endswith("on rank 0") and r != 0:
                assert "rank(s) 0" in msg, f"{case}: rank {r} does not name the failing rank: {msg}"


@pytest.mark.parametrize("loss", ["clip", "ring"])
def test_ddp_example_trains(loss):
    """examples/train_clip_ddp.py under torchrun with 2 processes (its quick setting): the zero-shot accuracy on
    held-out images must be far above chance (1/16)."""
    pytest.importorskip("torch.distributed.run")
    env = subprocess_env(interpret=False)
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "examples", "train_clip_ddp.py"), "--steps", "60", "--loss", loss]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the example did not finish in {TIMEOUT_S} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("zero-shot accuracy:")]
    assert len(lines) == 1, proc.stdout[-3000:]
    acc = float(lines[0].split()[2])
    assert acc >= 0.5, f"zero-shot accuracy {acc} after 60 steps (chance 0.0625)"
    losses = [float(ln.split()[3]) for ln in proc.stdout.splitlines() if ln.startswith("step")]
    assert losses[-1] < losses[0] - 1.0, f"the loss did not fall: {losses}"
