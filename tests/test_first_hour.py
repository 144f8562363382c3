"""The first hour of a new user: install messages, smoke runs that leave the repository alone,
benchmark options that fail loudly, and the facts every benchmark row carries."""
import ast
import os
import subprocess
import sys
import types

import pytest

from contrastive_kernels.bench import main as bench_main
from contrastive_kernels.bench import schema
from contrastive_kernels.experiments import _common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_setup_without_torch_stops_at_once_naming_the_flag():
    # what a plain (isolated) `pip install .` runs: setup.py in an environment without torch
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert "--no-build-isolation" in proc.stderr + proc.stdout


def test_build_requirements_hold_no_torch():
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    assert not any(r.startswith("torch") for r in meta["build-system"]["requires"])
    assert meta["project"]["license"] == "Apache-2.0"
    assert os.path.isfile(os.path.join(ROOT, "LICENSE"))


def _setup_function(name):
    """One function of setup.py, without running setup() (it builds at import)."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    keep = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name
            or isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "DEFAULT_CUDA_ARCH_LIST"
                                                 for t in n.targets)]
    module = ast.Module(body=keep, type_ignores=[])
    return module


@pytest.mark.parametrize("visible", [False, True])
def test_cuda_build_without_a_visible_gpu_gets_a_default_arch_list(visible, monkeypatch):
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(
        is_available=lambda: visible, device_count=lambda: 1 if visible else 0))
    scope = {"os": os, "torch": fake_torch}
    exec(compile(_setup_function("default_cuda_arch_list"), "setup.py", "exec"), scope)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    scope["default_cuda_arch_list"]()
    if visible:  # torch's own detection then has devices to read
        assert "TORCH_CUDA_ARCH_LIST" not in os.environ
    else:
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == scope["DEFAULT_CUDA_ARCH_LIST"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    scope["default_cuda_arch_list"]()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.6"  # a user's choice is kept


def test_bench_provider_typo_is_an_error(capsys):
    assert bench_main(["--providers", "dense,cpux", "--quick", "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert "cpux" in err and "ck.cpu" in err


def test_bench_list_includes_gradcache(capsys):
    assert bench_main(["--list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert "gradcache" in names and "sweep" in names


def test_benchmark_rows_carry_isa_and_load():
    import torch
    assert "isa" in schema.COLUMNS and "loadavg" in schema.COLUMNS
    facts = schema.base_facts(torch.device("cpu"), "perf_counter")
    assert (facts["isa"] in ("avx512_bf16", "avx512", "avx2", "scalar")
            or facts["isa"].startswith("n/a"))


def test_quick_experiments_write_outside_the_committed_results():
    assert _common.output_folder(None, True, "experiments/results", "synthetic") == \
        os.path.join("results_local", "synthetic-quick")
    assert _common.output_folder(None, False, "experiments/results", "x") == "experiments/results"
    assert _common.output_folder("", True, "experiments/results", "x") is None
    assert _common.output_folder("mine", True, "experiments/results", "x") == "mine"


def test_quick_synthetic_run_leaves_the_results_folder_alone(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "contrastive_kernels", "experiment", "synthetic",
                           "--quick", "--methods", "infonce"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (tmp_path / "experiments").exists()
    assert any((tmp_path / "results_local" / "synthetic-quick").iterdir())


def test_experiment_options_all_have_help():
    import argparse
    import importlib
    for name in ("synthetic", "digits", "modality"):
        module = importlib.import_module(f"contrastive_kernels.experiments.{name}")
        seen = []
        original = argparse.ArgumentParser.parse_args

        def grab(self, args=None, namespace=None):
            seen.extend(a for a in self._actions if a.option_strings != ["-h", "--help"])
            raise SystemExit(0)
        argparse.ArgumentParser.parse_args = grab
        try:
            with pytest.raises(SystemExit):
                module.main([])
        finally:
            argparse.ArgumentParser.parse_args = original
        missing = [a.option_strings for a in seen if not a.help]
        assert seen and not missing, f"{name}: options without help {missing}"
