"""nn.Module front doors (api.md). They hold configuration and call ``functional`` only."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as F

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
        return F.info_nce(query, keys, logit_scale, labels, reduction=self.reduction,
                          backend=self.backend)


class ClipLoss(nn.Module):
    """Drop-in replacement for open_clip's ``ClipLoss``, computed by the fused op family.

    Same constructor and call as open_clip: ``forward(image_features (N, D), text_features (N, D),
    logit_scale, logit_bias=None, output_dict=False)`` returns the symmetric CLIP loss (a scalar),
    or ``{"contrastive_loss": loss}`` with ``output_dict=True``. Values and gradients (features and
    ``logit_scale``) equal open_clip's up to floating-point rounding, without the N×N logits.

    Single process only for now: ``world_size > 1`` raises ``NotImplementedError`` until the
    distributed variant lands; ``use_horovod=True`` is not supported.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, backend: str = "auto"):
        super().__init__()
        if use_horovod:
            raise NotImplementedError("ClipLoss(use_horovod=True) is not supported; use "
                                      "torch.distributed")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        if world_size > 1:
            raise NotImplementedError(
                f"ClipLoss(world_size={world_size}) is not yet supported: distributed training "
                "lands with the torch.distributed work; use world_size=1")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels  # accepted for compatibility: no label tensor is built
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        loss = F.clip_loss(image_features, text_features, logit_scale, logit_bias,
                           backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss
