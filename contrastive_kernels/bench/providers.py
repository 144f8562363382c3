"""What the benchmark compares: per op family, the inputs, the exact FLOP count, and the providers.

Providers named ``ck.<backend>`` are this library (``contrastive_kernels`` with that backend);
every other name is a peer: ``dense`` is the one dense (materialising) formula of each op family,
written out here in the peer's style; ``open_clip``, ``open_clip_siglip``, ``inf_cl``,
``pml_supcon`` and ``pml_ntxent`` are the peers' own code (loaded by ``_peers``).

=========  =======================================  ===========================================
op         inputs (N rows, D features)               peers
=========  =======================================  ===========================================
clip       image (N, D), text (N, D), logit_scale    dense, open_clip (ClipLoss), inf_cl
siglip     image, text, logit_scale, logit_bias      dense, open_clip_siglip (SigLipLoss)
supcon     features (N, D), labels (N,), scale       dense, pml_supcon (SupConLoss)
ntxent     view_a (N, D), view_b (N, D), scale       dense, pml_ntxent (NTXentLoss), 2N anchors
=========  =======================================  ===========================================

FLOPs counted for every provider (docs/math.md §2, §5): 2·R·C·D forward, 6·R·C·D backward, 8·R·C·D
both, with R×C the logit matrix (N×N; 2N×2N for ntxent).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import _peers

FLOP_FACTOR = {"fwd": 2, "bwd": 6, "fwd_bwd": 8}
BACKEND_NAMES = ("reference", "chunked", "cpu", "triton", "cuda")
OPS = ("clip", "siglip", "supcon", "ntxent")
# what each op family needs of a backend (backends.FEATURES)
OP_FEATURES = {"clip": "", "siglip": "sigmoid", "supcon": "exclude_self,classes",
               "ntxent": "exclude_self"}
PEERS = {
    "clip": ("dense", "open_clip", "inf_cl"),
    "siglip": ("dense", "open_clip_siglip"),
    "supcon": ("dense", "pml_supcon"),
    "ntxent": ("dense", "pml_ntxent"),
}


def ours(name: str) -> bool:
    return name.startswith("ck.")


def canonical(name: str) -> str:
    """``cpu`` → ``ck.cpu`` (a backend name means this library); peers unchanged."""
    return f"ck.{name}" if name in BACKEND_NAMES else name


def all_providers(op: str) -> tuple:
    if op == "mm":  # the dense product itself (bench bf16): no loss, no backend
        return ("torch.mm",)
    return PEERS[op] + tuple(f"ck.{b}" for b in BACKEND_NAMES)


def logit_shape(op: str, n: int) -> tuple[int, int]:
    return (2 * n, 2 * n) if op == "ntxent" else (n, n)


def flops(op: str, mode: str, n: int, d: int) -> float:
    r, c = logit_shape(op, n)
    return FLOP_FACTOR[mode] * r * c * d


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def make_inputs(op: str, n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0,
                logit_scale: float = 1 / 0.07, logit_bias: float = -10.0) -> tuple:
    """Fresh random L2-normalised features requiring grad (correlated pairs), a 0-d logit scale
    requiring grad (and a bias for siglip; labels with ~N/4 classes for supcon)."""
    gen = torch.Generator(device="cpu").manual_seed(seed + n)
    a = F.normalize(torch.randn(n, d, generator=gen), dim=1)
    b = F.normalize(torch.randn(n, d, generator=gen) + 0.5 * a, dim=1)

    def leaf(x):
        return x.to(device=device, dtype=dtype).requires_grad_(True)

    scale = torch.tensor(logit_scale, dtype=torch.float32, device=device, requires_grad=True)
    if op == "clip" or op == "ntxent":
        return leaf(a), leaf(b), scale
    if op == "siglip":
        bias = torch.tensor(logit_bias, dtype=torch.float32, device=device, requires_grad=True)
        return leaf(a), leaf(b), scale, bias
    if op == "supcon":
        labels = torch.randint(0, max(1, n // 4), (n,), generator=gen).to(device)
        return leaf(a), labels, scale
    raise ValueError(f"unknown op {op!r}; choose from {OPS}")


# ---------------------------------------------------------------------------------------------
# dense formulas (the peers' style, written out): each materialises the logit matrix
# ---------------------------------------------------------------------------------------------

def dense_clip(img, txt, scale):
    """open_clip ``ClipLoss`` (world_size 1): two materialised N×N logit matrices."""
    logits_per_image = scale * img @ txt.T
    logits_per_text = scale * txt @ img.T
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def dense_siglip(img, txt, scale, bias):
    """open_clip ``SigLipLoss`` (world_size 1): −Σ log σ(z·(s·I·Tᵀ + b)) / N."""
    logits = scale * img @ txt.T + bias
    z = 2 * torch.eye(img.shape[0], device=img.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / img.shape[0]


def dense_supcon(feats, labels, scale):
    """SupCon ("L_out") over the other rows, anchors without a positive left out."""
    logits = scale * feats @ feats.T
    n = feats.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=feats.device)
    logits = logits.masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    count = pos.sum(1)
    mean_pos = torch.where(pos, log_prob, 0.0).sum(1) / count.clamp_min(1)
    valid = count > 0
    return -(mean_pos * valid).sum() / valid.sum().clamp_min(1)


def dense_ntxent(a, b, scale):
    """SimCLR NT-Xent over the 2N views: cross-entropy against the other view, self excluded."""
    x = torch.cat([a, b])
    n2 = x.shape[0]
    logits = (scale * x @ x.T).masked_fill(torch.eye(n2, dtype=torch.bool, device=x.device),
                                           float("-inf"))
    target = torch.arange(n2, device=x.device).roll(n2 // 2)
    return F.cross_entropy(logits, target)


_DENSE = {"clip": dense_clip, "siglip": dense_siglip, "supcon": dense_supcon, "ntxent": dense_ntxent}


# ---------------------------------------------------------------------------------------------
# providers
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Provider:
    op: str
    name: str
    fn: Callable
    materialises: bool  # builds the logit matrix (memory guard)


def _ck(op: str, backend: str) -> Callable:
    import contrastive_kernels as ck

    if op == "clip":
        return lambda img, txt, s: ck.clip_loss(img, txt, s, backend=backend)
    if op == "siglip":
        return lambda img, txt, s, b: ck.siglip_loss(img, txt, s, b, backend=backend)
    if op == "supcon":
        return lambda f, y, s: ck.supcon_loss(f, y, s, backend=backend)
    return lambda a, b, s: ck.nt_xent_loss(a, b, s, backend=backend)


def _peer(op: str, name: str) -> tuple[Optional[Callable], str]:
    if name == "dense":
        return _DENSE[op], ""
    if name in ("open_clip", "open_clip_siglip"):
        module, why = _peers.load_open_clip_loss()
        if module is None:
            return None, why
        loss = module.ClipLoss() if name == "open_clip" else module.SigLipLoss()
        if name == "open_clip":
            return (lambda img, txt, s: loss(img, txt, s)), ""
        return (lambda img, txt, s, b: loss(img, txt, s, b)), ""
    if name == "inf_cl":
        cal_inf_loss, why = _peers.load_inf_cl()
        if cal_inf_loss is None:
            return None, why
        # inf-cl 1.2.1 wraps a learnable `scale=` in a gradient gather whose backward calls
        # dist.all_reduce (it raises without a process group): fold the scale into the features.
        # Its kernels split D into heads of `head_dim` (16..256).
        def inf_cl(img, txt, s):
            hd = min(img.shape[1], 256)
            return 0.5 * (cal_inf_loss(s * img, txt, head_dim=hd) + cal_inf_loss(s * txt, img, head_dim=hd))
        return inf_cl, ""
    if name in ("pml_supcon", "pml_ntxent"):
        losses, why = _peers.load_pml_losses()
        if losses is None:
            return None, why
        if name == "pml_supcon":
            # PML takes a fixed temperature; a learnable scale is ours only. 1/s of the inputs'.
            return (lambda f, y, s, _c={}: _c.setdefault(float(s.detach()), losses.SupConLoss(
                temperature=1.0 / float(s.detach())))(f, y)), ""

        def ntxent(a, b, s, _c={}):
            t = float(s.detach())
            loss = _c.setdefault(t, losses.NTXentLoss(temperature=1.0 / t))
            n = a.shape[0]
            labels = torch.arange(n, device=a.device).repeat(2)
            return loss(torch.cat([a, b]), labels)
        return ntxent, ""
    return None, f"unknown provider {name!r} for op {op!r}; choose from {all_providers(op)}"


def provider_available(op: str, name: str, device: torch.device) -> tuple[bool, str]:
    """(usable, why-not) for a provider of ``op`` on ``device``; never raises."""
    name = canonical(name)
    if name not in all_providers(op):
        return False, f"unknown provider {name!r} for op {op!r}; choose from {all_providers(op)}"
    if ours(name):
        from .. import backends
        backend = name[3:]
        lacking = sorted(set(OP_FEATURES[op].split(",")) & backends.MISSING.get(backend, set()) - {""})
        if lacking:
            return False, f"backend {backend!r} does not implement {', '.join(lacking)} yet"
        try:
            ok, why = backends.availability(backend)
            if ok:
                ok, why = backends.device_ok(backend, device)
        except Exception as exc:  # a half-built extension must not take the benchmark down
            return False, f"{type(exc).__name__}: {exc}"
        return ok, why
    if name == "inf_cl" and device.type != "cuda":
        return False, "inf-cl's kernels assert CUDA tensors"
    fn, why = _peer(op, name)
    return fn is not None, why


def make_provider(op: str, name: str) -> Provider:
    """The callable of a provider; raises ``RuntimeError`` with the reason when it cannot load."""
    name = canonical(name)
    if ours(name):
        return Provider(op, name, _ck(op, name[3:]), materialises=name == "ck.reference")
    fn, why = _peer(op, name)
    if fn is None:
        raise RuntimeError(why)
    return Provider(op, name, fn, materialises=name != "inf_cl")


def dense_bytes_needed(provider: Provider, n: int, dtype: torch.dtype) -> int:
    """Rough peak of a materialising provider: ≈ 4 copies of the logit matrix (+30%); 0 else."""
    if not provider.materialises:
        return 0
    r, c = logit_shape(provider.op, n)
    esize = 8 if dtype == torch.float64 else 4  # logits are float32 (float64) after the GEMM
    return int(4 * r * c * esize * 1.3)


def loss_tolerance(dtype: torch.dtype) -> float:
    """Relative gap between a provider's loss and dense's that flags a wrong result in a note."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2


def close(a: float, b: float, dtype: torch.dtype) -> bool:
    return math.isfinite(a) and abs(a - b) <= loss_tolerance(dtype) * max(1.0, abs(b))
