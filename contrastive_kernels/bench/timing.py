"""The one timer of every benchmark, and the roof it is compared with.

Timer kinds:

* ``perf_counter`` (CPU default): wall time of one call;
* ``process_time``: CPU time of the process (all threads) — stable when comparing variants on a
  busy machine (a preempted thread accrues none), but not a latency;
* ``events`` (CUDA): CUDA events around one call, synchronised once after it;
* ``do_bench`` (CUDA default when triton is importable): one sample = ``triton.testing.do_bench``'s
  median over ~50 ms of calls with the L2 cache flushed between them.

Modes, the same for every provider and op family: ``fwd`` = the training forward (inputs require
grad, the graph is recorded and dropped); ``bwd`` = ``loss.backward()`` of a fresh forward's graph,
timed alone (the forward before it is untimed; so ``do_bench`` cannot be used and ``events`` is);
``fwd_bwd`` = both.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch

MODES = ("fwd", "bwd", "fwd_bwd")


def percentile(values: list, q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def default_timer(device: torch.device, mode: str) -> str:
    if device.type != "cuda":
        return "perf_counter"
    if mode == "bwd":
        return "events"
    import importlib.util
    try:
        return "do_bench" if importlib.util.find_spec("triton.testing") else "events"
    except (ImportError, ValueError):
        return "events"


def _do_bench_median(body: Callable, grads) -> float:
    import triton.testing
    try:
        out = triton.testing.do_bench(body, warmup=5, rep=50, grad_to_none=grads, return_mode="median")
    except TypeError:  # older triton: no return_mode
        out = triton.testing.do_bench(body, warmup=5, rep=50, grad_to_none=grads, quantiles=[0.5])
    return float(out[0] if isinstance(out, (list, tuple)) else out)


class Timer:
    """Times one call of ``fn(*inputs)`` in a mode; returns milliseconds."""

    def __init__(self, device: torch.device, kind: str):
        if kind in ("events", "do_bench") and device.type != "cuda":
            raise ValueError(f"timer {kind!r} needs a CUDA device")
        self.device, self.kind = device, kind

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure(self, fn: Callable, inputs: tuple, mode: str,
                grads: Optional[list] = None) -> float:
        grads = grads if grads is not None else [t for t in inputs if isinstance(t, torch.Tensor)
                                                 and t.requires_grad]
        for t in grads:
            t.grad = None
        if mode == "bwd":
            loss = fn(*inputs)
            self._sync()
            return self.span(loss.backward)
        if mode == "fwd":
            def body():
                return fn(*inputs)  # the graph is freed after the clock stops
        elif mode == "fwd_bwd":
            def body():
                fn(*inputs).backward()
        else:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if self.kind == "do_bench":
            return _do_bench_median(body, grads)
        return self.span(body)

    def span(self, body: Callable) -> float:
        """Milliseconds of one ``body()`` call by this timer's clock (``do_bench``: CUDA events)."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            keep = body()
            end.record()
            end.synchronize()
            del keep
            return float(start.elapsed_time(end))
        clock = time.process_time if self.kind == "process_time" else time.perf_counter
        t0 = clock()
        keep = body()
        ms = (clock() - t0) * 1e3
        del keep
        return ms


# ---------------------------------------------------------------------------------------------
# roofs: the same run's dense matmul rate and copy bandwidth
# ---------------------------------------------------------------------------------------------

def _mm_ms(a: torch.Tensor, b: torch.Tensor, timer: Timer, repeats: int,
           out: Optional[torch.Tensor] = None) -> list:
    """Milliseconds of ``repeats`` calls of torch.mm(a, b) after one warm-up call (into ``out``
    when given: the product alone, no allocation)."""
    torch.mm(a, b, out=out)
    return [timer.span(lambda: torch.mm(a, b, out=out)) for _ in range(repeats)]


