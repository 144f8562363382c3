"""nn.Module front doors (api.md). They hold configuration and call ``functional`` only."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import functional

__all__ = ["ClipLoss", "InfoNCELoss"]


class InfoNCELoss(nn.Module):
    """Module form of :func:`contrastive_kernels.info_nce`.

    ``forward(query (N, D), keys (M, D), logit_scale, labels=None (N,) int64)`` → loss.
    """

    def __init__(self, *, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.reduction = reduction
        self.backend = backend

    def forward(self, query: Tensor, keys: Tensor, logit_scale, labels: Optional[Tensor] = None):
        return functional.info_nce(query, keys, logit_scale, labels, reduction=self.reduction,
                          backend=self.backend)


class ClipLoss(nn.Module):
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
                 use_horovod: bool = False, *, backend: str = "auto", ring: bool = False):
        super().__init__()
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
                               backend=self.backend)
        else:
            from . import distributed
            distributed.check_rank_world(self.rank, self.world_size)
            if self.ring:
                loss = distributed.ring_clip_loss(image_features, text_features, logit_scale, logit_bias,
                                        backend=self.backend)
            else:
                labels = (self._local_labels(image_features.shape[0], image_features.device)
                          if self.local_loss else None)
                loss = distributed.gathered_clip_loss(
                    image_features, text_features, logit_scale, logit_bias,
                    local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                    rank=self.rank, world_size=self.world_size, labels=labels,
                    backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss
