"""``triton`` backend: fused Triton kernels of the op families (docs/internals.md).

================  ================================================================================
``tuning.py``     host choices: tile sizes, autotune configs, shared-memory model, column splits,
                  fp32 input precision, the ``CK_TRITON_*`` knobs
``tiles.py``      ``@triton.jit`` logit-tile loop shared by forward and backward
``forward.py``    row/column log-sum-exp + positives (+ the partial merge, the CAS column merge)
``backward.py``   feature gradients of both families, three modes (fused, two_pass, gemm)
``sigmoid.py``    the sigmoid (SigLIP) family: per-row sums (its backward is ``backward.py``'s)
``prefix.py``     the prefix (Matryoshka) families: every prefix's statistics from one sweep
``soft_xent.py``  the soft-target cross-entropy family: student and teacher tiles side by side
================  ================================================================================

Importing this package never imports triton: the kernels are loaded on first use, so
``import contrastive_kernels`` works on a bare CPU torch. On a CUDA machine the kernels run on CUDA
tensors. Without CUDA they run in triton's interpreter on CPU tensors only when the caller has set
``TRITON_INTERPRET=1`` before triton is first imported (the test suite and the GPU kit's dry run do;
the library never sets any environment variable). Under the interpreter, bfloat16 is upcast to
float32 (the interpreter computes it wrongly) and tiles are small: it is for testing, not speed.
"""

from __future__ import annotations

import os

__all__ = ["available", "lse_fwd", "lse_bwd", "sigmoid_fwd", "sigmoid_bwd", "lse_prefix_fwd",
           "lse_prefix_bwd", "sigmoid_prefix_fwd", "sigmoid_prefix_bwd", "soft_xent_fwd",
           "soft_xent_bwd"]


def available() -> tuple[bool, str]:
    """(usable, reason). True on CUDA when triton imports; on CPU only when TRITON_INTERPRET=1."""
    import importlib.util

    import torch

    try:
        installed = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a module entry of None (deliberately blocked) or broken
        installed = False
    if not installed:
        return False, "triton is not installed (pip install triton; Linux only)"
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not torch.cuda.is_available() and not interpret:
        return False, ("no CUDA device, and TRITON_INTERPRET is not 1 (the triton interpreter runs "
                       "CPU tensors, for testing)")
    try:
        import triton
    except Exception as e:
        return False, f"triton is not importable ({type(e).__name__}: {e})"
    if interpret:
        return True, (f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1): CPU tensors only; "
                      "slow, for testing")
    return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"


def _load(stage: str):
    import importlib

    try:
        return importlib.import_module(f".{stage}", __name__)
    except ImportError as e:
        raise RuntimeError(f"triton backend unavailable: {e}") from e


def lse_fwd(query, keys, scale, labels, row_classes, col_classes, exclude_self, compute_col,
            row_groups=None, col_groups=None, guide_query=None, guide_keys=None,
            guide_threshold=None):
    """Backend ``lse_fwd`` callable; see ``forward.lse_fwd``. The trailing masks (same-group
    exclusion, guided false negatives) follow the op contract (csrc/ops.cpp)."""
    return _load("forward").lse_fwd(query, keys, scale, labels, row_classes, col_classes,
                                    exclude_self, compute_col, row_groups=row_groups,
                                    col_groups=col_groups, guide_query=guide_query,
                                    guide_keys=guide_keys, guide_threshold=guide_threshold)


def lse_bwd(query, keys, scale, labels, row_classes, col_classes, exclude_self, row_lse, col_lse,
            grad_row, grad_col, grad_pos, row_groups=None, col_groups=None, guide_query=None,
            guide_keys=None, guide_threshold=None):
    """Backend ``lse_bwd`` callable; see ``backward.lse_bwd``."""
    return _load("backward").lse_bwd(query, keys, scale, labels, row_classes, col_classes,
                                     exclude_self, row_lse, col_lse, grad_row, grad_col, grad_pos,
                                     row_groups=row_groups, col_groups=col_groups,
                                     guide_query=guide_query, guide_keys=guide_keys,
                                     guide_threshold=guide_threshold)


