"""nn.Module front doors (the README's API summary). They hold configuration and call
``functional`` only."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import functional

__all__ = ["ClipLoss", "InfoNCELoss", "NTXentLoss", "SupConLoss", "SigLipLoss", "DistillClipLoss",
           "CoCaLoss"]


class _Matryoshka:
    """The modules' Matryoshka settings (keyword-only constructor arguments ``matryoshka_dims``,
    ``matryoshka_weights``, ``matryoshka_normalize``; see ``functional.clip_loss``), validated
    against D at the first call."""

    def _set_matryoshka(self, dims, weights, normalize) -> None:
        self.matryoshka_dims = None if dims is None else tuple(dims)
        self.matryoshka_weights = None if weights is None else tuple(weights)
        self.matryoshka_normalize = normalize

    def _mrl(self) -> dict:
        return dict(matryoshka_dims=self.matryoshka_dims, matryoshka_weights=self.matryoshka_weights,
                    matryoshka_normalize=self.matryoshka_normalize)


class InfoNCELoss(_Matryoshka, nn.Module):
    """Module form of :func:`contrastive_kernels.info_nce`.

    ``forward(query (N, D), keys (M, D), logit_scale, labels=None (N,) int64)`` → loss.
    """

    def __init__(self, *, reduction: str = "mean", matryoshka_dims=None, matryoshka_weights=None,
                 matryoshka_normalize: bool = True, backend: str = "auto"):
        super().__init__()
        self.reduction = reduction
        self.backend = backend
        self._set_matryoshka(matryoshka_dims, matryoshka_weights, matryoshka_normalize)

    def forward(self, query: Tensor, keys: Tensor, logit_scale, labels: Optional[Tensor] = None):
        return functional.info_nce(query, keys, logit_scale, labels, reduction=self.reduction,
                                   backend=self.backend, **self._mrl())


class ClipLoss(_Matryoshka, nn.Module):
    """Drop-in replacement for open_clip's ``ClipLoss``, computed by the fused op family.

    Same constructor and call as open_clip: ``forward(image_features (N, D), text_features (N, D),
    logit_scale, logit_bias=None, output_dict=False)`` returns the symmetric CLIP loss (a scalar),
    or ``{"contrastive_loss": loss}`` with ``output_dict=True``. Values and gradients (features and
    ``logit_scale``) equal open_clip's up to floating-point rounding, without the N×N logits.

    Distributed (``world_size > 1``, an initialised ``torch.distributed`` default group whose
    rank/size match ``rank``/``world_size``; every rank holds the same N): open_clip's exact
    semantics in all four settings — the features are gathered (``gather_with_grad=True``:
    autograd-aware ``torch.distributed.nn.all_gather``; else plain ``all_gather`` with the local
    slot replaced by the local tensor unless ``local_loss``) and the loss is computed on them with
    the fused ops (``local_loss=True``: InfoNCE of the local rows against all candidates, labels
    offset by ``rank·N``). Per rank, with L the global mean loss and L_r rank r's local loss:

    ==========================  ==================  ==============================  ==============
    (local_loss, gather_w_grad)  value on rank r     grad of rank r's features        logit_scale
    ==========================  ==================  ==============================  ==============
    (False, False)               L                   ∂L/∂x_r                          ∂L/∂s
    (False, True)                L                   W·∂L/∂x_r                        ∂L/∂s
    (True, True)                 L_r                 Σ_r' ∂L_r'/∂x_r = W·∂L/∂x_r      ∂L_r/∂s
    (True, False)                L_r                 ∂L_r/∂x_r through x_r's own      ∂L_r/∂s
                                                     rows only (candidates detached)
    ==========================  ==================  ==============================  ==============

    ``ring=True`` (keyword-only; needs ``local_loss=True, gather_with_grad=True``) computes the
    (True, True) setting gather-free with point-to-point ring passes (O(N·D) memory per rank, see
    ``contrastive_kernels.distributed.ring_clip_loss``): same value and feature gradients per rank;
    the ``logit_scale`` gradient is split differently across ranks but has the same sum, hence the
    same value after DDP's average. ``use_horovod=True`` is not supported.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, backend: str = "auto", ring: bool = False,
                 matryoshka_dims=None, matryoshka_weights=None, matryoshka_normalize: bool = True):
        super().__init__()
        self._set_matryoshka(matryoshka_dims, matryoshka_weights, matryoshka_normalize)
        if use_horovod:
            raise NotImplementedError("ClipLoss(use_horovod=True) is not supported; use "
                                      "torch.distributed")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        if ring and not (local_loss and gather_with_grad):
            raise ValueError("ClipLoss(ring=True) computes open_clip's local_loss=True, "
                             "gather_with_grad=True semantics; pass both as True (got "
                             f"local_loss={local_loss}, gather_with_grad={gather_with_grad})")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend
        self.ring = ring
        self.prev_num_logits = 0
        self.labels: dict = {}

    def _local_labels(self, n: int, device) -> Tensor:
        # open_clip's get_ground_truth: arange(N) offset by rank·N, cached when asked.
        if self.prev_num_logits != n or device not in self.labels:
            labels = torch.arange(n, device=device, dtype=torch.long) + n * self.rank
            if self.cache_labels:
                self.labels[device] = labels
                self.prev_num_logits = n
            return labels
        return self.labels[device]

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        if self.world_size == 1:
            loss = functional.clip_loss(image_features, text_features, logit_scale, logit_bias,
                                        backend=self.backend, **self._mrl())
        else:
            from . import distributed
            distributed.check_rank_world(self.rank, self.world_size)
            if self.ring:
                loss = distributed.ring_clip_loss(image_features, text_features, logit_scale,
                                                  logit_bias, backend=self.backend, **self._mrl())
            else:
                labels = (self._local_labels(image_features.shape[0], image_features.device)
                          if self.local_loss else None)
                loss = distributed.gathered_clip_loss(
                    image_features, text_features, logit_scale, logit_bias,
                    local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                    rank=self.rank, world_size=self.world_size, labels=labels,
                    backend=self.backend, **self._mrl())
        return {"contrastive_loss": loss} if output_dict else loss


