"""Shared test utilities: backend lists, the relative-rule comparison, the open_clip loader."""
from __future__ import annotations

import os
from typing import Optional

import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels import reference

IN_CI = bool(os.environ.get("CI"))


def backend_availability(name: str) -> tuple[bool, str]:
    """``ck.availability`` that turns an exception (e.g. a missing loader module) into a reason."""
    try:
        return ck.availability(name)
    except Exception as exc:  # noqa: BLE001 - reported as the reason, never swallowed silently
        return False, f"availability({name!r}) raised {type(exc).__name__}: {exc}"


def cpu_backends() -> list[str]:
    """CPU-runnable backends usable right now: reference, chunked, and cpu when built.

    In CI the native ``cpu`` backend is always listed (CI builds it), so its absence fails the
    tests that use it (see ``require_backend``) instead of silently shrinking the matrix.
    """
    names = ["reference", "chunked"]
    if IN_CI or backend_availability("cpu")[0]:
        names.append("cpu")
    return names


def require_backend(name: str) -> None:
    """Skip (locally) or fail (CI) when a backend is not usable on this machine."""
    ok, why = backend_availability(name)
    if ok:
        return
    message = f"backend {name!r} unavailable: {why}"
    if IN_CI and name in ("reference", "chunked", "cpu", "triton"):
        pytest.fail(message + " (CI builds the native extension and installs triton for its "
                    "interpreter, so this is a failure)")
    pytest.skip(message)


def assert_cuda_kernels_lack(monkeypatch, feature: str) -> None:
    """The CUDA C++ kernels lack ``feature``: on a (pretended) CUDA device an explicit request names
    it in a NotImplementedError, and ``auto`` picks chunked (triton made unavailable)."""
    from contrastive_kernels import backends
    monkeypatch.setattr(backends, "availability", lambda name: (name != "triton", ""))
    monkeypatch.setattr(backends, "device_ok", lambda name, device: (True, ""))
    dev = torch.device("cuda")
    assert backends.resolve("auto", dev, torch.float32, feature) == "chunked"
    with pytest.raises(NotImplementedError, match=feature):
        backends.resolve("cuda", dev, torch.float32, feature)


