"""The Triton sigmoid (SigLIP) backward in every host-side variant, per row (issue 20.2).

The backward's per-row output (the row sums of G, which the autograd site turns into the bias
gradient) is written through a different buffer layout in each mode: straight into the (N,) result,
or through a (split, rows) scratch per row slab of the ``gemm`` mode, reduced on the host. A sum
over all rows cannot see rows landing in the wrong place (the total stays exact), so these tests
compare every output **per row** (per-row loss, per-row bias gradient, feature gradients) with a
float64 autograd oracle, in variants forced through ``tuning.tuning`` so that several row slabs meet
several column splits. A spy on ``tuning.plan_split`` proves each variant really planned the slabs
and splits it is named after.

Runs under Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1), float32 and
float16 only (the interpreter computes bfloat16 wrongly), sides ≤ 600.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from contrastive_kernels import reference  # noqa: E402
from contrastive_kernels.backends import triton as tk  # noqa: E402
from contrastive_kernels.backends.triton import tuning as tu  # noqa: E402
from helpers import assert_relative_rule  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

DTYPES = (torch.float32, torch.float16)

# N = 100 rows, M = 600 columns: with a forced split the 256-aligned column splits come out as
# 3 (split=3) or 2 (split=2); gemm_budget_bytes=1 makes every slab gemm_min_rows rows, so 32-row
# slabs give 4 slabs (the last one 4 rows) and 48-row slabs (not a multiple of the interpreter's
# 32-row G-writer block) give 3, the last one ragged. N ≠ M so a row bound confused with a column
# bound shows. (variant, expected slabs, expected largest split)
N, M, D = 100, 600, 37
VARIANTS = {
    # the reported bug: several slabs × several column splits
    "gemm_slabs32_split3": (dict(bwd_mode="gemm", split=3, gemm_min_rows=32, gemm_budget_bytes=1), 4, 3),
    "gemm_slabs48_split2": (dict(bwd_mode="gemm", split=2, gemm_min_rows=48, gemm_budget_bytes=1), 3, 2),
    # the G writer with D chunked (D > fwd_max_single_d), as at D > 128 on the GPU
    "gemm_slabs_split3_chunked_d": (dict(bwd_mode="gemm", split=3, gemm_min_rows=32, gemm_budget_bytes=1,
                                         fwd_max_single_d=16, bwd_max_single_d=16, chunk_d=16), 4, 3),
    "gemm_slabs_split1": (dict(bwd_mode="gemm", split=1, gemm_min_rows=32, gemm_budget_bytes=1), 4, 1),
    "gemm_one_slab_split3": (dict(bwd_mode="gemm", split=3), 1, 3),
    # the deterministic selection (gemm when D is chunked) with slabs and splits
    "deterministic_gemm": (dict(deterministic=True, split=2, gemm_min_rows=32, gemm_budget_bytes=1,
                                fwd_max_single_d=16, bwd_max_single_d=16, chunk_d=16), 4, 2),
    # one launch over all rows: dQ atomic across splits / private per split / owner read-modify-write
    "fused_atomic_split3": (dict(bwd_mode="fused", split=3), 1, 3),
    "fused_atomic_split3_chunked_d": (dict(bwd_mode="fused", split=3, bwd_max_single_d=16, chunk_d=16), 1, 3),
    "fused_rmw_chunked_d": (dict(bwd_mode="fused", split=1, bwd_max_single_d=16, chunk_d=16), 1, 1),
    "two_pass_private_split3": (dict(bwd_mode="two_pass", split=3), 1, 3),
}


def make_inputs(n, m, d, dtype, positives, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=torch.float64)
    k = torch.randn(m, d, generator=g, dtype=torch.float64)
    q, k = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    q, k = q.to(dtype), k.to(dtype)
    if positives == "classes":
        rc = torch.randint(0, 5, (n,), generator=g)
        cc = torch.randint(0, 5, (m,), generator=g)
    else:
        rc = cc = None
    # per-row upstream weights of different signs and sizes: rows that trade places cannot agree
    grad_row = (torch.randn(n, generator=g, dtype=torch.float64) / n).to(torch.float32)
    return q, k, rc, cc, grad_row


def positive_mask(n, m, rc, cc):
    if rc is not None:
        return rc[:, None] == cc[None, :]
    return torch.arange(n)[:, None] == torch.arange(m)[None, :]


def oracle(q, k, s, b, pos, grad_row, dtype):
    """(per-row loss ρ, grad_query, grad_keys, per-row bias gradient) of Σ_i grad_row_i·ρ_i in
    ``dtype`` by autograd: ρ_i is reference.siglip_loss's per-row formula, and the bias enters as
    one copy per row, so its gradient is the per-row sum of G that the backward returns."""
    q = q.to(dtype).detach().requires_grad_(True)
    k = k.to(dtype).detach().requires_grad_(True)
    b_rows = torch.full((q.shape[0], 1), b, dtype=dtype, requires_grad=True)
    lg = reference.logits(q, k, s) + b_rows
    z = torch.where(pos, 1.0, -1.0).to(dtype)
    rho = torch.logaddexp(-z * lg, torch.zeros_like(lg)).sum(1)
    gq, gk, gb = torch.autograd.grad((rho * grad_row.to(dtype)).sum(), (q, k, b_rows))
    return rho.detach(), gq, gk, gb[:, 0]


def test_oracle_is_the_reference():
    # the oracle's per-row loss is reference.siglip_loss's (square, diagonal and label positives)
    q, k, _, _, gr = make_inputs(40, 40, 9, torch.float64, "diagonal", seed=1)
    lab = torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(2))
    for labels, pos in ((None, positive_mask(40, 40, None, None)), (lab, lab[:, None] == lab[None, :])):
        rho = oracle(q, k, 10.0, -3.0, pos, gr, torch.float64)[0]
        ref = reference.siglip_loss(q, k, 10.0, -3.0, labels=labels, reduction="none")
        torch.testing.assert_close(rho, ref, rtol=1e-12, atol=1e-12)


def run_and_check(q, k, rc, cc, grad_row, dtype, scale, bias, variant, split_spy):
    overrides, slabs, split = VARIANTS[variant]
    s = torch.tensor(scale, dtype=torch.float32, device=DEV)
    b = torch.tensor(bias, dtype=torch.float32, device=DEV)
    qd, kd, gd = q.to(DEV), k.to(DEV), grad_row.to(DEV)
    rcd = rc.to(DEV) if rc is not None else None
    ccd = cc.to(DEV) if cc is not None else None
    diagonal = rc is None
    with tu.tuning(**overrides):
        rho = tk.sigmoid_fwd(qd, kd, s, b, rcd, ccd, diagonal)
        split_spy.clear()
        gq, gk, gb = tk.sigmoid_bwd(qd, kd, s, b, rcd, ccd, diagonal, gd)
    # the variant planned what it is named after (the row-sum launches: the first launch of each
    # slab; two_pass adds one more launch for dK, which emits no row sums)
    launches = split_spy[:slabs]
    assert len(split_spy) == slabs + (1 if "two_pass" in variant else 0), split_spy
    assert max(launches) == split, split_spy
    pos = positive_mask(q.shape[0], k.shape[0], rc, cc)
    gt = oracle(q.double(), k.double(), scale, bias, pos, grad_row, torch.float64)
    same = oracle(q, k, scale, bias, pos, grad_row, dtype)
    names = ("row_loss", "grad_query", "grad_keys", "grad_bias_row")
    for name, o, ref, g in zip(names, (rho, gq, gk, gb), same, gt):
        assert o.dtype == torch.float32, f"{name}: {o.dtype}"
        assert o.shape == g.shape, f"{name}: {tuple(o.shape)} vs {tuple(g.shape)}"
        assert_relative_rule(o.cpu(), ref, g, dtype, name=f"{variant} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sigmoid_bwd_per_row_variants(variant, dtype, split_spy):
    # bias -3 rather than SigLIP's -10: the negatives then carry a visible share of each row sum
    q, k, rc, cc, gr = make_inputs(N, M, D, dtype, "diagonal", seed=3)
    run_and_check(q, k, rc, cc, gr, dtype, 10.0, -3.0, variant, split_spy)


@pytest.mark.parametrize("variant", ["gemm_slabs48_split2", "fused_atomic_split3", "two_pass_private_split3"])
def test_sigmoid_bwd_per_row_classes(variant, split_spy):
    # class positives (the row/column class vectors are indexed per slab as well)
    q, k, rc, cc, gr = make_inputs(N, M, D, torch.float32, "classes", seed=4)
    run_and_check(q, k, rc, cc, gr, torch.float32, 5.0, -2.0, variant, split_spy)
