"""Build of the native extension ``contrastive_kernels._C`` (metadata lives in pyproject.toml).

    pip install --no-build-isolation -e .      # or: pip install --no-build-isolation .
    MAX_JOBS=2 ...                             # limit parallel compile jobs (torch's ninja build)

* The CPU kernels (csrc/ops.cpp + csrc/cpu/*.cpp) are always built. They are compiled for the
  baseline ISA only: the AVX-512 / AVX2 code paths are selected at run time (csrc/cpu/lse_tiles.cpp),
  so a wheel built here runs on any x86-64 CPU.
* The CUDA kernels (csrc/cuda/*.cu + csrc/cuda/*.cpp, compiled with -DCK_WITH_CUDA) are added only when
  torch is a CUDA build, nvcc is found and nvcc's major version matches torch's CUDA major version.
  CK_BUILD_CUDA=0 turns them off; CK_BUILD_CUDA=1 turns them on and fails loudly if that is impossible.
* With no GPU visible and TORCH_CUDA_ARCH_LIST unset, a CUDA build targets DEFAULT_CUDA_ARCH_LIST
  (8.0;9.0+PTX) instead of failing in torch's arch detection.
* Nothing here touches the network. Use --no-build-isolation: pyproject.toml lists no torch among
  the build requirements, so an isolated build stops at once with a message naming the flag.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

NO_TORCH_MESSAGE = (
    "contrastive_kernels compiles its extension against the torch of the environment it is "
    "installed into, and this build cannot import torch. Plain `pip install .` builds in an "
    "isolated environment without torch: install torch first (e.g. `pip install torch`), then run "
    "`pip install --no-build-isolation .` (or `pip install --no-build-isolation -e .`).")

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # plain `pip install .`: stop at once, naming the fix
    raise SystemExit(f"error: {NO_TORCH_MESSAGE}") from exc

HERE = os.path.dirname(os.path.abspath(__file__))
# The extension defines no Python API of its own, so it is built against the stable ABI: one abi3
# wheel for every Python. Recent torch sets -DPy_LIMITED_API itself (to its minimum CPython); older
# torch does not, and then we do.
try:
    from torch.utils.cpp_extension import min_supported_cpython as _TORCH_LIMITED_API
except ImportError:
    _TORCH_LIMITED_API = None
PY_LIMITED_API = _TORCH_LIMITED_API or "0x03090000"
ABI3_TAG = "cp3{}".format(int(PY_LIMITED_API, 16) >> 16 & 0xFF)


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _log(msg: str) -> None:
    print(f"contrastive_kernels setup: {msg}", file=sys.stderr)


def _find_nvcc() -> str | None:
    for env in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(env)
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.isfile(default) else None


def _nvcc_version(nvcc: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def cuda_decision(cuda_sources: list[str]) -> tuple[bool, str]:
    """(build CUDA?, why) from CK_BUILD_CUDA, torch's CUDA version and the nvcc found."""
    flag = os.environ.get("CK_BUILD_CUDA", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False, "CK_BUILD_CUDA=0"
    forced = flag in ("1", "true", "yes", "on")
    if flag and not forced:
        raise RuntimeError(f"CK_BUILD_CUDA must be 0 or 1, got {os.environ['CK_BUILD_CUDA']!r}")

    problem = None
    nvcc = _find_nvcc()
    if not cuda_sources:
        problem = "no sources in csrc/cuda/"
    elif torch.version.cuda is None:
        problem = f"torch {torch.__version__} is not a CUDA build"
    elif nvcc is None:
        problem = "nvcc not found (set CUDA_HOME)"
    else:
        version = _nvcc_version(nvcc)
        torch_major = int(torch.version.cuda.split(".")[0])
        if version is None:
            problem = f"could not read the version of {nvcc}"
        elif version[0] != torch_major:
            problem = (f"{nvcc} is CUDA {version[0]}.{version[1]} but torch was built with CUDA "
                       f"{torch.version.cuda}")
            if forced:  # forced on: a major mismatch is the user's call
                _log(f"warning: {problem}; building anyway because CK_BUILD_CUDA=1")
                problem = None
    if problem is None:
        # Point torch's BuildExtension at the nvcc we found when CUDA_HOME is unset.
        if nvcc and not os.environ.get("CUDA_HOME"):
            os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(nvcc))
        arch_note = default_cuda_arch_list()
        return True, f"CUDA kernels enabled ({nvcc}){arch_note}"
    if forced:
        raise RuntimeError(f"CK_BUILD_CUDA=1 but the CUDA kernels cannot be built: {problem}")
    return False, problem


