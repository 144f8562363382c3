"""The log-sum-exp op's exclusion masks beyond the self pair, through ``ck.lse_stats``:

* same-group exclusion (``query_groups``/``key_groups``): sentence-transformers' ``doc_to_doc`` with
  hard negatives, where a document is never a negative of its own query's other documents;
* guided false negatives (``guide_query``/``guide_keys``/``guide_threshold``): GISTEmbed's rule,
  the guide similarity computed inside the tile, the positives never masked.

Every CPU backend (and Triton under its interpreter) against the dense float64 oracle
``reference.lse_stats``, every output and gradient; the memory bound is in tests/test_memory.py.
"""
from __future__ import annotations

import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels import backends, reference
from helpers import make_features, make_labels
from test_conformance import _class_labels, conform

F64 = torch.float64


def st_groups(b: int, columns: int):
    """(query_groups, key_groups) of sentence-transformers' doc_to_doc: row i is query i's
    positive document; key j (the concatenated document columns) belongs to query j mod B."""
    return torch.arange(b), torch.arange(b * columns) % b


def guide_with_clear_thresholds(n: int, m: int, dg: int, masked: float = 0.3, seed: int = 3):
    """Unit guide embeddings (exactly representable in bfloat16, so every dtype sees the same
    values) and per-row thresholds halfway between two neighbouring guide similarities, so that
    about ``masked`` of each row lies above it and no similarity is within rounding of it."""
    gq, gk = make_features(n, m, dg, dtype=torch.bfloat16, seed=seed)
    sims = (gq @ gk.T).sort(dim=1).values
    at = min(m - 2, max(0, int(round((1 - masked) * m)) - 1))
    threshold = 0.5 * (sims[:, at] + sims[:, at + 1])
    gap = torch.minimum(threshold - sims[:, at], sims[:, at + 1] - threshold)
    assert bool((gap > 1e-4).all()), "pick another seed: a threshold is too close to a similarity"
    return gq, gk, threshold


