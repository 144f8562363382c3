"""Backends of the op family: who computes ``lse_fwd`` / ``lse_bwd`` for which tensors.

Every backend is a pair of plain functions with the op's arguments (docs/internals.md):

    fwd(query, keys, scale, labels, compute_col) -> (row_lse, col_lse, pos)
    bwd(query, keys, scale, labels, row_lse, col_lse, grad_row, grad_col, grad_pos)
        -> (grad_query, grad_keys)

This module holds the two pure-PyTorch backends (``reference`` and ``chunked``), knows how to reach
the compiled ones (``cpu``, ``cuda``: ``torch.ops.ck_native``; ``triton``: triton_kernels/), says which
are usable and why not (for ``info`` and for clear errors), and implements the ``auto`` rule. Heavy
imports (triton, the native extension) happen lazily so ``import contrastive_kernels`` works on a bare
CPU torch.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import Tensor

BACKENDS = ("reference", "chunked", "cpu", "triton", "cuda")
BACKEND_CHOICES = ("auto",) + BACKENDS

# Elements of one chunk of S that the chunked backend materialises (float32: 64 MiB). Large enough
# that each block matmul runs near the BLAS rate, small enough to be O((N + M)·chunk) not O(N·M).
CHUNK_ELEMENTS = int(os.environ.get("CK_CHUNK_ELEMENTS", 1 << 24))


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of statistics and of the op's gradients: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# reference: dense, for checking
# ---------------------------------------------------------------------------------------------

def _positive_columns(n: int, labels: Optional[Tensor], device) -> Tensor:
    return torch.arange(n, device=device) if labels is None else labels


def _reference_fwd(query, keys, scale, labels, compute_col):
    st = stat_dtype(query.dtype)
    s = scale.to(st) * (query.to(st) @ keys.to(st).T)
    cols = _positive_columns(query.shape[0], labels, query.device)
    pos = s.gather(1, cols[:, None]).squeeze(1)
    col = torch.logsumexp(s, dim=0) if compute_col else s.new_empty(0)
    return torch.logsumexp(s, dim=1), col, pos


def _logit_grad_(s: Tensor, row_lse, col_lse, grad_row, grad_col, grad_pos, cols, row_offset: int):
    """G = ∂L/∂S for one block of rows [row_offset, row_offset + s.shape[0]).

    Consumes ``s`` (it is overwritten) so that at most two blocks of S-sized memory are alive.
    """
    rows = slice(row_offset, row_offset + s.shape[0])
    g = None
    if grad_row is not None:
        g = torch.sub(s, row_lse[rows, None]).exp_().mul_(grad_row[rows, None])
    if grad_col is not None:
        col_term = s.sub_(col_lse[None, :]).exp_().mul_(grad_col[None, :])
        g = col_term if g is None else g.add_(col_term)
    if g is None:
        g = s.zero_()
    if grad_pos is not None:
        local = torch.arange(s.shape[0], device=s.device)
        g.index_put_((local, cols[rows]), grad_pos[rows], accumulate=True)
    return g


def _reference_bwd(query, keys, scale, labels, row_lse, col_lse, grad_row, grad_col, grad_pos):
    st = stat_dtype(query.dtype)
    sc = scale.to(st)
    q, k = query.to(st), keys.to(st)
    s = sc * (q @ k.T)
    cols = _positive_columns(query.shape[0], labels, query.device)
    g = _logit_grad_(s, row_lse, col_lse, grad_row, grad_col, grad_pos, cols, 0)
    return sc * (g @ k), sc * (g.T @ q)


# ---------------------------------------------------------------------------------------------
# chunked: portable PyTorch on any device, blocks of rows, recompute in backward
# ---------------------------------------------------------------------------------------------

def _row_block(n: int, m: int) -> int:
    return max(1, min(n, CHUNK_ELEMENTS // max(m, 1)))


def _chunked_fwd(query, keys, scale, labels, compute_col):
    st = stat_dtype(query.dtype)
    n, m = query.shape[0], keys.shape[0]
    sc = scale.to(st)
    k = keys.to(st)  # one O(M·D) copy, so 16-bit inputs multiply with float32 accumulation
    row = torch.empty(n, dtype=st, device=query.device)
    col = torch.full((m,), float("-inf"), dtype=st, device=query.device) if compute_col else None
    block = _row_block(n, m)
    for start in range(0, n, block):
        s = sc * (query[start:start + block].to(st) @ k.T)
        row[start:start + block] = torch.logsumexp(s, dim=1)
        if col is not None:
            # Running column LSE: logaddexp keeps it in the log domain (no overflow at scale 100).
            col = torch.logaddexp(col, torch.logsumexp(s, dim=0))
    cols = _positive_columns(n, labels, query.device)
    pos = sc * (query.to(st) * k[cols]).sum(dim=1)
    return row, (col if col is not None else row.new_empty(0)), pos


def _chunked_bwd(query, keys, scale, labels, row_lse, col_lse, grad_row, grad_col, grad_pos):
    st = stat_dtype(query.dtype)
    n, m = query.shape[0], keys.shape[0]
    sc = scale.to(st)
    k = keys.to(st)
    cols = _positive_columns(n, labels, query.device)
    grad_q = torch.empty(n, query.shape[1], dtype=st, device=query.device)
    grad_k = torch.zeros(m, keys.shape[1], dtype=st, device=query.device)
    block = _row_block(n, m)
    for start in range(0, n, block):
        q = query[start:start + block].to(st)
        s = sc * (q @ k.T)
        g = _logit_grad_(s, row_lse, col_lse, grad_row, grad_col, grad_pos, cols, start)
        grad_q[start:start + block] = sc * (g @ k)
        grad_k.addmm_(g.T, q)
    return grad_q, grad_k.mul_(sc)


# ---------------------------------------------------------------------------------------------
# compiled backends, reached lazily
# ---------------------------------------------------------------------------------------------

def _native_fwd(query, keys, scale, labels, compute_col):
    return tuple(torch.ops.ck_native.lse_fwd(query, keys, scale, labels, compute_col))


def _native_bwd(query, keys, scale, labels, row_lse, col_lse, grad_row, grad_col, grad_pos):
    return tuple(torch.ops.ck_native.lse_bwd(query, keys, scale, labels, row_lse, col_lse,
                                             grad_row, grad_col, grad_pos))


def _triton_fwd(*args):
    from .triton_kernels import lse_fwd_triton
    return lse_fwd_triton(*args)


def _triton_bwd(*args):
    from .triton_kernels import lse_bwd_triton
    return lse_bwd_triton(*args)


_IMPLS: dict[str, tuple[Callable, Callable]] = {
    "reference": (_reference_fwd, _reference_bwd),
    "chunked": (_chunked_fwd, _chunked_bwd),
    "cpu": (_native_fwd, _native_bwd),
    "cuda": (_native_fwd, _native_bwd),
    "triton": (_triton_fwd, _triton_bwd),
}


def availability(name: str) -> tuple[bool, str]:
    """(usable, reason-if-not) for a backend on this machine, independent of any tensor."""
    if name in ("reference", "chunked"):
        return True, ""
    if name in ("cpu", "cuda"):
        try:
            from . import _native
        except Exception as exc:  # a broken install is reported, never raised
            return False, f"contrastive_kernels._native failed to import: {exc}"
        ok, why = _native.load()
    if name == "cpu":
        return ok, why
    if name == "cuda":
        if not ok:
            return False, why
        if not _native.has_cuda_kernels():
            return False, ("the native extension was built without CUDA kernels (torch "
                           f"{torch.__version__} is {'a CUDA' if torch.version.cuda else 'a CPU-only'} "
                           "build; rebuild with a CUDA torch and a matching nvcc, CK_BUILD_CUDA=1)")
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible"
        return True, ""
    if name == "triton":
        try:
            from .triton_kernels import available
        except Exception as exc:  # pragma: no cover - import errors are reported, not raised
            return False, f"triton_kernels failed to import: {exc}"
        return available()
    raise ValueError(f"unknown backend {name!r}; choose from {BACKEND_CHOICES}")


def _device_ok(name: str, device: torch.device) -> tuple[bool, str]:
    if name == "cpu" and device.type != "cpu":
        return False, f"backend 'cpu' needs CPU tensors, got tensors on {device}"
    if name == "cuda" and device.type != "cuda":
        return False, f"backend 'cuda' needs CUDA tensors, got tensors on {device}"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False, (f"backend 'triton' needs CUDA tensors (got {device}); CPU tensors only run "
                       "under TRITON_INTERPRET=1")
    return True, ""


# Resolution is pure host-side bookkeeping (imports, env vars): under torch.compile it runs once at
# trace time and its answer is a constant of the graph, so fullgraph=True sees no graph break.
@torch.compiler.assume_constant_result
def resolve(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for ``name`` (which may be ``"auto"``) on tensors of this device/dtype.

    ``auto`` rule: CPU → ``cpu`` when the native extension is built, else ``chunked``. CUDA →
    ``triton`` when usable, else ``cuda`` when built, else ``chunked``; float64 on CUDA → ``chunked``
    (the GPU kernels are for 32- and 16-bit inputs). An explicit name that cannot run raises
    ``RuntimeError`` saying what is missing; there is no silent fallback.
    """
    if name not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {name!r}")
    if name == "auto":
        if device.type == "cpu":
            candidates = ("cpu", "chunked")
        elif device.type == "cuda" and dtype != torch.float64:
            candidates = ("triton", "cuda", "chunked")
        else:
            candidates = ("chunked",)
        for cand in candidates:
            if availability(cand)[0] and _device_ok(cand, device)[0]:
                return cand
        return "chunked"
    ok, why = availability(name)
    if ok:
        ok, why = _device_ok(name, device)
    if not ok:
        raise RuntimeError(f"backend {name!r} is not usable: {why}")
    if dtype == torch.float64 and name in ("triton", "cuda"):
        raise TypeError(f"backend {name!r} supports float32, float16 and bfloat16 inputs, not float64; "
                        "use backend='cpu', 'chunked' or 'reference' for float64")
    return name


def implementation(name: str) -> tuple[Callable, Callable]:
    """The (fwd, bwd) pair of a concrete backend name (already resolved)."""
    return _IMPLS[name]
