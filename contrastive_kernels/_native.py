"""Loader of the compiled extension ``contrastive_kernels._C`` (csrc/).

Importing ``_C`` runs the static registrations of ``torch.ops.ck_native.lse_fwd`` / ``lse_bwd``
(schema in csrc/ops.cpp, CPU kernels in csrc/cpu, CUDA kernels in csrc/cuda when built). This module
never raises: :func:`load` reports failure as ``(False, reason)`` so that the package imports on a
bare torch and ``backends.py`` can say why the ``cpu`` / ``cuda`` backends are unavailable.
"""
from __future__ import annotations

import importlib
import threading

_lock = threading.Lock()
_result: tuple[bool, str] | None = None


def load() -> tuple[bool, str]:
    """Import the native extension once; return ``(True, "")`` or ``(False, reason)``."""
    global _result
    if _result is not None:
        return _result
    with _lock:
        if _result is None:
            try:
                importlib.import_module("contrastive_kernels._C")
                import torch

                torch.ops.ck_native.lse_fwd  # noqa: B018 - the schema must now be registered
                _register_fakes()
                _result = (True, "")
            except ImportError as exc:
                _result = (False, "contrastive_kernels._C not built: "
                                  f"{exc} (build it with `pip install --no-build-isolation -e .`)")
            except Exception as exc:  # a broken build (e.g. ABI mismatch) must not break the import
                _result = (False, "contrastive_kernels._C failed to load: "
                                  f"{type(exc).__name__}: {exc}")
    return _result


def has_cuda_kernels() -> bool:
    """Whether ck_native's CUDA kernels are registered (the extension was built with CUDA)."""
    if not load()[0]:
        return False
    try:
        import torch

        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("ck_native::lse_fwd", "CUDA"))
    except Exception:
        return False


def has_cpu_kernels() -> bool:
    """Whether ck_native's CPU kernels are registered (always true once the extension loads)."""
    if not load()[0]:
        return False
    try:
        import torch

        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("ck_native::lse_fwd", "CPU"))
    except Exception:
        return False


def _register_fakes() -> None:
    """Fake (meta) kernels of the native ops: shapes and dtypes only, so ``torch.compile``,
    ``torch.export`` and ``opcheck`` can trace the ``ck_native`` ops themselves (the
    ``contrastive_kernels::`` ops around them have their own). Statistics and gradients are in
    the statistic dtype (float64 for float64 inputs, else float32), as the C++ kernels return."""
    import torch

    from ._types import stat_dtype

    def fake_lse_fwd(query, keys, scale, labels, row_classes, col_classes, exclude_self,
                     compute_col, row_groups=None, col_groups=None, guide_query=None,
                     guide_keys=None, guide_threshold=None):
        st = stat_dtype(query.dtype)
        n, m = query.shape[0], keys.shape[0]
        return (query.new_empty(n, dtype=st), query.new_empty(m if compute_col else 0, dtype=st),
                query.new_empty(n, dtype=st),
                query.new_empty(n if row_classes is not None else 0, dtype=st))

    def fake_lse_bwd(query, keys, scale, labels, row_classes, col_classes, exclude_self, row_lse,
                     col_lse, grad_row, grad_col, grad_pos, row_groups=None, col_groups=None,
                     guide_query=None, guide_keys=None, guide_threshold=None):
        st = stat_dtype(query.dtype)
        return query.new_empty(query.shape, dtype=st), keys.new_empty(keys.shape, dtype=st)

    def fake_sigmoid_fwd(query, keys, scale, bias, row_classes, col_classes, diagonal):
        return query.new_empty(query.shape[0], dtype=stat_dtype(query.dtype))

    def fake_sigmoid_bwd(query, keys, scale, bias, row_classes, col_classes, diagonal, grad_row):
        st = stat_dtype(query.dtype)
        return (query.new_empty(query.shape, dtype=st), keys.new_empty(keys.shape, dtype=st),
                query.new_empty(query.shape[0], dtype=st))

    def fake_lse_prefix_fwd(query, keys, scale, dims, row_scale, col_scale, labels, row_classes,
                            col_classes, exclude_self, compute_col, row_groups=None,
                            col_groups=None, guide_query=None, guide_keys=None,
                            guide_threshold=None):
        st = stat_dtype(query.dtype)
        n, m, k = query.shape[0], keys.shape[0], len(dims)
        return (query.new_empty(k, n, dtype=st),
                query.new_empty(k, m if compute_col else 0, dtype=st),
                query.new_empty(k, n, dtype=st),
                query.new_empty(n if row_classes is not None else 0, dtype=st))

    def fake_lse_prefix_bwd(query, keys, scale, dims, row_scale, col_scale, labels, row_classes,
                            col_classes, exclude_self, row_lse, col_lse, grad_row, grad_col,
                            grad_pos, row_groups=None, col_groups=None, guide_query=None,
                            guide_keys=None, guide_threshold=None):
        st = stat_dtype(query.dtype)
        k = len(dims)
        return (query.new_empty(query.shape, dtype=st), keys.new_empty(keys.shape, dtype=st),
                query.new_empty(k, query.shape[0], dtype=st),
                query.new_empty(k, keys.shape[0], dtype=st))

    def fake_sigmoid_prefix_fwd(query, keys, scale, bias, dims, row_scale, col_scale, row_classes,
                                col_classes, diagonal):
        return query.new_empty(len(dims), query.shape[0], dtype=stat_dtype(query.dtype))

    def fake_sigmoid_prefix_bwd(query, keys, scale, bias, dims, row_scale, col_scale, row_classes,
                                col_classes, diagonal, grad_row):
        st = stat_dtype(query.dtype)
        k, n, m = len(dims), query.shape[0], keys.shape[0]
        return (query.new_empty(query.shape, dtype=st), keys.new_empty(keys.shape, dtype=st),
                query.new_empty(k, n, dtype=st), query.new_empty(k, m, dtype=st),
                query.new_empty(k, n, dtype=st))

    # the soft-target ops take the public ops' arguments less ``backend``: their fakes serve
    def fake_soft_xent_fwd(*args):
        from .ops.soft_xent import _soft_xent_fwd_fake
        return _soft_xent_fwd_fake(*args, None)

    def fake_soft_xent_bwd(*args):
        from .ops.soft_xent import _soft_xent_bwd_fake
        return _soft_xent_bwd_fake(*args, None)

    for name, fn in (("lse_fwd", fake_lse_fwd), ("lse_bwd", fake_lse_bwd),
                     ("sigmoid_fwd", fake_sigmoid_fwd), ("sigmoid_bwd", fake_sigmoid_bwd),
                     ("lse_prefix_fwd", fake_lse_prefix_fwd),
                     ("lse_prefix_bwd", fake_lse_prefix_bwd),
                     ("sigmoid_prefix_fwd", fake_sigmoid_prefix_fwd),
                     ("sigmoid_prefix_bwd", fake_sigmoid_prefix_bwd),
                     ("soft_xent_fwd", fake_soft_xent_fwd), ("soft_xent_bwd", fake_soft_xent_bwd)):
        if not hasattr(torch.ops.ck_native, name):  # an older build without this op
            continue
        try:
            torch.library.register_fake(f"ck_native::{name}", fn)
        except RuntimeError as exc:  # registered already (a second load in one process)
            if "already" not in str(exc):
                raise
