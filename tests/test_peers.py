"""The second-wave losses against the peers they replace: pytorch-metric-learning 2.9.0's
``NTXentLoss`` and ``SupConLoss``, open_clip 3.3.0's ``SigLipLoss``, and the forms of
sentence-transformers' ``MultipleNegativesRankingLoss`` written as dense formulas of that loss.

float64: ≤ 1e-9 relative to the peer; float32: the relative rule, with the peer in float32 as the
same-dtype yardstick and the peer in float64 as the truth. The peers compare cosine similarities
(they L2-normalise inside); ours use the features as given, so our side normalises first
(``_unit``) — on unit inputs the values agree as they are, and the gradients then agree too.
"""
import pytest
import torch

import contrastive_kernels as ck
from helpers import (IN_CI, assert_close_f64, assert_relative_rule, leaf, make_features,
                     open_clip_loss_module, reference)

RTOL_PEER = 1e-9


@pytest.fixture(scope="module")
def pml():
    from contrastive_kernels._peers import load_pml_losses

    losses, why = load_pml_losses()
    if losses is None:
        if IN_CI:
            pytest.fail(f"pytorch-metric-learning is required in CI: {why}")
        pytest.skip(why)
    return losses


@pytest.fixture(scope="module")
def open_clip_loss():
    return open_clip_loss_module()


def _unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


def _grads(fn, *tensors):
    ins = [leaf(t) for t in tensors]
    out = fn(*ins)
    return out.detach(), torch.autograd.grad(out, ins, allow_unused=True)


def _labels(n, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (n,), generator=g)


def _parity(ours, theirs, tensors, dtype, names):
    """ours(*tensors) vs theirs(*tensors): float64 ≤ 1e-9 relative; float32 the relative rule."""
    if dtype == torch.float64:
        a, ga = _grads(ours, *tensors)
        b, gb = _grads(theirs, *tensors)
        assert_close_f64(a, b, "loss", rtol=RTOL_PEER)
        for name, x, y in zip(names, ga, gb):
            if y is None:  # the peer has no gradient for it (a fixed temperature)
                continue
            assert_close_f64(x, y, f"grad {name}", rtol=RTOL_PEER)
        return
    t64 = [t.double() for t in tensors]
    gt, g_gt = _grads(theirs, *t64)
    same, g_same = _grads(theirs, *[t.to(dtype) for t in t64])
    out, g_out = _grads(ours, *[t.to(dtype) for t in t64])
    assert_relative_rule(out, same, gt, dtype, "loss")
    for name, o, r, g in zip(names, g_out, g_same, g_gt):
        if g is not None:
            assert_relative_rule(o, r, g, dtype, f"grad {name}")


# ---------------------------------------------------------------------------------------------
# NT-Xent
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
# (130, 3), not D = 1: at D = 1 every unit view is ±1 and PML's tie handling differs at tiny, so
# that case could only ever skip
@pytest.mark.parametrize("n,d", [(1, 7), (7, 37), (37, 130), (130, 3)])
def test_nt_xent_matches_pml(pml, backend, n, d, dtype):
    a, b = make_features(n, n, d, dtype=dtype, seed=n + d)
    temperature = 0.1
    labels = torch.arange(n).repeat(2)
    theirs = pml.NTXentLoss(temperature=temperature)
    _parity(lambda a, b: ck.nt_xent_loss(_unit(a), _unit(b), 1 / temperature, backend=backend),
            lambda a, b: theirs(torch.cat([a, b]), labels), (a, b), dtype, ("view_a", "view_b"))


def test_nt_xent_module_and_logit_scale_gradient(backend):
    a, b = make_features(37, 37, 13, seed=3)
    s = torch.tensor(1 / 0.07, dtype=torch.float64)
    ours, g_ours = _grads(lambda a, b, s: ck.NTXentLoss(backend=backend)(a, b, s), a, b, s)
    ref, g_ref = _grads(reference.nt_xent_loss, a, b, s)
    assert_close_f64(ours, ref, "loss")
    for name, x, y in zip(("view_a", "view_b", "logit_scale"), g_ours, g_ref):
        assert_close_f64(x, y, f"grad {name}")


