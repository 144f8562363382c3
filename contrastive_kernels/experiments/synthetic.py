"""Experiment 1 — the known-optimum problem of docs/math.md §3: does each method find θ* = 1?

Problem (one scalar parameter θ). A finite set of ``n`` anchors, anchor ``i`` with an offset
``μ_i ~ U(−offset, offset)``. Each step draws a batch of ``B`` anchors (epochs of a shuffled
order, so every anchor is revisited and its per-sample state matters) and ``B`` FRESH candidates
``x_j ~ N(0, σ²)`` (streaming: no finite-population optimum to correct for). Scores:

    candidate j for anchor i:  θ·(μ_i + x_j)           ~ θ·N(μ_i, σ²)
    positive of anchor i:      θ·c_i,  c_i = μ_i + σ²

so per anchor ``L_i(θ) = −θ·c_i + log E[e^{θ(μ_i + x)}] = −θσ² + θ²σ²/2`` (+ const), minimised at
**θ* = 1** for every anchor and every σ. The positive also sits in the denominator (as in InfoNCE),
which does not move the optimum: the positive's score derivative ``c_i`` equals the tilted mean of
the candidates exactly at θ = 1, so ``−θc_i + log E[Ẑ_i(θ)]`` is stationary at θ = 1 for any B.
The offsets make ``Z_i = E[Ẑ_i] ∝ e^{θμ_i}`` differ between anchors and move with θ, so one
global normaliser cannot stand in for the per-sample estimates.

Encoding through the library (no hand-written loss): ``S = logit_scale·Q·Kᵀ`` with
``logit_scale = 1``, query ``q_i = θ·[1, μ_i]`` (θ is a learnable *feature*, so it may take any
sign), candidate keys ``[x_j, 1]``, the positive key ``[σ², 1]`` (``labels`` point at it). The R
seeds of one (method, σ) cell run in ONE fused call: run r's features occupy their own block of
coordinates, plus run-indicator coordinates that make every cross-run logit exactly ``−L``
(L = 1000), so its ``exp`` underflows to exactly 0 — each run sees only its own candidates, and its
gradient is what a separate run would get (checked in the tests). float32 features. Losses:

- ``infonce``: ``contrastive_kernels.info_nce`` (minibatch InfoNCE: biased gradient);
- ``gamma`` / ``ema``: :class:`contrastive_kernels.gamma.GammaContrastiveLoss` (``symmetric=False``,
  one state slot per (run, anchor)); ``batch`` is available too (same gradient as ``infonce``).

Optimiser: plain SGD on θ from θ₀ = 0 with a cosine-decayed step size (same for every method).
Outputs: ``synthetic_trajectories.csv`` (θ every few steps), ``synthetic_summary.csv``,
``synthetic.png`` (every run a line, one colour per method, θ* dashed, one panel per σ) and
``synthetic.md`` (the table and the exact command).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .. import functional
from ..gamma import GammaContrastiveLoss
from . import _common
from ._common import output_folder, quick_out

METHODS = ("infonce", "gamma", "ema", "batch")
THETA_STAR = 1.0
CROSS_RUN_LOGIT = 1000.0  # −L on cross-run logits: exp(−1000) is exactly 0 in float32 and float64
COLOURS = {"infonce": "tab:red", "gamma": "tab:blue", "ema": "tab:green", "batch": "tab:orange"}


@dataclass
class Config:
    noises: tuple = (0.25, 0.5, 1.0, 1.5, 2.0)
    seeds: int = 10
    methods: tuple = ("infonce", "gamma", "ema")
    steps: int = 3000
    anchors: int = 64
    batch: int = 16
    lr: float = 0.05
    update_weight: float = 0.1
    shape: float = 1.0
    offset: float = 1.0
    theta0: float = 0.0
    tolerance: float = 0.05
    record_every: int = 10
    backend: str = "auto"
    seed: int = 0
    out: Optional[str] = "experiments/results"
    extra: dict = field(default_factory=dict)


def _block_features(theta: torch.Tensor, mu_rows: torch.Tensor, x: torch.Tensor, sigma: float,
                    runs: int, batch: int):
    """Query (R·B, 3R) and keys (R·(B+1), 3R) of R independent runs, block-diagonal.

    Run r owns coordinates 2r, 2r+1: query ``[θ_r, θ_r·μ_i]``, keys ``[x_j, 1]`` (candidates) and
    ``[σ², 1]`` (the positive, first key of the run). Coordinates 2R + t are run indicators: keys of
    run t hold 1 there, and a query of run r holds −L at every t ≠ r (0 at its own). So a within-run
    logit is exactly ``θ_r(x_j + μ_i)`` (no cancellation) and a cross-run logit is exactly −L.
    """
    dtype, dev = x.dtype, x.device
    dim = 3 * runs
    run_of_row = torch.arange(runs, device=dev).repeat_interleave(batch)
    rows = torch.arange(runs * batch, device=dev)
    q_lin = torch.zeros(runs * batch, dim, dtype=dtype, device=dev)  # multiplied by θ_r
    q_lin[rows, 2 * run_of_row] = 1.0
    q_lin[rows, 2 * run_of_row + 1] = mu_rows
    q_const = torch.zeros(runs * batch, dim, dtype=dtype, device=dev)
    q_const[:, 2 * runs:] = -CROSS_RUN_LOGIT
    q_const[rows, 2 * runs + run_of_row] = 0.0
    query = theta[run_of_row, None] * q_lin + q_const

    per_run = batch + 1
    keys = torch.zeros(runs * per_run, dim, dtype=dtype, device=dev)
    key_run = torch.arange(runs, device=dev).repeat_interleave(per_run)
    values = torch.cat([torch.full((runs, 1), sigma ** 2, dtype=dtype, device=dev), x], dim=1)
    krows = torch.arange(runs * per_run, device=dev)
    keys[krows, 2 * key_run] = values.reshape(-1)
    keys[krows, 2 * key_run + 1] = 1.0
    keys[krows, 2 * runs + key_run] = 1.0
    labels = torch.arange(runs, device=dev).repeat_interleave(batch) * per_run
    return query, keys, labels


def run_cell(method: str, sigma: float, cfg: Config, seeds: list[int], backend: str,
             dtype: torch.dtype = torch.float32) -> np.ndarray:
    """θ trajectories (len(seeds), steps // record_every + 1) of independent runs, one per seed."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    runs, n, b = len(seeds), cfg.anchors, cfg.batch
    if b > n:
        raise ValueError(f"batch ({b}) must not exceed the number of anchors ({n})")
    gens = [torch.Generator().manual_seed(1_000_003 * s + 7) for s in seeds]
    mu = torch.stack([(torch.rand(n, generator=g, dtype=dtype) * 2 - 1) * cfg.offset for g in gens])
    theta = torch.full((runs,), cfg.theta0, dtype=dtype, requires_grad=True)
    loss_fn = None
    if method != "infonce":
        sample_gen = torch.Generator().manual_seed(cfg.seed * 7919 + int(round(sigma * 1000)) + 1)
        loss_fn = GammaContrastiveLoss(runs * n, estimator=method, shape=cfg.shape,
                                       update_weight=cfg.update_weight, symmetric=False,
                                       generator=sample_gen, backend=backend)
    perms = [torch.randperm(n, generator=g) for g in gens]
    pos = 0
    record = [theta.detach().numpy().copy()]
    for step in range(cfg.steps):
        if pos + b > n:
            perms = [torch.randperm(n, generator=g) for g in gens]
            pos = 0
        idx = torch.stack([p[pos:pos + b] for p in perms])  # (R, B) anchor ids per run
        pos += b
        x = torch.stack([torch.randn(b, generator=g, dtype=dtype) for g in gens]) * sigma
        mu_rows = mu.gather(1, idx).reshape(-1)
        query, keys, labels = _block_features(theta, mu_rows, x, sigma, runs, b)
        if loss_fn is None:
            loss = functional.info_nce(query, keys, 1.0, labels, backend=backend)
        else:
            index = (idx + torch.arange(runs)[:, None] * n).reshape(-1)
            loss = loss_fn(query, keys, index, 1.0, labels=labels)
        # The loss is a mean over R·B rows; × R gives each run the gradient of its own batch mean.
        (grad,) = torch.autograd.grad(loss * runs, theta)
        lr = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / cfg.steps))
        with torch.no_grad():
            theta -= lr * grad
        if (step + 1) % cfg.record_every == 0 or step + 1 == cfg.steps:
            record.append(theta.detach().numpy().copy())
    return np.stack(record, axis=1)