# Architectures of a CUDA build on a machine where no GPU is visible (a build server, a container
# build step): torch's arch-flag code takes the visible devices' capabilities and, with none and no
# TORCH_CUDA_ARCH_LIST, dies with an IndexError on an empty list. A100 (8.0) and H100/H200 (9.0),
# with PTX for 9.0 so newer GPUs JIT-compile it. Set TORCH_CUDA_ARCH_LIST to choose others.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def default_cuda_arch_list() -> str:
    """Set TORCH_CUDA_ARCH_LIST when it is unset and no GPU is visible; returns a note for the log."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return f", TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
    try:
        visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # noqa: BLE001 - a broken driver is the same as no GPU for this purpose
        visible = False
    if visible:
        return ", for the visible GPUs' architectures"
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    return f", no GPU visible: TORCH_CUDA_ARCH_LIST={DEFAULT_CUDA_ARCH_LIST} (the default)"


def _uses_pybind(path: str) -> bool:
    with open(os.path.join(HERE, path), encoding="utf-8", errors="replace") as f:
        text = f.read()
    pattern = r"#\s*include\s*[<\"](pybind11/|torch/extension\.h|torch/python\.h)"
    return re.search(pattern, text) is not None


def openmp_flags() -> list[str]:
    # ATen's parallel_for is a header template; with torch's OpenMP backend it only runs in parallel
    # when this extension is compiled with OpenMP too. The libgomp it links is the one torch already
    # loaded (same soname), so there is a single thread pool and torch.set_num_threads applies.
    if "OpenMP" not in torch.__config__.parallel_info():
        return []
    if sys.platform.startswith("linux"):
        return ["-fopenmp"]
    if sys.platform == "win32":
        return ["/openmp"]
    return []  # macOS: no OpenMP flag by default; parallel_for then runs serially


def extensions():
    cpu_sources = _rel([os.path.join(HERE, "csrc", "ops.cpp")]
                       + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    cuda_sources = _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))
                        + glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp")))
    with_cuda, why = cuda_decision(cuda_sources)
    _log(("building" if with_cuda else "not building") + f" the CUDA kernels: {why}")

    omp = openmp_flags()
    if sys.platform == "win32":
        cxx = ["/O2"] + omp
        link = []
    else:
        cxx = ["-O3", "-fno-math-errno"] + omp
        link = omp
    # The stable-ABI build (one cp39-abi3 wheel for every Python) needs sources free of pybind11.
    # Passed as a flag: torch's ninja build does not forward define_macros.
    limited_api = not any(_uses_pybind(p) for p in cpu_sources + (cuda_sources if with_cuda else []))
    if limited_api and _TORCH_LIMITED_API is None:
        cxx = cxx + [f"-DPy_LIMITED_API={PY_LIMITED_API}"]
    elif not limited_api:
        _log("a source includes pybind11 or torch/extension.h: building for this Python only")
    sources = list(cpu_sources)
    kwargs = {}
    if with_cuda:
        sources += cuda_sources
        nvcc = ["-O3", "-DCK_WITH_CUDA", "--expt-relaxed-constexpr", "-lineinfo"]
        kwargs["extra_compile_args"] = {"cxx": cxx + ["-DCK_WITH_CUDA"], "nvcc": nvcc}
        ext_cls = CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext_cls = CppExtension
    return [ext_cls(
        "contrastive_kernels._C",
        sources,
        extra_link_args=link,
        py_limited_api=limited_api,
        **kwargs,
    )]


EXTENSIONS = extensions()
setup(
    ext_modules=EXTENSIONS,
    cmdclass={"build_ext": BuildExtension},
    options=({"bdist_wheel": {"py_limited_api": ABI3_TAG}}
             if all(ext.py_limited_api for ext in EXTENSIONS) else {}),
)
