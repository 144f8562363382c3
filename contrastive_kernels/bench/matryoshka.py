"""Matryoshka CLIP loss: one sweep against one loss per prefix (``contrastive-kernels bench matryoshka``).

The loss is ``Σ_t clip_loss(normalize(x[:, :d_t]), normalize(y[:, :d_t]), s)`` over prefix dims
``d_t``; forward + backward into float32 features, each (provider, N) in a fresh process (the
shared probe, ``_memprobe``: peak RSS beyond the inputs and a small warm-up), median of
``--repeats`` calls; rows of the one CSV schema (``op = matryoshka_clip``) and a plot.

* ``ck.<backend>``: ``ck.clip_loss(x, y, s, matryoshka_dims=dims)`` — every prefix from one sweep;
* ``ck.separate``: one ``ck.clip_loss`` per prefix on normalised prefixes (what a user writes with
  this library today, Σ d_t / d_k times the GEMM work);
* ``dense``: one dense N×N cross-entropy CLIP loss per prefix (what MRL code bases do).

``--huge`` adds the memory point of the issue: N = M = 65536, D = 256, four dims, fused only,
with the probe's control (one float32 65536×16384 matrix, measured in the same run).
"""
from __future__ import annotations

import argparse
import os
import sys

_SETUP = """
import torch
import contrastive_kernels as ck
provider, n, d, dims = {provider!r}, {n}, {d}, {dims!r}
g = torch.Generator().manual_seed(0)
x = torch.randn(n, d, generator=g).requires_grad_()
y = torch.randn(n, d, generator=g).requires_grad_()
unit = lambda t, k: torch.nn.functional.normalize(t[:, :k], dim=1)

def loss(k):
    a, b = x[:k], y[:k]
    if provider.startswith("ck.") and provider != "ck.separate":
        return ck.clip_loss(a, b, 20.0, matryoshka_dims=dims, backend=provider[3:])
    if provider == "ck.separate":
        return sum(ck.clip_loss(unit(a, dd), unit(b, dd), 20.0) for dd in dims)
    labels = torch.arange(k)
    total = 0
    for dd in dims:
        logits = 20.0 * unit(a, dd) @ unit(b, dd).T
        total = total + 0.5 * (torch.nn.functional.cross_entropy(logits, labels)
                               + torch.nn.functional.cross_entropy(logits.T, labels))
    return total

def run(k):
    x.grad = y.grad = None
    out = loss(k)
    out.backward()
    return float(out)
"""
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="contrastive-kernels bench matryoshka",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256, 512, 768])
    p.add_argument("--providers", default="ck.auto,ck.separate,dense")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--huge", action="store_true",
                   help="also N = M = 65536, D = 256, dims 32 64 128 256, fused only (memory)")
    p.add_argument("--out", default="bench_results")
    p.add_argument("--quick", action="store_true", help="N 256 512, D 96, dims 16 32 64 96")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d, args.dims, args.repeats = [256, 512], 96, [16, 32, 64, 96], 1

    import torch

    from .plot import plot_csv
    from .probe_rows import TIMED_CODE, measure_row, write_control_row
    from .schema import CsvSink, device_name

    dev = torch.device("cpu")
    providers = args.providers.split(",")
    csv_path = os.path.join(args.out, "matryoshka_clip.csv")
    # the huge point has another D: its own CSV, so each plot's lines keep one D
    sinks = {"main": CsvSink(csv_path)}
    jobs = [("main", prov, n, args.d, tuple(args.dims)) for n in args.n for prov in providers]
    if args.huge:
        sinks["huge"] = CsvSink(csv_path[:-4] + "_huge.csv")
        jobs.append(("huge", providers[0], 65536, 256, (32, 64, 128, 256)))
    rows = []
    for key, prov, n, d, dims in jobs:
        row = dict(config="matryoshka", op="matryoshka_clip", provider=prov,
                   ours=prov.startswith("ck."), mode="fwd_bwd", dtype="float32", n=n, m=n, d=d)
        measure_row(row, setup=_SETUP.format(provider=prov, n=n, d=d, dims=dims),
                    code=TIMED_CODE.format(n=n, repeats=1 if n > 16384 else args.repeats),
                    note=f"dims {list(dims)}", timeout=args.timeout)
        sinks[key].write(row)
        rows.append(row)
        print(f"N={n:>6} D={d:>4} {prov:<12} {row.get('ms_p50') or 0:>10.1f} ms "
              f"{row.get('peak_mem_mb') or 0:>9.1f} MiB  {row['note'][:60]}", flush=True)
    if args.huge:  # the huge point's control: a quarter of its N×N float32 matrix (4 GiB)
        write_control_row(sinks["huge"], "matryoshka", 65536, 16384, args.timeout)
    for sink in sinks.values():
        sink.close()
    print(f"\n{device_name(dev)}, {torch.get_num_threads()} threads: time of each provider / "
          f"{providers[0]} (fused)")
    by = {(r["provider"], r["n"], r["d"]): r for r in rows if r.get("ms_p50") is not None}
    for n in args.n:
        base = by.get((providers[0], n, args.d))
        if base:
            ratios = ", ".join(f"{prov} {by[(prov, n, args.d)]['ms_p50'] / base['ms_p50']:.2f}×"
                               for prov in providers[1:] if (prov, n, args.d) in by)
            print(f"N={n:>6}: {ratios}")
    print(f"CSV: {csv_path}")
    if not args.no_plot and plot_csv(csv_path, csv_path[:-4] + ".png",
                                     title=f"Matryoshka clip loss fwd+bwd, dims {args.dims}"):
        print(f"plot: {csv_path[:-4]}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