def _steps_axis(cfg: Config) -> np.ndarray:
    ticks = list(range(0, cfg.steps + 1, cfg.record_every))
    if ticks[-1] != cfg.steps:
        ticks.append(cfg.steps)
    return np.array(ticks)


def run(cfg: Config, progress: bool = True):
    """Every (method, σ) cell. Returns ``(results, backend, seconds)`` with
    ``results[(method, σ)] = trajectories (seeds, records)``."""
    backend = _common.pick_backend(cfg.backend, torch.device("cpu"), torch.float32)
    seeds = [cfg.seed * 1000 + s for s in range(cfg.seeds)]
    results = {}
    t0 = time.time()
    for sigma in cfg.noises:
        for method in cfg.methods:
            tc = time.time()
            results[(method, sigma)] = run_cell(method, sigma, cfg, seeds, backend)
            if progress:
                fin = results[(method, sigma)][:, -1]
                print(f"  sigma={sigma:<5} {method:<8} final θ {fin.mean():.3f} ± {fin.std(ddof=1) if len(fin) > 1 else 0:.3f}"
                      f"  ({time.time() - tc:.1f}s)", file=sys.stderr, flush=True)
    return results, backend, time.time() - t0


def summarise(results, cfg: Config):
    rows = []
    for sigma in cfg.noises:
        for method in cfg.methods:
            fin = results[(method, sigma)][:, -1]
            sd = float(fin.std(ddof=1)) if len(fin) > 1 else 0.0
            hits = int((np.abs(fin - THETA_STAR) <= cfg.tolerance).sum())
            rows.append((method, sigma, float(fin.mean()), sd, hits, len(fin)))
    return rows


