import pytest
import torch

import contrastive_kernels as ck
from helpers import make_features, require_backend


def _inputs():
    q, k = make_features(37, 37, 7, dtype=torch.float32, seed=21)
    return (q.float().requires_grad_(), k.float().requires_grad_(),
            torch.tensor(14.0, requires_grad=True))


def _eager(backend):
    q, k, s = _inputs()
    loss = ck.clip_loss(q, k, s, backend=backend)
    loss.backward()
    return loss.detach(), (q.grad, k.grad, s.grad)


def _same(out, ref):
    # The compiled graph calls the same opaque ops on the same inputs; only the few O(N) ops around
    # them may be fused by inductor, so agreement is at float32 rounding.
    loss, grads = out
    rloss, rgrads = ref
    torch.testing.assert_close(loss, rloss, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, rgrads):
        assert g is not None
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6 * float(r.abs().max()))


@pytest.mark.parametrize("backend", ["chunked", "cpu"])
def test_compile_fullgraph_backward_outside(backend):
    require_backend(backend)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def loss_fn(q, k, s):
        return ck.clip_loss(q, k, s, backend=backend)

    q, k, s = _inputs()
    loss = loss_fn(q, k, s)
    loss.backward()
    _same((loss.detach(), (q.grad, k.grad, s.grad)), _eager(backend))


def test_compile_fullgraph_autograd_grad_inside():
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        pytest.skip("this torch cannot trace torch.autograd.grad under torch.compile")
    backend = "chunked"
    torch._dynamo.reset()

    def step(q, k, s):
        loss = ck.clip_loss(q, k, s, backend=backend)
        gq, gk, gs = torch.autograd.grad(loss, (q, k, s))
        return loss.detach(), gq, gk, gs

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(step, fullgraph=True)
        q, k, s = _inputs()
        loss, gq, gk, gs = compiled(q, k, s)
    _same((loss, (gq, gk, gs)), _eager(backend))

