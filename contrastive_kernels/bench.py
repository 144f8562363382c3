"""Benchmark harness for the fused CLIP loss: ``contrastive-kernels bench`` (``python -m contrastive_kernels
bench``, ``python benchmarks/bench_clip.py``).

Providers (timed alternating within one process per N, so machine drift hits all of them equally):

    dense       open_clip ClipLoss's single-process computation, written out here: materialises
                logits_per_image = s·I·Tᵀ and logits_per_text = s·T·Iᵀ, two cross-entropies, /2
    open_clip   open_clip's own ``ClipLoss`` loaded by file path from the installed open_clip/loss.py
                (importing the open_clip package itself pulls torchvision); skipped when absent
    chunked, cpu, triton, cuda, reference
                ``contrastive_kernels.clip_loss(img, txt, logit_scale, backend=name)``
    matmul_roof one row per run: torch.mm of (N×D)·(D×N) at a mid N, the machine's dense matmul rate

FLOPs: 2·N·M·D (fwd), 6·N·M·D (bwd), 8·N·M·D (fwd_bwd), math.md §2, whatever a provider really
executes (dense does more). Peak memory is the extra beyond the inputs for one fwd+bwd: on CPU the
high-water RSS of a fresh subprocess (``--_measure-memory``) minus its RSS after the inputs and a tiny
warm-up; on CUDA ``max_memory_allocated`` minus the inputs after ``reset_peak_memory_stats``.

Output: a printed table, ``<out>/clip_<mode>_<device>_<dtype>.csv`` and a ``.png`` drawn from the CSV.
"""
from __future__ import annotations

import argparse
import csv
import gc
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

PROVIDERS = ("dense", "open_clip", "reference", "chunked", "cpu", "triton", "cuda")
FUSED = ("reference", "chunked", "cpu", "triton", "cuda")
MODES = ("fwd", "bwd", "fwd_bwd")
FLOP_FACTOR = {"fwd": 2, "bwd": 6, "fwd_bwd": 8}  # × N·M·D
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
CPU_NS = (1024, 2048, 4096, 8192, 16384)
CUDA_NS = (4096, 8192, 16384, 32768, 65536)
QUICK_NS = (256, 512)
CSV_COLUMNS = ("device", "op", "provider", "mode", "dtype", "n", "m", "d", "ms_p50", "ms_p20", "ms_p80",
               "peak_mem_mb", "tflops", "torch", "triton", "commit", "note",
               "gflops", "pct_roof", "speedup_vs_dense", "repeats", "threads", "timer", "loadavg")
_MEM_TAG = "CK_BENCH_MEM "
MIB = float(1 << 20)


# ---------------------------------------------------------------------------------------------
# providers
# ---------------------------------------------------------------------------------------------

def dense_clip_loss(image_features, text_features, logit_scale):
    """open_clip ``ClipLoss`` (world_size 1, no bias): two materialised N×N logit matrices."""
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    labels = torch.arange(logits_per_image.shape[0], device=image_features.device, dtype=torch.long)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def _open_clip_loss_path() -> Optional[str]:
    try:
        spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "loss.py")
        if os.path.isfile(path):
            return path
    return None


_OPEN_CLIP_LOSS_MODULES: dict = {}


