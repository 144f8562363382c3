"""Distributed contrastive losses over ``torch.distributed`` (one concept: data parallelism).

Two ways to let every rank's anchors meet every rank's candidates, both built on the op family of
docs/internals.md (``lse_fwd`` / ``lse_bwd``), neither ever forming an N×M logit matrix:

**All-gather** (``gather.py``: :func:`gather_features`, :func:`gathered_clip_loss`, used by
``ClipLoss(world_size > 1)``): exactly open_clip's ``gather_features`` + ``ClipLoss`` semantics in
all four ``(local_loss, gather_with_grad)`` settings — same per-rank loss value and same per-rank
gradients for the features and ``logit_scale``. Memory O(W·N·D) per rank for the gathered features.

**Ring** (``ring.py``: :func:`ring_lse_stats`, :func:`ring_clip_loss`, :class:`RingClipLoss`,
``ClipLoss(..., ring=True)``): gather-free. Candidate blocks travel around the ring of ranks with
point-to-point sends; each rank merges per-block statistics in the log domain, and the backward
re-runs the ring, sending each block's key-gradient accumulator back to its owner. Per-rank memory
O(N·D): the local features, their gradients, and at most two blocks (the one being computed and the
one arriving) plus one traveling gradient accumulator. It matches open_clip's
``local_loss=True, gather_with_grad=True`` setting (see :func:`ring_clip_loss` for the precise
per-rank gradient semantics, including ``logit_scale``).

Notation (docs/math.md §1): rank ``r`` of ``W`` holds ``N_r`` image rows ``I_r`` and text rows ``T_r``;
the global logit matrix is ``S = s·I·Tᵀ`` with ``I = cat_r I_r``, ``T = cat_r T_r``
(``N_tot = Σ_r N_r`` rows and columns); the global loss is
``L = (1/2N_tot)·Σ_i [(r_i − S_ii) + (c_i − S_ii)]`` and rank ``r``'s local loss is
``L_r = (1/2N_r)·Σ_{i∈r} [(r_i − S_ii) + (c_i − S_ii)]``, so ``L = (1/W)·Σ_r L_r`` for equal ``N_r``.

Every function here is SPMD: all ranks of the group must make the same calls in the same order
(forward and backward), as with any collective.

Files: ``_comm.py`` (process-group checks, the ring of neighbours and its visiting loops, size
exchange), ``gather.py``, ``ring.py``, ``gamma.py`` (:class:`DistributedGammaContrastiveLoss`: the
Gamma loss's state replicated on every rank), ``siglip.py`` (the sigmoid loss: open_clip's four
``dist_impl``, the ring ones gather-free).
"""
from __future__ import annotations

from ._comm import check_rank_world
from .gamma import DistributedGammaContrastiveLoss
from .gather import gather_features, gathered_clip_loss, gathered_distill_clip_loss
from .ring import RingClipLoss, ring_clip_loss, ring_lse_stats
from .siglip import distributed_siglip_loss

__all__ = [
    "check_rank_world",
    "gather_features",
    "gathered_clip_loss",
    "gathered_distill_clip_loss",
    "ring_lse_stats",
    "ring_clip_loss",
    "RingClipLoss",
    "DistributedGammaContrastiveLoss",
    "distributed_siglip_loss",
]
