"""Matryoshka losses from one sweep (the prefix op families, docs/math.md §9) against a dense loop
over the prefixes: ``Σ_t w_t·reference.loss(normalize(x[:, :d_t]), …)`` in float64, every loss,
every reduction, ragged shapes, dims off the tile boundaries (``chunked-tiny``), the gradients of
the features, ``logit_scale`` and ``logit_bias``; float32 by the relative rule."""
from __future__ import annotations

import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels import reference
from helpers import assert_cuda_kernels_lack, make_features
from test_conformance import _class_labels, _views, conform

F64 = torch.float64


@pytest.fixture
def prefix_backend(backend):
    """Every CPU backend (the prefix families are in all of them; the native CPU and Triton
    kernels have their own op-level tests: test_native_cpu_prefix.py, test_triton_prefix.py)."""
    return backend


def _unit(x, d):
    return torch.nn.functional.normalize(x[:, :d], dim=1)


def dense(loss, dims, weights, normalize=True):
    """The loop everyone writes: one loss per prefix, weighted."""
    weights = weights or (1.0,) * len(dims)
    cut = _unit if normalize else (lambda x, d: x[:, :d])

    def total(*args, **kw):
        xs, rest = args[:2], args[2:]
        return sum(w * loss(cut(xs[0], d), cut(xs[1], d), *rest, **kw)
                   for d, w in zip(dims, weights))
    return total


def _supcon_dense(labels):
    def fn(x, _unused, s, reduction="mean"):
        return reference.supcon_loss(x, labels, s, reduction=reduction)
    return fn


CASES = {
    # name: (ours(a, b, *scalars, backend, reduction, **mrl), reference per prefix, scalars)
    "info_nce": (lambda a, b, s, **k: ck.info_nce(a, b, s, **k),
                 lambda a, b, s, reduction="mean": reference.info_nce(a, b, s, None, reduction),
                 (9.0,)),
    "clip": (lambda a, b, s, **k: ck.clip_loss(a, b, s, **k),
             lambda a, b, s, reduction="mean": reference.clip_loss(a, b, s, None, reduction),
             (9.0,)),
    "nt_xent": (lambda a, b, s, **k: ck.nt_xent_loss(a, b, s, **k),
                lambda a, b, s, reduction="mean": reference.nt_xent_loss(a, b, s, reduction),
                (9.0,)),
    "siglip": (lambda a, b, s, bias, **k: ck.siglip_loss(a, b, s, bias, **k),
               lambda a, b, s, bias, reduction="mean": reference.siglip_loss(a, b, s, bias, None,
                                                                             reduction),
               (9.0, -3.0)),
}


def _inputs(name, n, d, seed):
    if name == "nt_xent":
        return _views(n, d, seed=seed)
    a, b = make_features(n, n if name != "info_nce" else n + 5, d, seed=seed, normalize=False)
    return a, b


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dims,weights", [((3,), None), ((2, 5, 13), (1.0, 0.5, 2.0)),
                                          ((1, 7, 11), (0.25, 1.0, 1.0))])
@pytest.mark.parametrize("name", list(CASES))
def test_matryoshka_float64(prefix_backend, name, dims, weights, reduction):
    ours, per_prefix, scalars = CASES[name]
    a, b = _inputs(name, 9, 13, seed=len(dims) + 3)
    mrl = dict(matryoshka_dims=dims, matryoshka_weights=weights, reduction=reduction)
    up = None if reduction != "none" else torch.randn(2 * 9 if name == "nt_xent" else 9, dtype=F64)
    conform(lambda *x, backend: ours(*x, backend=backend, **mrl),
            lambda *x: dense(per_prefix, dims, weights)(*x, reduction=reduction),
            (a, b), scalars, F64, prefix_backend, upstream=up)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_matryoshka_without_normalisation(prefix_backend, name):
    ours, per_prefix, scalars = CASES[name]
    a, b = make_features(11, 11, 10, seed=4)
    conform(lambda *x, backend: ours(*x, backend=backend, matryoshka_dims=(4, 10),
                                     matryoshka_normalize=False),
            dense(per_prefix, (4, 10), None, normalize=False), (a, b), scalars, F64, prefix_backend)


