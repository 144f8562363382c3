import itertools

import pytest
import torch

import contrastive_kernels  # noqa: F401  (registers the ops)
from contrastive_kernels import backends  # noqa: F401
from contrastive_kernels import reference as oracle
from contrastive_kernels._types import stat_dtype
from helpers import assert_close_f64, make_labels

OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_dynamic")
DTYPES = [torch.float32, torch.float64]


def _inputs(dtype, with_labels, requires_grad, n=7, m=13, d=5):
    g = torch.Generator().manual_seed(0)
    # Without labels the positive of row i is column i (M ≥ N); with labels M < N is allowed.
    n, m = (n, m) if not with_labels else (m, n)
    q = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_(requires_grad)
    k = torch.randn(m, d, generator=g, dtype=dtype).requires_grad_(requires_grad)
    scale = torch.tensor(3.0, dtype=stat_dtype(dtype)).requires_grad_(requires_grad)
    labels = make_labels(n, m) if with_labels else None
    return q, k, scale, labels


@pytest.mark.parametrize("compute_col", [True, False])
@pytest.mark.parametrize("with_labels", [False, True], ids=["nolabels", "labels"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_opcheck_lse_fwd(fused_backend_plain, dtype, with_labels, compute_col):
    q, k, scale, labels = _inputs(dtype, with_labels, requires_grad=True)
    torch.library.opcheck(torch.ops.contrastive_kernels.lse_fwd.default,
                          (q, k, scale, labels, None, None, False, compute_col, fused_backend_plain),
                          test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("compute_col", [True, False])
@pytest.mark.parametrize("with_labels", [False, True], ids=["nolabels", "labels"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_opcheck_lse_bwd(fused_backend_plain, dtype, with_labels, compute_col):
    q, k, scale, labels = _inputs(dtype, with_labels, requires_grad=False)
    row, col, _, _ = torch.ops.contrastive_kernels.lse_fwd(q, k, scale, labels, None, None, False,
                                                          compute_col, fused_backend_plain)
    st = stat_dtype(dtype)
    g = torch.Generator().manual_seed(1)
    grad_row = torch.randn(q.shape[0], generator=g, dtype=st)
    grad_col = torch.randn(k.shape[0], generator=g, dtype=st) if compute_col else None
    grad_pos = torch.randn(q.shape[0], generator=g, dtype=st)
    torch.library.opcheck(torch.ops.contrastive_kernels.lse_bwd.default,
                          (q, k, scale, labels, None, None, False, row, col, grad_row, grad_col,
                           grad_pos, fused_backend_plain),
                          test_utils=OPCHECK_UTILS)


def test_lse_fwd_shapes_and_dtypes(fused_backend_plain):
    for dtype, compute_col in itertools.product([torch.float64, torch.float32, torch.bfloat16],
                                                [True, False]):
        q, k, scale, _ = _inputs(dtype, False, requires_grad=False)
        row, col, pos, count = torch.ops.contrastive_kernels.lse_fwd(
            q, k, scale, None, None, None, False, compute_col, fused_backend_plain)
        st = stat_dtype(dtype)
        assert row.shape == (q.shape[0],) and pos.shape == (q.shape[0],)
        assert col.shape == ((k.shape[0],) if compute_col else (0,))
        assert row.dtype == col.dtype == pos.dtype == count.dtype == st
        assert count.shape == (0,)


@pytest.mark.parametrize("with_labels", [False, True], ids=["nolabels", "labels"])
def test_lse_bwd_any_subset_of_upstream_grads(fused_backend, with_labels):
    """Every combination of None upstream gradients matches autograd through the dense oracle
    (``contrastive_kernels.reference``, which shares no code with any backend)."""
    q, k, scale, labels = _inputs(torch.float64, with_labels, False, n=37, m=130, d=7)
    qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    o_row, o_col, o_pos = oracle.lse_stats(qq, kk, scale, labels)
    row, col = o_row.detach(), o_col.detach()
    g = torch.Generator().manual_seed(2)
    full = (torch.randn(q.shape[0], generator=g, dtype=torch.float64),
            torch.randn(k.shape[0], generator=g, dtype=torch.float64),
            torch.randn(q.shape[0], generator=g, dtype=torch.float64))
    for mask in itertools.product([False, True], repeat=3):
        if not any(mask):
            continue
        grads = [t if keep else None for t, keep in zip(full, mask)]
        gq, gk = torch.ops.contrastive_kernels.lse_bwd(q, k, scale, labels, None, None, False, row,
                                                       col, *grads, fused_backend)
        objective = sum((stat * w).sum() for stat, w in zip((o_row, o_col, o_pos), grads)
                        if w is not None)
        rq, rk = torch.autograd.grad(objective, (qq, kk), retain_graph=True)
        assert_close_f64(gq, rq, f"grad_query {mask}")
        assert_close_f64(gk, rk, f"grad_keys {mask}")


def _classes(n, m, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (m,), generator=g)


@pytest.mark.parametrize("variant", ["exclude", "classes", "exclude+classes"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_opcheck_lse_exclusion_and_classes(fused_backend_plain, dtype, variant):
    q, k, scale, _ = _inputs(dtype, False, requires_grad=True, n=9, m=9)
    rc, cc = _classes(9, 9) if "classes" in variant else (None, None)
    exclude = "exclude" in variant
    torch.library.opcheck(torch.ops.contrastive_kernels.lse_fwd.default,
                          (q, k, scale, None, rc, cc, exclude, True, fused_backend_plain),
                          test_utils=OPCHECK_UTILS)
    row, col, _, _ = torch.ops.contrastive_kernels.lse_fwd(q.detach(), k.detach(), scale.detach(),
                                                          None, rc, cc, exclude, True,
                                                          fused_backend_plain)
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(n, generator=g, dtype=stat_dtype(dtype)) for n in (9, 9, 9)]
    torch.library.opcheck(torch.ops.contrastive_kernels.lse_bwd.default,
                          (q.detach(), k.detach(), scale.detach(), None, rc, cc, exclude, row, col,
                           *grads, fused_backend_plain),
                          test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("positives", ["diagonal", "none", "classes"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_opcheck_sigmoid(fused_backend_plain, dtype, positives):
    q, k, scale, _ = _inputs(dtype, False, requires_grad=True, n=7, m=11)
    bias = torch.tensor(-2.0, dtype=stat_dtype(dtype), requires_grad=True)
    rc, cc = _classes(7, 11) if positives == "classes" else (None, None)
    diagonal = positives == "diagonal"
    torch.library.opcheck(torch.ops.contrastive_kernels.sigmoid_fwd.default,
                          (q, k, scale, bias, rc, cc, diagonal, fused_backend_plain),
                          test_utils=OPCHECK_UTILS)
    grad_row = torch.randn(7, dtype=stat_dtype(dtype))
    torch.library.opcheck(torch.ops.contrastive_kernels.sigmoid_bwd.default,
                          (q.detach(), k.detach(), scale.detach(), bias.detach(), rc, cc, diagonal,
                           grad_row, fused_backend_plain),
                          test_utils=OPCHECK_UTILS)


# ---------------------------------------------------------------------------------------------
# the native ops themselves (ck_native::*), below the contrastive_kernels:: wrappers
# ---------------------------------------------------------------------------------------------

NATIVE_UTILS = ("test_schema", "test_faketensor")


def _native_ops():
    from contrastive_kernels import _native
    ok, why = _native.load()
    if not ok:
        pytest.skip(why)
    return torch.ops.ck_native


@pytest.mark.parametrize("variant", ["plain", "labels-nocol", "exclude+classes"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_opcheck_native_lse(dtype, variant):
    ops = _native_ops()
    q, k, scale, labels = _inputs(dtype, variant.startswith("labels"), requires_grad=False, n=9,
                                  m=11)
    rc, cc = _classes(q.shape[0], k.shape[0]) if "classes" in variant else (None, None)
    exclude = "exclude" in variant
    compute_col = "nocol" not in variant
    args = (q, k, scale, labels, rc, cc, exclude, compute_col)
    torch.library.opcheck(ops.lse_fwd.default, args, test_utils=NATIVE_UTILS)
    row, col, _, _ = ops.lse_fwd(*args)
    g = torch.Generator().manual_seed(5)
    st = stat_dtype(dtype)
    grads = (torch.randn(q.shape[0], generator=g, dtype=st),
             torch.randn(k.shape[0], generator=g, dtype=st) if compute_col else None,
             torch.randn(q.shape[0], generator=g, dtype=st))
    torch.library.opcheck(ops.lse_bwd.default, (q, k, scale, labels, rc, cc, exclude, row, col,
                                                *grads), test_utils=NATIVE_UTILS)


@pytest.mark.parametrize("positives", ["diagonal", "classes"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_opcheck_native_sigmoid(dtype, positives):
    ops = _native_ops()
    q, k, scale, _ = _inputs(dtype, False, requires_grad=False, n=7, m=11)
    bias = torch.tensor(-2.0, dtype=stat_dtype(dtype))
    rc, cc = _classes(7, 11) if positives == "classes" else (None, None)
    args = (q, k, scale, bias, rc, cc, positives == "diagonal")
    torch.library.opcheck(ops.sigmoid_fwd.default, args, test_utils=NATIVE_UTILS)
    grad_row = torch.randn(7, dtype=stat_dtype(dtype))
    torch.library.opcheck(ops.sigmoid_bwd.default, args + (grad_row,), test_utils=NATIVE_UTILS)
