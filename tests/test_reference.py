"""The dense oracle itself (contrastive_kernels.reference): the ops' written-out gradients (the G
formulas the kernels implement) against autograd through the oracle's own value formulas, in
float64, once for every feature — so an oracle error cannot pass into the tests that lean on it."""
import pytest
import torch

from contrastive_kernels import reference

N, M, D = 9, 13, 5


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, D, generator=g, dtype=torch.float64)
    k = torch.randn(M, D, generator=g, dtype=torch.float64)
    ups = [torch.randn(n, generator=g, dtype=torch.float64) for n in (N, M, N)]
    classes = (torch.randint(0, 3, (N,), generator=g), torch.randint(0, 3, (M,), generator=g))
    labels = torch.randint(0, M, (N,), generator=g)
    return q, k, ups, classes, labels


@pytest.mark.parametrize("variant", ["plain", "labels", "exclude", "classes", "exclude+classes",
                                     "exclude+labels"])
def test_lse_op_gradients_are_autograd_of_its_values(variant):
    q, k, (gr, gc, gp), (rc, cc), labels = _data()
    kw = dict(exclude_self="exclude" in variant)
    if "classes" in variant:
        kw.update(row_classes=rc, col_classes=cc)
    elif "labels" in variant:
        kw.update(labels=labels)
    qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    row, col, pos, count, _, _ = reference.lse_op(qq, kk, 3.0, **kw)
    objective = (gr * row).sum() + (gc * col).sum() + (gp * pos).sum()
    want_q, want_k = torch.autograd.grad(objective, (qq, kk))
    *_, got_q, got_k = reference.lse_op(q, k, 3.0, grad_row=gr, grad_col=gc, grad_pos=gp, **kw)
    torch.testing.assert_close(got_q, want_q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_k, want_k, rtol=1e-12, atol=1e-12)
    # and the values are the public oracle's
    ref = reference.lse_stats(q, k, 3.0, None if "classes" in variant else kw.get("labels"),
                              exclude_self=kw["exclude_self"], query_classes=kw.get("row_classes"),
                              key_classes=kw.get("col_classes"))
    torch.testing.assert_close(row.detach(), ref[0])
    torch.testing.assert_close(col.detach(), ref[1])
    torch.testing.assert_close(pos.detach(), ref[2])


@pytest.mark.parametrize("positives", ["diagonal", "none", "classes"])
def test_sigmoid_op_gradients_are_autograd_of_its_values(positives):
    q, k, (gr, _, _), (rc, cc), _ = _data(1)
    k = k[:N] if positives == "diagonal" else k
    kw = dict(diagonal=positives == "diagonal")
    if positives == "classes":
        kw.update(row_classes=rc, col_classes=cc[: k.shape[0]])
    qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    bias = torch.full((N, 1), -2.0, dtype=torch.float64, requires_grad=True)  # one copy per row
    s = 3.0 * qq @ kk.T + bias  # the op's formula, written with a per-row bias for autograd
    z = torch.where(_positive(q.shape[0], k.shape[0], kw), 1.0, -1.0).double()
    rows = torch.logaddexp(-z * s, torch.zeros_like(s)).sum(1)
    want_q, want_k, want_b = torch.autograd.grad((gr * rows).sum(), (qq, kk, bias))
    loss, got_q, got_k, got_b = reference.sigmoid_op(q, k, 3.0, -2.0, grad_row=gr, **kw)
    torch.testing.assert_close(loss, rows.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_q, want_q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_k, want_k, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_b, want_b.squeeze(1), rtol=1e-12, atol=1e-12)
    if positives == "diagonal":  # and the value is the public oracle's per-row SigLIP loss
        torch.testing.assert_close(loss, reference.siglip_loss(q, k, 3.0, -2.0, reduction="none"))


def _positive(n, m, kw):
    if "row_classes" in kw:
        return kw["row_classes"][:, None] == kw["col_classes"][None, :]
    eye = torch.arange(n)[:, None] == torch.arange(m)[None, :]
    return eye if kw["diagonal"] else torch.zeros_like(eye)


