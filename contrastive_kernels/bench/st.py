"""sentence-transformers' losses against their fused twins (``contrastive-kernels bench st``).

Two parts, every measurement in a fresh process (the shared probe, ``_memprobe``: peak RSS beyond
the inputs and a small warm-up), rows of the one CSV schema, one CSV and one plot per op:

* **loss only** (``st_mnrl``, ``st_gte``, ``st_gist``): precomputed float32 embeddings, D = 384,
  (anchor, positive, 2 hard negatives); forward + backward of the loss into the embeddings, median
  of ``--repeats`` calls. ``st_mnrl``: MultipleNegativesRankingLoss (query_to_doc);
  ``st_gte``: all four directions, joint partition (the GTE loss); ``st_gist``: GISTEmbed with a
  384-d guide, margin 0.05 — ``CachedGISTEmbedLoss.calculate_loss`` (GISTEmbedLoss itself takes one
  negative column only). Upstream's GIST similarities are ``nn.CosineSimilarity`` on broadcast
  (B, 1, D) × (1, M, D) operands: a B×M×D product per block, so its whole-batch form needs 103 GB
  at N = 8192; it is measured at its default mini_batch_size (32 rows per block) and at smaller N
  (``--gist-n``). Providers: ``sentence_transformers`` and ``ck.<backend>``.
* **whole cached step** (``st_cached_step``): ``CachedMultipleNegativesRankingLoss`` on a small
  BERT (2 layers, width 64, mean pooling, built locally) at batch B with triplets: embed in
  mini-batches, the loss, backward into every parameter; upstream's class vs the twin.

The tiny model builder is shared with tests/test_sentence_transformers.py.
"""
from __future__ import annotations

import argparse
import os
import sys

WORDS = ("the a cat dog bird sat ran flew on under near far red blue green big small quick slow "
         "tree house car road river hill").split()


