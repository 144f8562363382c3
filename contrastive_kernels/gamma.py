"""Stateful stochastic-EM contrastive loss with per-sample auxiliary variables (docs/math.md §3, P1).

``GammaContrastiveLoss`` keeps, for every training sample (by dataset index), a running estimate
``log Z̄_i`` of its partition function ``Z_i = mean_j exp(S_ij)`` and optimises the decomposable loss

    ℓ̃_i(θ; u_i) = −S_{i,l_i} + u_i·Ẑ_i,        Ẑ_i = (1/M)·Σ_j exp(S_ij)  (batch estimate)

whose gradient, for ``u_i`` independent of the batch with ``E[u_i] = 1/Z_i``, is an unbiased estimate
of the full-data InfoNCE gradient. The statistics come from ONE fused forward
(:func:`contrastive_kernels.functional.lse_stats`, row and column log-sum-exp together), so the N×M
logit matrix is never formed; everything else is O(N) work in the log domain.

The stochastic EM recursion (the EM schedule and the estimator choices are this project's design,
**[design]** in docs/math.md §3, derived from P1's idea; P1's full text is not available to us):

1. forward: ``log Ẑ_i = r_i − log M`` (row LSE of ``S``; the column LSE for the other direction);
2. E-step: ``Z̄_i ← (1 − γ)·Z̄_i + γ·Ẑ_i`` computed with ``logaddexp`` (first visit: ``Z̄_i = Ẑ_i``),
   then the auxiliary variable ``u_i`` by the estimator:

   - ``"gamma"``: ``u_i ~ Gamma(shape=a, rate=a·Z̄_i)``, sampled as
     ``log u_i = log Gamma(a, 1) − log a − log Z̄_i`` with the module's ``torch.Generator``
     (mean ``1/Z̄_i`` for every ``a``; ``a = 1`` is P1's exponential case, large ``a`` → ``"ema"``);
   - ``"ema"``: ``u_i = 1/Z̄_i`` (SogCLR's estimator, Yuan et al. 2022);
   - ``"batch"``: ``u_i = 1/Ẑ_i`` (gradient identical to minibatch InfoNCE: the biased baseline);
3. M-step: the caller's optimizer step on the returned loss; ``u`` never receives a gradient.

``u`` and ``Z`` are never formed outside log space: the loss term is ``exp(log u_i + log Ẑ_i)``, which
is bounded because ``log u_i ≈ −log Z̄_i`` — safe at logit scale 100.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from . import _checks, functional
from ._types import ScaleLike
from .backends import BACKEND_CHOICES

__all__ = ["GammaContrastiveLoss", "gamma_contrastive_loss", "decomposable_objective", "ESTIMATORS"]

ESTIMATORS = ("gamma", "ema", "batch")
_DIRECTIONS = ("row", "col")


def _log_standard_gamma(shape: float, n: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """``log g`` for ``n`` draws ``g ~ Gamma(shape, 1)``, on the generator's device.

    For ``shape < 1`` a Gamma draw underflows to 0 with non-negligible probability in float32
    (``P(g < 1e-38) ≈ 1e-38^a``), so it is sampled through the boost identity
    ``Gamma(a) = Gamma(a + 1)·U^(1/a)``: ``log g = log Gamma(a + 1) + log(U)/a``, finite for every
    ``a > 0``. Draws are made in float64 and cast, so the result does not depend on ``dtype``'s
    sampling path (``U`` is taken in (0, 1] so that ``log U`` is finite).
    """
    dev = generator.device
    if shape >= 1.0:
        alpha = torch.full((n,), float(shape), dtype=torch.float64, device=dev)
        log_g = torch.log(torch._standard_gamma(alpha, generator=generator))
    else:
        alpha = torch.full((n,), float(shape) + 1.0, dtype=torch.float64, device=dev)
        g = torch._standard_gamma(alpha, generator=generator)
        uniform = 1.0 - torch.rand(n, dtype=torch.float64, device=dev, generator=generator)
        log_g = torch.log(g) + torch.log(uniform) / float(shape)
    return log_g.to(dtype)


def _group_rows(index: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of ``index`` that share a value, found without a host read.

    Returns ``(group, counts)``: ``group[i]`` numbers row i's value among the distinct values (in
    sorted order) and ``counts[g]`` is the size of group g (length N, unused past the number of
    groups). ``torch.unique``
    would do this, but its output size depends on the data, so it synchronises with the device;
    sorting and a cumulative sum of the group starts give the same numbering in fixed shapes.
    """
    n = index.shape[0]
    sorted_idx, order = torch.sort(index, stable=True)
    starts = torch.ones((n,), dtype=torch.int64, device=index.device)
    starts[1:] = (sorted_idx[1:] != sorted_idx[:-1]).to(torch.int64)
    group = torch.empty_like(starts).scatter_(0, order, torch.cumsum(starts, 0) - 1)
    counts = torch.zeros((n,), dtype=torch.int64, device=index.device).index_add_(
        0, group, torch.ones_like(group))
    return group, counts


