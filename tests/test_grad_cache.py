"""GradCache (docs/math.md §8) against full-batch backprop on tiny float64 towers."""
from __future__ import annotations

import copy
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import contrastive_kernels as ck
from contrastive_kernels.gamma import GammaContrastiveLoss
from contrastive_kernels.grad_cache import GradCache

DT = torch.float64
RTOL = 1e-10
B, D_IN, D = 10, 6, 5


class Tower(nn.Module):
    def __init__(self, seed, p=0.0, dtype=DT, d_in=D_IN):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(d_in, 8, dtype=dtype)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(8, D, dtype=dtype)
        with torch.no_grad():
            for prm in self.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g, dtype=DT) * 0.5)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


class DictTower(Tower):
    def forward(self, ids, mask):
        return super().forward(ids * mask)


class TupleTower(Tower):
    def forward(self, x):
        z = super().forward(x)
        return z, {"pooled": z.tanh(), "norm": z.norm(dim=1)}


class Clip(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = Tower(1)
        self.text = Tower(2)
        self.logit_scale = nn.Parameter(torch.tensor(2.3, dtype=DT))

    def encode_image(self, x):
        return self.visual(x)

    def encode_text(self, x):
        return self.text(x)


def _data(seed=0, n=B):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g, dtype=DT), torch.randn(n, D_IN, generator=g, dtype=DT)


def _leaf(v):
    return torch.tensor(v, dtype=DT, requires_grad=True)


def _close(a, b, what, rtol=RTOL, atol=0.0):
    assert a is not None and b is not None, f"{what}: grad {a} vs {b}"
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    err, ref = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= rtol * ref + atol, f"{what}: max abs err {err:.3e} (ref magnitude {ref:.3e})"


def _grads(*modules):
    return [p.grad for m in modules for p in m.parameters()]


def _call(m, x):
    return m(**x) if isinstance(x, dict) else m(x)


def _plain(models, loss_fn, inputs, **kw):
    loss = loss_fn(*[_call(m, x) for m, x in zip(models, inputs)], **kw)
    loss.backward()
    return loss.detach()


def _toy_loss(a, b, logit_scale, logit_bias):
    logits = logit_scale * a @ b.T + logit_bias
    return logits.logsumexp(1).mean() - logits.diagonal().mean() + 0.1 * logit_bias ** 2


def _assert_same(mods_a, mods_b, extra_a=(), extra_b=(), what=""):
    ref = _grads(*mods_b)
    # Relative to the largest gradient of all the parameters: some entries are exactly 0 in exact
    # arithmetic (a bias the loss is invariant to) and only rounding-level in float64.
    atol = RTOL * max(g.abs().max().item() for g in ref)
    for k, (ga, gb) in enumerate(zip(_grads(*mods_a), ref)):
        _close(ga, gb, f"{what} param {k}", atol=atol)
    for k, (ta, tb) in enumerate(zip(extra_a, extra_b)):
        _close(ta.grad, tb.grad, f"{what} loss kwarg {k}")


@pytest.mark.parametrize("chunk", [3, 4, 10, 16, [3, 7]])
def test_clip_loss_matches_full_batch(chunk):
    xi, xt = _data()
    towers = [Tower(1), Tower(2)]
    ref = copy.deepcopy(towers)
    loss_fn = ck.ClipLoss(backend="chunked")
    s, b = _leaf(4.0), _leaf(-1.5)
    s_ref, b_ref = _leaf(4.0), _leaf(-1.5)
    loss = GradCache(towers, loss_fn, chunk)(xi, xt, logit_scale=s, logit_bias=b)
    loss_ref = _plain(ref, loss_fn, (xi, xt), logit_scale=s_ref, logit_bias=b_ref)
    assert not loss.requires_grad
    _close(loss, loss_ref, "loss")
    _assert_same(towers, ref, (s, b), (s_ref, b_ref), f"chunk={chunk}")


