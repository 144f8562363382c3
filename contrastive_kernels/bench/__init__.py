"""The benchmark harness: ``contrastive-kernels bench`` (``python -m contrastive_kernels bench``).

One harness for every measurement of the project — one timer (``timing``), one roof, one CSV
schema (``schema``), one plotter (``plot``), one dense provider per op family (``providers``),
one memory probe (``contrastive_kernels._memprobe``) — and named configurations of it
(``configs``): the CLI sweep, the GPU kit's blocks (``headline``, ``huge``, ``gpu-sweep``,
``gpu-variants``), CPU tile tuning, and the SigLIP / SupCon / NT-Xent comparisons;
``gradcache`` (whole training steps) is its own entry point in ``bench.gradcache``, ``st``
(sentence-transformers' losses against the fused twins) in ``bench.st`` and ``matryoshka`` (every
prefix from one sweep against one loss per prefix) in ``bench.matryoshka``.

    contrastive-kernels bench                       # the main job: clip fwd+bwd vs dense (~9 min, 2 cores)
    contrastive-kernels bench --quick               # the same in ~1 min (N = 256, 512)
    contrastive-kernels bench --n 8192 --providers dense,open_clip,cpu --repeats 9
    contrastive-kernels bench headline --out $OUT   # on a GPU
    contrastive-kernels bench --list                # every configuration
    contrastive-kernels bench plot results.csv      # redraw a plot from a CSV
    contrastive-kernels bench summary a.csv t.xml   # acceptance figures and test verdicts
"""
from __future__ import annotations

import argparse
import os
import sys

# No torch import at module level: `bench --help` must answer at once.


def build_parser() -> argparse.ArgumentParser:
    from .configs import CONFIGS

    p = argparse.ArgumentParser(
        prog="contrastive-kernels bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time and measure the fused losses against the dense implementation and the "
                    "peers (open_clip, inf-cl, pytorch-metric-learning). Providers named ck.<backend> "
                    "are this library.",
        epilog="configurations:\n" + "\n".join(
            f"  {c.name:<13} {c.help}" + (f" [{c.minutes}]" if c.minutes else "")
            for c in CONFIGS.values()) + "\n  gradcache     whole training steps, plain vs ck.GradCache "
                                        "(bench gradcache --help) [~5 min]"
                                        "\n  st            sentence-transformers' losses vs the "
                                        "fused twins (bench st --help) [~10 min]"
                                        "\n  matryoshka    Matryoshka clip loss: one sweep vs one "
                                        "loss per prefix (bench matryoshka --help) [~5 min]"
                                        "\n  distill       DistillClipLoss vs open_clip's (bench "
                                        "distill --help) [~3 min]"
               "\n\nexample head-to-head: contrastive-kernels bench "
               "--n 8192 --providers dense,open_clip,cpu --repeats 9")
    p.add_argument("config", nargs="?", default="sweep",
                   help="a configuration (see below), 'plot CSV' (redraw) or 'summary FILE...' "
                        "(acceptance figures of CSVs, verdicts of JUnit XMLs); default: sweep")
    p.add_argument("plot_csv", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--op", default="clip", choices=("clip", "siglip", "supcon", "ntxent"),
                   help="op family of the sweep configuration (default clip)")
    p.add_argument("--providers", default=None,
                   help="comma list: peers (dense, open_clip, open_clip_siglip, inf_cl, pml_supcon, "
                        "pml_ntxent) and ck.<backend> / <backend> (reference, chunked, cpu, triton, cuda)")
    p.add_argument("--n", type=int, nargs="+", default=None, help="batch sizes N (= M)")
    p.add_argument("--d", type=int, default=None, help="feature dimension D")
    p.add_argument("--mode", nargs="+", choices=("fwd", "bwd", "fwd_bwd"), default=None,
                   help="fwd (training forward), bwd (backward alone after an untimed forward), "
                        "fwd_bwd (default)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"), default=None,
                   help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5 CPU, 10 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1 CPU, 2 CUDA)")
    p.add_argument("--timer", choices=("auto", "perf_counter", "process_time", "events", "do_bench"),
                   default=None, help="auto: perf_counter on CPU; do_bench (events for bwd) on CUDA")
    p.add_argument("--out", default="bench_results", help="output folder (default ./bench_results)")
    p.add_argument("--csv", default=None, help="exact CSV path (default <out>/<stem>.csv)")
    p.add_argument("--append", action="store_true", help="append to --csv instead of replacing it")
    p.add_argument("--tag", default="", help="added to the file stem, so runs do not overwrite each other")
    p.add_argument("--quick", action="store_true", help="smoke run: N 256 512, 2 repeats (~1 min)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes on the CPU: the GPU kit's plumbing check")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-roof", action="store_true", help="skip the gemm_ceiling row")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run; (provider, N) pairs predicted to overrun are "
                        "skipped with a note")
    p.add_argument("--mem-limit-gb", type=float, default=None,
                   help="memory the guard assumes is available (default: MemAvailable / free GPU memory)")
    p.add_argument("--mem-timeout", type=float, default=1800, help="seconds per CPU memory probe")
    p.add_argument("--logit-scale", type=float, default=1 / 0.07, help="s = 1/temperature (default 1/0.07)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the configurations and exit")
    return p


