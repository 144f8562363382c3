"""open_clip's remaining losses: ``ck.DistillClipLoss`` (the soft-target op family, docs/math.md
§10) and ``ck.CoCaLoss`` against open_clip 3.3's own classes, values and every gradient (student
features and scale, the teacher's features and scale where they require one), float64 ≤ 1e-9,
float32 by the relative rule. The distributed settings are in tests/test_distributed.py."""
from __future__ import annotations

import pytest
import torch

import contrastive_kernels as ck
from helpers import assert_cuda_kernels_lack, assert_relative_rule, open_clip_loss_module

F64 = torch.float64
# the backends with the soft-target family that run float64 (triton, 32- and 16-bit only, is judged
# against the reference in tests/test_triton_soft_xent.py; the CUDA C++ kernels raise
# NotImplementedError)
SOFT_XENT_BACKENDS = ["reference", "chunked", "chunked-tiny", "cpu"]


@pytest.fixture(params=SOFT_XENT_BACKENDS)
def xent_backend(request, monkeypatch):
    from conftest import _backend_fixture
    return _backend_fixture(request, monkeypatch)


def _inputs(n, d, dt, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    unit = lambda m, k: torch.nn.functional.normalize(  # noqa: E731
        torch.randn(m, k, generator=g, dtype=F64), dim=1).to(dtype)
    return unit(n, d), unit(n, d), unit(n, dt), unit(n, dt)


def _run(loss_fn, feats, scales, teacher_grad):
    leaves = [f.detach().clone().requires_grad_(i < 2 or teacher_grad) for i, f in enumerate(feats)]
    s = [torch.tensor(v, dtype=F64, requires_grad=(i == 0 or teacher_grad))
         for i, v in enumerate(scales)]
    c, d = loss_fn(leaves[0], leaves[1], s[0], leaves[2], leaves[3], s[1])
    (c + 3.0 * d).backward()  # both outputs, with distinct weights
    grads = [x.grad for x in leaves + s]
    return c.detach(), d.detach(), grads


@pytest.mark.parametrize("teacher_grad", [False, True], ids=["teacher-frozen", "teacher-grad"])
@pytest.mark.parametrize("n,d,dt,scales", [(1, 5, 7, (10.0, 20.0)), (7, 13, 5, (14.3, 100.0)),
                                           (130, 16, 24, (100.0, 3.0)), (257, 8, 8, (1.0, 50.0))])
def test_distill_matches_open_clip_float64(xent_backend, n, d, dt, scales, teacher_grad):
    oc = open_clip_loss_module()
    feats = _inputs(n, d, dt, seed=n)
    ours = _run(ck.DistillClipLoss(backend=xent_backend), feats, scales, teacher_grad)
    theirs = _run(oc.DistillClipLoss(), feats, scales, teacher_grad)
    for name, a, b in (("contrastive", ours[0], theirs[0]), ("distill", ours[1], theirs[1])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    names = ("image", "text", "dist image", "dist text", "logit_scale", "dist_logit_scale")
    for name, a, b in zip(names, ours[2], theirs[2]):
        if b is None:
            assert a is None, f"{name}: a gradient where open_clip has none"
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * float(b.abs().max()) + 1e-15,
                                   msg=f"gradient of {name}")


def test_distill_output_dict_and_functional():
    oc = open_clip_loss_module()
    feats = _inputs(9, 6, 4, seed=3)
    out = ck.DistillClipLoss(backend="chunked")(*feats[:2], 10.0, *feats[2:], 30.0, output_dict=True)
    want = oc.DistillClipLoss()(*feats[:2], 10.0, *feats[2:], 30.0, output_dict=True)
    assert set(out) == set(want) == {"contrastive_loss", "distill_loss"}
    for key in want:
        torch.testing.assert_close(out[key], want[key], rtol=1e-9, atol=0)
    c, d = ck.distill_clip_loss(*feats[:2], 10.0, *feats[2:], 30.0, backend="chunked")
    torch.testing.assert_close(c, want["contrastive_loss"], rtol=1e-9, atol=0)
    torch.testing.assert_close(d, want["distill_loss"], rtol=1e-9, atol=0)


def test_distill_is_not_the_contrastive_loss():
    # not vacuous: a teacher that disagrees with the student moves the distillation term, and a
    # teacher equal to the student gives distill = its own entropy-free part: H(p, p) = entropy
    feats = _inputs(16, 8, 8, seed=4)
    c, d = ck.distill_clip_loss(*feats[:2], 10.0, *feats[2:], 10.0, backend="chunked")
    _, d_same = ck.distill_clip_loss(*feats[:2], 10.0, *feats[:2], 10.0, backend="chunked")
    assert abs(float(d) - float(d_same)) > 1e-3
    logits = 10.0 * feats[0] @ feats[1].T
    p = logits.softmax(1)
    entropy = 0.5 * (-(p * p.log()).sum(1).mean() - (logits.T.softmax(1) * logits.T.log_softmax(1)).sum(1).mean())
    torch.testing.assert_close(d_same, entropy, rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_distill_low_precision_relative_rule(dtype):
    oc = open_clip_loss_module()
    feats64 = _inputs(37, 24, 16, seed=6, dtype=dtype)
    feats64 = [f.double() for f in feats64]
    truth = oc.DistillClipLoss()(*feats64[:2], 20.0, *feats64[2:], 50.0)
    same = oc.DistillClipLoss()(*[f.to(dtype).float() for f in feats64[:2]], 20.0,
                                *[f.to(dtype).float() for f in feats64[2:]], 50.0)
    ours = ck.DistillClipLoss(backend="chunked")(*[f.to(dtype) for f in feats64[:2]], 20.0,
                                                 *[f.to(dtype) for f in feats64[2:]], 50.0)
    for a, s, t in zip(ours, same, truth):
        assert a.dtype == torch.float32
        assert_relative_rule(a.double(), s.double(), t, dtype, "loss")


def test_backends_without_the_soft_target_family_say_so(monkeypatch):
    assert_cuda_kernels_lack(monkeypatch, "soft_xent")
    feats = _inputs(4, 5, 3, seed=7)
    with pytest.raises(ValueError, match="teacher"):
        ck.distill_clip_loss(*feats[:2], 10.0, feats[2][:3], feats[3][:3], 10.0)


@pytest.mark.parametrize("clip_weight", [1.0, 0.0])
def test_coca_matches_open_clip(clip_weight):
    oc = open_clip_loss_module()
    g = torch.Generator().manual_seed(8)
    img, txt = _inputs(6, 8, 8, seed=9)[:2]
    logits = torch.randn(6, 5, 11, generator=g, dtype=F64)
    labels = torch.randint(0, 11, (6, 5), generator=g)
    labels[0, 3:] = 0  # padding, ignored

    def run(loss_fn):
        leaves = [x.detach().clone().requires_grad_() for x in (img, txt, logits)]
        s = torch.tensor(14.0, dtype=F64, requires_grad=True)
        out = loss_fn(leaves[0], leaves[1], leaves[2], labels, s, output_dict=True)
        total = out["contrastive_loss"] + 2.0 * out["caption_loss"]
        total.backward()
        return out, [x.grad for x in leaves] + [s.grad]

    ours, g_ours = run(ck.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=clip_weight, pad_id=0,
                                   backend="chunked"))
    theirs, g_theirs = run(oc.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=clip_weight,
                                       pad_id=0))
    for key in ("contrastive_loss", "caption_loss"):
        torch.testing.assert_close(ours[key].double(), theirs[key].double(), rtol=1e-9, atol=0)
    for a, b in zip(g_ours, g_theirs):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-15)


def test_bench_providers_time_the_same_loss():
    # `bench distill` times ck.DistillClipLoss and open_clip's on the same features: same value
    open_clip_loss_module()
    from contrastive_kernels.bench.distill import _SETUP

    values = {}
    for provider in ("ck.chunked", "open_clip"):
        scope: dict = {}
        exec(_SETUP.format(provider=provider, n=48, d=16), scope)
        values[provider] = scope["run"](48)
    assert abs(values["ck.chunked"] - values["open_clip"]) <= 1e-5 * abs(values["open_clip"]), values
