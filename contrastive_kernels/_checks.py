"""Input validation shared by every front door (functional, modules, gamma, modality, distributed).

Every check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, device or
value) with the offending shapes, dtypes or values in the message, before any kernel is reached.

**No host synchronisation on the GPU path.** Reading a value (``float(logit_scale)``,
``labels.min()``) of a CUDA tensor makes the host wait for the GPU queue to drain, on every step of
a training loop. So value checks run only where the value already lives on the host (CPU tensors,
Python numbers); for device tensors they are skipped unless switched on with
``set_device_value_checks(True)`` or the environment variable ``CK_DEVICE_VALUE_CHECKS=1`` (useful
while debugging: a bad label then raises a clear ``ValueError`` instead of reading garbage on the
device). Inside ``torch.compile`` value checks never run: a host read would break the graph. Shape,
dtype and device checks always run; they cost nothing.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Optional

import torch
from torch import Tensor

from ._types import FLOAT_DTYPES, REDUCTIONS, stat_dtype

_device_value_checks: Optional[bool] = None  # None: follow CK_DEVICE_VALUE_CHECKS


def set_device_value_checks(enabled: Optional[bool]) -> None:
    """Turn value checks of device (e.g. CUDA) tensors on or off; ``None`` restores the default
    (the ``CK_DEVICE_VALUE_CHECKS`` environment variable, off when unset). Each check synchronises
    with the device, so leave this off in training."""
    global _device_value_checks
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool or None, got {type(enabled).__name__}")
    _device_value_checks = enabled


def device_value_checks_enabled() -> bool:
    if _device_value_checks is not None:
        return _device_value_checks
    return os.environ.get("CK_DEVICE_VALUE_CHECKS", "0") not in ("", "0", "false", "False")


def reads_values(t: Tensor) -> bool:
    """Whether a value check of ``t`` may run now: never while compiling, always on the CPU, on
    other devices only when switched on (each read there is a device synchronisation). Meta tensors
    have no values at all."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    if t.device.type == "cpu":
        return not _is_fake(t)  # a fake CPU tensor (torch.export, FakeTensorMode) has no values
    return device_value_checks_enabled()


def _is_fake(t: Tensor) -> bool:
    # FakeTensorMode / meta-backed tensors carry no data; reading them raises.
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - very old torch
        return False
    return is_fake(t)


# ---------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------

def check_matrix(name: str, t) -> None:
    """One feature matrix: a non-empty 2-D floating tensor (batch, dim)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float64, float32, float16 or bfloat16, got {t.dtype}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch: shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has feature dimension 0: shape {tuple(t.shape)}")


def check_features(name_q: str, query, name_k: str, keys) -> None:
    """Two feature matrices that can be multiplied: same D, dtype and device."""
    check_matrix(name_q, query)
    check_matrix(name_k, keys)
    if query.shape[1] != keys.shape[1]:
        raise ValueError(f"feature dimensions differ: {name_q} {tuple(query.shape)} vs "
                         f"{name_k} {tuple(keys.shape)}")
    if query.dtype != keys.dtype:
        raise TypeError(f"dtypes differ: {name_q} is {query.dtype}, {name_k} is {keys.dtype}")
    if query.device != keys.device:
        raise ValueError(f"devices differ: {name_q} is on {query.device}, {name_k} on {keys.device}")


def check_pairs(what: str, name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Row i of ``a`` is paired with row i of ``b``: the batch sizes must match."""
    check_features(name_a, a, name_b, b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{what} pairs row i of {name_a} with row i of {name_b}, so batch sizes "
                         f"must match: {name_a} {tuple(a.shape)} vs {name_b} {tuple(b.shape)}")


# ---------------------------------------------------------------------------------------------
# scalars: logit_scale, logit_bias
# ---------------------------------------------------------------------------------------------

