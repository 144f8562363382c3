"""Public functional API (the README's API summary): validated front doors to the registered ops.

Every function checks its inputs (``_checks``: clear ``ValueError``/``TypeError`` naming the
offending shapes, dtypes or values), resolves the backend, then calls a registered op (``ops``) and
builds the loss from its per-row/per-column statistics with a few O(N) ops. Autograd flows through
the op's single registered backward, whatever the backend.

=====================  =====================================================  ================
function               loss                                                   docs/math.md
=====================  =====================================================  ================
``lse_stats``          the op's statistics: build your own loss               §2
``info_nce``           one-directional InfoNCE, M ≥ 1 candidates              §1
``clip_loss``          symmetric CLIP (open_clip's ClipLoss)                  §1
``nt_xent_loss``       SimCLR NT-Xent over 2N views, self pair excluded       §6
``supcon_loss``        supervised contrastive (Khosla "L_out"), class positives  §6
``siglip_loss``        sigmoid loss (open_clip's SigLipLoss)                  §7
``distill_clip_loss``  CLIP loss + distillation from a teacher's logits       §10
=====================  =====================================================  ================

Shapes: ``N`` anchors, ``M`` candidates, ``D`` features. Losses and statistics are float32 (float64
for float64 inputs); gradients come back in the input dtype. Nothing here reads a device tensor's
value, so a training step on the GPU never waits for the host (``_checks``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks, backends, ops
from ._types import ScaleLike, stat_dtype

__all__ = ["info_nce", "clip_loss", "lse_stats", "nt_xent_loss", "supcon_loss", "siglip_loss",
           "distill_clip_loss"]


def _lse(query, keys, scale, labels, row_classes, col_classes, exclude_self, compute_col, backend,
         row_groups=None, col_groups=None, guide=None):
    """The op on validated inputs: (row_lse, col_lse, pos, pos_count)."""
    name = backends.resolve(backend, query.device, query.dtype,
                            backends.features_of(exclude_self=exclude_self,
                                                 classes=row_classes is not None,
                                                 groups=row_groups is not None,
                                                 guide=guide is not None))
    guide = guide if guide is not None else (None, None, None)
    return ops.lse_fwd(query.contiguous(), keys.contiguous(), scale, labels, row_classes,
                       col_classes, exclude_self, compute_col, name, row_groups, col_groups, *guide)


# ---------------------------------------------------------------------------------------------
# Matryoshka: every prefix dimension's loss from one sweep (docs/math.md §9)
# ---------------------------------------------------------------------------------------------

def _inverse_prefix_norms(x: Tensor, dims: tuple) -> Tensor:
    """(N, k) 1 / max(‖x_i[:d_t]‖, 1e-12) in the statistic dtype (F.normalize's rule), differentiable:
    segment sums of squares, accumulated, O(N·D)."""
    sq = x.to(stat_dtype(x.dtype)).square()
    bounds = (0,) + dims
    seg = torch.stack([sq[:, a:b].sum(dim=1) for a, b in zip(bounds[:-1], bounds[1:])], dim=1)
    return 1.0 / seg.cumsum(dim=1).sqrt().clamp_min(1e-12)


def _matryoshka(matryoshka_dims, matryoshka_weights, matryoshka_normalize, x: Tensor):
    """Validated settings, or None when Matryoshka is off."""
    if matryoshka_dims is None:
        if matryoshka_weights is not None:
            raise ValueError("matryoshka_weights needs matryoshka_dims")
        return None
    return _checks.check_matryoshka(matryoshka_dims, matryoshka_weights, matryoshka_normalize,
                                    x.shape[1])


def _weighted(per_prefix: Tensor, weights: tuple) -> Tensor:
    """Σ_t w_t·per_prefix[t]: (k, N) → (N,)."""
    w = torch.tensor(weights, dtype=per_prefix.dtype).to(per_prefix.device, non_blocking=True)
    return (w[:, None] * per_prefix).sum(dim=0)


def _lse_prefix(query, keys, scale, mrl, labels, row_classes, col_classes, exclude_self,
                compute_col, backend, same_keys: bool = False, row_groups=None, col_groups=None,
                guide=None):
    """The prefix op on validated inputs: stats stacked (k, ·)."""
    dims, _, normalize = mrl
    name = backends.resolve(backend, query.device, query.dtype,
                            backends.features_of(exclude_self=exclude_self,
                                                 classes=row_classes is not None,
                                                 groups=row_groups is not None,
                                                 guide=guide is not None, prefix=True))
    r = c = None
    if normalize:
        r = _inverse_prefix_norms(query, dims)
        c = r if same_keys else _inverse_prefix_norms(keys, dims)
    guide = guide if guide is not None else (None, None, None)
    return ops.lse_prefix_fwd(query.contiguous(), keys.contiguous(), scale, list(dims), r, c,
                              labels, row_classes, col_classes, exclude_self, compute_col, name,
                              row_groups, col_groups, *guide)


def lse_stats(query: Tensor, keys: Tensor, logit_scale: ScaleLike, labels: Optional[Tensor] = None,
              *, compute_col: bool = True, exclude_self: bool = False,
              query_classes: Optional[Tensor] = None, key_classes: Optional[Tensor] = None,
              query_groups: Optional[Tensor] = None, key_groups: Optional[Tensor] = None,
              guide_query: Optional[Tensor] = None, guide_keys: Optional[Tensor] = None,
              guide_threshold=None, matryoshka_dims=None, matryoshka_normalize: bool = True,
              backend: str = "auto"):
    """The log-sum-exp op's statistics of ``S = logit_scale·query·keysᵀ``, differentiable.

    Args:
        query: (N, D). keys: (M, D). labels: (N,) int64 or None (positive of row i is column i).
        compute_col: also return the column statistic.
        exclude_self: leave the self pair ``(i, i)`` (i < min(N, M)) out of both statistics — for
            anchors that are also candidates (``keys`` is ``query``, or starts with it).
        query_classes, key_classes: (N,) and (M,) int64 class labels (both or neither, instead of
            ``labels``): the positives of row i are then every column of its class (the self pair
            excluded under ``exclude_self``).
        query_groups, key_groups: (N,) and (M,) int64 (both or neither): every pair with
            ``query_groups[i] == key_groups[j]`` leaves both statistics (and is no positive) —
            e.g. a document and the other documents of its own query (sentence-transformers'
            ``doc_to_doc`` with hard negatives: ``query_groups = arange(B)``,
            ``key_groups = arange(B·(1+n)) % B``).
        guide_query, guide_keys, guide_threshold: (N, Dg), (M, Dg) and (N,) or a number (all three
            or none): GISTEmbed's guided false-negative mask — pair (i, j) leaves both statistics
            when ``⟨guide_query_i, guide_keys_j⟩ > guide_threshold_i``, unless it is a positive
            of row i (its labelled column, or a same-class column). The guide similarity is
            computed tile by tile in float32 (float64 for float64 inputs), never stored; the guide
            gets no gradient. For a cosine guide pass L2-normalised guide embeddings.
        matryoshka_dims, matryoshka_normalize: the statistics at every prefix dimension
            ``d_1 < … < d_k`` (of ``S^t = logit_scale·q[:, :d_t]·k[:, :d_t]ᵀ``, each prefix
            L2-normalised when ``matryoshka_normalize``) from one sweep, stacked: every output
            below gains a leading dimension k (``pos_count`` excepted).
    Returns:
        ``(row_lse (N,), col_lse (M,) or (0,), pos (N,))`` — ``log Σ_j exp(S_ij)``,
        ``log Σ_i exp(S_ij)`` over the kept pairs and ``S_{i, l_i}`` (0 when that pair is
        excluded) — or, with classes, ``(row_lse, col_lse, pos_sum (N,), pos_count (N,))``, the
        sum of the kept positive logits of each row and their number (not differentiable).
        Building block for losses beyond the ones shipped here. A row with every pair excluded
        has ``row_lse = −inf`` (and a zero gradient).
    """
    _checks.check_features("query", query, "keys", keys)
    n, m = query.shape[0], keys.shape[0]
    if not isinstance(exclude_self, bool):
        raise TypeError(f"exclude_self must be a bool, got {type(exclude_self).__name__}")
    if (query_classes is None) != (key_classes is None):
        raise ValueError("query_classes and key_classes go together: pass both (N,) and (M,) "
                         "int64 tensors, or neither")
    if (query_groups is None) != (key_groups is None):
        raise ValueError("query_groups and key_groups go together: pass both (N,) and (M,) "
                         "int64 tensors, or neither")
    rg = cg = guide = None
    if query_groups is not None:
        rg = _checks.check_int_vector("query_groups", query_groups, n, query.device)
        cg = _checks.check_int_vector("key_groups", key_groups, m, query.device)
    if any(x is not None for x in (guide_query, guide_keys, guide_threshold)):
        guide = _checks.check_guide(guide_query, guide_keys, guide_threshold, n, m, query)
    mrl = _matryoshka(matryoshka_dims, None, matryoshka_normalize, query)

    def op(labels, rc, cc):
        if mrl is None:
            return _lse(query, keys, scale, labels, rc, cc, exclude_self, compute_col, backend, rg,
                        cg, guide)
        out = _lse_prefix(query, keys, scale, mrl, labels, rc, cc, exclude_self, compute_col,
                          backend, same_keys=keys is query, row_groups=rg, col_groups=cg,
                          guide=guide)
        return out if compute_col else (out[0], out[1].new_empty(out[1].shape[0], 0)) + out[2:]

    if query_classes is not None:
        if labels is not None:
            raise ValueError("pass labels (one positive column per row) or classes (every "
                             "same-class column is a positive), not both")
        rc = _checks.check_int_vector("query_classes", query_classes, n, query.device)
        cc = _checks.check_int_vector("key_classes", key_classes, m, query.device)
        scale = _checks.scale_tensor(logit_scale, query)
        return op(None, rc, cc)
    labels = _checks.check_labels(labels, n, m, query.device)
    scale = _checks.scale_tensor(logit_scale, query)
    row, col, pos, _ = op(labels, None, None)
    return row, col, pos


def info_nce(query: Tensor, keys: Tensor, logit_scale: ScaleLike, labels: Optional[Tensor] = None,
             *, reduction: str = "mean", matryoshka_dims=None, matryoshka_weights=None,
             matryoshka_normalize: bool = True, backend: str = "auto") -> Tensor:
    """One-directional InfoNCE of N anchors against M candidates, fused (no N×M matrix).

    ``ℓ_i = −S_{i,l_i} + log Σ_j exp(S_ij)`` with ``S = logit_scale·query·keysᵀ``.

    Args:
        query: (N, D) anchors. keys: (M, D) candidates (batch, queue, gathered negatives; M may
            exceed N by far). logit_scale: s = 1/temperature, float or 0-d tensor (gets a gradient
            when it requires one). labels: (N,) int64 index of each anchor's positive in ``keys``;
            default ``arange(N)`` (needs M ≥ N). reduction: "mean" | "sum" | "none".
        matryoshka_dims, matryoshka_weights, matryoshka_normalize: Matryoshka training: the loss
            is ``Σ_t w_t·loss(x[:, :d_t], …)`` over the strictly increasing prefix dimensions
            ``d_t`` (the last ≤ D; weights default to 1), each prefix L2-normalised when
            ``matryoshka_normalize`` (cosine at every prefix), all prefixes from one sweep over
            the tiles (docs/math.md §9); ``reduction="none"`` gives the per-row weighted sums.
        backend: "auto" | "reference" | "chunked" | "cpu" | "triton" | "cuda".
    Returns:
        Scalar, or (N,) for ``reduction="none"``; float32 (float64 for float64 inputs).
    """
    _checks.check_reduction(reduction)
    mrl = _matryoshka(matryoshka_dims, matryoshka_weights, matryoshka_normalize, query)
    if mrl is None:
        row, _, pos = lse_stats(query, keys, logit_scale, labels, compute_col=False,
                                backend=backend)
        return _checks.reduce(row - pos, reduction)
    _checks.check_features("query", query, "keys", keys)
    labels = _checks.check_labels(labels, query.shape[0], keys.shape[0], query.device)
    scale = _checks.scale_tensor(logit_scale, query)
    row, _, pos, _ = _lse_prefix(query, keys, scale, mrl, labels, None, None, False, False, backend)
    return _checks.reduce(_weighted(row - pos, mrl[1]), reduction)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: ScaleLike,
              logit_bias: Optional[ScaleLike] = None, *, reduction: str = "mean",
              matryoshka_dims=None, matryoshka_weights=None, matryoshka_normalize: bool = True,
              backend: str = "auto") -> Tensor:
    """Symmetric CLIP loss ½(InfoNCE(img→txt) + InfoNCE(txt→img)) in one fused pass.

    Args:
        image_features: (N, D). text_features: (N, D); pair i is (image i, text i).
        logit_scale: s = 1/temperature (already exponentiated, as open_clip passes it).
        logit_bias: optional constant added to every logit; it cancels in the softmax, so the loss
            is unchanged and its gradient is exactly 0 (as in open_clip's ClipLoss).
        reduction: "mean" | "sum" | "none" (per pair: ½(ℓ_i2t + ℓ_t2i), shape (N,)).
        matryoshka_dims, matryoshka_weights, matryoshka_normalize: Matryoshka training: the loss
            is ``Σ_t w_t·loss(x[:, :d_t], …)`` over the strictly increasing prefix dimensions
            ``d_t`` (the last ≤ D; weights default to 1), each prefix L2-normalised when
            ``matryoshka_normalize`` (cosine at every prefix), all prefixes from one sweep over
            the tiles (docs/math.md §9); ``reduction="none"`` gives the per-row weighted sums.
    Returns:
        Scalar or (N,); float32 (float64 for float64 inputs). Equals open_clip's
        ``ClipLoss()(image_features, text_features, logit_scale)`` up to rounding.
    """
    _checks.check_reduction(reduction)
    _checks.check_pairs("clip_loss", "image_features", image_features, "text_features",
                        text_features)
    mrl = _matryoshka(matryoshka_dims, matryoshka_weights, matryoshka_normalize, image_features)
    if mrl is None:
        row, col, pos = lse_stats(image_features, text_features, logit_scale, None,
                                  compute_col=True, backend=backend)
        loss = _checks.reduce(0.5 * ((row - pos) + (col - pos)), reduction)
    else:
        scale = _checks.scale_tensor(logit_scale, image_features)
        row, col, pos, _ = _lse_prefix(image_features, text_features, scale, mrl, None, None,
                                       None, False, True, backend)
        loss = _checks.reduce(_weighted(0.5 * ((row - pos) + (col - pos)), mrl[1]), reduction)
    return _checks.zero_gradient_term(loss, logit_bias)


def nt_xent_loss(view_a: Tensor, view_b: Tensor, logit_scale: ScaleLike, *,
                 reduction: str = "mean", matryoshka_dims=None, matryoshka_weights=None,
                 matryoshka_normalize: bool = True, backend: str = "auto") -> Tensor:
    """SimCLR's NT-Xent over the 2N views (docs/math.md §6), fused, without the N×N matrix.

    Every view is an anchor; its positive is the other view of its pair; every other view (the
    same-view ones included) is a negative; the self pair is excluded from the denominator:
    ``ℓ_i = log Σ_{j≠i} exp(S_ij) − S_{i,p(i)}`` over ``X = [view_a; view_b]`` with
    ``S = logit_scale·X·Xᵀ``. Equals pytorch-metric-learning's
    ``NTXentLoss(temperature=1/logit_scale)(cat(view_a, view_b), cat(arange N, arange N))`` on
    L2-normalised inputs (features are used as given: normalise them first for cosine similarity).

    Args:
        view_a, view_b: (N, D) the two views; row i of each is the same sample.
        logit_scale: s = 1/temperature, float or 0-d tensor (gets a gradient when it requires one).
        reduction: "mean" (over the 2N anchors) | "sum" | "none" ((2N,): view_a's anchors, then
            view_b's).
        matryoshka_dims, matryoshka_weights, matryoshka_normalize: Matryoshka training: the loss
            is ``Σ_t w_t·loss(x[:, :d_t], …)`` over the strictly increasing prefix dimensions
            ``d_t`` (the last ≤ D; weights default to 1), each prefix L2-normalised when
            ``matryoshka_normalize`` (cosine at every prefix), all prefixes from one sweep over
            the tiles (docs/math.md §9); ``reduction="none"`` gives the per-row weighted sums.
    Returns:
        Scalar or (2N,); float32 (float64 for float64 inputs).
    """
    _checks.check_reduction(reduction)
    _checks.check_matrix("view_a", view_a)
    _checks.check_matrix("view_b", view_b)
    if view_a.shape != view_b.shape:
        raise ValueError(f"nt_xent_loss pairs row i of view_a with row i of view_b, so the views "
                         f"must have the same shape: view_a {tuple(view_a.shape)} vs view_b "
                         f"{tuple(view_b.shape)}")
    _checks.check_features("view_a", view_a, "view_b", view_b)
    n = view_a.shape[0]
    x = torch.cat([view_a, view_b])
    scale = _checks.scale_tensor(logit_scale, x)
    idx = torch.arange(n, device=x.device)
    other = torch.cat([idx + n, idx])  # the other view of each anchor
    mrl = _matryoshka(matryoshka_dims, matryoshka_weights, matryoshka_normalize, x)
    if mrl is None:
        row, _, pos, _ = _lse(x, x, scale, other, None, None, True, False, backend)
        return _checks.reduce(row - pos, reduction)
    row, _, pos, _ = _lse_prefix(x, x, scale, mrl, other, None, None, True, False, backend,
                                 same_keys=True)
    return _checks.reduce(_weighted(row - pos, mrl[1]), reduction)


def supcon_loss(features: Tensor, labels: Tensor, logit_scale: ScaleLike, *,
                ref_features: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None,
                reduction: str = "mean", matryoshka_dims=None, matryoshka_weights=None,
                matryoshka_normalize: bool = True, backend: str = "auto") -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, "L_out"; docs/math.md §6), fused.

    ``ℓ_i = log Σ_{j∈A(i)} exp(S_ij) − (1/|P(i)|)·Σ_{p∈P(i)} S_ip`` with ``S = logit_scale·F·Rᵀ``:
    without a reference set ``R = F``, ``A(i)`` = every other row and ``P(i)`` = the other rows of
    row i's class (multi-view SupCon: the views are rows with equal labels); with ``ref_features``
    ``R`` is the reference set, ``A(i)`` all of it and ``P(i)`` its rows of row i's class (no self
    pair). The same positives, the same masks and the same normalisation as
    pytorch-metric-learning's ``SupConLoss(temperature=1/logit_scale)`` on L2-normalised inputs:

    - anchors with no positive are left out of the mean (``reduction="none"`` gives them 0);
    - a batch with no positive pair, or no negative pair, at all has loss 0 and a zero gradient
      (as PML; decided on the device, no host read);
    - PML's default reducer also drops anchors whose loss rounds to exactly 0 (every negative far
      below the positive); they are kept here (their gradient is 0 as well), so the mean can differ
      from PML's in that one case.

    Args:
        features: (N, D). labels: (N,) int64 classes. logit_scale: s = 1/temperature (gets a
            gradient when it requires one). ref_features: (M, D), ref_labels: (M,) int64 — both
            or neither. reduction: "mean" | "sum" | "none" ((N,)).
        matryoshka_dims, matryoshka_weights, matryoshka_normalize: Matryoshka training: the loss
            is ``Σ_t w_t·loss(x[:, :d_t], …)`` over the strictly increasing prefix dimensions
            ``d_t`` (the last ≤ D; weights default to 1), each prefix L2-normalised when
            ``matryoshka_normalize`` (cosine at every prefix), all prefixes from one sweep over
            the tiles (docs/math.md §9); ``reduction="none"`` gives the per-row weighted sums.
    Returns:
        Scalar or (N,); float32 (float64 for float64 inputs).
    """
    _checks.check_reduction(reduction)
    _checks.check_matrix("features", features)
    n = features.shape[0]
    labels = _checks.check_int_vector("labels", labels, n, features.device)
    if (ref_features is None) != (ref_labels is None):
        missing = "ref_labels" if ref_labels is None else "ref_features"
        raise ValueError(f"ref_features and ref_labels go together: {missing} is missing")
    if ref_features is None:
        keys, key_labels, exclude = features, labels, True
    else:
        _checks.check_features("features", features, "ref_features", ref_features)
        keys, exclude = ref_features, False
        key_labels = _checks.check_int_vector("ref_labels", ref_labels, ref_features.shape[0],
                                              features.device)
    scale = _checks.scale_tensor(logit_scale, features)
    mrl = _matryoshka(matryoshka_dims, matryoshka_weights, matryoshka_normalize, features)
    if mrl is None:
        row, _, pos_sum, pos_count = _lse(features, keys, scale, None, labels, key_labels, exclude,
                                          False, backend)
    else:
        row, _, pos_sum, pos_count = _lse_prefix(features, keys, scale, mrl, None, labels,
                                                 key_labels, exclude, False, backend,
                                                 same_keys=ref_features is None)
    has_pos = pos_count > 0
    # the candidates of row i, |A(i)|: every key, minus the self pair when keys are the features
    candidates = keys.shape[0] - (1 if exclude else 0)
    batch_ok = has_pos.any() & (pos_count < candidates).any()
    keep = has_pos & batch_ok
    # selects, never multiplies: an anchor with nothing left has row = −inf, and 0/0 for |P| = 0
    per = torch.where(keep, row - pos_sum / pos_count.clamp_min(1), torch.zeros_like(row))
    if mrl is not None:
        per = _weighted(per, mrl[1])
    if reduction == "mean":
        return per.sum() / keep.sum().clamp_min(1).to(per.dtype)
    return _checks.reduce(per, reduction)


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale: ScaleLike,
                logit_bias: Optional[ScaleLike] = None, *, labels: Optional[Tensor] = None,
                reduction: str = "mean", matryoshka_dims=None, matryoshka_weights=None,
                matryoshka_normalize: bool = True, backend: str = "auto") -> Tensor:
    """The sigmoid (SigLIP) loss (Zhai et al. 2023; docs/math.md §7), fused, no N×N matrix.

    ``L = (1/N)·Σ_ij softplus(−z_ij·(s·img_i·txt_j + b))`` with ``z_ij = +1`` for positive pairs
    (``i = j``, or with ``labels`` every pair of equal labels) and −1 otherwise — open_clip's
    ``SigLipLoss`` normalisation (sum over all pairs, divided by N).

    Args:
        image_features, text_features: (N, D); pair i is (image i, text i).
        logit_scale: s (already exponentiated, as open_clip passes it); gets its exact gradient.
        logit_bias: b, a float or one-element tensor (None: 0); gets its exact gradient.
        labels: optional (N,) int64: every pair (i, j) with ``labels[i] == labels[j]`` is positive.
        reduction: "mean" (Σ/N, open_clip's) | "sum" | "none" (per image: Σ_j, shape (N,)).
        matryoshka_dims, matryoshka_weights, matryoshka_normalize: Matryoshka training: the loss
            is ``Σ_t w_t·loss(x[:, :d_t], …)`` over the strictly increasing prefix dimensions
            ``d_t`` (the last ≤ D; weights default to 1), each prefix L2-normalised when
            ``matryoshka_normalize`` (cosine at every prefix), all prefixes from one sweep over
            the tiles (docs/math.md §9); ``reduction="none"`` gives the per-row weighted sums.
    Returns:
        Scalar or (N,); float32 (float64 for float64 inputs).
    """
    _checks.check_reduction(reduction)
    _checks.check_pairs("siglip_loss", "image_features", image_features, "text_features",
                        text_features)
    n = image_features.shape[0]
    scale = _checks.scale_tensor(logit_scale, image_features)
    bias = _checks.bias_tensor(0.0 if logit_bias is None else logit_bias, image_features)
    classes = None
    if labels is not None:
        classes = _checks.check_int_vector("labels", labels, n, image_features.device)
    mrl = _matryoshka(matryoshka_dims, matryoshka_weights, matryoshka_normalize, image_features)
    rows = sigmoid_rows(image_features, text_features, scale, bias, classes, classes,
                        classes is None, backend, mrl)
    if reduction == "mean":
        return rows.sum() / n
    return _checks.reduce(rows, reduction)


def soft_cross(query: Tensor, keys: Tensor, scale: Tensor, t_query: Tensor, t_keys: Tensor,
               t_scale: Tensor, t_row_lse: Tensor, t_col_lse: Optional[Tensor],
               backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The soft-target op on validated inputs: (row_cross (N,), col_cross (M,) or (0,), and the
    student's row_lse (N,), col_lse (M,) or (0,) from the same sweep)."""
    # a float64 teacher keeps auto off the GPU kernels (32- and 16-bit only), as float64 inputs do
    name = backends.resolve(backend, query.device, torch.promote_types(query.dtype, t_query.dtype),
                            backends.features_of(soft_xent=True))
    compute_col = t_col_lse is not None
    return ops.soft_xent_fwd(query.contiguous(), keys.contiguous(), scale, t_query.contiguous(),
                             t_keys.contiguous(), t_scale, t_row_lse,
                             t_col_lse if compute_col else t_row_lse.new_empty(0), compute_col,
                             name)


def distill_directions(query: Tensor, keys: Tensor, scale: Tensor, t_query: Tensor,
                       t_keys: Tensor, t_scale: Tensor, labels: Optional[Tensor], both: bool,
                       backend: str) -> tuple[Tensor, Tensor]:
    """(contrastive, distill) per direction on validated inputs, shapes ((N,) or (N+M),) each:
    the rows of S (and, with ``both``, its columns): ``lse_S − S_{i,l_i}`` and the soft-target
    cross-entropy ``lse_S − Σ_j softmax(T)_ij·S_ij`` against the teacher's logits T.

    Two sweeps forward: the teacher's log-sum-exp, then the soft-target op, which gives the
    student's log-sum-exp as well; the positives are O(N·D) dot products. The backward is one
    sweep of the soft-target op (student and teacher tiles recomputed once) plus, when the teacher
    requires grad, the log-sum-exp op's for the teacher."""
    t_row, t_col, _, _ = _lse(t_query, t_keys, t_scale, None, None, None, False, both, backend)
    row_x, col_x, row, col = soft_cross(query, keys, scale, t_query, t_keys, t_scale, t_row,
                                        t_col if both else None, backend)
    st = row.dtype
    partners = keys if labels is None else keys.index_select(0, labels)  # (N, D) either way
    pos = scale.to(st) * (query.to(st) * partners.to(st)).sum(dim=1)
    if not both:
        return row - pos, row - row_x
    return torch.cat([row - pos, col - pos]), torch.cat([row - row_x, col - col_x])


def distill_clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: ScaleLike,
                      dist_image_features: Tensor, dist_text_features: Tensor,
                      dist_logit_scale: ScaleLike, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """CLIP loss and distillation from a CLIP teacher (open_clip's ``DistillClipLoss``), fused.

    ``contrastive = ½(CE(S, I) + CE(Sᵀ, I))`` and
    ``distill = ½(mean_i H(softmax(T_i·), S_i·) + mean_j H(softmax(T_·j), S_·j))`` with the
    student's logits ``S = logit_scale·img·txtᵀ``, the teacher's ``T = dist_logit_scale·d_img·
    d_txtᵀ`` and the soft-target cross-entropy ``H(p, s) = −Σ p·log_softmax(s) = lse(s) − Σ p·s``
    — no N×N matrix of either (docs/math.md §10). The teacher's features and scale get gradients
    where they require them, exactly as open_clip's (which does not detach the teacher).

    Args:
        image_features, text_features: (N, D) the student's pairs.
        logit_scale: the student's s. dist_image_features, dist_text_features: (N, D_t) the
            teacher's features of the same pairs (its own D_t and dtype). dist_logit_scale: its t.
    Returns:
        ``(contrastive_loss, distill_loss)``, 0-dim, float32 (float64 for float64 inputs).
    """
    _checks.check_pairs("distill_clip_loss", "image_features", image_features, "text_features",
                        text_features)
    _checks.check_pairs("distill_clip_loss", "dist_image_features", dist_image_features,
                        "dist_text_features", dist_text_features)
    if dist_image_features.shape[0] != image_features.shape[0]:
        raise ValueError(f"the teacher's features must have the student's N = "
                         f"{image_features.shape[0]} rows, got {tuple(dist_image_features.shape)}")
    scale = _checks.scale_tensor(logit_scale, image_features)
    t_scale = _checks.scale_tensor(dist_logit_scale, image_features)
    contrastive, distill = distill_directions(image_features, text_features, scale,
                                              dist_image_features, dist_text_features, t_scale,
                                              None, True, backend)
    return contrastive.mean(), distill.mean()


def sigmoid_rows(image_features: Tensor, text_features: Tensor, scale: Tensor, bias: Tensor,
                 row_classes: Optional[Tensor], col_classes: Optional[Tensor], diagonal: bool,
                 backend: str, mrl=None) -> Tensor:
    """The sigmoid op on validated inputs: per-row sums (N,) of softplus(−z·(S + b)); the blocks
    of the distributed SigLIP losses call it with ``diagonal=False`` (negatives only). With
    ``mrl`` (validated Matryoshka settings) the rows are the weighted sums over the prefixes."""
    if mrl is None:
        name = backends.resolve(backend, image_features.device, image_features.dtype,
                                backends.features_of(sigmoid=True))
        return ops.sigmoid_fwd(image_features.contiguous(), text_features.contiguous(), scale,
                               bias, row_classes, col_classes, diagonal, name)
    dims, weights, normalize = mrl
    name = backends.resolve(backend, image_features.device, image_features.dtype,
                            backends.features_of(sigmoid=True, prefix=True))
    r = _inverse_prefix_norms(image_features, dims) if normalize else None
    c = _inverse_prefix_norms(text_features, dims) if normalize else None
    per_prefix = ops.sigmoid_prefix_fwd(image_features.contiguous(), text_features.contiguous(),
                                        scale, bias, list(dims), r, c, row_classes, col_classes,
                                        diagonal, name)
    return _weighted(per_prefix, weights)