def decomposable_objective(stat: Tensor, pos: Tensor, log_u: Tensor, num_candidates: int) -> Tensor:
    """Per-anchor ``ℓ̃_i = u_i·Ẑ_i − S_{i,l_i}`` from the op's statistics (docs/math.md §3).

    ``stat`` is the anchor's log-sum-exp over its ``num_candidates`` candidates (row LSE, or the
    column LSE for the other direction), so ``log Ẑ_i = stat_i − log M`` and
    ``u_i·Ẑ_i = exp(log u_i + stat_i − log M)`` — evaluated in the log domain, bounded because
    ``log u_i ≈ −log Z̄_i``, so scales up to 100 do not overflow. ``log_u`` gets no gradient. The one
    home of the formula: the functional form, the module and the distributed module all use it.
    """
    return torch.exp(log_u.detach().to(stat.dtype) + stat - math.log(num_candidates)) - pos


def gamma_contrastive_loss(query: Tensor, keys: Tensor, logit_scale: ScaleLike, log_u: Tensor,
                           labels: Optional[Tensor] = None, *, reduction: str = "mean",
                           backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Decomposable (Gamma-augmented) loss of docs/math.md §3 for fixed auxiliary variables.

    ``ℓ̃_i = −S_{i,l_i} + u_i·Ẑ_i`` with ``Ẑ_i = (1/M)·Σ_j exp(S_ij)`` (see
    :func:`decomposable_objective`). ``u`` gets no gradient; with ``u_i = 1/Z_i`` the gradient is
    exactly the full-data InfoNCE gradient (unbiased).

    Args:
        query: (N, D). keys: (M, D). logit_scale: float or 0-d tensor. log_u: (N,) floating,
            detached. labels: (N,) int64 or None (``arange(N)``, needs M ≥ N).
    Returns:
        ``(loss, log_z)``: the reduced loss and the detached batch statistic
        ``log_z_i = log mean_j exp(S_ij)`` (N,) for the E-step.
    """
    _checks.check_reduction(reduction)
    _checks.check_features("query", query, "keys", keys)
    if not isinstance(log_u, Tensor):
        raise TypeError(f"log_u must be a torch.Tensor, got {type(log_u).__name__}")
    if not log_u.is_floating_point():
        raise TypeError(f"log_u must be floating point, got {log_u.dtype}")
    if log_u.shape != (query.shape[0],):
        raise ValueError(f"log_u must have shape ({query.shape[0]},) (one per query row), got "
                         f"{tuple(log_u.shape)}")
    if log_u.device != query.device:
        raise ValueError(f"log_u is on {log_u.device} but the features are on {query.device}")
    row, _, pos = functional.lse_stats(query, keys, logit_scale, labels, compute_col=False,
                                       backend=backend)
    m = keys.shape[0]
    per_sample = decomposable_objective(row, pos, log_u, m)
    return _checks.reduce(per_sample, reduction), (row - math.log(m)).detach()


class GammaContrastiveLoss(nn.Module):
    r"""Decomposable contrastive loss optimised by stochastic EM with per-sample running estimates.

    Args:
        num_samples: size of the training set; ``index`` values lie in ``[0, num_samples)``.
        estimator: ``"gamma"`` (default) | ``"ema"`` | ``"batch"`` — how ``u_i`` is chosen (module
            docstring, docs/math.md §3).
        shape: Gamma shape ``a > 0`` for ``estimator="gamma"`` (1.0 = exponential, P1's case).
        update_weight: ``γ ∈ (0, 1]``, the weight of the new batch estimate in
            ``Z̄ ← (1 − γ)·Z̄ + γ·Ẑ``. ``γ = 1`` keeps no memory (``"ema"`` then equals ``"batch"``).
            Because the E-step runs before ``u`` is chosen, ``u`` correlates with the current batch
            by a weight ``γ``: a large ``γ`` re-introduces part of minibatch InfoNCE's bias, a small
            one trusts stale estimates longer (see the synthetic experiment).
        symmetric: ``True`` (image–text, CLIP-style): both directions, each with its own state —
            image anchors against texts use the row statistic, text anchors against images the
            column statistic — and the loss is the average of the two. ``False``: one direction only
            (anchors ``image_features`` against candidates ``text_features``, e.g. SimCLR's two views).
        generator: ``torch.Generator`` for the Gamma draws. ``None``: the module creates its own CPU
            generator, seeded from the global RNG at construction (so ``torch.manual_seed`` makes a
            run reproducible). Draws happen on the generator's device and are moved to the state's
            device; pass a CUDA generator to sample on the GPU. The generator state is saved in the
            ``state_dict`` (``get_extra_state``), so a resumed run draws the same ``u`` sequence.
        backend: backend of the fused statistics (``"auto"`` | ``"reference"`` | ``"chunked"`` |
            ``"cpu"`` | ``"triton"`` | ``"cuda"``).
        dtype: dtype of the state buffers (``log Z̄``): float32 (default) or float64. The state
            math runs in at least float32 whatever the feature dtype. ``nn.Module.half()`` would
            cast the buffers too, so move the loss with ``.to(device)`` only, never to 16-bit.

    State (buffers, in ``state_dict``, follow ``.to(device)``): ``log_z_row`` / ``visited_row``
    (and ``log_z_col`` / ``visited_col`` when symmetric), each of shape ``(num_samples,)``.

    ``forward(image_features (N, D), text_features (M, D), index (N,) int64, logit_scale,
    output_dict=False)``: pair ``i`` is ``(image_features[i], text_features[i])``; ``index[i]`` is
    its dataset index. Symmetric needs ``M == N``; one-directional needs ``M ≥ N`` (rows beyond ``N``
    are extra negatives), or pass ``labels=`` (N,) int64 (keyword, one-directional only) to name each
    anchor's positive column in ``text_features`` (then any ``M ≥ 1``). Returns the augmented
    objective (a scalar: the mean of ``ℓ̃`` over anchors, averaged over the two directions when
    symmetric), or, with ``output_dict=True``,
    ``{"contrastive_loss": objective, "info_nce": plain InfoNCE of the batch (symmetric when
    symmetric), detached}`` — the objective's value is not comparable with InfoNCE; log the latter.
    The E-step mutates the state in ``forward`` (also in ``eval()`` mode; do not call it on
    validation batches whose indices alias training samples unless you want them counted).

    Stability: unlike InfoNCE, ``ℓ̃`` is not self-normalised — its ``−S_pos`` term is unbounded and
    only ``u_i·Ẑ_i`` holds it back. When the batch estimates ``Ẑ_i`` are heavy-tailed (logits of one
    anchor spread over several units), ``Z̄_i`` is dominated by rare large estimates, ``u_i·Ẑ_i ≪ 1`` on
    typical batches and the parameters can run away; a small ``update_weight`` (≈ 0.02–0.1), a
    smaller step size or a larger batch keep it stable (the synthetic experiment measures this).

    Duplicate indices within one batch: the batch estimates of rows sharing an index are combined
    by their arithmetic mean in Z space (``logsumexp − log count``, deterministic and independent of
    row order), the state of that index is updated ONCE with the combined estimate, and every such
    row reads the updated ``Z̄``; with ``"gamma"`` each row draws its own ``u``.

    Distributed training: the state must evolve identically on every rank. The forward is split so
    a wrapper can do it: compute the statistics, gather ``(index, log_z)`` of all ranks, call
    :meth:`update_state` with the gathered tensors (same order on every rank), then
    :meth:`estimate_log_u` for the local rows, and build the loss with
    :func:`contrastive_kernels.functional.gamma_contrastive_loss` or as :meth:`forward` does. Every rank
    must see the same gathered indices and batch statistics; the generator only affects the local
    rows' ``u`` (seed it per rank if independent draws across ranks are wanted). This module itself
    is single-process.
    """

    def __init__(self, num_samples: int, *, estimator: str = "gamma", shape: float = 1.0,
                 update_weight: float = 0.9, symmetric: bool = True,
                 generator: Optional[torch.Generator] = None, backend: str = "auto",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if isinstance(shape, bool) or not isinstance(shape, (int, float)) or not (
                math.isfinite(shape) and shape > 0):
            raise ValueError(f"shape (the Gamma shape a) must be a finite number > 0, got {shape!r}")
        if isinstance(update_weight, bool) or not isinstance(update_weight, (int, float)) or not (
                0.0 < update_weight <= 1.0):
            raise ValueError(f"update_weight (gamma) must lie in (0, 1], got {update_weight!r}")
        if backend not in BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype of the state must be torch.float32 or torch.float64, got {dtype}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.num_samples = num_samples
        self.estimator = estimator
        self.shape = float(shape)
        self.update_weight = float(update_weight)
        self.symmetric = bool(symmetric)
        self.backend = backend
        if generator is None:
            seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
            generator = torch.Generator().manual_seed(seed)
        self.generator = generator
        for d in self.directions:
            self.register_buffer(f"log_z_{d}", torch.zeros(num_samples, dtype=dtype))
            self.register_buffer(f"visited_{d}", torch.zeros(num_samples, dtype=torch.bool))

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------

    @property
    def directions(self) -> tuple[str, ...]:
        """``("row", "col")`` when symmetric, else ``("row",)``."""
        return _DIRECTIONS if self.symmetric else _DIRECTIONS[:1]

    def _state(self, direction: str) -> tuple[Tensor, Tensor]:
        if direction not in self.directions:
            raise ValueError(f"direction must be one of {self.directions} (symmetric="
                             f"{self.symmetric}), got {direction!r}")
        return getattr(self, f"log_z_{direction}"), getattr(self, f"visited_{direction}")

    @torch.no_grad()
    def reset_state(self) -> None:
        """Forget every running estimate (all samples become unvisited)."""
        for d in self.directions:
            log_z, visited = self._state(d)
            log_z.zero_()
            visited.zero_()

    def get_extra_state(self):
        return {"version": 1, "generator_state": self.generator.get_state(),
                "generator_device": str(self.generator.device)}

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict) or "generator_state" not in state:
            raise ValueError("GammaContrastiveLoss: unrecognised extra state in the state_dict")
        saved_dev = torch.device(state.get("generator_device", "cpu"))
        if saved_dev.type != self.generator.device.type:
            warnings.warn(f"GammaContrastiveLoss: the checkpoint's generator lived on {saved_dev}, "
                          f"this module's on {self.generator.device}; the Gamma draws cannot "
                          "continue the saved stream (the running estimates are restored)")
            return
        self.generator.set_state(state["generator_state"].cpu())

    def extra_repr(self) -> str:
        return (f"num_samples={self.num_samples}, estimator={self.estimator!r}, shape={self.shape}, "
                f"update_weight={self.update_weight}, symmetric={self.symmetric}, "
                f"backend={self.backend!r}")

    # ------------------------------------------------------------------------------------------
    # validation
    # ------------------------------------------------------------------------------------------

    def _check_index(self, index, n: Optional[int], device: torch.device) -> None:
        if not isinstance(index, Tensor):
            raise TypeError(f"index must be a torch.Tensor of int64, got {type(index).__name__}")
        if index.dtype != torch.int64:
            raise TypeError(f"index must be int64 (dataset indices), got {index.dtype}")
        if n is None and index.dim() != 1:
            raise ValueError(f"index must be 1-D (one dataset index per row), got shape "
                             f"{tuple(index.shape)}")
        if n is not None and index.shape != (n,):
            raise ValueError(f"index must have shape ({n},) (one dataset index per row), got "
                             f"{tuple(index.shape)}")
        n = index.shape[0]
        if index.device != device:
            raise ValueError(f"index is on {index.device} but the features are on {device}")
        # a value check: CPU tensors only, unless device value checks are switched on (_checks)
        _checks.check_range("index", index, 0, self.num_samples, f"num_samples={self.num_samples}")

    def _check_state_device(self, device: torch.device) -> None:
        buf = self.log_z_row
        if buf.device != device:
            raise ValueError(f"GammaContrastiveLoss state lives on {buf.device} but the features are "
                             f"on {device}; move the loss with .to({str(device)!r})")

    def _check_log_z(self, index: Tensor, log_z_batch) -> None:
        if not isinstance(log_z_batch, Tensor) or not log_z_batch.is_floating_point():
            raise TypeError("log_z_batch must be a floating-point torch.Tensor")
        if log_z_batch.shape != index.shape:
            raise ValueError(f"log_z_batch must have the shape of index {tuple(index.shape)}, got "
                             f"{tuple(log_z_batch.shape)}")

    # ------------------------------------------------------------------------------------------
    # E-step, split for distributed wrappers
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def update_state(self, index: Tensor, log_z_batch: Tensor, direction: str = "row") -> Tensor:
        """E-step: fold the batch estimates into the running ``log Z̄`` of ``direction``.

        Args:
            index: (N,) int64 dataset indices (gathered over ranks in distributed training).
            log_z_batch: (N,) batch statistics ``log Ẑ_i = LSE_j S_ij − log M`` (detached).
            direction: ``"row"`` (anchors = image_features) or ``"col"`` (anchors = text_features).
        Returns:
            (N,) the updated ``log Z̄`` of each row's index, in ``log_z_batch``'s dtype. Rows sharing an
            index are combined first (arithmetic mean of ``Ẑ``) and update the state once.
        """
        log_z_state, _ = self._state(direction)
        self._check_index(index, None, log_z_state.device)
        self._check_log_z(index, log_z_batch)
        return self._update(index, log_z_batch, direction)

    def _update(self, index: Tensor, log_z_batch: Tensor, direction: str) -> Tensor:
        log_z_state, visited = self._state(direction)
        out_dtype = log_z_batch.dtype
        work = torch.promote_types(log_z_state.dtype, out_dtype)
        est = log_z_batch.detach().to(device=log_z_state.device, dtype=work)
        # Log-mean-exp per group of rows sharing an index, shifted by the group max (no overflow).
        # A row alone in its group gets exactly its own estimate back (est + log 1 − log 1).
        # Buffers have one slot per row; slots past the number of groups stay unused.
        group, counts = _group_rows(index)
        n = index.shape[0]
        group_max = torch.full((n,), float("-inf"), dtype=work, device=est.device)
        group_max = group_max.scatter_reduce(0, group, est, reduce="amax")
        sums = torch.zeros((n,), dtype=work, device=est.device)
        sums = sums.index_add(0, group, torch.exp(est - group_max[group]))
        combined = (group_max[group] + torch.log(sums[group])
                    - torch.log(counts[group].to(work)))
        old = log_z_state[index].to(work)
        seen = visited[index]
        gamma = self.update_weight
        if gamma >= 1.0:
            ema = combined
        else:
            ema = torch.logaddexp(old + math.log1p(-gamma), combined + math.log(gamma))
        # Rows sharing an index carry identical values, so the duplicate writes agree.
        log_z_state[index] = torch.where(seen, ema, combined).to(log_z_state.dtype)
        visited[index] = True
        # Read back from the buffer so every consumer sees exactly the stored (rounded) value.
        return log_z_state[index].to(out_dtype)

    @torch.no_grad()
    def estimate_log_u(self, index: Tensor, log_z_batch: Tensor, direction: str = "row") -> Tensor:
        """``log u_i`` of each row by the module's estimator, from the CURRENT state (call
        :meth:`update_state` first: the E-step precedes the choice of ``u``, docs/math.md §3).

        Unvisited indices fall back to the batch estimate ``−log Ẑ_i``. Returns (N,) detached, in
        ``log_z_batch``'s dtype; ``"gamma"`` consumes N draws of the module's generator.
        """
        log_z_state, _ = self._state(direction)
        self._check_index(index, None, log_z_state.device)
        self._check_log_z(index, log_z_batch)
        return self._estimate(index, log_z_batch, direction)

    def _estimate(self, index: Tensor, log_z_batch: Tensor, direction: str) -> Tensor:
        log_z_state, visited = self._state(direction)
        dtype = log_z_batch.dtype
        batch = log_z_batch.detach().to(log_z_state.device)
        if self.estimator == "batch":
            return -batch
        log_z_bar = torch.where(visited[index], log_z_state[index].to(dtype), batch)
        if self.estimator == "ema":
            return -log_z_bar
        log_g = _log_standard_gamma(self.shape, index.shape[0], self.generator, dtype)
        return log_g.to(log_z_bar.device) - math.log(self.shape) - log_z_bar

    @torch.no_grad()
    def e_step(self, index: Tensor, log_z_batch: Tensor, direction: str = "row") -> Tensor:
        """:meth:`update_state` then :meth:`estimate_log_u`; returns ``log u`` (N,)."""
        self.update_state(index, log_z_batch, direction)
        return self._estimate(index, log_z_batch, direction)

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------

    def check_batch(self, image_features: Tensor, text_features: Tensor, index: Tensor,
                    labels: Optional[Tensor] = None) -> None:
        """Validate one forward's inputs (shared with the distributed module)."""
        _checks.check_features("image_features", image_features, "text_features", text_features)
        n, m = image_features.shape[0], text_features.shape[0]
        if labels is not None and self.symmetric:
            raise ValueError("labels are only supported with symmetric=False (the symmetric loss "
                             "pairs row i with row i)")
        if self.symmetric and n != m:
            raise ValueError(f"symmetric GammaContrastiveLoss pairs row i of image_features with row "
                             f"i of text_features, so batch sizes must match: image_features "
                             f"{tuple(image_features.shape)} vs text_features {tuple(text_features.shape)}")
        if labels is None and m < n:
            raise ValueError(f"the positive of anchor i is text_features[i], so text_features needs "
                             f"at least N={n} rows, got {tuple(text_features.shape)}")
        self._check_state_device(image_features.device)
        self._check_index(index, n, image_features.device)

    def direction_objective(self, stat: Tensor, pos: Tensor, index: Tensor, num_candidates: int,
                            direction: str) -> Tensor:
        """E-step on one direction's statistic, then the mean decomposable objective of its rows."""
        log_z = stat.detach() - math.log(num_candidates)
        with torch.no_grad():  # index validated by check_batch; u never receives a gradient
            self._update(index, log_z, direction)
            log_u = self._estimate(index, log_z, direction)
        return decomposable_objective(stat, pos, log_u, num_candidates).mean()

    def forward(self, image_features: Tensor, text_features: Tensor, index: Tensor, logit_scale,
                output_dict: bool = False, *, labels: Optional[Tensor] = None):
        self.check_batch(image_features, text_features, index, labels)
        n, m = image_features.shape[0], text_features.shape[0]
        row, col, pos = functional.lse_stats(image_features, text_features, logit_scale, labels,
                                             compute_col=self.symmetric, backend=self.backend)
        objective = self.direction_objective(row, pos, index, m, "row")
        info_nce = (row - pos).detach().mean()
        if self.symmetric:
            objective = 0.5 * (objective + self.direction_objective(col, pos, index, n, "col"))
            info_nce = 0.5 * (info_nce + (col - pos).detach().mean())
        if output_dict:
            return {"contrastive_loss": objective, "info_nce": info_nce}
        return objective
