"""One rank of the multi-process tests of tests/test_distributed.py (a gloo process group on CPU tensors).

    python tests/dist_worker.py RANK WORLD INIT_FILE OUT_JSON [gloo|nccl]

(nccl: one CUDA device per rank, the features on it.)

Every rank builds the same global batch from a fixed seed, keeps its own rows, runs the distributed losses
and writes, as JSON, relative errors (``errs``: name -> ||x - ref|| / ||ref||, checked by the test against the
fp32 bound) and the messages of the errors it expected (``raised``: name -> message, or null when nothing
was raised). References: open_clip's ClipLoss / SigLipLoss with the same flags in the same process group
(equal batch sizes: open_clip needs them), and the single-process fused loss on the concatenated global
batch (the exact options: each rank's loss and gradients against it, as the module docstring of
vlops.distributed states them), and a DDP model trained both ways.
"""
from __future__ import annotations

import gc
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

D = 24
DEVICE = torch.device("cpu")  # cuda:RANK with nccl


def rel(x, ref) -> float:
    """||x - ref|| / ||ref||; the absolute difference where the reference is zero up to rounding (CLIP's bias
    gradient: exactly 0 in vlops, ~1e-8 in open_clip)."""
    x, ref = torch.as_tensor(x).detach().double(), torch.as_tensor(ref).detach().double()
    if not torch.isfinite(x).all():
        return float("inf")
    den = ref.norm().item()
    return (x - ref).norm().item() / den if den > 1e-6 else (x - ref).norm().item()


def global_batch(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    N = sum(sizes)
    img = F.normalize(torch.randn(N, D, generator=g), dim=-1)
    txt = F.normalize(img + 0.7 * torch.randn(N, D, generator=g), dim=-1)  # correlated pairs: a real signal
    return img.to(DEVICE), txt.to(DEVICE)


def run(fn, img, txt, scale, bias):
    """Loss and the gradients of (img, txt, scale, bias) of ``fn`` on fresh leaves."""
    leaves = [img.clone().requires_grad_(), txt.clone().requires_grad_(),
              torch.tensor(scale, requires_grad=True, device=DEVICE),
              torch.tensor(bias, requires_grad=True, device=DEVICE)]
    loss = fn(*leaves)
    loss.backward()
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]
    return loss.detach(), grads


