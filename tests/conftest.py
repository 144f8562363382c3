import faulthandler
import os
import signal
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

import contrastive_kernels.backends.chunked  # noqa: E402,F401  (the chunked module, patched below)
from contrastive_kernels import backends  # noqa: E402
from helpers import require_backend  # noqa: E402

# Small enough that the larger shapes used here (M ≥ 37) are split into several row blocks with a
# ragged last block (M = 257 → blocks of 7 rows), so the chunked backend's block loop and its
# running column log-sum-exp are exercised, not just one block.
TINY_CHUNK = 1800


def _backend_fixture(request, monkeypatch):
    name = request.param
    if name == "chunked-tiny":
        monkeypatch.setattr(backends.chunked, "CHUNK_ELEMENTS", TINY_CHUNK)
        name = "chunked"
    if name == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("these tests use CPU tensors: triton runs them only under its interpreter "
                    "(on a GPU the gpu-marked tests cover it)")
    require_backend(name)
    return name


@pytest.fixture
def split_spy(monkeypatch):
    """The column splits the Triton launches plan, in call order (one ``tuning.plan_split`` call
    per launch): tests that force splits check here that a launch really split."""
    from contrastive_kernels.backends.triton import tuning
    planned = []
    real = tuning.plan_split

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        planned.append(out[0])
        return out
    monkeypatch.setattr(tuning, "plan_split", spy)
    return planned


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


@pytest.fixture(params=["chunked", "chunked-tiny", "cpu", "triton"])
def lowp_backend(request, monkeypatch):
    """Every fused backend that runs here in 32- and 16-bit: triton under its interpreter."""
    return _backend_fixture(request, monkeypatch)


# Per-test time limit for the GPU kit (benchmarks/run_gpu.sh): CK_TEST_TIMEOUT=seconds fails a test
# that runs longer (SIGALRM, so the run goes on and the JUnit XML keeps the verdict); a test stuck
# inside C code that never returns to Python is killed with a traceback after twice the limit
# (faulthandler), so one hang cannot eat the whole GPU window.
_TEST_TIMEOUT = float(os.environ.get("CK_TEST_TIMEOUT", "0") or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if _TEST_TIMEOUT <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        pytest.fail(f"{item.nodeid} exceeded CK_TEST_TIMEOUT={_TEST_TIMEOUT:g} s", pytrace=False)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, _TEST_TIMEOUT)
    faulthandler.dump_traceback_later(2 * _TEST_TIMEOUT + 30, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()


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