def _scalar_tensor(name: str, value, like: Tensor, *, positive: bool) -> Tensor:
    """A one-element scale/bias as a 0-d tensor in the statistic dtype on ``like``'s device,
    differentiable when it is a tensor that requires grad.

    Never a blocking transfer (the no-sync rule of this module's docstring): a value that lives
    on the host (Python or NumPy number, CPU tensor without grad) is checked there and
    written on the device by a fill kernel (``torch.full``: the value travels as a kernel argument,
    no copy); ``torch.tensor(v, device=cuda)`` would instead stage a host-to-device copy that waits
    for the stream on every step. A CPU tensor that requires grad must stay in the graph, so it is
    copied with ``non_blocking=True`` (queued, not waited for); its gradient comes back to the CPU
    in the backward, a device-to-host read by nature — keep a learnable scale on the device (as
    open_clip's model does) to avoid it. A tensor already on the device is used as it is.
    """
    st = stat_dtype(like.dtype)
    rule = "finite and > 0" if positive else "finite"

    def check_value(v: float) -> None:
        if not math.isfinite(v) or (positive and v <= 0):
            raise ValueError(f"{name} must be {rule}, got {v}")

    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must hold one value, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.device != like.device and value.device.type != "cpu":
            raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
        host_value = reads_values(value)
        if host_value:
            check_value(float(value.detach().reshape(())))
        if value.device == like.device:
            return value.reshape(()).to(dtype=st)
        if value.requires_grad or not host_value:
            # stays differentiable (or has no readable value: a fake CPU tensor)
            return value.reshape(()).to(device=like.device, dtype=st, non_blocking=True)
        return torch.full((), float(value.reshape(())), dtype=st, device=like.device)
    # NumPy floating/integer scalars (np.float32(14.3)) are numbers.Real; bool is not a scale.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    v = float(value)
    check_value(v)
    return torch.full((), v, dtype=st, device=like.device)


def scale_tensor(logit_scale, like: Tensor) -> Tensor:
    """``logit_scale`` (s = 1/temperature, already exponentiated) as a 0-d statistic-dtype tensor."""
    return _scalar_tensor("logit_scale", logit_scale, like, positive=True)


def bias_tensor(logit_bias, like: Tensor) -> Tensor:
    """``logit_bias`` (any finite value) as a 0-d statistic-dtype tensor."""
    return _scalar_tensor("logit_bias", logit_bias, like, positive=False)


def zero_gradient_term(loss: Tensor, logit_bias) -> Tensor:
    """``loss + 0·logit_bias``: a bias that cancels in a softmax still gets its (exactly zero)
    gradient, as in open_clip, so optimisers that expect ``.grad`` to exist find it."""
    if isinstance(logit_bias, Tensor) and logit_bias.requires_grad:
        loss = loss + (logit_bias * 0).sum().to(loss.dtype)
    return loss


# ---------------------------------------------------------------------------------------------
# integer vectors: labels (positive column per row) and classes
# ---------------------------------------------------------------------------------------------

