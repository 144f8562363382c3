"""Type rules shared by every layer: accepted dtypes, the statistic dtype, scale-like arguments.

One home for each rule, so the ops' fake kernels, the backends, the front doors and the stateful
losses cannot drift apart.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

# Feature dtypes the front doors accept (float64 only on the CPU paths and `chunked`).
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
REDUCTIONS = ("mean", "sum", "none")

# A logit scale or bias: a Python number, a NumPy floating scalar, or a one-element tensor.
ScaleLike = Union[float, int, Tensor]


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of statistics, losses and the ops' gradients: float64 for float64 inputs, else float32.

    16-bit inputs are multiplied with float32 accumulation and every statistic is float32: the
    log-sum-exp of a row of 10^5 logits is not representable to useful precision in 16 bits.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32