def _print_table(rows: list, cpu: bool, file=sys.stdout) -> None:
    rate = "GFLOP/s" if cpu else "TFLOP/s"
    head = (f"{'provider':<30} {'N':>7} {'ms p50 [p20-p80]':>28} {'peak extra MiB':>14} {rate:>9} "
            f"{'% roof':>7} {'vs dense':>9}  note")
    print(head, file=file)
    print("-" * len(head), file=file)
    # A table of several dtypes (bench bf16) names each row's dtype beside its provider.
    mixed = len({r.get("dtype") for r in rows if r.get("dtype")}) > 1
    for r in rows:
        name = r["provider"] + (f" [{r['dtype']}]" if mixed and r.get("dtype") else "")
        name += " *" if r.get("ours") else ""
        if r.get("provider") == "copy_bw":
            print(f"{name:<30} {'':>7} {'':>28} {'':>14} {'':>9} {'':>7} {'':>9}  "
                  f"{r.get('gbps') or 0:.0f} GB/s {r.get('note', '')}", file=file)
            continue
        if r.get("ms_p50") is None:
            print(f"{name:<30} {r.get('n', ''):>7} {'-':>28} {'':>14} {'':>9} {'':>7} {'':>9}  "
                  f"{r.get('note', '')}", file=file)
            continue
        ms = f"{r['ms_p50']:.2f} [{r['ms_p20']:.2f}-{r['ms_p80']:.2f}]"
        tf = r.get("tflops")
        rate_v = "" if tf is None else (f"{tf * 1e3:.1f}" if cpu else f"{tf:.2f}")
        mem = "" if r.get("peak_mem_mb") is None else f"{r['peak_mem_mb']:.1f}"
        pr = "" if r.get("pct_roof") is None else f"{r['pct_roof']:.1f}"
        sp = "" if r.get("speedup_vs_dense") is None else f"{r['speedup_vs_dense']:.2f}x"
        print(f"{name:<30} {r.get('n', ''):>7} {ms:>28} {mem:>14} {rate_v:>9} {pr:>7} {sp:>9}  "
              f"{r.get('note', '')}", file=file)
    print("* = this library (contrastive_kernels); % roof is against the gemm_ceiling row; "
          "vs dense = dense time / provider time (> 1: faster)", file=file)


