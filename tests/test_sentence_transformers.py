"""The sentence-transformers twins against the installed sentence-transformers (the test extra).

A tiny BERT built here (random ``BertConfig``, a WordPiece vocabulary this file writes, mean
pooling; nothing downloads) embeds a batch of short texts; each twin and upstream's class see the
same features. float64: the loss and every model-parameter gradient within 1e-9 relative, every
``directions``/``partition_mode`` combination, pairs, triplets and n-tuples, both margin strategies.
float32: the relative rule against the float64 truth. Then 10 ``SentenceTransformerTrainer`` steps
with each twin and with upstream's class: per-step losses within 1e-5.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import random
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing downloads
# skipped only where the extra is absent: an installed sentence-transformers that fails to import
# (say, a transformers that trips over a broken torchvision) fails here instead of hiding 150 tests
if importlib.util.find_spec("sentence_transformers") is None:
    pytest.skip("the sentence-transformers extra", allow_module_level=True)
import sentence_transformers as st  # noqa: E402

from sentence_transformers.sentence_transformer import losses as st_losses  # noqa: E402
from sentence_transformers.util import cos_sim, dot_score, pairwise_cos_sim  # noqa: E402

from contrastive_kernels.bench.st import WORDS, tiny_sentence_transformer  # noqa: E402
from contrastive_kernels.integrations import sentence_transformers as ours  # noqa: E402
from helpers import assert_relative_rule  # noqa: E402

B = 6

# (twin name, upstream name); the symmetric classes are deprecated upstream
PAIRS = [("MultipleNegativesRankingLoss",) * 2, ("MultipleNegativesSymmetricRankingLoss",) * 2,
         ("CachedMultipleNegativesRankingLoss",) * 2,
         ("CachedMultipleNegativesSymmetricRankingLoss",) * 2,
         ("GISTEmbedLoss",) * 2, ("CachedGISTEmbedLoss",) * 2]


def tiny_model(path, *, seed: int, hidden: int = 16, dtype=torch.float64):
    """A one-layer BERT with mean pooling, built from nothing (dropout 0)."""
    return tiny_sentence_transformer(path, seed=seed, hidden=hidden, dtype=dtype)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"model": tiny_model(str(root / "model"), seed=0),
            "guide": tiny_model(str(root / "guide"), seed=2, hidden=8)}


def texts(columns: int, seed: int = 0, b: int = B):
    rng = random.Random(seed)
    return [[" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(b)]
            for _ in range(columns)]


def features(model, columns):
    return [model.preprocess(col) for col in columns]


def make(module, name, model, guide, kwargs):
    cls = getattr(module, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if "GIST" in name:
            return cls(model, guide, **kwargs)
        return cls(model, **kwargs)


def loss_and_grads(loss_fn, model, columns):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(features(model, columns), None)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_parity(name, kwargs, models, columns, rtol=1e-9):
    model, guide = models["model"], models["guide"]
    want, want_g = loss_and_grads(make(st_losses, name, model, guide, kwargs), model, columns)
    got, got_g = loss_and_grads(make(ours, name, model, guide, dict(kwargs, backend="chunked")),
                                model, columns)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    assert_grads_close(got_g, want_g, rtol, f"{name} {kwargs}")


def assert_grads_close(got_g, want_g, rtol, what):
    assert set(got_g) == set(want_g) and want_g
    # relative to the tensor's own largest entry; a tensor whose gradient is 0 in exact arithmetic
    # (the attention key bias: softmax ignores a constant) is judged against a millionth of the
    # largest gradient anywhere, not against its own rounding noise
    floor = 1e-6 * max(float(g.abs().max()) for g in want_g.values())
    for n in want_g:
        scale = max(float(want_g[n].abs().max()), floor)
        err = float((got_g[n] - want_g[n]).abs().max()) / scale
        assert err <= rtol, f"{what}: gradient of {n} off by {err:.2e} relative"


DIRECTIONS = [("query_to_doc",), ("query_to_doc", "doc_to_query"), ("query_to_doc", "query_to_query"),
              ("query_to_doc", "doc_to_doc"),
              ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")]
MNRL_CASES = [(d, p) for d in DIRECTIONS for p in ("joint", "per_direction")
              if p == "joint" or not set(d) & {"query_to_query", "doc_to_doc"}]


@pytest.mark.parametrize("columns", [2, 3, 4], ids=["pairs", "triplets", "4-tuples"])
@pytest.mark.parametrize("directions,partition_mode", MNRL_CASES)
@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
def test_mnrl_parity_float64(models, directions, partition_mode, columns, cached):
    name = "CachedMultipleNegativesRankingLoss" if cached else "MultipleNegativesRankingLoss"
    kwargs = dict(directions=directions, partition_mode=partition_mode)
    if cached:
        kwargs["mini_batch_size"] = 4
    assert_parity(name, kwargs, models, texts(columns, seed=columns))


@pytest.mark.parametrize("columns", [2, 3], ids=["pairs", "triplets"])
@pytest.mark.parametrize("mode", ["in_batch_negatives", "hard_negatives", "all_negatives"])
@pytest.mark.parametrize("name", ["MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss"])
def test_hardness_modes_parity_float64(models, name, mode, columns):
    # the penalty is strength·stopgrad(sim): the gradients tell a stop-gradient from a plain boost
    kwargs = dict(hardness_mode=mode, hardness_strength=5.0,
                  directions=("query_to_doc", "doc_to_query", "doc_to_doc"))
    if name.startswith("Cached"):
        kwargs["mini_batch_size"] = 4
    assert_parity(name, kwargs, models, texts(columns, seed=30 + columns))


@pytest.mark.parametrize("similarity", [cos_sim, dot_score], ids=["cos_sim", "dot_score"])
@pytest.mark.parametrize("name", [p[0] for p in PAIRS if "GIST" not in p[0]])
def test_mnrl_family_parity_float64(models, name, similarity):
    kwargs = dict(similarity_fct=similarity, scale=20.0 if similarity is cos_sim else 0.5)
    if name.startswith("Cached"):
        kwargs["mini_batch_size"] = 4
    assert_parity(name, kwargs, models, texts(3, seed=7))


GIST_CASES = [dict(margin_strategy=s, margin=m, contrast_anchors=a, contrast_positives=p)
              for s, m in (("absolute", 0.0), ("absolute", 0.1), ("relative", 0.05))
              for a, p in ((True, True), (False, False), (True, False), (False, True))]


@pytest.mark.parametrize("columns", [2, 3], ids=["pairs", "triplets"])
@pytest.mark.parametrize("kwargs", GIST_CASES, ids=lambda k: "-".join(str(v) for v in k.values()))
@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
def test_gist_parity_float64(models, kwargs, columns, cached):
    name = "CachedGISTEmbedLoss" if cached else "GISTEmbedLoss"
    if cached:
        kwargs = dict(kwargs, mini_batch_size=4)
    assert_parity(name, dict(kwargs, temperature=0.05), models, texts(columns, seed=11 + columns))


def test_cached_gist_parity_with_two_negative_columns(models):
    assert_parity("CachedGISTEmbedLoss", dict(mini_batch_size=4, margin=0.05), models,
                  texts(4, seed=5))


@pytest.mark.parametrize("similarity", [cos_sim, dot_score], ids=["cos_sim", "dot_score"])
def test_contrastive_tension_in_batch_parity_float64(models, similarity):
    # two encoders (upstream deep-copies the model) and a learnable scale: its gradient too
    name = "ContrastiveTensionLossInBatchNegatives"
    model = models["model"]
    kwargs = dict(similarity_fct=similarity, scale=20.0 if similarity is cos_sim else 0.5)
    columns = texts(1, seed=17)

    def run(module, extra):
        loss_fn = getattr(module, name)(model, **kwargs, **extra)
        loss = loss_fn(features(model, columns), None)
        loss.backward()
        grads = {n: p.grad for n, p in loss_fn.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    want, want_g = run(st_losses, {})
    got, got_g = run(ours, {"backend": "chunked"})
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    assert "logit_scale" in want_g
    assert_grads_close(got_g, want_g, 1e-9, name)
    model.zero_grad(set_to_none=True)


def test_the_guide_masks_something(models):
    # not vacuous: on these texts the guide removes pairs, so a loss without the mask differs
    model, guide = models["model"], models["guide"]
    columns = texts(3, seed=14)
    with torch.no_grad():
        emb = [model.encode(c, convert_to_tensor=True) for c in columns]
        gemb = [guide.encode(c, convert_to_tensor=True) for c in columns]
        masked = ours.gist_loss(emb[0], emb[1:], gemb[0], gemb[1:], 0.05, margin=0.1)
        never = ours.gist_loss(emb[0], emb[1:], gemb[0], gemb[1:], 0.05, margin=-10.0)
    assert abs(float(masked) - float(never)) > 1e-3


@pytest.mark.parametrize("name", [p[0] for p in PAIRS])
def test_float32_by_the_relative_rule(tmp_path, models, name):
    # the twin in float32 is no more than 2× further from the float64 truth than upstream in float32
    kwargs = {"mini_batch_size": 4} if name.startswith("Cached") else {}
    columns = texts(3, seed=21)
    truth, truth_g = loss_and_grads(make(st_losses, name, models["model"], models["guide"], kwargs),
                                    models["model"], columns)
    m32, g32 = models["model"].float(), models["guide"].float()
    try:
        same, same_g = loss_and_grads(make(st_losses, name, m32, g32, kwargs), m32, columns)
        got, got_g = loss_and_grads(make(ours, name, m32, g32, kwargs), m32, columns)
    finally:
        models["model"].double(), models["guide"].double()
    assert got.dtype == torch.float32
    assert_relative_rule(got, same, truth, torch.float32, "loss")
    for n in truth_g:
        assert_relative_rule(got_g[n], same_g[n], truth_g[n], torch.float32, n)


@pytest.mark.parametrize("twin,upstream", PAIRS + [("ContrastiveTensionLossInBatchNegatives",) * 2])
def test_same_constructor_config_and_citation(models, twin, upstream):
    ours_sig = inspect.signature(getattr(ours, twin).__init__).parameters
    theirs = inspect.signature(getattr(st_losses, upstream).__init__).parameters
    assert [(p.name, p.default) for p in theirs.values()] == \
        [(p.name, p.default) for p in ours_sig.values() if p.name != "backend"]
    assert ours_sig["backend"].kind is inspect.Parameter.KEYWORD_ONLY
    a = make(ours, twin, models["model"], models["guide"], {})
    b = make(st_losses, upstream, models["model"], models["guide"], {})
    assert a.get_config_dict() == b.get_config_dict()
    assert getattr(a, "citation", None) == getattr(b, "citation", None)  # upstream's Cached GIST has none
    assert isinstance(a, getattr(st_losses, upstream)) or "Symmetric" in twin


def test_symmetric_twins_warn_like_upstream(models):
    for name in ("MultipleNegativesSymmetricRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss"):
        with pytest.warns(DeprecationWarning, match="directions=\\('query_to_doc', 'doc_to_query'\\)"):
            getattr(ours, name)(models["model"])


def test_clear_errors(models):
    model = models["model"]
    with pytest.raises(ValueError, match="cos_sim or sentence_transformers.util.dot_score"):
        ours.MultipleNegativesRankingLoss(model, similarity_fct=pairwise_cos_sim)
    with pytest.raises(ValueError, match="cos_sim"):
        ours.CachedMultipleNegativesRankingLoss(model, similarity_fct=lambda a, b: a @ b.T)
    with pytest.raises(ValueError, match="query_to_doc"):  # upstream's own validation is kept
        ours.MultipleNegativesRankingLoss(model, directions=("doc_to_query",))
    loss = ours.GISTEmbedLoss(model, models["guide"])
    with pytest.raises(ValueError, match="Expected 2 or 3 embeddings"):
        loss(features(model, texts(4)), None)


def test_import_error_names_the_extra(tmp_path):
    # without sentence-transformers the module says which extra to install
    import subprocess
    import sys
    code = ("import sys; sys.modules['sentence_transformers'] = None\n"
            "try:\n    import contrastive_kernels.integrations.sentence_transformers\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install 'contrastive-kernels[sentence-transformers]'" in out.stdout, out


# ---------------------------------------------------------------------------------------------
# inside SentenceTransformerTrainer
# ---------------------------------------------------------------------------------------------

def _train(tmp_path, name, module, kwargs, columns: int, steps: int = 10, dtype=torch.float64):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    model = tiny_model(str(tmp_path / f"m-{module.__name__}"), seed=3, dtype=dtype)
    guide = tiny_model(str(tmp_path / f"g-{module.__name__}"), seed=2, hidden=8, dtype=dtype)
    cols = texts(columns, seed=99, b=4 * steps)
    data = Dataset.from_dict({n: c for n, c in zip(["anchor", "positive", "negative"], cols)})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4,
        learning_rate=5e-3, logging_steps=1, report_to=[], save_strategy="no", seed=0,
        data_seed=0, use_cpu=True, dataloader_drop_last=True, disable_tqdm=True)
    loss = make(module, name, model, guide, kwargs)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("name", [p[0] for p in PAIRS])
def test_ten_trainer_steps_match_upstream(tmp_path, name):
    # float64 models: the trajectories agree to rounding (~1e-14). In float32 they agree to
    # float32 rounding: GISTEmbed's temperature 0.01 puts the logits near 100, and per-step
    # losses then differ by up to 1.5e-5 (cpu) and 8.8e-6 (chunked) over ten steps (measured
    # 2026-12-03, step 0 already 1.4e-6); the float32 rule is test_float32_by_the_relative_rule
    kwargs = {"mini_batch_size": 2} if name.startswith("Cached") else {}
    if name == "MultipleNegativesRankingLoss":
        kwargs = dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = _train(tmp_path, name, st_losses, kwargs, 3)
        got = _train(tmp_path, name, ours, kwargs, 3)
    assert len(want) == len(got) == 10
    for step, (a, b) in enumerate(zip(got, want)):
        assert abs(a - b) <= 1e-5, f"{name} step {step}: {a} vs upstream {b}"


@pytest.mark.parametrize("loss", ["st_mnrl", "st_gte", "st_gist"])
def test_bench_closures_time_the_same_loss(tmp_path, loss):
    # `bench st` times upstream and the twin on the same embeddings: the two closures agree
    from contrastive_kernels.bench.st import loss_closure

    upstream = loss_closure("sentence_transformers", loss, 48, 24, 4, str(tmp_path / "a"))(48)
    twin = loss_closure("ck.chunked", loss, 48, 24, 4, str(tmp_path / "b"))(48)
    assert abs(twin - upstream) <= 1e-5 * abs(upstream), (twin, upstream)


# ---------------------------------------------------------------------------------------------
# MatryoshkaLoss around the twins
# ---------------------------------------------------------------------------------------------

def _matryoshka_run(module, inner_name, inner_kwargs, models, columns, n_dims_per_step):
    import random

    model, guide = models["model"], models["guide"]
    inner = make(module, inner_name, model, guide, inner_kwargs)
    loss = module.MatryoshkaLoss(model, inner, [16, 8, 4, 2], matryoshka_weights=[1, 2, 0.5, 1],
                                 n_dims_per_step=n_dims_per_step)
    random.seed(5)  # the same draw of dims on both sides
    return loss, loss_and_grads(loss, model, columns)


@pytest.mark.parametrize("n_dims_per_step", [-1, 2])
@pytest.mark.parametrize("inner_name,inner_kwargs,fused", [
    ("MultipleNegativesRankingLoss", {}, True),
    ("MultipleNegativesRankingLoss",
     dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")), True),
    ("MultipleNegativesRankingLoss",
     dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"), True),
    ("CachedMultipleNegativesRankingLoss", dict(mini_batch_size=4), True),
    ("CachedMultipleNegativesRankingLoss",
     dict(mini_batch_size=4, directions=("query_to_doc", "doc_to_doc")), True),
    ("MultipleNegativesRankingLoss", dict(hardness_mode="all_negatives", hardness_strength=5.0),
     False),
    ("GISTEmbedLoss", {}, False),
], ids=["mnrl", "mnrl-gte", "mnrl-symmetric", "cached", "cached-doc2doc", "hardness", "gist"])
def test_matryoshka_parity_float64(models, inner_name, inner_kwargs, fused, n_dims_per_step):
    # every selected dim from one sweep around the MNRL twins; upstream's loop around the rest
    columns = texts(3, seed=40)
    ours_loss, (got, got_g) = _matryoshka_run(ours, inner_name, dict(inner_kwargs, backend="chunked"),
                                              models, columns, n_dims_per_step)
    _, (want, want_g) = _matryoshka_run(st_losses, inner_name, inner_kwargs, models, columns,
                                        n_dims_per_step)
    assert ours_loss.fused is fused
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    assert_grads_close(got_g, want_g, 1e-9, f"Matryoshka({inner_name})")
    assert ours_loss.get_config_dict()["matryoshka_dims"] == (16, 8, 4, 2)
