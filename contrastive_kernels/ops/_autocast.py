"""Run a backend outside the caller's autocast region.

A custom op has no autocast rule, so its body would run with autocast still on: the ``chunked``
backend's block matmuls (and the Triton backend's cuBLAS GEMMs) would then run in bfloat16/float16
and lose the float32 accumulation every backend promises (docs/math.md §2). The inputs keep the
dtype autocast gave them; the statistics and gradients keep the statistic dtype.
"""
from __future__ import annotations

import contextlib

import torch

_AUTOCAST_TYPES = ("cpu", "cuda")


def no_autocast(device: torch.device):
    if device.type in _AUTOCAST_TYPES and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
