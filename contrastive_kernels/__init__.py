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
from ._checks import set_device_value_checks
from .backends import BACKEND_CHOICES, availability, cpu_isa
from .functional import (clip_loss, distill_clip_loss, info_nce, lse_stats, nt_xent_loss, siglip_loss,
                         supcon_loss)
from .gamma import GammaContrastiveLoss, gamma_contrastive_loss
from .grad_cache import GradCache
from .modality import (
    DEFAULT_WEIGHTS,
    ModalityStructureLoss,
    brownian_bridge_loss,
    feature_separation_loss,
    geometric_consistency_loss,
    modality_contrastive_loss,
    uniformity_loss,
)
from .modules import (ClipLoss, CoCaLoss, DistillClipLoss, InfoNCELoss, NTXentLoss, SigLipLoss,
                      SupConLoss)
from . import distributed
from .distributed import DistributedGammaContrastiveLoss, RingClipLoss, ring_lse_stats

__all__ = [
    "__version__",
    "BACKEND_CHOICES",
    "availability",
    "cpu_isa",
    "set_device_value_checks",
    "clip_loss",
    "gamma_contrastive_loss",
    "info_nce",
    "lse_stats",
    "nt_xent_loss",
    "supcon_loss",
    "siglip_loss",
    "distill_clip_loss",
    "ClipLoss",
    "DistillClipLoss",
    "CoCaLoss",
    "InfoNCELoss",
    "NTXentLoss",
    "SupConLoss",
    "SigLipLoss",
    "GradCache",
    "GammaContrastiveLoss",
    "geometric_consistency_loss",
    "brownian_bridge_loss",
    "feature_separation_loss",
    "uniformity_loss",
    "modality_contrastive_loss",
    "ModalityStructureLoss",
    "DEFAULT_WEIGHTS",
    "distributed",
    "RingClipLoss",
    "ring_lse_stats",
    "DistributedGammaContrastiveLoss",
    "reference",
]
