"""Command line: ``python -m contrastive_kernels {info,bench,experiment}`` (also ``contrastive-kernels``).

Sub-commands import their machinery lazily, so ``info`` works even where a backend is broken.
"""
from __future__ import annotations

import argparse
import importlib
import platform
import sys

# experiment name -> (module with a ``main(argv) -> int``, what it shows, time of the default run on
# 2 CPU cores). Each is a self-contained script; ``experiment NAME --help`` lists its options.
EXPERIMENTS = {
    "synthetic": ("contrastive_kernels.experiments.synthetic",
                  "known optimum θ* = 1: minibatch InfoNCE vs the Gamma/EMA estimators (P1)",
                  "~2 min; --quick: seconds"),
    "digits": ("contrastive_kernels.experiments.digits",
               "self-supervised digits across batch sizes, linear probe (P1)", "~2 min; --quick: seconds"),
    "modality": ("contrastive_kernels.experiments.modality",
                 "information gap between two modalities: P2's regularisers", "~3 min; --quick: seconds"),
}


def info() -> int:
    """Print versions, devices and which backends are built and usable (and why not)."""
    import torch

    import contrastive_kernels as ck
    from contrastive_kernels.backends import BACKENDS, availability

    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # report, never fail
        triton_version = f"not importable ({type(exc).__name__}: {exc})"
    print(f"contrastive_kernels {ck.__version__}")
    print(f"python      {platform.python_version()} ({platform.machine()}, {platform.system()})")
    print(f"torch       {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"triton      {triton_version}")
    print(f"cpu threads {torch.get_num_threads()}")
    from contrastive_kernels.bench.schema import cpu_isa
    isa = cpu_isa()
    bf16 = ("bf16 tile GEMMs on the bf16 units" if isa == "avx512_bf16"
            else "bfloat16 upcast to float32")
    print(f"cpu isa     {isa} (SIMD path of the native CPU kernels, {bf16}; CK_CPU_ISA lowers it)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}      {torch.cuda.get_device_name(i)}")
    else:
        print("cuda        no device visible")
    print("\nbackend     usable  note")
    for name in BACKENDS:
        ok, why = availability(name)
        print(f"{name:<11} {'yes' if ok else 'no':<7} {why}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="contrastive-kernels",
                                     description="Fused contrastive-loss kernels: tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, usable backends")
    sub.add_parser("bench", help="benchmark the fused losses against the dense implementation "
                   "(see `bench --help`)", add_help=False)
    listing = "\n".join(f"  {name:<10} {what} [{when}]" for name, (_, what, when) in EXPERIMENTS.items())
    exp = sub.add_parser("experiment", help="run a paper experiment (experiment --help lists them)",
                         add_help=False)
    exp.add_argument("name", nargs="?", choices=sorted(EXPERIMENTS))
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        return info()
    if args.command == "bench":
        from contrastive_kernels.bench import main as bench_main
        return bench_main(rest)
    if args.name is None:
        print(f"usage: contrastive-kernels experiment {{{','.join(sorted(EXPERIMENTS))}}} [options]\n\n"
              f"experiments (outputs go to experiments/results/ unless --out says otherwise):\n{listing}\n\n"
              "contrastive-kernels experiment NAME --help: its options and their defaults")
        return 0 if "-h" in rest or "--help" in rest else 2
    return importlib.import_module(EXPERIMENTS[args.name][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
