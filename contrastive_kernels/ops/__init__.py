"""The registered op families (``torch.library.custom_op``): one forward, one backward, one
autograd site each, whatever the backend (docs/internals.md).

``lse.py``      ``contrastive_kernels::lse_fwd`` / ``lse_bwd``: row/column log-sum-exp and positives
``sigmoid.py``  ``contrastive_kernels::sigmoid_fwd`` / ``sigmoid_bwd``: per-row SigLIP sums
``prefix.py``   ``contrastive_kernels::lse_prefix_*`` / ``sigmoid_prefix_*``: both families at every
                Matryoshka prefix dimension in one sweep
``soft_xent.py`` ``contrastive_kernels::soft_xent_fwd`` / ``soft_xent_bwd``: a teacher's softmax
                against a student's logits (distillation)
"""
from __future__ import annotations

from .lse import lse_bwd, lse_fwd
from .prefix import lse_prefix_bwd, lse_prefix_fwd, sigmoid_prefix_bwd, sigmoid_prefix_fwd
from .sigmoid import sigmoid_bwd, sigmoid_fwd
from .soft_xent import soft_xent_bwd, soft_xent_fwd

__all__ = ["lse_fwd", "lse_bwd", "sigmoid_fwd", "sigmoid_bwd", "lse_prefix_fwd",
           "lse_prefix_bwd", "sigmoid_prefix_fwd", "sigmoid_prefix_bwd", "soft_xent_fwd",
           "soft_xent_bwd"]
