"""The one CPU memory probe: peak resident memory of a piece of code in a freshly spawned process.

Used by the memory tests and by the benchmark (neither imports the other). How it measures:

1. a new interpreter is started (``subprocess``, never ``fork``: a forked child shares its
   parent's pages, and ``ru_maxrss`` may even carry the parent's high-water mark across
   ``fork``+``exec`` — measured: a child reported 0 bytes extra after its parent had peaked at
   5 GiB), with glibc told to serve every allocation ≥ 64 KiB by ``mmap`` so that freed blocks go
   back to the OS and the peak tracks live memory, not heap fragmentation;
2. it runs ``setup`` (imports, inputs) and ``warmup`` (a tiny call that loads kernels, libraries
   and thread pools), then resets the kernel's high-water mark (``/proc/self/clear_refs``, Linux
   ≥ 4.0) and records the resident set as the baseline;
3. it runs ``code`` and reads the high-water mark ``VmHWM`` of ``/proc/self/status``.

``peak - baseline`` is the extra memory of ``code``. :func:`dense_control` allocates one float32
N×M matrix through the same path, so a test can prove in the same run that the probe sees an N×M
allocation (a probe that measured nothing would pass every "not quadratic" assertion).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Optional

_TAG = "CK_MEMPROBE "

_PRELUDE = r'''
import gc, json, os, sys, time

def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def _hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")

def _reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

result = None
'''

_MEASURE = r'''
gc.collect()
_reset_ok = _reset_hwm()
_base = _rss()
_hwm_before = _hwm()
_t0 = time.perf_counter()
{code}
_seconds = time.perf_counter() - _t0
_peak = _hwm()
print({tag!r} + json.dumps({{"extra_bytes": _peak - _base, "base_bytes": _base,
                             "hwm_after_reset": _hwm_before, "peak_bytes": _peak,
                             "seconds": _seconds, "reset_ok": _reset_ok, "result": result}}),
      flush=True)
'''


# After a working reset the high-water mark equals the resident set (to allocator noise).
RESET_SLACK_BYTES = 8 << 20


def _check_reset(out: dict) -> None:
    """A probe whose high-water mark was not reset would read the setup's peak, not the code's:
    it reported 0 bytes for a code that allocated less than its setup. Refuse to measure instead."""
    if not out["reset_ok"]:
        raise RuntimeError("memory probe: cannot reset the process's high-water mark "
                           "(/proc/self/clear_refs is not writable here), so VmHWM would report "
                           "the setup's peak, not the code's; no measurement")
    stale = out["hwm_after_reset"] - out["base_bytes"]
    if stale > RESET_SLACK_BYTES:
        raise RuntimeError(f"memory probe: the high-water mark stayed {stale / 2**20:.0f} MiB above "
                           "the resident set after the reset (the kernel ignored clear_refs); "
                           "no measurement")


def available() -> bool:
    """Whether this platform has the /proc files the probe reads (Linux)."""
    return os.path.exists("/proc/self/status") and os.path.exists("/proc/self/statm")


def peak_extra_bytes(code: str, *, setup: str = "", warmup: str = "",
                     env: Optional[dict] = None, cwd: Optional[str] = None,
                     timeout: float = 900) -> dict:
    """Run ``setup``; ``warmup``; then ``code`` in a fresh interpreter and return its extra peak.

    The snippets are Python source (dedented); ``code`` may assign ``result`` (JSON-serialisable),
    which is returned. Returns ``{"extra_bytes", "base_bytes", "peak_bytes", "seconds", "reset_ok",
    "result"}``. Raises ``RuntimeError`` with the child's stderr when it fails.
    """
    script = "\n".join([
        _PRELUDE,
        textwrap.dedent(setup),
        textwrap.dedent(warmup),
        _MEASURE.format(code=textwrap.dedent(code), tag=_TAG),
    ])
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    # The child imports this package from the same place as the parent did.
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child_env["PYTHONPATH"] = pkg_parent + (os.pathsep + child_env["PYTHONPATH"]
                                            if child_env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=child_env, cwd=cwd, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(_TAG):
            out = json.loads(line[len(_TAG):])
            _check_reset(out)
            return out
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    raise RuntimeError(f"memory probe child failed (exit {proc.returncode}):\n{tail}")


def dense_control(n: int, m: int, *, timeout: float = 300) -> dict:
    """The probe on one float32 N×M matrix written in full (the control of every memory test)."""
    return peak_extra_bytes(f"x = torch.ones({n}, {m}); result = float(x[-1, -1]); del x",
                            setup="import torch", warmup="torch.ones(8, 8)", timeout=timeout)