@pytest.mark.parametrize("chunk", [3, 4])
def test_callable_loss_matches_full_batch(chunk):
    xi, xt = _data(1)
    towers, ref = [Tower(1), Tower(2)], [Tower(1), Tower(2)]
    s, b, s_ref, b_ref = _leaf(3.0), _leaf(0.7), _leaf(3.0), _leaf(0.7)
    loss = GradCache(towers, _toy_loss, chunk)(xi, xt, logit_scale=s, logit_bias=b)
    _close(loss, _plain(ref, _toy_loss, (xi, xt), logit_scale=s_ref, logit_bias=b_ref), "loss")
    assert b_ref.grad.abs().item() > 0.01
    _assert_same(towers, ref, (s, b), (s_ref, b_ref))


def test_dict_inputs_and_callable_models():
    xi, xt = _data(2)
    mask = (torch.arange(B * D_IN).reshape(B, D_IN) % 3 != 0).to(DT)
    dict_tower, tuple_tower, dict_out = DictTower(1), TupleTower(2), TupleTower(3)
    mods = [dict_tower, tuple_tower, dict_out]
    ref = copy.deepcopy(mods)

    def models(ms):
        return [ms[0], lambda x: ms[1](x)[0], lambda x: ms[2](x)[1]["pooled"]]

    def loss_fn(a, b, c, logit_scale):
        return ck.clip_loss(a, b, logit_scale, backend="chunked") + (a * c).sum() / B

    inputs = ({"ids": xi, "mask": mask}, xt, xi)
    s, s_ref = _leaf(5.0), _leaf(5.0)
    GradCache(models(mods), loss_fn, 4)(*inputs, logit_scale=s)
    _plain(models(ref), loss_fn, inputs, logit_scale=s_ref)
    _assert_same(mods, ref, (s,), (s_ref,))


def test_feature_dicts_with_non_tensor_entries_pass_them_through():
    # sentence-transformers 6 feature dicts carry e.g. 'modality': 'text' next to the tensors:
    # every chunk gets it unchanged, the tensors are split, and the step equals the plain one
    xi, xt = _data(4)
    seen = []

    class Encoder(Tower):
        def forward(self, ids, modality):
            seen.append(modality)
            return super().forward(ids)

    mods, ref = [Encoder(1), Tower(2)], [Encoder(1), Tower(2)]
    ref[0].load_state_dict(mods[0].state_dict())
    ref[1].load_state_dict(mods[1].state_dict())
    loss_fn = ck.ClipLoss(backend="chunked")
    s, s_ref = _leaf(5.0), _leaf(5.0)
    GradCache(mods, loss_fn, 4)({"ids": xi, "modality": "text"}, xt, logit_scale=s)
    _plain(ref, loss_fn, ({"ids": xi, "modality": "text"}, xt), logit_scale=s_ref)
    _assert_same(mods, ref, (s,), (s_ref,))
    assert seen and set(seen) == {"text"}


def test_bound_methods_and_nonleaf_logit_scale():
    xi, xt = _data(3)
    clip, ref = Clip(), Clip()
    gc = GradCache([clip.encode_image, clip.encode_text], ck.ClipLoss(backend="chunked"), 3)
    assert gc.modules == [clip, clip]
    gc(xi, xt, logit_scale=clip.logit_scale.exp())
    _plain([ref.encode_image, ref.encode_text], ck.ClipLoss(backend="chunked"), (xi, xt),
           logit_scale=ref.logit_scale.exp())
    _assert_same([clip], [ref])


def test_shared_model_simclr():
    a, b = _data(4)
    enc = Tower(5)
    ref = copy.deepcopy(enc)
    s, s_ref = _leaf(6.0), _leaf(6.0)
    loss_fn = ck.ClipLoss(backend="chunked")
    GradCache([enc, enc], loss_fn, 3)(a, b, logit_scale=s)
    _plain([ref, ref], loss_fn, (a, b), logit_scale=s_ref)
    _assert_same([enc], [ref], (s,), (s_ref,))


