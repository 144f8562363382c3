"""Dense reference formulas (docs/math.md §1, §3, §6, §7) — the ground truth every test compares
against (the one dense oracle of the conformance suite).

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
    "nt_xent_loss",
    "supcon_loss",
    "siglip_loss",
    "lse_op",
    "sigmoid_op",
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


def lse_stats(query: Tensor, keys: Tensor, logit_scale, labels: Optional[Tensor] = None, *,
              exclude_self: bool = False, query_classes: Optional[Tensor] = None,
              key_classes: Optional[Tensor] = None, query_groups: Optional[Tensor] = None,
              key_groups: Optional[Tensor] = None, guide_query: Optional[Tensor] = None,
              guide_keys: Optional[Tensor] = None, guide_threshold: Optional[Tensor] = None):
    """(row_lse (N,), col_lse (M,), pos (N,)) of S densely, or with classes
    (row_lse, col_lse, pos_sum (N,), pos_count (N,)); the self pair left out under
    ``exclude_self`` (a label on it then means no positive: pos 0), same-group pairs left out when
    groups are given, and guided false negatives (guide similarity above the row's threshold, the
    positives never) left out when a guide is given."""
    s = logits(query, keys, logit_scale)
    n, m = s.shape
    excluded, positive = _op_masks(n, m, labels, query_classes, key_classes, exclude_self,
                                   s.device, query_groups, key_groups, guide_query, guide_keys,
                                   guide_threshold)
    masked = s.masked_fill(excluded, float("-inf"))
    row, col = torch.logsumexp(masked, dim=1), torch.logsumexp(masked, dim=0)
    pos = torch.where(positive, s, 0.0).sum(1)
    if query_classes is not None:
        return row, col, pos, positive.sum(1).to(s.dtype)
    return row, col, pos


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


def nt_xent_loss(view_a: Tensor, view_b: Tensor, logit_scale, reduction: str = "mean") -> Tensor:
    """SimCLR NT-Xent over X = [a; b]: ℓ_i = log Σ_{j≠i} exp(S_ij) − S_{i, i±N} (docs/math.md §6)."""
    x = torch.cat([view_a, view_b])
    n2 = x.shape[0]
    s = logits(x, x, logit_scale).masked_fill(torch.eye(n2, dtype=torch.bool, device=x.device),
                                              float("-inf"))
    other = torch.arange(n2, device=x.device).roll(n2 // 2)
    per_sample = torch.logsumexp(s, dim=1) - s.gather(1, other[:, None]).squeeze(1)
    return _reduce(per_sample, reduction)


def supcon_loss(features: Tensor, labels: Tensor, logit_scale, ref_features: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """SupCon "L_out" (docs/math.md §6): ℓ_i = log Σ_{A(i)} exp(S) − mean_{P(i)} S; anchors without
    a positive are left out (0 under "none"); a batch without any positive or negative pair is 0."""
    keys = features if ref_features is None else ref_features
    key_labels = labels if ref_labels is None else ref_labels
    s = logits(features, keys, logit_scale)
    n, m = s.shape
    candidate = torch.ones(n, m, dtype=torch.bool, device=s.device)
    if ref_features is None:
        candidate &= ~torch.eye(n, m, dtype=torch.bool, device=s.device)
    pos_mask = (labels[:, None] == key_labels[None, :]) & candidate
    neg_mask = (labels[:, None] != key_labels[None, :]) & candidate
    count = pos_mask.sum(1)
    lse = torch.logsumexp(s.masked_fill(~candidate, float("-inf")), dim=1)
    mean_pos = torch.where(pos_mask, s, 0.0).sum(1) / count.clamp_min(1)
    keep = (count > 0) & bool(pos_mask.any() and neg_mask.any())
    per_sample = torch.where(keep, lse - mean_pos, torch.zeros_like(lse))
    if reduction == "mean":
        return per_sample.sum() / keep.sum().clamp_min(1)
    return _reduce(per_sample, reduction)


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                labels: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """Sigmoid loss (docs/math.md §7): Σ_ij softplus(−z_ij·(s·I·Tᵀ + b))/N, z = +1 on positives."""
    s = logits(image_features, text_features, logit_scale)
    if logit_bias is not None:
        s = s + logit_bias
    n = s.shape[0]
    if labels is None:
        pos = torch.eye(n, dtype=torch.bool, device=s.device)
    else:
        pos = labels[:, None] == labels[None, :]
    z = torch.where(pos, 1.0, -1.0).to(s.dtype)
    # softplus(x) = log(1 + e^x) exactly (F.softplus switches to x above 20: an e^-20 error)
    per_row = torch.logaddexp(-z * s, torch.zeros_like(s)).sum(1)
    if reduction == "mean":
        return per_row.sum() / n
    return _reduce(per_row, reduction)


# ---------------------------------------------------------------------------------------------
# the two ops' contracts with their backward written out (the kernels' G formula), for the tests
# of the ops themselves; tests/test_reference.py checks each gradient once against autograd
# ---------------------------------------------------------------------------------------------

def guided_false_negatives(guide_query: Tensor, guide_keys: Tensor,
                           guide_threshold: Tensor) -> Tensor:
    """(N, M) bool: pairs whose guide similarity ⟨g_q_i, g_k_j⟩ exceeds the row's threshold t_i
    (GISTEmbed's false-negative rule; the caller protects the positives)."""
    g = guide_query.double() @ guide_keys.double().T
    return g > guide_threshold.double()[:, None]


def _op_masks(n: int, m: int, labels, row_classes, col_classes, exclude_self: bool, device,
              row_groups=None, col_groups=None, guide_query=None, guide_keys=None,
              guide_threshold=None):
    """(excluded, positive) (N, M) bool masks of the op contract: excluded = the self pair under
    ``exclude_self`` ∪ same-group pairs ∪ guided false negatives that are not designated positives;
    positive = designated positives (the labelled column, the diagonal, or same-class columns)
    that are not excluded."""
    idx_r, idx_c = torch.arange(n, device=device), torch.arange(m, device=device)
    excluded = (idx_r[:, None] == idx_c[None, :]) if exclude_self else \
        torch.zeros(n, m, dtype=torch.bool, device=device)
    if row_classes is not None:
        designated = row_classes[:, None] == col_classes[None, :]
    else:
        lab = _labels(n, labels, device)
        designated = lab[:, None] == idx_c[None, :]
    if row_groups is not None:
        excluded = excluded | (row_groups[:, None] == col_groups[None, :])
    if guide_query is not None:
        excluded = excluded | (guided_false_negatives(guide_query, guide_keys, guide_threshold)
                               & ~designated)
    return excluded, designated & ~excluded


def lse_op(query: Tensor, keys: Tensor, logit_scale, labels: Optional[Tensor] = None,
           row_classes: Optional[Tensor] = None, col_classes: Optional[Tensor] = None,
           exclude_self: bool = False, grad_row: Optional[Tensor] = None,
           grad_col: Optional[Tensor] = None, grad_pos: Optional[Tensor] = None,
           dtype: torch.dtype = torch.float64, row_groups: Optional[Tensor] = None,
           col_groups: Optional[Tensor] = None, guide_query: Optional[Tensor] = None,
           guide_keys: Optional[Tensor] = None, guide_threshold: Optional[Tensor] = None,
           grad_logits_dtype: Optional[torch.dtype] = None):
    """The log-sum-exp op densely in ``dtype``: ``(row_lse (N,), col_lse (M,), pos (N,),
    pos_count (N,) or (0,), grad_query (N, D), grad_keys (M, D))`` with
    ``G_ij = [kept]·(g_row_i·e^{S_ij − r_i} + g_col_j·e^{S_ij − c_j}) + g_pos_i·[j ∈ P(i)]``,
    ``grad_query = s·G·K`` and ``grad_keys = s·Gᵀ·Q`` (docs/internals.md's op contract). ``pos`` is
    the positive logit, or the sum over the class positives (then ``pos_count`` is their number);
    a label on an excluded self pair is no positive. Excluded: the self pair under
    ``exclude_self``, pairs with ``row_groups[i] == col_groups[j]``, and pairs with
    ``⟨guide_query_i, guide_keys_j⟩ > guide_threshold_i`` unless designated positive.
    ``grad_logits_dtype``: G is rounded to that dtype before the gradient products (the CPU
    kernels' bf16 path rounds G to bfloat16 per tile, see _round_grad_logits)."""
    q, k = query.to(dtype), keys.to(dtype)
    n, m = q.shape[0], k.shape[0]
    s = float(logit_scale)
    S = s * q @ k.T
    excluded, positive = _op_masks(n, m, labels, row_classes, col_classes, exclude_self, q.device,
                                   row_groups, col_groups, guide_query, guide_keys, guide_threshold)
    Sm = S.masked_fill(excluded, float("-inf"))
    row, col = torch.logsumexp(Sm, 1), torch.logsumexp(Sm, 0)
    zero = torch.zeros((), dtype=dtype, device=q.device)
    pos = torch.where(positive, S, zero).sum(1)
    count = positive.sum(1).to(dtype) if row_classes is not None else S.new_zeros(0)
    G = torch.zeros_like(S)
    if grad_row is not None:
        G = G + grad_row.to(dtype)[:, None] * torch.where(excluded, zero, torch.exp(Sm - row[:, None]))
    if grad_col is not None:
        G = G + grad_col.to(dtype)[None, :] * torch.where(excluded, zero, torch.exp(Sm - col[None, :]))
    if grad_pos is not None:
        G = G + grad_pos.to(dtype)[:, None] * positive.to(dtype)
    G = _round_grad_logits(G, grad_logits_dtype)
    return row, col, pos, count, s * G @ k, s * G.T @ q


def sigmoid_op(query: Tensor, keys: Tensor, logit_scale, logit_bias, row_classes=None,
               col_classes=None, diagonal: bool = True, grad_row: Optional[Tensor] = None,
               dtype: torch.dtype = torch.float64,
               grad_logits_dtype: Optional[torch.dtype] = None):
    """The sigmoid op densely in ``dtype``: ``(row_loss (N,), grad_query (N, D), grad_keys (M, D),
    grad_bias_row (N,))``: row sums of softplus(−z·(S + b)) with z = +1 on positives (equal
    classes, or the diagonal when ``diagonal``), ``G = g_row·(−z)·σ(−z·(S + b))``, the bias
    gradient of each row ``Σ_j G_ij`` (from G itself; ``grad_logits_dtype`` as in lse_op rounds
    G for the two gradient products only)."""
    q, k = query.to(dtype), keys.to(dtype)
    n, m = q.shape[0], k.shape[0]
    s = float(logit_scale)
    L = s * q @ k.T + float(logit_bias)
    if row_classes is not None:
        positive = row_classes[:, None] == col_classes[None, :]
    else:
        eye = torch.arange(n, device=q.device)[:, None] == torch.arange(m, device=q.device)[None, :]
        positive = eye if diagonal else torch.zeros_like(eye)
    z = torch.where(positive, 1.0, -1.0).to(dtype)
    x = -z * L
    loss = torch.logaddexp(x, torch.zeros_like(x)).sum(1)
    if grad_row is None:
        grad_row = torch.ones(n, dtype=dtype, device=q.device)
    G = grad_row.to(dtype)[:, None] * -z * torch.sigmoid(x)
    Gr = _round_grad_logits(G, grad_logits_dtype)
    return loss, s * Gr @ k, s * Gr.T @ q, G.sum(1)


def _round_grad_logits(G: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    """G rounded to ``dtype`` and back (None: unchanged): a model of kernels that feed G to 16-bit
    matrix units, as the native CPU kernels' bf16 path does (products of the rounded values exact,
    the sums in G's dtype)."""
    return G if dtype is None else G.to(dtype).to(G.dtype)
