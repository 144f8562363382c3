"""Gather-free distributed CLIP loss: candidate blocks travel around the ring of ranks.

Each rank merges per-block statistics in the log domain; the backward re-runs the ring, sending each
block's key-gradient accumulator back to its owner. Per-rank memory O(N·D): the local features,
their gradients, and at most two blocks (the one being computed and the one arriving) plus one
traveling gradient accumulator. It matches open_clip's ``local_loss=True, gather_with_grad=True``
setting (see :func:`ring_clip_loss` for the precise per-rank gradient semantics, including
``logit_scale``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import _checks, backends, functional, ops
from .._types import stat_dtype
from ._comm import (Ring, exchange_sizes, keys_and_factors, receive_keys_and_factors,
                    require_initialized, ring_visit, ring_visit_accumulating)


def _block_labels(n: int, m: int, diagonal: bool, device) -> Optional[Tensor]:
    # Positives live on the diagonal block only. Off the diagonal ``pos`` is unused (grad_pos is
    # None there); a valid dummy label keeps the op's precondition when the block has M_b < N.
    if diagonal:
        return None
    return None if m >= n else torch.zeros(n, dtype=torch.int64, device=device)


class _RingLSE(torch.autograd.Function):
    """Global ``(row_lse, col_lse, pos)`` of the local rows/columns of ``S = s·Q·Kᵀ``, where Q and K
    are the row-concatenation over ranks of the local ``query`` and ``keys``; with Matryoshka
    ``dims`` the statistics of every prefix ``S^t`` stacked (k, ·) (``row_scale`` (N, k) and
    ``col_scale`` (M, k), the inverse prefix norms or None, are differentiable inputs; each key
    block travels with its own column factors).

    Forward, step k = 0..W−1 on rank r: the key block of rank b = r − k is here; one fused
    ``lse_fwd`` on (Q_r, K_b) gives the block's row LSE (merged into the running row LSE with
    ``logaddexp``) and column LSE (merged into a column accumulator that travels with K_b and
    reaches its owner after W hops). The next block is received while this one is computed.

    Backward: the ring again, K_b traveling with its global column LSE and its owner's upstream
    ``grad_col``; each rank runs ``lse_bwd`` on (Q_r, K_b) with the *global* row/col LSE, keeps the
    query gradient and adds the key gradient (with Matryoshka also Σ_i G·S per column, for the
    column factors) to an accumulator that travels behind K_b and reaches its owner after W hops.
    Each rank therefore computes every block of its own rows once in each pass: the world does the
    dense work of ``S`` exactly once (8·N_tot²·D FLOPs for the symmetric loss, split evenly), with
    O(N·D) memory per rank.
    """

    @staticmethod
    def forward(ctx, query, keys, scale, row_scale, col_scale, compute_col, dims, backend, group,
                sizes, exact_scale_grad):
        ring = Ring(group)
        n = query.shape[0]
        k = None if dims is None else len(dims)
        st = stat_dtype(query.dtype)
        row = pos = None

        def visit(b, block, block_scale=None):
            nonlocal row, pos
            labels = _block_labels(n, block.shape[0], b == ring.rank, query.device)
            if dims is None:
                rb, cb, pb, _ = ops.lse_fwd(query, block, scale, labels, None, None, False,
                                            compute_col, backend)
            else:
                rb, cb, pb, _ = ops.lse_prefix_fwd(query, block, scale, dims, row_scale,
                                                   block_scale, labels, None, None, False,
                                                   compute_col, backend)
            row = rb if row is None else torch.logaddexp(row, rb)
            if b == ring.rank:
                pos = pb
            return cb

        packet, receive = keys_and_factors(keys, col_scale), receive_keys_and_factors(sizes, keys, col_scale)
        stat_shape = (lambda m: (m,)) if k is None else (lambda m: (k, m))
        if compute_col:
            # block b's column LSE travels with it, merged over the rows of every rank it visits
            col = ring_visit_accumulating(
                ring, packet, receive, visit,
                lambda b: query.new_empty(stat_shape(sizes[b][1]), dtype=st), torch.logaddexp)
        else:
            ring_visit(ring, packet, receive, visit)
            col = query.new_empty(stat_shape(0), dtype=st)
        ctx.save_for_backward(query, keys, scale, row_scale, col_scale, row, col)
        ctx.compute_col, ctx.dims, ctx.backend, ctx.group = compute_col, dims, backend, group
        ctx.sizes, ctx.exact_scale_grad = sizes, exact_scale_grad
        return row, col, pos

    @staticmethod
    def backward(ctx, grad_row, grad_col, grad_pos):
        query, keys, scale, row_scale, col_scale, row_lse, col_lse = ctx.saved_tensors
        ring = Ring(ctx.group)
        n, d = query.shape
        st = row_lse.dtype
        sizes, compute_col, dims = ctx.sizes, ctx.compute_col, ctx.dims
        k = 0 if dims is None else len(dims)
        grad_row = grad_row.to(st).contiguous()
        grad_pos = grad_pos.to(st).contiguous()
        # The block packet: the keys (and their column factors) plus, for the column terms,
        # [global col LSE; owner's grad_col].
        packet, receive_keys = keys_and_factors(keys, col_scale), receive_keys_and_factors(sizes, keys, col_scale)
        if compute_col:
            packet.append(torch.stack([col_lse, grad_col.to(st)]))

        def receive(b):
            stats = [row_lse.new_empty((2,) + col_lse.shape[:-1] + (sizes[b][1],))]
            return receive_keys(b) + (stats if compute_col else [])

        grad_q = torch.zeros(n, d, dtype=st, device=query.device)
        row_dot = grad_q.new_zeros((k, n))
        # exact: split each block's Σ G·S into the part of this rank's loss (row and positive
        # terms of our rows) and the part of the key owner's loss (column terms), which travels
        # home as one extra element behind the key-gradient accumulator. It costs a second
        # lse_bwd per block; without it each rank keeps the whole Σ G·S of the blocks it computed.
        exact = ctx.exact_scale_grad and ctx.needs_input_grad[2] and compute_col
        q_st = query.to(st)
        own_share = row_lse.new_zeros(())

        def block_bwd(block, block_scale, labels, col_lse_b, g_row, g_col, g_pos):
            """(grad_q, grad_k, Σ G·S per row (k, N) or None, per column (k, M_b))."""
            if dims is None:
                gq, gk = ops.lse_bwd(query, block, scale, labels, None, None, False, row_lse,
                                     col_lse_b, g_row, g_col, g_pos, ctx.backend)
                return gq, gk, None, gk.new_empty(0)
            return ops.lse_prefix_bwd(query, block, scale, dims, row_scale, block_scale, labels,
                                      None, None, False, row_lse, col_lse_b, g_row, g_col, g_pos,
                                      ctx.backend)

        def g_dot_s(gq, rd):  # Σ_ij G_ij·S_ij of a block: ⟨dQ, Q⟩ (scale-free), or the prefix sums
            return (gq * q_st).sum() if rd is None else rd.sum()

        def visit(b, block, *rest):
            nonlocal own_share
            block_scale = rest[0] if col_scale is not None else None
            stats = rest[-1] if compute_col else None
            labels = _block_labels(n, block.shape[0], b == ring.rank, query.device)
            col_lse_b = stats[0] if compute_col else col_lse
            grad_col_b = stats[1] if compute_col else None
            grad_pos_b = grad_pos if b == ring.rank else None
            parts = [(grad_row, grad_col_b, grad_pos_b)]
            if exact:  # the row/positive terms and the column terms separately
                parts = [(grad_row, None, grad_pos_b), (None, grad_col_b, None)]
            gk_sum = col_dot_sum = None
            shares = []
            for g_row, g_col, g_pos in parts:
                gq, gk, rd, cd = block_bwd(block, block_scale, labels, col_lse_b, g_row, g_col,
                                           g_pos)
                shares.append(g_dot_s(gq, rd))
                grad_q.add_(gq)
                if rd is not None:
                    row_dot.add_(rd)
                gk_sum = gk if gk_sum is None else gk_sum.add_(gk)
                col_dot_sum = cd if col_dot_sum is None else col_dot_sum.add_(cd)
            tail = [col_dot_sum.to(st).reshape(-1)]
            if exact:
                own_share += shares[0]
                tail.append(shares[1].reshape(1))  # the owner's column share
            return torch.cat([gk_sum.to(st).reshape(-1)] + tail)

        def receive_acc(b):
            m = sizes[b][1]
            return row_lse.new_empty((m * (d + k) + int(exact),))

        # Block b's key-gradient accumulator travels behind it and reaches its owner after W hops
        # (then, with Matryoshka, its Σ_i G·S per column; in exact mode the column share of the
        # owner's loss computed elsewhere).
        acc = ring_visit_accumulating(ring, packet, receive, visit, receive_acc, torch.Tensor.add_)
        m = keys.shape[0]
        grad_k = acc[:m * d].view(m, d)
        grad_scale = grad_r = grad_c = None
        if ctx.needs_input_grad[2]:
            if exact:
                # ∂loss_r/∂s: row + positive terms of our rows, column terms of our keys.
                total = own_share + acc[-1]
            else:
                # Σ over the blocks this rank computed of Σ_ij G_ij·S_ij (see ring_clip_loss).
                total = g_dot_s(grad_q, None if dims is None else row_dot)
            grad_scale = (total / scale.to(st)).to(scale.dtype).reshape(scale.shape)
        # S^t is linear in each factor: ∂/∂r_it = Σ_j G^t_ij·S^t_ij / r_it, likewise the columns
        if row_scale is not None:
            grad_r = (row_dot.T / row_scale.to(st)).to(row_scale.dtype)
        if col_scale is not None:
            grad_c = (acc[m * d:m * (d + k)].view(k, m).T / col_scale.to(st)).to(col_scale.dtype)
        return (grad_q.to(query.dtype), grad_k.to(keys.dtype), grad_scale, grad_r, grad_c,
                None, None, None, None, None, None)


def ring_lse_stats(query: Tensor, keys: Tensor, logit_scale, *, compute_col: bool = True,
                   group=None, backend: str = "auto", exact_scale_grad: bool = False,
                   matryoshka_dims=None,
                   matryoshka_normalize: bool = True) -> tuple[Tensor, Tensor, Tensor]:
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
        With ``matryoshka_dims`` (as :func:`contrastive_kernels.lse_stats`): the statistics of
        every prefix, stacked (k, ·), from the same ring passes.
    Gradients: differentiable; the backward is a second ring pass and computes, for every rank's
    inputs, the gradient of ``Σ_r' loss_r'`` — the sum of the losses all ranks built from their
    statistics — w.r.t. that rank's rows (features). ``logit_scale`` gets this rank's share of
    ``∂(Σ_r' loss_r')/∂s``, namely ``Σ_ij G_ij·S_ij / s`` over the blocks ``(Q_r, K_b)`` this rank
    computed; the shares sum over ranks to the full derivative. With ``exact_scale_grad=True`` it
    gets instead exactly ``∂loss_r/∂s`` of this rank's own loss (row and positive terms of its
    rows, column terms of its keys, the latter computed on the other ranks and sent home), at the
    cost of a second ``lse_bwd`` per block in the backward.
    """
    require_initialized("ring_lse_stats")
    _checks.check_features("query", query, "keys", keys)
    sc = _checks.scale_tensor(logit_scale, query)
    mrl = functional._matryoshka(matryoshka_dims, None, matryoshka_normalize, query)
    sizes = exchange_sizes(query, keys, group)
    if any(m < n for n, m, _ in sizes):
        raise ValueError(f"each rank's positive of query i is its key i, which needs M_r >= N_r; "
                         f"(N, M, D) per rank = {sizes}")
    if dist.get_world_size(group) == 1:
        return functional.lse_stats(query, keys, sc, compute_col=compute_col, backend=backend,
                                    matryoshka_dims=matryoshka_dims,
                                    matryoshka_normalize=matryoshka_normalize)[:3]
    name = backends.resolve(backend, query.device, query.dtype,
                            backends.features_of(prefix=mrl is not None))
    dims = r = c = None
    if mrl is not None:
        dims = list(mrl[0])
        if mrl[2]:
            r = functional._inverse_prefix_norms(query, mrl[0])
            c = functional._inverse_prefix_norms(keys, mrl[0])
    return _RingLSE.apply(query.contiguous(), keys.contiguous(), sc, r, c, compute_col, dims,
                          name, group, sizes, exact_scale_grad)


def ring_clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                   *, group=None, backend: str = "auto", exact_scale_grad: bool = False,
                   matryoshka_dims=None, matryoshka_weights=None,
                   matryoshka_normalize: bool = True) -> Tensor:
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
    ``matryoshka_dims``, ``matryoshka_weights``, ``matryoshka_normalize`` (as ``clip_loss``): the
    weighted sum over prefixes of the above, every prefix from the same two ring passes.
    """
    _checks.check_pairs("ring_clip_loss", "image_features", image_features, "text_features",
                        text_features)
    mrl = functional._matryoshka(matryoshka_dims, matryoshka_weights, matryoshka_normalize,
                                 image_features)
    row, col, pos = ring_lse_stats(image_features, text_features, logit_scale, compute_col=True,
                                   group=group, backend=backend, exact_scale_grad=exact_scale_grad,
                                   matryoshka_dims=matryoshka_dims,
                                   matryoshka_normalize=matryoshka_normalize)
    per_row = 0.5 * ((row - pos) + (col - pos))  # (N,), or (k, N): one row per prefix
    loss = (per_row if mrl is None else functional._weighted(per_row, mrl[1])).mean()
    return _checks.zero_gradient_term(loss, logit_bias)


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
