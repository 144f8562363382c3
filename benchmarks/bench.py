"""Benchmark entry point for a source checkout: the same as ``contrastive-kernels bench``.

Every option and configuration lives in ``contrastive_kernels/bench/`` (``--help``, ``--list``);
this file only makes ``python benchmarks/bench.py ...`` work without installing.

    python benchmarks/bench.py --quick
    python benchmarks/bench.py --n 8192 --providers dense,open_clip,cpu --repeats 9
    python benchmarks/bench.py cpu-tune           # tile sizes of the native CPU kernels
"""
import os
import sys

try:
    import contrastive_kernels  # noqa: F401
except ImportError:  # source checkout, not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from contrastive_kernels.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
