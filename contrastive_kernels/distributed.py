"""Distributed contrastive losses over ``torch.distributed`` (one concept: data parallelism).

Two ways to let every rank's anchors meet every rank's candidates, both built on the op family of
docs/internals.md (``lse_fwd`` / ``lse_bwd``), neither ever forming an N×M logit matrix:

**All-gather** (:func:`gather_features`, :func:`gathered_clip_loss`, used by
``ClipLoss(world_size > 1)``): exactly open_clip's ``gather_features`` + ``ClipLoss`` semantics in
all four ``(local_loss, gather_with_grad)`` settings — same per-rank loss value and same per-rank
gradients for the features and ``logit_scale``. Memory O(W·N·D) per rank for the gathered features.

**Ring** (:func:`ring_lse_stats`, :func:`ring_clip_loss`, :class:`RingClipLoss`,
``ClipLoss(..., ring=True)``): gather-free. Candidate blocks travel around the ring of ranks with
point-to-point sends; each rank merges per-block statistics in the log domain, and the backward
re-runs the ring, sending each block's key-gradient accumulator back to its owner. Per-rank memory
O(N·D): the local features, their gradients, and at most two blocks (the one being computed and the
one arriving) plus one traveling gradient accumulator. It matches open_clip's
``local_loss=True, gather_with_grad=True`` setting (see :func:`ring_clip_loss` for the precise
per-rank gradient semantics, including ``logit_scale``).

Notation (math.md §1): rank ``r`` of ``W`` holds ``N_r`` image rows ``I_r`` and text rows ``T_r``;
the global logit matrix is ``S = s·I·Tᵀ`` with ``I = cat_r I_r``, ``T = cat_r T_r``
(``N_tot = Σ_r N_r`` rows and columns); the global loss is
``L = (1/2N_tot)·Σ_i [(r_i − S_ii) + (c_i − S_ii)]`` and rank ``r``'s local loss is
``L_r = (1/2N_r)·Σ_{i∈r} [(r_i − S_ii) + (c_i − S_ii)]``, so ``L = (1/W)·Σ_r L_r`` for equal ``N_r``.

Every function here is SPMD: all ranks of the group must make the same calls in the same order
(forward and backward), as with any collective.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import backends, functional, ops
from .gamma import GammaContrastiveLoss

__all__ = [
    "gather_features",
    "gathered_clip_loss",
    "ring_lse_stats",
    "ring_clip_loss",
    "RingClipLoss",
    "DistributedGammaContrastiveLoss",
]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _require_initialized(what: str) -> None:
    if not dist.is_available():
        raise RuntimeError(f"{what} needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise RuntimeError(f"{what} needs an initialised default process group "
                           "(torch.distributed.init_process_group) when world_size > 1")


def check_rank_world(rank: int, world_size: int, group=None, what: str = "ClipLoss") -> None:
    """Raise ``ValueError`` when (rank, world_size) disagree with the process group."""
    _require_initialized(what)
    real_w, real_r = dist.get_world_size(group), dist.get_rank(group)
    if (real_r, real_w) != (rank, world_size):
        raise ValueError(f"{what}(rank={rank}, world_size={world_size}) does not match the process "
                         f"group: this process is rank {real_r} of {real_w}")


def _collective_device(like: Tensor, group) -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU tensors (and CUDA ones for a few collectives).
    return like.device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def _exchange_sizes(query: Tensor, keys: Tensor, group) -> list[tuple[int, int, int]]:
    """(N_q, M_k, D) of every rank: one tiny all_gather, so receive buffers have the right size and a
    mismatch fails with a clear error on every rank instead of hanging or corrupting a receive."""
    w = dist.get_world_size(group)
    dev = _collective_device(query, group)
    mine = torch.tensor([query.shape[0], keys.shape[0], query.shape[1]], dtype=torch.int64,
                        device=dev)
    allsz = [torch.empty_like(mine) for _ in range(w)]
    dist.all_gather(allsz, mine, group=group)
    sizes = [tuple(int(v) for v in t.tolist()) for t in allsz]
    dims = {d for _, _, d in sizes}
    if len(dims) != 1:
        raise ValueError(f"feature dimension differs across ranks: (N, M, D) per rank = {sizes}")
    return sizes


class _Ring:
    """Point-to-point neighbours of this rank: blocks arrive from ``prev`` and leave to ``next``.

    Ordering contract (needed for NCCL, which matches a pair's messages in posting order, and
    harmless for gloo): every rank posts its sends to ``next`` in the same sequence as it posts
    its receives from ``prev``, and each stream has its own tag."""

    KEYS, STATS, ACC = 1, 2, 3

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.next = to_global((self.rank + 1) % self.world)
        self.prev = to_global((self.rank - 1) % self.world)

    def exchange(self, pairs: Sequence[tuple[Tensor, Tensor, int]]):
        """For each (send, recv, tag): send ``send`` to ``next`` and receive ``recv`` from ``prev``,
        all posted as one batch; returns the works (wait on all of them before touching either)."""
        ops_ = []
        for send, recv, tag in pairs:
            ops_.append(dist.P2POp(dist.isend, send, self.next, self.group, tag))
            ops_.append(dist.P2POp(dist.irecv, recv, self.prev, self.group, tag))
        return dist.batch_isend_irecv(ops_) if ops_ else []


def _wait(works) -> None:
    for w in works:
        w.wait()


# ---------------------------------------------------------------------------------------------
# all-gather: open_clip semantics
# ---------------------------------------------------------------------------------------------

def gather_features(image_features: Tensor, text_features: Tensor, local_loss: bool = False,
                    gather_with_grad: bool = False, rank: int = 0, world_size: int = 1,
                    *, group=None) -> tuple[Tensor, Tensor]:
    """open_clip's ``gather_features`` (torch.distributed path), returning (W·N, D) tensors.

    - ``gather_with_grad=True``: ``torch.distributed.nn.all_gather``; its backward sums the
      incoming gradients of slot ``r`` over all ranks (reduce-scatter), so rank r's features get
      ``Σ_r' ∂L_r'/∂x_r``, where ``L_r'`` is the loss rank r' computed.
    - ``gather_with_grad=False``: plain ``all_gather`` (no gradient); with ``local_loss=False`` the
      local slot is replaced by the local tensor, so only rank r's own rows get a gradient, from
      rank r's own loss; with ``local_loss=True`` nothing gathered carries a gradient.
    """
    if gather_with_grad:
        from torch.distributed.nn import functional as dist_nn  # autograd-aware collectives
        all_i = torch.cat(dist_nn.all_gather(image_features, group=group), dim=0)
        all_t = torch.cat(dist_nn.all_gather(text_features, group=group), dim=0)
        return all_i, all_t
    gi = [torch.zeros_like(image_features) for _ in range(world_size)]
    gt = [torch.zeros_like(text_features) for _ in range(world_size)]
    dist.all_gather(gi, image_features.contiguous(), group=group)
    dist.all_gather(gt, text_features.contiguous(), group=group)
    if not local_loss:
        gi[rank] = image_features
        gt[rank] = text_features
    return torch.cat(gi, dim=0), torch.cat(gt, dim=0)


def _zero_bias_term(loss: Tensor, logit_bias) -> Tensor:
    # A constant added to every logit cancels in the softmax: exact zero gradient, as open_clip
    # (whose gradient is zero up to rounding).
    if isinstance(logit_bias, Tensor) and logit_bias.requires_grad:
        loss = loss + (logit_bias * 0).sum().to(loss.dtype)
    return loss


def gathered_clip_loss(image_features: Tensor, text_features: Tensor, logit_scale,
                       logit_bias=None, *, local_loss: bool = False,
                       gather_with_grad: bool = False, rank: int = 0, world_size: int = 1,
                       labels: Optional[Tensor] = None, backend: str = "auto",
                       group=None) -> Tensor:
    """open_clip's distributed ``ClipLoss`` computed by the fused ops (no N×M logits).

    Args:
        image_features, text_features: (N, D) local rows; every rank must hold the same N.
        labels: optional precomputed ``arange(N) + rank·N`` for ``local_loss`` (label caching).
    Returns:
        ``local_loss=False``: the global CLIP loss over all W·N pairs (same value on every rank).
        ``local_loss=True``: ``½(InfoNCE(I_r → T) + InfoNCE(T_r → I))`` with labels offset by
        ``rank·N`` — the local rows against all gathered candidates.
    """
    functional._check_features("image_features", image_features, "text_features", text_features)
    if image_features.shape != text_features.shape:
        raise ValueError(f"ClipLoss pairs image i with text i, so shapes must match: "
                         f"image_features {tuple(image_features.shape)} vs text_features "
                         f"{tuple(text_features.shape)}")
    all_i, all_t = gather_features(image_features, text_features, local_loss, gather_with_grad,
                                   rank, world_size, group=group)
    if not local_loss:
        return functional.clip_loss(all_i, all_t, logit_scale, logit_bias, backend=backend)
    n = image_features.shape[0]
    if labels is None:
        labels = torch.arange(n, device=image_features.device, dtype=torch.int64) + n * rank
    loss = 0.5 * (functional.info_nce(image_features, all_t, logit_scale, labels, backend=backend)
                  + functional.info_nce(text_features, all_i, logit_scale, labels, backend=backend))
    return _zero_bias_term(loss, logit_bias)


# ---------------------------------------------------------------------------------------------
# ring: gather-free
# ---------------------------------------------------------------------------------------------

def _block_labels(n: int, m: int, diagonal: bool, device) -> Optional[Tensor]:
    # Positives live on the diagonal block only. Off the diagonal ``pos`` is unused (grad_pos is
    # None there); a valid dummy label keeps the op's precondition when the block has M_b < N.
    if diagonal:
        return None
    return None if m >= n else torch.zeros(n, dtype=torch.int64, device=device)


class _RingLSE(torch.autograd.Function):
    """Global ``(row_lse, col_lse, pos)`` of the local rows/columns of ``S = s·Q·Kᵀ``, where Q and K
    are the row-concatenation over ranks of the local ``query`` and ``keys``.

    Forward, step k = 0..W−1 on rank r: the key block of rank b = r − k is here; one fused
    ``lse_fwd`` on (Q_r, K_b) gives the block's row LSE (merged into the running row LSE with
    ``logaddexp``) and column LSE (merged into a column accumulator that travels with K_b and
    reaches its owner after W hops). The next block is received while this one is computed.

    Backward: the ring again, K_b traveling with its global column LSE and its owner's upstream
    ``grad_col``; each rank runs ``lse_bwd`` on (Q_r, K_b) with the *global* row/col LSE, keeps the
    query gradient and adds the key gradient to an accumulator that travels behind K_b and reaches
    its owner after W hops. Each rank therefore computes every block of its own rows once in each
    pass: the world does the dense work of ``S`` exactly once (8·N_tot²·D FLOPs for the symmetric
    loss, split evenly), with O(N·D) memory per rank.
    """

    @staticmethod
    def forward(ctx, query, keys, scale, compute_col, backend, group, sizes, exact_scale_grad):
        ring = _Ring(group)
        w, r = ring.world, ring.rank
        n, d = query.shape
        st = backends.stat_dtype(query.dtype)
        row = pos = col_in = None
        col_works: list = []
        cur = keys
        for k in range(w):
            b = (r - k) % w                      # owner of the key block held at this step
            key_works, nxt = [], None
            if k < w - 1:                        # prefetch the next block while computing this one
                nxt = query.new_empty((sizes[(b - 1) % w][1], d))
                key_works = ring.exchange([(cur, nxt, ring.KEYS)])
            rb, cb, pb = ops.lse_fwd(query, cur, scale,
                                     _block_labels(n, cur.shape[0], b == r, query.device),
                                     compute_col, backend)
            row = rb if row is None else torch.logaddexp(row, rb)
            if b == r:
                pos = pb
            if compute_col:
                # Column accumulator of block b: LSE over the rows of ranks b..r once merged.
                if k > 0:
                    _wait(col_works)
                    cb = torch.logaddexp(col_in, cb)
                # Pass it on; receive the accumulator of the block we hold next (after the last
                # step, that is our own block's, complete: it has visited every rank).
                col_in = row.new_empty((sizes[(b - 1) % w][1],))
                col_works = ring.exchange([(cb, col_in, ring.STATS)])
            _wait(key_works)
            if nxt is not None:
                cur = nxt
        if compute_col:
            _wait(col_works)
            col = col_in
        else:
            col = query.new_empty((0,), dtype=st)
        ctx.save_for_backward(query, keys, scale, row, col)
        ctx.compute_col, ctx.backend, ctx.group, ctx.sizes = compute_col, backend, group, sizes
        ctx.exact_scale_grad = exact_scale_grad
        return row, col, pos

    @staticmethod
    def backward(ctx, grad_row, grad_col, grad_pos):
        query, keys, scale, row_lse, col_lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        w, r = ring.world, ring.rank
        n, d = query.shape
        st = row_lse.dtype
        sizes, compute_col = ctx.sizes, ctx.compute_col
        grad_row = grad_row.to(st).contiguous()
        grad_pos = grad_pos.to(st).contiguous()
        # The block packet: the keys plus, for the column terms, [global col LSE; owner's grad_col].
        cur_k = keys
        cur_stats = torch.stack([col_lse, grad_col.to(st)]) if compute_col else None
        grad_q = torch.zeros(n, d, dtype=st, device=query.device)
        # exact: split each block's Σ G·S into the part of this rank's loss (row and positive
        # terms of our rows) and the part of the key owner's loss (column terms), which travels
        # home as one extra element behind the key-gradient accumulator. It costs a second
        # lse_bwd per block; without it each rank keeps the whole Σ G·S of the blocks it computed.
        exact = ctx.exact_scale_grad and ctx.needs_input_grad[2] and compute_col
        q_st = query.to(st)
        own_share = row_lse.new_zeros(())
        acc_in, acc_works = None, []
        for k in range(w):
            b = (r - k) % w
            pkt_works, nxt_k, nxt_stats = [], None, None
            if k < w - 1:
                m_next = sizes[(b - 1) % w][1]
                nxt_k = query.new_empty((m_next, d))
                pairs = [(cur_k, nxt_k, ring.KEYS)]
                if compute_col:
                    nxt_stats = row_lse.new_empty((2, m_next))
                    pairs.append((cur_stats, nxt_stats, ring.STATS))
                pkt_works = ring.exchange(pairs)
            labels = _block_labels(n, cur_k.shape[0], b == r, query.device)
            col_lse_b = cur_stats[0] if compute_col else row_lse.new_empty(0)
            grad_col_b = cur_stats[1] if compute_col else None
            grad_pos_b = grad_pos if b == r else None
            if exact:
                gq, gk = ops.lse_bwd(query, cur_k, scale, labels, row_lse, col_lse_b,
                                     grad_row, None, grad_pos_b, ctx.backend)
                gq_col, gk_col = ops.lse_bwd(query, cur_k, scale, labels, row_lse, col_lse_b,
                                             None, grad_col_b, None, ctx.backend)
                own_share += (gq * q_st).sum()
                owner_share = (gq_col * q_st).sum()
                gq += gq_col
                gk = torch.cat([gk.add_(gk_col).reshape(-1), owner_share.reshape(1)])
            else:
                gq, gk = ops.lse_bwd(query, cur_k, scale, labels, row_lse, col_lse_b,
                                     grad_row, grad_col_b, grad_pos_b, ctx.backend)
            grad_q += gq
            if k > 0:
                # Key-gradient accumulator of block b, holding the terms of ranks b..r−1.
                _wait(acc_works)
                gk = acc_in.add_(gk)
            m_next_acc = sizes[(b - 1) % w][1]
            acc_in = row_lse.new_empty((m_next_acc * d + 1,) if exact else (m_next_acc, d))
            acc_works = ring.exchange([(gk, acc_in, ring.ACC)])
            _wait(pkt_works)
            if nxt_k is not None:
                cur_k, cur_stats = nxt_k, nxt_stats
        _wait(acc_works)
        # Our own keys' gradient, home after W hops (in exact mode followed by the column share
        # of our loss that the other ranks computed).
        grad_k = acc_in[:-1].view(keys.shape[0], d) if exact else acc_in
        grad_scale = None
        if ctx.needs_input_grad[2]:
            if exact:
                # ∂loss_r/∂s: row + positive terms of our rows, column terms of our keys.
                total = own_share + acc_in[-1]
            else:
                # Σ over the blocks this rank computed of Σ_ij G_ij·S_ij (see ring_clip_loss).
                total = (grad_q * q_st).sum()
            grad_scale = (total / scale.to(st)).to(scale.dtype).reshape(scale.shape)
        return (grad_q.to(query.dtype), grad_k.to(keys.dtype), grad_scale,
                None, None, None, None, None)


def ring_lse_stats(query: Tensor, keys: Tensor, logit_scale, *, compute_col: bool = True,
                   group=None, backend: str = "auto",
                   exact_scale_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Distributed :func:`contrastive_kernels.lse_stats` over the rows/columns of all ranks.

    The global matrix is ``S = s·Q·Kᵀ`` with ``Q = cat_r query_r`` and ``K = cat_r keys_r`` (in rank
    order); pair ``(query_r[i], keys_r[i])`` is positive. Ranks may hold different batch sizes
    (``N_r`` queries, ``M_r ≥ N_r`` keys); D must agree. Nothing global is ever materialised.

    Args:
        query: (N_r, D) local anchors. keys: (M_r, D) local candidates. logit_scale: float or 0-d
            tensor (gets a gradient). compute_col: also return the column LSE of the local keys.
    Returns:
        ``row_lse (N_r,)``: log Σ_j exp(S_ij) over **all** global columns, for the local rows;
        ``col_lse (M_r,)`` or ``(0,)``: log Σ_i exp(S_ij) over **all** global rows, local columns;
        ``pos (N_r,)``: S_ii of the local pairs.
    Gradients: differentiable; the backward is a second ring pass and computes, for every rank's
    inputs, the gradient of ``Σ_r' loss_r'`` — the sum of the losses all ranks built from their
    statistics — w.r.t. that rank's rows (features). ``logit_scale`` gets this rank's share of
    ``∂(Σ_r' loss_r')/∂s``, namely ``Σ_ij G_ij·S_ij / s`` over the blocks ``(Q_r, K_b)`` this rank
    computed; the shares sum over ranks to the full derivative. With ``exact_scale_grad=True`` it
    gets instead exactly ``∂loss_r/∂s`` of this rank's own loss (row and positive terms of its
    rows, column terms of its keys, the latter computed on the other ranks and sent home), at the
    cost of a second ``lse_bwd`` per block in the backward.
    """
    _require_initialized("ring_lse_stats")
    functional._check_features("query", query, "keys", keys)
    sc = functional._scale_tensor(logit_scale, query)
    name = backends.resolve(backend, query.device, query.dtype)
    sizes = _exchange_sizes(query, keys, group)
    if any(m < n for n, m, _ in sizes):
        raise ValueError(f"each rank's positive of query i is its key i, which needs M_r >= N_r; "
                         f"(N, M, D) per rank = {sizes}")
    if dist.get_world_size(group) == 1:
        return ops.lse_fwd(query.contiguous(), keys.contiguous(), sc, None, compute_col, name)
    return _RingLSE.apply(query.contiguous(), keys.contiguous(), sc, compute_col, name, group,
                          sizes, exact_scale_grad)