def check_int_vector(name: str, t, n: int, device) -> Tensor:
    """An int64 tensor of shape (n,) on ``device``; returned contiguous."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {t.dtype}")
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} are on {t.device} but the features are on {device}")
    return t.contiguous()


def check_guide(guide_query, guide_keys, guide_threshold, n: int, m: int, like: Tensor):
    """The guided false-negative mask's inputs, validated and converted: ``(guide_query (N, Dg),
    guide_keys (M, Dg), guide_threshold (N,))`` detached, contiguous, in the statistic dtype of
    ``like`` (the guide gets no gradient); a number as threshold is broadcast over the rows."""
    given = [x is not None for x in (guide_query, guide_keys, guide_threshold)]
    if not all(given):
        raise ValueError("guide_query (N, Dg), guide_keys (M, Dg) and guide_threshold (N,) go "
                         "together: pass all three, or none")
    check_features("guide_query", guide_query, "guide_keys", guide_keys)
    if guide_query.shape[0] != n or guide_keys.shape[0] != m:
        raise ValueError(f"guide_query and guide_keys must have N = {n} and M = {m} rows like query "
                         f"and keys, got {tuple(guide_query.shape)} and {tuple(guide_keys.shape)}")
    if guide_query.device != like.device:
        raise ValueError(f"the guide is on {guide_query.device} but the features are on {like.device}")
    st = stat_dtype(like.dtype)
    if isinstance(guide_threshold, Tensor):
        if not guide_threshold.is_floating_point():
            raise TypeError(f"guide_threshold must be a floating tensor, got {guide_threshold.dtype}")
        if guide_threshold.shape not in ((n,), (), (1,)):
            raise ValueError(f"guide_threshold must have shape ({n},) (one per row) or be a "
                             f"single value, got {tuple(guide_threshold.shape)}")
        if guide_threshold.device != like.device:
            raise ValueError(f"guide_threshold is on {guide_threshold.device} but the features are "
                             f"on {like.device}")
        t = guide_threshold.detach().to(st).reshape(-1).expand(n).contiguous()
    elif isinstance(guide_threshold, (int, float)) and not isinstance(guide_threshold, bool):
        t = torch.full((n,), float(guide_threshold), dtype=st, device=like.device)
    else:
        raise TypeError("guide_threshold must be a tensor of shape (N,) or a number, got "
                        f"{type(guide_threshold).__name__}")
    return (guide_query.detach().to(st).contiguous(), guide_keys.detach().to(st).contiguous(), t)


def check_matryoshka(dims, weights, normalize, d: int):
    """Validated Matryoshka settings: ``(dims tuple of ints, weights tuple of floats, normalize)``.

    ``dims`` strictly increasing positive ints, the last ≤ D; ``weights`` one finite number per
    dim (default 1 each); ``normalize`` a bool."""
    try:
        dims_t = tuple(int(x) for x in dims)
        ok = all(int(x) == x and not isinstance(x, bool) for x in dims)
    except (TypeError, ValueError):
        ok = False
    if not ok or not dims_t:
        raise TypeError(f"matryoshka_dims must be a non-empty sequence of ints, got {dims!r}")
    if dims_t[0] < 1 or any(b <= a for a, b in zip(dims_t, dims_t[1:])) or dims_t[-1] > d:
        raise ValueError(f"matryoshka_dims must be strictly increasing, in [1, D = {d}], got "
                         f"{dims_t}")
    if weights is None:
        weights_t = (1.0,) * len(dims_t)
    else:
        try:
            weights_t = tuple(float(w) for w in weights)
        except (TypeError, ValueError):
            raise TypeError(f"matryoshka_weights must be a sequence of numbers, got {weights!r}") from None
        if len(weights_t) != len(dims_t):
            raise ValueError(f"matryoshka_weights needs one weight per dim: {len(dims_t)} dims "
                             f"{dims_t}, {len(weights_t)} weights {weights_t}")
        if not all(math.isfinite(w) for w in weights_t):
            raise ValueError(f"matryoshka_weights must be finite, got {weights_t}")
    if not isinstance(normalize, bool):
        raise TypeError(f"matryoshka_normalize must be a bool, got {type(normalize).__name__}")
    return dims_t, weights_t, normalize


def check_range(name: str, t: Tensor, lo: int, hi: int, what: str) -> None:
    """Values of ``t`` in [lo, hi), checked only where that costs no device synchronisation."""
    if t.numel() and reads_values(t):
        vmin, vmax = int(t.min()), int(t.max())
        if vmin < lo or vmax >= hi:
            raise ValueError(f"{name} must lie in [{lo}, {hi}) ({what}), got values in "
                             f"[{vmin}, {vmax}]")


def check_labels(labels, n: int, m: int, device) -> Optional[Tensor]:
    """Positive column of each of the n rows among m candidates; ``None`` means column i."""
    if labels is None:
        if m < n:
            raise ValueError(f"without labels the positive of row i is column i, which needs "
                             f"M >= N; got N={n}, M={m} (pass labels)")
        return None
    labels = check_int_vector("labels", labels, n, device)
    check_range("labels", labels, 0, m, f"M = {m} candidates")
    return labels


# ---------------------------------------------------------------------------------------------
# reductions
# ---------------------------------------------------------------------------------------------

def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reduce(per_sample: Tensor, reduction: str) -> Tensor:
    """Apply a checked reduction to a per-sample loss."""
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample
