"""The one CSV schema of every benchmark, and the environment facts each row carries.

Every configuration (the CLI sweep, the GPU kit's headline/huge/sweep blocks, CPU tuning, the
SigLIP / SupCon / NT-Xent / GradCache comparisons) writes rows with exactly these columns, one row
the moment it is measured (``CsvSink`` flushes after every row, so a run killed at its time limit
keeps everything before it).
"""
from __future__ import annotations

import csv
import os
import platform
import subprocess
from typing import Iterable, Optional

COLUMNS = (
    "config", "op", "provider", "ours", "mode", "dtype", "n", "m", "d",
    "ms_p50", "ms_p20", "ms_p80", "repeats", "peak_mem_mb",
    "tflops", "pct_roof", "speedup_vs_dense", "gbps",
    "device", "isa", "threads", "timer", "loadavg", "torch", "triton", "commit", "note",
)
# Units: ms (wall time of one call), MiB (peak memory beyond the inputs), TFLOP/s (the op family's
# exact fused FLOP count divided by time, whatever the provider really executes), % of the same
# run's roof row, GB/s (bandwidth rows only). ``isa``: the native CPU kernels' SIMD path
# (``torch.ops.ck_native.cpu_isa()``: avx512_bf16 / avx512 / avx2 / scalar;
# avx512_bf16 = bfloat16 tile GEMMs on the bf16 units) on CPU rows; ``loadavg``: the 1-minute load average when
# the row was measured (above the core count, the timings are noisy).


def loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return ""


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def triton_version() -> str:
    try:
        from importlib.metadata import version
        return version("triton")
    except Exception:
        return ""


def git_commit() -> str:
    """``CK_COMMIT`` (set where there is no .git, e.g. the GPU machine), else git's short hash."""
    if os.environ.get("CK_COMMIT"):
        return os.environ["CK_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=here, timeout=10)
        if out.returncode != 0 or not out.stdout.strip():
            return "unknown"
        # "+dirty": tracked files differ from the commit (the figures are of the working tree)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=here, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def cpu_isa() -> str:
    """The SIMD path of the native CPU kernels, or why there is none (backends.cpu_isa)."""
    from ..backends import cpu_isa as native_cpu_isa
    return native_cpu_isa()


def base_facts(device, timer: str) -> dict:
    """The per-run columns: device, CPU ISA, versions, commit, threads, timer."""
    import torch

    on_cpu = device.type == "cpu"
    return dict(device=device_name(device), isa=cpu_isa() if on_cpu else "",
                torch=torch.__version__, triton=triton_version(), commit=git_commit(),
                timer=timer, threads=torch.get_num_threads() if on_cpu else "")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "" if v != v else f"{v:.6g}"
    return str(v)


class CsvSink:
    """Appends rows to one CSV file with the schema's header, flushing after every row."""

    def __init__(self, path: str, append: bool = False):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fresh = not (append and os.path.exists(path) and os.path.getsize(path) > 0)
        self._f = open(path, "a" if not fresh else "w", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=COLUMNS, extrasaction="ignore")
        if fresh:
            self._w.writeheader()
            self._f.flush()

    def write(self, row: dict) -> None:
        self._w.writerow({k: _fmt(row.get(k)) for k in COLUMNS})
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def as_float(v) -> Optional[float]:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if x != x else x


def write_rows(path: str, rows: Iterable[dict]) -> None:
    sink = CsvSink(path)
    for r in rows:
        sink.write(r)
    sink.close()
