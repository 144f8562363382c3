"""The registered op families (``torch.library.custom_op``): one forward, one backward, one
autograd site each, whatever the backend (docs/internals.md).

``lse.py``      ``contrastive_kernels::lse_fwd`` / ``lse_bwd``: row/column log-sum-exp and positives
``sigmoid.py``  ``contrastive_kernels::sigmoid_fwd`` / ``sigmoid_bwd``: per-row SigLIP sums
"""
from __future__ import annotations

from .lse import lse_bwd, lse_fwd
from .sigmoid import sigmoid_bwd, sigmoid_fwd

__all__ = ["lse_fwd", "lse_bwd", "sigmoid_fwd", "sigmoid_bwd"]
