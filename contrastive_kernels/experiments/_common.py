"""Helpers shared by the experiment scripts: backend choice, tables, output files."""
from __future__ import annotations

import csv
import os
import platform
import sys
from typing import Iterable, Sequence

import torch

from .. import backends


def pick_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Resolve ``name`` for these tensors. For ``"auto"`` only, a backend whose availability check
    itself fails (e.g. a half-installed native extension) is reported and replaced by ``chunked``,
    so an experiment still runs; an explicitly named backend is never replaced."""
    if name != "auto":
        return backends.resolve(name, device, dtype)
    try:
        return backends.resolve(name, device, dtype)
    except Exception as exc:  # noqa: BLE001 - report and continue with the portable backend
        print(f"note: backend 'auto' could not be resolved ({type(exc).__name__}: {exc}); "
              "using 'chunked'", file=sys.stderr)
        return "chunked"


def format_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table (also readable as plain text)."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def write_csv(path: str, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def environment_line(backend: str) -> str:
    import numpy
    return (f"python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, "
            f"{torch.get_num_threads()} CPU threads, backend {backend!r}, {platform.machine()}")


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (headless machines)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
