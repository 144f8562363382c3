"""Bitwise run-to-run reproducibility on the CPU (issue 21.2, docs/determinism.md).

At a fixed thread count, repeating the same call must give the same bits: the loss value and the
gradients of the features, of logit_scale and of logit_bias, for every op family. On 2 threads the
native kernels' tasks claim work dynamically, so which thread ran which row block changes from run
to run; the results must not.

The small-block runs (CK_CPU_BLOCK_ROWS / _COLS, read by the kernels at call time) give each task
many row blocks, so the claim pattern differs between repeats with near certainty. Against the
per-task column buffers used before (csrc/cpu/tiling.h before issue 21.2) every small-block case
and every float64 case failed in each of 5 runs of this file, on the column statistics or on
grad_keys (or on grad_features where keys are the features); the default-tiling cases (8 row
blocks, which two idle threads often claim in the same alternating pattern) failed in most runs
but not all.
"""
from __future__ import annotations

import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels import backends
from helpers import require_backend

REPEATS = 6
THREADS = 2

# name -> (N, M or None for square, D)
SIZES = {"default": (600, 600, 48), "small-blocks": (600, 600, 48)}
BLOCK_ENV = {
    # default tiling: 8 row blocks of 80 rows on 2 threads, 3 column tiles
    "default": {},
    # 38 row blocks of 16 rows: ~19 claims per task, so the dynamic assignment varies run to run
    "small-blocks": {"CK_CPU_BLOCK_ROWS": "16", "CK_CPU_BLOCK_COLS": "40"},
}


def _features(seed, n, m, d):
    g = torch.Generator().manual_seed(seed)
    # Not normalised, not tiny: the logits span a wide range so that every rounding matters.
    q = torch.randn(n, d, generator=g)
    k = torch.randn(m, d, generator=g)
    return q, k


