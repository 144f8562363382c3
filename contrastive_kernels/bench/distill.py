"""CLIP distillation: ``ck.DistillClipLoss`` against open_clip's (``contrastive-kernels bench distill``).

Student and teacher features (float32, D = D_t), the contrastive and the distillation loss, forward
+ backward into the student's features and scale (the teacher frozen, as in training), each
(provider, N) in a fresh process (the shared probe, ``_memprobe``: peak RSS beyond the inputs and
a small warm-up), median of ``--repeats`` calls; rows of the one CSV schema
(``op = distill_clip``) and a plot. Providers: ``ck.<backend>`` and ``open_clip`` (its
``DistillClipLoss``, loaded from its loss.py: four N×N matrices, their softmax and log-softmax).
``--huge`` adds N = M = 65536, D = 128 for the fused loss only (memory), with the probe's control
(one float32 65536×16384 matrix, measured in the same run).
"""
from __future__ import annotations

import argparse
import os
import sys

_SETUP = """
import torch
import contrastive_kernels as ck
from contrastive_kernels._peers import load_open_clip_loss
provider, n, d = {provider!r}, {n}, {d}
g = torch.Generator().manual_seed(0)
unit = lambda: torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
img, txt = unit().requires_grad_(), unit().requires_grad_()
t_img, t_txt = unit(), unit()
scale = torch.tensor(20.0, requires_grad=True)
if provider == "open_clip":
    loss_fn = load_open_clip_loss()[0].DistillClipLoss()
else:
    loss_fn = ck.DistillClipLoss(backend=provider[3:])

def run(k):
    img.grad = txt.grad = scale.grad = None
    c, dl = loss_fn(img[:k], txt[:k], scale, t_img[:k], t_txt[:k], 50.0)
    (c + dl).backward()
    return float(c + dl)
"""
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="contrastive-kernels bench distill",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--providers", default="ck.auto,open_clip")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--huge", action="store_true", help="also N = M = 65536, D = 128, fused only")
    p.add_argument("--out", default="bench_results")
    p.add_argument("--quick", action="store_true", help="N 256 512, D 64, one repeat")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d, args.repeats = [256, 512], 64, 1

    import torch

    from .plot import plot_csv
    from .probe_rows import TIMED_CODE, measure_row, write_control_row
    from .schema import CsvSink, device_name

    providers = args.providers.split(",")
    csv_path = os.path.join(args.out, "distill_clip.csv")
    sinks = {"main": CsvSink(csv_path)}
    jobs = [("main", prov, n, args.d) for n in args.n for prov in providers]
    if args.huge:  # another D: its own CSV, so each plot's lines keep one D
        sinks["huge"] = CsvSink(csv_path[:-4] + "_huge.csv")
        jobs.append(("huge", providers[0], 65536, 128))
    rows = []
    for key, prov, n, d in jobs:
        row = dict(config="distill", op="distill_clip", provider=prov, ours=prov.startswith("ck."),
                   mode="fwd_bwd", dtype="float32", n=n, m=n, d=d)
        measure_row(row, setup=_SETUP.format(provider=prov, n=n, d=d),
                    code=TIMED_CODE.format(n=n, repeats=1 if n > 16384 else args.repeats),
                    note="contrastive + distill, teacher frozen", timeout=args.timeout)
        sinks[key].write(row)
        rows.append(row)
        print(f"N={n:>6} D={d:>4} {prov:<10} {row.get('ms_p50') or 0:>10.1f} ms "
              f"{row.get('peak_mem_mb') or 0:>9.1f} MiB  {row['note'][:60]}", flush=True)
    if args.huge:  # the huge point's control: a quarter of its N×N float32 matrix (4 GiB)
        write_control_row(sinks["huge"], "distill", 65536, 16384, args.timeout)
    for sink in sinks.values():
        sink.close()
    print(f"\n{device_name(torch.device('cpu'))}, {torch.get_num_threads()} threads")
    by = {(r["provider"], r["n"], r["d"]): r for r in rows if r.get("ms_p50") is not None}
    for n in args.n:
        ours, theirs = by.get((providers[0], n, args.d)), by.get(("open_clip", n, args.d))
        if ours and theirs:
            print(f"N={n:>6}: {providers[0]} is {theirs['ms_p50'] / ours['ms_p50']:.2f}× faster "
                  f"than open_clip, memory {ours['peak_mem_mb']:.0f} vs "
                  f"{theirs['peak_mem_mb']:.0f} MiB")
    print(f"CSV: {csv_path}")
    if not args.no_plot and plot_csv(csv_path, csv_path[:-4] + ".png",
                                     title="DistillClipLoss fwd+bwd (teacher frozen)"):
        print(f"plot: {csv_path[:-4]}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