def gemm_ceiling(device: torch.device, dtype: torch.dtype, n: int, d: int, timer: Timer,
                 repeats: int = 5, seed: int = 0) -> dict:
    """A ceiling for a fused kernel's FLOP rate on this machine, measured now.

    CPU: the best single-thread ``torch.mm`` rate over two shapes — the CPU kernels' tile,
    (512×d)·(d×256), whose output stays in L2, and the full (n×d)·(d×n) — times the thread count:
    what one single-threaded GEMM per core reaches. (Our CPU kernels run exactly that, one tile GEMM
    per thread; a multi-threaded mm, whose threading overheads and cache misses they avoid, is no
    ceiling: they beat it.) GPU: the best of ``torch.mm`` at 8192³ and at (16384×d)·(d×16384) in
    this dtype (cuBLAS at its best shape, and at the problem's aspect).
    Returns ``{"tflops", "ms" (list, of the shape the rate came from), "note", "n", "d"}``.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mm_dtype = dtype if device.type == "cuda" or dtype != torch.float64 else torch.float64
    if device.type == "cpu":
        if mm_dtype == torch.float16 or (mm_dtype == torch.bfloat16 and not cpu_bf16_units()):
            mm_dtype = torch.float32  # the CPU kernels convert these 16-bit inputs to float32 once
        threads = torch.get_num_threads()
        shapes = [(512, d, 256), (n, d, n)]
        tile_reps = 8  # tile products are ~1 ms: time several per sample
        torch.set_num_threads(1)
        best = None
        try:
            for rows, inner, cols in shapes:
                a = torch.randn(rows, inner, generator=gen, dtype=mm_dtype)
                b = torch.randn(inner, cols, generator=gen, dtype=mm_dtype)
                k = tile_reps if rows * cols <= 512 * 256 else 1
                out = torch.empty(rows, cols, dtype=mm_dtype)

                def body(a=a, b=b, out=out, k=k):
                    for _ in range(k):
                        torch.mm(a, b, out=out)
                body()
                ms = [timer.span(body) / k for _ in range(repeats)]
                rate = 2.0 * rows * cols * inner / (percentile(ms, 50) * 1e-3) / 1e12 * threads
                if best is None or rate > best["tflops"]:
                    best = dict(tflops=rate, ms=ms, n=rows, d=inner,
                                note=f"best 1-thread torch.mm ({rows}x{inner})·({inner}x{cols}) "
                                     f"{mm_dtype} × {threads} threads")
        finally:
            torch.set_num_threads(threads)
        return best
    best = None
    for rows, inner in ((8192, 8192), (16384, d)):
        a = torch.randn(rows, inner, generator=gen).to(device=device, dtype=mm_dtype)
        b = torch.randn(inner, rows, generator=gen).to(device=device, dtype=mm_dtype)
        ms = _mm_ms(a, b, timer, repeats)
        rate = 2.0 * rows * rows * inner / (percentile(ms, 50) * 1e-3) / 1e12
        if best is None or rate > best["tflops"]:
            best = dict(tflops=rate, ms=ms, n=rows, d=inner,
                        note=f"torch.mm ({rows}x{inner})·({inner}x{rows}) {mm_dtype}")
        del a, b
    return best


def cpu_bf16_units() -> bool:
    """Whether the native CPU kernels run bfloat16 tile GEMMs on the bf16 dot-product units now."""
    from .schema import cpu_isa

    return cpu_isa() == "avx512_bf16"


def mm_ms(n: int, d: int, dtype: torch.dtype, timer: Timer, repeats: int, seed: int = 0) -> list:
    """Milliseconds of torch.mm (n×d)·(d×n) into a preallocated n×n output of ``dtype`` on the
    timer's device (all threads): the dense product a fused kernel's rate is compared with."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=gen).to(device=timer.device, dtype=dtype)
    b = torch.randn(d, n, generator=gen).to(device=timer.device, dtype=dtype)
    return _mm_ms(a, b, timer, repeats, out=torch.empty(n, n, dtype=dtype, device=timer.device))


def copy_bandwidth(device: torch.device, timer: Timer, mib: int = 1024, repeats: int = 5) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write counted)."""
    x = torch.empty(mib << 18, device=device)  # float32: mib MiB
    y = torch.empty_like(x)
    y.copy_(x)
    ms = [timer.span(lambda: y.copy_(x)) for _ in range(repeats)]
    return 2 * x.numel() * 4 / (percentile(ms, 50) * 1e-3) / 1e9
