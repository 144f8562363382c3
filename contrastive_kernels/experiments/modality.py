"""Experiment ``modality``: P2's modality-structure regularisers under a controlled information gap.

P2 (Jiang et al., CVPR 2023, Thm 3.1): when each modality carries label information the other lacks,
perfectly aligning image and text features is sub-optimal for downstream tasks; its regularisers
(deep feature separation, Brownian bridge, geometric consistency) are meant to keep better structure.

Synthetic two-modality data with a known information gap. Labels ``y = (y_shared, y_img, y_txt)``,
each with ``--classes`` values. Latent factors ``z_c = μ_c[y_c] + σ·ε`` (``--factor-dim`` dims each):

    image = tanh(A_img·[z_shared, z_img, n_img]) + noise     (z_img: only in the image)
    text  = tanh(A_txt·[z_shared, z_txt, n_txt]) + noise     (z_txt: only in the text)

with label-free nuisance factors ``n`` and random mixing matrices ``A``. Two small MLP encoders map
each modality to ``--dim``-dimensional unit features (plus a second, private head for feature
separation); augmentations are input noise and feature dropout. Methods, all through the fused ops:

    clip       ½(V2T + T2V)                      (pure cross-modal alignment)
    con        L_Con = ¼(V2T + T2V + V2V + T2T)  (P2's base loss)
    con+sep    L_Con + 1.0·L_Sep                 (private head; probes see [shared, private])
    con+bridge L_Con + 1.0·L_Br   (t = 0.25)
    con+gc     L_Con + 0.25·(L_GC + L_GCᵃ)

After training, logistic-regression probes on frozen test features predict each label component
from the image features, the text features and both concatenated. ``image→y_img`` and
``text→y_txt`` measure the modality-specific information P2 says alignment throws away.

    contrastive-kernels experiment modality            # default run, a few minutes on 2 cores
    contrastive-kernels experiment modality --quick    # smoke run (seconds)
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ._common import HelpFormatter, output_folder, quick_out
from ..modality import ModalityStructureLoss
from ._common import environment_line, format_table, pick_backend, pyplot, write_csv

METHODS = {
    "clip": dict(in_modal=False),
    "con": dict(),
    "con+sep": dict(separation=True),
    "con+bridge": dict(bridge=True),
    "con+gc": dict(geometric=True),
}
LABELS = ("shared", "img", "txt")
VIEWS = ("image", "text", "both")


@dataclass
class Config:
    n_train: int = 6144
    n_test: int = 4096
    classes: int = 5
    factor_dim: int = 4
    nuisance_dim: int = 8
    input_dim: int = 32
    factor_noise: float = 0.6
    input_noise: float = 0.05
    dim: int = 8
    hidden: int = 128
    epochs: int = 20
    batch: int = 256
    lr: float = 2e-3
    aug_noise: float = 0.15
    aug_drop: float = 0.15
    init_scale: float = 10.0


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def make_world(cfg: Config, gen: torch.Generator):
    """Class prototypes of the three factors and the two mixing matrices (fixed per seed)."""
    protos = {c: 1.5 * torch.randn(cfg.classes, cfg.factor_dim, generator=gen) for c in LABELS}
    width = 2 * cfg.factor_dim + cfg.nuisance_dim
    mix = {m: 1.5 * torch.randn(width, cfg.input_dim, generator=gen) / math.sqrt(width)
           for m in ("image", "text")}
    return protos, mix


def sample(cfg: Config, world, n: int, gen: torch.Generator):
    protos, mix = world
    y = torch.randint(cfg.classes, (n, 3), generator=gen)
    z = {c: protos[c][y[:, i]] + cfg.factor_noise * torch.randn(n, cfg.factor_dim, generator=gen)
         for i, c in enumerate(LABELS)}

    def modality(name, own):
        nuis = torch.randn(n, cfg.nuisance_dim, generator=gen)
        h = torch.cat([z["shared"], z[own], nuis], dim=1)
        return torch.tanh(h @ mix[name]) + cfg.input_noise * torch.randn(n, cfg.input_dim,
                                                                         generator=gen)

    return modality("image", "img"), modality("text", "txt"), y


def augment(x: torch.Tensor, cfg: Config, gen: torch.Generator) -> torch.Tensor:
    noise = cfg.aug_noise * torch.randn(x.shape, generator=gen)
    keep = (torch.rand(x.shape, generator=gen) >= cfg.aug_drop).to(x.dtype) / (1 - cfg.aug_drop)
    return (x + noise) * keep


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------

class Encoder(nn.Module):
    """MLP trunk with a shared head and (for feature separation) a private head; unit outputs."""

    def __init__(self, cfg: Config, private: bool):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(cfg.input_dim, cfg.hidden), nn.GELU(),
                                   nn.Linear(cfg.hidden, cfg.hidden), nn.GELU())
        self.shared = nn.Linear(cfg.hidden, cfg.dim)
        self.private = nn.Linear(cfg.hidden, cfg.dim) if private else None

    def forward(self, x):
        h = self.trunk(x)
        s = nn.functional.normalize(self.shared(h), dim=1)
        p = None if self.private is None else nn.functional.normalize(self.private(h), dim=1)
        return s, p


def train(method: str, cfg: Config, x_img, x_txt, seed: int, backend: str):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 7919)
    sep = bool(METHODS[method].get("separation"))
    enc_i, enc_t = Encoder(cfg, sep), Encoder(cfg, sep)
    log_scale = nn.Parameter(torch.tensor(math.log(cfg.init_scale)))
    loss_fn = ModalityStructureLoss(**METHODS[method], backend=backend)
    params = list(enc_i.parameters()) + list(enc_t.parameters()) + [log_scale]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    n = x_img.shape[0]
    steps = cfg.epochs * (n // cfg.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    last = {}
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        for b in range(n // cfg.batch):
            idx = perm[b * cfg.batch:(b + 1) * cfg.batch]
            xi, xt = x_img[idx], x_txt[idx]
            # Two augmented views per modality: the first is the anchor (v, t), the second vᵃ, tᵃ.
            v, vp = enc_i(augment(xi, cfg, gen))
            t, tp = enc_t(augment(xt, cfg, gen))
            va, vpa = enc_i(augment(xi, cfg, gen))
            ta, tpa = enc_t(augment(xt, cfg, gen))
            scale = log_scale.exp().clamp(max=100.0)
            terms = loss_fn(v, t, scale, va, ta, vp, tp, vpa, tpa, output_dict=True)
            loss = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            last = {k: float(x.detach()) for k, x in terms.items()}
    return enc_i.eval(), enc_t.eval(), last


@torch.no_grad()
def features(enc, x, full: bool):
    s, p = enc(x)
    return torch.cat([s, p], 1) if (full and p is not None) else s


def probe(train_x, train_y, test_x, test_y) -> float:
    """Test accuracy of a standardised multinomial logistic regression (sklearn, lbfgs)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits
    # One BLAS thread: these fits are tiny, and multi-threaded OpenBLAS spins badly on a loaded box.
    with threadpool_limits(1):
        sc = StandardScaler().fit(train_x)
        clf = LogisticRegression(max_iter=2000, C=1.0).fit(sc.transform(train_x), train_y)
        return float(clf.score(sc.transform(test_x), test_y))


QUICK_COLUMNS = ("image->shared", "image->img", "text->txt", "both->shared")


def probe_all(fi_tr, ft_tr, y_tr, fi_te, ft_te, y_te, only=None) -> dict:
    """Accuracy for each (view, label component): image, text, both concatenated.

    ``only``: probe just these ``"view->label"`` columns (the quick smoke run)."""
    out = {}
    views = {"image": (fi_tr, fi_te), "text": (ft_tr, ft_te),
             "both": (np.concatenate([fi_tr, ft_tr], 1), np.concatenate([fi_te, ft_te], 1))}
    for view, (tr, te) in views.items():
        for k, lab in enumerate(LABELS):
            if only is None or f"{view}->{lab}" in only:
                out[f"{view}->{lab}"] = probe(tr, y_tr[:, k], te, y_te[:, k])
    return out


@torch.no_grad()
def alignment(enc_i, enc_t, x_img, x_txt) -> dict:
    v, _ = enc_i(x_img)
    t, _ = enc_t(x_txt)
    n = min(1024, v.shape[0])
    sim = v[:n] @ t[:n].T  # small evaluation block only (1024×1024), not part of training
    r1 = float((sim.argmax(1) == torch.arange(n)).float().mean())
    return {"pos_cos": float((v * t).sum(1).mean()), "i2t_r1": r1}


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------

def run(cfg: Config, seeds, methods, backend: str, verbose: bool = True, only=None):
    rows = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(1000 + seed)
        world = make_world(cfg, gen)
        xi_tr, xt_tr, y_tr = sample(cfg, world, cfg.n_train, gen)
        xi_te, xt_te, y_te = sample(cfg, world, cfg.n_test, gen)
        y_tr_np, y_te_np = y_tr.numpy(), y_te.numpy()
        raw = probe_all(xi_tr.numpy(), xt_tr.numpy(), y_tr_np, xi_te.numpy(), xt_te.numpy(), y_te_np,
                        only)
        rows.append(dict(method="raw inputs", features="input", seed=seed, **raw))
        for method in methods:
            t0 = time.perf_counter()
            enc_i, enc_t, last = train(method, cfg, xi_tr, xt_tr, seed, backend)
            sets = ["shared"] + (["shared+private"] if method == "con+sep" else [])
            for fs in sets:
                full = fs != "shared"
                acc = probe_all(features(enc_i, xi_tr, full).numpy(), features(enc_t, xt_tr, full).numpy(),
                                y_tr_np, features(enc_i, xi_te, full).numpy(),
                                features(enc_t, xt_te, full).numpy(), y_te_np, only)
                rows.append(dict(method=method, features=fs, seed=seed, **acc,
                                 **alignment(enc_i, enc_t, xi_te, xt_te),
                                 final_loss=sum(last.values()), train_s=time.perf_counter() - t0))
            if verbose:
                r = rows[-len(sets)]
                print(f"seed {seed} {method:<11} {time.perf_counter() - t0:5.1f}s  "
                      f"image->img {r['image->img']:.3f}  text->txt {r['text->txt']:.3f}  "
                      f"both->shared {r['both->shared']:.3f}  R@1 {r['i2t_r1']:.3f}", flush=True)
    return rows


COLUMNS = [f"{v}->{l}" for v in VIEWS for l in LABELS]


def summarise(rows):
    keys = []
    for r in rows:
        k = (r["method"], r["features"])
        if k not in keys:
            keys.append(k)
    out = []
    for k in keys:
        sel = [r for r in rows if (r["method"], r["features"]) == k]
        s = {"method": k[0], "features": k[1], "seeds": len(sel)}
        for c in COLUMNS + ["pos_cos", "i2t_r1"]:
            vals = [r[c] for r in sel if c in r]
            if vals:
                s[c] = float(np.mean(vals))
                s[c + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        out.append(s)
    return out


def table(summary) -> str:
    shown = ["image->shared", "image->img", "text->shared", "text->txt", "both->shared",
             "both->img", "both->txt", "pos_cos", "i2t_r1"]
    header = ["method", "features"] + shown
    body = []
    for s in summary:
        cells = [s["method"], s["features"]]
        for c in shown:
            cells.append(f"{s[c]:.3f} ± {s[c + '_std']:.3f}" if c in s else "—")
        body.append(cells)
    return format_table(header, body)


def plot(summary, path: str, cfg: Config) -> None:
    plt = pyplot()
    panels = [("image->img", "image features → y_img\n(image-only info)"),
              ("text->txt", "text features → y_txt\n(text-only info)"),
              ("both->shared", "image ⊕ text → y_shared"),
              ("image->shared", "image features → y_shared")]
    entries = [s for s in summary]
    names = [s["method"] + ("\n[sh+priv]" if s["features"] == "shared+private" else "") for s in entries]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    chance = 1.0 / cfg.classes
    for ax, (col, title) in zip(axes, panels):
        means = [s[col] for s in entries]
        stds = [s[col + "_std"] for s in entries]
        colors = ["0.6" if s["method"] == "raw inputs" else "C%d" % (i % 10) for i, s in enumerate(entries)]
        ax.bar(range(len(entries)), means, yerr=stds, color=colors, capsize=3)
        ax.axhline(chance, color="k", ls=":", lw=1, label="chance")
        ax.set_xticks(range(len(entries)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1.0)
        ax.set_ylabel("linear-probe accuracy (test)")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"P2 modality regularisers under an information gap (D = {cfg.dim}, "
                 f"mean ± std over seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="contrastive-kernels experiment modality",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the experiment's own, 1 with --quick)")
    p.add_argument("--dim", type=int, default=None, help="embedding dimension D (default 8)")
    p.add_argument("--n-train", type=int, default=None, help="training pairs (default: the experiment's own, 384 with --quick)")
    p.add_argument("--backend", default="auto", help="backend of the fused ops (auto, reference, chunked, cpu, ...)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the models are tiny, more threads only add "
                        "synchronisation)")
    p.add_argument("--out", default=None,
                   help="output folder (files PREFIX_results.{csv,md,png}, PREFIX_summary.csv; "
                        f"default experiments/results, with --quick {quick_out('modality')})")
    p.add_argument("--prefix", default="modality", help="output file prefix")
    args = p.parse_args(argv)
    args.out = output_folder(args.out, args.quick, os.path.join("experiments", "results"),
                             "modality")

    cfg = Config()
    if args.quick:
        cfg.n_train, cfg.n_test, cfg.epochs, cfg.batch, cfg.hidden = 384, 192, 1, 128, 32
    if args.epochs is not None:
        cfg.epochs = args.epochs
    if args.dim is not None:
        cfg.dim = args.dim
    if args.n_train is not None:
        cfg.n_train = args.n_train
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {list(METHODS)}")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    seeds = list(range(1 if args.quick else args.seeds))
    if args.threads < 1:
        p.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    backend = pick_backend(args.backend, torch.device("cpu"), torch.float32)

    t0 = time.perf_counter()
    rows = run(cfg, seeds, methods, backend, verbose=not args.quick,
               only=QUICK_COLUMNS if args.quick else None)
    summary = summarise(rows)
    text = table(summary)
    elapsed = time.perf_counter() - t0
    print(text)

    os.makedirs(args.out, exist_ok=True)
    cols = ["method", "features", "seed"] + COLUMNS + ["pos_cos", "i2t_r1", "final_loss", "train_s"]
    write_csv(os.path.join(args.out, f"{args.prefix}_results.csv"), cols,
              [[r.get(c, "") for c in cols] for r in rows])
    scols = ["method", "features", "seeds"] + [x for c in COLUMNS + ["pos_cos", "i2t_r1"]
                                               for x in (c, c + "_std")]
    write_csv(os.path.join(args.out, f"{args.prefix}_summary.csv"), scols,
              [[s.get(c, "") for c in scols] for s in summary])
    plot(summary, os.path.join(args.out, f"{args.prefix}_results.png"), cfg)
    command = "contrastive-kernels experiment modality " + " ".join(argv if argv is not None
                                                                    else sys.argv[1:])
    with open(os.path.join(args.out, f"{args.prefix}_results.md"), "w") as f:
        f.write("# Experiment `modality`: P2's regularisers under an information gap\n\n")
        f.write(f"Command: `{command.strip()}`\n\n")
        f.write(f"Environment: {environment_line(backend)}; {elapsed:.0f} s.\n\n")
        f.write(f"Config: {cfg}\n\nSeeds: {seeds}. Linear-probe test accuracy (mean ± std over "
                f"seeds; chance = {1 / cfg.classes:.2f}). `image->img` = image features predicting "
                "the image-only label, etc.; `pos_cos` = mean cosine of matched test pairs; "
                "`i2t_r1` = image→text top-1 retrieval among 1024 test pairs.\n\n")
        f.write(text + "\n")
    stem = os.path.join(args.out, args.prefix)
    print(f"wrote {stem}_results.csv, {stem}_summary.csv, {stem}_results.png, {stem}_results.md",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