def ring_clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                   *, group=None, backend: str = "auto", exact_scale_grad: bool = False) -> Tensor:
    """Gather-free distributed CLIP loss: open_clip's ``local_loss=True, gather_with_grad=True``.

    Per rank r (N_r local pairs, ``N_tot`` pairs in the world):

    - **value**: ``L_r = (1/2N_r)·Σ_{i∈r} [(r_i − S_ii) + (c_i − S_ii)]`` — the local pairs' image→
      all-texts and text→all-images InfoNCE, exactly open_clip's (local_loss=True,
      gather_with_grad=True) value on that rank.
    - **feature gradients**: ``Σ_r' ∂L_r'/∂(I_r, T_r)`` — the derivative of the sum of every rank's
      loss w.r.t. this rank's rows, identical per rank to open_clip's (True, True) setting, where
      the all_gather backward reduce-scatters (sums) the slot gradients. With equal N_r this is
      ``W·∂L/∂(I_r, T_r)`` for the global mean loss L, so DDP's gradient *average* over ranks
      yields exactly ``∂L/∂θ``.
    - **logit_scale gradient**: this rank's share ``Σ_{blocks (r,b)} Σ_ij G_ij S_ij / s`` of
      ``∂(Σ_r' L_r')/∂s`` (G = ∂(Σ_r' L_r')/∂S on the blocks rank r computed). It differs per rank
      from open_clip's ``∂L_r/∂s`` (that split would cost a second backward pass per block), but
      the **sum over ranks is identical**, ``Σ_r ∂L_r/∂s = W·∂L/∂s``, so after DDP's all-reduce
      average every rank holds the same ``∂L/∂s`` as with open_clip's (True, True) setting.
      ``exact_scale_grad=True`` gives open_clip's per-rank ``∂L_r/∂s`` exactly, for a second
      ``lse_bwd`` per block (the backward's work doubles).

    ``logit_bias`` cancels in the softmax: the value is unchanged and its gradient is exactly 0.
    """
    functional._check_features("image_features", image_features, "text_features", text_features)
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"ring_clip_loss pairs image i with text i, so batch sizes must match: "
                         f"image_features {tuple(image_features.shape)} vs text_features "
                         f"{tuple(text_features.shape)}")
    row, col, pos = ring_lse_stats(image_features, text_features, logit_scale, compute_col=True,
                                   group=group, backend=backend, exact_scale_grad=exact_scale_grad)
    loss = 0.5 * ((row - pos).mean() + (col - pos).mean())
    return _zero_bias_term(loss, logit_bias)


