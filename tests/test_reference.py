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
