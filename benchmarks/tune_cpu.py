"""Tile-size tuning and roofline check of the native CPU kernels (csrc/cpu).

    python benchmarks/tune_cpu.py --n 8192 --d 256                          # defaults, wall clock
    python benchmarks/tune_cpu.py --n 8192 --rows 128 256 512 --cols 256 512 1024
    python benchmarks/tune_cpu.py --threads 1 --clock cpu                   # on a busy machine

The workload is the symmetric CLIP loss: forward with row + column log-sum-exp and positives, backward
with grad_row = grad_col = 1/(2N), grad_pos = −1/N. FLOPs are counted as 2·N·M·D (forward) and
6·N·M·D (backward); the roof is the same machine's dense sgemm rate (torch.mm of N×D by D×M, measured
in the same run, same threads), so "% roof" = time the fused work would take at the sgemm rate /
measured time.

On a machine shared with other jobs, wall-clock runs during which another process took one of our
cores are discarded and repeated (`--min-util`, default 0.9: process CPU time must reach 90% of
wall time × threads). `--clock cpu` times with the process CPU time instead: stable for comparing
tile sizes on a busy machine (a preempted thread accrues no CPU time), but not a latency.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

import torch


def _load_ops() -> None:
    try:
        from contrastive_kernels import _native
    except ImportError:  # run from a source checkout that is not installed
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from contrastive_kernels import _native
    ok, why = _native.load()
    if not ok:
        sys.exit(why)


def timeit(fn, reps: int, clock: str, min_util: float = 0.0,
           max_tries: int = 200) -> tuple[float, float]:
    """(median, min) seconds over `reps` runs after one warm-up.

    With min_util > 0 (wall clock only) a run counts only if this process got at least that fraction
    of its threads' cores (process CPU time / (wall time · threads)); runs during which other jobs
    took a core are repeated, up to max_tries runs in all.
    """
    fn()
    ts = []
    threads = torch.get_num_threads()
    for _ in range(max_tries):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if clock == "cpu":
            ts.append(cpu)
        elif cpu >= min_util * wall * threads:
            ts.append(wall)
        if len(ts) == reps:
            break
    if not ts:
        sys.exit(f"no run got {min_util:.0%} of {threads} cores in {max_tries} tries: machine busy")
    return statistics.median(ts), min(ts)


def _open_clip_loss_cls():
    from contrastive_kernels.bench import load_open_clip_loss

    module, why = load_open_clip_loss()
    if module is None:
        sys.exit(f"--open-clip: {why}")
    return module.ClipLoss


def _open_clip_step(q, k):
    ClipLoss = _open_clip_loss_cls()
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    scale = torch.tensor(100.0, requires_grad=True)
    ClipLoss()(q, k, scale).backward()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[8192])
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--rows", type=int, nargs="*", default=[], help="CK_CPU_BLOCK_ROWS values to try")
    p.add_argument("--cols", type=int, nargs="*", default=[], help="CK_CPU_BLOCK_COLS values to try")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--min-util", type=float, default=0.9,
                   help="wall clock: keep only runs that got this fraction of the cores (0 = all)")
    p.add_argument("--mode", choices=["fwd", "bwd", "both"], default="both")
    p.add_argument("--open-clip", action="store_true",
                   help="also time open_clip's dense ClipLoss forward+backward (same inputs)")
    args = p.parse_args(argv)

    _load_ops()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, clock {args.clock}, "
          f"dtype {args.dtype}, cpu capability {torch.backends.cpu.get_cpu_capability()}")

    for n in args.n:
        d = args.d
        gen = torch.Generator().manual_seed(0)
        q = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).to(dtype)
        k = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).to(dtype)
        scale = torch.tensor(100.0)
        stat = torch.float64 if dtype == torch.float64 else torch.float32
        g = torch.full((n,), 1.0 / (2 * n), dtype=stat)
        gp = torch.full((n,), -1.0 / n, dtype=stat)

        qm, km = q.to(stat), k.to(stat)
        out = torch.empty(n, n, dtype=stat)
        t_mm, _ = timeit(lambda: torch.mm(qm, km.T, out=out), args.reps, args.clock, args.min_util)
        del out
        rate = 2 * n * n * d / t_mm
        roof_f, roof_b = 2 * n * n * d / rate, 6 * n * n * d / rate
        print(f"\nN = M = {n}, D = {d}: dense mm {rate / 1e9:.1f} GFLOP/s -> roof fwd {roof_f:.3f} s, "
              f"bwd {roof_b:.3f} s, fwd+bwd {roof_f + roof_b:.3f} s")

        if args.open_clip:
            t_oc = timeit(lambda: _open_clip_step(q.to(stat), k.to(stat)), args.reps, args.clock,
                          args.min_util)
            print(f"  open_clip ClipLoss fwd+bwd {t_oc[0]:.3f} s (min {t_oc[1]:.3f})")

        combos = list(itertools.product(args.rows or [None], args.cols or [None]))
        for rows, cols in combos:
            for name, val in (("CK_CPU_BLOCK_ROWS", rows), ("CK_CPU_BLOCK_COLS", cols)):
                if val is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = str(val)
            r, c, _ = torch.ops.ck_native.lse_fwd(q, k, scale, None, True)
            tf = tb = (float("nan"), float("nan"))
            if args.mode in ("fwd", "both"):
                tf = timeit(lambda: torch.ops.ck_native.lse_fwd(q, k, scale, None, True),
                            args.reps, args.clock, args.min_util)
            if args.mode in ("bwd", "both"):
                tb = timeit(lambda: torch.ops.ck_native.lse_bwd(q, k, scale, None, r, c, g, g, gp),
                            args.reps, args.clock, args.min_util)
            tag = f"rows={rows or 'default'} cols={cols or 'default'}"
            total = tf[0] + tb[0]
            print(f"  {tag:28s} fwd {tf[0]:.3f} s (min {tf[1]:.3f}, {roof_f / tf[0]:4.0%} roof)  "
                  f"bwd {tb[0]:.3f} s (min {tb[1]:.3f}, {roof_b / tb[0]:4.0%} roof)  "
                  f"fwd+bwd {total:.3f} s ({(roof_f + roof_b) / total:4.0%} roof)", flush=True)


if __name__ == "__main__":
    main()
