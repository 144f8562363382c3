"""Triton backend of the log-sum-exp op family (docs/internals.md).

Importing this package never imports triton: the kernels live in ``lse.py`` and are loaded on
first use, so ``import contrastive_kernels`` works on a bare CPU torch. On a machine without CUDA
the kernel module sets ``TRITON_INTERPRET=1`` (if unset) before importing triton, so the kernels run
in triton's interpreter on CPU tensors (float32/float16; bfloat16 is upcast to float32 there, since
the interpreter computes it wrongly).
"""

from __future__ import annotations

import os

__all__ = ["available", "lse_fwd_triton", "lse_bwd_triton"]


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
        return False, "no CUDA device, and TRITON_INTERPRET is not 1 (the triton interpreter runs CPU tensors)"
    try:
        import triton
    except Exception as e:
        return False, f"triton is not importable ({type(e).__name__}: {e})"
    if interpret:
        return True, (f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1): CPU tensors only; "
                      "slow, for testing")
    return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"


def _impl():
    try:
        from . import lse
    except ImportError as e:
        raise RuntimeError(f"triton backend unavailable: {e}") from e
    return lse


def lse_fwd_triton(query, keys, scale, labels, compute_col):
    """Backend ``fwd`` callable; see ``lse.lse_fwd_triton``."""
    return _impl().lse_fwd_triton(query, keys, scale, labels, compute_col)


def lse_bwd_triton(query, keys, scale, labels, row_lse, col_lse, grad_row, grad_col, grad_pos):
    """Backend ``bwd`` callable; see ``lse.lse_bwd_triton``."""
    return _impl().lse_bwd_triton(query, keys, scale, labels, row_lse, col_lse,
                                  grad_row, grad_col, grad_pos)