@pytest.mark.parametrize("ref_set", [False, True], ids=["self", "reference-set"])
def test_matryoshka_supcon_float64(prefix_backend, ref_set):
    n, d, dims = 12, 9, (2, 4, 9)
    x, r = make_features(n, n + 3, d, seed=5, normalize=False)
    labels, ref_labels = _class_labels(n, 3), _class_labels(n + 3, 3, seed=6)

    if ref_set:
        def ours(x, r, s, backend):
            return ck.supcon_loss(x, labels, s, ref_features=r, ref_labels=ref_labels,
                                  matryoshka_dims=dims, backend=backend)

        def truth(x, r, s):
            return sum(reference.supcon_loss(_unit(x, dd), labels, s, _unit(r, dd), ref_labels)
                       for dd in dims)
        conform(ours, truth, (x, r), (9.0,), F64, prefix_backend)
    else:
        conform(lambda x, s, backend: ck.supcon_loss(x, labels, s, matryoshka_dims=dims,
                                                     backend=backend),
                lambda x, s: sum(reference.supcon_loss(_unit(x, dd), labels, s) for dd in dims),
                (x,), (9.0,), F64, prefix_backend)


@pytest.mark.parametrize("name", list(CASES))
def test_matryoshka_float32_relative_rule(lowp_backend, name):
    ours, per_prefix, scalars = CASES[name]
    a, b = _inputs(name, 37, 40, seed=9)
    dims = (8, 16, 40)
    conform(lambda *x, backend: ours(*x, backend=backend, matryoshka_dims=dims),
            dense(per_prefix, dims, None), (a, b), scalars, torch.float32, lowp_backend)


def test_one_dim_equal_to_d_is_the_plain_loss_on_normalised_inputs():
    a, b = make_features(8, 8, 6, seed=1, normalize=False)
    got = ck.clip_loss(a, b, 10.0, matryoshka_dims=(6,), backend="chunked")
    want = ck.clip_loss(_unit(a, 6), _unit(b, 6), 10.0, backend="chunked")
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)


def test_modules_take_the_same_arguments():
    a, b = make_features(6, 6, 8, seed=2, normalize=False)
    mrl = dict(matryoshka_dims=(2, 8), matryoshka_weights=(2.0, 1.0))
    pairs = [(ck.ClipLoss(backend="chunked", **mrl)(a, b, 5.0),
              ck.clip_loss(a, b, 5.0, backend="chunked", **mrl)),
             (ck.SigLipLoss(backend="chunked", **mrl)(a, b, 5.0, -1.0),
              ck.siglip_loss(a, b, 5.0, -1.0, backend="chunked", **mrl)),
             (ck.InfoNCELoss(backend="chunked", **mrl)(a, b, 5.0),
              ck.info_nce(a, b, 5.0, backend="chunked", **mrl)),
             (ck.NTXentLoss(backend="chunked", **mrl)(a, b, 5.0),
              ck.nt_xent_loss(a, b, 5.0, backend="chunked", **mrl)),
             (ck.SupConLoss(backend="chunked", **mrl)(a, torch.arange(6) % 2, 5.0),
              ck.supcon_loss(a, torch.arange(6) % 2, 5.0, backend="chunked", **mrl))]
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the distributed forms (gather, ring, every SigLIP dist_impl) are in tests/test_distributed.py


def test_backends_without_the_prefix_families_say_so(monkeypatch):
    assert_cuda_kernels_lack(monkeypatch, "prefix")


@pytest.mark.parametrize("dims,weights,error,match", [
    ((), None, TypeError, "non-empty"),
    ((4, 2), None, ValueError, "strictly increasing"),
    ((0, 2), None, ValueError, "strictly increasing"),
    ((2, 9), None, ValueError, r"D = 8"),
    ((2.5, 4), None, TypeError, "ints"),
    ((2, 4), (1.0,), ValueError, "one weight per dim"),
    ((2, 4), (1.0, float("nan")), ValueError, "finite"),
])
def test_bad_dims_and_weights(dims, weights, error, match):
    a, b = make_features(4, 4, 8)
    with pytest.raises(error, match=match):
        ck.clip_loss(a, b, 5.0, matryoshka_dims=dims, matryoshka_weights=weights)
    with pytest.raises(ValueError, match="needs matryoshka_dims"):
        ck.info_nce(a, b, 5.0, matryoshka_weights=(1.0,))
    with pytest.raises(TypeError, match="bool"):
        ck.info_nce(a, b, 5.0, matryoshka_dims=(2,), matryoshka_normalize=1)


def test_bench_providers_time_the_same_loss():
    # `bench matryoshka` times the fused loss, separate ck losses and dense losses: the same value
    from contrastive_kernels.bench.matryoshka import _SETUP

    values = {}
    for provider in ("ck.chunked", "ck.separate", "dense"):
        scope: dict = {}
        exec(_SETUP.format(provider=provider, n=40, d=24, dims=(4, 12, 24)), scope)
        values[provider] = scope["run"](40)
    assert max(values.values()) - min(values.values()) <= 1e-5 * abs(values["dense"]), values
