"""Triton backend callables (contrastive_kernels/backends/triton) against a dense float64 formula.

On a CPU-only machine these run in triton's interpreter (TRITON_INTERPRET=1, set by conftest.py and
defensively here): float32/float16 only, sides <= ~256. The GPU-only tests at N = M = 32768 are
marked ``gpu`` and skipped without CUDA.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from contrastive_kernels.backends import triton as tk  # noqa: E402
from contrastive_kernels.backends.triton import tuning as tl_lse  # noqa: E402
from contrastive_kernels import reference  # noqa: E402
from helpers import assert_relative_rule  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

DTYPES = (torch.float32, torch.float16)  # the interpreter computes bfloat16 wrongly


def lse_fwd_triton(q, k, s, labels, compute_col):
    """The plain log-sum-exp op (no exclusion, no classes): (row_lse, col_lse, pos)."""
    return tk.lse_fwd(q, k, s, labels, None, None, False, compute_col)[:3]


def lse_bwd_triton(q, k, s, labels, r, c, gr, gc, gp):
    return tk.lse_bwd(q, k, s, labels, None, None, False, r, c, gr, gc, gp)


def dense(q, k, s, labels, compute_col, gr, gc, gp, dtype):
    """Every output of the op family, materialising S in ``dtype`` (float64: the ground truth):
    the one dense oracle, reference.lse_op."""
    r, c, pos, _, gq, gk = reference.lse_op(q, k, s, labels, grad_row=gr, grad_col=gc,
                                            grad_pos=gp, dtype=dtype)
    return r, (c if compute_col else c.new_zeros(0)), pos, gq, gk


def inputs(N, M, D, dtype, *, seed=0, labels="auto", norm=1.0, normalize=True, scale=10.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, D, generator=g, dtype=torch.float64)
    k = torch.randn(M, D, generator=g, dtype=torch.float64)
    if normalize:
        q = norm * q / q.norm(dim=1, keepdim=True)
        k = norm * k / k.norm(dim=1, keepdim=True)
    q, k = q.to(dtype).to(DEV), k.to(dtype).to(DEV)
    if labels == "auto":
        labels = "rand" if M < N else None
    if labels == "rand":
        labels = torch.randint(0, M, (N,), generator=g)
        labels[-1] = M - 1  # a positive in the last (ragged) column tile
        labels = labels.to(DEV)
    grads = [torch.randn(n, generator=g, dtype=torch.float64).to(torch.float32).to(DEV) / n
             for n in (N, M, N)]
    s = torch.tensor(scale, dtype=torch.float32, device=DEV)
    return q, k, s, labels, grads


def run(q, k, s, labels, compute_col, gr, gc, gp):
    r, c, pos = lse_fwd_triton(q, k, s, labels, compute_col)
    gq, gk = lse_bwd_triton(q, k, s, labels, r, c, gr, gc if compute_col else None, gp)
    return r, c, pos, gq, gk


def check(q, k, s, labels, compute_col, gr, gc, gp, dtype, outs=None):
    outs = outs if outs is not None else run(q, k, s, labels, compute_col, gr, gc, gp)
    gc = gc if compute_col else None
    sv = float(s)
    gt = dense(q.double(), k.double(), sv, labels, compute_col, gr, gc, gp, torch.float64)
    same = dense(q, k, sv, labels, compute_col, gr, gc, gp, dtype)
    names = ("row_lse", "col_lse", "pos", "grad_query", "grad_keys")
    for name, o, ref, g in zip(names, outs, same, gt):
        assert o.dtype == torch.float32, f"{name}: {o.dtype}"
        assert o.shape == g.shape, f"{name}: {tuple(o.shape)} vs {tuple(g.shape)}"
        if o.numel():
            assert_relative_rule(o.cpu(), ref.cpu(), g.cpu(), dtype, name=name)
    return outs


SHAPES = [(1, 1, 1), (1, 7, 37), (7, 1, 130), (7, 7, 7), (37, 130, 7), (130, 37, 37),
          (130, 130, 130), (37, 37, 1), (130, 7, 37), (7, 130, 130)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,M,D", SHAPES)
def test_against_dense(N, M, D, dtype):
    q, k, s, labels, (gr, gc, gp) = inputs(N, M, D, dtype)
    check(q, k, s, labels, True, gr, gc, gp, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,M,D", [(37, 130, 37), (130, 130, 7)])
def test_labels(N, M, D, dtype):
    q, k, s, labels, (gr, gc, gp) = inputs(N, M, D, dtype, labels="rand", seed=3)
    check(q, k, s, labels, True, gr, gc, gp, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compute_col_false(dtype):
    q, k, s, labels, (gr, gc, gp) = inputs(70, 37, 37, dtype, seed=4)
    r, c, pos = lse_fwd_triton(q, k, s, labels, False)
    assert c.shape == (0,)
    gq, gk = lse_bwd_triton(q, k, s, labels, r, c, gr, None, gp)
    check(q, k, s, labels, False, gr, gc, gp, dtype, outs=(r, c, pos, gq, gk))


@pytest.mark.parametrize("which", ["row", "col", "pos", "row+pos", "col+pos", "row+col"])
def test_grad_none(which):
    q, k, s, labels, (gr, gc, gp) = inputs(37, 70, 20, torch.float32, seed=5)
    r, c, pos = lse_fwd_triton(q, k, s, labels, True)
    gr = gr if "row" in which else None
    gc = gc if "col" in which else None
    gp = gp if "pos" in which else None
    # col_lse is not read when grad_col is None: poison it
    c_in = c if gc is not None else torch.full_like(c, float("nan"))
    gq, gk = lse_bwd_triton(q, k, s, labels, r, c_in, gr, gc, gp)
    check(q, k, s, labels, True, gr, gc, gp, torch.float32, outs=(r, c, pos, gq, gk))


def test_all_grads_none_is_zero():
    q, k, s, labels, _ = inputs(7, 9, 5, torch.float32)
    r, c, _ = lse_fwd_triton(q, k, s, labels, True)
    gq, gk = lse_bwd_triton(q, k, s, labels, r, c, None, None, None)
    assert gq.shape == (7, 5) and gk.shape == (9, 5)
    assert not gq.any() and not gk.any()


# Host-side variants: each one takes a different kernel path (column splits with atomic dQ, a
# D-chunk loop, the CAS column merge, the row-chunked partial buffer, two-pass and gemm backward,
# small row blocks). M = 600 so that three 256-aligned column splits exist.
VARIANTS = {
    "split": dict(split=3),
    "chunked_d": dict(fwd_max_single_d=16, bwd_max_single_d=16, chunk_d=16),
    "split_chunked_d": dict(split=3, fwd_max_single_d=16, bwd_max_single_d=16, chunk_d=16),
    "col_atomic": dict(col_reduce="atomic"),
    "partial_multi_launch": dict(col_reduce="partial", partial_budget_bytes=1),
    "two_pass": dict(bwd_mode="two_pass", split=3),
    "gemm": dict(bwd_mode="gemm", gemm_min_rows=16, gemm_budget_bytes=1),
    "block16": dict(fwd_block_m=16, bwd_block_m=16),
    "deterministic": dict(deterministic=True, partial_budget_bytes=1, split=2),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants(variant, dtype):
    N, M, D = (70, 600, 37) if "split" in variant or variant in ("two_pass", "deterministic") else (70, 90, 37)
    q, k, s, labels, (gr, gc, gp) = inputs(N, M, D, dtype, labels="rand", seed=6)
    with tl_lse.tuning(**VARIANTS[variant]):
        outs = run(q, k, s, labels, True, gr, gc, gp)
    check(q, k, s, labels, True, gr, gc, gp, dtype, outs=outs)


@pytest.mark.parametrize("variant", [dict(), dict(split=2, bwd_max_single_d=16, chunk_d=16)],
                         ids=["two_pass", "split_gemm"])
def test_deterministic_bitwise(variant):
    q, k, s, labels, (gr, gc, gp) = inputs(70, 600, 37, torch.float32, labels="rand", seed=7)
    with tl_lse.tuning(deterministic=True, **variant):
        a = run(q, k, s, labels, True, gr, gc, gp)
        b = run(q, k, s, labels, True, gr, gc, gp)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("scale,norm", [(100.0, 1.0), (30.0, 4.0)])
def test_large_logits(scale, norm):
    # |S| up to 480: any unshifted exp would overflow float32
    q, k, s, labels, (gr, gc, gp) = inputs(37, 70, 20, torch.float32, scale=scale, norm=norm, seed=8)
    outs = run(q, k, s, labels, True, gr, gc, gp)
    for o in outs:
        assert bool(torch.isfinite(o).all())
    check(q, k, s, labels, True, gr, gc, gp, torch.float32, outs=outs)


def test_unnormalised_float16_small_grads():
    # grads ~1/(2N·M)-sized entries of G would flush to zero in fp16 without the power-of-two rescale
    q, k, s, labels, (gr, gc, gp) = inputs(37, 70, 20, torch.float16, normalize=False, scale=0.5)
    gr, gc, gp = gr * 1e-4, gc * 1e-4, gp * 1e-4
    check(q, k, s, labels, True, gr, gc, gp, torch.float16)


@pytest.mark.parametrize("N,M,D", [(20, 30, 16), (37, 130, 7), (130, 37, 37)])
def test_bfloat16_against_the_oracle(N, M, D):
    # bfloat16 inputs against the float64 truth by the relative rule (the dense formula in bf16
    # as the yardstick), not against the backend itself: under the interpreter the inputs are
    # upcast first, on a GPU the tiles run in bf16; either way the answer must be right.
    q, k, s, labels, (gr, gc, gp) = inputs(N, M, D, torch.bfloat16)
    check(q, k, s, labels, True, gr, gc, gp, torch.bfloat16)


def test_available():
    ok, why = tk.available()
    assert isinstance(ok, bool) and isinstance(why, str) and why
    assert ok


def test_tuning_validation():
    with tl_lse.tuning(col_reduce="bogus"):
        with pytest.raises(ValueError, match="col_reduce"):
            tl_lse.current_tuning()
    with pytest.raises(ValueError, match="unknown tuning"):
        with tl_lse.tuning(nope=1):
            pass


def test_float64_rejected():
    q = torch.randn(4, 3, dtype=torch.float64, device=DEV)
    with pytest.raises(TypeError, match="float64"):
        lse_fwd_triton(q, q, torch.tensor(1.0, device=DEV), None, True)


@pytest.mark.parametrize("setting, expected", [
    ("", False),                                                  # torch's default: exact fp32
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", True),  # new API alone: the legacy getter raises
    ("torch.backends.fp32_precision = 'tf32'", True),              # new API, global level
    ("torch.backends.cuda.matmul.fp32_precision = 'ieee'", False),
    ("torch.set_float32_matmul_precision('high')", True),          # legacy API
    ("torch.backends.cuda.matmul.allow_tf32 = True", True),
    ("torch.set_float32_matmul_precision('high'); torch.backends.cuda.matmul.allow_tf32 = False", False),
])
def test_fp32_tf32_decision_follows_torch_under_both_apis(setting, expected):
    # The kernels' fp32 dots use tf32 exactly when torch's own fp32 CUDA matmul would. Since torch 2.9
    # torch.get_float32_matmul_precision() raises once the new fp32_precision API was used, so the
    # decision must not go through it (a crash that only a GPU run would have shown).
    new_api = hasattr(torch.backends, "fp32_precision")  # torch >= 2.9
    if not new_api and "fp32_precision" in setting:
        pytest.skip("this torch has no fp32_precision API")

    def restore():
        if new_api:  # back to "unset" at both levels, which also clears the mixed-API state
            torch.backends.fp32_precision = "none"
            torch.backends.cuda.matmul.fp32_precision = "none"
    restore()
    try:
        exec(setting, {"torch": torch})
        assert tl_lse.fp32_matmul_uses_tf32() is expected
    finally:
        restore()
        torch.set_float32_matmul_precision("highest")
    assert tl_lse.fp32_matmul_uses_tf32() is False


# the GPU config list (what tuning.fwd_configs returns outside the interpreter)
_GPU_FWD_CONFIGS = [
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=4),
]


@pytest.mark.parametrize("dtype, block_d, d_single, kept_block_n", [
    # fp32, D = 128 resident: BLOCK_N 128 × 3 stages compiles to 262656 B (offline sm_90 compile,
    # benchmarks/NOTES.md), over the H100's 227 KiB: pruned, the other two stay
    (torch.float32, 128, True, [64, 64]),
    (torch.bfloat16, 128, True, [64, 128, 64]),   # half the bytes: everything fits
    (torch.float32, 64, False, [64, 128, 64]),    # D = 512 chunked: 196608 B at most
])
def test_forward_autotune_prunes_configs_over_shared_memory(monkeypatch, dtype, block_d, d_single, kept_block_n):
    monkeypatch.setattr(tl_lse, "smem_limit", lambda device: 227 * 1024)
    q = torch.empty(8, 8, dtype=dtype)
    kept = tl_lse.prune_fwd_by_smem(_GPU_FWD_CONFIGS, {"Q": q}, BLOCK_M=128, BLOCK_D=block_d,
                                     D_SINGLE=d_single)
    assert [c.kwargs["BLOCK_N"] for c in kept] == kept_block_n


def test_forward_autotune_prune_keeps_smallest_when_none_fits(monkeypatch):
    monkeypatch.setattr(tl_lse, "smem_limit", lambda device: 1024)
    kept = tl_lse.prune_fwd_by_smem(_GPU_FWD_CONFIGS, {"Q": torch.empty(1, 1)}, BLOCK_M=128,
                                     BLOCK_D=128, D_SINGLE=True)
    assert len(kept) == 1 and kept[0] is _GPU_FWD_CONFIGS[0]  # 64 × 3 stages: the smallest

# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------

def _blocked_reference(q, k, s, labels, gr, gc, gp, block=4096):
    """float64 ground truth on the GPU without an N×M float64 matrix: blocks of rows."""
    q64, k64 = q.double(), k.double()
    N, M = q.shape[0], k.shape[0]
    lab = labels if labels is not None else torch.arange(N, device=q.device)
    r = torch.empty(N, dtype=torch.float64, device=q.device)
    c = torch.full((M,), float("-inf"), dtype=torch.float64, device=q.device)
    for i in range(0, N, block):
        S = s * (q64[i:i + block] @ k64.T)
        r[i:i + block] = torch.logsumexp(S, 1)
        c = torch.logaddexp(c, torch.logsumexp(S, 0))
    pos = s * (q64 * k64[lab]).sum(1)
    gq = torch.empty_like(q64)
    gk = torch.zeros_like(k64)
    for i in range(0, N, block):
        S = s * (q64[i:i + block] @ k64.T)
        G = gr.double()[i:i + block, None] * torch.exp(S - r[i:i + block, None])
        G += gc.double()[None, :] * torch.exp(S - c[None, :])
        rows = torch.arange(i, min(N, i + block), device=q.device)
        G[rows - i, lab[rows]] += gp.double()[rows]
        gq[i:i + block] = s * (G @ k64)
        gk += s * (G.T @ q64[i:i + block])
    return r, c, pos, gq, gk


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


GPU_TOL = {torch.bfloat16: (1e-5, 2e-2), torch.float16: (1e-5, 5e-3), torch.float32: (1e-4, 5e-3)}


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_large(dtype):
    N = M = 32768
    D = 512
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(N, D, device="cuda", generator=g), dim=1).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(M, D, device="cuda", generator=g), dim=1).to(dtype)
    s = torch.tensor(100.0, device="cuda")
    gr = torch.full((N,), 1 / (2 * N), device="cuda")
    gc = torch.full((M,), 1 / (2 * N), device="cuda")
    gp = torch.full((N,), -1 / N, device="cuda")
    outs = run(q, k, s, None, True, gr, gc, gp)
    ref = _blocked_reference(q, k, 100.0, None, gr, gc, gp)
    stat_tol, grad_tol = GPU_TOL[dtype]
    if dtype == torch.float32 and tl_lse.fp32_matmul_uses_tf32():
        stat_tol = 2e-3  # tf32 tiles
    for name, o, r in zip(("row_lse", "col_lse", "pos", "grad_query", "grad_keys"), outs, ref):
        tol = stat_tol if name in ("row_lse", "col_lse", "pos") else grad_tol
        assert _rel(o, r) < tol, f"{name} [{dtype}]: relative error {_rel(o, r):.2e} >= {tol}"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("D", [128, 512])
def test_gpu_deterministic(D):
    N = M = 8192
    q = torch.randn(N, D, device="cuda").to(torch.bfloat16)
    k = torch.randn(M, D, device="cuda").to(torch.bfloat16)
    s = torch.tensor(20.0, device="cuda")
    gr, gc, gp = (torch.randn(n, device="cuda") / n for n in (N, M, N))
    with tl_lse.tuning(deterministic=True):
        a = run(q, k, s, None, True, gr, gc, gp)
        b = run(q, k, s, None, True, gr, gc, gp)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_forward_in_several_launches_matches_one(deterministic):
    # On a GPU a launch keeps at least #SMs row blocks of 128 rows, so the multi-launch forward
    # (partials folded into a running (max, sum) after each launch) needs N > 128·#SMs to happen.
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    N, M, D = 128 * sms * 2 + 1000, 4096, 64
    q = torch.randn(N, D, device="cuda").to(torch.bfloat16)
    k = torch.randn(M, D, device="cuda").to(torch.bfloat16)
    s = torch.tensor(20.0, device="cuda")
    with tl_lse.tuning(deterministic=deterministic):
        one = lse_fwd_triton(q, k, s, None, True)
        with tl_lse.tuning(partial_budget_bytes=1):  # 3 launches of #SMs row blocks
            several = lse_fwd_triton(q, k, s, None, True)
    for x, y in zip(several, one):
        # the same merges in the same order: bitwise equal
        assert torch.equal(x, y)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["atomic", "partial"])
def test_gpu_col_reduce_modes_agree(mode):
    N, M, D = 8192, 16384, 256
    q = torch.randn(N, D, device="cuda").to(torch.bfloat16)
    k = torch.randn(M, D, device="cuda").to(torch.bfloat16)
    s = torch.tensor(20.0, device="cuda")
    with tl_lse.tuning(col_reduce="partial"):
        ref = lse_fwd_triton(q, k, s, None, True)
    with tl_lse.tuning(col_reduce=mode):
        out = lse_fwd_triton(q, k, s, None, True)
    for x, y in zip(out, ref):
        assert _rel(x, y) < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_no_quadratic_memory():
    N = M = 32768
    D = 512
    q = torch.randn(N, D, device="cuda").to(torch.bfloat16)
    k = torch.randn(M, D, device="cuda").to(torch.bfloat16)
    s = torch.tensor(50.0, device="cuda")
    gr, gc, gp = (torch.randn(n, device="cuda") / n for n in (N, M, N))
    run(q, k, s, None, True, gr, gc, gp)  # warm-up: autotuning allocates its own buffers
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run(q, k, s, None, True, gr, gc, gp)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < N * M // 4, f"{extra / 2**20:.0f} MiB extra: an O(N·M) buffer crept in"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("D", [128, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_second_wave_families(dtype, D):
    # SupCon (self-excluded class positives), NT-Xent (exclusion + labels) and SigLIP (the sigmoid
    # family) through the public API at N = 8192 against the float64 chunked backend on the GPU
    import contrastive_kernels as ck
    N = 8192
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(N, D, device="cuda", generator=g), dim=1)
    y = torch.nn.functional.normalize(torch.randn(N, D, device="cuda", generator=g) + 0.3 * x, dim=1)
    labels = torch.randint(0, N // 8, (N,), device="cuda", generator=g)
    cases = {
        "supcon": lambda a, b, s, be: ck.supcon_loss(a, labels, s, backend=be),
        "nt_xent": lambda a, b, s, be: ck.nt_xent_loss(a, b, s, backend=be),
        "siglip": lambda a, b, s, be: ck.siglip_loss(a, b, s, -10.0, backend=be),
    }
    stat_tol, grad_tol = GPU_TOL[dtype]
    if dtype == torch.float32 and tl_lse.fp32_matmul_uses_tf32():
        stat_tol = 2e-3
    for name, fn in cases.items():
        outs = []
        for be, dt in (("triton", dtype), ("chunked", torch.float64)):
            a, b = x.to(dt).requires_grad_(), y.to(dt).requires_grad_()
            s = torch.tensor(10.0, device="cuda", dtype=torch.float32 if dt != torch.float64
                             else torch.float64, requires_grad=True)
            loss = fn(a, b, s, be)
            loss.backward()
            outs.append((loss.detach(), a.grad, b.grad if b.grad is not None else torch.zeros_like(b), s.grad))
        (lo, ga, gb, gs), (lr, ra, rb, rs) = outs
        assert bool(torch.isfinite(lo)), name
        assert _rel(lo, lr) < stat_tol, f"{name} loss [{dtype}]: {_rel(lo, lr):.2e}"
        for what, o, r in (("grad a", ga, ra), ("grad b", gb, rb), ("grad scale", gs, rs)):
            if float(r.abs().max()) > 0:
                assert _rel(o, r) < grad_tol, f"{name} {what} [{dtype}]: {_rel(o, r):.2e}"