def triton_interpreter_module():
    """The gate of a module of Triton tests on CPU tensors: returns triton, or skips the module
    when triton is absent or its interpreter is off (conftest.py turns it on where no GPU is)."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":  # CPU tensors: the interpreter only
        pytest.skip("these tests run CPU tensors under triton's interpreter (TRITON_INTERPRET=1)",
                    allow_module_level=True)
    return triton


# ---------------------------------------------------------------------------------------------
# tolerances
# ---------------------------------------------------------------------------------------------

# Absolute slack of the relative rule, as a fraction of the largest |gt| in the tensor compared.
# Elementwise, the same-dtype PyTorch reference can land exactly on gt by luck while the kernel is
# a rounding step away, so the rule needs a few output ulps of slack: float32 outputs come from a
# blocked reduction over at most a few hundred terms (2^-17 ≈ 100 ulps of the largest value);
# 16-bit gradients are float32 results rounded once to the input dtype (half an ulp: 2^-11 for
# float16, 2^-8 for bfloat16), doubled for the inputs' own rounding inside the tile products.
REL_ATOL = {
    torch.float64: 1e-12,
    torch.float32: 2.0 ** -17,
    torch.float16: 2.0 ** -10,
    torch.bfloat16: 2.0 ** -7,
}

# float64 paths against the float64 reference: both sum the same terms in a different order.
# The absolute floor covers quantities that are exactly 0 in exact arithmetic (N = 1: the loss is
# lse − pos of one logit), where both sides hold a few ulps of terms of size O(scale).
F64_RTOL = 1e-10
F64_ATOL = 1e-13


def assert_close_f64(out: torch.Tensor, gt: torch.Tensor, name: str = "", rtol: float = F64_RTOL):
    """|out − gt| ≤ rtol·max|gt| elementwise: relative to the tensor's scale, so gradient entries
    that cancel to ~0 are judged against the size of their neighbours, not of themselves."""
    assert out.shape == gt.shape, f"{name}: shape {tuple(out.shape)} vs {tuple(gt.shape)}"
    out, gt = out.detach().double(), gt.detach().double()
    scale = max(float(gt.abs().max()) if gt.numel() else 0.0, 1e-30)
    err = (out - gt).abs()
    bound = rtol * scale + F64_ATOL
    bad = err > bound
    assert not bool(bad.any()), (
        f"{name}: {int(bad.sum())}/{bad.numel()} elements off; max |err| {float(err.max()):.3e}, "
        f"max|gt| {scale:.3e}, rtol {rtol:g}")


def _row_max(x: torch.Tensor) -> torch.Tensor:
    """Each element replaced by the max over its row (2-D and higher: the last dim; 0-/1-D: the
    whole tensor, whose elements are then the rows' statistics)."""
    if x.dim() >= 2:
        return x.amax(dim=-1, keepdim=True).expand_as(x)
    return x.amax().expand_as(x) if x.numel() else x


def assert_relative_rule(out: torch.Tensor, ref_same: torch.Tensor, gt: torch.Tensor,
                         dtype: torch.dtype, name: str = "", factor: float = 2.0):
    """The relative rule (the project's shared/docs/design.md), judged against the float64 truth ``gt``:

        |out − gt| ≤ factor·max(|ref_same − gt|, max over the row of |ref_same − gt|) + atol

    i.e. the kernel may not be more than ``factor``× worse than PyTorch itself in the same dtype
    (``ref_same``) on the same output row. The row maximum is there because two correct
    implementations that sum in different orders (a tiled kernel vs cuBLAS/MKL) make independent
    rounding errors of the same size: elementwise, the reference lands on the truth by luck at some
    elements, and a kernel a rounding step away would fail there although it is as accurate. One
    rule for every backend; the per-dtype ``atol`` (REL_ATOL) covers outputs that are exactly 0.
    """
    assert out.shape == gt.shape == ref_same.shape, (
        f"{name}: shapes {tuple(out.shape)}, {tuple(ref_same.shape)}, {tuple(gt.shape)}")
    out, ref_same, gt = (t.detach().double() for t in (out, ref_same, gt))
    assert bool(torch.isfinite(out).all()), f"{name}: non-finite output"
    scale = float(gt.abs().max()) if gt.numel() else 0.0
    atol = REL_ATOL[dtype] * max(scale, 1e-6)
    err = (out - gt).abs()
    ref_err = (ref_same - gt).abs().nan_to_num(nan=float("inf"), posinf=float("inf"))
    bound = factor * torch.maximum(ref_err, _row_max(ref_err)) + atol
    bad = err > bound
    assert not bool(bad.any()), (
        f"{name} [{dtype}]: {int(bad.sum())}/{bad.numel()} elements break the relative rule; "
        f"max |out-gt| {float(err.max()):.3e}, max |ref-gt| {float(ref_err.max()):.3e}, "
        f"atol {atol:.3e}")


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def make_features(n: int, m: int, d: int, *, dtype=torch.float64, seed: int = 0, norm: float = 1.0,
                  normalize: bool = True):
    """(query (n, d), keys (m, d)) in float64 with rows of length ``norm``, rounded to ``dtype``
    and back so the float64 ground truth sees exactly the low-precision values."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=torch.float64)
    k = torch.randn(m, d, generator=g, dtype=torch.float64)
    if normalize:
        q = norm * q / q.norm(dim=1, keepdim=True)
        k = norm * k / k.norm(dim=1, keepdim=True)
    return q.to(dtype).double(), k.to(dtype).double()


def make_labels(n: int, m: int, seed: int = 1, repeats: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if repeats:
        lab = torch.randint(0, m, (n,), generator=g)
        if n > 1:
            lab[-1] = lab[0]  # at least one repeated positive
        return lab
    return torch.randperm(m, generator=g)[:n]


def leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def grads_of(out: torch.Tensor, inputs, upstream: Optional[torch.Tensor] = None):
    """Gradients of ``out`` (scalar, or contracted with ``upstream``) w.r.t. ``inputs``."""
    if upstream is not None:
        out = (out * upstream.to(out.dtype)).sum()
    return torch.autograd.grad(out, inputs, allow_unused=True)


# ---------------------------------------------------------------------------------------------
# open_clip
# ---------------------------------------------------------------------------------------------

def load_open_clip_loss():
    """open_clip's ``loss`` module by file path: (module, None) or (None, reason)."""
    from contrastive_kernels._peers import load_open_clip_loss as load

    module, why = load()
    return module, (why or None)


def open_clip_loss_module():
    """The loaded module, or skip (locally) / fail (CI) with the reason."""
    module, why = load_open_clip_loss()
    if module is None:
        if IN_CI:
            pytest.fail(f"open_clip is required in CI: {why}")
        pytest.skip(why)
    return module


__all__ = [name for name in dir() if not name.startswith("_")] + ["reference"]


# ---------------------------------------------------------------------------------------------
# SIMD paths of the native CPU kernels
# ---------------------------------------------------------------------------------------------

ISA_ORDER = ("scalar", "avx2", "avx512", "avx512_bf16")


def grad_logits_dtype(dtype: torch.dtype):
    """What the native CPU kernels round G to for their gradient products: bfloat16 on the bf16
    path (bfloat16 inputs, cpu_isa() avx512_bf16), nothing otherwise. A `same` reference of the
    relative rule that rounds G the same way (reference.lse_op / sigmoid_op grad_logits_dtype)
    holds the bf16 path to the accuracy of its own model: float32 statistics, G rounded to bf16,
    float32 sums."""
    bf16_units = dtype == torch.bfloat16 and torch.ops.ck_native.cpu_isa() == "avx512_bf16"
    return torch.bfloat16 if bf16_units else None


def select_isa(monkeypatch, isa: str) -> None:
    """Run the native CPU kernels on SIMD path ``isa`` (CK_CPU_ISA) and prove it is the one that
    runs: a CPU without it would silently lower the path and re-test a lower one, so skip there."""
    monkeypatch.delenv("CK_CPU_ISA", raising=False)
    best = torch.ops.ck_native.cpu_isa()
    if ISA_ORDER.index(isa) > ISA_ORDER.index(best):
        pytest.skip(f"this CPU's best SIMD path is {best}: {isa} cannot run here")
    monkeypatch.setenv("CK_CPU_ISA", isa)
    assert torch.ops.ck_native.cpu_isa() == isa, f"asked for {isa}, running {torch.ops.ck_native.cpu_isa()}"
