"""Distributed ClipLoss (all-gather and ring) against open_clip and a single-process reference.

Each test spawns W processes (gloo on 127.0.0.1, a free port) that run a group of checks and then
destroy the process group; a deadline kills stragglers so a hang fails instead of blocking CI.
"""
from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import contrastive_kernels as ck
from contrastive_kernels import distributed as ckd
from contrastive_kernels import reference
from contrastive_kernels._peers import load_open_clip_loss
from helpers import open_clip_loss_module
from contrastive_kernels.gamma import GammaContrastiveLoss

TIMEOUT_S = 150
RTOL = 1e-9  # float64 on both sides; only summation order differs
SETTINGS = [(False, False), (False, True), (True, True), (True, False)]


def _open_clip_loss_module():
    return load_open_clip_loss()[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a, b, what, rtol=RTOL, atol=0.0):
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    ref = b.abs().max().item() if b.numel() else 0.0
    assert err <= rtol * ref + atol, f"{what}: max abs err {err:.3e} (ref magnitude {ref:.3e})"


def _features(seed, n_per_rank, d, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    n_tot = sum(n_per_rank)
    img = torch.nn.functional.normalize(torch.randn(n_tot, d, generator=g, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(n_tot, d, generator=g, dtype=torch.float64), dim=1)
    return img.to(dtype), txt.to(dtype)


def _rows(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _run(loss_fn, img, txt, scale, bias=None):
    img, txt, s = _leaf(img), _leaf(txt), _leaf(scale)
    b = None if bias is None else _leaf(bias)
    loss = loss_fn(img, txt, s, b) if b is not None else loss_fn(img, txt, s)
    loss.backward()
    return loss.detach(), img.grad, txt.grad, s.grad, (None if b is None else b.grad)


def _global_reference(img_all, txt_all, scale, n, rank, w, local_loss, gather_with_grad):
    """What open_clip's rank `rank` gets, derived from single-process autograd on all rows."""
    I, T, s = _leaf(img_all), _leaf(txt_all), _leaf(scale)
    rows = slice(rank * n, (rank + 1) * n)
    if not local_loss:
        loss = reference.clip_loss(I, T, s)
        loss.backward()
        mult = w if gather_with_grad else 1
        return loss.detach(), mult * I.grad[rows], mult * T.grad[rows], s.grad
    labels = torch.arange(n) + rank * n
    if gather_with_grad:
        loss = 0.5 * (reference.info_nce(I[rows], T, s, labels) + reference.info_nce(T[rows], I, s, labels))
        g_s = torch.autograd.grad(loss, s, retain_graph=True)[0]
        total = sum(0.5 * (reference.info_nce(I[r * n:(r + 1) * n], T, s, torch.arange(n) + r * n)
                           + reference.info_nce(T[r * n:(r + 1) * n], I, s, torch.arange(n) + r * n))
                    for r in range(w))
        total.backward()
        return loss.detach(), I.grad[rows], T.grad[rows], g_s
    loss = 0.5 * (reference.info_nce(I[rows], T.detach(), s, labels)
                  + reference.info_nce(T[rows], I.detach(), s, labels))
    loss.backward()
    return loss.detach(), I.grad[rows], T.grad[rows], s.grad


def _all_reduce_sum(t):
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


# ------------------------------------------------------------------------------------------------
# checks run inside each rank
# ------------------------------------------------------------------------------------------------

def _check_open_clip_parity(rank, w, oc):
    n, d = 5, 7
    img_all, txt_all = _features(1, [n] * w, d)
    img, txt = _rows(img_all, [n] * w, rank), _rows(txt_all, [n] * w, rank)
    scale = torch.tensor(14.3, dtype=torch.float64)
    bias = torch.tensor(-2.5, dtype=torch.float64)
    for local_loss, gwg in SETTINGS:
        tag = f"W={w} rank={rank} local_loss={local_loss} gather_with_grad={gwg}"
        kw = dict(local_loss=local_loss, gather_with_grad=gwg, rank=rank, world_size=w)
        ours = _run(ck.ClipLoss(**kw, cache_labels=True, backend="chunked"), img, txt, scale, bias)
        theirs = _run(oc.ClipLoss(**kw), img, txt, scale, bias)
        for name, a, b in zip(("loss", "grad image", "grad text", "grad logit_scale"), ours, theirs):
            _close(a, b, f"{tag} vs open_clip: {name}")
        assert ours[4] is not None and ours[4].item() == 0.0, f"{tag}: logit_bias grad {ours[4]}"
        assert abs(theirs[4].item()) < 1e-12, f"{tag}: open_clip logit_bias grad {theirs[4]}"
        ref = _global_reference(img_all, txt_all, scale, n, rank, w, local_loss, gwg)
        for name, a, b in zip(("loss", "grad image", "grad text", "grad logit_scale"), ours, ref):
            _close(a, b, f"{tag} vs single-process reference: {name}")
        # A second call hits the label cache.
        again = _run(ck.ClipLoss(**kw, cache_labels=True, backend="reference"), img, txt, scale)
        _close(again[0], ref[0], f"{tag}: reference backend loss")
        _check_matryoshka_gathered(tag, kw, img, txt, scale)


def _prefix_loop(make_loss, dims, weights, normalize):
    """Σ_t w_t·loss(x[:, :d_t]) by a loop of separate calls (the Matryoshka oracle)."""
    cut = ((lambda x, d: torch.nn.functional.normalize(x[:, :d], dim=1)) if normalize
           else (lambda x, d: x[:, :d]))
    return lambda i, t, *sb: sum(w * make_loss()(cut(i, d), cut(t, d), *sb)
                                 for d, w in zip(dims, weights))


def _check_matryoshka_gathered(tag, kw, img, txt, scale):
    # every prefix from one sweep on the gathered features = the sum over prefixes of the
    # distributed ClipLoss (checked above against open_clip) on normalised prefixes, per rank
    dims, weights = (3, 7), (2.0, 0.5)
    fused = _run(ck.ClipLoss(**kw, backend="chunked", matryoshka_dims=dims,
                             matryoshka_weights=weights), img, txt, scale)
    loop = _run(_prefix_loop(lambda: ck.ClipLoss(**kw, backend="chunked"), dims, weights, True),
                img, txt, scale)
    for name, a, b in zip(("loss", "grad image", "grad text", "grad logit_scale"), fused, loop):
        _close(a, b, f"{tag} Matryoshka vs the per-prefix loop: {name}")


def _ring_setup(seed, rank, w, scale):
    """(img_all, txt_all, this rank's img, txt, scale, the ring's ClipLoss kwargs), N=6, D=9."""
    n, d = 6, 9
    img_all, txt_all = _features(seed, [n] * w, d)
    img, txt = _rows(img_all, [n] * w, rank), _rows(txt_all, [n] * w, rank)
    kw = dict(local_loss=True, gather_with_grad=True, rank=rank, world_size=w, backend="chunked")
    return img_all, txt_all, img, txt, torch.tensor(scale, dtype=torch.float64), kw


def _check_ring_equals_gather(rank, w):
    n = 6
    img_all, txt_all, img, txt, scale, kw = _ring_setup(2, rank, w, 31.0)
    gath = _run(ck.ClipLoss(**kw), img, txt, scale)
    ring = _run(ck.ClipLoss(**kw, ring=True), img, txt, scale, torch.tensor(0.7, dtype=torch.float64))
    mod = _run(ckd.RingClipLoss(backend="chunked"), img, txt, scale)
    for name, a, m, b in zip(("loss", "grad image", "grad text"), ring[:3], mod[:3], gath[:3]):
        _close(a, b, f"W={w} rank={rank} ring vs gather: {name}")
        _close(m, b, f"W={w} rank={rank} RingClipLoss vs gather: {name}")
    assert ring[4].item() == 0.0
    # logit_scale: each rank holds its share; the sum over ranks (what DDP averages) is identical.
    _close(_all_reduce_sum(ring[3]), _all_reduce_sum(gath[3]), f"W={w} ring vs gather: Σ_r grad s")
    _close(_all_reduce_sum(mod[3]), _all_reduce_sum(gath[3]),
           f"W={w} RingClipLoss vs gather: Σ_r grad s")
    I, T, s = _leaf(img_all), _leaf(txt_all), _leaf(scale)
    reference.clip_loss(I, T, s).backward()
    _close(_all_reduce_sum(ring[3]), w * s.grad, f"W={w} ring: Σ_r grad s = W·∂L/∂s")
    _close(ring[1], w * I.grad[rank * n:(rank + 1) * n], f"W={w} ring: grad image = W·∂L/∂I_r")
    exact = _run(ckd.RingClipLoss(backend="chunked", exact_scale_grad=True), img, txt, scale)
    for name, a, b in zip(("loss", "grad image", "grad text", "grad logit_scale"), exact[:4], gath[:4]):
        _close(a, b, f"W={w} rank={rank} exact_scale_grad ring vs gather: {name}")


def _check_matryoshka_ring(rank, w):
    # the ring with every prefix from its two passes = the loop over prefixes of the gathered
    # (True, True) ClipLoss, checked against open_clip above; Σ_r of the scale gradient agrees
    # (each rank holds its share), and exactly per rank with exact_scale_grad
    n, d = 6, 9
    _, _, img, txt, scale, kw = _ring_setup(21, rank, w, 23.0)
    dims, weights = (2, 5, 9), (1.0, 0.25, 2.0)
    mrl = dict(matryoshka_dims=dims, matryoshka_weights=weights)
    for normalize in (True, False):
        tag = f"W={w} rank={rank} Matryoshka ring normalize={normalize}"
        loop = _run(_prefix_loop(lambda: ck.ClipLoss(**kw), dims, weights, normalize), img, txt,
                    scale)
        ring = _run(ck.ClipLoss(**kw, ring=True, **mrl, matryoshka_normalize=normalize), img, txt,
                    scale)
        exact = _run(lambda i, t, s: ckd.ring_clip_loss(i, t, s, backend="chunked",
                                                        exact_scale_grad=True, **mrl,
                                                        matryoshka_normalize=normalize),
                     img, txt, scale)
        for name, a, b in zip(("loss", "grad image", "grad text"), ring[:3], loop[:3]):
            _close(a, b, f"{tag}: {name}")
        _close(_all_reduce_sum(ring[3]), _all_reduce_sum(loop[3]), f"{tag}: Σ_r grad logit_scale")
        for name, a, b in zip(("loss", "grad image", "grad text", "grad logit_scale"), exact[:4],
                              loop[:4]):
            _close(a, b, f"{tag} exact_scale_grad: {name}")
    # O(N·(D + k)) per rank: the travelling accumulator holds a block's key gradient and its k
    # column sums, never the gathered (W·N, D) features
    i, t, s = _leaf(img), _leaf(txt), _leaf(scale)
    with _MaxNumel() as probe:
        ckd.ring_clip_loss(i, t, s, backend="chunked", **mrl).backward()
    assert probe.max_numel <= n * (d + len(dims)), f"Matryoshka ring made {probe.max_numel}"


def _check_ring_uneven(rank, w):
    nq = [3 + r for r in range(w)]
    mk = [q + (r % 2) for r, q in enumerate(nq)]
    d = 5
    g = torch.Generator().manual_seed(3)
    q_all = torch.randn(sum(nq), d, generator=g, dtype=torch.float64)
    k_all = torch.randn(sum(mk), d, generator=g, dtype=torch.float64)
    weights = torch.randn(w, 3, max(mk), generator=g, dtype=torch.float64)
    scale = torch.tensor(3.7, dtype=torch.float64)

    def loss_of(row, col, pos, r):
        return ((weights[r, 0, :row.shape[0]] * row).sum() + (weights[r, 1, :col.shape[0]] * col).sum()
                + (weights[r, 2, :pos.shape[0]] * pos).sum())

    q, k, s = _leaf(_rows(q_all, nq, rank)), _leaf(_rows(k_all, mk, rank)), _leaf(scale)
    row, col, pos = ckd.ring_lse_stats(q, k, s, backend="chunked")
    loss_of(row, col, pos, rank).backward()
    Q, K, S = _leaf(q_all), _leaf(k_all), _leaf(scale)
    labels = torch.cat([torch.arange(nq[r]) + sum(mk[:r]) for r in range(w)])
    R, C, P = reference.lse_stats(Q, K, S, labels)
    total = sum(loss_of(_rows(R, nq, r), _rows(C, mk, r), _rows(P, nq, r), r) for r in range(w))
    total.backward()
    tag = f"W={w} rank={rank} uneven ring_lse_stats"
    _close(row, _rows(R, nq, rank), f"{tag}: row_lse")
    _close(col, _rows(C, mk, rank), f"{tag}: col_lse")
    _close(pos, _rows(P, nq, rank), f"{tag}: pos")
    _close(q.grad, _rows(Q.grad, nq, rank), f"{tag}: grad query")
    _close(k.grad, _rows(K.grad, mk, rank), f"{tag}: grad keys")
    _close(_all_reduce_sum(s.grad), S.grad, f"{tag}: Σ_r grad scale")
    # Row statistics only (one-directional InfoNCE against every rank's keys).
    row_only, col_none, _ = ckd.ring_lse_stats(q.detach(), k.detach(), 3.7, compute_col=False,
                                               backend="chunked")
    assert col_none.shape == (0,)
    _close(row_only, _rows(R, nq, rank), f"{tag}: row_lse without columns")


def _check_ring_float32(rank, w):
    n, d = 8, 16
    img_all, txt_all = _features(4, [n] * w, d, torch.float32)
    img, txt = _rows(img_all, [n] * w, rank), _rows(txt_all, [n] * w, rank)
    scale = torch.tensor(50.0)
    kw = dict(local_loss=True, gather_with_grad=True, rank=rank, world_size=w, backend="chunked")
    gath = _run(ck.ClipLoss(**kw), img, txt, scale)
    ring = _run(ck.ClipLoss(**kw, ring=True), img, txt, scale)
    assert ring[1].dtype == torch.float32 and ring[0].dtype == torch.float32
    for name, a, b in zip(("loss", "grad image", "grad text"), ring[:3], gath[:3]):
        _close(a, b, f"W={w} float32 ring vs gather: {name}", rtol=1e-5)


class _MaxNumel(torch.utils._python_dispatch.TorchDispatchMode):
    """Largest tensor any torch-level op produces (kernel internals are the backend's business)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def _check_ring_memory(rank, w):
    n, d = 16, 8   # N·W·D and N·W·N both exceed N·max(N, D), the most the ring may hold at once
    img_all, txt_all = _features(5, [n] * w, d)
    img, txt = _leaf(_rows(img_all, [n] * w, rank)), _leaf(_rows(txt_all, [n] * w, rank))
    s = _leaf(torch.tensor(10.0, dtype=torch.float64))
    with _MaxNumel() as ring_probe:
        ckd.ring_clip_loss(img, txt, s, backend="chunked").backward()
    with _MaxNumel() as gather_probe:
        ck.ClipLoss(True, True, rank=rank, world_size=w, backend="chunked")(img, txt, s).backward()
    assert ring_probe.max_numel <= n * d, f"ring made a tensor of {ring_probe.max_numel} elements"
    assert gather_probe.max_numel >= w * n * d, "the probe should see the gathered (W·N, D) features"


def _check_errors(rank, w):
    with pytest.raises(ValueError, match="does not match the process group"):
        ck.ClipLoss(rank=(rank + 1) % w, world_size=w)(torch.randn(2, 3), torch.randn(2, 3), 1.0)
    with pytest.raises(ValueError, match="feature dimension differs across ranks"):
        ckd.ring_clip_loss(torch.randn(2, 3 + rank), torch.randn(2, 3 + rank), 1.0, backend="chunked")
    with pytest.raises(ValueError, match="needs M_r >= N_r"):
        ckd.ring_lse_stats(torch.randn(3, 4), torch.randn(3 - (rank == 1), 4), 1.0, backend="chunked")
    with pytest.raises(ValueError, match="local_loss=True, gather_with_grad=True"):
        ck.ClipLoss(rank=rank, world_size=w, ring=True)
    # The group still works after the errors (no half-finished collective).
    dist.barrier()


def _check_ddp_semantics(rank, w):
    """Under DDP (gradients averaged over ranks) which gradient does each parameter end with?"""
    n, d_in, d = 4, 6, 5
    g = torch.Generator().manual_seed(6)
    x_img = torch.randn(n * w, d_in, generator=g, dtype=torch.float64)
    x_txt = torch.randn(n * w, d_in, generator=g, dtype=torch.float64)
    init = [torch.randn(d, d_in, generator=g, dtype=torch.float64) for _ in range(2)]

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.img = torch.nn.Linear(d_in, d, bias=False, dtype=torch.float64)
            self.txt = torch.nn.Linear(d_in, d, bias=False, dtype=torch.float64)
            self.logit_scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
            with torch.no_grad():
                self.img.weight.copy_(init[0])
                self.txt.weight.copy_(init[1])

        def forward(self, xi, xt):
            return self.img(xi), self.txt(xt), self.logit_scale.exp()

    single = Tower()
    fi, ft, s = single(x_img, x_txt)
    reference.clip_loss(fi, ft, s).backward()
    names = ("img.weight", "txt.weight", "logit_scale")
    true = [dict(single.named_parameters())[k].grad for k in names]

    rows = slice(rank * n, (rank + 1) * n)
    cases = [((False, False), False), ((False, True), False), ((True, True), False),
             ((True, True), True)]
    for (local_loss, gwg), ring in cases:
        model = torch.nn.parallel.DistributedDataParallel(Tower())
        loss_fn = ck.ClipLoss(local_loss, gwg, rank=rank, world_size=w, backend="chunked", ring=ring)
        loss_fn(*model(x_img[rows], x_txt[rows])).backward()
        got = [dict(model.module.named_parameters())[k].grad for k in names]
        tag = f"DDP W={w} local_loss={local_loss} gather_with_grad={gwg} ring={ring}"
        if gwg:
            # Consistent: every parameter gets exactly the gradient of the global mean loss.
            for name, a, b in zip(("img tower", "txt tower", "logit_scale"), got, true):
                _close(a, b, f"{tag}: {name}", rtol=1e-8)
        else:
            # open_clip's default: the towers see ∂L/∂θ / W, logit_scale the full ∂L/∂s — NOT
            # ∂L/∂s·W. Scaling logit_scale's gradient by W would widen the mismatch to W².
            _close(got[0], true[0] / w, f"{tag}: img tower", rtol=1e-8)
            _close(got[1], true[1] / w, f"{tag}: txt tower", rtol=1e-8)
            _close(got[2], true[2], f"{tag}: logit_scale", rtol=1e-8)


def _check_gamma(rank, w):
    d, num_samples, steps = 6, 11, 3
    scale = torch.tensor(9.0, dtype=torch.float64)
    configs = [dict(ring=False, sizes=[4] * w, symmetric=True, estimator="gamma"),
               dict(ring=True, sizes=[3 + r for r in range(w)], symmetric=True, estimator="gamma"),
               dict(ring=True, sizes=[4] * w, symmetric=False, estimator="ema")]
    for cfg in configs:
        sizes = cfg["sizes"]
        tag = f"W={w} rank={rank} gamma {cfg}"
        kw = dict(estimator=cfg["estimator"], symmetric=cfg["symmetric"], update_weight=0.6,
                  dtype=torch.float64, backend="chunked")
        ours = ckd.DistributedGammaContrastiveLoss(
            num_samples, ring=cfg["ring"], generator=torch.Generator().manual_seed(100 + rank), **kw)
        single = GammaContrastiveLoss(num_samples, generator=torch.Generator().manual_seed(100), **kw)
        g = torch.Generator().manual_seed(8)
        for step in range(steps):
            img_all, txt_all = _features(20 + step, sizes, d)
            # Indices repeat across steps and across ranks within a step (a duplicate pair).
            index_all = torch.randint(0, num_samples, (sum(sizes),), generator=g)
            index_all[-1] = index_all[0]
            img, txt, s = _leaf(_rows(img_all, sizes, rank)), _leaf(_rows(txt_all, sizes, rank)), _leaf(scale)
            out = ours(img, txt, _rows(index_all, sizes, rank), s, output_dict=True)
            out["contrastive_loss"].backward()
            I, T, S = _leaf(img_all), _leaf(txt_all), _leaf(scale)
            ref = single(I, T, index_all, S, output_dict=True)
            ref["contrastive_loss"].backward()
            st = f"{tag} step {step}"
            _close(_all_reduce_sum(out["contrastive_loss"]) / w, ref["contrastive_loss"], f"{st}: mean loss")
            _close(_all_reduce_sum(out["info_nce"]) / w, ref["info_nce"], f"{st}: mean info_nce")
            for name in ("log_z_row", "visited_row") + (("log_z_col", "visited_col") if cfg["symmetric"] else ()):
                mine = getattr(ours, name).to(torch.float64)
                root = mine.clone()
                dist.broadcast(root, 0)
                assert torch.equal(mine, root), f"{st}: {name} differs across ranks"
                _close(mine, getattr(single, name), f"{st}: {name} vs single process", rtol=1e-12)
            # Gradients: W·(single-process gradient) on the local rows; Σ_r over logit_scale.
            _close(img.grad, w * _rows(I.grad, sizes, rank), f"{st}: grad image", rtol=1e-8)
            _close(txt.grad, w * _rows(T.grad, sizes, rank), f"{st}: grad text", rtol=1e-8)
            _close(_all_reduce_sum(s.grad), w * S.grad, f"{st}: Σ_r grad logit_scale", rtol=1e-8)


def _check_siglip_parity(rank, w, oc):
    """SigLipLoss per rank vs open_clip's, every dist_impl: loss, image, text, scale, bias grads."""
    n, d = 5, 7
    img_all, txt_all = _features(11, [n] * w, d)
    img, txt = _rows(img_all, [n] * w, rank), _rows(txt_all, [n] * w, rank)
    for scale, bias in ((10.0, -10.0), (100.0, -12.5)):
        s = torch.tensor(scale, dtype=torch.float64)
        b = torch.tensor(bias, dtype=torch.float64)
        for impl in ("bidir", "shift", "reduce", "gather"):
            tag = f"SigLIP W={w} rank={rank} {impl} s={scale}"
            kw = dict(rank=rank, world_size=w, dist_impl=impl)
            ours = _run(ck.SigLipLoss(**kw, backend="chunked"), img, txt, s, b)
            theirs = _run(oc.SigLipLoss(**kw), img, txt, s, b)
            for name, a, t in zip(("loss", "grad image", "grad text", "grad logit_scale",
                                   "grad logit_bias"), ours, theirs):
                _close(a, t, f"{tag} vs open_clip: {name}")
    # the ring forms hold O(N·D): no tensor larger than one block, while gather holds W·N·D
    n, d = 16, 8
    img_all, txt_all = _features(12, [n] * w, d)
    img, txt = _leaf(_rows(img_all, [n] * w, rank)), _leaf(_rows(txt_all, [n] * w, rank))
    s, b = _leaf(torch.tensor(10.0, dtype=torch.float64)), _leaf(torch.tensor(-10.0, dtype=torch.float64))
    with _MaxNumel() as ring_probe:
        ck.SigLipLoss(rank=rank, world_size=w, dist_impl="shift", backend="chunked")(img, txt, s, b).backward()
    with _MaxNumel() as gather_probe:
        ck.SigLipLoss(rank=rank, world_size=w, dist_impl="gather", backend="chunked")(img, txt, s, b).backward()
    assert ring_probe.max_numel <= n * max(n, d), f"SigLIP ring made a tensor of {ring_probe.max_numel}"
    assert gather_probe.max_numel >= w * n * d, "the probe should see the gathered texts"


def _check_matryoshka_siglip(rank, w):
    # every dist_impl with every prefix from one sweep = the loop over prefixes of the same
    # distributed SigLipLoss (checked against open_clip above): loss and all four gradients
    n, d = 5, 8
    img_all, txt_all = _features(22, [n] * w, d)
    img, txt = _rows(img_all, [n] * w, rank), _rows(txt_all, [n] * w, rank)
    s, b = torch.tensor(12.0, dtype=torch.float64), torch.tensor(-6.5, dtype=torch.float64)
    dims, weights = (3, 4, 8), (0.5, 1.0, 2.0)
    for impl in ("bidir", "shift", "reduce", "gather"):
        kw = dict(rank=rank, world_size=w, dist_impl=impl, backend="chunked")
        for normalize in (True, False):
            tag = f"SigLIP W={w} rank={rank} {impl} Matryoshka normalize={normalize}"
            loop = _run(_prefix_loop(lambda: ck.SigLipLoss(**kw), dims, weights, normalize),
                        img, txt, s, b)
            ours = _run(ck.SigLipLoss(**kw, matryoshka_dims=dims, matryoshka_weights=weights,
                                      matryoshka_normalize=normalize), img, txt, s, b)
            for name, x, y in zip(("loss", "grad image", "grad text", "grad logit_scale",
                                   "grad logit_bias"), ours, loop):
                _close(x, y, f"{tag}: {name}")


def _check_distill_parity(rank, w, oc):
    # open_clip's DistillClipLoss in all four settings: the teacher gathered like the student, its
    # features and scale requiring grad (open_clip does not detach the teacher)
    n, d, dt = 4, 6, 5
    img_all, txt_all = _features(3, [n] * w, d)
    dimg_all, dtxt_all = _features(4, [n] * w, dt)
    rows = lambda t: _rows(t, [n] * w, rank)  # noqa: E731
    feats = [rows(t) for t in (img_all, txt_all, dimg_all, dtxt_all)]
    scales = [torch.tensor(14.3, dtype=torch.float64), torch.tensor(40.0, dtype=torch.float64)]

    def run(loss_fn):
        leaves = [_leaf(t) for t in feats + scales]
        c, dl = loss_fn(leaves[0], leaves[1], leaves[4], leaves[2], leaves[3], leaves[5])
        (c + 3.0 * dl).backward()
        return [c.detach(), dl.detach()] + [x.grad for x in leaves]

    names = ("contrastive", "distill", "grad image", "grad text", "grad dist image",
             "grad dist text", "grad logit_scale", "grad dist_logit_scale")
    for local_loss, gwg in SETTINGS:
        tag = f"W={w} rank={rank} local_loss={local_loss} gather_with_grad={gwg}"
        kw = dict(local_loss=local_loss, gather_with_grad=gwg, rank=rank, world_size=w)
        ours = run(ck.DistillClipLoss(**kw, cache_labels=True, backend="chunked"))
        theirs = run(oc.DistillClipLoss(**kw, cache_labels=True))
        for name, a, b in zip(names, ours, theirs):
            if b is None:
                assert a is None, f"{tag}: {name} where open_clip has none"
            else:
                _close(a, b, f"{tag} DistillClipLoss vs open_clip: {name}")


CHECKS = {
    "open_clip": _check_open_clip_parity,
    "distill": _check_distill_parity,
    "siglip": lambda r, w, oc: (_check_siglip_parity(r, w, oc), _check_matryoshka_siglip(r, w)),
    "ring": lambda r, w, oc: (_check_ring_equals_gather(r, w), _check_ring_uneven(r, w),
                              _check_ring_float32(r, w), _check_ring_memory(r, w),
                              _check_matryoshka_ring(r, w)),
    "errors_ddp_gamma": lambda r, w, oc: (_check_errors(r, w), _check_ddp_semantics(r, w),
                                          _check_gamma(r, w)),
}


def _worker(rank, world_size, port, groups):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        oc = _open_clip_loss_module()
        for name in groups:
            CHECKS[name](rank, world_size, oc)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(world_size, groups):
    ctx = mp.start_processes(_worker, args=(world_size, _free_port(), groups), nprocs=world_size,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers (W={world_size}, {groups}) did not finish in "
                            f"{TIMEOUT_S}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)


needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


@needs_gloo
@pytest.mark.parametrize("world_size", [2, 3])
def test_open_clip_parity(world_size):
    open_clip_loss_module()  # skip locally / fail in CI when open_clip is missing
    _spawn(world_size, ["open_clip", "siglip", "distill"])


@needs_gloo
@pytest.mark.parametrize("world_size", [2, 3])
def test_ring_ddp_and_gamma(world_size):
    # needs no open_clip: against the gather variant and single-process references
    _spawn(world_size, ["ring", "errors_ddp_gamma"])


def test_world_size_one_is_single_process():
    img, txt = _features(7, [6], 4)
    ours = _run(ck.ClipLoss(world_size=1, ring=True, local_loss=True, gather_with_grad=True,
                            backend="chunked"), img, txt,
                torch.tensor(5.0, dtype=torch.float64))
    ref = _run(reference.clip_loss, img, txt, torch.tensor(5.0, dtype=torch.float64))
    for a, b in zip(ours[:4], ref[:4]):
        _close(a, b, "world_size=1")


def test_needs_process_group():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ck.ClipLoss(rank=0, world_size=2)(torch.randn(2, 3), torch.randn(2, 3), 1.0)


def test_sizes_travel_host_to_host_under_nccl(monkeypatch):
    # No NCCL here: the collective layer is replaced by stubs that record what would run. Under
    # the default NCCL group the sizes must go through one gloo twin (made once, reused) as CPU
    # tensors, so reading them back never waits for the GPU.
    from contrastive_kernels.distributed import _comm

    made, gathered = [], []
    monkeypatch.setattr(_comm, "_HOST_GROUPS", {})
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl" if group is None else "gloo")
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "new_group", lambda **kw: made.append(kw) or "gloo-twin")

    def all_gather(out, t, group=None):
        gathered.append((group, t.device.type))
        for o in out:
            o.copy_(t)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    q, k = torch.randn(3, 4), torch.randn(5, 4)
    for _ in range(2):
        assert _comm.exchange_sizes(q, k, None) == [(3, 5, 4), (3, 5, 4)]
    assert made == [{"backend": "gloo"}]
    assert gathered == [("gloo-twin", "cpu"), ("gloo-twin", "cpu")]
    # a user subgroup keeps its own backend
    assert _comm.host_group("subgroup") == "subgroup"
