"""Helpers shared by the experiment scripts: backend choice, tables, output files."""
from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
from typing import Iterable, Sequence

import torch

from .. import backends


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and each option's default shown once: appended unless the
    help text already states it, and never for flags or options whose default is None."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def quick_out(name: str) -> str:
    """Where a ``--quick`` smoke run writes: never the committed ``experiments/results/`` that the
    README embeds (``results_local/`` is git-ignored)."""
    return os.path.join("results_local", f"{name}-quick")


def output_folder(out, quick: bool, default: str, name: str):
    """The ``--out`` in force: as given ('' → None: write nothing), else the full run's default or,
    for ``--quick``, :func:`quick_out`."""
    if out is not None:
        return out or None
    return quick_out(name) if quick else default


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
