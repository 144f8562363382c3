"""Backends of the op families: who computes the registered ops for which tensors.

A backend is a module with the op callables (exactly the registered ops' arguments minus
``backend``; docs/internals.md)::

    lse_fwd(query, keys, scale, labels, row_classes, col_classes, exclude_self, compute_col)
        -> (row_lse, col_lse, pos, pos_count)
    lse_bwd(query, keys, scale, labels, row_classes, col_classes, exclude_self, row_lse, col_lse,
            grad_row, grad_col, grad_pos) -> (grad_query, grad_keys)
    sigmoid_fwd(query, keys, scale, bias, row_classes, col_classes, diagonal) -> row_loss
    sigmoid_bwd(query, keys, scale, bias, row_classes, col_classes, diagonal, grad_row)
        -> (grad_query, grad_keys, grad_bias_row)

=============  =========================  ==================================================
name           module                     what
=============  =========================  ==================================================
``reference``  ``backends/reference.py``  dense formulas, for checking (O(N·M) memory)
``chunked``    ``backends/chunked.py``    portable PyTorch, blocks of rows, any device
``cpu``        ``backends/native.py``     the compiled extension's CPU kernels (csrc/cpu)
``cuda``       ``backends/native.py``     the compiled extension's CUDA kernels (csrc/cuda)
``triton``     ``backends/triton/``       Triton kernels (CUDA; CPU tensors under the interpreter)
=============  =========================  ==================================================

This package says which backends are usable and why not (for ``info`` and for clear errors) and
implements the ``auto`` rule. Modules are imported on first use, so ``import contrastive_kernels``
works on a bare CPU torch (no triton, no extension).
"""
from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import torch


BACKENDS = ("reference", "chunked", "cpu", "triton", "cuda")
BACKEND_CHOICES = ("auto",) + BACKENDS

# What a call may need beyond the plain log-sum-exp op, and which backends lack it. ``auto`` never
# picks a backend for a call it cannot serve; asking for one explicitly raises NotImplementedError.
FEATURES = ("exclude_self", "classes", "sigmoid", "groups", "guide", "prefix", "soft_xent")
MISSING = {"cuda": frozenset(FEATURES),  # the CUDA C++ kernels: plain log-sum-exp only (so far)
           "cpu": frozenset(),
           "triton": frozenset()}

_MODULES = {
    "reference": ".reference",
    "chunked": ".chunked",
    "cpu": ".native",
    "cuda": ".native",
    "triton": ".triton",
}


def module(name: str) -> ModuleType:
    """The module implementing a concrete backend (imported on first use)."""
    return importlib.import_module(_MODULES[name], __name__)


def implementation(name: str, family: str = "lse"):
    """The ``(fwd, bwd)`` callables of ``family`` for a concrete (resolved) backend name."""
    mod = module(name)
    return getattr(mod, f"{family}_fwd"), getattr(mod, f"{family}_bwd")


def availability(name: str) -> tuple[bool, str]:
    """(usable, reason-if-not) for a backend on this machine, independent of any tensor."""
    if name in ("reference", "chunked"):
        return True, ""
    if name in ("cpu", "cuda"):
        try:
            from .. import _native
        except Exception as exc:  # a broken install is reported, never raised
            return False, f"contrastive_kernels._native failed to import: {exc}"
        ok, why = _native.load()
        if name == "cpu" or not ok:
            return ok, why
        if not _native.has_cuda_kernels():
            return False, ("the native extension was built without CUDA kernels (torch "
                           f"{torch.__version__} is {'a CUDA' if torch.version.cuda else 'a CPU-only'} "
                           "build; rebuild with a CUDA torch and a matching nvcc, CK_BUILD_CUDA=1)")
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible"
        return True, ""
    if name == "triton":
        try:
            from .triton import available
        except Exception as exc:  # pragma: no cover - import errors are reported, not raised
            return False, f"the triton backend failed to import: {exc}"
        return available()
    raise ValueError(f"unknown backend {name!r}; choose from {BACKEND_CHOICES}")


