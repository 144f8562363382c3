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
from ._comm import (Ring, exchange_sizes, key_blocks, key_packets, require_initialized,
                    ring_visit, ring_visit_accumulating)

__all__ = ["distributed_siglip_loss", "DIST_IMPLS"]

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


class _RingSigmoid(torch.autograd.Function):
    """Per-row sums (N,) of the sigmoid terms of this rank's images against every rank's texts
    (diagonal positives in the own block, negatives elsewhere), by one ring pass each way."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, backend, group, sizes):
        ring = Ring(group)
        total = []

        def visit(b, block):
            total.append(ops.sigmoid_fwd(image, block, scale, bias, None, None, b == ring.rank,
                                         backend))

        ring_visit(ring, [text], key_packets(sizes, text), visit)
        ctx.save_for_backward(image, text, scale, bias)
        ctx.backend, ctx.group, ctx.sizes = backend, group, sizes
        return torch.stack(total).sum(0)

    @staticmethod
    def backward(ctx, grad_rows):
        image, text, scale, bias = ctx.saved_tensors
        ring = Ring(ctx.group)
        st = stat_dtype(image.dtype)
        grad_rows = grad_rows.to(st).contiguous()
        grad_image = torch.zeros(image.shape, dtype=st, device=image.device)
        grad_bias = bias.new_zeros((), dtype=st)

        def visit(b, block):
            nonlocal grad_bias
            gq, gk, gb = ops.sigmoid_bwd(image, block, scale, bias, None, None, b == ring.rank,
                                         grad_rows, ctx.backend)
            grad_image.add_(gq)
            grad_bias = grad_bias + gb.sum()
            return gk.to(st)

        # each block's text gradient travels home behind it, summed over the ranks it visits
        grad_text = ring_visit_accumulating(ring, [text], key_packets(ctx.sizes, text), visit,
                                            key_blocks(ctx.sizes, text, st), torch.Tensor.add_)
        # ∂L_r/∂s = Σ over every block of Σ_i ⟨dQ_i, q_i⟩ / s: all local (our image rows)
        grad_scale = ((grad_image * image.to(st)).sum() / scale.to(st)).to(scale.dtype)
        return (grad_image.to(image.dtype), grad_text.to(text.dtype),
                grad_scale.reshape(scale.shape), grad_bias.to(bias.dtype).reshape(bias.shape),
                None, None, None)


def distributed_siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale,
                            logit_bias=None, *, dist_impl: str = "bidir", backend: str = "auto",
                            group=None) -> Tensor:
    """open_clip's distributed ``SigLipLoss`` value on this rank (module docstring), fused.

    Args:
        image_features, text_features: (N, D) this rank's pairs; every rank holds the same N.
        logit_scale, logit_bias: s and b (gets their exact per-rank gradients ∂L_r/∂s, ∂L_r/∂b).
        dist_impl: "bidir" | "shift" (ring, O(N·D)) | "gather" | "reduce".
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
    if dist_impl in ("bidir", "shift"):
        name = backends.resolve(backend, image_features.device, image_features.dtype,
                                backends.features_of(sigmoid=True))
        rows = _RingSigmoid.apply(image_features.contiguous(), text_features.contiguous(), scale,
                                  bias, name, group, sizes)
        return rows.sum() / n
    rows = functional.sigmoid_rows(image_features, text_features, scale, bias, None, None, True,
                                   backend)
    loss = rows.sum() / n
    if dist_impl == "gather":
        from torch.distributed.nn import functional as dist_nn
        all_text = dist_nn.all_gather(text_features, group=group)
        for i, other in enumerate(all_text):
            if i != rank:
                loss = loss + _negatives(image_features, other, scale, bias, backend) / n
            else:  # keep the slot in the graph: the all_gather backward is one collective
                loss = loss + 0 * other.sum()
        return loss
    from torch.distributed.nn import functional as dist_nn
    for i in range(w):
        other = dist_nn.all_reduce(text_features * (rank == i), op=dist.ReduceOp.SUM, group=group)
        if i != rank:
            loss = loss + _negatives(image_features, other, scale, bias, backend) / n
        else:  # every rank must run every all_reduce's backward (it is a collective)
            loss = loss + 0 * other.sum()
    return loss


def _negatives(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, backend: str) -> Tensor:
    """Σ over all pairs of softplus(s·img·txt + b): every pair a negative."""
    return functional.sigmoid_rows(image, text, scale, bias, None, None, False, backend).sum()