# ---------------------------------------------------------------------------------------------
# the public losses' oracles against torch's own cross-entropy / log-sigmoid, every reduction
# ---------------------------------------------------------------------------------------------

F = torch.nn.functional
REDUCTIONS = ("mean", "sum", "none")


def _reduce(x, reduction, count=None):
    if reduction == "none":
        return x
    return x.sum() if reduction == "sum" else x.sum() / (x.numel() if count is None else count)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_info_nce_and_clip_are_cross_entropy(reduction):
    q, k, _, _, labels = _data(2)
    S = 3.0 * q @ k.T
    torch.testing.assert_close(reference.info_nce(q, k, 3.0, labels, reduction),
                               F.cross_entropy(S, labels, reduction=reduction), rtol=1e-12, atol=1e-12)
    t = torch.arange(N)
    sq = S[:, :N]
    per = 0.5 * (F.cross_entropy(sq, t, reduction="none") + F.cross_entropy(sq.T, t, reduction="none"))
    torch.testing.assert_close(reference.clip_loss(q, k[:N], 3.0, None, reduction),
                               _reduce(per, reduction), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nt_xent_is_cross_entropy_over_the_other_views(reduction):
    q, k, _, _, _ = _data(3)
    x = torch.cat([q, k[:N]])
    logits = (3.0 * x @ x.T).masked_fill(torch.eye(2 * N, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(N, 2 * N), torch.arange(N)])
    torch.testing.assert_close(reference.nt_xent_loss(q, k[:N], 3.0, reduction),
                               F.cross_entropy(logits, target, reduction=reduction),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_supcon_is_mean_log_softmax_over_positives(reduction):
    q, _, _, (classes, _), _ = _data(4)
    classes[0] = 7  # an anchor without a positive: left out of the mean, 0 under "none"
    eye = torch.eye(N, dtype=torch.bool)
    log_prob = F.log_softmax((3.0 * q @ q.T).masked_fill(eye, float("-inf")), dim=1)
    positive = (classes[:, None] == classes[None, :]) & ~eye
    count = positive.sum(1)
    per = -torch.where(positive, log_prob, 0.0).sum(1) / count.clamp_min(1)
    torch.testing.assert_close(reference.supcon_loss(q, classes, 3.0, reduction=reduction),
                               _reduce(per, reduction, int((count > 0).sum())),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("labelled", [False, True], ids=["diagonal", "labels"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_siglip_is_minus_log_sigmoid(reduction, labelled):
    q, k, _, (classes, _), _ = _data(5)
    labels = classes if labelled else None
    L = 3.0 * q @ k[:N].T - 2.0
    positive = (classes[:, None] == classes[None, :]) if labelled else torch.eye(N, dtype=torch.bool)
    per = -F.logsigmoid(torch.where(positive, 1.0, -1.0).double() * L).sum(1)
    torch.testing.assert_close(reference.siglip_loss(q, k[:N], 3.0, -2.0, labels, reduction),
                               _reduce(per, reduction, N), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gamma_loss_is_its_decomposition(reduction):
    q, k, (log_u, _, _), _, labels = _data(6)
    S = 3.0 * q @ k.T
    per = -S.gather(1, labels[:, None]).squeeze(1) + log_u.exp() * S.exp().mean(1)
    loss, log_z = reference.gamma_contrastive_loss(q, k, 3.0, log_u, labels, reduction)
    torch.testing.assert_close(loss, _reduce(per, reduction), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_z, S.exp().mean(1).log(), rtol=1e-12, atol=1e-12)


def test_lse_stats_are_log_sums_of_exponentials():
    q, k, _, _, labels = _data(7)
    S = 3.0 * q @ k.T
    row, col, pos = reference.lse_stats(q, k, 3.0, labels)
    torch.testing.assert_close(row, S.exp().sum(1).log(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(col, S.exp().sum(0).log(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pos, S[torch.arange(N), labels], rtol=1e-12, atol=1e-12)
