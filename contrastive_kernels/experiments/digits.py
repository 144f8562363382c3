"""Experiment 2 — self-supervised learning on scikit-learn's bundled 8×8 digits across batch sizes.

Data: ``sklearn.datasets.load_digits`` (1797 images, bundled with scikit-learn, no download), pixel
values scaled to [0, 1], a stratified train/test split (75/25, fixed). Each step takes a batch of
training images and makes two random views of every image (shift by up to ±1 pixel with zero fill,
drop 20% of the pixels, add N(0, 0.1²) noise). Encoder: MLP 64 → 256 → 16 (the representation ``h``),
projection head 16 → 16 → 64, L2-normalised; fixed temperature τ (logit scale 1/τ).

Losses (symmetric, view 1 ↔ view 2, through the fused library ops only):

- ``infonce``: :func:`contrastive_kernels.clip_loss` (minibatch InfoNCE, both directions);
- ``gamma`` / ``ema``: :class:`contrastive_kernels.gamma.GammaContrastiveLoss` with the dataset
  index of each image (``symmetric=True``: one state per direction).

Every method and batch size trains for the same number of epochs with Adam (so each sample's state
is updated once per epoch whatever the batch size). Score: linear-probe accuracy — multinomial
logistic regression on the frozen, standardised representation ``h`` of the un-augmented training
images, evaluated on the held-out test images. Baselines printed with the table: the same probe on
raw pixels and on a randomly initialised encoder.

Outputs: ``digits_runs.csv`` (one row per run), ``digits_summary.csv``, ``digits.png`` (probe accuracy
vs batch size, one colour per method, every run a dot) and ``digits.md`` (table + exact command).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from .. import functional
from ..gamma import GammaContrastiveLoss
from . import _common
from ._common import output_folder, quick_out

METHODS = ("infonce", "gamma", "ema", "batch")
COLOURS = {"infonce": "tab:red", "gamma": "tab:blue", "ema": "tab:green", "batch": "tab:orange"}


@dataclass
class Config:
    batch_sizes: tuple = (32, 128, 512)
    methods: tuple = ("infonce", "gamma", "ema")
    seeds: int = 3
    epochs: int = 30
    lr: float = 2e-3
    temperature: float = 0.2
    update_weight: float = 0.9
    shape: float = 1.0
    hidden: int = 256
    rep_dim: int = 16
    proj_dim: int = 64
    shift: int = 1
    drop: float = 0.2
    noise: float = 0.1
    backend: str = "auto"
    seed: int = 0
    out: Optional[str] = "experiments/results"


def load_data(seed: int = 0):
    """(x_train, y_train, x_test, y_test) as float32 / int64 tensors, pixels in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype(np.float32) / 16.0
    xtr, xte, ytr, yte = train_test_split(x, digits.target, test_size=0.25, random_state=seed,
                                          stratify=digits.target)
    return (torch.from_numpy(xtr), torch.from_numpy(ytr).long(), torch.from_numpy(xte),
            torch.from_numpy(yte).long())


def augment(x: torch.Tensor, cfg: Config, gen: torch.Generator) -> torch.Tensor:
    """One random view of each 8×8 image in ``x`` (B, 64): shift, pixel dropout, noise."""
    b = x.shape[0]
    k = cfg.shift
    side = 8 + 2 * k
    padded = torch.zeros(b, side, side, dtype=x.dtype)
    padded[:, k:k + 8, k:k + 8] = x.view(b, 8, 8)
    dy = torch.randint(0, 2 * k + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * k + 1, (b,), generator=gen)
    ar = torch.arange(8)
    flat = (dy[:, None, None] + ar[None, :, None]) * side + (dx[:, None, None] + ar[None, None, :])
    view = padded.view(b, side * side).gather(1, flat.view(b, 64))
    keep = (torch.rand(b, 64, generator=gen) >= cfg.drop).to(x.dtype)
    return view * keep + cfg.noise * torch.randn(b, 64, generator=gen, dtype=x.dtype)


class Encoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.rep_dim))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(cfg.rep_dim, cfg.rep_dim), nn.ReLU(),
                                  nn.Linear(cfg.rep_dim, cfg.proj_dim))

    def forward(self, x):
        return nn.functional.normalize(self.head(self.body(x)), dim=1)


def linear_probe(train_feats: np.ndarray, ytr: np.ndarray, test_feats: np.ndarray,
                 yte: np.ndarray) -> float:
    """Test accuracy of multinomial logistic regression on standardised frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_feats)
    clf = LogisticRegression(max_iter=3000, C=1.0)
    clf.fit(scaler.transform(train_feats), ytr)
    return float(clf.score(scaler.transform(test_feats), yte))


def _features(model: Encoder, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.body(x).numpy()


def train_one(method: str, batch: int, seed: int, cfg: Config, data, backend: str) -> dict:
    """Train one encoder; returns its probe accuracy, last-epoch InfoNCE and wall time."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    xtr, ytr, xte, yte = data
    n = xtr.shape[0]
    if batch > n:
        raise ValueError(f"batch size {batch} exceeds the {n} training images")
    torch.manual_seed(seed)
    model = Encoder(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    order_gen = torch.Generator().manual_seed(10_000 + seed)
    aug_gen = torch.Generator().manual_seed(20_000 + seed)
    scale = 1.0 / cfg.temperature
    loss_fn = None
    if method != "infonce":
        loss_fn = GammaContrastiveLoss(n, estimator=method, shape=cfg.shape,
                                       update_weight=cfg.update_weight, symmetric=True,
                                       generator=torch.Generator().manual_seed(30_000 + seed),
                                       backend=backend)
    t0 = time.time()
    steps_per_epoch = n // batch  # drop the ragged last batch: every step has `batch` pairs
    last_nce = []
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=order_gen)
        last_nce = []
        for s in range(steps_per_epoch):
            idx = perm[s * batch:(s + 1) * batch]
            x = xtr[idx]
            z1, z2 = model(augment(x, cfg, aug_gen)), model(augment(x, cfg, aug_gen))
            if loss_fn is None:
                loss = functional.clip_loss(z1, z2, scale, backend=backend)
                nce = loss.detach()
            else:
                out = loss_fn(z1, z2, idx, scale, output_dict=True)
                loss, nce = out["contrastive_loss"], out["info_nce"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last_nce.append(float(nce))
    seconds = time.time() - t0
    model.eval()
    acc = linear_probe(_features(model, xtr), ytr.numpy(), _features(model, xte), yte.numpy())
    return {"method": method, "batch": batch, "seed": seed, "probe_acc": acc,
            "final_info_nce": float(np.mean(last_nce)) if last_nce else float("nan"),
            "steps": steps_per_epoch * cfg.epochs, "seconds": seconds}


def baselines(cfg: Config, data) -> dict:
    xtr, ytr, xte, yte = data
    out = {"raw pixels": linear_probe(xtr.numpy(), ytr.numpy(), xte.numpy(), yte.numpy())}
    accs = []
    for s in range(cfg.seeds):
        torch.manual_seed(cfg.seed * 1000 + s)
        model = Encoder(cfg)
        accs.append(linear_probe(_features(model, xtr), ytr.numpy(), _features(model, xte), yte.numpy()))
    out["random encoder"] = float(np.mean(accs))
    return out


def summarise(runs: list, cfg: Config):
    rows = []
    for b in cfg.batch_sizes:
        for m in cfg.methods:
            accs = np.array([r["probe_acc"] for r in runs if r["method"] == m and r["batch"] == b])
            nces = np.array([r["final_info_nce"] for r in runs if r["method"] == m and r["batch"] == b])
            sd = float(accs.std(ddof=1)) if len(accs) > 1 else 0.0
            rows.append((m, b, float(accs.mean()), sd, float(nces.mean()), len(accs)))
    return rows


def table(rows, cfg: Config) -> str:
    by = {(r[0], r[1]): r for r in rows}
    header = ["batch"] + [f"{m}: probe acc % (InfoNCE)" for m in cfg.methods]
    body = []
    for b in cfg.batch_sizes:
        cells = [str(b)]
        for m in cfg.methods:
            _, _, mean, sd, nce, _ = by[(m, b)]
            cells.append(f"{100 * mean:.2f} ± {100 * sd:.2f} ({nce:.3f})")
        body.append(cells)
    return _common.format_table(header, body)


def plot(runs: list, rows, base: dict, cfg: Config, path: str) -> None:
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    offsets = np.linspace(-0.08, 0.08, len(cfg.methods))
    for off, m in zip(offsets, cfg.methods):
        xs = [math.log2(b) for b in cfg.batch_sizes]
        means = [100 * r[2] for b in cfg.batch_sizes for r in rows if r[0] == m and r[1] == b]
        sds = [100 * r[3] for b in cfg.batch_sizes for r in rows if r[0] == m and r[1] == b]
        ax.errorbar([x + off for x in xs], means, yerr=sds, color=COLOURS[m], marker="o",
                    capsize=3, label=m)
        pts = [(math.log2(r["batch"]) + off, 100 * r["probe_acc"]) for r in runs if r["method"] == m]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=COLOURS[m], s=10, alpha=0.5)
    styles = {"raw pixels": ":", "random encoder": "-."}
    for name, acc in base.items():
        ax.axhline(100 * acc, color="grey", ls=styles.get(name, "--"), lw=1, label=f"{name} probe")
    ax.set_xticks([math.log2(b) for b in cfg.batch_sizes])
    ax.set_xticklabels([str(b) for b in cfg.batch_sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("linear-probe test accuracy (%)")
    ax.set_title(f"digits SSL: {cfg.epochs} epochs, τ={cfg.temperature}, γ={cfg.update_weight}, "
                 f"{cfg.seeds} seeds", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    d = Config()
    p = argparse.ArgumentParser(prog="contrastive-kernels experiment digits",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=_common.HelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help=f"default {list(d.batch_sizes)} ({[16, 64]} with --quick)")
    p.add_argument("--methods", nargs="+", default=list(d.methods), choices=METHODS, help="methods to compare")
    p.add_argument("--seeds", type=int, default=d.seeds, help="runs per (method, batch size)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs per run")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument("--temperature", type=float, default=d.temperature, help="InfoNCE temperature τ (logit scale 1/τ)")
    p.add_argument("--update-weight", type=float, default=d.update_weight, help="γ of the E-step")
    p.add_argument("--shape", type=float, default=d.shape, help="Gamma shape a")
    p.add_argument("--backend", default=d.backend, help="backend of the fused ops (auto, reference, chunked, cpu, ...)")
    p.add_argument("--seed", type=int, default=d.seed, help="base seed")
    p.add_argument("--out", default=None,
                   help="output folder (default {}; with --quick {}, so a smoke run never "
                        "overwrites the committed results; '' for none)".format(d.out, quick_out("digits")))
    p.add_argument("--tag", default="digits", help="file-name stem of the outputs")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (small matrices: 1 is fastest on a shared machine)")
    p.add_argument("--quick", action="store_true", help="tiny config for smoke tests")
    a = p.parse_args(argv)
    cfg = Config(batch_sizes=tuple(a.batch_sizes or d.batch_sizes), methods=tuple(a.methods), seeds=a.seeds,
                 epochs=a.epochs, lr=a.lr, temperature=a.temperature,
                 update_weight=a.update_weight, shape=a.shape, backend=a.backend, seed=a.seed,
                 out=output_folder(a.out, a.quick, d.out, "digits"))
    if a.quick:
        cfg.seeds, cfg.epochs = 1, 1
        if a.batch_sizes is None:
            cfg.batch_sizes = (16, 64)
    if cfg.seeds < 1 or cfg.epochs < 1 or min(cfg.batch_sizes) < 2:
        p.error("seeds and epochs must be >= 1 and batch sizes >= 2")
    return cfg, a


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    data = load_data(0)
    backend = _common.pick_backend(cfg.backend, torch.device("cpu"), torch.float32)
    print(f"digits SSL: {data[0].shape[0]} train / {data[2].shape[0]} test images, batch sizes "
          f"{list(cfg.batch_sizes)}, methods {list(cfg.methods)}, {cfg.seeds} seeds, {cfg.epochs} "
          f"epochs, τ={cfg.temperature}, γ={cfg.update_weight}, shape={cfg.shape}", file=sys.stderr)
    t0 = time.time()
    runs = []
    for b in cfg.batch_sizes:
        for m in cfg.methods:
            for s in range(cfg.seeds):
                r = train_one(m, b, cfg.seed * 1000 + s, cfg, data, backend)
                runs.append(r)
                print(f"  batch={b:<5} {m:<8} seed={s}  probe {100 * r['probe_acc']:.2f}%  "
                      f"InfoNCE {r['final_info_nce']:.3f}  ({r['seconds']:.1f}s)",
                      file=sys.stderr, flush=True)
    base = baselines(cfg, data)
    seconds = time.time() - t0
    rows = summarise(runs, cfg)
    tab = table(rows, cfg)
    foot = (f"Cells: linear-probe test accuracy mean ± sd over {cfg.seeds} seeds (last-epoch mean "
            f"symmetric InfoNCE of the training batches). Baselines: "
            + ", ".join(f"{k} {100 * v:.2f}%" for k, v in base.items())
            + f". {seconds:.0f}s; {_common.environment_line(backend)}")
    print(tab)
    print("\n" + foot)
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
        stem = os.path.join(cfg.out, args.tag)
        keys = ["method", "batch", "seed", "probe_acc", "final_info_nce", "steps", "seconds"]
        _common.write_csv(stem + "_runs.csv", keys,
                          [[f"{r[k]:.6f}" if isinstance(r[k], float) else r[k] for k in keys]
                           for r in runs])
        _common.write_csv(stem + "_summary.csv",
                          ["method", "batch", "probe_acc_mean", "probe_acc_sd", "final_info_nce", "runs"],
                          [(m, b, f"{a:.6f}", f"{sd:.6f}", f"{nce:.6f}", k) for m, b, a, sd, nce, k in rows])
        plot(runs, rows, base, cfg, stem + ".png")
        with open(stem + ".md", "w") as f:
            f.write(f"# Digits self-supervised experiment ({args.tag})\n\n")
            f.write("Command:\n\n    contrastive-kernels experiment digits " + " ".join(argv) + "\n\n")
            f.write(f"Config: {cfg}\n\n")
            f.write(tab + "\n\n" + foot + "\n")
        print(f"wrote {stem}_runs.csv, {stem}_summary.csv, {stem}.png, {stem}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