def table(rows, cfg: Config) -> str:
    methods = list(cfg.methods)
    header = ["σ (noise)"] + [f"{m}: θ mean ± sd (hits)" for m in methods]
    by = {(r[0], r[1]): r for r in rows}
    body = []
    for sigma in cfg.noises:
        cells = [f"{sigma:g}"]
        for m in methods:
            _, _, mean, sd, hits, total = by[(m, sigma)]
            cells.append(f"{mean:.3f} ± {sd:.3f} ({hits}/{total})")
        body.append(cells)
    return _common.format_table(header, body)


def plot(results, cfg: Config, path: str) -> None:
    plt = _common.pyplot()
    steps = _steps_axis(cfg)
    cols = len(cfg.noises)
    fig, axes = plt.subplots(1, cols, figsize=(3.2 * cols, 3.4), sharey=True, squeeze=False)
    for ax, sigma in zip(axes[0], cfg.noises):
        for method in cfg.methods:
            traj = results[(method, sigma)]
            for k, line in enumerate(traj):
                ax.plot(steps, line, color=COLOURS[method], lw=0.8, alpha=0.6,
                        label=method if k == 0 else None)
        ax.axhline(THETA_STAR, color="black", ls="--", lw=1.0, label="θ* = 1")
        ax.set_title(f"σ = {sigma:g}")
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("θ")
    axes[0][-1].legend(loc="best", fontsize=8)
    fig.suptitle(f"Known-optimum problem: {cfg.seeds} runs per method, batch {cfg.batch}, "
                 f"γ={cfg.update_weight}, Gamma shape {cfg.shape}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv) -> tuple[Config, argparse.Namespace]:
    d = Config()
    p = argparse.ArgumentParser(prog="contrastive-kernels experiment synthetic",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=_common.HelpFormatter)
    p.add_argument("--noises", type=float, nargs="+", default=list(d.noises), help="σ values")
    p.add_argument("--seeds", type=int, default=d.seeds, help="runs per (method, σ)")
    p.add_argument("--methods", nargs="+", default=list(d.methods), choices=METHODS, help="methods to compare")
    p.add_argument("--steps", type=int, default=d.steps, help="SGD steps per run")
    p.add_argument("--anchors", type=int, default=d.anchors, help="size of the finite anchor set")
    p.add_argument("--batch", type=int, default=d.batch, help="anchors and candidates per step")
    p.add_argument("--lr", type=float, default=d.lr, help="initial SGD step size (cosine decay)")
    p.add_argument("--update-weight", type=float, default=d.update_weight, help="γ of the E-step")
    p.add_argument("--shape", type=float, default=d.shape, help="Gamma shape a")
    p.add_argument("--offset", type=float, default=d.offset, help="anchor offsets μ_i ~ U(±offset)")
    p.add_argument("--theta0", type=float, default=d.theta0, help="starting θ (the optimum is θ* = 1)")
    p.add_argument("--tolerance", type=float, default=d.tolerance, help="a hit: |θ − 1| ≤ tolerance")
    p.add_argument("--record-every", type=int, default=d.record_every, help="record θ every this many steps")
    p.add_argument("--backend", default=d.backend, help="backend of the fused ops (auto, reference, chunked, cpu, ...)")
    p.add_argument("--seed", type=int, default=d.seed, help="base seed")
    p.add_argument("--out", default=None,
                   help="output folder (default {}; with --quick {}, so a smoke run never "
                        "overwrites the committed results; '' for none)".format(d.out, quick_out("synthetic")))
    p.add_argument("--tag", default="synthetic", help="file-name stem of the outputs")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: the ops are tiny, threads only add overhead)")
    p.add_argument("--quick", action="store_true", help="tiny config for smoke tests")
    a = p.parse_args(argv)
    cfg = Config(noises=tuple(a.noises), seeds=a.seeds, methods=tuple(a.methods), steps=a.steps,
                 anchors=a.anchors, batch=a.batch, lr=a.lr, update_weight=a.update_weight,
                 shape=a.shape, offset=a.offset, theta0=a.theta0, tolerance=a.tolerance,
                 record_every=a.record_every, backend=a.backend, seed=a.seed,
                 out=output_folder(a.out, a.quick, d.out, "synthetic"))
    if a.quick:
        cfg.noises, cfg.seeds, cfg.steps, cfg.anchors, cfg.batch = (0.5, 1.5), 2, 40, 16, 4
        cfg.record_every = 5
    if cfg.steps < 1 or cfg.seeds < 1 or cfg.batch < 1 or cfg.anchors < 1 or cfg.record_every < 1:
        p.error("steps, seeds, batch, anchors and record-every must be >= 1")
    return cfg, a


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"synthetic known-optimum problem: σ in {list(cfg.noises)}, {cfg.seeds} seeds, methods "
          f"{list(cfg.methods)}, {cfg.steps} steps, batch {cfg.batch}, {cfg.anchors} anchors, lr "
          f"{cfg.lr} (cosine), γ={cfg.update_weight}, shape={cfg.shape}", file=sys.stderr)
    results, backend, seconds = run(cfg)
    rows = summarise(results, cfg)
    tab = table(rows, cfg)
    print(tab)
    print(f"\nθ* = {THETA_STAR}; hits = runs with |θ_final − θ*| ≤ {cfg.tolerance}; "
          f"{seconds:.0f}s; {_common.environment_line(backend)}")
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
        stem = os.path.join(cfg.out, args.tag)
        steps = _steps_axis(cfg)
        traj_rows = []
        for (method, sigma), traj in results.items():
            for k, line in enumerate(traj):
                traj_rows.extend((method, sigma, k, int(s), f"{v:.6f}") for s, v in zip(steps, line))
        _common.write_csv(stem + "_trajectories.csv", ["method", "sigma", "seed", "step", "theta"],
                          traj_rows)
        _common.write_csv(stem + "_summary.csv",
                          ["method", "sigma", "theta_mean", "theta_sd", "hits", "runs"],
                          [(m, s, f"{mean:.6f}", f"{sd:.6f}", h, t) for m, s, mean, sd, h, t in rows])
        plot(results, cfg, stem + ".png")
        with open(stem + ".md", "w") as f:
            f.write(f"# Synthetic known-optimum experiment ({args.tag})\n\n")
            f.write("Command:\n\n    contrastive-kernels experiment synthetic "
                    + " ".join(argv) + "\n\n")
            f.write(f"Config: {cfg}\n\n".replace(", extra={}", ""))
            f.write(tab + "\n\n")
            f.write(f"θ* = {THETA_STAR}; cells: final θ mean ± sd over seeds (hits = runs with "
                    f"|θ − θ*| ≤ {cfg.tolerance}). {seconds:.0f}s on "
                    f"{_common.environment_line(backend)}.\n")
        print(f"wrote {stem}_trajectories.csv, {stem}_summary.csv, {stem}.png, {stem}.md",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