class RingClipLoss(nn.Module):
    """Module form of :func:`ring_clip_loss` (same call as ``ClipLoss``).

    ``forward(image_features (N, D), text_features (N, D), logit_scale, logit_bias=None,
    output_dict=False)``. Equivalent to ``ClipLoss(local_loss=True, gather_with_grad=True,
    rank=r, world_size=W, ring=True)``.
    """

    def __init__(self, *, group=None, backend: str = "auto", exact_scale_grad: bool = False):
        super().__init__()
        self.group = group
        self.backend = backend
        self.exact_scale_grad = exact_scale_grad

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        loss = ring_clip_loss(image_features, text_features, logit_scale, logit_bias,
                              group=self.group, backend=self.backend,
                              exact_scale_grad=self.exact_scale_grad)
        return {"contrastive_loss": loss} if output_dict else loss


# ---------------------------------------------------------------------------------------------
# distributed Gamma (math.md §3): replicated state, rows of every rank
# ---------------------------------------------------------------------------------------------

def _all_gather_varlen(t: Tensor, lengths: Sequence[int], group) -> Tensor:
    """Concatenation over ranks (rank order) of 1-D tensors whose lengths differ per rank."""
    dev = _collective_device(t, group)
    longest = max(lengths)
    padded = t.new_zeros((longest,), device=dev)
    padded[:t.shape[0]] = t.to(dev)
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, lengths)]).to(t.device)


