"""contrastive_kernels: fused contrastive losses that never materialise the N×M logit matrix.

    import contrastive_kernels as ck
    loss = ck.clip_loss(image_features, text_features, logit_scale)   # (N, D), (N, D), float/0-d
    loss_fn = ck.ClipLoss()                                            # drop-in for open_clip's

Importing works on a bare CPU torch: the native extension and triton are loaded lazily, and
``python -m contrastive_kernels info`` says which backends are usable and why not.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import reference
from .backends import BACKEND_CHOICES, availability
from .functional import clip_loss, gamma_contrastive_loss, info_nce, lse_stats
from .modules import ClipLoss, InfoNCELoss

__all__ = [
    "__version__",
    "BACKEND_CHOICES",
    "availability",
    "clip_loss",
    "gamma_contrastive_loss",
    "info_nce",
    "lse_stats",
    "ClipLoss",
    "InfoNCELoss",
    "reference",
]