def tiny_sentence_transformer(path: str, *, seed: int, hidden: int = 16, layers: int = 1,
                              dtype=None):
    """A BERT of ``layers`` layers and width ``hidden`` with mean pooling, built from nothing (a
    random config, a whole-word vocabulary of ``WORDS``, dropout 0) and saved under ``path``."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizer

    os.makedirs(path, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    torch.manual_seed(seed)
    # initializer_range 0.5: at the usual 0.02 a one-layer random BERT maps every text to nearly
    # the same embedding (all cosine similarities ≈ 0.99), which tests nothing
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, initializer_range=0.5)
    BertModel(config).save_pretrained(path)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    assert len(tokenizer) == len(vocab)  # every word is a token: distinct texts, distinct embeddings
    tokenizer.save_pretrained(path)
    module = Transformer(path, max_seq_length=16)
    model = SentenceTransformer(modules=[module, Pooling(module.get_embedding_dimension(), "mean")],
                                device="cpu")
    return model if dtype is None else model.to(dtype)


def random_texts(columns: int, b: int, seed: int = 0) -> list[list[str]]:
    """``columns`` lists of ``b`` random texts of 2–6 words."""
    import random

    rng = random.Random(seed)
    return [[" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(b)]
            for _ in range(columns)]


# ---------------------------------------------------------------------------------------------
# loss only
# ---------------------------------------------------------------------------------------------

LOSSES = {
    "st_mnrl": "MultipleNegativesRankingLoss, query_to_doc",
    "st_gte": "MultipleNegativesRankingLoss, all four directions, joint (GTE)",
    "st_gist": "GISTEmbed, 384-d guide, margin 0.05",
}

_LOSS_SETUP = """
import os, tempfile
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from contrastive_kernels.bench.st import loss_closure
run = loss_closure({provider!r}, {loss!r}, {n}, {d}, {columns}, tempfile.mkdtemp())
"""
def loss_closure(provider: str, loss: str, n: int, d: int, columns: int, workdir: str):
    """``run(k)``: forward + backward of ``loss`` on the first k rows of fixed embeddings."""
    import torch
    from sentence_transformers.sentence_transformer import losses as upstream

    from ..integrations import sentence_transformers as twins

    g = torch.Generator().manual_seed(0)
    emb = [torch.randn(n, d, generator=g).requires_grad_() for _ in range(columns)]
    guide = [torch.randn(n, d, generator=g) for _ in range(columns)]
    backend = provider.split(".", 1)[1] if provider.startswith("ck.") else None
    module = upstream if backend is None else twins
    extra = {} if backend is None else {"backend": backend}
    if loss == "st_gist":
        tiny = tiny_sentence_transformer(os.path.join(workdir, "tiny"), seed=0)
        fn = module.CachedGISTEmbedLoss(tiny, tiny, margin=0.05, **extra)  # mini_batch_size 32

        def step(k):
            return fn.calculate_loss([[e[:k]] for e in emb], [[x[:k]] for x in guide],
                                     with_backward=True)
    else:
        directions = (("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
                      if loss == "st_gte" else ("query_to_doc",))
        fn = module.MultipleNegativesRankingLoss(None, directions=directions, **extra)

        def step(k):
            out = fn.compute_loss_from_embeddings([e[:k] for e in emb], None)
            out.backward()
            return out.detach()

    def run(k):
        for e in emb:
            e.grad = None
        return float(step(k))
    return run


# ---------------------------------------------------------------------------------------------
# whole cached training step
# ---------------------------------------------------------------------------------------------

_STEP_SETUP = """
import os, tempfile
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from contrastive_kernels.bench.st import step_closure
run = step_closure({provider!r}, {b}, {mini_batch}, tempfile.mkdtemp())
"""
_STEP_CODE = """
import time as _time
t0 = _time.perf_counter()
value = run({b})
result = {{"ms": [(_time.perf_counter() - t0) * 1e3], "loss": value}}
"""


def step_closure(provider: str, b: int, mini_batch: int, workdir: str):
    """``run(k)``: one cached training step (embed, loss, backward into the model, SGD update) on
    the first k triplets."""
    import torch
    from sentence_transformers.sentence_transformer import losses as upstream

    from ..integrations import sentence_transformers as twins

    model = tiny_sentence_transformer(os.path.join(workdir, "model"), seed=0, hidden=64, layers=2)
    backend = provider.split(".", 1)[1] if provider.startswith("ck.") else None
    if backend is None:
        loss = upstream.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch)
    else:
        loss = twins.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch,
                                                        backend=backend)
    texts = random_texts(3, b, seed=1)
    features = [model.preprocess(col) for col in texts]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def cut(f, k):
        return {key: (v[:k] if isinstance(v, torch.Tensor) else v) for key, v in f.items()}

    def run(k):
        opt.zero_grad(set_to_none=True)
        value = loss([cut(f, k) for f in features], None)
        value.backward()
        opt.step()
        return float(value)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="contrastive-kernels bench st",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[2048, 8192], help="batch sizes (loss only)")
    p.add_argument("--gist-n", type=int, nargs="+", default=[512, 1024, 8192],
                   help="batch sizes of st_gist (upstream is skipped above --gist-upstream-max)")
    p.add_argument("--gist-upstream-max", type=int, default=1024,
                   help="largest N at which upstream's GIST is timed (its cost is B·M·D)")
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--columns", type=int, default=4, help="anchor, positive and hard negatives")
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    p.add_argument("--backend", default="auto", help="the twins' backend (ck.<backend> rows)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--step-batches", type=int, nargs="*", default=[4096, 16384],
                   help="batches of the whole cached step (none: skip that part)")
    p.add_argument("--mini-batch", type=int, default=256, help="the cached losses' mini_batch_size")
    p.add_argument("--out", default="bench_results")
    p.add_argument("--quick", action="store_true",
                   help="N 256 512, step B 256, one repeat (seconds; a plumbing check)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.step_batches, args.repeats, args.mini_batch = [256, 512], [256], 1, 64
        args.gist_n, args.gist_upstream_max = [256, 512], 512
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        print("bench st needs sentence-transformers: pip install "
              "'contrastive-kernels[sentence-transformers]'", file=sys.stderr)
        return 2

    import torch

    from .plot import plot_csv
    from .probe_rows import TIMED_CODE, measure_row
    from .schema import CsvSink, device_name

    dev = torch.device("cpu")
    providers = ["sentence_transformers", f"ck.{args.backend}"]
    jobs = [(loss, n) for loss in args.losses for n in (args.gist_n if loss == "st_gist" else args.n)]
    jobs += [("st_cached_step", b) for b in args.step_batches]
    sinks, paths, rows = {}, {}, []
    for op, n in jobs:
        if op not in sinks:
            paths[op] = os.path.join(args.out, f"{op}.csv")
            sinks[op] = CsvSink(paths[op])
        for provider in providers:
            if op == "st_gist" and provider == providers[0] and n > args.gist_upstream_max:
                print(f"{op:<15} N={n:>6} {provider:<22} skipped: upstream's cost grows as "
                      f"B·M·D ({n * n * (args.columns - 1) * args.d / 1e9:.0f}·10⁹ products a "
                      "call), N above --gist-upstream-max", flush=True)
                continue
            if op == "st_cached_step":
                setup = _STEP_SETUP.format(provider=provider, b=n, mini_batch=args.mini_batch)
                code = _STEP_CODE.format(b=n)
                note = (f"2-layer width-64 BERT, triplets, mini_batch_size {args.mini_batch}; "
                        "embed + loss + backward + SGD step")
                d = 64
            else:
                setup = _LOSS_SETUP.format(provider=provider, loss=op, n=n, d=args.d,
                                           columns=args.columns)
                code = TIMED_CODE.format(n=n, repeats=args.repeats)
                note = f"{LOSSES[op]}; {args.columns - 2} hard-negative columns; loss fwd+bwd"
                d = args.d
            row = dict(config="st", op=op, provider=provider, ours=provider.startswith("ck."),
                       mode="fwd_bwd", dtype="float32", n=n, m=n * (args.columns - 1), d=d)
            measure_row(row, setup=setup, code=code, note=note, timeout=args.timeout)
            sinks[op].write(row)
            rows.append(row)
            print(f"{op:<15} N={n:>6} {provider:<22} {row.get('ms_p50') or 0:>10.1f} ms "
                  f"{row.get('peak_mem_mb') or 0:>9.1f} MiB  {row['note'][:50]}", flush=True)
    for sink in sinks.values():
        sink.close()
    print(f"\n{device_name(dev)}, {torch.get_num_threads()} threads: ck / sentence-transformers")
    print(f"{'op':<15} {'N':>6} {'time ratio':>11} {'speed-up':>9} {'memory ratio':>13}")
    by = {(r["op"], r["n"], r["provider"]): r for r in rows if r.get("ms_p50") is not None}
    for op, n in jobs:
        st_row, ck_row = by.get((op, n, providers[0])), by.get((op, n, providers[1]))
        if st_row and ck_row:
            t = ck_row["ms_p50"] / st_row["ms_p50"]
            mem = ck_row["peak_mem_mb"] / max(st_row["peak_mem_mb"], 1e-9)
            print(f"{op:<15} {n:>6} {t:>11.3f} {1 / t:>8.2f}× {mem:>13.3f}")
    for op, path in paths.items():
        print(f"CSV: {path}")
        if not args.no_plot and plot_csv(path, path[:-4] + ".png",
                                         title=f"{op}: sentence-transformers vs fused twin"):
            print(f"plot: {path[:-4]}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
