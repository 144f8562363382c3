"""The newer op features on a GPU (the kit's family step runs these): the same-group and guided
masks and the Matryoshka prefix families at sizes with many tiles, the GPU backend picked by
``auto`` against the ``chunked`` backend in float64 on the same device (the relative rule)."""
from __future__ import annotations

import pytest
import torch

import contrastive_kernels as ck
from helpers import assert_relative_rule

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]


def _unit(n, d, g):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, device="cuda"), dim=1)


def _grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(*xs)
    out.backward()
    return out.detach(), [x.grad for x in xs]


def _judge(fn, feats, dtype):
    """fn(*feats, backend) on the auto GPU backend in ``dtype`` vs chunked in float32 (same-dtype
    yardstick) and float64 (truth)."""
    gt, gt_g = _grads(lambda *x: fn(*x, backend="chunked"), *[f.double() for f in feats])
    same, same_g = _grads(lambda *x: fn(*x, backend="chunked"), *[f.to(dtype).float() for f in feats])
    out, out_g = _grads(lambda *x: fn(*x, backend="auto"), *[f.to(dtype) for f in feats])
    assert_relative_rule(out.double(), same.double(), gt, dtype, "loss")
    for o, s, t in zip(out_g, same_g, gt_g):
        assert_relative_rule(o.double(), s.double(), t, dtype, "grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_group_and_guide_masks(dtype):
    # sentence-transformers' doc_to_doc (three documents per query) and a 64-d guide, B = 2048
    g = torch.Generator(device="cuda").manual_seed(0)
    b, cols, d = 2048, 3, 256
    docs, queries = _unit(b * cols, d, g), _unit(b, d, g)
    gq, gk = _unit(b, 64, g), _unit(b * cols, 64, g)
    threshold = torch.full((b,), 0.05, device="cuda")
    groups = torch.arange(b * cols, device="cuda") % b

    rows = torch.arange(b, device="cuda")

    def loss(q, k, backend):
        # query → documents with the guide (the positive protected), document → documents
        # without its own query's documents
        row, col, pos = ck.lse_stats(q, k, 20.0, rows, guide_query=gq, guide_keys=gk,
                                     guide_threshold=threshold, backend=backend)
        d2d = ck.lse_stats(k[:b], k, 20.0, compute_col=False, query_groups=rows,
                           key_groups=groups, backend=backend)[0]
        finite = torch.isfinite(col)
        return ((row - pos).mean() + d2d.mean()
                + torch.where(finite, col, 0.0).sum() / finite.sum())
    _judge(loss, (queries, docs), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_matryoshka_clip_and_siglip(dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    n, d, dims = 4096, 768, (64, 128, 256, 512, 768)
    img, txt = torch.randn(n, d, generator=g, device="cuda"), torch.randn(n, d, generator=g, device="cuda")
    _judge(lambda a, b, backend: ck.clip_loss(a, b, 20.0, matryoshka_dims=dims, backend=backend),
           (img, txt), dtype)
    _judge(lambda a, b, backend: ck.siglip_loss(a, b, 10.0, -10.0, matryoshka_dims=dims,
                                                backend=backend), (img, txt), dtype)
