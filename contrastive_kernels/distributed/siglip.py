"""Distributed sigmoid (SigLIP) loss with exactly open_clip's per-rank semantics (docs/math.md §7).

Rank r's loss is ``(1/N)·Σ`` over its images of the sigmoid terms against its own texts (diagonal
positives) and against every other rank's texts (negatives only). open_clip computes the same
value four ways (``dist_impl``); so does this module, without any N×N logit matrix:

* ``"bidir"``, ``"shift"``: the gather-free ring (``_RingSigmoid``): text blocks travel point to
  point, one in flight, O(N·D) memory per rank; in the backward each block's text gradient
  travels home behind it. (open_clip's two patterns differ only in how the blocks move.)
* ``"gather"``: ``torch.distributed.nn.all_gather`` of the texts (autograd), O(W·N·D) memory.
* ``"reduce"``: rank i's texts by an autograd ``all_reduce`` of ``text·[rank = i]``, as open_clip.

Per rank, under all four: value ``L_r``; image gradient ``∂L_r/∂I_r``; text gradient
``Σ_r' ∂L_r'/∂T_r``; ``logit_scale`` and ``logit_bias`` gradients ``∂L_r/∂s``, ``∂L_r/∂b`` (the
ring computes all of them locally: every term of L_r involves this rank's image rows).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _checks, backends, functional, ops
from .._types import stat_dtype
from ._comm import (Ring, exchange_sizes, keys_and_factors, receive_keys_and_factors,
                    require_initialized,
                    ring_visit, ring_visit_accumulating)

__all__ = ["distributed_siglip_loss", "DIST_IMPLS"]

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


class _RingSigmoid(torch.autograd.Function):
    """Per-row sums of the sigmoid terms of this rank's images against every rank's texts
    (diagonal positives in the own block, negatives elsewhere), by one ring pass each way: (N,),
    or with Matryoshka ``dims`` (k, N), one row of sums per prefix (``row_scale`` (N, k) and
    ``col_scale`` (M, k), the inverse prefix norms or None, are differentiable inputs; each text
    block travels with its own column factors)."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, row_scale, col_scale, dims, backend, group, sizes):
        ring = Ring(group)
        total = []

        def visit(b, block, block_scale=None):
            if dims is None:
                total.append(ops.sigmoid_fwd(image, block, scale, bias, None, None,
                                             b == ring.rank, backend))
            else:
                total.append(ops.sigmoid_prefix_fwd(image, block, scale, bias, dims, row_scale,
                                                    block_scale, None, None, b == ring.rank,
                                                    backend))

        ring_visit(ring, keys_and_factors(text, col_scale), receive_keys_and_factors(sizes, text, col_scale), visit)
        ctx.save_for_backward(image, text, scale, bias, row_scale, col_scale)
        ctx.dims, ctx.backend, ctx.group, ctx.sizes = dims, backend, group, sizes
        return torch.stack(total).sum(0)

    @staticmethod
    def backward(ctx, grad_rows):
        image, text, scale, bias, row_scale, col_scale = ctx.saved_tensors
        ring, dims, sizes = Ring(ctx.group), ctx.dims, ctx.sizes
        n, d = image.shape
        k = 0 if dims is None else len(dims)
        st = stat_dtype(image.dtype)
        grad_rows = grad_rows.to(st).contiguous()
        grad_image = torch.zeros(image.shape, dtype=st, device=image.device)
        grad_bias = bias.new_zeros((), dtype=st)
        row_dot = grad_image.new_zeros((k, n))

        def visit(b, block, block_scale=None):
            nonlocal grad_bias
            diagonal = b == ring.rank
            if dims is None:
                gq, gk, gb = ops.sigmoid_bwd(image, block, scale, bias, None, None, diagonal,
                                             grad_rows, ctx.backend)
                col_dot = gk.new_empty(0)
            else:
                gq, gk, rd, col_dot, gb = ops.sigmoid_prefix_bwd(
                    image, block, scale, bias, dims, row_scale, block_scale, None, None, diagonal,
                    grad_rows, ctx.backend)
                row_dot.add_(rd)
            grad_image.add_(gq)
            grad_bias = grad_bias + gb.sum()
            # the block's text gradient and (Matryoshka) Σ_i G·S per column travel home together
            return torch.cat([gk.to(st).reshape(-1), col_dot.to(st).reshape(-1)])

        acc = ring_visit_accumulating(
            ring, keys_and_factors(text, col_scale), receive_keys_and_factors(sizes, text, col_scale), visit,
            lambda b: text.new_empty((sizes[b][1] * (d + k),), dtype=st), torch.Tensor.add_)
        m = text.shape[0]
        grad_text = acc[:m * d].view(m, d)
        # ∂L_r/∂s = Σ over every block of Σ_ij G·S / s: all local (every term has our image rows)
        gs = (grad_image * image.to(st)).sum() if dims is None else row_dot.sum()
        grad_scale = (gs / scale.to(st)).to(scale.dtype).reshape(scale.shape)
        # S^t is linear in each factor: ∂L/∂r_it = Σ_j G^t_ij·S^t_ij / r_it, likewise the columns
        grad_r = None if row_scale is None else (row_dot.T / row_scale.to(st)).to(row_scale.dtype)
        grad_c = None
        if col_scale is not None:
            grad_c = (acc[m * d:].view(k, m).T / col_scale.to(st)).to(col_scale.dtype)
        return (grad_image.to(image.dtype), grad_text.to(text.dtype), grad_scale,
                grad_bias.to(bias.dtype).reshape(bias.shape), grad_r, grad_c,
                None, None, None, None)


def distributed_siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale,
                            logit_bias=None, *, dist_impl: str = "bidir", backend: str = "auto",
                            group=None, matryoshka_dims=None, matryoshka_weights=None,
                            matryoshka_normalize: bool = True) -> Tensor:
    """open_clip's distributed ``SigLipLoss`` value on this rank (module docstring), fused.

    Args:
        image_features, text_features: (N, D) this rank's pairs; every rank holds the same N.
        logit_scale, logit_bias: s and b (gets their exact per-rank gradients ∂L_r/∂s, ∂L_r/∂b).
        dist_impl: "bidir" | "shift" (ring, O(N·D)) | "gather" | "reduce".
        matryoshka_dims, matryoshka_weights, matryoshka_normalize: as ``siglip_loss``: the
            weighted sum over prefixes of this rank's loss, every prefix from the same sweep
            (each text block carries its (M, k) inverse prefix norms around the ring).
    """
    require_initialized("SigLipLoss")
    if dist_impl not in DIST_IMPLS:
        raise ValueError(f"dist_impl must be one of {DIST_IMPLS}, got {dist_impl!r}")
    _checks.check_pairs("SigLipLoss", "image_features", image_features, "text_features",
                        text_features)
    n = image_features.shape[0]
    scale = _checks.scale_tensor(logit_scale, image_features)
    bias = _checks.bias_tensor(0.0 if logit_bias is None else logit_bias, image_features)
    sizes = exchange_sizes(image_features, text_features, group)
    if len({(a, b) for a, b, _ in sizes}) != 1:
        raise ValueError(f"SigLipLoss needs the same batch size on every rank (open_clip "
                         f"normalises each rank's loss by its N); got (N, M, D) per rank {sizes}")
    w, rank = dist.get_world_size(group), dist.get_rank(group)
    mrl = functional._matryoshka(matryoshka_dims, matryoshka_weights, matryoshka_normalize,
                                 image_features)
    if dist_impl in ("bidir", "shift"):
        return _ring_rows(image_features, text_features, scale, bias, mrl, backend, group,
                          sizes).sum() / n
    rows = functional.sigmoid_rows(image_features, text_features, scale, bias, None, None, True,
                                   backend, mrl)
    loss = rows.sum() / n
    if dist_impl == "gather":
        from torch.distributed.nn import functional as dist_nn
        all_text = dist_nn.all_gather(text_features, group=group)
        for i, other in enumerate(all_text):
            if i != rank:
                loss = loss + _negatives(image_features, other, scale, bias, backend, mrl) / n
            else:  # keep the slot in the graph: the all_gather backward is one collective
                loss = loss + 0 * other.sum()
        return loss
    from torch.distributed.nn import functional as dist_nn
    for i in range(w):
        other = dist_nn.all_reduce(text_features * (rank == i), op=dist.ReduceOp.SUM, group=group)
        if i != rank:
            loss = loss + _negatives(image_features, other, scale, bias, backend, mrl) / n
        else:  # every rank must run every all_reduce's backward (it is a collective)
            loss = loss + 0 * other.sum()
    return loss


def _negatives(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, backend: str,
               mrl) -> Tensor:
    """Σ over all pairs of softplus(s·img·txt + b): every pair a negative (Matryoshka: weighted
    over the prefixes)."""
    return functional.sigmoid_rows(image, text, scale, bias, None, None, False, backend, mrl).sum()


def _ring_rows(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, mrl, backend: str, group,
               sizes) -> Tensor:
    """This rank's per-image sums (N,) over every rank's texts, by the ring."""
    dims = r = c = None
    if mrl is not None:
        dims, weights, normalize = mrl
        dims = list(dims)
        if normalize:
            r = functional._inverse_prefix_norms(image, mrl[0])
            c = functional._inverse_prefix_norms(text, mrl[0])
    name = backends.resolve(backend, image.device, image.dtype,
                            backends.features_of(sigmoid=True, prefix=mrl is not None))
    rows = _RingSigmoid.apply(image.contiguous(), text.contiguous(), scale, bias, r, c, dims, name,
                              group, sizes)
    return rows if mrl is None else functional._weighted(rows, mrl[1])
