"""Loaders of the peer implementations we compare against: open_clip's losses, inf-cl,
pytorch-metric-learning. Shared by the tests, the benchmark and the tools (none of which import
each other). Every loader returns ``(thing, "")`` or ``(None, reason)`` and never raises.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional

_OPEN_CLIP_LOSS_MODULES: dict = {}


def _open_clip_loss_path() -> Optional[str]:
    try:
        spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "loss.py")
        if os.path.isfile(path):
            return path
    return None


def load_open_clip_loss(path: Optional[str] = None):
    """open_clip's ``loss`` module, loaded from its file: ``(module, "")`` or ``(None, reason)``.

    Importing the ``open_clip`` package pulls in torchvision (absent on CPU images and on the GPU
    machine); its loss.py needs only torch. ``path`` overrides where loss.py is looked for. Cached.
    """
    path = path or _open_clip_loss_path()
    if path is None or not os.path.isfile(path):
        return None, "open_clip (open_clip_torch) is not installed"
    if path not in _OPEN_CLIP_LOSS_MODULES:
        try:
            spec = importlib.util.spec_from_file_location("_ck_open_clip_loss", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except Exception as exc:  # reported to the caller, who skips or fails with it
            return None, f"loading {path} failed: {type(exc).__name__}: {exc}"
        _OPEN_CLIP_LOSS_MODULES[path] = module
    return _OPEN_CLIP_LOSS_MODULES[path], ""


def load_inf_cl():
    """inf-cl's ``cal_inf_loss`` (Triton kernels; CUDA, or CPU under the interpreter)."""
    try:
        from inf_cl import cal_inf_loss
    except Exception as exc:
        return None, f"inf_cl not importable: {type(exc).__name__}: {exc}"
    return cal_inf_loss, ""


def load_pml_losses():
    """pytorch-metric-learning's ``losses`` module (NTXentLoss, SupConLoss)."""
    try:
        losses = importlib.import_module("pytorch_metric_learning.losses")
    except Exception as exc:
        return None, f"pytorch_metric_learning not importable: {type(exc).__name__}: {exc}"
    return losses, ""
