"""CUDA backend (csrc/cuda): torch.ops.ck_native on CUDA tensors against dense float64 formulas
written here, plus the public API against the reference and triton backends.

Everything here needs a CUDA device and the extension's CUDA kernels; without them the GPU tests
are skipped with the reason (set CK_REQUIRE_CUDA=1 on a GPU machine to turn that skip into a
failure). The dense-formula self-check at the top runs everywhere.
"""
from __future__ import annotations

import os

import pytest
import torch

import contrastive_kernels as ck
from helpers import REL_ATOL, assert_relative_rule, backend_availability, leaf, reference


def _cuda_unavailable_reason():
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    ok, why = backend_availability("cuda")
    if not ok:
        return f"backend 'cuda' unavailable: {why}"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"the CUDA kernels need compute capability >= 8.0, device has {major}.{minor}"
    return None


_REASON = _cuda_unavailable_reason()


@pytest.fixture
def cuda_kernels():
    if _REASON is not None:
        if os.environ.get("CK_REQUIRE_CUDA") == "1":
            pytest.fail(f"CK_REQUIRE_CUDA=1 but {_REASON}")
        pytest.skip(_REASON)


gpu = pytest.mark.gpu
DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


# ---------------------------------------------------------------------------------------------
# the op's dense formulas in whatever dtype the inputs have (the same-dtype yardstick, fed with the
# kernel's own statistics); checked against the one oracle, reference.lse_op, below
# ---------------------------------------------------------------------------------------------

def _positives(n, labels, device):
    return torch.arange(n, device=device) if labels is None else labels


def dense_fwd(q, k, s, labels, compute_col):
    S = s * (q @ k.T)
    pos = S.gather(1, _positives(q.shape[0], labels, q.device)[:, None]).squeeze(1)
    col = torch.logsumexp(S, dim=0) if compute_col else S.new_empty(0)
    return torch.logsumexp(S, dim=1), col, pos


def dense_bwd(q, k, s, labels, row_lse, col_lse, grad_row, grad_col, grad_pos):
    S = s * (q @ k.T)
    G = torch.zeros_like(S)
    if grad_row is not None:
        G = G + grad_row[:, None] * torch.exp(S - row_lse[:, None])
    if grad_col is not None:
        G = G + grad_col[None, :] * torch.exp(S - col_lse[None, :])
    if grad_pos is not None:
        rows = torch.arange(q.shape[0], device=q.device)
        G = G.index_put((rows, _positives(q.shape[0], labels, q.device)), grad_pos, accumulate=True)
    return s * (G @ k), s * (G.T @ q)


def _ops():
    return torch.ops.ck_native


def _cast(xs, dtype):
    return [None if x is None else x.to(dtype) for x in xs]


