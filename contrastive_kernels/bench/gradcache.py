"""Whole training steps with and without gradient caching (``contrastive-kernels bench gradcache``).

The loss is O((N + M)·D) already; what grows with the batch in a real step is the encoders'
activations. This measures one complete step — both towers forward, ``ck.ClipLoss``, backward into
every parameter — of a small two-tower model (two 3-layer MLPs of width 1024), plain and through
``ck.GradCache`` (chunk 512), each in a fresh process (the shared probe, ``_memprobe``: peak RSS
beyond the model, the inputs and a warm-up step), and writes rows of the one CSV schema
(``op = gradcache_step``; ``provider`` plain or ck.gradcache; ``n`` = the batch B; FLOP columns are
empty: the step's work is not the loss's 8·N·M·D). From the memory-vs-B line of each it reports the
largest batch that fits a memory budget (``--budget-gb``), marked as extrapolated beyond the
largest B measured.
"""
from __future__ import annotations

import argparse
import os
import sys

_SETUP = """
import torch
import contrastive_kernels as ck
torch.manual_seed(0)
B, width, d_in, d_out, chunk, mode = {b}, {width}, {d_in}, {d_out}, {chunk}, {mode!r}

def tower():
    return torch.nn.Sequential(torch.nn.Linear(d_in, width), torch.nn.GELU(),
                               torch.nn.Linear(width, width), torch.nn.GELU(),
                               torch.nn.Linear(width, d_out))

towers = [tower(), tower()]
params = [p for t in towers for p in t.parameters()]
scale = torch.tensor(14.0, requires_grad=True)
loss_fn = ck.ClipLoss()

def step(x_img, x_txt):
    for p in params + [scale]:
        p.grad = None
    if mode == "plain":
        z = [torch.nn.functional.normalize(t(x), dim=-1) for t, x in zip(towers, (x_img, x_txt))]
        loss = loss_fn(*z, scale)
        loss.backward()
        return float(loss)
    norm = [lambda x, t=t: torch.nn.functional.normalize(t(x), dim=-1) for t in towers]
    gc = ck.GradCache(norm, lambda a, b, logit_scale: loss_fn(a, b, logit_scale), chunk,
                      modules=towers)
    return float(gc(x_img, x_txt, logit_scale=scale))

x_img, x_txt = torch.randn(B, d_in), torch.randn(B, d_in)
"""
_WARMUP = "step(x_img[:64], x_txt[:64])"
_CODE = """
import time as _time
t0 = _time.perf_counter()
value = step(x_img, x_txt)
result = {"ms": (_time.perf_counter() - t0) * 1e3, "loss": value}
"""


def measure(mode: str, b: int, *, width: int = 1024, d_in: int = 1024, d_out: int = 256,
            chunk: int = 512, timeout: float = 1800) -> dict:
    """One whole step of ``mode`` ("plain" or "cached") at batch ``b`` in a fresh process."""
    from .. import _memprobe

    setup = _SETUP.format(b=b, width=width, d_in=d_in, d_out=d_out, chunk=chunk, mode=mode)
    return _memprobe.peak_extra_bytes(_CODE, setup=setup, warmup=_WARMUP, timeout=timeout)


def largest_batch(points: list, budget_bytes: float) -> tuple[float, bool]:
    """(B, extrapolated?) at which the least-squares line memory = a + b·B reaches the budget."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    icpt = my - slope * mx
    if slope <= 0:
        return float("inf"), True
    b = (budget_bytes - icpt) / slope
    return b, b > max(xs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="contrastive-kernels bench gradcache",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--budget-gb", type=float, default=1.0, help="memory budget for the largest batch")
    p.add_argument("--out", default="bench_results")
    p.add_argument("--csv", default=None)
    p.add_argument("--quick", action="store_true", help="B 256 512, width 128 (seconds)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.width, args.chunk = [256, 512], 128, 64

    import torch

    from .plot import plot_csv
    from .schema import CsvSink, base_facts, device_name, loadavg

    dev = torch.device("cpu")
    csv_path = args.csv or os.path.join(args.out, f"gradcache_step_b{args.batches[0]}-"
                                        f"{args.batches[-1]}_w{args.width}_c{args.chunk}.csv")
    sink = CsvSink(csv_path)
    rows = []
    for b in args.batches:
        for mode, name in (("plain", "plain"), ("cached", "ck.gradcache")):
            try:
                out = measure(mode, b, width=args.width, d_in=args.width, chunk=args.chunk)
                row = dict(op="gradcache_step", provider=name, ours=name.startswith("ck."),
                           mode="fwd_bwd", dtype="float32", n=b, m=b, d=256,
                           ms_p50=out["result"]["ms"], ms_p20=out["result"]["ms"],
                           ms_p80=out["result"]["ms"], repeats=1,
                           peak_mem_mb=out["extra_bytes"] / 2 ** 20,
                           note=f"two 3-layer MLP towers of width {args.width}, chunk {args.chunk}, "
                                f"ck.ClipLoss; loss {out['result']['loss']:.4f}")
            except Exception as exc:
                row = dict(op="gradcache_step", provider=name, ours=name.startswith("ck."),
                           mode="fwd_bwd", dtype="float32", n=b, m=b, d=256,
                           note=f"error: {str(exc).splitlines()[-1][:200]}")
            row.update(base_facts(dev, "perf_counter"), config="gradcache", loadavg=loadavg())
            sink.write(row)
            rows.append(row)
            print(f"B={b:>6} {name:<13} {row.get('ms_p50') or 0:>10.0f} ms "
                  f"{row.get('peak_mem_mb') or 0:>9.1f} MiB  {row['note'][:60]}", flush=True)
    sink.close()
    print(f"\nwhole training step, {device_name(dev)}")
    by = {(r["provider"], r["n"]): r for r in rows if r.get("peak_mem_mb") is not None}
    for b in args.batches:
        pl, gc = by.get(("plain", b)), by.get(("ck.gradcache", b))
        if pl and gc:
            print(f"B={b:>6}: memory cached/plain = {gc['peak_mem_mb'] / pl['peak_mem_mb']:.3f}, "
                  f"time cached/plain = {gc['ms_p50'] / pl['ms_p50']:.2f}")
    budget = args.budget_gb * 2 ** 30
    for name in ("plain", "ck.gradcache"):
        pts = [(b, by[(name, b)]["peak_mem_mb"] * 2 ** 20) for b in args.batches if (name, b) in by]
        if len(pts) >= 2:
            bmax, extra = largest_batch(pts, budget)
            print(f"largest batch within {args.budget_gb:g} GiB, {name}: "
                  f"{'unbounded' if bmax == float('inf') else f'{bmax:,.0f}'}"
                  f"{' (extrapolated from the measured line)' if extra else ''}")
    print(f"\nCSV: {csv_path}")
    if not args.no_plot and plot_csv(csv_path, csv_path[:-4] + ".png",
                                     title=f"whole training step (forward, loss, backward), chunk {args.chunk}"):
        print(f"plot: {csv_path[:-4]}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
