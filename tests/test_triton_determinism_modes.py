"""Which Triton backward mode runs when determinism is asked for (host logic, no kernel launch).

Under ``torch.use_deterministic_algorithms(True)`` (or ``CK_TRITON_DETERMINISTIC=1``) the backward
must never be the atomic ``fused`` mode, even when ``CK_TRITON_BWD=fused`` forces it — the same
rule as the forward's forced ``atomic`` column reduction (docs/determinism.md).
"""
import pytest
import torch

pytest.importorskip("triton")

from contrastive_kernels.backends.triton import tuning as tu  # noqa: E402


@pytest.mark.parametrize("forced", ["auto", "fused", "two_pass", "gemm"])
@pytest.mark.parametrize("d_single", [True, False])
def test_deterministic_request_never_runs_the_atomic_backward(forced, d_single, monkeypatch):
    monkeypatch.setenv("CK_TRITON_BWD", forced)
    monkeypatch.delenv("CK_TRITON_DETERMINISTIC", raising=False)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        mode = tu.bwd_mode(tu.current_tuning(), d_single)
    finally:
        torch.use_deterministic_algorithms(previous)
    expected = forced if forced in ("two_pass", "gemm") else ("two_pass" if d_single else "gemm")
    assert mode == expected


def test_forced_mode_holds_without_the_request(monkeypatch):
    monkeypatch.delenv("CK_TRITON_DETERMINISTIC", raising=False)
    with tu.tuning(bwd_mode="fused", deterministic=False):
        assert tu.bwd_mode(tu.current_tuning(), False) == "fused"
    with tu.tuning(bwd_mode="fused", deterministic=True):
        assert tu.bwd_mode(tu.current_tuning(), True) == "two_pass"