@pytest.mark.parametrize("chunk", [3, 16])
def test_second_wave_losses_match_full_batch(chunk):
    # SigLipLoss (logit_scale and logit_bias learned), NT-Xent with one shared encoder (SimCLR),
    # SupCon on one tower with labels passed to the loss, every backend path the same (chunked)
    xi, xt = _data(11)
    labels = torch.arange(B) % 3
    cases = [
        ("siglip", [Tower(1), Tower(2)], ck.SigLipLoss(backend="chunked"),
         lambda m: [m[0], m[1]], (xi, xt), dict(logit_scale=4.0, logit_bias=-2.0)),
        ("nt_xent", [Tower(3)], lambda a, b, logit_scale: ck.nt_xent_loss(a, b, logit_scale,
                                                                          backend="chunked"),
         lambda m: [m[0], m[0]], (xi, xt), dict(logit_scale=5.0)),
        ("supcon", [Tower(4)], lambda z, logit_scale: ck.supcon_loss(z, labels, logit_scale,
                                                                    backend="chunked"),
         lambda m: [m[0]], (xi,), dict(logit_scale=6.0)),
    ]
    for name, mods, loss_fn, models, inputs, scalars in cases:
        ref = copy.deepcopy(mods)
        kw = {k: _leaf(v) for k, v in scalars.items()}
        kw_ref = {k: _leaf(v) for k, v in scalars.items()}
        loss = GradCache(models(mods), loss_fn, chunk)(*inputs, **kw)
        loss_ref = _plain(models(ref), loss_fn, inputs, **kw_ref)
        _close(loss, loss_ref, f"{name} loss")
        _assert_same(mods, ref, tuple(kw.values()), tuple(kw_ref.values()), name)


@pytest.mark.parametrize("wrap", [False, True])
def test_frozen_tower(wrap):
    xi, xt = _data(5)
    img, txt = Tower(1), Tower(2).requires_grad_(False)
    ref = copy.deepcopy([img, txt])
    calls = []
    txt.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    models = [img, (lambda x: txt(x)) if wrap else txt]
    s, s_ref = _leaf(4.0), _leaf(4.0)
    GradCache(models, ck.ClipLoss(backend="chunked"), 4)(xi, xt, logit_scale=s)
    _plain(ref, ck.ClipLoss(backend="chunked"), (xi, xt), logit_scale=s_ref)
    assert all(p.grad is None for p in txt.parameters())
    _assert_same([img], [ref[0]], (s,), (s_ref,))
    assert calls == [False] * 3 + ([True] * 3 if wrap else [])


def test_input_gradient_through_frozen_tower():
    xi, xt = _data(13)
    img, txt = Tower(1).requires_grad_(False), Tower(2)
    ref = copy.deepcopy([img, txt])
    xi_ref = xi.clone().requires_grad_(True)
    xi.requires_grad_(True)
    GradCache([img, txt], ck.ClipLoss(backend="chunked"), 3)(xi, xt, logit_scale=4.0)
    _plain(ref, ck.ClipLoss(backend="chunked"), (xi_ref, xt), logit_scale=4.0)
    _close(xi.grad, xi_ref.grad, "input grad")
    _assert_same([txt], [ref[1]])


def test_accumulates_into_existing_grad():
    xi, xt = _data(6)
    towers = [Tower(1), Tower(2)]
    ref = copy.deepcopy(towers)
    s, s_ref = _leaf(4.0), _leaf(4.0)
    g = torch.Generator().manual_seed(9)
    params = [p for m in towers for p in m.parameters()] + [s]
    pre = [torch.randn(p.shape, generator=g, dtype=DT) for p in params]
    for p, v in zip(params, pre):
        p.grad = v.clone()
    GradCache(towers, ck.ClipLoss(backend="chunked"), 3)(xi, xt, logit_scale=s)
    _plain(ref, ck.ClipLoss(backend="chunked"), (xi, xt), logit_scale=s_ref)
    for got, v, r in zip(_grads(*towers) + [s.grad], pre, _grads(*ref) + [s_ref.grad]):
        _close(got, v + r, "accumulated grad")


