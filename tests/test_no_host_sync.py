"""The training path never makes the host wait for the device (no GPU synchronisation).

Two kinds of host wait exist, and a detector below (a ``TorchDispatchMode``, innermost, so it sees
every aten call before the fake or meta kernels run) records both:

- a **blocking host-to-device copy**: ``aten._to_copy``/``aten.copy_`` from a CPU tensor to a
  device without ``non_blocking`` — what ``torch.tensor(v, device="cuda")`` and ``t.to("cuda")``
  do (the copy waits for the stream);
- a **device-to-host read**: ``_local_scalar_dense`` (``float()``, ``.item()``, ``if t:``),
  ``nonzero``/``is_nonzero`` (``torch.unique``, boolean indexing) or a copy to the CPU of a device
  tensor.

``FakeTensorMode`` runs the real front doors on fake CUDA tensors without a GPU. Autograd cannot
run on fake CUDA tensors in a CPU-only torch (it needs a CUDA device guard, and so does ``t.to(
"cuda")``), so forward *and* backward are also driven on the ``meta`` device, where the same
transfers are just as visible. Every public loss and module is called with every form of scale
and bias a user passes: Python float and int, NumPy scalars, CPU tensors (0-d and one-element),
device tensors. The one documented exception — a CPU tensor that *requires grad* receives its
gradient on the CPU, a device-to-host copy by nature — is checked to be exactly that one copy.

On a GPU, ``test_gpu_training_step_never_syncs`` runs one real step of clip/siglip/supcon under
``torch.cuda.set_sync_debug_mode("error")`` (the GPU kit runs it first of its family tests).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import contrastive_kernels as ck

N, D = 64, 32
aten = torch.ops.aten

_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default}


def _dev(x):
    return x.device if isinstance(x, torch.Tensor) else None


class HostWaitDetector(TorchDispatchMode):
    """Records every aten call that would make the host wait for a device."""

    def __init__(self):
        super().__init__()
        self.waits: list[str] = []
        self.to_host: list[str] = []  # device → CPU copies (reads)
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls += 1
        if func in _READS and any(_dev(a) is not None and _dev(a).type != "cpu" for a in args):
            self.waits.append(f"{func} reads a {_dev(args[0])} value on the host")
        if func is aten._to_copy.default:
            src, dst = args[0].device, kwargs.get("device", args[0].device)
            dst = torch.device(dst)
            if src.type == "cpu" and dst.type != "cpu" and not kwargs.get("non_blocking", False):
                self.waits.append(f"blocking host-to-device copy {tuple(args[0].shape)} → {dst}")
            if src.type != "cpu" and dst.type == "cpu":
                self.to_host.append(f"device-to-host copy {tuple(args[0].shape)} from {src}")
        if func is aten.copy_.default:
            dst, src = args[0].device, args[1].device
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            if src.type == "cpu" and dst.type != "cpu" and not non_blocking:
                self.waits.append(f"blocking host-to-device copy_ {tuple(args[1].shape)} → {dst}")
            if src.type != "cpu" and dst.type == "cpu":
                self.to_host.append(f"device-to-host copy_ {tuple(args[1].shape)} from {src}")
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# the forms a scale or bias takes in user code
# ---------------------------------------------------------------------------------------------

def _scale_forms(device, value):
    """(id, factory) pairs; the factory is called where the tensors are made (fake mode or not)."""
    grad = device == "meta"
    return [
        ("float", lambda: float(value)),
        ("int", lambda: int(round(value))),
        ("np.float64", lambda: np.float64(value)),
        ("np.float32", lambda: np.float32(value)),
        ("cpu-0d", lambda: torch.tensor(value)),
        ("cpu-1elem", lambda: torch.tensor([value], dtype=torch.float64)),
        ("device", lambda: torch.tensor(value, device=device, requires_grad=grad)),
    ]


SCALE_IDS = [i for i, _ in _scale_forms("meta", 1.0)]
FAMILIES = ["clip_loss", "ClipLoss", "info_nce", "info_nce-labels", "InfoNCELoss", "lse_stats",
            "nt_xent_loss", "NTXentLoss", "supcon_loss", "supcon_loss-ref", "SupConLoss",
            "siglip_loss", "siglip_loss-labels", "SigLipLoss", "clip_loss-bias",
            "brownian_bridge_loss", "ModalityStructureLoss", "clip_loss-matryoshka",
            "siglip_loss-matryoshka", "DistillClipLoss"]


def _call(family, device, scale, bias):
    """Build the features on ``device`` and run one loss; returns (loss, leaves that get grads)."""
    grad = device == "meta"
    img = torch.randn(N, D, device=device, dtype=torch.bfloat16, requires_grad=grad)
    txt = torch.randn(N, D, device=device, dtype=torch.bfloat16, requires_grad=grad)
    labels = torch.randint(0, 8, (N,), device=device)
    if family == "clip_loss":
        return ck.clip_loss(img, txt, scale), [img, txt]
    if family == "clip_loss-bias":
        return ck.clip_loss(img, txt, 10.0, bias), [img, txt]
    if family == "ClipLoss":
        return ck.ClipLoss()(img, txt, scale, bias, output_dict=True)["contrastive_loss"], [img]
    if family == "info_nce":
        return ck.info_nce(img, txt, scale), [img, txt]
    if family == "info_nce-labels":
        return ck.info_nce(img, txt, scale, torch.randint(0, N, (N,), device=device)), [img]
    if family == "InfoNCELoss":
        return ck.InfoNCELoss(reduction="sum")(img, txt, scale), [txt]
    if family == "lse_stats":
        row, col, pos = ck.lse_stats(img, txt, scale)
        return (row + pos).sum() + col.sum(), [img, txt]
    if family == "nt_xent_loss":
        return ck.nt_xent_loss(img, txt, scale), [img, txt]
    if family == "NTXentLoss":
        return ck.NTXentLoss(reduction="none")(img, txt, scale).sum(), [img]
    if family == "supcon_loss":
        return ck.supcon_loss(img, labels, scale), [img]
    if family == "supcon_loss-ref":
        return ck.supcon_loss(img, labels, scale, ref_features=txt, ref_labels=labels), [img, txt]
    if family == "SupConLoss":
        return ck.SupConLoss()(img, labels, scale), [img]
    if family == "siglip_loss":  # logit_bias=None: the op still needs a 0 bias on the device
        return ck.siglip_loss(img, txt, scale), [img, txt]
    if family == "siglip_loss-labels":
        return ck.siglip_loss(img, txt, scale, bias, labels=labels, reduction="sum"), [img]
    if family == "SigLipLoss":
        return ck.SigLipLoss()(img, txt, scale, bias, output_dict=True)["contrastive_loss"], [txt]
    if family == "clip_loss-matryoshka":
        return ck.clip_loss(img, txt, scale, matryoshka_dims=(D // 4, D)), [img, txt]
    if family == "siglip_loss-matryoshka":
        return ck.siglip_loss(img, txt, scale, bias, matryoshka_dims=(D // 2, D),
                              matryoshka_weights=(0.5, 2.0)), [img, txt]
    if family == "DistillClipLoss":  # the teacher: its own dimension, the scale's form as well
        t_img = torch.randn(N, D // 2, device=device, dtype=torch.bfloat16)
        t_txt = torch.randn(N, D // 2, device=device, dtype=torch.bfloat16)
        c, d = ck.DistillClipLoss()(img, txt, scale, t_img, t_txt, scale)
        return c + d, [img, txt]
    if family == "brownian_bridge_loss":  # the bridge time takes the scale's forms, in (0, 1)
        aug = torch.randn(N, D, device=device, dtype=torch.bfloat16)
        return ck.brownian_bridge_loss(img, txt, aug, t=scale), [img, txt]
    if family == "ModalityStructureLoss":
        aug = torch.randn(N, D, device=device, dtype=torch.bfloat16)
        fn = ck.ModalityStructureLoss(bridge=True, geometric=True)
        return fn(img, txt, scale, image_aug=aug, text_aug=aug), [img, txt]
    raise AssertionError(family)


# A bridge time is a value in (0, 1), 0-d or one per row: an int or a (1,) tensor is not one.
CASES = [(f, form) for f in FAMILIES for form in SCALE_IDS
         if not (f == "brownian_bridge_loss" and form in ("int", "cpu-1elem"))]


def _value(family):
    return 0.25 if family == "brownian_bridge_loss" else 14.0  # a bridge time lies in (0, 1)


def _run(device, family, form):
    value = _value(family)
    make = dict(_scale_forms(device, value))[form]
    make_bias = dict(_scale_forms(device, -10.0))[form]
    detector = HostWaitDetector()
    if device == "cuda":
        with FakeTensorMode(allow_non_fake_inputs=True):
            scale, bias = make(), make_bias()
            with detector:
                loss, _ = _call(family, device, scale, bias)
        assert loss.device.type == "cuda"
    else:
        scale, bias = make(), make_bias()
        with detector:
            loss, leaves = _call(family, device, scale, bias)
            loss.backward()
        for t in leaves:
            assert t.grad is not None and t.grad.shape == t.shape
        if isinstance(scale, torch.Tensor) and scale.requires_grad and family != "clip_loss-bias":
            assert scale.grad is not None
    assert detector.calls > 0
    assert not detector.waits, f"{family} with a {form} scale waits for the device: " \
                               f"{detector.waits}"
    assert not detector.to_host, f"{family} with a {form} scale reads the device: " \
                                 f"{detector.to_host}"


# A CPU-only torch cannot fake views of CUDA tensors (slicing, stack): the Matryoshka prefix norms
# slice the features, so those families run on meta only (forward and backward, below).
FAKE_CUDA_CASES = [(f, form) for f, form in CASES if "matryoshka" not in f]


@pytest.mark.parametrize("family,form", FAKE_CUDA_CASES)
def test_forward_on_fake_cuda_never_waits(family, form):
    _run("cuda", family, form)


@pytest.mark.parametrize("family,form", CASES)
def test_forward_and_backward_on_meta_never_wait(family, form):
    _run("meta", family, form)


def test_cpu_scale_that_requires_grad_costs_only_its_own_gradient_copy():
    # Documented exception (_checks._scalar_tensor): the forward queues the copy (non_blocking),
    # the backward must bring the scale's gradient home to the CPU — that one 0-d copy, nothing
    # else. (On meta the copy itself then fails, having no data; the detector saw it first.)
    img = torch.randn(N, D, device="meta", requires_grad=True)
    txt = torch.randn(N, D, device="meta", requires_grad=True)
    scale = torch.tensor(14.0, requires_grad=True)
    detector = HostWaitDetector()
    with detector:
        loss = ck.clip_loss(img, txt, scale)
        assert not detector.waits and not detector.to_host, detector.waits + detector.to_host
        with pytest.raises(Exception, match="meta"):
            loss.backward()
    assert not detector.waits, detector.waits
    assert detector.to_host == ["device-to-host copy () from meta"], detector.to_host


def test_detector_sees_the_copies_it_must_flag():
    # The detector itself can fail: each form of host wait that the library avoids is flagged.
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(4, device="cuda")
        with HostWaitDetector() as d:
            torch.tensor(3.0, device="cuda")      # blocking staged copy
        assert any("host-to-device" in w for w in d.waits)
    cpu = torch.tensor(2.0)
    with HostWaitDetector() as d:
        cpu.to("meta")                             # blocking .to
        cpu.to("meta", non_blocking=True)          # allowed
        torch.full((), 2.0, device="meta")         # allowed: a fill kernel
    assert len(d.waits) == 1, d.waits
    m = torch.randn(3, device="meta")
    with HostWaitDetector() as d:
        with pytest.raises(Exception):
            m.sum().item()                         # a device read (meta has no value to read)
    assert any("_local_scalar_dense" in w for w in d.waits)
    del x


def test_gamma_module_on_meta():
    # meta only: the E-step's indexing ops need a CUDA device guard that a CPU-only torch cannot
    # give fake CUDA tensors; on meta every host read raises just the same.
    img = torch.randn(N, D, device="meta", requires_grad=True)
    txt = torch.randn(N, D, device="meta", requires_grad=True)
    # an explicit generator: the default one is seeded from a (one-off, CPU) draw at construction
    loss_fn = ck.GammaContrastiveLoss(1000, estimator="ema", generator=torch.Generator()).to("meta")
    index = torch.randint(0, 1000, (N,), device="meta")
    with HostWaitDetector() as d:
        loss_fn(img, txt, index, 14.0).backward()
    assert not d.waits and not d.to_host, d.waits + d.to_host
    assert img.grad is not None and txt.grad is not None


def test_device_value_checks_are_opt_in():
    # Switched on, the checks read the device values, which FakeTensorMode refuses: proof that the
    # default path above skipped them and the opt-in path performs them.
    mode = FakeTensorMode()
    with mode:
        img = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
        txt = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
        scale = torch.tensor(14.0, device="cuda")
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


def test_host_values_are_still_checked():
    # The fill-kernel path keeps the value checks of host scalars (no device read needed).
    img = torch.randn(N, D, device="meta")
    for bad in (0.0, -1.0, float("nan"), np.float32("inf"), torch.tensor(-2.0)):
        with pytest.raises(ValueError, match="logit_scale must be finite and > 0"):
            ck.clip_loss(img, img, bad)
    with pytest.raises(ValueError, match="logit_bias must be finite"):
        ck.siglip_loss(img, img, 10.0, torch.tensor(float("inf")))


# ---------------------------------------------------------------------------------------------
# on a GPU: one real training step under CUDA's sync debug mode
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["clip_loss", "siglip_loss", "supcon_loss"])
@pytest.mark.parametrize("scale_form", ["float", "np.float32", "cpu-0d"])
def test_gpu_training_step_never_syncs(family, scale_form):
    dev = "cuda"
    img = torch.randn(512, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    txt = torch.randn(512, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 16, (512,), device=dev)
    scale = dict(_scale_forms(dev, 14.0))[scale_form]()
    bias = dict(_scale_forms(dev, -10.0))[scale_form]()

    def step():
        if family == "clip_loss":
            loss = ck.clip_loss(img, txt, scale)
        elif family == "siglip_loss":
            loss = ck.siglip_loss(img, txt, scale, bias)
        else:
            loss = ck.supcon_loss(img, labels, scale)
        loss.backward()
        return loss

    step()  # warm-up: Triton compiles, the autotuner times (it may synchronise; once only)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item() and torch.isfinite(img.grad).all().item()


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
