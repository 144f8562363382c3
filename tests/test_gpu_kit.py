"""The GPU kit (benchmarks/run_gpu.sh) tests what the library ships before it times anything.

A lent GPU window is 15 minutes, start included; a kit that reaches its family tests with no time
left proves nothing about NT-Xent, SupCon or SigLIP on a GPU. These tests read the kit's plan
(``CK_GPU_PLAN=1`` prints the step order and each test step's pytest selection without running
anything) and collect every selection with pytest, so they check the real schedule:

- every GPU-marked test of the suite is scheduled in some step (none forgotten);
- every test step runs before the first benchmark step; the sync-debug training step is the first
  test of the family step; Triton's 2^20 run comes before memcheck, CUDA's 2^20 after it, the sweep
  last.
"""
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIT = os.path.join(ROOT, "benchmarks", "run_gpu.sh")
TEST_STEPS = ("tests_cuda", "tests_families", "tests_large")
BENCH_STEPS = ("headline", "huge_triton", "huge_cuda", "sweep")


def _plan(script=KIT):
    proc = subprocess.run(["bash", script], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "CK_GPU_PLAN": "1"}, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    order, selections = None, {}
    for line in proc.stdout.splitlines():
        if line.startswith("order: "):
            order = line.split(": ", 1)[1].split()
        elif line.startswith("select "):
            name, args = line[len("select "):].split(":", 1)
            selections[name] = shlex.split(args)
    assert order and set(selections) == set(TEST_STEPS), proc.stdout
    return order, selections


def _collect(args):
    env = {k: v for k, v in os.environ.items() if k != "CK_TEST_TIMEOUT"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", "-m", "gpu", *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode in (0, 5), proc.stdout + proc.stderr
    return [line for line in proc.stdout.splitlines() if "::" in line]


@pytest.fixture(scope="module")
def plan():
    return _plan()


def test_every_test_step_runs_before_the_first_benchmark(plan):
    order, _ = plan
    first_bench = min(order.index(s) for s in BENCH_STEPS)
    for s in TEST_STEPS:
        assert order.index(s) < first_bench, f"{s} runs after a benchmark step: {order}"
    assert order[:2] == ["env", "build"]
    assert order.index("huge_triton") < order.index("memcheck") < order.index("huge_cuda")
    assert order[-1] == "sweep"


def test_every_gpu_test_is_scheduled(plan):
    _, selections = plan
    scheduled = [t for s in TEST_STEPS for t in _collect(selections[s])]
    every = _collect(["tests/"])
    assert every, "no GPU-marked tests collected"
    missing = sorted(set(every) - set(scheduled))
    assert not missing, f"GPU tests no kit step runs: {missing}"
    twice = sorted({t for t in scheduled if scheduled.count(t) > 1})
    assert not twice, f"GPU tests scheduled twice: {twice}"


def test_family_step_starts_with_the_sync_debug_step_and_covers_every_family(plan):
    _, selections = plan
    tests = _collect(selections["tests_families"])
    assert tests[0].startswith("tests/test_no_host_sync.py::test_gpu_training_step_never_syncs")
    names = " ".join(tests)
    for needle in ("second_wave_families", "several_launches", "no_quadratic_memory",
                   "deterministic", "col_reduce_modes", "agrees_with_triton"):
        assert needle in names, f"the family step lacks {needle}"


def test_the_order_check_can_fail(tmp_path):
    # The same script with the families moved behind the headline must be caught.
    text = open(KIT).read()
    bad = text.replace("tests_cuda tests_families tests_large headline",
                       "tests_cuda tests_large headline tests_families")
    assert bad != text
    script = tmp_path / "run_gpu.sh"
    script.write_text(bad)
    order, _ = _plan(str(script))
    with pytest.raises(AssertionError):
        test_every_test_step_runs_before_the_first_benchmark((order, None))