def _bf16_ratios(rows: list) -> list:
    """float32 time / bfloat16 time of torch.mm and of each clip provider run in both dtypes at
    the same N and D (the ``bf16`` configuration)."""
    times = {}
    for r in rows:
        if r.get("ms_p50") is not None and r.get("op") in ("mm", "clip") and r.get("mode") in (
                "mm", "fwd_bwd"):
            times[(r["op"], r["provider"], r["n"], r["d"], r["dtype"])] = r["ms_p50"]
    lines = []
    for (op, prov, n, d, dt), ms in times.items():
        fp32 = times.get((op, prov, n, d, "float32"))
        if dt == "bfloat16" and fp32:
            lines.append(f"bf16 speed-up {op} {prov} N=M={n} D={d}: {fp32 / ms:.2f}x "
                         f"(float32 {fp32:.4g} ms, bfloat16 {ms:.4g} ms)")
    return lines


def summary(rows: list, file=sys.stdout) -> None:
    """The acceptance figures the rows support: fraction of the roof, speed-ups, memory ratios."""
    from .configs import HEADLINE

    by = {}
    for r in rows:
        if r.get("ms_p50") is not None and r.get("op") == "clip":
            by[(r["mode"], r["dtype"], r["n"], r["d"], r["provider"])] = r
    key = ("fwd_bwd", HEADLINE["dtype"], HEADLINE["n"], HEADLINE["d"])
    # a dry run of the headline configuration runs its point at tiny sizes: report that point
    dry = [r for r in rows if str(r.get("config", "")).startswith("headline-dry")
           and r.get("mode") == "fwd_bwd" and r.get("ms_p50") is not None]
    if dry:
        key = ("fwd_bwd", dry[0]["dtype"], dry[0]["n"], dry[0]["d"])
    ours = [by[key + (p,)] for p in ("ck.triton", "ck.cuda") if key + (p,) in by]
    lines = []
    if ours:
        best = min(ours, key=lambda r: r["ms_p50"])
        label = "headline" + (" (dry run, tiny sizes)" if dry else "")
        lines.append(f"{label} (clip fwd_bwd {key[1]} N=M={key[2]} D={key[3]}), "
                     f"best backend {best['provider']}: {best['ms_p50']:.2f} ms")
        if best.get("pct_roof") is not None:
            lines.append(f"  fraction of the same run's {key[1]} matmul rate: "
                         f"{best['pct_roof']:.1f}%  (target >= 60%)")
        for peer, target in (("dense", 2.0), ("inf_cl", 1.5)):
            o = by.get(key + (peer,))
            if o:
                lines.append(f"  speed-up vs {peer}: {o['ms_p50'] / best['ms_p50']:.2f}x  (target >= {target}x)")
        o = by.get(key + ("dense",))
        if o and o.get("peak_mem_mb") and best.get("peak_mem_mb") is not None:
            lines.append(f"  peak extra memory: {best['peak_mem_mb']:.0f} MiB = "
                         f"{100 * best['peak_mem_mb'] / o['peak_mem_mb']:.1f}% of dense's "
                         f"{o['peak_mem_mb']:.0f} MiB  (target <= 3%)")
        c, t = by.get(key + ("ck.cuda",)), by.get(key + ("ck.triton",))
        if c and t:
            lines.append(f"  cuda / triton time: {c['ms_p50'] / t['ms_p50']:.2f}x  (target <= 1.25x)")
    lines += _bf16_ratios(rows)
    for r in rows:
        if not str(r.get("config", "")).startswith("huge"):
            continue
        if r.get("ms_p50") is None:
            lines.append(f"N=M={r.get('n')} (huge) {r.get('provider')}: {r.get('note')}")
            continue
        mem = f", peak {r['peak_mem_mb'] / 1024:.1f} GiB" if r.get("peak_mem_mb") else ""
        lines.append(f"N=M={r['n']} D={r['d']} {r['dtype']} fwd+bwd, {r['provider']}: "
                     f"{r['ms_p50'] / 1e3:.2f} s{mem}")
    # CPU / any point: the fused backends against dense and open_clip at each N
    pairs = sorted({(r[0], r[1], r[2], r[3]) for r in by})
    for mode, dt, n, d in pairs:
        dense = by.get((mode, dt, n, d, "dense"))
        for p in ("ck.cpu", "ck.chunked"):
            o = by.get((mode, dt, n, d, p))
            if o and dense and (mode, dt, n, d) != key:
                oc = by.get((mode, dt, n, d, "open_clip"))
                extra = f", {oc['ms_p50'] / o['ms_p50']:.2f}x vs open_clip" if oc else ""
                lines.append(f"{mode} {dt} N={n} D={d} {p}: {dense['ms_p50'] / o['ms_p50']:.2f}x vs dense{extra}")
    if lines:
        print("\n== summary ==", file=file)
        for line in lines:
            print(line, file=file)


