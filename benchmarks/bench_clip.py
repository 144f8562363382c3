"""Benchmark the fused CLIP loss against the dense (open_clip-style) loss.

Same as ``contrastive-kernels bench`` / ``python -m contrastive_kernels bench``; all options live in
``contrastive_kernels/bench.py`` (``--help``). Works from a source checkout without installing.

    python benchmarks/bench_clip.py --quick
    python benchmarks/bench_clip.py --n 8192 --providers dense,cpu --repeats 7
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