def _family_fn(family, n, m, d):
    """fn(q, k, scale, bias, backend) -> loss, and the feature shapes it needs."""
    g = torch.Generator().manual_seed(7)
    labels_m = torch.randint(0, m, (n,), generator=g)
    classes = torch.randint(0, 13, (n,), generator=g)
    ref_classes = torch.randint(0, 13, (m,), generator=g)
    if family == "clip":  # row and column statistics (compute_col), diagonal positives
        return (n, n), lambda q, k, s, b, be: ck.clip_loss(q, k, s, b, backend=be)
    if family == "info_nce":  # rows only
        return (n, n), lambda q, k, s, b, be: ck.info_nce(q, k, s, backend=be)
    if family == "info_nce_labels":  # N ≠ M, label positives, rows only
        return (n, m + 37), lambda q, k, s, b, be: ck.info_nce(
            q, k, s, torch.randint(0, m + 37, (n,), generator=torch.Generator().manual_seed(3)),
            backend=be)
    if family == "lse_col_labels":  # N ≠ M, labels and column statistics
        def fn(q, k, s, b, be):
            row, col, pos = ck.lse_stats(q, k, s, labels_m, compute_col=True, backend=be)
            return (row - pos).sum() + 0.5 * col.sum()
        return (n, m), fn
    if family == "nt_xent":  # exclude_self, labels = the other view
        return (n // 2, n // 2), lambda q, k, s, b, be: ck.nt_xent_loss(q, k, s, backend=be)
    if family == "supcon":  # class positives with exclude_self (keys = features)
        return (n, None), lambda q, k, s, b, be: ck.supcon_loss(q, classes, s, backend=be)
    if family == "supcon_ref":  # class positives against a reference set, no exclusion
        return (n, m), lambda q, k, s, b, be: ck.supcon_loss(
            q, classes, s, ref_features=k, ref_labels=ref_classes, backend=be)
    if family == "siglip":  # diagonal positives
        return (n, n), lambda q, k, s, b, be: ck.siglip_loss(q, k, s, b, backend=be)
    if family == "siglip_labels":  # class positives
        return (n, n), lambda q, k, s, b, be: ck.siglip_loss(q, k, s, b, labels=classes % 7,
                                                             backend=be)
    raise AssertionError(family)


FAMILIES = ["clip", "info_nce", "info_nce_labels", "lse_col_labels", "nt_xent", "supcon",
            "supcon_ref", "siglip", "siglip_labels"]


def _run(fn, shapes, d, backend, dtype):
    """{name: tensor or None}: the value and the gradients of one fresh call, every leaf in
    `dtype` (a float64 gradient rounded to float32 would hide last-bit differences)."""
    n, m = shapes
    q, k = (t.to(dtype) for t in _features(0, n, m if m is not None else 1, d))
    q.requires_grad_(True)
    k.requires_grad_(m is not None)
    scale = torch.tensor(9.0, dtype=dtype, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=dtype, requires_grad=True)
    loss = fn(q, k, scale, bias, backend)
    named = {"grad_features": q, "grad_keys": k, "grad_logit_scale": scale,
             "grad_logit_bias": bias}
    named = {key: t for key, t in named.items() if t.requires_grad}
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    return {"value": loss.detach(), **dict(zip(named, grads))}


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    if torch.get_num_threads() != THREADS:
        pytest.skip(f"cannot run on {THREADS} threads here")
    yield
    torch.set_num_threads(before)


def _assert_repeatable(fn, shapes, d, backend, dtype=torch.float32):
    first = _run(fn, shapes, d, backend, dtype)
    for rep in range(1, REPEATS):
        again = _run(fn, shapes, d, backend, dtype)
        assert again.keys() == first.keys()
        for name, a in first.items():
            b = again[name]
            if a is None or b is None:
                assert a is None and b is None, name
                continue
            if not torch.equal(a, b):
                diff = (a - b).abs().max().item()
                raise AssertionError(f"repeat {rep}: {name} differs from repeat 0 (max |Δ| = "
                                     f"{diff:.3g}) on {backend}, {torch.get_num_threads()} threads")


@pytest.mark.parametrize("blocks", list(BLOCK_ENV))
@pytest.mark.parametrize("family", FAMILIES)
def test_native_cpu_bitwise_repeatable(family, blocks, two_threads, monkeypatch):
    require_backend("cpu")
    for key, value in BLOCK_ENV[blocks].items():
        monkeypatch.setenv(key, value)
    n, m, d = SIZES[blocks]
    shapes, fn = _family_fn(family, n, m, d)
    _assert_repeatable(fn, shapes, d, "cpu")


@pytest.mark.parametrize("family", ["clip", "nt_xent", "supcon", "siglip_labels"])
def test_native_cpu_bitwise_repeatable_float64(family, two_threads, monkeypatch):
    """The float64 checking path shares the drivers (generic tile passes): same guarantee."""
    require_backend("cpu")
    for key, value in BLOCK_ENV["small-blocks"].items():
        monkeypatch.setenv(key, value)
    n, m, d = SIZES["small-blocks"]
    shapes, fn = _family_fn(family, n, m, d)
    _assert_repeatable(fn, shapes, d, "cpu", torch.float64)


@pytest.mark.parametrize("family", ["clip", "nt_xent", "supcon", "siglip_labels"])
def test_native_cpu_bitwise_repeatable_bf16(family, two_threads, monkeypatch):
    """bfloat16 inputs: on the bf16 dot-product path (the CPU's default where it has the units)
    and on the upcast path; the packed operands and the per-tile bf16 G keep the same guarantee."""
    require_backend("cpu")
    for key, value in BLOCK_ENV["small-blocks"].items():
        monkeypatch.setenv(key, value)
    n, m, d = SIZES["small-blocks"]
    shapes, fn = _family_fn(family, n, m, d)
    for isa in ("avx512_bf16", "avx512"):
        monkeypatch.setenv("CK_CPU_ISA", isa)
        _assert_repeatable(fn, shapes, d, "cpu", torch.bfloat16)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("family", ["clip", "lse_col_labels", "supcon", "siglip_labels"])
def test_pytorch_backends_bitwise_repeatable(family, backend, two_threads, monkeypatch):
    """The PyTorch backends (and the Python glue all backends share: the scale and bias gradient
    sums, the reductions) run ATen ops whose CPU kernels split work statically by thread count."""
    require_backend(backend)
    if backend == "chunked":  # many row blocks, so the running column LSE has many steps
        monkeypatch.setattr(backends.chunked, "CHUNK_ELEMENTS", 40 * 640)
    shapes, fn = _family_fn(family, 600, 600, 48)
    _assert_repeatable(fn, shapes, 48, backend)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_native_cpu_bitwise_repeatable_other_thread_counts(family, threads, monkeypatch):
    """One thread (a single group, the serial order) and an odd task count (6 groups of unequal
    size): the guarantee holds at any fixed thread count, not just 2."""
    require_backend("cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for key, value in BLOCK_ENV["small-blocks"].items():
            monkeypatch.setenv(key, value)
        n, m, d = SIZES["small-blocks"]
        shapes, fn = _family_fn(family, n, m, d)
        _assert_repeatable(fn, shapes, d, "cpu")
    finally:
        torch.set_num_threads(before)
