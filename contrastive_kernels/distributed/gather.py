"""All-gather distributed CLIP loss with exactly open_clip's semantics (``ClipLoss(world_size > 1)``).

``gather_features`` + the fused ops reproduce open_clip's ``gather_features`` + ``ClipLoss`` in all
four ``(local_loss, gather_with_grad)`` settings: same per-rank loss value and same per-rank
gradients for the features and ``logit_scale``. Memory O(W·N·D) per rank for the gathered features
(the ring variant in ``ring.py`` avoids that).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _checks, functional


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


def gathered_clip_loss(image_features: Tensor, text_features: Tensor, logit_scale,
                       logit_bias=None, *, local_loss: bool = False,
                       gather_with_grad: bool = False, rank: int = 0, world_size: int = 1,
                       labels: Optional[Tensor] = None, backend: str = "auto",
                       group=None, **matryoshka) -> Tensor:
    """open_clip's distributed ``ClipLoss`` computed by the fused ops (no N×M logits).

    Args:
        image_features, text_features: (N, D) local rows; every rank must hold the same N.
        labels: optional precomputed ``arange(N) + rank·N`` for ``local_loss`` (label caching).
        matryoshka: ``matryoshka_dims`` / ``matryoshka_weights`` / ``matryoshka_normalize``,
            passed to the losses on the gathered features (every prefix from one sweep).
    Returns:
        ``local_loss=False``: the global CLIP loss over all W·N pairs (same value on every rank).
        ``local_loss=True``: ``½(InfoNCE(I_r → T) + InfoNCE(T_r → I))`` with labels offset by
        ``rank·N`` — the local rows against all gathered candidates.
    """
    _checks.check_pairs("ClipLoss", "image_features", image_features, "text_features",
                        text_features)
    all_i, all_t = gather_features(image_features, text_features, local_loss, gather_with_grad,
                                   rank, world_size, group=group)
    if not local_loss:
        return functional.clip_loss(all_i, all_t, logit_scale, logit_bias, backend=backend,
                                    **matryoshka)
    n = image_features.shape[0]
    if labels is None:
        labels = torch.arange(n, device=image_features.device, dtype=torch.int64) + n * rank
    loss = 0.5 * (functional.info_nce(image_features, all_t, logit_scale, labels, backend=backend,
                                      **matryoshka)
                  + functional.info_nce(text_features, all_i, logit_scale, labels, backend=backend,
                                        **matryoshka))
    return _checks.zero_gradient_term(loss, logit_bias)


def gathered_distill_clip_loss(image_features: Tensor, text_features: Tensor, logit_scale,
                               dist_image_features: Tensor, dist_text_features: Tensor,
                               dist_logit_scale, *, local_loss: bool = False,
                               gather_with_grad: bool = False, rank: int = 0, world_size: int = 1,
                               labels: Optional[Tensor] = None, backend: str = "auto",
                               group=None) -> tuple[Tensor, Tensor]:
    """open_clip's distributed ``DistillClipLoss`` computed by the fused ops: the student's and the
    teacher's features are gathered alike (open_clip's ``get_logits`` for both), then
    ``(contrastive, distill)`` over all W·N pairs (``local_loss=False``) or the local rows against
    every gathered candidate, labels offset by ``rank·N`` (``local_loss=True``)."""
    _checks.check_pairs("DistillClipLoss", "image_features", image_features, "text_features",
                        text_features)
    _checks.check_pairs("DistillClipLoss", "dist_image_features", dist_image_features,
                        "dist_text_features", dist_text_features)
    all_i, all_t = gather_features(image_features, text_features, local_loss, gather_with_grad,
                                   rank, world_size, group=group)
    all_di, all_dt = gather_features(dist_image_features, dist_text_features, local_loss,
                                     gather_with_grad, rank, world_size, group=group)
    scale = _checks.scale_tensor(logit_scale, image_features)
    t_scale = _checks.scale_tensor(dist_logit_scale, image_features)
    if not local_loss:
        c, d = functional.distill_directions(all_i, all_t, scale, all_di, all_dt, t_scale, None,
                                             True, backend)
        return c.mean(), d.mean()
    n = image_features.shape[0]
    if labels is None:
        labels = torch.arange(n, device=image_features.device, dtype=torch.int64) + n * rank
    c_i, d_i = functional.distill_directions(image_features, all_t, scale, dist_image_features,
                                             all_dt, t_scale, labels, False, backend)
    c_t, d_t = functional.distill_directions(text_features, all_i, scale, dist_text_features,
                                             all_di, t_scale, labels, False, backend)
    return 0.5 * (c_i.mean() + c_t.mean()), 0.5 * (d_i.mean() + d_t.mean())
