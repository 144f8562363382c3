#!/usr/bin/env python
"""Issue 3's GPU sweep: symmetric CLIP loss, fused backends vs dense (open_clip) vs inf_cl.

    python benchmarks/gpu_sweep.py --out results_gpu            # the sweep (CUDA)
    python benchmarks/gpu_sweep.py --dry-run --out /tmp/smoke   # CPU smoke: tiny sizes

Providers (all symmetric CLIP losses of (img, txt, logit_scale), mean reduction):
    dense     open_clip's ``ClipLoss`` loaded from open_clip/loss.py by file path (the package's
              __init__ wants more than the GPU machine has); if absent, the same two-matrix formula
              inline, marked ``inline`` in the note column
    inf_cl    ``inf_cl.cal_inf_loss`` (the inf-cl package), symmetric = mean of its two
              one-directional calls; it computes in float32 internally whatever the input dtype
    chunked, triton, cuda
              ``contrastive_kernels.clip_loss(img, txt, logit_scale, backend=name)``
    matmul_roof  torch.mm (N×D)·(D×N) per dtype and D, plus 8192³: the same run's dense matmul
              rate; ``roof`` = the best of them for the dtype (``pct_roof`` is against it)
    copy_bw   device-to-device copy bandwidth (GB/s in the tflops column's place is NOT used:
              it goes to the note column)

Modes: fwd (no autograd graph), bwd (autograd.grad of a retained graph), fwd_bwd. FLOPs counted
as 2/6/8·N·M·D (math.md §2) for every provider, whatever it really executes. Timing:
triton.testing.do_bench (L2 flushed, fresh runs) median and 20/80 percentiles. Peak memory: the
high-water mark of torch.cuda.max_memory_allocated during one call minus what was allocated
before it (the inputs), in MiB. Out-of-memory is caught and recorded as a row with note ``OOM``.

Order and budget: the acceptance point (N = M = 32768, D = 512, bf16) runs first, then the N
sweep at D = 512, then fp32, then the D sweep, then the rest, each in increasing cost; the sweep
stops starting new points once ``--budget-s`` has elapsed (the GPU command may run 10 minutes),
and every row is flushed to the CSV as soon as it is measured.
"""
from __future__ import annotations

import argparse
import csv
import gc
import math
import os
import subprocess
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

COLUMNS = ["device", "op", "provider", "mode", "dtype", "n", "m", "d", "ms_p50", "ms_p20", "ms_p80",
           "peak_mem_mb", "tflops", "torch", "triton", "commit", "pct_roof", "note"]
FLOP_FACTOR = {"fwd": 2, "bwd": 6, "fwd_bwd": 8}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ACCEPT = dict(n=32768, d=512, dtype="bf16")


# ------------------------------------------------------------------------------------------------
# providers
# ------------------------------------------------------------------------------------------------

def _open_clip_loss(path: Optional[str]):
    """open_clip's ClipLoss class from loss.py by file path, or (None, reason)."""
    from contrastive_kernels.bench import load_open_clip_loss

    module, why = load_open_clip_loss(path)
    return (module.ClipLoss, path or "open_clip/loss.py") if module is not None else (None, why)


def _dense_inline(img, txt, s):
    li = s * img @ txt.T
    lt = s * txt @ img.T
    lab = torch.arange(li.shape[0], device=img.device)
    return (F.cross_entropy(li, lab) + F.cross_entropy(lt, lab)) / 2


def make_providers(names, open_clip_path):
    """name -> (callable(img, txt, s) -> loss, note) or (None, reason)."""
    out = {}
    for name in names:
        if name == "dense":
            cls, where = _open_clip_loss(open_clip_path)
            if cls is not None:
                loss = cls()
                out[name] = (lambda i, t, s, _l=loss: _l(i, t, s), f"open_clip {where}")
            else:
                out[name] = (_dense_inline, f"inline open_clip formula ({where})")
        elif name == "inf_cl":
            try:
                from inf_cl import cal_inf_loss
            except Exception as e:  # noqa: BLE001
                out[name] = (None, f"inf_cl not importable: {type(e).__name__}: {e}")
                continue
            out[name] = (lambda i, t, s: (cal_inf_loss(i, t, scale=s) + cal_inf_loss(t, i, scale=s)) / 2,
                         "inf_cl.cal_inf_loss x2")
        else:
            try:
                import contrastive_kernels as ck
                ok, why = ck.availability(name)
            except Exception as e:  # noqa: BLE001
                ok, why = False, f"{type(e).__name__}: {e}"
            if not ok:
                out[name] = (None, f"backend {name} unavailable: {why}")
                continue
            out[name] = (lambda i, t, s, _b=name: ck.clip_loss(i, t, s, backend=_b), f"ck.clip_loss({name})")
    return out


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------

