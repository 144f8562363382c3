"""Modality-structure regularisers of P2 (Jiang et al., CVPR 2023), docs/math.md §4 — without N×N matrices.

P2 shows that perfectly aligning image and text features is sub-optimal when each modality carries
information the other lacks, and adds three regularisers to the base loss
``L_Con = ¼(L_V2T + L_T2V + L_V2V + L_T2T)`` (in-modal terms against an augmented view):

* :func:`geometric_consistency_loss` — ``L_GC`` (+ ``L_GCᵃ`` with augmented views), evaluated
  exactly through D×D Gram matrices: O(N·D²) time, O(D²) workspace, no N×N matrix.
* :func:`brownian_bridge_loss` — the augmented image should sit on the Brownian bridge from its
  image to its text at time ``t``: ``L_Br = (1/N) Σ_j ‖vᵃ_j − μ_j‖²``,
  ``μ_j = normalize(t·v_j + (1 − t)·t_j)`` (the squared distance, not P2's printed closed form,
  which has the wrong sign and lacks a square root; see docs/math.md §4).
* :func:`feature_separation_loss` — ``L_Sep = L_Ortho + Lᶦ_Con + Lᶦ_Uni`` on a second,
  modality-specific ("private") projection head; the in-modal InfoNCE and the uniformity term run
  through the fused op family (:func:`~contrastive_kernels.functional.info_nce`,
  :func:`~contrastive_kernels.functional.lse_stats`).
* :class:`ModalityStructureLoss` — ``L_Con`` through the fused ops plus any subset of the three.

Conventions (the README's API summary): features are used as given (the library does not L2-normalise; the formulas
assume unit vectors, as P2's do); inputs may be float64/float32/float16/bfloat16 with matching dtype
and device; losses are float32 (float64 for float64 inputs); bad input raises ``ValueError`` /
``TypeError`` naming the offending shapes or values.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import _checks, functional
from ._types import ScaleLike

__all__ = [
    "geometric_consistency_loss",
    "brownian_bridge_loss",
    "feature_separation_loss",
    "uniformity_loss",
    "modality_contrastive_loss",
    "ModalityStructureLoss",
    "DEFAULT_WEIGHTS",
]

# P2 does not give its weights in the main text; docs/math.md §4: start at 1.0, 0.25 for GC (CyCLIP).
DEFAULT_WEIGHTS = {"separation": 1.0, "bridge": 1.0, "geometric": 0.25}

# Wang & Isola uniformity with t = 2: exp(−2‖u − w‖²) = exp(4·u·w − 4) for unit vectors.
UNIFORMITY_SCALE = 4.0


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

def _check_same(**tensors: Optional[Tensor]) -> tuple[int, int]:
    """All given tensors: 2-D float, non-empty, one shape (N, D), one dtype, one device."""
    first_name, first = None, None
    for name, x in tensors.items():
        _checks.check_matrix(name, x)
        if first is None:
            first_name, first = name, x
            continue
        if x.shape != first.shape:
            raise ValueError(f"shapes differ: {first_name} {tuple(first.shape)} vs {name} "
                             f"{tuple(x.shape)} (row j of every input belongs to pair j)")
        if x.dtype != first.dtype:
            raise TypeError(f"dtypes differ: {first_name} is {first.dtype}, {name} is {x.dtype}")
        if x.device != first.device:
            raise ValueError(f"devices differ: {first_name} is on {first.device}, {name} on "
                             f"{x.device}")
    return tuple(first.shape)


def _acc(x: Tensor) -> Tensor:
    """Upcast to the accumulation dtype: float64 stays float64, everything else float32."""
    return x.double() if x.dtype == torch.float64 else x.float()


# ---------------------------------------------------------------------------------------------
# geometric consistency
# ---------------------------------------------------------------------------------------------

class _GeometricConsistency(torch.autograd.Function):
    """``N·(L_GC [+ L_GCᵃ])`` with a hand-written backward that keeps only D×D matrices.

    Autograd through the plain expression would save every N×D sum/difference for the backward
    (measured at N = 65536, D = 64 with augmented views: ≈ 285 MiB peak extra vs ≈ 97 MiB here,
    64 MiB of which are the gradients themselves); here the forward saves the inputs and the D×D
    Gram matrices, and the backward recomputes ``P = a + b``, ``M = a − b`` one pair at a time:

        x = ⟨PᵀP, MᵀM⟩:      ∂x/∂P = 2·P·MᵀM,              ∂x/∂M = 2·M·PᵀP
        y = tr((PᵀM)²):      ∂y/∂P = 2·M·(PᵀM),            ∂y/∂M = 2·P·(PᵀM)ᵀ
        ∂/∂a = ∂/∂P + ∂/∂M,  ∂/∂b = ∂/∂P − ∂/∂M
    """

    @staticmethod
    def forward(ctx, *feats):
        acc = [_acc(x) for x in feats]
        grams, total = [], None
        pairs = [(0, 1)] + ([(0, 2), (1, 3)] if len(acc) == 4 else [])
        for ia, ib in pairs:
            p, m = acc[ia] + acc[ib], acc[ia] - acc[ib]
            gp, gm = p.T @ p, m.T @ m
            x = (gp * gm).sum()
            if ia == 0 and ib == 1:  # ‖VTᵀ − TVᵀ‖² + ‖VVᵀ − TTᵀ‖² = x
                term, h = x, None
            else:                     # ‖AAᵀ − BBᵀ‖² = ½(x + y)
                h = p.T @ m
                term = 0.5 * (x + (h * h.T).sum())
            grams.append((gp, gm, h))
            total = term if total is None else total + term
        if len(acc) == 4:
            r = (acc[0] * acc[1]).sum(1) - (acc[2] * acc[3]).sum(1)
            total = total + (r * r).sum()
        ctx.save_for_backward(*feats)
        ctx.grams = grams
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        feats = ctx.saved_tensors
        acc = [_acc(x) for x in feats]
        # Accumulate the unscaled gradients in place (addmm_/add_ into the output buffers; live
        # temporaries: P, M and one N×D buffer), scale by grad_out once at the end.
        grads = [torch.zeros_like(a) if ctx.needs_input_grad[i] else None for i, a in enumerate(acc)]
        pairs = [(0, 1)] + ([(0, 2), (1, 3)] if len(acc) == 4 else [])
        for (ia, ib), (gp, gm, h) in zip(pairs, ctx.grams):
            ga, gb = grads[ia], grads[ib]
            if ga is None and gb is None:
                continue
            p, m = acc[ia] + acc[ib], acc[ia] - acc[ib]
            # ∂/∂P: 2·P·G_M for x (first pair); P·G_M + M·H for ½(x + y) (augmentation pairs)
            buf = p @ gm
            if h is not None:
                buf.addmm_(m, h)
            w = 2.0 if h is None else 1.0
            for g in (ga, gb):
                if g is not None:
                    g.add_(buf, alpha=w)
            # ∂/∂M: 2·M·G_P for x; M·G_P + P·Hᵀ for ½(x + y)
            torch.mm(m, gp, out=buf)
            if h is not None:
                buf.addmm_(p, h.T)
            del p, m
            if ga is not None:
                ga.add_(buf, alpha=w)
            if gb is not None:
                gb.add_(buf, alpha=-w)
            del buf
        if len(acc) == 4:
            r = ((acc[0] * acc[1]).sum(1) - (acc[2] * acc[3]).sum(1))[:, None]
            for i, j, sign in ((0, 1, 2.0), (1, 0, 2.0), (2, 3, -2.0), (3, 2, -2.0)):
                if grads[i] is not None:
                    grads[i].addcmul_(r, acc[j], value=sign)
        go = grad_out.to(acc[0].dtype)
        return tuple(None if g is None else g.mul_(go).to(x.dtype) for g, x in zip(grads, feats))


def geometric_consistency_loss(image_features: Tensor, text_features: Tensor,
                               image_aug: Optional[Tensor] = None,
                               text_aug: Optional[Tensor] = None) -> Tensor:
    """Geometric consistency ``L_GC`` (+ ``L_GCᵃ`` when augmented views are given), docs/math.md §4.

    ::

        L_GC  = (1/N) Σ_jk [(v_j·t_k − v_k·t_j)² + (v_j·v_k − t_j·t_k)²]
        L_GCᵃ = (1/N) Σ_jk [(v_j·v_k − vᵃ_j·vᵃ_k)² + (t_j·t_k − tᵃ_j·tᵃ_k)²]
                + (1/N) Σ_j (v_j·t_j − vᵃ_j·tᵃ_j)²

    Evaluated exactly without any N×N matrix. With ``P = V + T`` and ``M = V − T``,
    ``VVᵀ − TTᵀ = ½(PMᵀ + MPᵀ)`` and ``VTᵀ − TVᵀ = ½(MPᵀ − PMᵀ)``; the first is symmetric and the
    second antisymmetric, so their cross term vanishes and the two sums of ``L_GC`` add up to

        N·L_GC = ‖PMᵀ‖²_F = ⟨PᵀP, MᵀM⟩_F        (two D×D Gram matrices)

    — equal to docs/math.md's ``2⟨G_V, G_T⟩ − 2tr(C·C) + ‖G_V‖² + ‖G_T‖² − 2‖C‖²`` but without its
    cancellation when ``V ≈ T`` (every term here is O(‖V − T‖²)). Each ``L_GCᵃ`` pair term is
    ``‖VVᵀ − VᵃVᵃᵀ‖²_F = ½(⟨PᵀP, MᵀM⟩ + tr((PᵀM)²))`` with ``P = V + Vᵃ``, ``M = V − Vᵃ``.
    Cost O(N·D²) time; memory O(D²) saved for the backward plus O(N·D) temporaries one pair at a
    time (no N×N matrix anywhere). Gradients are exact (hand-derived backward through the D×D
    matrices; first order only).

    Args:
        image_features, text_features: (N, D), pair j is (v_j, t_j); L2-normalised in P2 (not
            normalised here).
        image_aug, text_aug: (N, D) augmented views ``vᵃ``, ``tᵃ``; give both or neither.
    Returns:
        Scalar ``L_GC`` (+ ``L_GCᵃ``), float32 (float64 for float64 inputs; 16-bit inputs are
        accumulated in float32). Not divided by N² — P2's normalisation (1/N) is kept, so the value
        grows with the batch like ``N·mean_jk(…)``.
    """
    if (image_aug is None) != (text_aug is None):
        given, missing = ("image_aug", "text_aug") if text_aug is None else ("text_aug", "image_aug")
        raise ValueError(f"geometric_consistency_loss: {given} was given but {missing} is None; "
                         "L_GCᵃ needs both augmented views (or pass neither for L_GC alone)")
    if image_aug is None:
        n, _ = _check_same(image_features=image_features, text_features=text_features)
    else:
        n, _ = _check_same(image_features=image_features, text_features=text_features,
                           image_aug=image_aug, text_aug=text_aug)
    feats = (image_features, text_features) + (() if image_aug is None else (image_aug, text_aug))
    return _GeometricConsistency.apply(*feats) / n


# ---------------------------------------------------------------------------------------------
# Brownian bridge
# ---------------------------------------------------------------------------------------------

def _bridge_time(t, n: int, like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """``t`` as an (N, 1) or 0-d tensor in the accumulation dtype, validated to lie in (0, 1)."""
    st = torch.float64 if like.dtype == torch.float64 else torch.float32
    if isinstance(t, str):
        if t != "uniform":
            raise ValueError(f"t must be a float in (0, 1), an (N,) tensor or 'uniform', got {t!r}")
        # U(0, 1) per row; torch.rand lies in [0, 1): clamp the measure-zero 0 into the open interval.
        u = torch.rand(n, generator=generator, device=like.device, dtype=st)
        return u.clamp_min(torch.finfo(st).tiny)[:, None]
    if generator is not None:
        raise ValueError("generator is only used with t='uniform'")
    # NumPy scalars are numbers.Real too; bool is not a time
    if isinstance(t, bool) or not isinstance(t, (numbers.Real, Tensor)):
        raise TypeError(f"t must be a float in (0, 1), an (N,) tensor or 'uniform', got "
                        f"{type(t).__name__}")
    if isinstance(t, Tensor):
        if not t.is_floating_point():
            raise TypeError(f"t must be a floating-point tensor, got {t.dtype}")
        if t.dim() not in (0, 1) or (t.dim() == 1 and t.shape != (n,)):
            raise ValueError(f"a tensor t must be 0-d or have shape ({n},) (one time per row), got "
                             f"{tuple(t.shape)}")
        # range check only where the values are on the host (a device read would stall the step)
        if _checks.reads_values(t):
            lo, hi = float(t.detach().min()), float(t.detach().max())
            if not (0.0 < lo and hi < 1.0):  # also rejects NaN
                raise ValueError(f"t must lie in the open interval (0, 1), got values in [{lo}, {hi}]")
        # a CPU tensor is queued to the device, never waited for
        tt = t.to(device=like.device, dtype=st, non_blocking=True)
        return tt if t.dim() == 0 else tt[:, None]
    value = float(t)
    if not 0.0 < value < 1.0:
        raise ValueError(f"t must lie in the open interval (0, 1), got {value}")
    return torch.full((), value, dtype=st, device=like.device)


def brownian_bridge_loss(image_features: Tensor, text_features: Tensor, image_aug: Tensor,
                         t: Union[float, Tensor, str] = 0.25, *, detach_bridge: bool = False,
                         generator: Optional[torch.Generator] = None,
                         eps: float = 1e-12) -> Tensor:
    """Brownian-bridge loss ``L_Br = (1/N) Σ_j ‖vᵃ_j − μ_j‖²``, docs/math.md §4.

    ``μ_j = normalize(t·v_j + (1 − t)·t_j)``: the bridge from image ``v_j`` to text ``t_j`` at time
    ``t`` (P2 fixes t = 0.25, so μ lies closer to the text). This is the squared distance that P2's
    printed closed form was meant to express (that form has the wrong sign and no square root).
    O(N·D), no pairwise terms.

    Args:
        image_features, text_features, image_aug: (N, D) — ``v``, ``t`` and the augmented image
            ``vᵃ`` (unit vectors in P2; used as given here).
        t: bridge time — a float in (0, 1), a 0-d or (N,) tensor with values in (0, 1) (one time per
            row; a ``t`` that requires grad gets one), or ``"uniform"`` to draw ``t_j ~ U(0, 1)``
            per row.
        detach_bridge: stop the gradient through ``μ`` (then only ``vᵃ`` is pulled to the bridge;
            by default ``v`` and ``t`` receive gradients too).
        generator: optional ``torch.Generator`` (on the features' device) for ``t="uniform"``.
        eps: the norm of ``t·v + (1 − t)·t`` is clamped to ≥ eps before dividing (as
            ``torch.nn.functional.normalize``), so antipodal ``v = −t`` at ``t = ½`` stays finite.
    Returns:
        Scalar, float32 (float64 for float64 inputs).
    """
    n, _ = _check_same(image_features=image_features, text_features=text_features,
                       image_aug=image_aug)
    if not isinstance(detach_bridge, bool):
        raise TypeError(f"detach_bridge must be a bool, got {type(detach_bridge).__name__}")
    tt = _bridge_time(t, n, image_features, generator)
    v, tx, va = _acc(image_features), _acc(text_features), _acc(image_aug)
    mid = tt * v + (1 - tt) * tx
    mu = mid / mid.norm(dim=1, keepdim=True).clamp_min(eps)
    if detach_bridge:
        mu = mu.detach()
    return (va - mu).pow(2).sum(1).mean()


# ---------------------------------------------------------------------------------------------
# deep feature separation
# ---------------------------------------------------------------------------------------------

def uniformity_loss(features: Tensor, *, form: str = "dot", backend: str = "auto") -> Tensor:
    """Uniformity ``log mean_jk exp(−2‖z_j − z_k‖²)`` (Wang & Isola, t = 2), fused (no N×N matrix).

    ``form="dot"`` (default, docs/math.md §4): for unit vectors ``exp(−2‖u − w‖²) = exp(4·u·w − 4)``,
    so the loss is one log-sum-exp over all N² pairs at logit scale 4:
    ``logsumexp_j(r_j) − 2·log N − 4`` with ``r`` the row log-sum-exp of the fused forward
    ``lse_stats(z, z, 4.0)``. Its value equals the distance form on the unit sphere; its gradient
    differs only radially (along ``z_j``), which a normalisation layer upstream projects out.

    ``form="distance"``: the distance form exactly, for any inputs, by the same single fused pass
    on two extra feature columns: with ``q_j = [z_j, 1, −‖z_j‖²/2]`` and ``k_k = [z_k, −‖z_k‖²/2, 1]``,
    ``4·q_j·k_k = −2‖z_j − z_k‖²``, so the loss is ``logsumexp_j(r_j) − 2·log N`` with
    ``r`` from ``lse_stats(q, k, 4.0)`` (D + 2 columns).

    As in docs/math.md the mean runs over **all** pairs, the diagonal ``j = k`` included (each
    contributes exp(0) = 1; Wang & Isola's reference code uses ``pdist``, i.e. ``j < k`` only).

    Args:
        features: (N, D). form: ``"dot"`` | ``"distance"``. backend: as in
            :func:`~contrastive_kernels.functional.info_nce`.
    Returns:
        Scalar, float32 (float64 for float64 inputs).
    """
    (n, _) = _check_same(features=features)
    if form == "dot":
        row, _, _ = functional.lse_stats(features, features, UNIFORMITY_SCALE, None, compute_col=False,
                                backend=backend)
        return torch.logsumexp(row, dim=0) - 2.0 * math.log(n) - UNIFORMITY_SCALE
    if form != "distance":
        raise ValueError(f"form must be 'dot' or 'distance', got {form!r}")
    z = _acc(features)
    half_sq = 0.5 * z.pow(2).sum(1, keepdim=True)
    one = torch.ones_like(half_sq)
    q = torch.cat([z, one, -half_sq], dim=1)
    k = torch.cat([z, -half_sq, one], dim=1)
    row, _, _ = functional.lse_stats(q, k, UNIFORMITY_SCALE, None, compute_col=False, backend=backend)
    return torch.logsumexp(row, dim=0) - 2.0 * math.log(n)


def feature_separation_loss(shared_image: Tensor, shared_text: Tensor, private_image: Tensor,
                            private_text: Tensor, private_image_aug: Tensor,
                            private_text_aug: Tensor, logit_scale: ScaleLike, *,
                            output_dict: bool = False, backend: str = "auto"):
    """Deep feature separation ``L_Sep = L_Ortho + Lᶦ_Con + Lᶦ_Uni``, docs/math.md §4.

    A second projection head gives a modality-specific ("private") feature ``zᶦ`` beside the shared
    feature ``z`` that gets the cross-modal contrastive loss.

    * ``L_Ortho = (1/N) Σ_j (⟨v_j, vᶦ_j⟩² + ⟨t_j, tᶦ_j⟩²)`` — private ⟂ shared, per pair.
    * ``Lᶦ_Con = info_nce(vᶦ, vᶦᵃ) + info_nce(tᶦ, tᶦᵃ)`` — one-directional in-modal InfoNCE of the
      private features against the augmented view's private features (fused, no N×N matrix), at
      ``logit_scale``. (P2's printed numerator is a typo that is identically 1.)
    * ``Lᶦ_Uni = U(vᶦ) + U(tᶦ)`` with ``U`` = :func:`uniformity_loss` in its default ``"dot"``
      form ``log mean_jk exp(4·zᶦ_j·zᶦ_k − 4)`` (all pairs, diagonal included, logit scale 4,
      fused; equal to ``log mean_jk exp(−2‖zᶦ_j − zᶦ_k‖²)`` for unit vectors).

    The two modalities are **summed** in all three terms, matching ``L_Ortho`` as printed in P2.

    Args:
        shared_image, shared_text: (N, D) shared features ``v``, ``t``.
        private_image, private_text: (N, D) private features ``vᶦ``, ``tᶦ``.
        private_image_aug, private_text_aug: (N, D) private features of the augmented views.
        logit_scale: s = 1/temperature for ``Lᶦ_Con`` (float or 0-d tensor; gets a gradient when it
            requires one).
        output_dict: also return the terms: ``{"orthogonality", "private_contrastive",
            "private_uniformity", "separation_loss"}`` (the last is their sum).
        backend: backend of the fused op family.
    Returns:
        Scalar ``L_Sep`` (float32; float64 for float64 inputs), or the dict.
    """
    n, _ = _check_same(shared_image=shared_image, shared_text=shared_text,
                       private_image=private_image, private_text=private_text,
                       private_image_aug=private_image_aug, private_text_aug=private_text_aug)
    ortho = (((_acc(shared_image) * _acc(private_image)).sum(1)) ** 2
             + ((_acc(shared_text) * _acc(private_text)).sum(1)) ** 2).mean()
    con = (functional.info_nce(private_image, private_image_aug, logit_scale, backend=backend)
           + functional.info_nce(private_text, private_text_aug, logit_scale, backend=backend))
    uni = (uniformity_loss(private_image, backend=backend)
           + uniformity_loss(private_text, backend=backend))
    total = ortho + con + uni
    if output_dict:
        return {"orthogonality": ortho, "private_contrastive": con, "private_uniformity": uni,
                "separation_loss": total}
    return total


# ---------------------------------------------------------------------------------------------
# P2's base loss and the combined module
# ---------------------------------------------------------------------------------------------

def modality_contrastive_loss(image_features: Tensor, text_features: Tensor, image_aug: Tensor,
                              text_aug: Tensor, logit_scale: ScaleLike, *, output_dict: bool = False,
                              backend: str = "auto"):
    """P2's base loss ``L_Con = ¼(L_V2T + L_T2V + L_V2V + L_T2T)``, every term fused.

    ``½(L_V2T + L_T2V)`` is :func:`~contrastive_kernels.functional.clip_loss` (one fused pass);
    the in-modal terms are ``info_nce(v, vᵃ)`` and ``info_nce(t, tᵃ)`` (one direction each), so
    ``L_Con = ½·clip + ¼·(L_V2V + L_T2T)``.

    Args:
        image_features, text_features, image_aug, text_aug: (N, D). logit_scale: float or 0-d tensor.
        output_dict: return ``{"clip", "image_image", "text_text", "contrastive_loss"}`` instead.
    """
    _check_same(image_features=image_features, text_features=text_features, image_aug=image_aug,
                text_aug=text_aug)
    clip = functional.clip_loss(image_features, text_features, logit_scale, backend=backend)
    v2v = functional.info_nce(image_features, image_aug, logit_scale, backend=backend)
    t2t = functional.info_nce(text_features, text_aug, logit_scale, backend=backend)
    total = 0.5 * clip + 0.25 * (v2v + t2t)
    if output_dict:
        return {"clip": clip, "image_image": v2v, "text_text": t2t, "contrastive_loss": total}
    return total


def _weight(name: str, w) -> float:
    if isinstance(w, bool):
        return DEFAULT_WEIGHTS[name] if w else 0.0
    if not isinstance(w, (int, float)):
        raise TypeError(f"{name} weight must be a float >= 0 or a bool (True = default "
                        f"{DEFAULT_WEIGHTS[name]}), got {type(w).__name__}")
    w = float(w)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"{name} weight must be finite and >= 0, got {w}")
    return w


class ModalityStructureLoss(nn.Module):
    """P2's training loss: ``L_Con`` plus any subset of the three modality-structure regularisers.

    ``L = L_Con + w_sep·L_Sep + w_br·L_Br + w_gc·(L_GC + L_GCᵃ)`` where ``L_Con`` is
    :func:`modality_contrastive_loss` (``¼(V2T + T2V + V2V + T2T)``, all fused) on the shared
    features, or ``½(V2T + T2V)`` (plain CLIP) with ``in_modal=False``.

    Weights: a float ≥ 0 (0 = off), or ``True`` for the documented default
    (:data:`DEFAULT_WEIGHTS`: 1.0 for separation and bridge, 0.25 for geometric consistency —
    CyCLIP's choice; P2's main text gives none). All default to off (plain ``L_Con``).

    ``forward(image_features, text_features, logit_scale, image_aug=None, text_aug=None,
    private_image=None, private_text=None, private_image_aug=None, private_text_aug=None,
    output_dict=False)`` — all features (N, D). ``image_aug``/``text_aug`` are needed by the
    in-modal terms, by the bridge (``image_aug``) and make GC include ``L_GCᵃ``; the private
    features are needed when ``separation > 0``. ``logit_scale`` (float or 0-d tensor, e.g.
    ``model.logit_scale.exp()``) serves ``L_Con`` and, unless ``private_logit_scale`` is set, the
    private in-modal InfoNCE of ``L_Sep``.

    With ``output_dict=True`` returns the **weighted** terms ``{"contrastive_loss",
    "separation_loss", "bridge_loss", "geometric_loss"}`` (enabled ones only) whose values sum to
    the total — open_clip's convention (its trainer sums the dict).

    Args:
        separation, bridge, geometric: weights (see above).
        bridge_t: bridge time for :func:`brownian_bridge_loss` (float, (N,) tensor or "uniform").
        detach_bridge: passed to :func:`brownian_bridge_loss`.
        in_modal: include ``L_V2V + L_T2T`` in ``L_Con`` (P2); False gives plain CLIP.
        private_logit_scale: fixed scale for the private InfoNCE (default: the forward's scale).
        generator: for ``bridge_t="uniform"``.
        backend: backend of the fused op family.
    """

    def __init__(self, separation: Union[float, bool] = 0.0, bridge: Union[float, bool] = 0.0,
                 geometric: Union[float, bool] = 0.0, *, bridge_t: Union[float, Tensor, str] = 0.25,
                 detach_bridge: bool = False, in_modal: bool = True,
                 private_logit_scale: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, backend: str = "auto"):
        super().__init__()
        self.separation = _weight("separation", separation)
        self.bridge = _weight("bridge", bridge)
        self.geometric = _weight("geometric", geometric)
        if isinstance(bridge_t, str) and bridge_t != "uniform":
            raise ValueError(f"bridge_t must be a float in (0, 1), a tensor or 'uniform', got "
                             f"{bridge_t!r}")
        if isinstance(bridge_t, (int, float)) and not isinstance(bridge_t, bool) \
                and not 0.0 < float(bridge_t) < 1.0:
            raise ValueError(f"bridge_t must lie in the open interval (0, 1), got {bridge_t}")
        if private_logit_scale is not None and not (
                isinstance(private_logit_scale, (int, float)) and math.isfinite(private_logit_scale)
                and private_logit_scale > 0):
            raise ValueError(f"private_logit_scale must be a finite float > 0 or None, got "
                             f"{private_logit_scale!r}")
        self.bridge_t = bridge_t
        self.detach_bridge = bool(detach_bridge)
        self.in_modal = bool(in_modal)
        self.private_logit_scale = private_logit_scale
        self.generator = generator
        self.backend = backend

    def extra_repr(self) -> str:
        return (f"separation={self.separation}, bridge={self.bridge}, geometric={self.geometric}, "
                f"bridge_t={self.bridge_t!r}, in_modal={self.in_modal}")

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: ScaleLike,
                image_aug: Optional[Tensor] = None, text_aug: Optional[Tensor] = None,
                private_image: Optional[Tensor] = None, private_text: Optional[Tensor] = None,
                private_image_aug: Optional[Tensor] = None,
                private_text_aug: Optional[Tensor] = None, output_dict: bool = False):
        need = []
        if self.in_modal:
            need += [("image_aug", image_aug, "the in-modal term L_V2V"),
                     ("text_aug", text_aug, "the in-modal term L_T2T")]
        if self.bridge > 0:
            need.append(("image_aug", image_aug, "the Brownian bridge"))
        if self.separation > 0:
            need += [(name, x, "feature separation") for name, x in (
                ("private_image", private_image), ("private_text", private_text),
                ("private_image_aug", private_image_aug), ("private_text_aug", private_text_aug))]
        for name, x, why in need:
            if x is None:
                hint = (" (or in_modal=False for plain CLIP)" if "in-modal" in why else "")
                raise ValueError(f"ModalityStructureLoss: {name} is required by {why}{hint}")
        if self.geometric > 0 and (image_aug is None) != (text_aug is None):
            raise ValueError("ModalityStructureLoss: geometric consistency needs both image_aug and "
                             "text_aug for L_GCᵃ, or neither")

        terms = {}
        if self.in_modal:
            terms["contrastive_loss"] = modality_contrastive_loss(
                image_features, text_features, image_aug, text_aug, logit_scale,
                backend=self.backend)
        else:
            terms["contrastive_loss"] = functional.clip_loss(image_features, text_features, logit_scale,
                                                    backend=self.backend)
        if self.separation > 0:
            scale = logit_scale if self.private_logit_scale is None else self.private_logit_scale
            terms["separation_loss"] = self.separation * feature_separation_loss(
                image_features, text_features, private_image, private_text, private_image_aug,
                private_text_aug, scale, backend=self.backend)
        if self.bridge > 0:
            terms["bridge_loss"] = self.bridge * brownian_bridge_loss(
                image_features, text_features, image_aug, self.bridge_t,
                detach_bridge=self.detach_bridge, generator=self.generator)
        if self.geometric > 0:
            terms["geometric_loss"] = self.geometric * geometric_consistency_loss(
                image_features, text_features, image_aug, text_aug)
        if output_dict:
            return terms
        return sum(terms.values())
