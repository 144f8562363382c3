"""The one plotter: time and peak memory against N, drawn from a benchmark CSV.

Colours and markers are fixed per provider (the same provider looks the same in every plot, run
after run); this library's providers are solid lines, peers dashed; the p20–p80 band is shaded; the
time panel has the roof row's floor (the fused FLOP count at the ceiling rate) as a dotted line,
named like the row.
"""
from __future__ import annotations

import sys
from typing import Optional

from .providers import FLOP_FACTOR, logit_shape
from .schema import as_float, read_csv

STYLE = {  # provider -> (colour, marker)
    "dense": ("#7f7f7f", "s"),
    "open_clip": ("#bcbd22", "D"),
    "open_clip_siglip": ("#bcbd22", "D"),
    "inf_cl": ("#9467bd", "v"),
    "pml_supcon": ("#8c564b", "P"),
    "pml_ntxent": ("#8c564b", "P"),
    "plain": ("#7f7f7f", "s"),
    "ck.reference": ("#e377c2", "x"),
    "ck.chunked": ("#ff7f0e", "^"),
    "ck.cpu": ("#1f77b4", "o"),
    "ck.triton": ("#2ca02c", "o"),
    "ck.cuda": ("#d62728", "o"),
    "ck.gradcache": ("#1f77b4", "o"),
}
_FALLBACK = ("#17becf", "*")


def _style(provider: str):
    base = provider.split("[", 1)[0]
    return STYLE.get(base, _FALLBACK)


def plot_csv(csv_path: str, png_path: str, title: Optional[str] = None) -> bool:
    """Two log-log panels from the CSV (one op, one mode): time vs N and peak memory vs N."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    rows = read_csv(csv_path)
    timed = [r for r in rows if as_float(r["ms_p50"]) is not None]
    data = [r for r in timed if r["provider"] not in ("gemm_ceiling", "copy_bw")]
    if not data:
        print("no timed rows: no plot", file=sys.stderr)
        return False
    first = data[0]
    series: dict = {}
    for r in data:
        series.setdefault(r["provider"], []).append(r)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12.5, 4.8))
    for name in sorted(series, key=lambda p: (not p.startswith("ck."), p)):
        pts = sorted(series[name], key=lambda r: int(r["n"]))
        colour, marker = _style(name)
        # dense and the peers' own code often coincide: dense gets large hollow markers on a dotted
        # line so that neither hides the other
        ls = "-" if name.startswith("ck.") else (":" if name == "dense" else "--")
        mk = dict(marker=marker, color=colour)
        if name == "dense":  # drawn on top: in the memory panel it coincides with open_clip's line
            mk.update(markersize=10, markerfacecolor="none", markeredgewidth=1.5, zorder=5)
        label = name + ("  (this library)" if name.startswith("ck.") else "")
        ns = [int(r["n"]) for r in pts]
        ax_t.plot(ns, [float(r["ms_p50"]) for r in pts], ls, label=label, **mk)
        lo = [as_float(r["ms_p20"]) for r in pts]
        hi = [as_float(r["ms_p80"]) for r in pts]
        if all(v is not None for v in lo + hi):
            ax_t.fill_between(ns, lo, hi, color=colour, alpha=0.18, linewidth=0)
        mem = [(int(r["n"]), as_float(r["peak_mem_mb"])) for r in pts]
        mem = [(n, m) for n, m in mem if m is not None and m > 0]
        if mem:
            ax_m.plot([n for n, _ in mem], [m for _, m in mem], ls, label=label, **mk)
    roof = next((r for r in timed if r["provider"] == "gemm_ceiling" and r["dtype"] == first["dtype"]),
                None)
    if roof and as_float(roof["tflops"]):
        ns = sorted({int(r["n"]) for r in data})
        rate = float(roof["tflops"]) * 1e12
        d = int(first["d"])
        floor = [FLOP_FACTOR.get(first["mode"], 8) * logit_shape(first["op"], n)[0]
                 * logit_shape(first["op"], n)[1] * d / rate * 1e3 for n in ns]
        ax_t.plot(ns, floor, ":", color="black", lw=1.2, label="floor at gemm_ceiling rate")
    xlabel = "batch B" if first["op"].startswith("gradcache") else "N (= M)"
    ax_t.set(xscale="log", yscale="log", xlabel=xlabel,
             ylabel="ms (median; band p20–p80) — lower is better",
             title=title or f"{first['op']} {first['mode']}, {first['dtype']}, D={first['d']}")
    ax_m.set(xscale="log", yscale="log", xlabel=xlabel,
             ylabel="peak extra memory (MiB) — lower is better",
             title="peak memory beyond the inputs")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xscale("log", base=2)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    loads = [v for v in (as_float(r.get("loadavg")) for r in data) if v is not None]
    load = f" · load average {min(loads):.1f}–{max(loads):.1f}" if loads else ""
    isa = f" · ISA {first['isa']}" if first.get("isa") else ""
    fig.suptitle(f"{first['device']}{isa} · torch {first['torch']} · commit {first['commit']}{load}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return True