def main(rank: int, world: int, init: str, out: str, backend: str = "gloo") -> None:
    global DEVICE
    if backend == "nccl":
        DEVICE = torch.device("cuda", rank)
        torch.cuda.set_device(DEVICE)
    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world)
    import open_clip.loss as oc

    import vlops
    from vlops import distributed as VD

    VD._TILE_ROWS = 4  # the backwards' row x column pieces, small enough that these batches span several
    errs, raised = {}, {}
    scale, bias = 9.0, -2.0

    def compare(tag, sizes, fn_dist, fn_single, exact, rank_sum_grads, oc_fn=None, group_ranks=None, group=None,
                scale_split=False, oc_single=None):
        """Runs ``fn_dist`` on this rank's rows; ``exact``: "same" (every rank's loss is the global one) or
        "mean" (the mean over ranks is); ``rank_sum_grads``: the feature gradients are those of the sum over
        ranks (W x the single-process ones) rather than of this rank's loss alone; ``scale_split``: the scale
        gradient is split between the ranks otherwise than open_clip's (compared by its mean over ranks)."""
        members = list(range(world)) if group_ranks is None else group_ranks
        W = len(members)
        img, txt = global_batch(sizes, seed=len(tag) + 7 * len(sizes))
        me = members.index(rank)
        off, n = sum(sizes[:me]), sizes[me]
        loss, grads = run(fn_dist, img[off:off + n], txt[off:off + n], scale, bias)
        if oc_fn is not None:  # open_clip with the same flags, this rank
            oloss, ograds = run(oc_fn, img[off:off + n], txt[off:off + n], scale, bias)
            errs[f"{tag}/open_clip/loss"] = rel(loss, oloss)
            for name, g, og in zip(("image", "text", "scale", "bias"), grads, ograds):
                if name == "scale" and scale_split:
                    both = [None] * len(members)
                    dist.all_gather_object(both, (g.detach(), og.detach()), group=group)
                    g, og = torch.stack([x for x, _ in both]).mean(), torch.stack([y for _, y in both]).mean()
                    name = "scale (mean over ranks)"
                if og.abs().sum() > 0 or g.abs().sum() > 0:
                    errs[f"{tag}/open_clip/d{name}"] = rel(g, og)
        if exact is None:
            return
        sloss, sgrads = run(fn_single, img, txt, scale, bias)
        if oc_single is not None:  # the fused single-process loss is open_clip's on the concatenated batch
            oloss, ograds = run(oc_single, img, txt, scale, bias)
            errs[f"{tag}/open_clip single process/loss"] = rel(sloss, oloss)
            for name, g, og in zip(("image", "text", "scale"), sgrads, ograds):
                errs[f"{tag}/open_clip single process/d{name}"] = rel(g, og)
        pieces = [None] * W  # every member's loss and gradients
        dist.all_gather_object(pieces, (loss, [g.detach() for g in grads]), group=group)
        losses = torch.stack([p[0] for p in pieces])
        errs[f"{tag}/single/loss"] = rel(loss if exact == "same" else losses.mean(), sloss)
        k = float(W) if rank_sum_grads else 1.0
        errs[f"{tag}/single/dimage"] = rel(grads[0], k * sgrads[0][off:off + n])
        errs[f"{tag}/single/dtext"] = rel(grads[1], k * sgrads[1][off:off + n])
        for j, name in ((2, "scale"), (3, "bias")):
            mean = torch.stack([p[1][j] for p in pieces]).mean()
            if sgrads[j].abs() > 0 or mean.abs() > 0:
                errs[f"{tag}/single/d{name} (mean over ranks)"] = rel(mean, sgrads[j])

    equal = [6] * world
    unequal = [3, 5] if world == 2 else [2, 5, 3, 4, 1, 6, 2, 3][:world]
    for sizes, label in ((equal, "equal"), (unequal, "unequal")):
        for local in (False, True):
            for gwg in (False, True):
                tag = f"clip/{label}/local_loss={local}/gather_with_grad={gwg}"

                def fn_dist(i, t, s, b, local=local, gwg=gwg):
                    return VD.clip_loss(i, t, s, b, local_loss=local, gather_with_grad=gwg)

                def oc_fn(i, t, s, b, local=local, gwg=gwg):
                    return oc.ClipLoss(local_loss=local, gather_with_grad=gwg, rank=rank, world_size=world)(i, t, s, b)

                # exact: local_loss=False (every rank the global loss), local_loss=True with gather_with_grad
                exact = "same" if not local else ("mean" if gwg else None)
                compare(tag, sizes, fn_dist, lambda i, t, s, b: vlops.clip_loss(i, t, s, b), exact,
                        rank_sum_grads=gwg, oc_fn=oc_fn if label == "equal" else None, scale_split=local and gwg,
                        oc_single=lambda i, t, s, b: oc.ClipLoss()(i, t, s))
        tag = f"clip/{label}/local_loss=True/gather_with_grad=True/label_smoothing=0.1"
        compare(tag, sizes, lambda i, t, s, b: VD.clip_loss(i, t, s, b, local_loss=True, gather_with_grad=True,
                                                            label_smoothing=0.1),
                lambda i, t, s, b: vlops.clip_loss(i, t, s, b, label_smoothing=0.1), "mean", rank_sum_grads=True)
        tag = f"clip/{label}/ring"
        compare(tag, sizes, lambda i, t, s, b: vlops.nn.ClipLoss(local_loss=True, gather_with_grad=True, ring=True)(
                    i, t, s, b), lambda i, t, s, b: vlops.clip_loss(i, t, s, b), "mean", rank_sum_grads=True)
        # the ring gives each rank the loss and feature gradients of the gathered local_loss path
        img, txt = global_batch(sizes, seed=11)
        off, n = sum(sizes[:rank]), sizes[rank]
        ring = run(lambda i, t, s, b: VD.clip_loss(i, t, s, b, local_loss=True, gather_with_grad=True, ring=True),
                   img[off:off + n], txt[off:off + n], scale, bias)
        gathered = run(lambda i, t, s, b: VD.clip_loss(i, t, s, b, local_loss=True, gather_with_grad=True),
                       img[off:off + n], txt[off:off + n], scale, bias)
        errs[f"{tag}/gathered/loss"] = rel(ring[0], gathered[0])
        errs[f"{tag}/gathered/dimage"] = rel(ring[1][0], gathered[1][0])
        errs[f"{tag}/gathered/dtext"] = rel(ring[1][1], gathered[1][1])
        errs[f"{tag}/gathered/dbias"] = rel(ring[1][3], gathered[1][3])
        errs[f"{tag}/gathered/dscale"] = rel(ring[1][2], gathered[1][2])  # the same tiles' scale terms per rank
        for impl in VD.DIST_IMPLS:
            def oc_sig(i, t, s, b, impl=impl):
                return oc.SigLipLoss(rank=rank, world_size=world, dist_impl=impl)(i, t, s, b)

            compare(f"siglip/{label}/{impl}", sizes,
                    lambda i, t, s, b, impl=impl: vlops.nn.SigLipLoss(dist_impl=impl)(i, t, s, b),
                    lambda i, t, s, b: vlops.siglip_loss(i, t, s, b), "mean", rank_sum_grads=True,
                    oc_fn=oc_sig if label == "equal" else None,
                    oc_single=lambda i, t, s, b: oc.SigLipLoss()(i, t, s, b))

    # float64 features on the exact paths against the float64 reference (vlops.reference.contrastive) on the
    # global batch; the losses and logit_scale are float32 by contract (DESIGN.md), the feature gradients float64
    from vlops.reference import contrastive as R

    exact_paths = {
        "clip local_loss gathered": (lambda i, t, s, b: VD.clip_loss(i, t, s, b, local_loss=True,
                                                                     gather_with_grad=True), R.clip_loss),
        "clip ring": (lambda i, t, s, b: VD.clip_loss(i, t, s, b, local_loss=True, gather_with_grad=True,
                                                      ring=True), R.clip_loss),
        "siglip bidir": (lambda i, t, s, b: VD.siglip_loss(i, t, s, b, dist_impl="bidir"), R.siglip_loss),
        "siglip gather": (lambda i, t, s, b: VD.siglip_loss(i, t, s, b, dist_impl="gather"), R.siglip_loss),
    }
    for sizes, label in ((equal, "equal"), (unequal, "unequal")):
        img, txt = (x.double() for x in global_batch(sizes, seed=21))
        off, n = sum(sizes[:rank]), sizes[rank]
        for name, (fn_dist, fn_ref) in exact_paths.items():
            loss, grads = run(fn_dist, img[off:off + n], txt[off:off + n], scale, bias)
            rloss, rgrads = run(fn_ref, img, txt, scale, bias)
            pieces = [None] * world
            dist.all_gather_object(pieces, (loss, grads[2].detach()))
            tag = f"f64/{label}/{name}"
            errs[f"{tag}/loss (mean over ranks)"] = rel(torch.stack([p[0] for p in pieces]).mean(), rloss)
            errs[f"{tag}/dimage"] = rel(grads[0], world * rgrads[0][off:off + n])
            errs[f"{tag}/dtext"] = rel(grads[1], world * rgrads[1][off:off + n])
            errs[f"{tag}/dscale (mean over ranks)"] = rel(torch.stack([p[1] for p in pieces]).mean(), rgrads[2])

    # a second backward of a retained graph adds the same gradients again
    img, txt = global_batch(equal, seed=3)
    retained = {
        "clip gathered": lambda i, t: VD.clip_loss(i, t, 7.0, local_loss=True, gather_with_grad=True),
        "clip ring": lambda i, t: VD.clip_loss(i, t, 7.0, local_loss=True, gather_with_grad=True, ring=True),
        "siglip shift": lambda i, t: VD.siglip_loss(i, t, 7.0, -3.0, dist_impl="shift"),
    }
    for name, fn in retained.items():
        i = img[rank * 6:rank * 6 + 6].clone().requires_grad_()
        t = txt[rank * 6:rank * 6 + 6].clone().requires_grad_()
        loss = fn(i, t)
        loss.backward(retain_graph=True)
        first = (i.grad.clone(), t.grad.clone())
        loss.backward()
        errs[f"retain_graph/{name}/dimage"] = rel(i.grad, 2 * first[0])
        errs[f"retain_graph/{name}/dtext"] = rel(t.grad, 2 * first[1])

    # a subgroup (the functional forms' group argument): the odd ranks of 4, or rank 1 alone of 2
    if world >= 4:
        odd = [1, 3]
        sub = dist.new_group(odd)  # every rank must call new_group
        if rank in odd:
            sizes = [4, 7]
            for impl in ("shift", "gather"):
                compare(f"subgroup/siglip/{impl}", sizes,
                        lambda i, t, s, b, impl=impl: VD.siglip_loss(i, t, s, b, dist_impl=impl, group=sub),
                        lambda i, t, s, b: vlops.siglip_loss(i, t, s, b), "mean", rank_sum_grads=True,
                        group_ranks=odd, group=sub)
            compare("subgroup/clip/local_loss", sizes,
                    lambda i, t, s, b: VD.clip_loss(i, t, s, b, local_loss=True, gather_with_grad=True, group=sub),
                    lambda i, t, s, b: vlops.clip_loss(i, t, s, b), "mean", rank_sum_grads=True, group_ranks=odd,
                    group=sub)
        dist.barrier()

    # DDP: the parameters' gradients after DDP's averaging equal the single-process gradients of the global loss
    for kind, sizes, label in (("clip", equal, "equal"), ("clip", unequal, "unequal"), ("ring", equal, "equal"),
                               ("ring", unequal, "unequal"), ("siglip", equal, "equal"),
                               ("siglip", unequal, "unequal")):
        torch.manual_seed(0)
        model = Towers().to(DEVICE)
        ref_model = Towers().to(DEVICE)
        ref_model.load_state_dict(model.state_dict())
        g = torch.Generator().manual_seed(5)
        N = sum(sizes)
        xi, xt = torch.randn(N, 10, generator=g).to(DEVICE), torch.randn(N, 12, generator=g).to(DEVICE)
        off, n = sum(sizes[:rank]), sizes[rank]
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[DEVICE] if DEVICE.type == "cuda" else None)
        loss_fn = (vlops.nn.SigLipLoss(dist_impl="bidir") if kind == "siglip"
                   else vlops.nn.ClipLoss(local_loss=True, gather_with_grad=True, ring=kind == "ring"))
        loss_fn(*ddp(xi[off:off + n], xt[off:off + n])).backward()
        single_fn = vlops.siglip_loss if kind == "siglip" else vlops.clip_loss
        single_fn(*ref_model(xi, xt)).backward()
        for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
            if q.grad.abs().sum() > 0:
                errs[f"ddp/{kind}/{label}/d{name}"] = rel(p.grad, q.grad)
        del ddp  # its reducer holds the process group: released while the group is alive
        gc.collect()

    # bad input on one rank: every rank raises at once (the test's timeout catches a hang)
    img, txt = global_batch(equal, seed=1)
    mine = slice(rank * 6, rank * 6 + 6)
    cases = {
        "D differs on the last rank": lambda: VD.clip_loss(
            img[mine, : D - (rank == world - 1)].contiguous(), txt[mine, : D - (rank == world - 1)].contiguous(),
            5.0),
        "3-D features on rank 0": lambda: VD.siglip_loss(
            img[mine].unsqueeze(0) if rank == 0 else img[mine], txt[mine], 5.0, 0.0),
        "image and text batch differ on rank 0": lambda: VD.clip_loss(
            img[mine][: 6 - (rank == 0)], txt[mine], 5.0, local_loss=True),
        "ring without local_loss on every rank": lambda: VD.clip_loss(img[mine], txt[mine], 5.0, ring=True),
        "dtype differs on rank 1": lambda: VD.clip_loss(
            img[mine].double() if rank == 1 else img[mine], txt[mine].double() if rank == 1 else txt[mine], 5.0),
    }
    for name, fn in cases.items():
        try:
            fn()
            raised[name] = None
        except (ValueError, TypeError) as e:
            raised[name] = f"{type(e).__name__}: {e}"
    try:
        vlops.nn.ClipLoss(world_size=world + 1)
        raised["world_size mismatch"] = None
    except ValueError as e:
        raised["world_size mismatch"] = f"{type(e).__name__}: {e}"
    m = vlops.nn.SigLipLoss()
    errs["defaults from the group (0 = right)"] = float(m.rank != rank or m.world_size != world)
    dist.barrier()
    dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump({"errs": errs, "raised": raised}, f, indent=1)


class Towers(torch.nn.Module):
    """A two-tower model small enough for the DDP check: features, logit scale and bias, as open_clip's CLIP
    returns them."""

    def __init__(self):
        super().__init__()
        self.img = torch.nn.Linear(10, D)
        self.txt = torch.nn.Linear(12, D)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-3.0))

    def forward(self, xi, xt):
        return (F.normalize(self.img(xi), dim=-1), F.normalize(self.txt(xt), dim=-1), self.logit_scale.exp(),
                self.logit_bias)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], *sys.argv[5:6])
    # The results are written and the group destroyed: leave without the interpreter's teardown, where gloo's
    # threads have (rarely, under load) aborted the process ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
