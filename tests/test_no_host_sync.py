"""The training path never reads a device tensor's value on the host (no GPU synchronisation).

``FakeTensorMode`` runs the real front doors on fake CUDA tensors without a GPU and raises on any
data-dependent host read (``float()``, ``.item()``, ``.tolist()``, ``torch.unique``, a comparison
used in an ``if``), so a check that would synchronise every step on a GPU fails here. Autograd
cannot run on fake CUDA tensors in a CPU-only torch (it needs a CUDA device guard), so the
backward is driven on the ``meta`` device instead, where any host read raises as well. Value
checks of device tensors are opt-in (``ck.set_device_value_checks``), and then they do read.
"""
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import contrastive_kernels as ck

N, D = 64, 32


@pytest.fixture(params=["fake-cuda", "meta"])
def device(request):
    """fake CUDA tensors (forward only) or meta tensors (forward and backward)."""
    if request.param == "meta":
        yield "meta"
        return
    with FakeTensorMode():
        yield "cuda"


def _features(device, dtype=torch.bfloat16, n=N, m=N):
    grad = device == "meta"
    img = torch.randn(n, D, device=device, dtype=dtype, requires_grad=grad)
    txt = torch.randn(m, D, device=device, dtype=dtype, requires_grad=grad)
    scale = torch.tensor(14.0, device=device, requires_grad=grad)
    return img, txt, scale


def _step(loss, *leaves):
    assert loss.device.type in ("cuda", "meta") and loss.dtype == torch.float32
    if loss.device.type == "meta":
        loss.backward()
        for t in leaves:
            assert t.grad is not None and t.grad.shape == t.shape


def test_clip_loss(device):
    img, txt, scale = _features(device)
    _step(ck.clip_loss(img, txt, scale), img, txt, scale)


def test_clip_loss_python_scale_and_bias(device):
    img, txt, _ = _features(device)
    bias = torch.tensor(-10.0, device=device, requires_grad=device == "meta")
    _step(ck.clip_loss(img, txt, 1 / 0.07, bias), img, txt)


def test_clip_module(device):
    img, txt, scale = _features(device)
    out = ck.ClipLoss()(img, txt, scale, output_dict=True)["contrastive_loss"]
    _step(out, img, txt, scale)


def test_info_nce_without_labels(device):
    q, k, scale = _features(device, m=4 * N)
    _step(ck.info_nce(q, k, scale), q, k, scale)
    _step(ck.InfoNCELoss(reduction="sum")(q.detach(), k, scale), k)


def test_info_nce_with_labels(device):
    q, k, scale = _features(device, m=4 * N)
    labels = torch.randint(0, 4 * N, (N,), device=device)
    _step(ck.info_nce(q, k, scale, labels), q, k, scale)


def test_lse_stats(device):
    q, k, scale = _features(device, dtype=torch.float16)
    row, col, pos = ck.lse_stats(q, k, scale)
    _step((row + pos).sum() + col.sum(), q, k, scale)


def test_second_wave_losses(device):
    img, txt, scale = _features(device)
    labels = torch.randint(0, 8, (N,), device=device)
    bias = torch.tensor(-10.0, device=device, requires_grad=device == "meta")
    _step(ck.siglip_loss(img, txt, scale, bias), img, txt, scale)
    _step(ck.SigLipLoss()(img, txt, scale, bias, output_dict=True)["contrastive_loss"], img, txt)
    _step(ck.siglip_loss(img, txt, 10.0, labels=labels), img, txt)
    _step(ck.nt_xent_loss(img, txt, scale), img, txt, scale)
    _step(ck.supcon_loss(img, labels, scale), img, scale)
    _step(ck.supcon_loss(img, labels, scale, ref_features=txt, ref_labels=labels), img, txt)


def test_gamma_module_on_meta():
    # meta only: the E-step's indexing ops need a CUDA device guard that a CPU-only torch cannot
    # give fake CUDA tensors; on meta every host read raises just the same.
    img, txt, scale = _features("meta")
    # an explicit generator: the default one is seeded from a (one-off, CPU) draw at construction
    loss_fn = ck.GammaContrastiveLoss(1000, estimator="ema", generator=torch.Generator()).to("meta")
    index = torch.randint(0, 1000, (N,), device="meta")
    _step(loss_fn(img, txt, index, scale), img, txt, scale)


def test_device_value_checks_are_opt_in():
    # Switched on, the checks read the device values, which FakeTensorMode refuses: proof that the
    # default path above skipped them and the opt-in path performs them.
    mode = FakeTensorMode()
    with mode:
        img, txt, scale = _features("cuda")
    ck.set_device_value_checks(True)
    try:
        # the read itself fails on a fake CUDA tensor (data-dependent, or no CUDA device guard)
        with mode, pytest.raises(Exception, match=r"(?i)data-dependent|local_scalar|support for cuda"):
            ck.clip_loss(img, txt, scale)
    finally:
        ck.set_device_value_checks(None)


def test_device_value_checks_switch_validates_its_argument():
    with pytest.raises(TypeError, match="bool or None"):
        ck.set_device_value_checks("yes")


_ENV_SCRIPT = r"""
import os, sys
before = dict(os.environ)
import contrastive_kernels as ck
import torch
q = torch.randn(16, 8)
ck.clip_loss(q, q.flip(0), 10.0).item()
ck.info_nce(q, q, 10.0, backend="chunked").item()
ck.availability("triton")
after = dict(os.environ)
changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
print("CHANGED", changed)
sys.exit(1 if changed else 0)
"""


def test_import_and_cpu_loss_leave_environment_unchanged():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _ENV_SCRIPT], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