@pytest.mark.parametrize("estimator", ["ema", "gamma"])
def test_gamma_loss_state_matches_plain_step(estimator):
    towers = [Tower(1), Tower(2)]
    ref = copy.deepcopy(towers)
    kw = dict(estimator=estimator, update_weight=0.6, dtype=DT, backend="chunked")
    loss = GammaContrastiveLoss(20, generator=torch.Generator().manual_seed(3), **kw)
    loss_ref = GammaContrastiveLoss(20, generator=torch.Generator().manual_seed(3), **kw)
    gc = GradCache(towers, loss, 3)
    for step in range(2):
        xi, xt = _data(10 + step)
        index = torch.arange(B) * 2 + step
        s, s_ref = _leaf(5.0), _leaf(5.0)
        got = gc(xi, xt, index=index, logit_scale=s)
        want = _plain(ref, loss_ref, (xi, xt), index=index, logit_scale=s_ref)
        _close(got, want, f"step {step} loss")
        _assert_same(towers, ref, (s,), (s_ref,), f"step {step}")
        for name, buf in loss.named_buffers():
            _close(buf, dict(loss_ref.named_buffers())[name], f"step {step} state {name}", atol=0)
        assert torch.equal(loss.generator.get_state(), loss_ref.generator.get_state())


def test_dropout_replay_is_bitwise():
    xi, xt = _data(7)
    towers = [Tower(1, p=0.3), Tower(2, p=0.5)]
    ref = copy.deepcopy(towers)
    seen = [[], []]
    for k, t in enumerate(towers):
        t.register_forward_hook(lambda m, i, o, k=k: seen[k].append(o.detach().clone()))
    s, s_ref = _leaf(4.0), _leaf(4.0)

    def loss_fn(a, b, logit_scale):
        return ck.clip_loss(a, b, logit_scale, backend="chunked") + 0 * torch.rand(())

    torch.manual_seed(123)
    GradCache(towers, loss_fn, 4)(xi, xt, logit_scale=s)
    after = torch.get_rng_state()
    for k in range(2):
        first, second = seen[k][:3], seen[k][3:]
        assert len(second) == 3 and all(torch.equal(f, r) for f, r in zip(first, second))
    torch.manual_seed(123)
    reps = [torch.cat([t(x[a:a + 4]) for a in range(0, B, 4)]) for t, x in zip(ref, (xi, xt))]
    loss_fn(*reps, logit_scale=s_ref).backward()
    assert torch.equal(after, torch.get_rng_state())
    _assert_same(towers, ref, (s,), (s_ref,))


