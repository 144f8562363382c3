"""A fused path must not allocate anything O(N·M).

At N = M = 16384 one dense float32 N×M matrix is 1 GiB, while everything a fused forward + backward
legitimately holds is O((N + M)·D) plus a bounded working tile: the gradients (2·N·D·4 B = 4 MiB at
D = 32), the O(N) statistics, and the chunked backend's row block (≈ 5 live blocks of
CK_CHUNK_ELEMENTS floats during the backward: s, G and the exp temporaries; 80 MiB at 2^22) or the
native backend's per-thread tiles (a few MiB). The bound of 200 MiB sits above that working set
with 2× slack for allocator noise, and below a fifth of a single N×M matrix, so any path that keeps
S, G or even one N×M/5 temporary alive fails. The ``reference`` backend, which does materialise S,
is run through the same measurement to prove that it detects O(N·M).

Peak RSS (ru_maxrss) is taken in a fresh subprocess, after the inputs exist and after one tiny
warm-up call (libraries, thread pools, op registration), so only the loss itself is measured. glibc
is told to serve every allocation ≥ 64 KiB with mmap (MALLOC_MMAP_THRESHOLD_), so freed blocks go
back to the OS and the peak tracks live memory rather than heap fragmentation.
"""
import json
import os
import subprocess
import sys

import pytest

from helpers import require_backend

N = 16384
D = 32
MIB = 1 << 20
FUSED_BOUND = 200 * MIB
DENSE_BYTES = N * N * 4  # one float32 N×M matrix: 1 GiB
CHUNK_ELEMENTS = 1 << 22  # 16 MiB float32 blocks for the chunked backend

_SCRIPT = r"""
import json, resource, sys, time
import torch
import contrastive_kernels as ck

backend, n, d, backward = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
g = torch.Generator().manual_seed(0)
q = torch.randn(n, d, generator=g)
k = torch.randn(n, d, generator=g)
q, k = (t / t.norm(dim=1, keepdim=True) for t in (q, k))
q.requires_grad_(backward)
k.requires_grad_(backward)
s = torch.tensor(14.0, requires_grad=backward)

def run(a, b):
    loss = ck.clip_loss(a, b, s, backend=backend)
    if backward:
        loss.backward()
    return float(loss)

with torch.set_grad_enabled(backward):
    run(q.detach()[:64].requires_grad_(backward), k.detach()[:64].requires_grad_(backward))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    value = run(q, k)
    seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
finite = bool(torch.isfinite(torch.tensor(value)))
if backward:
    finite = finite and all(bool(torch.isfinite(t.grad).all()) for t in (q, k, s))
print(json.dumps({"extra_bytes": (peak - base) * 1024, "seconds": seconds, "loss": value,
                  "finite": finite}))
"""


def _peak_extra(backend: str, backward: bool = True) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["CK_CHUNK_ELEMENTS"] = str(CHUNK_ELEMENTS)
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, backend, str(N), str(D),
                           "1" if backward else "0"],
                          capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["chunked", "cpu"])
def test_fused_clip_loss_is_not_quadratic_in_memory(backend):
    require_backend(backend)
    out = _peak_extra(backend)
    assert out["finite"], out
    assert out["extra_bytes"] < FUSED_BOUND, (
        f"{backend}: clip_loss forward+backward at N = M = {N}, D = {D} raised peak RSS by "
        f"{out['extra_bytes'] / MIB:.0f} MiB (bound {FUSED_BOUND / MIB:.0f} MiB; a dense N×M "
        f"float32 matrix is {DENSE_BYTES / MIB:.0f} MiB)")


def test_measurement_detects_dense_logits():
    # Forward only (no grad) keeps this under a few seconds; it already materialises S (1 GiB).
    out = _peak_extra("reference", backward=False)
    assert out["extra_bytes"] > DENSE_BYTES, (
        f"reference backend raised peak RSS by only {out['extra_bytes'] / MIB:.0f} MiB; the "
        f"measurement cannot see a {DENSE_BYTES / MIB:.0f} MiB N×M allocation")