def _bench(fn: Callable, device: str, grads, repeats: int):
    """(p50, p20, p80) in ms."""
    if device == "cuda":
        import triton.testing
        q = triton.testing.do_bench(fn, warmup=10, rep=max(20, 10 * repeats), grad_to_none=grads,
                                    quantiles=[0.5, 0.2, 0.8])
        return tuple(float(x) for x in q)
    times = []
    fn()
    for _ in range(max(3, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    pick = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return pick(0.5), pick(0.2), pick(0.8)


def _inputs(n, d, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    img = F.normalize(torch.randn(n, d, device=device, generator=g), dim=1).to(dtype)
    txt = F.normalize(torch.randn(n, d, device=device, generator=g), dim=1).to(dtype)
    return img, txt


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def measure(fn, n, d, dtype, mode, device, repeats):
    """One provider point: dict of ms_p50/p20/p80, peak_mem_mb; raises on OOM."""
    img, txt = _inputs(n, d, dtype, device)
    s = torch.tensor(100.0, device=device)
    if mode == "fwd":
        def body():
            with torch.no_grad():
                return fn(img, txt, s)
        grads = None
    else:
        img.requires_grad_(True)
        txt.requires_grad_(True)
        s.requires_grad_(True)
        grads = [img, txt, s]
        if mode == "fwd_bwd":
            def body():
                fn(img, txt, s).backward()
        else:
            loss = fn(img, txt, s)

            def body():
                torch.autograd.grad(loss, grads, retain_graph=True)
    # peak memory of one call, beyond what is already allocated (inputs, retained graph for bwd)
    if device == "cuda":
        body()  # warm-up: compiles and autotunes (which allocates buffers of its own)
        torch.cuda.synchronize()
        for x in grads or []:
            x.grad = None
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        body()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        body()
        peak = float("nan")
    p50, p20, p80 = _bench(body, device, grads, repeats)
    return dict(ms_p50=p50, ms_p20=p20, ms_p80=p80, peak_mem_mb=peak)


def matmul_rate(n, d, dtype, device):
    a = torch.randn(n, d, device=device).to(dtype)
    b = torch.randn(d, n, device=device).to(dtype)
    p50, p20, p80 = _bench(lambda: torch.mm(a, b), device, None, 10)
    return p50, p20, p80, 2.0 * n * n * d / (p50 * 1e-3) / 1e12


def copy_bw(device, mib=1024):
    x = torch.empty(mib << 18, device=device)  # float32: mib MiB
    y = torch.empty_like(x)
    p50, _, _ = _bench(lambda: y.copy_(x), device, None, 10)
    return 2 * x.numel() * 4 / (p50 * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------------
# the sweep
# ------------------------------------------------------------------------------------------------

def versions():
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = ""
    commit = os.environ.get("CK_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001
            commit = ""
    return torch.__version__, tv, commit or "unknown"


def plan(args):
    """Ordered list of (tier, provider, dtype, n, d, mode)."""
    pts = []
    for prov in args.providers:
        for dt in args.dtypes:
            for n in args.ns:
                for d in args.ds:
                    for mode in args.modes:
                        acc = n == ACCEPT["n"] and d == ACCEPT["d"] and dt == ACCEPT["dtype"]
                        if acc:
                            tier = 0
                        elif d == ACCEPT["d"] and dt == ACCEPT["dtype"] and mode == "fwd_bwd":
                            tier = 1
                        elif d == ACCEPT["d"] and mode == "fwd_bwd":
                            tier = 2
                        elif n == ACCEPT["n"] and mode == "fwd_bwd":
                            tier = 3
                        else:
                            tier = 4
                        pts.append((tier, FLOP_FACTOR[mode] * n * n * d, prov, dt, n, d, mode))
    pts.sort(key=lambda p: (p[0], p[1], args.providers.index(p[2])))
    return pts


def run(args) -> str:
    device = args.device
    os.makedirs(args.out, exist_ok=True)
    tv, trv, commit = versions()
    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} threads)"
    if args.fp32_precision:
        torch.set_float32_matmul_precision(args.fp32_precision)
    csv_path = os.path.join(args.out, f"clip_sweep{('_' + args.tag) if args.tag else ''}.csv")
    f = open(csv_path, "w", newline="")
    w = csv.DictWriter(f, fieldnames=COLUMNS)
    w.writeheader()
    t_start = time.time()

    def emit(row):
        base = dict(device=dev_name, op="clip", torch=tv, triton=trv, commit=commit)
        base.update(row)
        w.writerow({k: ("" if base.get(k) is None else base.get(k)) for k in COLUMNS})
        f.flush()
        print(" ".join(f"{k}={base.get(k)}" for k in ("provider", "mode", "dtype", "n", "d", "ms_p50",
                                                          "tflops", "peak_mem_mb", "pct_roof", "note")),
              flush=True)

    try:
        from contrastive_kernels.triton_kernels import lse as _lse
        print("triton host choices:", _lse.describe(), flush=True)
    except Exception as e:  # noqa: BLE001
        print("triton backend not importable:", e, flush=True)

    roof = {}
    if not args.skip_roof:
        if device == "cuda":
            emit(dict(provider="copy_bw", mode="fwd", dtype="fp32", n=0, m=0, d=0,
                      note=f"{copy_bw(device):.0f} GB/s device-to-device copy"))
        for dt in args.dtypes:
            shapes = [(8192, 8192)] if device == "cuda" else [(256, 256)]
            shapes += [(16384 if device == "cuda" else 256, d) for d in args.ds]
            for n, d in shapes:
                try:
                    p50, p20, p80, tf = matmul_rate(n, d, DTYPES[dt], device)
                except Exception as e:  # noqa: BLE001
                    emit(dict(provider="matmul_roof", mode="fwd", dtype=dt, n=n, m=n, d=d, note=f"failed: {e}"))
                    continue
                roof[dt] = max(roof.get(dt, 0.0), tf)
                emit(dict(provider="matmul_roof", mode="fwd", dtype=dt, n=n, m=n, d=d, ms_p50=f"{p50:.4f}",
                          ms_p20=f"{p20:.4f}", ms_p80=f"{p80:.4f}", tflops=f"{tf:.2f}",
                          note=f"torch.mm; fp32 precision {torch.get_float32_matmul_precision()}"))

    provs = make_providers(args.providers, args.open_clip_loss)
    results = []
    for tier, _, prov, dt, n, d, mode in plan(args):
        fn, note = provs[prov]
        row = dict(provider=prov, mode=mode, dtype=dt, n=n, m=n, d=d)
        if fn is None:
            if (dt, n, d, mode) == (args.dtypes[0], args.ns[0], args.ds[0], args.modes[0]):
                emit(dict(row, note=f"skipped: {note}"))
            continue
        if time.time() - t_start > args.budget_s:
            emit(dict(row, note="skipped: time budget"))
            continue
        if prov == "inf_cl" and d % 256:
            continue
        try:
            r = measure(fn, n, d, DTYPES[dt], mode, device, args.repeats)
            tf = FLOP_FACTOR[mode] * n * n * d / (r["ms_p50"] * 1e-3) / 1e12
            pr = tf / roof[dt] if dt in roof else None
            rec = dict(row, ms_p50=f"{r['ms_p50']:.4f}", ms_p20=f"{r['ms_p20']:.4f}",
                       ms_p80=f"{r['ms_p80']:.4f}", peak_mem_mb=f"{r['peak_mem_mb']:.1f}",
                       tflops=f"{tf:.2f}", pct_roof=(f"{100 * pr:.1f}" if pr else ""), note=note)
            results.append(dict(rec, tf=tf, ms=r["ms_p50"], mem=r["peak_mem_mb"]))
            emit(rec)
        except Exception as e:  # noqa: BLE001
            emit(dict(row, note=("OOM" if _is_oom(e) else f"error: {type(e).__name__}: {str(e)[:200]}")))
        finally:
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()

    if args.huge:
        huge(args, emit, provs, device)
    f.close()
    summary(results, roof, args)
    if not args.no_plot:
        try:
            plot(csv_path)
        except Exception as e:  # noqa: BLE001 - a plot must never lose the measurements
            print("plot failed:", type(e).__name__, e)
    return csv_path


def huge(args, emit, provs, device):
    """One fwd+bwd at N = M = args.huge (D 512, bf16) on each fused GPU backend in --providers."""
    names = [p for p in ("triton", "cuda") if p in args.providers]
    if not names:
        emit(dict(provider="triton", mode="fwd_bwd", dtype="bf16", n=args.huge, m=args.huge, d=ACCEPT["d"],
                  note="huge skipped: neither triton nor cuda in --providers"))
    for name in names:
        _huge_one(args, emit, provs, device, name)


def _huge_one(args, emit, provs, device, name):
    fn, note = provs.get(name, (None, f"{name} provider unavailable"))
    d = ACCEPT["d"]
    row = dict(provider=name, mode="fwd_bwd", dtype="bf16", n=args.huge, m=args.huge, d=d)
    if fn is None:
        emit(dict(row, note=f"huge skipped: {note}"))
        return
    img = txt = s = loss = None
    try:
        # warm up (triton: autotune) at a size in the same autotune bucket: tuning at 2^20 takes minutes
        warm_n = min(args.huge, 65536)
        img, txt = _inputs(warm_n, d, torch.bfloat16, device)
        img.requires_grad_(True)
        txt.requires_grad_(True)
        fn(img, txt, torch.tensor(100.0, device=device)).backward()
        img = txt = None
        gc.collect()
        torch.cuda.empty_cache()
        img, txt = _inputs(args.huge, d, torch.bfloat16, device)
        img.requires_grad_(True)
        txt.requires_grad_(True)
        s = torch.tensor(100.0, device=device, requires_grad=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss = fn(img, txt, s)
        loss.backward()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        ok = bool(torch.isfinite(loss).item() and torch.isfinite(img.grad).all().item()
                  and torch.isfinite(txt.grad).all().item())
        tf = 8 * args.huge * args.huge * d / (ms * 1e-3) / 1e12
        emit(dict(row, ms_p50=f"{ms:.1f}", peak_mem_mb=f"{peak:.1f}", tflops=f"{tf:.2f}",
                  note=f"single run (includes no autotuning); finite={ok}; loss={loss.item():.4f}"))
    except Exception as e:  # noqa: BLE001
        emit(dict(row, note=("OOM" if _is_oom(e) else f"error: {type(e).__name__}: {str(e)[:200]}")))
    finally:  # free this backend's inputs and gradients before the next one
        img = txt = s = loss = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def summary(results, roof, args):
    print("\n==== summary ====")
    print("roof TFLOP/s:", {k: round(v, 1) for k, v in roof.items()})
    key = lambda r: (r["mode"], r["dtype"], r["n"], r["d"])  # noqa: E731
    by = {}
    for r in results:
        by.setdefault(key(r), {})[r["provider"]] = r
    print(f"{'mode':8} {'dtype':5} {'n':>7} {'d':>5} | " + " | ".join(f"{p:>22}" for p in args.providers))
    for k in sorted(by):
        cells = []
        for p in args.providers:
            r = by[k].get(p)
            cells.append(f"{r['ms']:9.2f}ms {r['tf']:6.1f}TF {r['mem']:7.0f}M"[:22].rjust(22) if r else " " * 22)
        print(f"{k[0]:8} {k[1]:5} {k[2]:>7} {k[3]:>5} | " + " | ".join(cells))
    acc = by.get(("fwd_bwd", ACCEPT["dtype"], ACCEPT["n"], ACCEPT["d"]), {})
    t = acc.get("triton")
    if t:
        print(f"\nacceptance (fwd_bwd {ACCEPT['dtype']} N=M={ACCEPT['n']} D={ACCEPT['d']}, triton):")
        if "bf16" in roof:
            print(f"  fraction of bf16 roof: {t['tf'] / roof['bf16']:.1%}  (target >= 60%)")
        for other, target in (("dense", 2.0), ("inf_cl", 1.5)):
            o = acc.get(other)
            if o:
                print(f"  speed-up vs {other}: {o['ms'] / t['ms']:.2f}x  (target >= {target}x)")
        o = acc.get("dense")
        if o and o["mem"] == o["mem"] and o["mem"] > 0:
            print(f"  peak extra memory: {t['mem']:.0f} MiB = {t['mem'] / o['mem']:.1%} of dense "
                  f"({o['mem']:.0f} MiB)  (target <= 3%)")
    # issue 4: the cuda backend against triton, and the data the `auto` rule is derived from
    pairs = [(k, v["cuda"], v["triton"]) for k, v in sorted(by.items())
             if k[0] == "fwd_bwd" and "cuda" in v and "triton" in v]
    if pairs:
        print("\ncuda vs triton, fwd_bwd (time ratio cuda/triton; < 1: cuda faster) — input to the auto rule:")
        for k, c, t in pairs:
            print(f"  {k[1]:5} n={k[2]:>7} d={k[3]:>5}: {c['ms'] / t['ms']:5.2f}x  "
                  f"-> {'cuda' if c['ms'] < t['ms'] else 'triton'}")
        c, t = acc.get("cuda"), acc.get("triton")
        if c and t:
            print(f"acceptance (issue 4): cuda/triton at fwd_bwd {ACCEPT['dtype']} N=M={ACCEPT['n']} D={ACCEPT['d']}: "
                  f"{c['ms'] / t['ms']:.2f}x  (target <= 1.25x)")


def plot(csv_path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print("no plot:", e)
        return
    rows = list(csv.DictReader(open(csv_path)))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, field, label in ((axes[0], "tflops", "TFLOP/s (8·N²·D / time)"), (axes[1], "peak_mem_mb", "peak extra MiB")):
        series = {}
        for r in rows:
            if r["mode"] != "fwd_bwd" or r["d"] != str(ACCEPT["d"]) or not r[field] or r["provider"] == "matmul_roof":
                continue
            v = float(r[field])
            if math.isfinite(v) and v > 0:
                series.setdefault((r["provider"], r["dtype"]), []).append((int(r["n"]), v))
        for (p, dt), pts in sorted(series.items()):
            pts.sort()
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"{p} {dt}")
        if field == "tflops":
            for r in rows:
                if r["provider"] == "matmul_roof" and r["tflops"] and r["n"] == "8192" and r["d"] == "8192":
                    ax.axhline(float(r["tflops"]), ls="--", lw=0.8, color="gray")
        ax.set_xscale("log", base=2)
        if field == "peak_mem_mb" and series:
            ax.set_yscale("log")
        ax.set_xlabel("N = M")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    dev = rows[0]["device"] if rows else ""
    fig.suptitle(f"CLIP loss fwd+bwd, D={ACCEPT['d']} — {dev}")
    fig.tight_layout()
    png = csv_path[:-4] + ".png"
    fig.savefig(png, dpi=110)
    print("plot:", png)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results_gpu")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--providers", default="dense,inf_cl,chunked,triton,cuda")
    p.add_argument("--ns", default="4096,8192,16384,32768,65536,131072")
    p.add_argument("--ds", default="256,512,1024")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--modes", default="fwd_bwd,fwd,bwd")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="stop starting new points after this many seconds")
    p.add_argument("--huge", type=int, default=0,
                   help="also one fwd+bwd at N = M = this (e.g. 1048576) per fused GPU provider (triton, cuda)")
    p.add_argument("--open-clip-loss", default=None, help="path of open_clip/loss.py")
    p.add_argument("--fp32-precision", default="high", help="torch.set_float32_matmul_precision")
    p.add_argument("--tag", default="")
    p.add_argument("--skip-roof", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU smoke: tiny sizes, providers dense,chunked,triton (interpreter)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
        if "--ns" not in (argv or sys.argv):
            args.ns = "64,128"
        if "--ds" not in (argv or sys.argv):
            args.ds = "32"
        if "--providers" not in (argv or sys.argv):
            args.providers = "dense,chunked,triton"
        args.repeats = min(args.repeats, 3)
        ACCEPT.update(n=128, d=32)
        if args.device == "cpu":
            os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device (use --dry-run for the CPU smoke)")
    args.providers = [x for x in args.providers.split(",") if x]
    args.ns = [int(x) for x in args.ns.split(",") if x]
    args.ds = [int(x) for x in args.ds.split(",") if x]
    args.dtypes = [x for x in args.dtypes.split(",") if x]
    args.modes = [x for x in args.modes.split(",") if x]
    bad = [x for x in args.dtypes if x not in DTYPES] + [x for x in args.modes if x not in FLOP_FACTOR]
    if bad:
        p.error(f"unknown dtype/mode {bad}")
    if args.device == "cpu" and "bf16" in args.dtypes and os.environ.get("TRITON_INTERPRET") == "1" \
            and "triton" in args.providers:
        print("note: the triton interpreter upcasts bfloat16 to float32", flush=True)
    print(run(args))


if __name__ == "__main__":
    main()
