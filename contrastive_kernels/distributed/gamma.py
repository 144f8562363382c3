"""Distributed Gamma loss (docs/math.md §3): the state replicated on every rank, rows of every rank."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import functional
from ..gamma import GammaContrastiveLoss, decomposable_objective
from ._comm import all_gather_varlen, collective_device, exchange_sizes, require_initialized
from .ring import ring_lse_stats


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
        dev = collective_device(self.log_z_row, self.group)
        buf = state.to(dev)
        dist.broadcast(buf, src=root, group=self.group)
        self.generator.set_state(buf.cpu())
        self._generator_synced = True

    def set_extra_state(self, state) -> None:
        super().set_extra_state(state)
        self._generator_synced = False  # a loaded checkpoint is re-broadcast at the next step

    def forward(self, image_features: Tensor, text_features: Tensor, index: Tensor,
                logit_scale, output_dict: bool = False, *, labels: Optional[Tensor] = None):
        require_initialized("DistributedGammaContrastiveLoss")
        if labels is not None:
            raise ValueError("DistributedGammaContrastiveLoss does not take labels: each rank's "
                             "anchor i has its positive at the same rank's text_features[i]")
        self.check_batch(image_features, text_features, index)
        n, m = image_features.shape[0], text_features.shape[0]
        if not self._generator_synced and self.estimator == "gamma":
            self.sync_generator()
        w, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        group, backend = self.group, self.backend
        sizes = [(a, b) for a, b, _ in exchange_sizes(image_features, text_features, group)]
        if self.ring:
            row, col, pos = ring_lse_stats(image_features, text_features, logit_scale,
                                           compute_col=self.symmetric, group=group,
                                           backend=backend)
        else:
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
        all_index = all_gather_varlen(index, n_lengths, group)

        def direction(stat: Tensor, name: str, num_candidates: int) -> Tensor:
            log_z = stat.detach() - math.log(num_candidates)
            all_log_z = all_gather_varlen(log_z, n_lengths, group)
            self.update_state(all_index, all_log_z, name)
            log_u = self.estimate_log_u(all_index, all_log_z, name)[start:start + n]
            return decomposable_objective(stat, pos, log_u, num_candidates).mean()

        objective = direction(row, "row", m_tot)
        info_nce = (row - pos).detach().mean()
        if self.symmetric:
            objective = 0.5 * (objective + direction(col, "col", n_tot))
            info_nce = 0.5 * (info_nce + (col - pos).detach().mean())
        objective, info_nce = weight * objective, weight * info_nce
        if output_dict:
            return {"contrastive_loss": objective, "info_nce": info_nce}
        return objective