def cpu_isa() -> str:
    """The code path the native CPU backend takes right now, or why there is none.

    ``"avx512_bf16"``: AVX-512 tile passes, and bfloat16 inputs of the log-sum-exp and sigmoid
    families multiplied on the CPU's bf16 dot-product units (AVX512-BF16) with float32
    accumulation; ``"avx512"``, ``"avx2"``, ``"scalar"``: the SIMD level of the float32 tile
    passes, bfloat16 and float16 inputs converted to float32 once. float16 is always converted
    (no fp16 dot-product path). ``CK_CPU_ISA`` lowers it (read at every call);
    ``"n/a (...)"`` when the native extension is not usable."""
    try:
        from .. import _native
        ok, why = _native.load()
        return torch.ops.ck_native.cpu_isa() if ok else f"n/a (no native extension: {why})"
    except Exception as exc:  # noqa: BLE001 - a fact to report, never a failure
        return f"n/a ({type(exc).__name__}: {exc})"


def device_ok(name: str, device: torch.device) -> tuple[bool, str]:
    """Whether backend ``name`` runs on tensors of ``device`` (and why not)."""
    if name == "cpu" and device.type != "cpu":
        return False, f"backend 'cpu' needs CPU tensors, got tensors on {device}"
    if name == "cuda" and device.type != "cuda":
        return False, f"backend 'cuda' needs CUDA tensors, got tensors on {device}"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False, (f"backend 'triton' needs CUDA tensors (got {device}); CPU tensors only run "
                       "under TRITON_INTERPRET=1")
    return True, ""


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo at import time.

    The official decorator imports dynamo (~2 s, most of ``import contrastive_kernels``) only to set
    one flag on the function; when dynamo is not loaded yet we set that flag ourselves (dynamo reads
    it when it traces a call). tests/test_compile.py's fullgraph runs fail if it ever stops working.
    """
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


# Resolution is pure host-side bookkeeping (imports, env vars): under torch.compile it runs once at
# trace time and its answer is a constant of the graph, so fullgraph=True sees no graph break.
@_assume_constant_result
def resolve(name: str, device: torch.device, dtype: torch.dtype, features: str = "") -> str:
    """The concrete backend for ``name`` (which may be ``"auto"``) on tensors of this device/dtype,
    for a call needing ``features`` (comma-separated names of ``FEATURES``; "" for the plain op).

    ``auto`` rule: CPU → ``cpu`` when the native extension is built, else ``chunked``. CUDA →
    ``triton`` when usable, else ``cuda`` when built (and the call needs nothing it lacks), else
    ``chunked``; float64 on CUDA → ``chunked`` (the GPU kernels are for 32- and 16-bit inputs). An
    explicit name that cannot run raises ``RuntimeError`` saying what is missing (``NotImplementedError``
    for a feature the backend does not have yet); there is no silent fallback.
    """
    if name not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {name!r}")
    needed = frozenset(f for f in features.split(",") if f)
    if name == "auto":
        if device.type == "cpu":
            candidates = ("cpu", "chunked")
        elif device.type == "cuda" and dtype != torch.float64:
            candidates = ("triton", "cuda", "chunked")
        else:
            candidates = ("chunked",)
        for cand in candidates:
            if needed & MISSING.get(cand, frozenset()):
                continue
            if availability(cand)[0] and device_ok(cand, device)[0]:
                return cand
        return "chunked"
    ok, why = availability(name)
    if ok:
        ok, why = device_ok(name, device)
    if not ok:
        raise RuntimeError(f"backend {name!r} is not usable: {why}")
    lacking = sorted(needed & MISSING.get(name, frozenset()))
    if lacking:
        raise NotImplementedError(
            f"backend {name!r} does not implement {', '.join(lacking)} yet; use backend='triton', "
            "'chunked' or 'auto' (which never picks it for this call)")
    if dtype == torch.float64 and name in ("triton", "cuda"):
        raise TypeError(f"backend {name!r} supports float32, float16 and bfloat16 inputs, not float64; "
                        "use backend='cpu', 'chunked' or 'reference' for float64")
    return name


def features_of(*, exclude_self: bool = False, classes: bool = False, sigmoid: bool = False,
                groups: bool = False, guide: bool = False, prefix: bool = False,
                soft_xent: bool = False) -> str:
    """The ``features`` string of a call (a constant under torch.compile)."""
    return ",".join(f for f, on in zip(FEATURES, (exclude_self, classes, sigmoid, groups, guide,
                                                  prefix, soft_xent)) if on)