@pytest.mark.parametrize("chunk", [3, 10])
def test_autocast_bfloat16(chunk):
    xi, xt = _data(8)
    towers = [Tower(1, dtype=torch.float32), Tower(2, dtype=torch.float32)]
    plain, chunked = copy.deepcopy(towers), copy.deepcopy(towers)
    dtypes = []
    towers[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    loss_fn = ck.ClipLoss(backend="chunked")
    s = [torch.tensor(4.0, requires_grad=True) for _ in range(3)]
    x32 = (xi.float(), xt.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        GradCache(towers, loss_fn, chunk)(*x32, logit_scale=s[0])
        loss = loss_fn(*[t(x) for t, x in zip(plain, x32)], logit_scale=s[1])
    # The same step with autograd through chunk-wise forwards, each in its own autocast region as
    # GradCache runs them (so each chunk casts the weights itself and its weight gradient is
    # accumulated in float32, where one region would accumulate the chunks' bfloat16 gradients of
    # one cached bfloat16 weight copy before casting).
    reps = []
    for t, x in zip(chunked, x32):
        parts = []
        for a in range(0, B, chunk):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                parts.append(t(x[a:a + chunk]))
        reps.append(torch.cat(parts))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_chunked = loss_fn(*reps, logit_scale=s[2])
    loss.backward()
    loss_chunked.backward()
    n_chunks = -(-B // chunk)
    assert dtypes == [torch.bfloat16] * (2 * n_chunks)
    cached = _grads(*towers) + [s[0].grad]
    if n_chunks == 1:
        assert all(torch.equal(a, b) for a, b in zip(cached, _grads(*plain) + [s[1].grad]))
        return
    # Against that chunk-wise step only the order in which the chunks' float32 weight gradients
    # are summed can differ: float32 rounding of a sum of n_chunks terms.
    for k, (a, b) in enumerate(zip(cached, _grads(*chunked) + [s[2].grad])):
        _close(a, b, f"autocast grad {k}", rtol=1e-5)


def test_grad_scaler():
    xi, xt = _data(9)

    class Times3:
        def scale(self, loss):
            return loss * 3.0

    towers = [Tower(1), Tower(2)]
    ref = copy.deepcopy(towers)
    s_ref = _leaf(4.0)
    want = _plain(ref, ck.ClipLoss(backend="chunked"), (xi, xt), logit_scale=s_ref)
    for scaler, factor in [(torch.amp.GradScaler("cpu", init_scale=256.0), 256.0), (Times3(), 3.0)]:
        for t in towers:
            t.zero_grad(set_to_none=True)
        s = _leaf(4.0)
        got = GradCache(towers, ck.ClipLoss(backend="chunked"), 4, scaler=scaler)(
            xi, xt, logit_scale=s)
        _close(got, want, f"{type(scaler).__name__} loss (unscaled)")
        for k, (g, r) in enumerate(zip(_grads(*towers) + [s.grad], _grads(*ref) + [s_ref.grad])):
            _close(g, factor * r, f"{type(scaler).__name__} grad {k}")


def test_no_grad_mode_only_evaluates():
    xi, xt = _data(10)
    towers = [Tower(1), Tower(2)]
    s = _leaf(4.0)
    with torch.no_grad():
        got = GradCache(towers, ck.ClipLoss(backend="chunked"), 3)(xi, xt, logit_scale=s)
        want = ck.ClipLoss(backend="chunked")(towers[0](xi), towers[1](xt), s)
    _close(got, want, "loss")
    assert all(g is None for g in _grads(*towers)) and s.grad is None


def _ctor_errors():
    t = Tower(1)
    return [
        (lambda: GradCache([t, t], ck.ClipLoss(), 0), ValueError, "chunk_size must be >= 1, got 0"),
        (lambda: GradCache([t, t], ck.ClipLoss(), -2), ValueError, "got -2"),
        (lambda: GradCache([t, t], ck.ClipLoss(), 2.5), TypeError, r"chunk_size must be an int"),
        (lambda: GradCache([t, t], ck.ClipLoss(), True), TypeError, "chunk_size must be an int"),
        (lambda: GradCache([t, t], ck.ClipLoss(), [2]), ValueError, "1 sizes for 2 models"),
        (lambda: GradCache([], ck.ClipLoss(), 2), ValueError, "at least one model"),
        (lambda: GradCache([t, 3], ck.ClipLoss(), 2), TypeError, "model 1 is a int"),
        (lambda: GradCache([t, t], "loss", 2), TypeError, "loss_fn must be callable, got str"),
        (lambda: GradCache([t, t], ck.ClipLoss(), 2, scaler=1.0), TypeError, "scale"),
        (lambda: GradCache([t, t], ck.ClipLoss(), 2, modules=[t]), ValueError, "1 entries for 2"),
    ]


@pytest.mark.parametrize("case", range(len(_ctor_errors())))
def test_constructor_errors(case):
    build, exc, match = _ctor_errors()[case]
    with pytest.raises(exc, match=match):
        build()


CALL_ERRORS = [
    ("models", lambda x: (x[0],), ValueError, "has 2 models but got 1 inputs"),
    ("models", lambda x: (x[0], x[1], x[1]), ValueError, "has 2 models but got 3 inputs"),
    ("models", lambda x: (x[0], x[1][:7]), ValueError, r"same batch size \(dim 0\), got \[10, 7\]"),
    ("models", lambda x: (x[0], x[1].tolist()), TypeError, "input 1 is a list"),
    ("models", lambda x: (x[0], torch.tensor(1.0)), ValueError, "input 1 is a 0-d tensor"),
    ("models", lambda x: (x[0][:0], x[1][:0]), ValueError, "empty"),
    ("dict", lambda x: ({"ids": x[0], "mask": x[0][:9]}, x[1]), ValueError,
     r"share the batch size.*'ids': 10, 'mask': 9"),
    ("dict", lambda x: ({"note": "text", "scale": 1.0}, x[1]), ValueError, "without any tensor"),
    ("tuple", lambda x: x, TypeError, "model 1 returned a tuple on chunk 0"),
    ("int", lambda x: x, TypeError, "model 1 returned a torch.int64 tensor"),
    ("rows", lambda x: x, ValueError, r"model 1 returned shape \(1, 5\) for chunk 0 of 4 rows"),
    ("ragged", lambda x: x, ValueError, r"shape \(2, 4\).*chunk 2.*shape \(4, 5\)"),
    ("loss", lambda x: x, TypeError, r"one-element tensor.*shape \(10,\)"),
    ("dictloss", lambda x: x, TypeError, "one-element tensor.*got a dict"),
]


@pytest.mark.parametrize("kind,make_inputs,exc,match", CALL_ERRORS)
def test_call_errors_touch_no_gradient(kind, make_inputs, exc, match):
    xi, xt = _data(11)
    img, txt = Tower(1), Tower(2)
    second = {"tuple": lambda x: (txt(x), x), "int": lambda x: txt(x).long(),
              "rows": lambda x: txt(x)[:1], "ragged": lambda x: txt(x)[:, : 5 - (x.shape[0] < 4)]
              }.get(kind, txt)
    first = (lambda ids, mask: img(ids * mask)) if kind == "dict" else img
    loss_fn = ck.ClipLoss(backend="chunked")
    if kind == "loss":
        loss_fn = lambda a, b, logit_scale: (a * b).sum(1)  # noqa: E731
    if kind == "dictloss":
        loss_fn = lambda a, b, logit_scale: ck.ClipLoss(backend="chunked")(  # noqa: E731
            a, b, logit_scale, output_dict=True)
    s = _leaf(4.0)
    with pytest.raises(exc, match=match):
        GradCache([first, second], loss_fn, 4)(*make_inputs((xi, xt)), logit_scale=s)
    assert all(g is None for g in _grads(img, txt)) and s.grad is None


def test_nondeterministic_model_fails_replay():
    xi, xt = _data(12)
    txt, calls = Tower(2), []

    def flaky(x):
        calls.append(1)
        return txt(x)[:, :4] if len(calls) > 3 else txt(x)[:, :5]

    with pytest.raises(RuntimeError, match="replay returned shape"):
        GradCache([Tower(1), flaky], ck.ClipLoss(backend="chunked"), 4)(xi, xt, logit_scale=4.0)


# ------------------------------------------------------------------------------------------------
# DDP on gloo, two processes
# ------------------------------------------------------------------------------------------------

DDP_TIMEOUT_S = 120


def _counting_hook(counter, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    counter[0] += 1
    return allreduce_hook(dist.group.WORLD, bucket)


def _ddp(module, **kw):
    wrapped = nn.parallel.DistributedDataParallel(module, **kw)
    counter = [0]
    wrapped.register_comm_hook(counter, _counting_hook)
    return wrapped, counter


def _check_ddp_towers(rank, w):
    n = 5
    loss_fn = ck.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=w,
                          backend="chunked")
    cached = [_ddp(Tower(1)), _ddp(Tower(2))]
    plain = [_ddp(Tower(1)), _ddp(Tower(2))]
    gc = GradCache([m for m, _ in cached], loss_fn, 2)
    for step in range(2):
        xi, xt = _data(20 + step, n * w)
        rows = slice(rank * n, (rank + 1) * n)
        s, s_ref = _leaf(4.0), _leaf(4.0)
        for m, _ in cached + plain:
            m.zero_grad(set_to_none=True)
        gc(xi[rows], xt[rows], logit_scale=s)
        loss_fn(plain[0][0](xi[rows]), plain[1][0](xt[rows]), s_ref).backward()
        _assert_same([m for m, _ in cached], [m for m, _ in plain], (s,), (s_ref,),
                     f"rank {rank} step {step}")
        truth = [Tower(1), Tower(2)]
        ck.clip_loss(truth[0](xi), truth[1](xt), 4.0, backend="chunked").backward()
        _assert_same([m for m, _ in cached], truth, what=f"rank {rank} step {step} vs 1 process")
        assert [c[0] for _, c in cached] == [c[0] for _, c in plain] == [step + 1] * 2


def _check_ddp_shared(rank, w):
    n = 4
    loss_fn = ck.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=w,
                          backend="chunked")
    (enc, count), (ref, count_ref) = _ddp(Tower(3)), _ddp(Tower(3))
    gc = GradCache([enc, enc], loss_fn, 3)
    for step in range(2):
        a, b = _data(30 + step, n * w)
        rows = slice(rank * n, (rank + 1) * n)
        s, s_ref = _leaf(5.0), _leaf(5.0)
        enc.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        gc(a[rows], b[rows], logit_scale=s)
        z = ref(torch.cat([a[rows], b[rows]]))
        loss_fn(z[:n], z[n:], s_ref).backward()
        _assert_same([enc], [ref], (s,), (s_ref,), f"shared rank {rank} step {step}")
        assert count[0] == count_ref[0] == step + 1


class ClipModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual, self.text = Tower(1), Tower(2)
        self.logit_scale = nn.Parameter(torch.tensor(1.3, dtype=DT))

    def forward(self, image=None, text=None):
        return (None if image is None else self.visual(image),
                None if text is None else self.text(text), self.logit_scale.exp())


def _check_ddp_one_wrapper(rank, w):
    n = 5
    loss_fn = ck.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=w,
                          backend="chunked")
    model, count = _ddp(ClipModel(), find_unused_parameters=True)
    ref, count_ref = _ddp(ClipModel(), find_unused_parameters=True)
    gc = GradCache([lambda x: model(image=x)[0], lambda x: model(text=x)[1]], loss_fn, 2,
                   modules=[model, model])
    for step in range(2):
        xi, xt = _data(40 + step, n * w)
        rows = slice(rank * n, (rank + 1) * n)
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        gc(xi[rows], xt[rows], logit_scale=model.module.logit_scale.exp())
        loss_fn(*ref(xi[rows], xt[rows])).backward()
        _assert_same([model], [ref], what=f"one wrapper rank {rank} step {step}")
        assert count[0] == count_ref[0] == step + 1


def _ddp_worker(rank, w, port):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=w, timeout=datetime.timedelta(seconds=60))
    try:
        _check_ddp_towers(rank, w)
        _check_ddp_shared(rank, w)
        _check_ddp_one_wrapper(rank, w)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_ddp_matches_plain_ddp_step():
    ctx = mp.start_processes(_ddp_worker, args=(2, _free_port()), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DDP_TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish in {DDP_TIMEOUT_S}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