# ---------------------------------------------------------------------------------------------
# SupCon
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("classes", [1, 2, 7, "n"])
@pytest.mark.parametrize("n,d", [(1, 7), (7, 37), (37, 130), (130, 7)])
def test_supcon_matches_pml(pml, backend, n, d, classes, dtype):
    f, _ = make_features(n, 1, d, dtype=dtype, seed=2 * n + d)
    labels = _labels(n, n if classes == "n" else classes, seed=n)
    temperature = 0.1
    theirs = pml.SupConLoss(temperature=temperature)
    _parity(lambda f: ck.supcon_loss(_unit(f), labels, 1 / temperature, backend=backend),
            lambda f: theirs(f, labels), (f,), dtype, ("features",))


@pytest.mark.parametrize("n,m", [(7, 37), (37, 7), (1, 5)])
def test_supcon_with_reference_set_matches_pml(pml, backend, n, m):
    f, r = make_features(n, m, 13, seed=n + m)
    labels, ref_labels = _labels(n, 3, seed=1), _labels(m, 3, seed=2)
    theirs = pml.SupConLoss(temperature=0.2)
    _parity(lambda f, r: ck.supcon_loss(_unit(f), labels, 5.0, ref_features=_unit(r),
                                        ref_labels=ref_labels, backend=backend),
            lambda f, r: theirs(f, labels, ref_emb=r, ref_labels=ref_labels), (f, r),
            torch.float64, ("features", "ref_features"))


def test_supcon_module_multiview_and_logit_scale_gradient(backend):
    views = make_features(20, 20, 11, seed=5)  # two views of 20 samples: rows with equal labels
    feats = torch.cat(views)
    labels = torch.arange(20).repeat(2) % 6
    s = torch.tensor(12.0, dtype=torch.float64)
    ours, g_ours = _grads(lambda f, s: ck.SupConLoss(backend=backend)(f, labels, s), feats, s)
    ref, g_ref = _grads(lambda f, s: reference.supcon_loss(f, labels, s), feats, s)
    assert_close_f64(ours, ref, "loss")
    for name, x, y in zip(("features", "logit_scale"), g_ours, g_ref):
        assert_close_f64(x, y, f"grad {name}")


# ---------------------------------------------------------------------------------------------
# SigLIP
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("n,d,scale,bias", [(1, 3, 10.0, -10.0), (7, 130, 100.0, -12.5),
                                            (37, 37, 10.0, -10.0), (257, 7, 100.0, -12.5)])
def test_siglip_matches_open_clip(open_clip_loss, backend, n, d, scale, bias, dtype):
    img, txt = make_features(n, n, d, dtype=dtype, seed=n + d)
    s = torch.tensor(scale, dtype=dtype)
    b = torch.tensor(bias, dtype=dtype)
    theirs = open_clip_loss.SigLipLoss()
    ours = ck.SigLipLoss(backend=backend)
    _parity(lambda i, t, s, b: ours(i, t, s, b), lambda i, t, s, b: theirs(i, t, s, b),
            (img, txt, s, b), dtype, ("image", "text", "logit_scale", "logit_bias"))


def test_siglip_output_dict_and_defaults(open_clip_loss):
    img, txt = make_features(9, 9, 5, seed=7)
    s, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    out = ck.SigLipLoss()(img, txt, s, b, output_dict=True)
    ref = open_clip_loss.SigLipLoss()(img, txt, s, b, output_dict=True)
    assert set(out) == set(ref) == {"contrastive_loss"}
    assert_close_f64(out["contrastive_loss"], ref["contrastive_loss"], rtol=RTOL_PEER)
    assert ck.SigLipLoss().dist_impl == open_clip_loss.SigLipLoss().dist_impl == "bidir"