def test_dense_formula_is_the_oracle():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(11, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (9,), generator=g)
    gr, gc, gp = torch.randn(9, dtype=torch.float64), torch.randn(11, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    r, c, p = dense_fwd(q, k, 3.0, labels, True)
    got = dense_bwd(q, k, 3.0, labels, r, c, gr, gc, gp)
    want = reference.lse_op(q, k, 3.0, labels, grad_row=gr, grad_col=gc, grad_pos=gp)
    for a, b in zip((r, c, p) + got, want[:3] + want[4:]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def _features(n, m, d, dtype, *, kind="unit", seed=0):
    device = DEVICE
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(n, d, generator=g, device=device, dtype=torch.float32)
    k = torch.randn(m, d, generator=g, device=device, dtype=torch.float32)
    if kind == "unit":
        q, k = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    return q.to(dtype), k.to(dtype)


def _labels(kind, n, m):
    if kind == "diag":
        return None
    g = torch.Generator(device="cpu").manual_seed(n + m)
    lab = torch.randint(0, m, (n,), generator=g)
    if n > 1:
        lab[-1] = lab[0]
    return lab.to(DEVICE)


def _scale(value):
    return torch.tensor(value, dtype=torch.float32, device=DEVICE)


# (N, M, D, labels): every axis ragged against the 64-row tiles and the 32/16-element D chunks;
# D = 136 / 40 are whole 16-byte vectors but partial chunks; odd D takes the unaligned load path.
SHAPES = [
    (1, 1, 1, "diag"),
    (7, 7, 7, "diag"),
    (37, 37, 37, "diag"),
    (130, 130, 64, "diag"),
    (257, 257, 130, "diag"),
    (37, 130, 136, "diag"),
    (130, 37, 40, "labels"),
    (257, 1, 7, "labels"),
    (1, 257, 257, "labels"),
    (64, 192, 512, "labels"),
]
# unit rows at scale 100 (CLIP's clamp) and raw Gaussian rows (|S| in the hundreds at D = 512).
INPUTS = [("unit", 100.0), ("raw", 3.0)]


def _shape_id(case):
    n, m, d, lab = case
    return f"{n}x{m}x{d}-{lab}"


@gpu
@pytest.mark.parametrize("compute_col", [True, False], ids=["col", "nocol"])
@pytest.mark.parametrize("kind,scale_value", INPUTS, ids=["unit", "raw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", SHAPES, ids=_shape_id)
def test_forward_matches_float64(cuda_kernels, case, dtype, kind, scale_value, compute_col):
    n, m, d, lab_kind = case
    q, k = _features(n, m, d, dtype, kind=kind, seed=n * 31 + m + d)
    labels = _labels(lab_kind, n, m)
    scale = _scale(scale_value)
    out = _ops().lse_fwd(q, k, scale, labels, None, None, False, compute_col)
    gt = dense_fwd(q.double(), k.double(), float(scale), labels, compute_col)
    ref = dense_fwd(q, k, scale.to(dtype), labels, compute_col)
    for name, o, r, g in zip(("row_lse", "col_lse", "pos"), out, ref, gt):
        assert o.dtype == torch.float32 and o.device == q.device
        assert_relative_rule(o, r, g, dtype, name)
    if not compute_col:
        assert out[1].shape == (0,)


GRADS = ["all", "row", "col", "pos", "row+pos"]


def _upstream(kind, n, m, seed=5):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    gr = torch.randn(n, generator=g, device=DEVICE) / n
    gc = torch.randn(m, generator=g, device=DEVICE) / m
    gp = -torch.rand(n, generator=g, device=DEVICE) / n
    return (gr if kind in ("all", "row", "row+pos") else None,
            gc if kind in ("all", "col") else None,
            gp if kind in ("all", "pos", "row+pos") else None)


def _check_backward(q, k, scale, labels, grads, tol_dtype=None, tag=""):
    """Kernel vs float64 and vs the dense formula in q's dtype; tolerance class tol_dtype or q's."""
    dtype = q.dtype
    s64 = float(scale)
    with torch.no_grad():
        r64, c64, _ = dense_fwd(q.double(), k.double(), s64, labels, True)
    # the kernel gets float32 statistics; the ground truth uses exactly those values
    r32, c32 = r64.float(), c64.float()
    gr, gc, gp = grads
    col_arg = c32 if gc is not None else c32.new_empty(0)
    out = _ops().lse_bwd(q, k, scale, labels, None, None, False, r32, col_arg, gr, gc, gp)
    gt = dense_bwd(q.double(), k.double(), s64, labels, *_cast((r32, c32, gr, gc, gp), torch.float64))
    ref = dense_bwd(q, k, scale.to(dtype), labels, *_cast((r32, c32, gr, gc, gp), dtype))
    for name, o, r, g, shape in zip(("grad_query", "grad_keys"), out, ref, gt, (q.shape, k.shape)):
        assert o.dtype == torch.float32 and o.shape == shape
        assert_relative_rule(o, r, g, tol_dtype or dtype, f"{tag}{name}")
    return out


@gpu
@pytest.mark.parametrize("kind,scale_value", INPUTS, ids=["unit", "raw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", SHAPES, ids=_shape_id)
def test_backward_matches_float64(cuda_kernels, case, dtype, kind, scale_value):
    n, m, d, lab_kind = case
    q, k = _features(n, m, d, dtype, kind=kind, seed=n * 17 + m + d)
    _check_backward(q, k, _scale(scale_value), _labels(lab_kind, n, m), _upstream("all", n, m))


@gpu
@pytest.mark.parametrize("grads", GRADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", [(130, 257, 37, "labels"), (257, 130, 64, "labels"), (37, 37, 136, "diag")],
                         ids=_shape_id)
def test_backward_optional_grads(cuda_kernels, case, dtype, grads):
    n, m, d, lab_kind = case
    q, k = _features(n, m, d, dtype, seed=3)
    _check_backward(q, k, _scale(20.0), _labels(lab_kind, n, m), _upstream(grads, n, m))


@gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_backward_deterministic_flag_same_values(cuda_kernels, deterministic):
    prev, prev_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        q, k = _features(257, 130, 136, torch.bfloat16, seed=9)
        _check_backward(q, k, _scale(30.0), _labels("labels", 257, 130), _upstream("all", 257, 130),
                        tag=f"deterministic={deterministic} ")
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


@gpu
def test_tf32_path(cuda_kernels):
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        q, k = _features(257, 130, 136, torch.float32, seed=4)
        labels, scale = _labels("labels", 257, 130), _scale(30.0)
        out = _ops().lse_fwd(q, k, scale, labels, None, None, False, True)
        gt = dense_fwd(q.double(), k.double(), float(scale), labels, True)
        ref = dense_fwd(q, k, scale, labels, True)  # torch's own matmul, in TF32 too
        # TF32 keeps 10 mantissa bits, as float16 does: float16's slack applies
        for name, o, r, g in zip(("row_lse", "col_lse", "pos"), out, ref, gt):
            assert_relative_rule(o, r, g, torch.float16, f"tf32 {name}")
        _check_backward(q, k, scale, labels, _upstream("all", 257, 130), tol_dtype=torch.float16, tag="tf32 ")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@gpu
def test_tf32_decision_under_the_new_precision_api(cuda_kernels):
    # torch >= 2.9: with only the new API set, the legacy getter allowTF32CuBLAS() raises; the binding
    # must still run, and take the tf32 path exactly when the new API asks for it.
    if not hasattr(torch.backends, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    q, k = _features(257, 130, 136, torch.float32, seed=4)
    labels, scale = _labels("labels", 257, 130), _scale(30.0)

    def run(precision):
        torch.backends.cuda.matmul.fp32_precision = precision
        try:
            return _ops().lse_fwd(q, k, scale, labels, None, None, False, True)
        finally:
            torch.backends.cuda.matmul.fp32_precision = "none"
    exact, tf32 = run("ieee"), run("tf32")
    default = _ops().lse_fwd(q, k, scale, labels, None, None, False, True)  # torch's default: exact fp32
    assert all(torch.equal(a, b) for a, b in zip(exact, default))
    assert not all(torch.equal(a, b) for a, b in zip(exact, tf32)), "fp32_precision='tf32' did not select tf32"


# ---------------------------------------------------------------------------------------------
# determinism, alignment, memory, edge cases
# ---------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bitwise_reproducible(cuda_kernels, dtype):
    prev, prev_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    q, k = _features(300, 520, 72, dtype, seed=11)
    scale, labels = _scale(50.0), _labels("labels", 300, 520)
    gr, gc, gp = _upstream("all", 300, 520)
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        f1 = _ops().lse_fwd(q, k, scale, labels, None, None, False, True)
        f2 = _ops().lse_fwd(q, k, scale, labels, None, None, False, True)
        b1 = _ops().lse_bwd(q, k, scale, labels, None, None, False, f1[0], f1[1], gr, gc, gp)
        b2 = _ops().lse_bwd(q, k, scale, labels, None, None, False, f1[0], f1[1], gr, gc, gp)
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
    for a, b in zip(f1 + b1, f2 + b2):
        assert torch.equal(a, b)
    # the atomic (default) path agrees with the two-pass one up to summation order
    b3 = _ops().lse_bwd(q, k, scale, labels, None, None, False, f1[0], f1[1], gr, gc, gp)
    for a, b in zip(b1, b3):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_unaligned_storage_matches_aligned(cuda_kernels, dtype):
    # base pointers one element past a 16-byte boundary force the synchronous load path
    n, m, d = 130, 70, 64
    q, k = _features(n, m, d, dtype, seed=12)
    qs = torch.empty(n * d + 1, dtype=dtype, device=DEVICE)[1:].view(n, d)
    ks = torch.empty(m * d + 1, dtype=dtype, device=DEVICE)[1:].view(m, d)
    qs.copy_(q)
    ks.copy_(k)
    assert qs.is_contiguous() and qs.data_ptr() % 16 != 0
    scale, labels = _scale(40.0), _labels("labels", n, m)
    gr, gc, gp = _upstream("all", n, m)
    prev, prev_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        fa = _ops().lse_fwd(q, k, scale, labels, None, None, False, True)
        fu = _ops().lse_fwd(qs, ks, scale, labels, None, None, False, True)
        ba = _ops().lse_bwd(q, k, scale, labels, None, None, False, fa[0], fa[1], gr, gc, gp)
        bu = _ops().lse_bwd(qs, ks, scale, labels, None, None, False, fa[0], fa[1], gr, gc, gp)
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
    for a, b in zip(fa + ba, fu + bu):
        assert torch.equal(a, b)


@gpu
def test_no_upstream_gradient_gives_zeros(cuda_kernels):
    q, k = _features(37, 130, 40, torch.bfloat16)
    f = _ops().lse_fwd(q, k, _scale(10.0), None, None, None, False, False)
    gq, gk = _ops().lse_bwd(q, k, _scale(10.0), None, None, None, False, f[0], f[1], None, None, None)
    assert gq.shape == (37, 40) and gk.shape == (130, 40)
    assert not gq.any() and not gk.any()


@gpu
@pytest.mark.parametrize("compute_col", [True, False], ids=["col", "nocol"])
def test_no_n_by_m_allocation(cuda_kernels, compute_col):
    n = m = 8192
    d = 64
    q, k = _features(n, m, d, torch.bfloat16)
    scale = _scale(20.0)
    gr, gc, gp = _upstream("all", n, m)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    f = _ops().lse_fwd(q, k, scale, None, None, None, False, compute_col)
    _ops().lse_bwd(q, k, scale, None, None, None, False, f[0], f[1], gr, gc if compute_col else None, gp)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # the column partials are N/64·M·8 bytes (8 MiB here); one float32 N×M matrix would be 256 MiB
    assert extra < n * m * 4 // 8, f"peak extra allocation {extra / 2**20:.1f} MiB"


@gpu
@pytest.mark.parametrize("labels_kind", ["diag", "labels"])
def test_forward_in_row_groups_is_bitwise_the_single_pass(cuda_kernels, monkeypatch, labels_kind):
    # A tiny partials budget forces one 64-row block per group (5 groups at N = 300): every group's
    # column partials are folded into the running (max, sum) in row-block order, the same operations
    # in the same order as the single pass, so the outputs must match bit for bit.
    n, m, d = 300, 257, 40
    q, k = _features(n, m, d, torch.bfloat16, seed=3)
    labels = _labels(labels_kind, n, m)
    s = _scale(30.0)
    monkeypatch.delenv("CK_CUDA_PARTIAL_MB", raising=False)
    single = _ops().lse_fwd(q, k, s, labels, None, None, False, True)
    monkeypatch.setenv("CK_CUDA_PARTIAL_MB", "0.001")  # 1048 bytes < one row block's 257·8
    grouped = _ops().lse_fwd(q, k, s, labels, None, None, False, True)
    for a, b in zip(single, grouped):
        assert torch.equal(a, b)
    gt = dense_fwd(q.double(), k.double(), 30.0, labels, True)
    ref = dense_fwd(q, k, s.to(q.dtype), labels, True)
    for name, o, r, g in zip(("row_lse", "col_lse", "pos"), grouped, ref, gt):
        assert_relative_rule(o, r, g, q.dtype, name)


@gpu
@pytest.mark.parametrize("value", ["0", "-1", "lots", "1MB"])
def test_partial_budget_env_rejects_nonsense(cuda_kernels, monkeypatch, value):
    q, k = _features(7, 9, 5, torch.float32)
    monkeypatch.setenv("CK_CUDA_PARTIAL_MB", value)
    with pytest.raises(RuntimeError, match="CK_CUDA_PARTIAL_MB"):
        _ops().lse_fwd(q, k, _scale(1.0), None, None, None, False, True)


@gpu
def test_one_row_with_ignored_stride(cuda_kernels):
    # torch ignores the stride of a size-1 dimension: (D, 1).T is a "contiguous" (1, D) tensor whose
    # stride(0) is 1 < D. The binding must not read that stride as the row pitch.
    d = 48
    q = torch.randn(d, 1, device=DEVICE).T
    assert q.is_contiguous() and q.stride(0) < d
    k = torch.randn(5, d, device=DEVICE)
    s = _scale(2.0)
    plain = torch.empty(1, d, device=DEVICE).copy_(q)  # the same values with the usual strides
    assert plain.stride() == (d, 1)
    out = _ops().lse_fwd(q, k, s, None, None, None, False, True)
    want = _ops().lse_fwd(plain, k, s, None, None, None, False, True)
    for a, b in zip(out, want):
        assert torch.equal(a, b)
    one = torch.ones(1, device=DEVICE)
    got_grads = _ops().lse_bwd(q, k, s, None, None, None, False, out[0], out[1], one, None, None)
    want_grads = _ops().lse_bwd(plain, k, s, None, None, None, False, out[0], out[1], one, None, None)
    for a, b in zip(got_grads, want_grads):
        assert torch.equal(a, b)


@gpu
def test_large_logits_finite(cuda_kernels):
    q, k = _features(130, 257, 64, torch.float16, kind="raw", seed=2)
    q, k = q * 8, k * 8  # |S| ~ 100·64·sqrt(64)
    out = _ops().lse_fwd(q, k, _scale(100.0), _labels("labels", 130, 257), None, None, False, True)
    assert all(bool(torch.isfinite(o).all()) for o in out)


@gpu
def test_errors_name_the_problem(cuda_kernels):
    q, k = _features(7, 9, 5, torch.float32)
    s = _scale(1.0)
    with pytest.raises(RuntimeError, match="float64"):
        _ops().lse_fwd(q.double(), k.double(), s, None, None, None, False, True)
    with pytest.raises(RuntimeError, match="M >= N"):
        _ops().lse_fwd(k, q, s, None, None, None, False, True)
    with pytest.raises(RuntimeError, match="feature dims"):
        _ops().lse_fwd(q, k[:, :4].contiguous(), s, None, None, None, False, True)
    with pytest.raises(RuntimeError, match="scale"):
        _ops().lse_fwd(q, k, s.double(), None, None, None, False, True)
    with pytest.raises(RuntimeError, match="int64"):
        _ops().lse_fwd(q, k, s, torch.zeros(7, dtype=torch.int32, device=DEVICE), None, None, False, True)
    f = _ops().lse_fwd(q, k, s, None, None, None, False, False)
    with pytest.raises(RuntimeError, match="col_lse"):  # grad_col without a column LSE
        _ops().lse_bwd(q, k, s, None, None, None, False, f[0], f[1], None, torch.ones(9, device=DEVICE), None)


@gpu
def test_exclude_self_and_class_positives_not_implemented(cuda_kernels):
    q, k = _features(7, 9, 5, torch.float32)
    s = _scale(1.0)
    row_classes = torch.zeros(7, dtype=torch.long, device=DEVICE)
    col_classes = torch.zeros(9, dtype=torch.long, device=DEVICE)
    row_lse, col_lse, pos, pos_count = _ops().lse_fwd(q, k, s, None, None, None, False, True)
    assert pos_count.shape == (0,) and pos_count.dtype == torch.float32 and pos_count.device == q.device
    one = torch.ones(7, device=DEVICE)
    for rc, cc, excl in [(None, None, True), (row_classes, col_classes, False), (row_classes, None, False),
                         (None, col_classes, False), (row_classes, col_classes, True)]:
        with pytest.raises(RuntimeError, match="not implemented"):
            _ops().lse_fwd(q, k, s, None, rc, cc, excl, True)
        with pytest.raises(RuntimeError, match="not implemented"):
            _ops().lse_bwd(q, k, s, None, rc, cc, excl, row_lse, col_lse, one, None, None)


# ---------------------------------------------------------------------------------------------
# public API: reference (float64) and triton
# ---------------------------------------------------------------------------------------------

def _clip_with_grads(img, txt, scale, backend):
    img, txt, scale = leaf(img), leaf(txt), leaf(scale)
    loss = ck.clip_loss(img, txt, scale, backend=backend)
    grads = torch.autograd.grad(loss, (img, txt, scale))
    return [loss.detach(), *grads]


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,d", [(1, 7), (37, 130), (257, 64)])
def test_clip_loss_against_reference(cuda_kernels, n, d, dtype):
    img, txt = _features(n, n, d, dtype, seed=n + d)
    out = _clip_with_grads(img, txt, _scale(14.0), "cuda")
    gt = _clip_with_grads(img.double(), txt.double(), _scale(14.0).double(), "reference")
    ref = _clip_with_grads(img, txt, _scale(14.0).to(dtype), "reference")
    for name, o, r, g in zip(("loss", "grad_image", "grad_text", "grad_scale"), out, ref, gt):
        assert_relative_rule(o, r, g, dtype, name)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,d", [(7, 7), (130, 37), (257, 512)])
def test_agrees_with_triton(cuda_kernels, n, d, dtype):
    ok, why = backend_availability("triton")
    if not ok:
        pytest.skip(f"backend 'triton' unavailable: {why}")
    img, txt = _features(n, n, d, dtype, seed=2 * n + d)
    cuda = _clip_with_grads(img, txt, _scale(30.0), "cuda")
    triton = _clip_with_grads(img, txt, _scale(30.0), "triton")
    gt = _clip_with_grads(img.double(), txt.double(), _scale(30.0).double(), "reference")
    # the cuda backend is at most twice as far from float64 as triton is (plus the dtype's slack)
    for name, c, t, g in zip(("loss", "grad_image", "grad_text", "grad_scale"), cuda, triton, gt):
        assert_relative_rule(c, t, g, dtype, f"cuda vs triton {name}")


# ---------------------------------------------------------------------------------------------
# large: N = M = 32768, D = 512 (float64 ground truth in row blocks)
# ---------------------------------------------------------------------------------------------

def _blocked_fwd(q, k, s, dtype, block=2048):
    """(fwd, bwd) of the dense formulas in `dtype`, evaluated in row blocks (never N×M at once)."""
    qd, kd, sd = q.to(dtype), k.to(dtype), s.to(dtype)
    n, m = q.shape[0], k.shape[0]
    row = torch.empty(n, dtype=dtype, device=q.device)
    pos = torch.empty(n, dtype=dtype, device=q.device)
    col = torch.full((m,), float("-inf"), dtype=dtype, device=q.device)
    for a in range(0, n, block):
        S = sd * (qd[a:a + block] @ kd.T)
        row[a:a + block] = torch.logsumexp(S, dim=1)
        col = torch.logaddexp(col, torch.logsumexp(S, dim=0))
        pos[a:a + block] = S.diagonal(offset=a)
    return (row, col, pos)


def _blocked_bwd(q, k, s, r, c, gr, gc, gp, dtype, block=2048):
    qd, kd, sd = q.to(dtype), k.to(dtype), s.to(dtype)
    r, c, gr, gc, gp = _cast((r, c, gr, gc, gp), dtype)
    gq = torch.empty_like(qd)
    gk = torch.zeros_like(kd)
    for a in range(0, q.shape[0], block):
        S = sd * (qd[a:a + block] @ kd.T)
        G = gr[a:a + block, None] * torch.exp(S - r[a:a + block, None]) + gc[None, :] * torch.exp(S - c[None, :])
        G.diagonal(offset=a).add_(gp[a:a + block])
        gq[a:a + block] = sd * (G @ kd)
        gk += sd * (G.T @ qd[a:a + block])
    return gq, gk


@gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_large_32768(cuda_kernels, dtype):
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with >= 40 GiB")
    n = m = 32768
    d = 512
    q, k = _features(n, m, d, dtype, seed=123)
    scale = _scale(100.0)
    out = _ops().lse_fwd(q, k, scale, None, None, None, False, True)
    gt = _blocked_fwd(q, k, scale.double(), torch.float64)
    ref = _blocked_fwd(q, k, scale, dtype)
    for name, o, r, g in zip(("row_lse", "col_lse", "pos"), out, ref, gt):
        assert_relative_rule(o, r, g, dtype, f"N={n} {name}")
    del ref
    gr, gc, gp = _upstream("all", n, m)
    r32, c32 = gt[0].float(), gt[1].float()
    bq, bk = _ops().lse_bwd(q, k, scale, None, None, None, False, r32, c32, gr, gc, gp)
    gtq, gtk = _blocked_bwd(q, k, scale.double(), r32, c32, gr, gc, gp, torch.float64)
    refq, refk = _blocked_bwd(q, k, scale, r32, c32, gr, gc, gp, dtype)
    assert_relative_rule(bq, refq, gtq, dtype, f"N={n} grad_query")
    assert_relative_rule(bk, refk, gtk, dtype, f"N={n} grad_keys")


def test_rel_atol_table_covers_cuda_dtypes():
    assert all(dt in REL_ATOL for dt in DTYPES)