_NUMERIC = ("n", "m", "d", "repeats", "ms_p50", "ms_p20", "ms_p80", "peak_mem_mb", "tflops",
            "pct_roof", "speedup_vs_dense", "gbps")


def _rows_from_csv(path: str) -> list:
    from .schema import as_float, read_csv

    rows = []
    for r in read_csv(path):
        for k in _NUMERIC:
            v = as_float(r.get(k))
            r[k] = (int(v) if k in ("n", "m", "d", "repeats") else v) if v is not None else None
        r["ours"] = r.get("ours") == "yes"
        rows.append(r)
    return rows


def _junit_verdict(path: str, file=sys.stdout) -> None:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        print(f"{os.path.basename(path)}: unreadable ({exc})", file=file)
        return
    cases = root.iter("testcase")
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    bad = []
    for c in cases:
        kinds = {child.tag for child in c}
        if "failure" in kinds or "error" in kinds:
            counts["failed" if "failure" in kinds else "error"] += 1
            bad.append(f"{c.get('classname')}::{c.get('name')}")
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    print(f"{os.path.basename(path)}: " + ", ".join(f"{v} {k}" for k, v in counts.items()), file=file)
    for name in bad[:40]:
        print(f"  FAILED {name}", file=file)


def summarize_files(paths: list) -> int:
    """``bench summary FILE...``: test verdicts of JUnit XMLs and the acceptance figures of CSVs."""
    rows = []
    for path in paths:
        if not os.path.exists(path):
            print(f"{os.path.basename(path)}: absent")
        elif path.endswith(".xml"):
            _junit_verdict(path)
        else:
            rows += _rows_from_csv(path)
    summary(rows)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "summary":
        return summarize_files(argv[1:])
    if argv and argv[0] == "gradcache":
        from .gradcache import main as gradcache_main
        return gradcache_main(argv[1:])
    if argv and argv[0] == "st":
        from .st import main as st_main
        return st_main(argv[1:])
    if argv and argv[0] == "matryoshka":
        from .matryoshka import main as matryoshka_main
        return matryoshka_main(argv[1:])
    if argv and argv[0] == "distill":
        from .distill import main as distill_main
        return distill_main(argv[1:])
    args = build_parser().parse_args(argv)
    from .configs import CONFIGS

    if args.list:
        for c in CONFIGS.values():
            print(f"{c.name:<13} {c.help}" + (f" [{c.minutes}]" if c.minutes else ""))
        print(f"{'gradcache':<13} whole training steps, plain vs ck.GradCache (bench gradcache "
              "--help) [~5 min]")
        print(f"{'st':<13} sentence-transformers' losses vs the fused twins (bench st --help) "
              "[~10 min]")
        print(f"{'matryoshka':<13} Matryoshka clip loss: one sweep vs one loss per prefix "
              "(bench matryoshka --help) [~5 min]")
        print(f"{'distill':<13} DistillClipLoss vs open_clip's (bench distill --help) [~3 min]")
        return 0
    if args.config == "plot":
        from .plot import plot_csv
        if not args.plot_csv:
            print("usage: contrastive-kernels bench plot RESULTS.csv", file=sys.stderr)
            return 2
        png = args.plot_csv[:-4] + ".png"
        return 0 if plot_csv(args.plot_csv, png) and print(f"plot: {png}") is None else 1
    if args.config not in CONFIGS:
        print(f"error: unknown configuration {args.config!r}; choose from {sorted(CONFIGS)} or "
              "'plot'", file=sys.stderr)
        return 2
    cfg = CONFIGS[args.config]

    import torch

    from .configs import dry_run
    from .plot import plot_csv
    from .providers import all_providers, canonical
    from .runner import Runner, Settings
    from .schema import CsvSink, device_name

    if args.dry_run:
        device = torch.device("cpu")
    elif args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
            return 2
    on_gpu = device.type == "cuda"
    quick = args.quick
    points = cfg.build(args, device)
    if args.dry_run:
        points = dry_run(points)
    if not points:
        print("error: nothing to run", file=sys.stderr)
        return 2
    if args.n and min(args.n) < 1 or (args.d is not None and args.d < 1):
        print("error: N and D must be >= 1", file=sys.stderr)
        return 2
    repeats = args.repeats if args.repeats is not None else (
        2 if quick or args.dry_run else (cfg.repeats or (10 if on_gpu else 5)))
    warmup = args.warmup if args.warmup is not None else (
        1 if quick or args.dry_run else (cfg.warmup if cfg.warmup is not None else (2 if on_gpu else 1)))
    if repeats < 1 or warmup < 0:
        print("error: --repeats must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    for pt in points:
        pt.providers = [canonical(p) for p in pt.providers]
        unknown = [p for p in pt.providers if p not in all_providers(pt.op)]
        if unknown:  # a typo must not turn into a run that silently skips what was asked
            print(f"error: unknown provider(s) {unknown} for {pt.op}; valid: "
                  f"{', '.join(all_providers(pt.op))} (a backend name such as 'cpu' means "
                  "'ck.cpu')", file=sys.stderr)
            return 2
    settings = Settings(device=device, repeats=repeats, warmup=warmup,
                        timer=args.timer or cfg.timer, memory=cfg.memory and not args.no_memory,
                        roof=not args.no_roof, time_budget=args.time_budget,
                        mem_limit_gb=args.mem_limit_gb, mem_timeout=args.mem_timeout,
                        logit_scale=args.logit_scale, seed=args.seed, quiet=args.quiet,
                        config=args.config + ("-dry-run" if args.dry_run else ""))

    first = points[0]
    ns = sorted({pt.n for pt in points})
    nspec = f"n{ns[0]}" + (f"-{ns[-1]}" if len(ns) > 1 else "")
    config_part = "" if args.config == first.op else args.config
    stem = "_".join(x for x in (first.op, config_part, first.dtype, f"d{first.d}", nspec,
                                device_name(device).split(" (")[0].replace(" ", "-")[:32], args.tag) if x)
    csv_path = args.csv or os.path.join(args.out, stem + ".csv")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if not on_gpu and load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load:.2f} on {os.cpu_count()} CPUs before starting: other "
              "work is running, timings will be noisy", file=sys.stderr)
    sink = CsvSink(csv_path, append=args.append)
    runner = Runner(settings, sink)
    try:
        rows = runner.run(points)
    finally:
        sink.close()
    print()
    from .schema import cpu_isa, loadavg
    machine = device_name(device) + ("" if on_gpu else f", ISA {cpu_isa()}")
    print(f"{args.config}: {first.op}, {first.dtype}, D={first.d}, on {machine}; "
          f"{repeats} repeats after {warmup} warm-up; load average {load:.2f} before, "
          f"{loadavg()} after; FLOPs 2/6/8·R·C·D (fwd/bwd/fwd_bwd)")
    if not on_gpu and (quick or max(ns) <= 1024):
        print("note: at these sizes a call takes milliseconds, so on a shared machine the ratios "
              "are noise-dominated; read them with the load average above, or run without --quick")
    _print_table(rows, cpu=not on_gpu)
    summary(rows)
    print(f"\nCSV: {csv_path}")
    if not args.no_plot:
        png = csv_path[:-4] + ".png"
        if plot_csv(csv_path, png):
            print(f"plot: {png}")
    if runner.errors:
        print(f"{runner.errors} provider/point combination(s) failed; see the note column",
              file=sys.stderr)
        return 1
    return 0