def test_siglip_labels_mark_equal_label_pairs_positive(backend):
    img, txt = make_features(12, 12, 6, seed=8)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 5, 5])
    ours, g_ours = _grads(lambda i, t: ck.siglip_loss(i, t, 10.0, -5.0, labels=labels,
                                                      backend=backend), img, txt)
    dense, g_dense = _grads(lambda i, t: reference.siglip_loss(i, t, 10.0, -5.0, labels), img, txt)
    assert_close_f64(ours, dense, "loss")
    for x, y in zip(g_ours, g_dense):
        assert_close_f64(x, y, "grad")


# ---------------------------------------------------------------------------------------------
# MultipleNegativesRankingLoss (sentence-transformers) as recipes on the fused ops
# ---------------------------------------------------------------------------------------------

SCALE = 20.0  # MNRL's default scale on cosine similarity


def _cos(a, b):
    return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T


def _mnrl(q, pos, neg):
    """MNRL: cross-entropy of each query over [its positive, every positive, every hard negative]."""
    scores = SCALE * _cos(q, torch.cat([pos, neg]))
    return torch.nn.functional.cross_entropy(scores, torch.arange(q.shape[0]))


def _inputs(n=9, d=16, seed=11):
    g = torch.Generator().manual_seed(seed)
    q, p, neg = (torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64),
                                               dim=1) for _ in range(3))
    return q, p, neg


def test_mnrl_with_hard_negatives_is_info_nce(backend):
    q, p, neg = _inputs()
    ours, g_ours = _grads(lambda q, p, n: ck.info_nce(_unit(q), _unit(torch.cat([p, n])), SCALE,
                                                      backend=backend), q, p, neg)
    theirs, g_theirs = _grads(_mnrl, q, p, neg)
    assert_close_f64(ours, theirs, "loss")
    for x, y in zip(g_ours, g_theirs):
        assert_close_f64(x, y, "grad")


def test_mnrl_symmetric_is_clip_loss(backend):
    # MultipleNegativesSymmetricRankingLoss: ½(CE over the queries' rows + CE over the columns)
    q, p, _ = _inputs(seed=12)

    def dense(q, p):
        s = SCALE * _cos(q, p)
        t = torch.arange(q.shape[0])
        return 0.5 * (torch.nn.functional.cross_entropy(s, t) + torch.nn.functional.cross_entropy(s.T, t))
    ours, g_ours = _grads(lambda q, p: ck.clip_loss(_unit(q), _unit(p), SCALE, backend=backend), q, p)
    theirs, g_theirs = _grads(dense, q, p)
    assert_close_f64(ours, theirs, "loss")
    for x, y in zip(g_ours, g_theirs):
        assert_close_f64(x, y, "grad")


def test_mnrl_with_query_to_query_negatives(backend):
    # candidates [queries; documents]: the self pair excluded, the positive of query i at N + i
    q, p, _ = _inputs(seed=13)
    n = q.shape[0]

    def dense(q, p):
        s = SCALE * _cos(q, torch.cat([q, p]))
        s = s.masked_fill(torch.eye(n, 2 * n, dtype=torch.bool), float("-inf"))
        return torch.nn.functional.cross_entropy(s, torch.arange(n) + n)

    def ours_fn(q, p):
        q, p = _unit(q), _unit(p)
        row, _, pos = ck.lse_stats(q, torch.cat([q, p]), SCALE, torch.arange(n) + n,
                                   compute_col=False, exclude_self=True, backend=backend)
        return (row - pos).mean()
    ours, g_ours = _grads(ours_fn, q, p)
    theirs, g_theirs = _grads(dense, q, p)
    assert_close_f64(ours, theirs, "loss")
    for x, y in zip(g_ours, g_theirs):
        assert_close_f64(x, y, "grad")
