"""Dense reference formulas (docs/math.md §1 and §3) — the ground truth every test compares against.

These materialise the full N×M logit matrix, so they are for checking, not for training at scale.
They deliberately import nothing from the rest of the package: a bug in the fused path cannot leak
into its own yardstick. Compute in float64 for ground truth (``.double()`` the inputs first).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "logits",
    "info_nce",
    "clip_loss",
    "gamma_contrastive_loss",
    "lse_stats",
]


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def logits(query: Tensor, keys: Tensor, logit_scale) -> Tensor:
    """S = s·Q·Kᵀ, shape (N, M)."""
    return logit_scale * (query @ keys.T)


def _labels(n: int, labels: Optional[Tensor], device) -> Tensor:
    return torch.arange(n, device=device) if labels is None else labels


def lse_stats(query: Tensor, keys: Tensor, logit_scale, labels: Optional[Tensor] = None):
    """(row_lse (N,), col_lse (M,), pos (N,)) of S, densely."""
    s = logits(query, keys, logit_scale)
    lab = _labels(query.shape[0], labels, query.device)
    pos = s.gather(1, lab[:, None]).squeeze(1)
    return torch.logsumexp(s, dim=1), torch.logsumexp(s, dim=0), pos


def info_nce(query: Tensor, keys: Tensor, logit_scale, labels: Optional[Tensor] = None,
             reduction: str = "mean") -> Tensor:
    """ℓ_i = −S_{i,l_i} + log Σ_j exp(S_ij) (docs/math.md §1), reduced."""
    s = logits(query, keys, logit_scale)
    lab = _labels(query.shape[0], labels, query.device)
    per_sample = torch.logsumexp(s, dim=1) - s.gather(1, lab[:, None]).squeeze(1)
    return _reduce(per_sample, reduction)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
              reduction: str = "mean") -> Tensor:
    """Symmetric CLIP loss ½(ℓ_i2t + ℓ_t2i) with positives on the diagonal (N = M)."""
    s = logits(image_features, text_features, logit_scale)
    if logit_bias is not None:
        s = s + logit_bias
    diag = s.diagonal()
    per_sample = 0.5 * ((torch.logsumexp(s, dim=1) - diag) + (torch.logsumexp(s, dim=0) - diag))
    return _reduce(per_sample, reduction)


def gamma_contrastive_loss(query: Tensor, keys: Tensor, logit_scale, log_u: Tensor,
                           labels: Optional[Tensor] = None, reduction: str = "mean"):
    """Decomposable loss of docs/math.md §3 given fixed ``log_u`` (N,).

    ℓ̃_i = −S_{i,l_i} + u_i·Ẑ_i with Ẑ_i = (1/M)·Σ_j exp(S_ij). Returns ``(loss, log_z)`` where
    ``log_z = log Ẑ_i`` is detached. ``u`` receives no gradient.
    """
    s = logits(query, keys, logit_scale)
    lab = _labels(query.shape[0], labels, query.device)
    log_z = torch.logsumexp(s, dim=1) - math.log(s.shape[1])
    per_sample = -s.gather(1, lab[:, None]).squeeze(1) + torch.exp(log_u.detach() + log_z)
    return _reduce(per_sample, reduction), log_z.detach()