def load_open_clip_loss(path: Optional[str] = None):
    """open_clip's ``loss`` module, loaded from its file: ``(module, "")`` or ``(None, reason)``.

    Importing the ``open_clip`` package pulls in torchvision (absent on CPU images); its loss.py needs
    only torch. ``path`` overrides where loss.py is looked for. The one loader the benchmarks, the
    GPU sweep and the tests share; it never raises.
    """
    path = path or _open_clip_loss_path()
    if path is None or not os.path.isfile(path):
        return None, "open_clip (open_clip_torch) is not installed"
    if path not in _OPEN_CLIP_LOSS_MODULES:
        try:
            spec = importlib.util.spec_from_file_location("_ck_open_clip_loss", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except Exception as exc:  # reported to the caller, who skips or fails with it
            return None, f"loading {path} failed: {type(exc).__name__}: {exc}"
        _OPEN_CLIP_LOSS_MODULES[path] = module
    return _OPEN_CLIP_LOSS_MODULES[path], ""


def _load_open_clip_loss() -> Callable:
    module, why = load_open_clip_loss()
    if module is None:
        raise RuntimeError(why)
    return module.ClipLoss()


def provider_available(name: str, device: torch.device) -> tuple[bool, str]:
    """(usable, why-not) for a provider on this device; never raises."""
    if name == "dense":
        return True, ""
    if name == "open_clip":
        return (True, "") if _open_clip_loss_path() else (False, "open_clip not installed")
    if name not in FUSED:
        return False, f"unknown provider {name!r}"
    from . import backends
    try:
        ok, why = backends.availability(name)
        if ok:
            ok, why = backends._device_ok(name, device)
    except Exception as exc:  # a half-built extension must not take the benchmark down
        return False, f"{type(exc).__name__}: {exc}"
    return ok, why


def make_loss_fn(name: str) -> Callable:
    if name == "dense":
        return dense_clip_loss
    if name == "open_clip":
        return _load_open_clip_loss()
    import contrastive_kernels as ck
    return lambda img, txt, scale: ck.clip_loss(img, txt, scale, backend=name)


def dense_bytes_needed(name: str, n: int, m: int, dtype: torch.dtype) -> int:
    """Rough peak of the materialising providers: ≈ 4 copies of N×M (+30%); 0 for fused ones."""
    if name in ("dense", "open_clip"):
        esize = torch.empty(0, dtype=dtype).element_size()
        return int(4 * n * m * max(esize, 2) * 1.3)
    if name == "reference":
        return int(4 * n * m * (8 if dtype == torch.float64 else 4) * 1.3)
    return 0


# ---------------------------------------------------------------------------------------------
# inputs, one iteration, timers
# ---------------------------------------------------------------------------------------------

def make_inputs(n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int, scale: float):
    """Fresh random L2-normalised (N, D) features requiring grad, and a 0-d logit scale requiring grad."""
    gen = torch.Generator(device="cpu").manual_seed(seed + n)
    img = F.normalize(torch.randn(n, d, generator=gen), dim=1)
    txt = F.normalize(torch.randn(n, d, generator=gen) + 0.5 * img, dim=1)  # correlated pairs
    img = img.to(device=device, dtype=dtype).requires_grad_(True)
    txt = txt.to(device=device, dtype=dtype).requires_grad_(True)
    s = torch.tensor(scale, dtype=torch.float32, device=device, requires_grad=True)
    return img, txt, s


def _zero_grads(*tensors) -> None:
    for t in tensors:
        t.grad = None


class Timer:
    """Times one call of a provider in the given mode; returns milliseconds."""

    def __init__(self, device: torch.device, kind: str):
        self.device, self.kind = device, kind

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure(self, fn: Callable, inputs, mode: str) -> float:
        img, txt, scale = inputs
        _zero_grads(img, txt, scale)
        if mode == "bwd":
            loss = fn(img, txt, scale)
            self._sync()
            return self._span(lambda: loss.backward())
        if mode == "fwd":
            def body():
                return fn(img, txt, scale)  # freed after the clock stops
        else:
            def body():
                fn(img, txt, scale).backward()
        if self.kind == "do_bench":
            return self._bench(body, [img, txt, scale])
        return self._span(body)

    def _span(self, body: Callable) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            keep = body()
            end.record()
            end.synchronize()
            del keep
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        keep = body()
        ms = (time.perf_counter() - t0) * 1e3
        del keep
        return ms

    def _bench(self, body: Callable, grads) -> float:
        # One alternation sample = do_bench's median over its own short run (it flushes L2 between calls).
        return do_bench_median(body, grads)


def do_bench_median(body: Callable, grads=None) -> float:
    import triton.testing
    try:
        out = triton.testing.do_bench(body, warmup=5, rep=50, grad_to_none=grads, return_mode="median")
    except TypeError:  # older triton: no return_mode
        out = triton.testing.do_bench(body, warmup=5, rep=50, grad_to_none=grads, quantiles=[0.5])
    return float(out[0] if isinstance(out, (list, tuple)) else out)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    # VmHWM is the high-water mark of this process image only; ru_maxrss may also carry the
    # parent's high-water mark across fork+exec, which would inflate a fresh subprocess's peak.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _reset_peak_rss() -> None:
    try:  # Linux ≥ 4.0: reset VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _measure_memory_child(args) -> int:
    """Internal mode: one fwd+bwd of one provider in this fresh process; prints the extra peak RSS."""
    device = torch.device("cpu")
    dtype = DTYPES[args.dtype]
    fn = make_loss_fn(args.provider)
    tiny = make_inputs(8, args.d, dtype, device, args.seed + 7, args.logit_scale)
    fn(*tiny).backward()  # loads kernels, libraries and thread pools before the baseline
    inputs = make_inputs(args.n[0], args.d, dtype, device, args.seed, args.logit_scale)
    del tiny
    gc.collect()
    _reset_peak_rss()
    base = _rss_bytes()
    fn(*inputs).backward()
    peak = _peak_rss_bytes()
    print(_MEM_TAG + json.dumps({"peak_extra_bytes": peak - base, "base_bytes": base}), flush=True)
    return 0


def measure_memory_cpu(provider: str, n: int, d: int, dtype_name: str, seed: int, scale: float,
                       timeout: Optional[float]) -> tuple[Optional[float], str]:
    """Peak extra RSS (MiB) of one fwd+bwd in a fresh subprocess, or (None, why)."""
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # Load this file standalone (not ``-m contrastive_kernels.bench``) so the dense providers do not pay
    # for importing the package; fused providers import it themselves, before the baseline.
    boot = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('_ck_bench', "
            f"{os.path.abspath(__file__)!r}); m = importlib.util.module_from_spec(s); "
            "s.loader.exec_module(m); sys.exit(m.main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", boot, "--_measure-memory", "--providers", provider,
           "--n", str(n), "--d", str(d), "--dtype", dtype_name, "--seed", str(seed),
           "--logit-scale", repr(scale), "--device", "cpu"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "memory subprocess timed out"
    for line in proc.stdout.splitlines():
        if line.startswith(_MEM_TAG):
            return json.loads(line[len(_MEM_TAG):])["peak_extra_bytes"] / MIB, ""
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    return None, f"memory subprocess failed: {tail[0][:200]}"


def measure_memory_cuda(fn: Callable, inputs, device: torch.device) -> float:
    img, txt, scale = inputs
    _zero_grads(img, txt, scale)
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn(img, txt, scale).backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    _zero_grads(img, txt, scale)
    return (peak - base) / MIB


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()  # cached blocks of the previous N are not free to mem_get_info
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


# ---------------------------------------------------------------------------------------------
# environment facts for the CSV
# ---------------------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
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
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except Exception:
        return "unknown"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:60]


# ---------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------

class Progress:
    def __init__(self, total: int, enabled: bool = True):
        self.bar, self.done, self.total, self.enabled = None, 0, total, enabled
        self._last_print = 0.0
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="call", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def step(self, label: str, k: int = 1) -> None:
        self.done += k
        if self.bar is not None:
            self.bar.set_description(label, refresh=False)
            self.bar.update(k)
        elif self.enabled and (time.monotonic() - self._last_print > 2 or self.done >= self.total):
            self._last_print = time.monotonic()
            print(f"  [{self.done}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------------

def _row(base: dict, provider: str, n: int, **fields) -> dict:
    row = dict(base, provider=provider, n=n, m=n, loadavg=_loadavg())
    row.update(fields)
    return row


def _loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return ""


def _gib(b: float) -> str:
    return format(b / (1 << 30), ".1f" if b >= (1 << 28) else ".2g")


def _fmt(x, spec: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


class Roof:
    """torch.mm of (N×D)·(D×N): the same machine's dense matmul rate for this dtype.

    Sampled once per timed round of the sweep, alternating with the providers, so it sees the same
    drift they do."""

    def __init__(self, args, device, dtype, timer_kind: str):
        self.n, self.d, self.device, self.kind = args.roof_n, args.d, device, timer_kind
        gen = torch.Generator(device="cpu").manual_seed(args.seed)
        self.a = torch.randn(self.n, self.d, generator=gen).to(device=device, dtype=dtype)
        self.b = torch.randn(self.d, self.n, generator=gen).to(device=device, dtype=dtype)
        self.times: list[float] = []

    def sample(self, keep: bool = True) -> None:
        a, b = self.a, self.b
        if self.kind == "do_bench":
            ms = do_bench_median(lambda: torch.mm(a, b))
        elif self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            torch.mm(a, b)
            ms = (time.perf_counter() - t0) * 1e3
        if keep:
            self.times.append(ms)

    def row(self, base: dict) -> dict:
        while len(self.times) < 3:
            self.sample()
        ts, n, d = self.times, self.n, self.d
        p50 = percentile(ts, 50)
        tflops = 2.0 * n * n * d / (p50 * 1e-3) / 1e12
        return _row(base, "matmul_roof", n, mode="mm", ms_p50=p50, ms_p20=percentile(ts, 20),
                    ms_p80=percentile(ts, 80), tflops=tflops, gflops=tflops * 1e3, pct_roof=100.0,
                    repeats=len(ts), note=f"torch.mm ({n}x{d})·({d}x{n}), 2·N·N·D FLOPs")


def run_sweep(args, device: torch.device, providers: list[str], skipped: dict[str, str]) -> tuple[list[dict], int]:
    dtype = DTYPES[args.dtype]
    timer_kind = args.timer
    if timer_kind == "auto":
        timer_kind = "perf_counter"
        if device.type == "cuda":
            timer_kind = "do_bench" if (triton_version() and args.mode != "bwd") else "events"
    if timer_kind == "do_bench" and (device.type != "cuda" or not triton_version()):
        timer_kind = "events" if device.type == "cuda" else "perf_counter"
    # bwd needs an untimed forward before every timed backward, which do_bench cannot do.
    timer = Timer(device, "events" if timer_kind == "do_bench" and args.mode == "bwd" else timer_kind)
    base = dict(device=device_name(device), op="clip", mode=args.mode, dtype=args.dtype, d=args.d,
                torch=torch.__version__, triton=triton_version(), commit=git_commit(), note="",
                threads=torch.get_num_threads() if device.type == "cpu" else "", timer=timer.kind,
                loadavg=_loadavg())
    rows: list[dict] = []
    errors = 0
    t_start = time.monotonic()
    budget = args.time_budget

    roof = None
    if not args.no_roof:
        roof = Roof(args, device, dtype, timer_kind)
        for _ in range(max(args.warmup, 1)):
            roof.sample(keep=False)

    fns: dict[str, Callable] = {}
    for p in providers:
        if p in skipped:
            continue
        try:
            fns[p] = make_loss_fn(p)
        except Exception as exc:
            skipped[p] = f"failed to load: {type(exc).__name__}: {exc}"
    active = [p for p in providers if p in fns]
    per_call = args.warmup + args.repeats + (0 if args.no_memory else 1)
    progress = Progress(len(args.n) * len(active) * per_call, enabled=not args.quiet)
    oom_at: dict[str, int] = {}
    last_ms: dict[str, tuple[int, float]] = {}  # provider -> (n, median ms) for the budget estimate
    for n in args.n:
        for p in providers:
            if p in skipped:
                rows.append(_row(base, p, n, note=f"skipped: {skipped[p]}"))
        if not active:
            continue
        run_here, samples = [], {}
        for p in active:
            why = ""
            need = dense_bytes_needed(p, n, n, dtype)
            avail = args.mem_limit_gb * (1 << 30) if args.mem_limit_gb else available_bytes(device)
            if p in oom_at:
                why = f"out of memory at N={oom_at[p]}"
            elif need and need > avail:
                why = f"needs ~{_gib(need)} GiB (4 N×M copies + 30%), {_gib(avail)} GiB available"
            elif budget is not None:
                left = budget - (time.monotonic() - t_start)
                est = 0.0
                if p in last_ms:
                    n0, ms0 = last_ms[p]
                    est = ms0 * (n / n0) ** 2 * (args.warmup + args.repeats) / 1e3
                if left <= 0 or est > left:
                    why = f"time budget ({budget:g} s): ~{est:.0f} s needed, {max(left, 0):.0f} s left"
            if why:
                rows.append(_row(base, p, n, note=f"skipped: {why}"))
                progress.step(f"N={n} {p} skipped", per_call)
            else:
                run_here.append(p)
                samples[p] = []
        if not run_here:
            continue
        inputs = make_inputs(n, args.d, dtype, device, args.seed, args.logit_scale)
        losses: dict[str, float] = {}
        failed: dict[str, str] = {}
        # Alternate providers within every round so drift and thermal effects hit all equally.
        for rnd in range(args.warmup + args.repeats):
            for p in run_here:
                if p in failed:
                    continue
                try:
                    if rnd == 0:
                        _zero_grads(*inputs)
                        losses[p] = float(fns[p](*inputs).detach())
                    ms = timer.measure(fns[p], inputs, args.mode)
                except Exception as exc:  # OOM or a broken backend: record and go on
                    first = (str(exc).splitlines() or [""])[0][:200]
                    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
                        failed[p] = f"skipped: out of memory ({first})"
                    else:
                        failed[p] = f"error: {type(exc).__name__}: {first}"
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    progress.step(f"N={n} {p} failed", args.warmup + args.repeats - rnd)
                    continue
                if rnd >= args.warmup:
                    samples[p].append(ms)
                progress.step(f"N={n} {p}")
            if roof is not None and rnd >= args.warmup:
                roof.sample()
        _zero_grads(*inputs)
        mems: dict[str, tuple[Optional[float], str]] = {}
        if not args.no_memory:
            for p in run_here:
                if p in failed:
                    continue
                if device.type == "cuda":
                    try:
                        mems[p] = (measure_memory_cuda(fns[p], inputs, device), "")
                    except Exception as exc:
                        mems[p] = (None, f"memory: {type(exc).__name__}")
                else:
                    mems[p] = measure_memory_cpu(p, n, args.d, args.dtype, args.seed, args.logit_scale,
                                                 timeout=args.mem_timeout)
                progress.step(f"N={n} {p} memory")
        del inputs
        gc.collect()
        ref_loss = losses.get("dense")
        tol = 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2
        for p in run_here:
            if p in failed:
                errors += failed[p].startswith("error")
                if "out of memory" in failed[p]:
                    oom_at[p] = n
                rows.append(_row(base, p, n, note=failed[p]))
                continue
            ts = samples[p]
            p50 = percentile(ts, 50)
            last_ms[p] = (n, p50)
            tflops = FLOP_FACTOR[args.mode] * n * n * args.d / (p50 * 1e-3) / 1e12
            mem, mem_note = mems.get(p, (None, ""))
            notes = [mem_note] if mem_note else []
            if ref_loss is not None and p in losses and \
                    abs(losses[p] - ref_loss) > tol * max(1.0, abs(ref_loss)):
                notes.append(f"loss {losses[p]:.6g} differs from dense {ref_loss:.6g}")
            rows.append(_row(base, p, n, ms_p50=p50, ms_p20=percentile(ts, 20), ms_p80=percentile(ts, 80),
                             peak_mem_mb=mem, tflops=tflops, gflops=tflops * 1e3, repeats=len(ts),
                             note="; ".join(notes)))
    progress.close()
    if roof is not None:
        rows.insert(0, roof.row(base))
    _annotate(rows)
    return rows, errors


def _annotate(rows: list[dict]) -> None:
    """Fill % roof and the speed-up against dense at the same N."""
    roof = next((r for r in rows if r["provider"] == "matmul_roof"), None)
    dense = {r["n"]: r["ms_p50"] for r in rows if r["provider"] == "dense" and r.get("ms_p50")}
    for r in rows:
        if r["provider"] == "matmul_roof" or not r.get("ms_p50"):
            continue
        if roof and roof.get("tflops"):
            r["pct_roof"] = 100.0 * r["tflops"] / roof["tflops"]
        if r["n"] in dense:
            r["speedup_vs_dense"] = dense[r["n"]] / r["ms_p50"]


# ---------------------------------------------------------------------------------------------
# output: table, CSV, plot
# ---------------------------------------------------------------------------------------------

def print_table(rows: list[dict], device: torch.device, file=sys.stdout) -> None:
    cpu = device.type == "cpu"
    rate = "GFLOP/s" if cpu else "TFLOP/s"
    head = f"{'provider':<12} {'N':>6} {'ms p50 [p20-p80]':>28} {'peak extra MB':>14} {rate:>9} " \
           f"{'% roof':>7} {'vs dense':>9}  note"
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in rows:
        if r.get("ms_p50") is None:
            print(f"{r['provider']:<12} {r['n']:>6} {'-':>28} {'':>14} {'':>9} {'':>7} {'':>9}  {r['note']}",
                  file=file)
            continue
        ms = f"{r['ms_p50']:.2f} [{r['ms_p20']:.2f}-{r['ms_p80']:.2f}]"
        rate_v = r["gflops"] if cpu else r["tflops"]
        sp = r.get("speedup_vs_dense")
        print(f"{r['provider']:<12} {r['n']:>6} {ms:>28} {_fmt(r.get('peak_mem_mb'), '.1f'):>14} "
              f"{_fmt(rate_v, '.1f' if cpu else '.2f'):>9} {_fmt(r.get('pct_roof'), '.1f'):>7} "
              f"{(_fmt(sp, '.2f') + 'x') if sp else '':>9}  {r['note'] if r['provider'] != 'matmul_roof' else ''}",
              file=file)


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            out = {}
            for k in CSV_COLUMNS:
                v = r.get(k)
                out[k] = "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)
            w.writerow(out)


def plot_csv(csv_path: str, png_path: str) -> bool:
    """Two log-log panels from the CSV: time vs N and peak extra memory vs N, one line per provider."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    series: dict[str, list[tuple[int, float, Optional[float]]]] = {}
    roof = None
    for r in rows:
        if not r["ms_p50"]:
            continue
        if r["provider"] == "matmul_roof":
            roof = float(r["tflops"])
            continue
        mem = float(r["peak_mem_mb"]) if r["peak_mem_mb"] else None
        series.setdefault(r["provider"], []).append((int(r["n"]), float(r["ms_p50"]), mem))
    if not series:
        print("no timed rows: no plot", file=sys.stderr)
        return False
    first = next(r for r in rows if r["provider"] != "matmul_roof")
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    for p, pts in sorted(series.items()):
        pts.sort()
        ax_t.plot([x[0] for x in pts], [x[1] for x in pts], marker="o", label=p)
        mp = [(x[0], x[2]) for x in pts if x[2] is not None and x[2] > 0]
        if mp:
            ax_m.plot([x[0] for x in mp], [x[1] for x in mp], marker="o", label=p)
    if roof:
        ns = sorted({x[0] for pts in series.values() for x in pts})
        factor = FLOP_FACTOR.get(first["mode"], 8)
        d = int(first["d"])
        ax_t.plot(ns, [factor * n * n * d / (roof * 1e12) * 1e3 for n in ns], "k--", lw=1,
                  label="matmul floor")
    ax_t.set(xscale="log", yscale="log", xlabel="N (= M)", ylabel="ms (median)",
             title=f"clip {first['mode']} time, {first['dtype']}, D={first['d']}")
    ax_m.set(xscale="log", yscale="log", xlabel="N (= M)", ylabel="peak extra memory (MiB)",
             title="peak memory beyond inputs (one fwd+bwd)")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xscale("log", base=2)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{first['device']} · torch {first['torch']} · {first['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="contrastive-kernels bench",
        description="Time and measure the fused CLIP loss against the dense (open_clip-style) loss.",
        epilog="Example head-to-head: contrastive-kernels bench --n 8192 --providers dense,cpu --repeats 7")
    p.add_argument("--providers", default=None,
                   help=f"comma list from {','.join(PROVIDERS)} (default: every usable one for the device)")
    p.add_argument("--n", type=int, nargs="+", default=None,
                   help="batch sizes N (= M); default CPU 1024..16384, CUDA 4096..65536")
    p.add_argument("--d", type=int, default=256, help="feature dimension D (default 256)")
    p.add_argument("--mode", choices=MODES, default="fwd_bwd",
                   help="fwd (forward with autograd on), bwd (loss.backward() alone after an untimed "
                   "forward), fwd_bwd (default)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5 CPU, 10 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1 CPU, 2 CUDA)")
    p.add_argument("--timer", choices=("auto", "perf_counter", "events", "do_bench"), default="auto",
                   help="auto: perf_counter on CPU; on CUDA triton.testing.do_bench when triton is "
                   "installed (bwd mode always uses CUDA events), else CUDA events")
    p.add_argument("--out", default="bench_results", help="output folder (default ./bench_results)")
    p.add_argument("--quick", action="store_true", help="smoke run: N 256 512, 2 repeats")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-roof", action="store_true", help="skip the matmul_roof row")
    p.add_argument("--roof-n", type=int, default=None, help="N of the matmul roof (default min(4096, max N))")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole sweep; (provider, N) pairs predicted to overrun are "
                   "skipped with a note")
    p.add_argument("--mem-limit-gb", type=float, default=None,
                   help="memory the guard assumes is available (default: MemAvailable / free GPU memory)")
    p.add_argument("--mem-timeout", type=float, default=1800, help="seconds per memory subprocess")
    p.add_argument("--logit-scale", type=float, default=1 / 0.07, help="s = 1/temperature (default 1/0.07)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--_measure-memory", dest="measure_memory", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
            return 2
    on_gpu = device.type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    if args.measure_memory:
        args.provider = args.providers
        return _measure_memory_child(args)
    if args.quick:
        args.n = args.n or list(QUICK_NS)
        args.repeats = args.repeats if args.repeats is not None else 2
        args.warmup = args.warmup if args.warmup is not None else 1
    args.n = args.n or list(CUDA_NS if on_gpu else CPU_NS)
    # On CUDA each sample is already a do_bench median over ~50 ms of calls.
    args.repeats = args.repeats if args.repeats is not None else (10 if on_gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (2 if on_gpu else 1)
    args.roof_n = args.roof_n or min(4096, max(args.n))
    if min(args.n) < 1 or args.d < 1 or args.repeats < 1 or args.warmup < 0:
        print("error: N, D and --repeats must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2

    skipped: dict[str, str] = {}
    if args.providers:
        providers = [p.strip() for p in args.providers.split(",") if p.strip()]
        unknown = [p for p in providers if p not in PROVIDERS]
        if unknown:
            print(f"error: unknown provider(s) {unknown}; choose from {PROVIDERS}", file=sys.stderr)
            return 2
        for p in providers:
            ok, why = provider_available(p, device)
            if not ok:
                skipped[p] = why
                print(f"note: provider {p} skipped: {why}", file=sys.stderr)
    else:
        providers = []
        for p in PROVIDERS:
            if p == "reference":
                continue  # a checking backend, not a contender; ask for it explicitly
            ok, why = provider_available(p, device)
            if ok:
                providers.append(p)
            elif not (p in ("triton", "cuda") and not on_gpu):
                print(f"note: provider {p} not usable: {why}", file=sys.stderr)

    load = _loadavg()
    if load and float(load) > 0.5 * (os.cpu_count() or 1) and not on_gpu:
        print(f"warning: load average {load} on {os.cpu_count()} CPUs before starting: other work is "
              "running, timings will be noisy", file=sys.stderr)
    rows, errors = run_sweep(args, device, providers, skipped)
    os.makedirs(args.out, exist_ok=True)
    stem = f"clip_{args.mode}_{_slug(device_name(device))}_{args.dtype}"
    csv_path = os.path.join(args.out, stem + ".csv")
    write_csv(rows, csv_path)
    print()
    print(f"clip {args.mode}, {args.dtype}, D={args.d}, on {device_name(device)}; "
          f"{args.repeats} repeats after {args.warmup} warm-up; FLOPs {FLOP_FACTOR[args.mode]}·N·M·D")
    print_table(rows, device)
    print(f"\nCSV: {csv_path}")
    if not args.no_plot:
        png_path = os.path.join(args.out, stem + ".png")
        if plot_csv(csv_path, png_path):
            print(f"plot: {png_path}")
    if errors:
        print(f"{errors} provider/N combination(s) failed; see the note column", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