def sigmoid_fwd(query, keys, scale, bias, row_classes, col_classes, diagonal):
    """Backend ``sigmoid_fwd`` callable; see ``sigmoid.sigmoid_fwd``."""
    return _load("sigmoid").sigmoid_fwd(query, keys, scale, bias, row_classes, col_classes, diagonal)


def sigmoid_bwd(query, keys, scale, bias, row_classes, col_classes, diagonal, grad_row):
    """Backend ``sigmoid_bwd`` callable; see ``sigmoid.sigmoid_bwd``."""
    return _load("sigmoid").sigmoid_bwd(query, keys, scale, bias, row_classes, col_classes,
                                        diagonal, grad_row)


def lse_prefix_fwd(query, keys, scale, dims, row_scale, col_scale, labels, row_classes,
                   col_classes, exclude_self, compute_col, **masks):
    """Backend ``lse_prefix_fwd`` callable; see ``prefix.lse_prefix_fwd``."""
    return _load("prefix").lse_prefix_fwd(query, keys, scale, dims, row_scale, col_scale, labels,
                                          row_classes, col_classes, exclude_self, compute_col,
                                          **masks)


def lse_prefix_bwd(query, keys, scale, dims, row_scale, col_scale, labels, row_classes,
                   col_classes, exclude_self, row_lse, col_lse, grad_row, grad_col, grad_pos,
                   **masks):
    """Backend ``lse_prefix_bwd`` callable; see ``prefix.lse_prefix_bwd``."""
    return _load("prefix").lse_prefix_bwd(query, keys, scale, dims, row_scale, col_scale, labels,
                                          row_classes, col_classes, exclude_self, row_lse,
                                          col_lse, grad_row, grad_col, grad_pos, **masks)


def sigmoid_prefix_fwd(query, keys, scale, bias, dims, row_scale, col_scale, row_classes,
                       col_classes, diagonal):
    """Backend ``sigmoid_prefix_fwd`` callable; see ``prefix.sigmoid_prefix_fwd``."""
    return _load("prefix").sigmoid_prefix_fwd(query, keys, scale, bias, dims, row_scale,
                                              col_scale, row_classes, col_classes, diagonal)


def sigmoid_prefix_bwd(query, keys, scale, bias, dims, row_scale, col_scale, row_classes,
                       col_classes, diagonal, grad_row):
    """Backend ``sigmoid_prefix_bwd`` callable; see ``prefix.sigmoid_prefix_bwd``."""
    return _load("prefix").sigmoid_prefix_bwd(query, keys, scale, bias, dims, row_scale,
                                              col_scale, row_classes, col_classes, diagonal,
                                              grad_row)


def soft_xent_fwd(query, keys, scale, t_query, t_keys, t_scale, t_row_lse, t_col_lse, compute_col):
    """Backend ``soft_xent_fwd`` callable; see ``soft_xent.soft_xent_fwd``."""
    return _load("soft_xent").soft_xent_fwd(query, keys, scale, t_query, t_keys, t_scale,
                                            t_row_lse, t_col_lse, compute_col)


def soft_xent_bwd(query, keys, scale, t_query, t_keys, t_scale, t_row_lse, t_col_lse, row_lse,
                  col_lse, grad_row, grad_col, grad_row_lse, grad_col_lse, teacher_grad):
    """Backend ``soft_xent_bwd`` callable; see ``soft_xent.soft_xent_bwd``."""
    return _load("soft_xent").soft_xent_bwd(query, keys, scale, t_query, t_keys, t_scale,
                                            t_row_lse, t_col_lse, row_lse, col_lse, grad_row,
                                            grad_col, grad_row_lse, grad_col_lse, teacher_grad)