class DistributedGammaContrastiveLoss(GammaContrastiveLoss):
    """:class:`~contrastive_kernels.GammaContrastiveLoss` over the rows of all ranks.

    Same constructor (plus ``group=None`` and ``ring=False``, keyword-only), same buffers and
    ``state_dict`` keys (a single-process checkpoint loads here and back), same ``forward``
    call with the **local** rows: ``forward(image_features (N_r, D), text_features (M_r, D),
    index (N_r,) int64, logit_scale, output_dict=False)``. One step is exactly the
    single-process step on the concatenated batch (rank order, ``N = Σ_r N_r`` anchors against
    all ``M = Σ_r M_r`` candidates):

    1. statistics of the local rows against every rank's candidates — ``ring=False``: the
       features are all-gathered with ``torch.distributed.nn.all_gather`` (needs equal N_r;
       O(W·N·D) memory) and two fused row passes run; ``ring=True``: :func:`ring_lse_stats`
       (any N_r, O(N·D) memory, each block of S computed once);
    2. ``(index, log Ẑ)`` of all ranks are all-gathered (rank order) and **every** rank calls
       ``update_state`` then ``estimate_log_u`` on the gathered batch, so the buffers — and the
       Gamma generator, whose state is broadcast from rank 0 at the first step — stay
       bit-identical on every rank; each rank keeps the ``u`` of its own rows;
    3. rank r returns ``(W·N_r/N)·mean_{i∈r} ℓ̃_i`` (averaged over the two directions when
       symmetric), so the **mean over ranks equals the single-process loss**, and the feature
       gradients are ``Σ_r' ∂loss_r'/∂x_r = W·∂L/∂x_r``: after DDP's average the parameter
       gradients equal the single-process ones. ``logit_scale`` gets this rank's share (ring:
       blocks it computed; gather: its own loss), and the shares sum to ``W·∂L/∂s``.
       ``output_dict=True`` adds the plain InfoNCE of the local rows, scaled the same way.

    Every rank must call ``forward`` (and ``backward``) the same number of times, as with any
    collective. ``labels=`` (custom positives) is single-process only.
    """

    def __init__(self, num_samples: int, *, group=None, ring: bool = False, **kwargs):
        super().__init__(num_samples, **kwargs)
        self.group = group
        self.ring = bool(ring)
        self._generator_synced = False

    @torch.no_grad()
    def sync_generator(self) -> None:
        """Broadcast rank 0's Gamma generator state to every rank (collective)."""
        root = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        state = self.generator.get_state()
        dev = _collective_device(self.log_z_row, self.group)
        buf = state.to(dev)
        dist.broadcast(buf, src=root, group=self.group)
        self.generator.set_state(buf.cpu())
        self._generator_synced = True

    def set_extra_state(self, state) -> None:
        super().set_extra_state(state)
        self._generator_synced = False  # a loaded checkpoint is re-broadcast at the next step

    def forward(self, image_features: Tensor, text_features: Tensor, index: Tensor,
                logit_scale, output_dict: bool = False, *, labels: Optional[Tensor] = None):
        _require_initialized("DistributedGammaContrastiveLoss")
        if labels is not None:
            raise ValueError("DistributedGammaContrastiveLoss does not take labels: each rank's "
                             "anchor i has its positive at the same rank's text_features[i]")
        functional._check_features("image_features", image_features, "text_features",
                                   text_features)
        n, m = image_features.shape[0], text_features.shape[0]
        if self.symmetric and n != m:
            raise ValueError(f"symmetric GammaContrastiveLoss pairs row i with row i, so batch "
                             f"sizes must match: image_features {tuple(image_features.shape)} vs "
                             f"text_features {tuple(text_features.shape)}")
        if m < n:
            raise ValueError(f"the positive of anchor i is text_features[i], so text_features "
                             f"needs at least N={n} rows, got {tuple(text_features.shape)}")
        self._check_state_device(image_features.device)
        self._check_index(index, n, image_features.device)
        if not self._generator_synced and self.estimator == "gamma":
            self.sync_generator()
        w, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        group, backend = self.group, self.backend

        if self.ring:
            row, col, pos = ring_lse_stats(image_features, text_features, logit_scale,
                                           compute_col=self.symmetric, group=group,
                                           backend=backend)
            sizes = [(a, b) for a, b, _ in _exchange_sizes(image_features, text_features,
                                                           group)]
        else:
            sizes = [(a, b) for a, b, _ in _exchange_sizes(image_features, text_features,
                                                           group)]
            if len(set(sizes)) != 1:
                raise ValueError(f"ring=False all-gathers the features, which needs the same "
                                 f"(N, M) on every rank; got {sizes} (use ring=True)")
            from torch.distributed.nn import functional as dist_nn
            all_t = torch.cat(dist_nn.all_gather(text_features, group=group), dim=0)
            labels_g = torch.arange(n, device=image_features.device) + m * rank
            row, _, pos = functional.lse_stats(image_features, all_t, logit_scale, labels_g,
                                               compute_col=False, backend=backend)
            col = None
            if self.symmetric:
                all_i = torch.cat(dist_nn.all_gather(image_features, group=group), dim=0)
                col, _, _ = functional.lse_stats(text_features, all_i, logit_scale,
                                                 labels_g, compute_col=False, backend=backend)
        n_tot, m_tot = sum(a for a, _ in sizes), sum(b for _, b in sizes)
        weight = w * n / n_tot
        start = sum(a for a, _ in sizes[:rank])
        n_lengths = [a for a, _ in sizes]
        all_index = _all_gather_varlen(index, n_lengths, group)

        def direction(stat: Tensor, name: str, num_candidates: int) -> Tensor:
            log_z = stat.detach() - math.log(num_candidates)
            all_log_z = _all_gather_varlen(log_z, n_lengths, group)
            self.update_state(all_index, all_log_z, name)
            log_u = self.estimate_log_u(all_index, all_log_z, name)[start:start + n]
            return (torch.exp(log_u + stat - math.log(num_candidates)) - pos).mean()

        objective = direction(row, "row", m_tot)
        info_nce = (row - pos).detach().mean()
        if self.symmetric:
            objective = 0.5 * (objective + direction(col, "col", n_tot))
            info_nce = 0.5 * (info_nce + (col - pos).detach().mean())
        objective, info_nce = weight * objective, weight * info_nce
        if output_dict:
            return {"contrastive_loss": objective, "info_nce": info_nce}
        return objective
