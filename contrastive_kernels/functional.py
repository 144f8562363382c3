"""Public functional API (api.md): validated front doors to the registered op family.

Every function here checks its inputs (clear ``ValueError``/``TypeError`` naming the offending
shapes, dtypes or values), resolves the backend, then calls ``ops.lse_fwd`` and builds the loss
from the per-row/per-column statistics with a few O(N) ops. Autograd flows through the op's single
registered backward, whatever the backend.

Shapes: ``N`` anchors, ``M`` candidates, ``D`` features. Losses and statistics are float32 (float64
for float64 inputs); gradients come back in the input dtype.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from . import backends, ops

__all__ = ["info_nce", "clip_loss", "gamma_contrastive_loss", "lse_stats"]

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_REDUCTIONS = ("mean", "sum", "none")
ScaleLike = Union[float, int, Tensor]


def _compiling() -> bool:
    # Value checks need a host read; inside torch.compile they would break the graph, so they run
    # eagerly only (shape/dtype/device checks always run).
    return torch.compiler.is_compiling()


def _check_matrix(name: str, t) -> None:
    """One feature matrix: a non-empty 2-D floating tensor (batch, dim). Shared by every module."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float64, float32, float16 or bfloat16, got {t.dtype}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch: shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has feature dimension 0: shape {tuple(t.shape)}")


def _check_features(name_q: str, query, name_k: str, keys) -> None:
    _check_matrix(name_q, query)
    _check_matrix(name_k, keys)
    if query.shape[1] != keys.shape[1]:
        raise ValueError(f"feature dimensions differ: {name_q} {tuple(query.shape)} vs "
                         f"{name_k} {tuple(keys.shape)}")
    if query.dtype != keys.dtype:
        raise TypeError(f"dtypes differ: {name_q} is {query.dtype}, {name_k} is {keys.dtype}")
    if query.device != keys.device:
        raise ValueError(f"devices differ: {name_q} is on {query.device}, {name_k} on {keys.device}")


def _scale_tensor(logit_scale: ScaleLike, like: Tensor) -> Tensor:
    """The scale as a 0-d tensor in the statistic dtype on ``like``'s device (differentiable)."""
    st = backends.stat_dtype(like.dtype)
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (float, int, Tensor)):
        raise TypeError(f"logit_scale must be a float or a tensor, got {type(logit_scale).__name__}")
    if isinstance(logit_scale, Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must hold one value, got shape {tuple(logit_scale.shape)}")
        if not logit_scale.is_floating_point():
            raise TypeError(f"logit_scale must be a floating-point tensor, got {logit_scale.dtype}")
        # A CPU scalar is moved to the features' device (cheap); any other mismatch is an error.
        if logit_scale.device != like.device and logit_scale.device.type != "cpu":
            raise ValueError(f"logit_scale is on {logit_scale.device} but the features are on "
                             f"{like.device}")
        if not _compiling():
            value = float(logit_scale.detach().reshape(()))
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"logit_scale must be finite and > 0, got {value}")
        return logit_scale.reshape(()).to(device=like.device, dtype=st)
    value = float(logit_scale)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"logit_scale must be finite and > 0, got {value}")
    return torch.tensor(value, dtype=st, device=like.device)


def _check_labels(labels, n: int, m: int, device) -> Optional[Tensor]:
    if labels is None:
        if m < n:
            raise ValueError(f"without labels the positive of row i is column i, which needs "
                             f"M >= N; got N={n}, M={m} (pass labels)")
        return None
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor of int64, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the features are on {device}")
    if not _compiling():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= m:
            raise ValueError(f"labels must lie in [0, {m}) (M = {m} candidates), got values in "
                             f"[{lo}, {hi}]")
    return labels.contiguous()


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def lse_stats(query: Tensor, keys: Tensor, logit_scale: ScaleLike, labels: Optional[Tensor] = None,
              *, compute_col: bool = True, backend: str = "auto"):
    """The op family's statistics of ``S = logit_scale·query·keysᵀ``, differentiable.

    Args:
        query: (N, D). keys: (M, D). labels: (N,) int64 or None (positive of row i is column i).
    Returns:
        ``(row_lse (N,), col_lse (M,) or (0,), pos (N,))``: log Σ_j exp(S_ij), log Σ_i exp(S_ij),
        S_{i, l_i}. Building block for losses beyond the ones shipped here.
    """
    _check_features("query", query, "keys", keys)
    labels = _check_labels(labels, query.shape[0], keys.shape[0], query.device)
    scale = _scale_tensor(logit_scale, query)
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
    _check_reduction(reduction)
    row, _, pos = lse_stats(query, keys, logit_scale, labels, compute_col=False, backend=backend)
    return _reduce(row - pos, reduction)


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
    _check_reduction(reduction)
    _check_features("image_features", image_features, "text_features", text_features)
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"clip_loss pairs image i with text i, so batch sizes must match: "
                         f"image_features {tuple(image_features.shape)} vs text_features "
                         f"{tuple(text_features.shape)}")
    row, col, pos = lse_stats(image_features, text_features, logit_scale, None,
                              compute_col=True, backend=backend)
    loss = _reduce(0.5 * ((row - pos) + (col - pos)), reduction)
    if isinstance(logit_bias, Tensor) and logit_bias.requires_grad:
        loss = loss + (logit_bias * 0).sum().to(loss.dtype)  # exact zero gradient, as in open_clip
    return loss


def gamma_contrastive_loss(query: Tensor, keys: Tensor, logit_scale: ScaleLike, log_u: Tensor,
                           labels: Optional[Tensor] = None, *, reduction: str = "mean",
                           backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Decomposable (Gamma-augmented) loss of math.md §3 for fixed auxiliary variables.

    ``ℓ̃_i = −S_{i,l_i} + u_i·Ẑ_i`` with ``Ẑ_i = (1/M)·Σ_j exp(S_ij)``, evaluated in the log domain
    as ``exp(log_u_i + r_i − log M)`` so scales up to 100 do not overflow. ``u`` gets no gradient;
    with ``u_i = 1/Z_i`` the gradient is exactly the full-data InfoNCE gradient (unbiased).

    Args:
        query: (N, D). keys: (M, D). logit_scale: float or 0-d tensor. log_u: (N,) floating,
            detached. labels: (N,) int64 or None (``arange(N)``, needs M ≥ N).
    Returns:
        ``(loss, log_z)``: the reduced loss and the detached batch statistic
        ``log_z_i = log mean_j exp(S_ij)`` (N,) for the E-step.
    """
    _check_reduction(reduction)
    _check_features("query", query, "keys", keys)
    if not isinstance(log_u, Tensor):
        raise TypeError(f"log_u must be a torch.Tensor, got {type(log_u).__name__}")
    if not log_u.is_floating_point():
        raise TypeError(f"log_u must be floating point, got {log_u.dtype}")
    if log_u.shape != (query.shape[0],):
        raise ValueError(f"log_u must have shape ({query.shape[0]},) (one per query row), got "
                         f"{tuple(log_u.shape)}")
    if log_u.device != query.device:
        raise ValueError(f"log_u is on {log_u.device} but the features are on {query.device}")
    row, _, pos = lse_stats(query, keys, logit_scale, labels, compute_col=False, backend=backend)
    log_z = row - math.log(keys.shape[0])
    per_sample = torch.exp(log_u.detach().to(row.dtype) + log_z) - pos
    return _reduce(per_sample, reduction), log_z.detach()
