import pytest
import torch

import contrastive_kernels as ck
from helpers import (assert_close_f64, assert_relative_rule, leaf, make_features, make_labels,
                     open_clip_loss_module, reference)


@pytest.fixture(scope="module")
def open_clip_loss():
    return open_clip_loss_module()


def _clip_pair(n, d, dtype, seed=0):
    q64, k64 = make_features(n, n, d, dtype=dtype, seed=seed)
    return q64, k64


def _run(loss_fn, q, k, scale, **kw):
    qs, ks, ss = leaf(q), leaf(k), leaf(scale)
    loss = loss_fn(qs, ks, ss, **kw)
    grads = torch.autograd.grad(loss, (qs, ks, ss))
    return loss.detach(), grads


@pytest.mark.parametrize("n,d", [(1, 7), (37, 130), (130, 37)])
def test_clip_loss_matches_open_clip_float64(open_clip_loss, backend, n, d):
    q, k = _clip_pair(n, d, torch.float64, seed=n)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    oc_loss, oc_grads = _run(open_clip_loss.ClipLoss(), q, k, scale)
    ck_loss, ck_grads = _run(ck.ClipLoss(backend=backend), q, k, scale)
    assert ck_loss.dtype == torch.float64 and ck_loss.shape == oc_loss.shape == ()
    assert_close_f64(ck_loss, oc_loss, "loss")
    for name, a, b in zip(("image", "text", "logit_scale"), ck_grads, oc_grads):
        assert_close_f64(a, b, f"grad {name}")


@pytest.mark.parametrize("n,d", [(37, 130), (257, 37)])
def test_clip_loss_matches_open_clip_float32(open_clip_loss, backend, n, d):
    # open_clip in float32 is the same-dtype reference of the relative rule; float64 is the truth.
    q64, k64 = _clip_pair(n, d, torch.float32, seed=n)
    scale = torch.tensor(1 / 0.07, dtype=torch.float32).double()
    gt_loss, gt_grads = _run(open_clip_loss.ClipLoss(), q64, k64, scale)
    oc_loss, oc_grads = _run(open_clip_loss.ClipLoss(), q64.float(), k64.float(), scale.float())
    ck_loss, ck_grads = _run(ck.ClipLoss(backend=backend), q64.float(), k64.float(), scale.float())
    assert ck_loss.dtype == torch.float32
    assert_relative_rule(ck_loss, oc_loss, gt_loss, torch.float32, "loss")
    for name, a, r, g in zip(("image", "text", "logit_scale"), ck_grads, oc_grads, gt_grads):
        assert a.dtype == torch.float32
        assert_relative_rule(a, r, g, torch.float32, f"grad {name}")
    torch.testing.assert_close(ck_loss, oc_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(ck_grads, oc_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_clip_loss_default_backend_matches_open_clip(open_clip_loss):
    q, k = _clip_pair(37, 7, torch.float64, seed=4)
    scale = torch.tensor(20.0, dtype=torch.float64)
    oc_loss, oc_grads = _run(open_clip_loss.ClipLoss(), q, k, scale)
    ck_loss, ck_grads = _run(ck.ClipLoss(), q, k, scale)
    assert_close_f64(ck_loss, oc_loss, "loss")
    for a, b in zip(ck_grads, oc_grads):
        assert_close_f64(a, b, "grad")


def test_output_dict(open_clip_loss, backend):
    q, k = _clip_pair(7, 37, torch.float64)
    out = ck.ClipLoss(backend=backend)(q, k, 10.0, output_dict=True)
    ref = open_clip_loss.ClipLoss()(q, k, 10.0, output_dict=True)
    assert isinstance(out, dict) and set(out) == set(ref) == {"contrastive_loss"}
    assert_close_f64(out["contrastive_loss"], ref["contrastive_loss"])


def test_logit_bias(open_clip_loss, backend):
    q, k = _clip_pair(37, 7, torch.float64, seed=5)
    scale = torch.tensor(10.0, dtype=torch.float64)
    plain, _ = _run(ck.ClipLoss(backend=backend), q, k, scale)
    for bias_dtype in (torch.float64, torch.float32):
        bias = torch.tensor(-10.0, dtype=bias_dtype, requires_grad=True)
        qs, ks, ss = leaf(q), leaf(k), leaf(scale)
        loss = ck.ClipLoss(backend=backend)(qs, ks, ss, bias)
        oc = open_clip_loss.ClipLoss()(q, k, scale, torch.tensor(-10.0, dtype=torch.float64))
        assert_close_f64(loss, plain, "loss with bias")
        assert_close_f64(loss, oc, "loss vs open_clip with bias")
        gq, gb = torch.autograd.grad(loss, (qs, bias))
        assert gb is not None and float(gb) == 0.0
    # A plain float bias (open_clip accepts one too) is equally a no-op.
    assert_close_f64(ck.ClipLoss(backend=backend)(q, k, scale, 3.5), plain)


def test_constructor_args_accepted_single_process():
    for kw in (dict(local_loss=True), dict(gather_with_grad=True), dict(cache_labels=True),
               dict(rank=0, world_size=1)):
        loss_fn = ck.ClipLoss(**kw, backend="chunked")
        q, k = _clip_pair(7, 7, torch.float64)
        assert_close_f64(loss_fn(q, k, 5.0), reference.clip_loss(q, k, 5.0))


def test_world_size_gt_1_without_process_group():
    # Distributed semantics are tested in test_distributed.py; here: no silent single-process run.
    q, k = _clip_pair(7, 7, torch.float64)
    loss_fn = ck.ClipLoss(rank=1, world_size=2, backend="chunked")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a default process group is initialised in this process")
    with pytest.raises(RuntimeError, match=r"world_size > 1|init_process_group"):
        loss_fn(q, k, 5.0)
    with pytest.raises(NotImplementedError, match=r"use_horovod=True.*not supported"):
        ck.ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match=r"rank.*\[0, 2\).*got 2"):
        ck.ClipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"world_size.*got 0"):
        ck.ClipLoss(world_size=0)


def test_clip_loss_is_module():
    loss_fn = ck.ClipLoss(backend="chunked")
    assert isinstance(loss_fn, torch.nn.Module)
    assert len(list(loss_fn.parameters())) == 0
    assert loss_fn.state_dict() == {}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_info_nce_module(backend, reduction):
    q, k = make_features(37, 130, 7, seed=6)
    labels = make_labels(37, 130)
    scale = torch.tensor(14.0, dtype=torch.float64)
    mod = ck.InfoNCELoss(reduction=reduction, backend=backend)
    assert isinstance(mod, torch.nn.Module)
    for lab in (None, labels):
        qs, ks, ss = leaf(q), leaf(k), leaf(scale)
        out = mod(qs, ks, ss, lab)
        qr, kr, sr = leaf(q), leaf(k), leaf(scale)
        ref = reference.info_nce(qr, kr, sr, lab, reduction)
        assert_close_f64(out, ref, "loss")
        up = torch.randn(ref.shape, dtype=torch.float64)
        for a, b in zip(torch.autograd.grad((out * up).sum(), (qs, ks, ss)),
                        torch.autograd.grad((ref * up).sum(), (qr, kr, sr))):
            assert_close_f64(a, b, "grad")
    assert_close_f64(mod(q, k, 14.0, labels),
                     ck.info_nce(q, k, 14.0, labels, reduction=reduction, backend=backend))
