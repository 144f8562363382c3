"""The newer op features on a GPU (the kit's family step runs these): the same-group and guided
masks, the Matryoshka prefix families and the soft-target (distillation) family at sizes with many
tiles, the GPU backend picked by ``auto`` (or named) against the ``chunked`` backend in float64 on
the same device (the relative rule)."""
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


def _judge(fn, feats, dtype, backend="auto"):
    """fn(*feats, backend) on the GPU ``backend`` in ``dtype`` vs chunked in float32 (same-dtype
    yardstick) and float64 (truth)."""
    gt, gt_g = _grads(lambda *x: fn(*x, backend="chunked"), *[f.double() for f in feats])
    same, same_g = _grads(lambda *x: fn(*x, backend="chunked"), *[f.to(dtype).float() for f in feats])
    out, out_g = _grads(lambda *x: fn(*x, backend=backend), *[f.to(dtype) for f in feats])
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


def _up(x):
    """float32 unless float64: where several ops' gradients meet (the log-sum-exp op's and the
    soft-target op's, which nearly cancel in the teacher's softmax derivative), they are summed in
    float32 and rounded to the leaf's 16 bits once, not rounded each and then cancelled."""
    return x if x.dtype == torch.float64 else x.float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_distill_clip_loss(dtype):
    """open_clip's DistillClipLoss at B = 4096, student D = 512 and teacher Dt = 768 (both
    D-chunked), on ``auto`` (the Triton kernels): both losses, the four features' and both
    scales' gradients; the teacher in float32 (its own dtype) under a 16-bit student."""
    from contrastive_kernels import backends

    assert backends.resolve("auto", torch.device("cuda"), dtype,
                            backends.features_of(soft_xent=True)) == "triton"
    g = torch.Generator(device="cuda").manual_seed(2)
    n = 4096
    feats = (_unit(n, 512, g), _unit(n, 512, g), _unit(n, 768, g), _unit(n, 768, g),
             torch.tensor(30.0, device="cuda"), torch.tensor(70.0, device="cuda"))

    def loss(img, txt, d_img, d_txt, s, t, backend):
        contrastive, distill = ck.distill_clip_loss(img, txt, _up(s), _up(d_img), _up(d_txt),
                                                    _up(t), backend=backend)
        return contrastive + 2.0 * distill
    _judge(loss, feats, dtype)


@pytest.mark.parametrize("compute_col", [True, False], ids=["col", "no_col"])
@pytest.mark.parametrize("teacher_grad", [True, False], ids=["teacher", "frozen_teacher"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_soft_xent_op(dtype, teacher_grad, compute_col):
    """The soft-target op alone with backend='triton' at ragged sizes (N = 1000, M = 1337, student
    D = 200 chunked, teacher Dt = 96 resident, both in ``dtype``), the teacher's log-sum-exp a
    float64 constant of each run's values: a loss weighing all four statistics (the cross terms
    and the student's log-sum-exp), the gradients of the student, of both scales and
    (``teacher_grad``) of the teacher; and two runs of the kernels bitwise identical (no
    atomics)."""
    from contrastive_kernels.backends import triton as tk
    from contrastive_kernels.functional import soft_cross

    g = torch.Generator(device="cuda").manual_seed(3)
    n, m, d, dt = 1000, 1337, 200, 96
    student = (_unit(n, d, g), _unit(m, d, g), torch.tensor(30.0, device="cuda"))
    teacher = (_unit(n, dt, g), _unit(m, dt, g), torch.tensor(70.0, device="cuda"))

    def like(x, run_dtype):  # a frozen teacher as _judge prepares the student of each run
        if run_dtype == torch.float64:
            return x.double()
        return x.to(dtype).float() if run_dtype == torch.float32 else x.to(dtype)

    def lse(a, b, t, st):
        logits = t.detach().double() * (a.detach().double() @ b.detach().double().T)
        return logits.logsumexp(1).to(st), logits.logsumexp(0).to(st)

    def loss(*xs, backend):
        q, k, s = xs[:3]
        a, b, t = xs[3:] if teacher_grad else (like(x, q.dtype) for x in teacher)
        st = torch.float64 if q.dtype == torch.float64 else torch.float32
        t_row, t_col = lse(a, b, t, st)
        row_x, col_x, row_l, col_l = soft_cross(q, k, s, a, b, t, t_row,
                                                t_col if compute_col else None, backend)

        def w(lo, hi, size):
            return torch.linspace(lo, hi, size, device="cuda", dtype=st)
        out = (w(-1.0, 2.0, n) * row_x).sum() + (w(0.5, -0.7, n) * row_l).sum()
        if compute_col:
            out = out + (w(1.5, -1.0, m) * col_x).sum() + (w(-0.3, 0.8, m) * col_l).sum()
        return out

    feats = student + teacher if teacher_grad else student
    _judge(loss, feats, dtype, backend="triton")
    args = [x.to(dtype) for x in student + teacher]
    t_row, t_col = lse(*args[3:], torch.float32)
    t_col = t_col if compute_col else t_row.new_empty(0)
    grad_row, grad_row_lse = (torch.randn(n, generator=g, device="cuda") for _ in range(2))
    grad_col, grad_col_lse = ((torch.randn(m, generator=g, device="cuda") for _ in range(2))
                              if compute_col else (None, None))

    def once():
        stats = tk.soft_xent_fwd(*args, t_row, t_col, compute_col)
        return stats + tk.soft_xent_bwd(*args, t_row, t_col, *stats[2:], grad_row, grad_col,
                                        grad_row_lse, grad_col_lse, teacher_grad)
    runs = [once() for _ in range(2)]
    for x, y in zip(*runs):
        assert torch.equal(x, y)
