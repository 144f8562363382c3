"""The benchmark engine: points × providers, alternated rounds, memory, roof, rows to the CSV.

For each point (op, N, D, dtype, mode) the providers are timed in alternating rounds (round r runs
every provider once), so drift and thermal effects hit all of them equally; the roof is sampled in
the same rounds. Peak memory beyond the inputs during one call in the row's mode: on CPU the shared
probe (``_memprobe``: a fresh process); on CUDA ``torch.cuda.max_memory_allocated`` around the last
timed call (or one extra call when ``do_bench`` did the timing). A
provider whose loss differs from dense's gets a note (a wrong result is never silently timed).
Every row goes to the CSV the moment it exists.
"""
from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .. import _memprobe
from . import providers as P
from .schema import CsvSink, base_facts, loadavg
from .timing import Timer, copy_bandwidth, default_timer, gemm_ceiling, mm_ms, percentile

MIB = float(1 << 20)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp32": torch.float32}


@dataclass
class Point:
    op: str
    n: int
    d: int
    dtype: str
    mode: str
    providers: list
    env: dict = field(default_factory=dict)   # knob overrides while this point runs
    tag: str = ""                               # shown in the provider column, e.g. a variant
    warmup_n: int = 0                           # warm up (autotune) at this N instead of N


@dataclass
class Settings:
    device: torch.device
    repeats: int
    warmup: int
    timer: str = "auto"
    memory: bool = True
    roof: bool = True
    time_budget: Optional[float] = None
    mem_limit_gb: Optional[float] = None
    mem_timeout: float = 1800
    logit_scale: float = 1 / 0.07
    seed: int = 0
    quiet: bool = False
    config: str = ""


class Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar, self.done, self.total, self.enabled = None, 0, total, enabled
        self._last = 0.0
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
        elif self.enabled and (time.monotonic() - self._last > 2 or self.done >= self.total):
            self._last = time.monotonic()
            print(f"  [{self.done}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Env:
    """Temporarily set environment variables (knobs the kernels read at call time)."""

    def __init__(self, env: dict):
        self.env, self.old = env, {}

    def __enter__(self):
        for k, v in self.env.items():
            self.old[k] = os.environ.get(k)
            os.environ[k] = str(v)

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def available_bytes(device: torch.device, limit_gb: Optional[float]) -> int:
    if limit_gb:
        return int(limit_gb * (1 << 30))
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _gib(b: float) -> str:
    return format(b / (1 << 30), ".1f" if b >= (1 << 28) else ".2g")


_MEM_SETUP = """
import torch
from contrastive_kernels.bench import providers as P
from contrastive_kernels.bench.runner import DTYPES
op, name, n, d, dtype, seed, scale = {op!r}, {name!r}, {n}, {d}, DTYPES[{dtype!r}], {seed}, {scale!r}
env = {env!r}
import os
os.environ.update({{k: str(v) for k, v in env.items()}})
fn = P.make_provider(op, name).fn
tiny = P.make_inputs(op, 8, d, dtype, torch.device("cpu"), seed + 7, scale)
inputs = P.make_inputs(op, n, d, dtype, torch.device("cpu"), seed, scale)
"""
_MEM_WARMUP = "fn(*tiny).backward()\ndel tiny"
_MEM_CODE = {"fwd": "loss = fn(*inputs)", "bwd": "fn(*inputs).backward()",
             "fwd_bwd": "fn(*inputs).backward()"}


def memory_cpu(point: Point, name: str, s: Settings) -> tuple[Optional[float], str]:
    """Peak extra memory (MiB) of one call of a provider in the point's mode, by the shared probe."""
    if not _memprobe.available():
        return None, "memory: no /proc (Linux only)"
    setup = _MEM_SETUP.format(op=point.op, name=name, n=point.n, d=point.d, dtype=point.dtype,
                              seed=s.seed, scale=s.logit_scale, env=point.env)
    try:
        out = _memprobe.peak_extra_bytes(_MEM_CODE[point.mode], setup=setup, warmup=_MEM_WARMUP,
                                         timeout=s.mem_timeout)
    except Exception as exc:
        return None, f"memory probe failed: {str(exc).splitlines()[-1][:160]}"
    return out["extra_bytes"] / MIB, ""


def memory_cuda(fn: Callable, inputs: tuple, device: torch.device) -> float:
    for t in inputs:
        if isinstance(t, torch.Tensor):
            t.grad = None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn(*inputs).backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    for t in inputs:
        if isinstance(t, torch.Tensor):
            t.grad = None
    return (peak - base) / MIB


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return (isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text
            or "can't allocate memory" in text or "cannot allocate memory" in text)


class Runner:
    """Runs points, writing rows to ``sink`` (and keeping them for the table and the summary)."""

    def __init__(self, settings: Settings, sink: Optional[CsvSink]):
        self.s = settings
        self.sink = sink
        self.rows: list[dict] = []
        self.errors = 0
        self.t0 = time.monotonic()
        self.last_ms: dict = {}       # (provider, op, d, dtype, mode) -> (n, ms) for the budget
        self.oom_at: dict = {}
        self.roofs: dict = {}         # dtype name -> roof row
        self.roof_n = 4096            # CPU roof GEMM side (set to the largest N run, ≤ 4096)

    # -- rows ---------------------------------------------------------------------------------

    def emit(self, row: dict) -> dict:
        timer = row.pop("_timer", None) or self.s.timer
        full = dict(base_facts(self.s.device, timer), config=self.s.config, loadavg=loadavg())
        full.update(row)
        self.rows.append(full)
        if self.sink is not None:
            self.sink.write(full)
        return full

    def left(self) -> Optional[float]:
        if self.s.time_budget is None:
            return None
        return self.s.time_budget - (time.monotonic() - self.t0)

    # -- roofs --------------------------------------------------------------------------------

    def roof(self, dtype_name: str, d: int, n: int) -> Optional[dict]:
        """The ceiling row of a dtype (measured once per run)."""
        if not self.s.roof:
            return None
        if dtype_name in self.roofs:
            return self.roofs[dtype_name]
        dev = self.s.device
        timer = Timer(dev, "events" if dev.type == "cuda" else "perf_counter")
        try:
            r = gemm_ceiling(dev, DTYPES[dtype_name], min(self.roof_n, 4096), d, timer, repeats=5,
                             seed=self.s.seed)
        except Exception as exc:
            self.emit(dict(op="mm", provider="gemm_ceiling", ours=False, mode="mm", dtype=dtype_name,
                           note=f"failed: {type(exc).__name__}: {exc}"))
            self.roofs[dtype_name] = None
            return None
        ts = r["ms"]
        row = self.emit(dict(op="mm", provider="gemm_ceiling", ours=False, mode="mm",
                             dtype=dtype_name, n=r["n"], m=r["n"], d=r["d"],
                             ms_p50=percentile(ts, 50), ms_p20=percentile(ts, 20),
                             ms_p80=percentile(ts, 80), repeats=len(ts), tflops=r["tflops"],
                             pct_roof=100.0, note=r["note"], _timer=timer.kind))
        self.roofs[dtype_name] = row
        if dev.type == "cuda" and "copy_bw" not in self.roofs:
            try:
                gbps = copy_bandwidth(dev, timer)
                self.roofs["copy_bw"] = self.emit(dict(op="copy", provider="copy_bw", ours=False,
                                                       mode="copy", dtype="float32", gbps=gbps,
                                                       note="device-to-device copy, 1 GiB",
                                                       _timer=timer.kind))
            except Exception as exc:
                self.roofs["copy_bw"] = None
                self.emit(dict(op="copy", provider="copy_bw", note=f"failed: {exc}"))
        return row

    # -- one point ----------------------------------------------------------------------------

    def run_point(self, pt: Point, progress: Optional[Progress] = None) -> list[dict]:
        s, dev = self.s, self.s.device
        dtype = DTYPES[pt.dtype]
        if pt.op == "mm":
            return [self.run_mm(pt, dtype, progress)]
        timer_kind = default_timer(dev, pt.mode) if s.timer == "auto" else s.timer
        if timer_kind == "do_bench" and pt.mode == "bwd":
            timer_kind = "events"
        if timer_kind in ("events", "do_bench") and dev.type != "cuda":
            timer_kind = "perf_counter"  # a configuration's GPU timer, run on the CPU (dry run)
        timer = Timer(dev, timer_kind)
        r, c = P.logit_shape(pt.op, pt.n)
        base = dict(op=pt.op, mode=pt.mode, dtype=pt.dtype, n=pt.n, m=pt.n, d=pt.d, _timer=timer_kind)
        roof = self.roof(pt.dtype, pt.d, pt.n)
        label = (lambda name: f"{name}[{pt.tag}]" if pt.tag else name)
        out: list[dict] = []
        run_here, fns = [], {}
        for name in pt.providers:
            name = P.canonical(name)
            why = ""
            ok, reason = P.provider_available(pt.op, name, dev)
            if not ok:
                why = f"skipped: {reason}"
            else:
                try:
                    prov = P.make_provider(pt.op, name)
                except Exception as exc:
                    prov, why = None, f"skipped: failed to load: {type(exc).__name__}: {exc}"
                if prov is not None:
                    need = P.dense_bytes_needed(prov, pt.n, dtype)
                    avail = available_bytes(dev, s.mem_limit_gb)
                    key = (name, pt.op, pt.d, pt.dtype, pt.mode)
                    left = self.left()
                    if (name, pt.op) in self.oom_at:
                        why = f"skipped: out of memory at N={self.oom_at[(name, pt.op)]}"
                    elif need and need > avail:
                        why = (f"skipped: needs ~{_gib(need)} GiB (4 copies of the {r}×{c} logits "
                               f"+ 30%), {_gib(avail)} GiB available")
                    elif left is not None:
                        est = 0.0
                        if key in self.last_ms:
                            n0, ms0 = self.last_ms[key]
                            est = ms0 * (pt.n / n0) ** 2 * (s.warmup + s.repeats) / 1e3
                        if left <= 0 or est > left:
                            why = f"skipped: time budget (~{est:.0f} s needed, {max(left, 0):.0f} s left)"
            if why:
                out.append(self.emit(dict(base, provider=label(name), ours=P.ours(name), note=why)))
                if progress:
                    progress.step(f"{pt.op} N={pt.n} {name} skipped",
                                  s.warmup + s.repeats + int(s.memory))
                continue
            run_here.append(name)
            fns[name] = prov.fn
        if not run_here:
            return out

        samples = {p: [] for p in run_here}
        losses: dict = {}
        failed: dict = {}
        with _Env(pt.env):
            if pt.warmup_n and pt.warmup_n != pt.n:
                small = P.make_inputs(pt.op, pt.warmup_n, pt.d, dtype, dev, s.seed, s.logit_scale)
                for p in run_here:
                    try:
                        fns[p](*small).backward()
                    except Exception as exc:
                        failed[p] = f"error in warm-up at N={pt.warmup_n}: {type(exc).__name__}: {exc}"
                del small
            inputs = P.make_inputs(pt.op, pt.n, pt.d, dtype, dev, s.seed, s.logit_scale)
            # The loss values are compared with dense's (an extra forward each), when dense runs.
            check = "dense" in run_here
            # CUDA peak memory: read around the last timed call (no extra call) unless do_bench
            # times it (its repeated calls and L2-flush buffer would pollute the peak).
            mems: dict = {}
            peak_in_last = s.memory and dev.type == "cuda" and timer.kind != "do_bench"
            last = s.warmup + s.repeats - 1
            for rnd in range(s.warmup + s.repeats):
                for p in run_here:
                    if p in failed:
                        continue
                    try:
                        if rnd == 0 and check:
                            losses[p] = float(fns[p](*inputs).detach())
                        if peak_in_last and rnd == last:
                            torch.cuda.synchronize(dev)
                            torch.cuda.reset_peak_memory_stats(dev)
                            mem_base = torch.cuda.memory_allocated(dev)
                        ms = timer.measure(fns[p], inputs, pt.mode)
                        if peak_in_last and rnd == last:
                            torch.cuda.synchronize(dev)
                            mems[p] = ((torch.cuda.max_memory_allocated(dev) - mem_base) / MIB, "")
                    except Exception as exc:
                        first = (str(exc).splitlines() or [""])[0][:200]
                        if _is_oom(exc):
                            failed[p] = f"skipped: out of memory ({first})"
                            self.oom_at[(p, pt.op)] = pt.n
                        else:
                            failed[p] = f"error: {type(exc).__name__}: {first}"
                        if dev.type == "cuda":
                            torch.cuda.empty_cache()
                        if progress:
                            progress.step(f"{pt.op} N={pt.n} {p} failed", s.warmup + s.repeats - rnd)
                        continue
                    if rnd >= s.warmup:
                        samples[p].append(ms)
                    if progress:
                        progress.step(f"{pt.op} N={pt.n} {p}")
            if s.memory:
                for p in run_here:
                    if p in failed or p in mems:
                        continue
                    if dev.type == "cuda":
                        try:
                            mems[p] = (memory_cuda(fns[p], inputs, dev), "")
                        except Exception as exc:
                            mems[p] = (None, f"memory: {type(exc).__name__}")
                    else:
                        mems[p] = memory_cpu(pt, p, s)
                    if progress:
                        progress.step(f"{pt.op} N={pt.n} {p} memory")
            del inputs
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

        dense_loss = losses.get("dense")
        dense_ms = None
        for p in run_here:
            if p == "dense" and p not in failed and samples[p]:
                dense_ms = percentile(samples[p], 50)
        for p in run_here:
            row = dict(base, provider=label(p), ours=P.ours(p))
            if p in failed:
                self.errors += failed[p].startswith("error")
                out.append(self.emit(dict(row, note=failed[p])))
                continue
            ts = samples[p]
            p50 = percentile(ts, 50)
            self.last_ms[(p, pt.op, pt.d, pt.dtype, pt.mode)] = (pt.n, p50)
            tflops = P.flops(pt.op, pt.mode, pt.n, pt.d) / (p50 * 1e-3) / 1e12
            mem, mem_note = mems.get(p, (None, ""))
            notes = [mem_note] if mem_note else []
            if dense_loss is not None and p in losses and not P.close(losses[p], dense_loss, dtype):
                notes.append(f"loss {losses[p]:.6g} differs from dense {dense_loss:.6g}")
            out.append(self.emit(dict(
                row, ms_p50=p50, ms_p20=percentile(ts, 20), ms_p80=percentile(ts, 80),
                repeats=len(ts), peak_mem_mb=mem, tflops=tflops,
                pct_roof=(100.0 * tflops / roof["tflops"]) if roof and roof.get("tflops") else None,
                speedup_vs_dense=(dense_ms / p50) if dense_ms and p != "dense" else None,
                note="; ".join(notes))))
        return out

    def run_mm(self, pt: Point, dtype: torch.dtype, progress: Optional[Progress]) -> dict:
        """An ``op="mm"`` point: torch.mm (N×D)·(D×N) (CPU: all threads), 2·N²·D FLOPs."""
        s = self.s
        timer = Timer(s.device, "events" if s.device.type == "cuda" else "perf_counter")
        with _Env(pt.env):
            ts = mm_ms(pt.n, pt.d, dtype, timer, s.warmup + s.repeats, s.seed)[s.warmup:]
        if progress:
            progress.step(f"mm N={pt.n} {pt.dtype}", s.warmup + s.repeats + int(s.memory))
        p50 = percentile(ts, 50)
        return self.emit(dict(op="mm", provider="torch.mm", ours=False, mode="mm", dtype=pt.dtype,
                              n=pt.n, m=pt.n, d=pt.d, ms_p50=p50, ms_p20=percentile(ts, 20),
                              ms_p80=percentile(ts, 80), repeats=len(ts),
                              tflops=2.0 * pt.n * pt.n * pt.d / (p50 * 1e-3) / 1e12,
                              note=f"torch.mm ({pt.n}x{pt.d})·({pt.d}x{pt.n}), preallocated output",
                              _timer=timer.kind))

    def run(self, points: list) -> list[dict]:
        s = self.s
        per = s.warmup + s.repeats + int(s.memory)
        self.roof_n = max(pt.n for pt in points)
        progress = Progress(sum(len(pt.providers) for pt in points) * per, enabled=not s.quiet)
        try:
            for pt in points:
                self.run_point(pt, progress)
        finally:
            progress.close()
        return self.rows
