"""Public functional API of the log-sum-exp losses (api.md): validated front doors to the ops.

Every function checks its inputs (``_checks``: clear ``ValueError``/``TypeError`` naming the
offending shapes, dtypes or values), resolves the backend, then calls the registered op
``ops.lse_fwd`` and builds the loss from the per-row/per-column statistics with a few O(N) ops.
Autograd flows through the op's single registered backward, whatever the backend.

Shapes: ``N`` anchors, ``M`` candidates, ``D`` features. Losses and statistics are float32 (float64
for float64 inputs); gradients come back in the input dtype. Nothing here reads a device tensor's
value, so a training step on the GPU never waits for the host (``_checks``).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import _checks, backends, ops
from ._types import ScaleLike

__all__ = ["info_nce", "clip_loss", "lse_stats"]


def lse_stats(query: Tensor, keys: Tensor, logit_scale: ScaleLike, labels: Optional[Tensor] = None,
              *, compute_col: bool = True, backend: str = "auto"):
    """The op family's statistics of ``S = logit_scale·query·keysᵀ``, differentiable.

    Args:
        query: (N, D). keys: (M, D). labels: (N,) int64 or None (positive of row i is column i).
    Returns:
        ``(row_lse (N,), col_lse (M,) or (0,), pos (N,))``: log Σ_j exp(S_ij), log Σ_i exp(S_ij),
        S_{i, l_i}. Building block for losses beyond the ones shipped here.
    """
    _checks.check_features("query", query, "keys", keys)
    labels = _checks.check_labels(labels, query.shape[0], keys.shape[0], query.device)
    scale = _checks.scale_tensor(logit_scale, query)
    name = backends.resolve(backend, query.device, query.dtype)
    return ops.lse_fwd(query.contiguous(), keys.contiguous(), scale, labels, compute_col, name)


def info_nce(query: Tensor, keys: Tensor, logit_scale: ScaleLike, labels: Optional[Tensor] = None,
             *, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """One-directional InfoNCE of N anchors against M candidates, fused (no N×M matrix).

    ``ℓ_i = −S_{i,l_i} + log Σ_j exp(S_ij)`` with ``S = logit_scale·query·keysᵀ``.

    Args:
        query: (N, D) anchors. keys: (M, D) candidates (batch, queue, gathered negatives; M may
            exceed N by far). logit_scale: s = 1/temperature, float or 0-d tensor (gets a gradient
            when it requires one). labels: (N,) int64 index of each anchor's positive in ``keys``;
            default ``arange(N)`` (needs M ≥ N). reduction: "mean" | "sum" | "none".
        backend: "auto" | "reference" | "chunked" | "cpu" | "triton" | "cuda".
    Returns:
        Scalar, or (N,) for ``reduction="none"``; float32 (float64 for float64 inputs).
    """
    _checks.check_reduction(reduction)
    row, _, pos = lse_stats(query, keys, logit_scale, labels, compute_col=False, backend=backend)
    return _checks.reduce(row - pos, reduction)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: ScaleLike,
              logit_bias: Optional[ScaleLike] = None, *, reduction: str = "mean",
              backend: str = "auto") -> Tensor:
    """Symmetric CLIP loss ½(InfoNCE(img→txt) + InfoNCE(txt→img)) in one fused pass.

    Args:
        image_features: (N, D). text_features: (N, D); pair i is (image i, text i).
        logit_scale: s = 1/temperature (already exponentiated, as open_clip passes it).
        logit_bias: optional constant added to every logit; it cancels in the softmax, so the loss
            is unchanged and its gradient is exactly 0 (as in open_clip's ClipLoss).
        reduction: "mean" | "sum" | "none" (per pair: ½(ℓ_i2t + ℓ_t2i), shape (N,)).
    Returns:
        Scalar or (N,); float32 (float64 for float64 inputs). Equals open_clip's
        ``ClipLoss()(image_features, text_features, logit_scale)`` up to rounding.
    """
    _checks.check_reduction(reduction)
    _checks.check_pairs("clip_loss", "image_features", image_features, "text_features",
                        text_features)
    row, col, pos = lse_stats(image_features, text_features, logit_scale, None,
                              compute_col=True, backend=backend)
    loss = _checks.reduce(0.5 * ((row - pos) + (col - pos)), reduction)
    return _checks.zero_gradient_term(loss, logit_bias)
