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