def variant_kwargs(variant: str, n: int, m: int, dg: int = 5):
    """(lse_stats keyword arguments, labels) of a mask variant at size (n, m)."""
    kw, labels = {}, None
    if "groups" in variant:
        if "st" in variant:
            cols = -(-m // n)
            rg, cg = st_groups(n, cols)
            cg = cg[:m]
        else:
            g = torch.Generator().manual_seed(n + m)
            rg, cg = torch.randint(0, 4, (n,), generator=g), torch.randint(0, 4, (m,), generator=g)
        kw.update(query_groups=rg, key_groups=cg)
    if "guide" in variant:
        gq, gk, t = guide_with_clear_thresholds(n, m, dg)
        kw.update(guide_query=gq, guide_keys=gk, guide_threshold=t)
    if "exclude" in variant:
        kw["exclude_self"] = True
    if "classes" in variant:
        kw.update(query_classes=_class_labels(n, 3), key_classes=_class_labels(m, 3, seed=7))
    elif "labels" in variant or m < n:
        labels = make_labels(n, m)
    return kw, labels


VARIANTS = ["groups", "st-groups", "guide", "guide+labels", "guide+classes", "groups+classes",
            "st-groups+guide+exclude", "groups+guide+exclude+classes"]


def objective(fn, kw, labels, n, m):
    """Σ w·row + Σ w·col + Σ w·pos with fixed random weights; rows or columns with every pair
    excluded (−inf) are left out of the sum (their gradient is checked to be 0 separately)."""
    g = torch.Generator().manual_seed(n * m)
    ups = [torch.randn(x, generator=g, dtype=F64) for x in (n, m, n)]

    def total(q, k, s, **bk):
        row, col, pos = fn(q, k, s, labels, **kw, **bk)[:3]
        u = [x.to(row.dtype) for x in ups]
        t = (torch.where(torch.isfinite(row), row, 0.0) * u[0]).sum()
        return t + (torch.where(torch.isfinite(col), col, 0.0) * u[1]).sum() + (pos * u[2]).sum()
    return total


def _ours(*a, backend, **kw):
    return ck.lse_stats(*a, backend=backend, **kw)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n,m,d", [(1, 3, 3), (7, 21, 37), (37, 133, 13), (64, 64, 5)])
def test_masks_float64(backend, n, m, d, variant):
    q, k = make_features(n, m, d, seed=n + m + d)
    kw, labels = variant_kwargs(variant, n, m)
    conform(objective(_ours, kw, labels, n, m), objective(reference.lse_stats, kw, labels, n, m),
            (q, k), (9.0,), F64, backend)
    ours = ck.lse_stats(q, k, 9.0, labels, **kw, backend=backend)
    want = reference.lse_stats(q, k, 9.0, labels, **kw)
    for a, b in zip(ours, want):  # the −inf of fully excluded rows/columns too
        assert torch.equal(torch.isinf(a), torch.isinf(b))
    if "classes" in variant:
        assert torch.equal(ours[3], want[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["st-groups", "guide+labels", "st-groups+guide+exclude",
                                     "groups+guide+exclude+classes"])
def test_masks_low_precision(lowp_backend, variant, dtype):
    n, m, d = 37, 133, 13
    q, k = make_features(n, m, d, dtype=dtype, seed=11)
    kw, labels = variant_kwargs(variant, n, m)
    conform(objective(_ours, kw, labels, n, m), objective(reference.lse_stats, kw, labels, n, m),
            (q, k), (9.0,), dtype, lowp_backend)


def test_the_masks_change_the_statistics():
    # not vacuous: each mask removes pairs from the plain statistics, and the designated positive
    # survives the guide even where its guide similarity is above the threshold
    n, m = 7, 21
    q, k = make_features(n, m, 5, seed=2)
    plain = reference.lse_stats(q, k, 9.0)
    for variant in ("st-groups", "guide"):
        kw, _ = variant_kwargs(variant, n, m)
        row = ck.lse_stats(q, k, 9.0, **kw, backend="chunked")[0]
        assert bool((row < plain[0]).any()), variant
    gq, gk, t = guide_with_clear_thresholds(n, m, 5)
    t = (gq * gk[:n]).sum(1).double() - 1.0  # every diagonal pair is above its threshold
    row, _, pos = ck.lse_stats(q, k, 9.0, guide_query=gq, guide_keys=gk, guide_threshold=t,
                               backend="chunked")
    torch.testing.assert_close(pos, plain[2])  # the positive kept its logit
    assert bool(torch.isfinite(row).all())


def test_fully_excluded_rows_have_zero_gradient(fused_backend):
    # a row whose every pair is same-group excluded: row_lse = −inf, gradient exactly 0, no NaN
    n, m = 5, 10
    q, k = make_features(n, m, 4, seed=8)
    rg, cg = torch.arange(n), torch.full((m,), 99)
    rg[2] = 99  # row 2 shares its group with every column; the other rows with none
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    row, col, pos = ck.lse_stats(q, k, 9.0, query_groups=rg, key_groups=cg, backend=fused_backend)
    assert row[2] == float("-inf") and pos[2] == 0
    torch.where(torch.isfinite(row), row, 0.0).sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert torch.equal(q.grad[2], torch.zeros_like(q.grad[2]))


def test_masks_never_reach_the_cuda_kernels(monkeypatch):
    # the CUDA C++ kernels lack both masks: an explicit request is NotImplementedError naming the
    # feature, and auto picks another backend for such a call
    monkeypatch.setattr(backends, "availability", lambda name: (name != "triton", ""))
    monkeypatch.setattr(backends, "device_ok", lambda name, device: (True, ""))
    resolve = backends.resolve.__wrapped__ if hasattr(backends.resolve, "__wrapped__") else backends.resolve
    dev = torch.device("cuda")
    assert resolve("auto", dev, torch.float32, "") == "cuda"
    for feature in ("groups", "guide"):
        assert resolve("auto", dev, torch.float32, feature) == "chunked"
        with pytest.raises(NotImplementedError, match=feature):
            resolve("cuda", dev, torch.float32, feature)


def test_mask_input_errors():
    q, k = make_features(4, 6, 3)
    gq, gk, t = guide_with_clear_thresholds(4, 6, 2)
    with pytest.raises(ValueError, match="go together"):
        ck.lse_stats(q, k, 9.0, query_groups=torch.arange(4))
    with pytest.raises(ValueError, match=r"key_groups must have shape \(6,\)"):
        ck.lse_stats(q, k, 9.0, query_groups=torch.arange(4), key_groups=torch.arange(5))
    with pytest.raises(TypeError, match="int64"):
        ck.lse_stats(q, k, 9.0, query_groups=torch.arange(4.0), key_groups=torch.arange(6))
    with pytest.raises(ValueError, match="all three"):
        ck.lse_stats(q, k, 9.0, guide_query=gq, guide_keys=gk)
    with pytest.raises(ValueError, match="N = 4 and M = 6"):
        ck.lse_stats(q, k, 9.0, guide_query=gq, guide_keys=gk[:5], guide_threshold=t)
    with pytest.raises(ValueError, match="guide_threshold must have shape"):
        ck.lse_stats(q, k, 9.0, guide_query=gq, guide_keys=gk, guide_threshold=t[:3])
    with pytest.raises(ValueError):  # differing guide dimensions
        ck.lse_stats(q, k, 9.0, guide_query=gq, guide_keys=gk[:, :1], guide_threshold=t)
    # a number is one threshold for every row
    a = ck.lse_stats(q, k, 9.0, guide_query=gq, guide_keys=gk, guide_threshold=0.1, backend="chunked")
    b = reference.lse_stats(q, k, 9.0, guide_query=gq, guide_keys=gk,
                            guide_threshold=torch.full((4,), 0.1, dtype=F64))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