class DistillClipLoss(ClipLoss):
    """Drop-in replacement for open_clip's ``DistillClipLoss``: the CLIP loss and the distillation
    from a CLIP teacher's logits, both fused (docs/math.md §10) — no N×N matrix of the student or
    the teacher.

    Same constructor as ``ClipLoss`` (open_clip's arguments; ``ring`` and Matryoshka dims are not
    supported here) and open_clip's call: ``forward(image_features (N, D), text_features (N, D),
    logit_scale, dist_image_features (N, D_t), dist_text_features (N, D_t), dist_logit_scale,
    output_dict=False)`` returns ``(contrastive_loss, distill_loss)`` or
    ``{"contrastive_loss", "distill_loss"}``. Distributed: the teacher's features are gathered like
    the student's, in all four ``(local_loss, gather_with_grad)`` settings, with open_clip's values
    and gradient flow (the teacher gets gradients wherever its features or scale require them, as
    open_clip does not detach it).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, backend: str = "auto"):
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad,
                         cache_labels=cache_labels, rank=rank, world_size=world_size,
                         use_horovod=use_horovod, backend=backend)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                dist_image_features: Tensor, dist_text_features: Tensor, dist_logit_scale,
                output_dict: bool = False):
        if self.world_size == 1:
            contrastive, distill = functional.distill_clip_loss(
                image_features, text_features, logit_scale, dist_image_features,
                dist_text_features, dist_logit_scale, backend=self.backend)
        else:
            from . import distributed
            distributed.check_rank_world(self.rank, self.world_size, what="DistillClipLoss")
            labels = (self._local_labels(image_features.shape[0], image_features.device)
                      if self.local_loss else None)
            contrastive, distill = distributed.gathered_distill_clip_loss(
                image_features, text_features, logit_scale, dist_image_features,
                dist_text_features, dist_logit_scale, local_loss=self.local_loss,
                gather_with_grad=self.gather_with_grad, rank=self.rank,
                world_size=self.world_size, labels=labels, backend=self.backend)
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill


class CoCaLoss(ClipLoss):
    """Drop-in replacement for open_clip's ``CoCaLoss``: ``clip_loss_weight`` × the fused CLIP loss
    (``ClipLoss``, every distributed setting) and ``caption_loss_weight`` × the captioning
    cross-entropy over the vocabulary, computed as open_clip does (``nn.CrossEntropyLoss(
    ignore_index=pad_id)`` on ``logits.permute(0, 2, 1)``: a (B, L, V) tensor the caller holds).

    ``forward(image_features (N, D), text_features (N, D), logits (N, L, V), labels (N, L),
    logit_scale, output_dict=False)`` returns ``(clip_loss, caption_loss)`` or
    ``{"contrastive_loss", "caption_loss"}``; a ``clip_loss_weight`` of 0 gives a 0 clip loss
    without computing it, as open_clip.
    """

    def __init__(self, caption_loss_weight, clip_loss_weight, pad_id: int = 0,
                 local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, backend: str = "auto"):
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad,
                         cache_labels=cache_labels, rank=rank, world_size=world_size,
                         use_horovod=use_horovod, backend=backend)
        self.clip_loss_weight = clip_loss_weight
        self.caption_loss_weight = caption_loss_weight
        self.caption_loss = nn.CrossEntropyLoss(ignore_index=pad_id)

    def forward(self, image_features: Tensor, text_features: Tensor, logits: Tensor,
                labels: Tensor, logit_scale, output_dict: bool = False):
        if self.clip_loss_weight:
            clip_loss = self.clip_loss_weight * super().forward(image_features, text_features,
                                                                logit_scale)
        else:
            clip_loss = torch.tensor(0, device=logits.device)
        caption_loss = self.caption_loss(logits.permute(0, 2, 1), labels) * self.caption_loss_weight
        if output_dict:
            return {"contrastive_loss": clip_loss, "caption_loss": caption_loss}
        return clip_loss, caption_loss


class NTXentLoss(_Matryoshka, nn.Module):
    """Module form of :func:`contrastive_kernels.nt_xent_loss` (SimCLR, 2N views).

    ``forward(view_a (N, D), view_b (N, D), logit_scale)`` → loss. ``logit_scale`` is
    ``1/temperature``, already exponentiated; pass a tensor that requires grad to learn it.
    """

    def __init__(self, *, reduction: str = "mean", matryoshka_dims=None, matryoshka_weights=None,
                 matryoshka_normalize: bool = True, backend: str = "auto"):
        super().__init__()
        self.reduction = reduction
        self.backend = backend
        self._set_matryoshka(matryoshka_dims, matryoshka_weights, matryoshka_normalize)

    def forward(self, view_a: Tensor, view_b: Tensor, logit_scale):
        return functional.nt_xent_loss(view_a, view_b, logit_scale, reduction=self.reduction,
                                       backend=self.backend, **self._mrl())


class SupConLoss(_Matryoshka, nn.Module):
    """Module form of :func:`contrastive_kernels.supcon_loss`.

    ``forward(features (N, D), labels (N,) int64, logit_scale, ref_features=None (M, D),
    ref_labels=None (M,))`` → loss. Multi-view SupCon: stack the views as rows with equal labels.
    """

    def __init__(self, *, reduction: str = "mean", matryoshka_dims=None, matryoshka_weights=None,
                 matryoshka_normalize: bool = True, backend: str = "auto"):
        super().__init__()
        self.reduction = reduction
        self.backend = backend
        self._set_matryoshka(matryoshka_dims, matryoshka_weights, matryoshka_normalize)

    def forward(self, features: Tensor, labels: Tensor, logit_scale,
                ref_features: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None):
        return functional.supcon_loss(features, labels, logit_scale, ref_features=ref_features,
                                      ref_labels=ref_labels, reduction=self.reduction,
                                      backend=self.backend, **self._mrl())


class SigLipLoss(_Matryoshka, nn.Module):
    """Drop-in replacement for open_clip's ``SigLipLoss``, computed by the fused sigmoid op.

    Same constructor and call as open_clip: ``forward(image_features (N, D), text_features (N, D),
    logit_scale, logit_bias, output_dict=False)`` returns the sigmoid loss (sum over all pairs / N)
    or ``{"contrastive_loss": loss}``; values and gradients (features, ``logit_scale``,
    ``logit_bias``) equal open_clip's up to rounding, without the N×N logits.

    Distributed (``world_size > 1``; an initialised default process group whose rank/size match;
    every rank holds the same N): rank r's loss is its own images against its own texts (diagonal
    positives) plus its images against every other rank's texts (negatives only), as open_clip's,
    for every ``dist_impl``: ``"bidir"`` (open_clip's default) and ``"shift"`` run the gather-free
    ring of :mod:`contrastive_kernels.distributed.siglip` (text blocks travel point to point, one
    in flight, O(N·D) memory per rank; their gradients travel home in the backward), ``"gather"``
    all-gathers the texts with autograd (O(W·N·D)), ``"reduce"`` receives them by all-reduce as
    open_clip does. Per rank, under all four, exactly as open_clip:

    ===================  ===================================================================
    value on rank r      L_r = (1/N)·Σ over rank r's image rows of every pair with every text
    image features       ∂L_r/∂I_r (only rank r's loss sees rank r's images)
    text features        Σ_r' ∂L_r'/∂T_r (every rank's loss sees rank r's texts)
    logit_scale, bias    ∂L_r/∂s, ∂L_r/∂b
    ===================  ===================================================================

    With DDP averaging the parameter gradients over W ranks, the towers and ``logit_scale`` end up
    with ∂(Σ_r L_r / W)/∂θ — the gradient of the mean per-rank loss, consistently for every
    parameter (unlike the CLIP loss's default, see ``ClipLoss``).
    Matryoshka dims work in every ``dist_impl`` (the ring carries each text block's inverse prefix
    norms with it). ``cache_labels`` is accepted for compatibility; there are no label matrices to
    cache.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, *, backend: str = "auto", matryoshka_dims=None,
                 matryoshka_weights=None, matryoshka_normalize: bool = True):
        super().__init__()
        self._set_matryoshka(matryoshka_dims, matryoshka_weights, matryoshka_normalize)
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        dist_impl = dist_impl or "bidir"  # open_clip's default
        if dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(f"dist_impl must be 'bidir', 'shift', 'reduce' or 'gather', got "
                             f"{dist_impl!r}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl
        self.backend = backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        if self.world_size == 1:
            loss = functional.siglip_loss(image_features, text_features, logit_scale, logit_bias,
                                          backend=self.backend, **self._mrl())
        else:
            from . import distributed
            distributed.check_rank_world(self.rank, self.world_size, what="SigLipLoss")
            loss = distributed.distributed_siglip_loss(
                image_features, text_features, logit_scale, logit_bias,
                dist_impl=self.dist_impl, backend=self.backend, **self._mrl())
        return {"contrastive_loss": loss} if output_dict else loss
