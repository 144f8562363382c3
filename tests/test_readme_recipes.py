"""The README's MNRL recipes, against dense formulas of sentence-transformers' losses (float64).

The symmetric recipe once used ``clip_loss(q, d)``, which drops the hard negatives from the
query → document direction; sentence-transformers' MultipleNegativesSymmetricRankingLoss keeps them
there (and its document → query direction ranks each positive document against every query).
"""
import torch

import contrastive_kernels as ck

SCALE = 20.0


def _unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


def _inputs(n=9, h=5, d=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(k, d, generator=g, dtype=torch.float64, requires_grad=True)
            for k in (n, n, h)]


def _dense_symmetric(q, d, hard):
    """½·mean over i of [CE of query i over (docs; hard) + CE of doc i over the queries]."""
    q, d, hard = _unit(q), _unit(d), _unit(hard)
    n = q.shape[0]
    forward = SCALE * q @ torch.cat([d, hard]).T
    backward = SCALE * d @ q.T
    t = torch.arange(n)
    return 0.5 * (torch.nn.functional.cross_entropy(forward, t)
                  + torch.nn.functional.cross_entropy(backward, t))


def _recipe_symmetric(q, d, hard, backend):
    q, d, hard = _unit(q), _unit(d), _unit(hard)
    n = q.shape[0]
    row, col, pos = ck.lse_stats(q, torch.cat([d, hard]), SCALE, backend=backend)
    return 0.5 * ((row - pos) + (col[:n] - pos)).mean()


def test_symmetric_recipe_keeps_hard_negatives(backend):
    q, d, hard = _inputs()
    ours = _recipe_symmetric(q, d, hard, backend)
    g_ours = torch.autograd.grad(ours, (q, d, hard))
    theirs = _dense_symmetric(q, d, hard)
    g_theirs = torch.autograd.grad(theirs, (q, d, hard))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=0)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the old recipe is a different loss when hard negatives exist
    old = ck.clip_loss(_unit(q), _unit(d), SCALE, backend=backend)
    assert abs(float(old) - float(theirs)) > 1e-3
