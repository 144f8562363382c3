import os
import sys


def _cuda_available() -> bool:
    # torch.cuda.is_available() does not import triton; triton reads TRITON_INTERPRET at import.
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import contrastive_kernels  # noqa: F401
except ImportError:  # not installed: test the checkout
    sys.path.insert(0, _ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

from contrastive_kernels import backends  # noqa: E402
from helpers import require_backend  # noqa: E402

# Small enough that the larger shapes used here (M ≥ 37) are split into several row blocks with a
# ragged last block (M = 257 → blocks of 7 rows), so the chunked backend's block loop and its
# running column log-sum-exp are exercised, not just one block.
TINY_CHUNK = 1800


def _backend_fixture(request, monkeypatch):
    name = request.param
    if name == "chunked-tiny":
        monkeypatch.setattr(backends, "CHUNK_ELEMENTS", TINY_CHUNK)
        name = "chunked"
    require_backend(name)
    return name


@pytest.fixture(params=["reference", "chunked", "chunked-tiny", "cpu"])
def backend(request, monkeypatch):
    """Every CPU-runnable backend (cpu skips locally when not built, fails in CI)."""
    return _backend_fixture(request, monkeypatch)


@pytest.fixture(params=["chunked", "chunked-tiny", "cpu"])
def fused_backend(request, monkeypatch):
    """The fused (non-materialising) CPU backends."""
    return _backend_fixture(request, monkeypatch)


@pytest.fixture(params=["chunked", "cpu"])
def fused_backend_plain(request, monkeypatch):
    """chunked and cpu only, for the expensive checks (opcheck, compile)."""
    return _backend_fixture(request, monkeypatch)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    from helpers import IN_CI, backend_availability, cpu_backends
    lines = [f"contrastive_kernels: CPU backends {cpu_backends()} (CI={IN_CI}), "
             f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"]
    ok, why = backend_availability("cpu")
    if not ok:
        lines.append(f"native cpu backend unavailable: {why}")
    return lines
