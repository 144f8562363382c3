"""Gradient caching for the encoders of a contrastive step (docs/math.md §8; Gao et al. 2021).

A fused loss needs O((N+M)·D) memory, but the encoders' activations still grow with the batch.
:class:`GradCache` splits one training step into three stages so that only one chunk's
activations are alive at a time:

1. **first pass** — every model runs on chunks of its input under ``torch.no_grad()``; the
   random-number state (CPU and the CUDA devices in use) is recorded before each chunk, and the
   chunk outputs are concatenated into the full representations ``R_k`` (O(B·D) memory);
2. **loss step** — the loss runs ONCE on the full representations, made leaf tensors, and one
   backward gives ``∂L/∂R_k`` (and the gradient of every other input of the loss, e.g.
   ``logit_scale``); a stateful loss (``GammaContrastiveLoss``) therefore runs its E-step once per
   step, exactly as in a plain step;
3. **second pass** — every chunk runs again with autograd under its recorded random state (so
   dropout draws the same masks) and backpropagates its slice of ``∂L/∂R_k`` into the parameters.

By linearity of the chain rule, ``Σ_chunks (∂R_chunk/∂θ)ᵀ·∂L/∂R_chunk`` is the full-batch parameter
gradient; the cost is one extra forward of each encoder.
"""
from __future__ import annotations

import contextlib
import functools
import numbers
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["GradCache"]

# Device types whose autocast state is captured and re-established (those torch knows about here).
_AUTOCAST_DEVICE_TYPES = tuple(dt for dt in ("cpu", "cuda", "xpu", "mps", "hpu")
                               if torch.amp.is_autocast_available(dt))


def _ddp_class():
    if not torch.distributed.is_available():
        return None
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel


# ---------------------------------------------------------------------------------------------
# random-number and autocast state
# ---------------------------------------------------------------------------------------------

class _RngState:
    """The CPU generator state plus the default generator state of each listed CUDA device.

    A chunk's forward can draw from the CPU generator (CPU dropout, and some ops on CUDA tensors
    seed from it) and from the generator of every CUDA device it touches; recording all of them
    makes the second pass draw exactly what the first pass drew. CUDA states are (seed, offset)
    pairs kept on the host, so capturing them does not synchronise the device.
    """

    __slots__ = ("cpu", "cuda")

    def __init__(self, devices: Sequence[int]):
        self.cpu = torch.get_rng_state()
        self.cuda = [(d, torch.cuda.get_rng_state(d)) for d in devices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, state in self.cuda:
            torch.cuda.set_rng_state(state, d)


def _cuda_devices(x, module: Optional[nn.Module]) -> list[int]:
    """CUDA devices a model's chunk may draw random numbers on: those of its input tensors, of its
    module's parameters and buffers (a model may move its input), and the current device when CUDA
    is initialised (a plain callable hides its parameters)."""
    devices = set()
    for t in _tensors(x):
        if t.is_cuda:
            devices.add(t.get_device())
    if module is not None:
        for t in module.parameters():
            if t.is_cuda:
                devices.add(t.get_device())
        for t in module.buffers():
            if t.is_cuda:
                devices.add(t.get_device())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices.add(torch.cuda.current_device())
    return sorted(devices)


def _capture_autocast() -> list[tuple[str, bool, torch.dtype]]:
    return [(dt, torch.is_autocast_enabled(dt), torch.get_autocast_dtype(dt))
            for dt in _AUTOCAST_DEVICE_TYPES]


def _autocast(state, cache_enabled: bool) -> contextlib.ExitStack:
    """Re-enter the caller's autocast state (captured at call time) for the model passes.

    Both passes run inside the call, so the ambient state is normally still the caller's; entering
    it explicitly keeps the two passes identical even if ``loss_fn`` left the thread-local state
    changed, and documents that the second pass must cast exactly as the first did (otherwise the
    replayed representations would differ from the cached ones).
    """
    stack = contextlib.ExitStack()
    for dt, enabled, dtype in state:
        if enabled or torch.is_autocast_enabled(dt):
            stack.enter_context(torch.autocast(dt, dtype=dtype, enabled=enabled,
                                               cache_enabled=cache_enabled))
    return stack


def _no_autocast(state) -> contextlib.ExitStack:
    """Backward calls run with autocast off, as a plain step's ``loss.backward()`` outside the
    ``autocast`` block does (PyTorch's recommended use): the autograd engine carries the caller's
    thread-local dispatch state, so a backward launched inside autocast could recast ops."""
    stack = contextlib.ExitStack()
    for dt, enabled, _ in state:
        if enabled:
            stack.enter_context(torch.autocast(dt, enabled=False))
    return stack


# ---------------------------------------------------------------------------------------------
# inputs and outputs
# ---------------------------------------------------------------------------------------------

def _tensors(x) -> list[Tensor]:
    if isinstance(x, Mapping):
        return [v for v in x.values() if isinstance(v, Tensor)]
    return [x]


def _batch_size(k: int, x) -> int:
    """Batch size (dim 0) of input ``k``: a tensor, or a mapping of tensors sharing dim 0."""
    if isinstance(x, Tensor):
        if x.dim() == 0:
            raise ValueError(f"input {k} is a 0-d tensor; GradCache splits inputs along dim 0 "
                             "(the batch), so each needs at least one dimension")
        return x.shape[0]
    if isinstance(x, Mapping):
        sizes = {}
        for key, v in x.items():
            if not isinstance(key, str):
                raise TypeError(f"input {k}: mapping keys are passed as keyword arguments and "
                                f"must be str, got key {key!r} ({type(key).__name__})")
            if not isinstance(v, Tensor):
                # not batched (sentence-transformers 6 adds 'modality': 'text'): passed unchanged
                # to every chunk, never split
                continue
            if v.dim() == 0:
                raise ValueError(f"input {k}: tensor {key!r} is 0-d; every tensor of a mapping "
                                 "input must be batched along dim 0")
            sizes[key] = v.shape[0]
        if not sizes:
            raise ValueError(f"input {k} is a mapping without any tensor; it needs at least one "
                             "tensor batched along dim 0")
        if len(set(sizes.values())) != 1:
            raise ValueError(f"input {k}: the tensors of a mapping input must share the batch "
                             f"size (dim 0), got {sizes}")
        return next(iter(sizes.values()))
    raise TypeError(f"input {k} is a {type(x).__name__}; GradCache takes a tensor or a mapping "
                    "(dict) of tensors batched along dim 0 per model")


def _slice(x, start: int, stop: int):
    if isinstance(x, Mapping):
        return {key: v[start:stop] if isinstance(v, Tensor) else v for key, v in x.items()}
    return x[start:stop]


def _call(model: Callable, chunk):
    # A mapping (a tokenizer's output) is unpacked into keyword arguments, as HF models expect.
    return model(**chunk) if isinstance(chunk, Mapping) else model(chunk)


def _check_output(out, k: int, j: int, rows: int, first: Optional[Tensor]) -> None:
    if not isinstance(out, Tensor):
        raise TypeError(f"model {k} returned a {type(out).__name__} on chunk {j}; GradCache needs "
                        "each model to return one tensor with the batch on dim 0 (pass a callable "
                        "that picks the representation, e.g. lambda x: m(x)[0] or "
                        "lambda x: m(**x).pooler_output)")
    if not out.is_floating_point():
        raise TypeError(f"model {k} returned a {out.dtype} tensor on chunk {j}; representations "
                        "must be floating point to carry a gradient")
    if out.dim() == 0 or out.shape[0] != rows:
        raise ValueError(f"model {k} returned shape {tuple(out.shape)} for chunk {j} of {rows} "
                         f"rows; the output must have the batch on dim 0 (size {rows}) so the "
                         "chunk outputs add up to the input's batch")
    if first is not None and (out.shape[1:] != first.shape[1:] or out.dtype != first.dtype
                              or out.device != first.device):
        raise ValueError(f"model {k} returned shape {tuple(out.shape)} {out.dtype} on {out.device} "
                         f"for chunk {j}, but shape {tuple(first.shape)} {first.dtype} on "
                         f"{first.device} for chunk 0; every chunk must give the same "
                         "per-row shape, dtype and device")


def _owner_module(model) -> Optional[nn.Module]:
    """The ``nn.Module`` whose parameters a model uses, when that is unambiguous: the model itself,
    the object of a bound method (``clip.encode_image``), or the function of a ``partial``."""
    if isinstance(model, nn.Module):
        return model
    if isinstance(getattr(model, "__self__", None), nn.Module):
        return model.__self__
    if isinstance(model, functools.partial):
        return _owner_module(model.func)
    return None


def _as_list(value) -> list:
    if isinstance(value, (list, tuple, nn.ModuleList)):
        return list(value)
    return [value]


# ---------------------------------------------------------------------------------------------
# GradCache
# ---------------------------------------------------------------------------------------------

class GradCache:
    r"""One contrastive training step with gradient caching (docs/math.md §8): full-batch gradients at
    the memory of one chunk's encoder activations.

    Args:
        models: one model per input, in the order of the inputs — an ``nn.Module`` or any callable
            (``clip.encode_image``, ``lambda x: m(**x).pooler_output``). The same model may appear
            more than once (SimCLR: ``[encoder, encoder]``). A single model means one input.
        loss_fn: called once per step as ``loss_fn(R_1, ..., R_K, **loss_kwargs)`` on the full
            representations; any callable returning a one-element tensor (``ck.ClipLoss``, also
            distributed, ``ck.GammaContrastiveLoss``, ``ck.InfoNCELoss``, a lambda, ...).
        chunk_size: rows per chunk, an int ≥ 1 or one int per model; the last chunk may be smaller.
        scaler: optional ``torch.amp.GradScaler`` (anything with ``.scale(loss)``): the loss step
            runs ``scaler.scale(loss).backward()``, so the representation gradients — and hence
            every parameter gradient — are scaled exactly as a plain ``scaler.scale(loss)
            .backward()`` would scale them. Call ``scaler.step`` / ``scaler.update`` as usual.
        modules: optional, one ``nn.Module`` (or ``None``) per model: the module owning the
            parameters of a model given as a plain callable (a lambda hides them). It is used to
            find DDP wrappers to ``no_sync``, to skip frozen towers and to find the CUDA devices
            whose random state is recorded. Default: the model itself when it is a module, the
            object of a bound method, else ``None``.

    ``__call__(*inputs, **loss_kwargs)`` → the loss, detached (unscaled when a scaler is given).
    ``inputs``: one per model, each a tensor ``(B, ...)`` or a mapping (dict, a tokenizer's
    ``BatchEncoding``) of tensors ``(B, ...)``, all with the same batch size ``B``; a mapping is
    unpacked into keyword arguments (``model(**chunk)``). Each model returns one floating tensor
    ``(B_chunk, ...)`` with the batch on dim 0 — typically ``(B_chunk, D)`` features.
    ``loss_kwargs`` go to ``loss_fn`` unchanged (``logit_scale=``, ``logit_bias=``, ``index=``).

    Contract: afterwards every parameter of the models, and every tensor in ``loss_kwargs`` that
    requires grad (a leaf ``logit_scale``, or a non-leaf such as ``model.logit_scale.exp()``,
    through which the gradient reaches its parameter), holds the gradient that
    ``loss_fn(*[m(x) for m, x in zip(models, inputs)], **loss_kwargs).backward()`` would have
    accumulated (added to an existing ``.grad``, never overwriting it), with dropout replayed
    exactly from the first pass, while only one chunk's activations are alive at a time (plus the
    O(B·D) representations and their gradients). Inputs that require grad get their gradient too.

    Behaviour:

    - **Random state**: recorded before every chunk of the first pass (CPU, and the CUDA devices of
      the chunk's tensors, of the model's module and the current device) and restored before the
      chunk's replay; after the call the random streams are where the first pass and the loss
      left them, as after a plain step. Other accelerators' generators are not recorded.
    - **Autocast**: the caller's autocast state at call time is used for both passes and the loss;
      backward calls run with autocast off (as a plain ``loss.backward()`` outside the block).
    - **Frozen towers**: a model whose module has no parameter requiring grad (and whose input
      does not require grad) is not run a second time and its representation gets no gradient;
      a replayed chunk whose output does not require grad skips its backward.
    - **DDP**: every ``DistributedDataParallel`` found in a model's module (or in ``modules``) runs
      the forward and backward of all but its last chunk of the step under ``no_sync()``, so its
      gradients are all-reduced once per step, at its last backward (a model shared by two inputs
      syncs at its very last chunk). Call the DDP wrapper itself, or a callable around it named in
      ``modules``: a callable that reaches into ``ddp.module`` bypasses DDP's reducer and is never
      synced. One wrapper around both towers (open_clip's model, as
      ``[lambda x: ddp(image=x)[0], lambda x: ddp(text=x)[1]]`` with ``modules=[ddp, ddp]``)
      needs ``find_unused_parameters=True``, since each chunk's backward reaches one tower only;
      the reducer then also averages what loss-only parameters of the wrapped module
      (``logit_scale``) received in the loss step, as a plain DDP step would. Loss parameters
      outside every DDP wrapper keep their local gradient, as in a plain step.
    - **Gradient mode off** (``torch.no_grad()``): only the first pass and the loss run — a chunked
      evaluation; nothing is backpropagated.
    - **Not replayable**: state updated in the forward (BatchNorm running statistics, which are
      also per-chunk statistics here) changes in both passes; use models whose training forward is
      a pure function of (input, parameters, random state).

    Errors (``ValueError`` / ``TypeError``, naming the sizes or types, raised before any gradient
    is touched): a number of inputs other than the number of models, inputs of different batch
    sizes, an input that is not a tensor or a mapping of tensors, ``chunk_size < 1``, a model that
    returns something other than one floating tensor with the chunk's rows on dim 0, a loss that is
    not a one-element tensor.

    Example (open_clip-style loop; normalised features and the exponentiated ``logit_scale``, as
    open_clip passes them to its loss; the lambdas hide the model, so it is named in ``modules``)::

        scaler = torch.amp.GradScaler("cuda")
        gc = ck.GradCache([lambda x: model.encode_image(x, normalize=True),
                           lambda x: model.encode_text(x, normalize=True)],
                          ck.ClipLoss(), chunk_size=64, scaler=scaler, modules=[model, model])
        for images, texts in loader:                         # (B, 3, H, W), (B, L) token ids
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16):
                loss = gc(images, texts, logit_scale=model.logit_scale.exp())
            scaler.step(optimizer)                            # gradients are scaled: step unscales
            scaler.update()

    SimCLR with one shared encoder for both views::

        gc = ck.GradCache([encoder, encoder], lambda za, zb, s: ck.clip_loss(za, zb, s),
                          chunk_size=128)
        optimizer.zero_grad(set_to_none=True)
        loss = gc(view_a, view_b, s=10.0)                    # (B, C, H, W) each
        optimizer.step()
    """

    def __init__(self, models, loss_fn: Callable, chunk_size: Union[int, Sequence[int]], *,
                 scaler: Any = None, modules: Optional[Sequence[Optional[nn.Module]]] = None):
        self.models = _as_list(models)
        if not self.models:
            raise ValueError("GradCache needs at least one model")
        for k, m in enumerate(self.models):
            if not callable(m):
                raise TypeError(f"model {k} is a {type(m).__name__}, which is not callable")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        sizes = (list(chunk_size) if isinstance(chunk_size, (list, tuple))
                 else [chunk_size] * len(self.models))
        if len(sizes) != len(self.models):
            raise ValueError(f"chunk_size gives {len(sizes)} sizes for {len(self.models)} models")
        for c in sizes:
            if isinstance(c, bool) or not isinstance(c, numbers.Integral):
                raise TypeError(f"chunk_size must be an int (or one int per model), got {c!r} "
                                f"({type(c).__name__})")
            if c < 1:
                raise ValueError(f"chunk_size must be >= 1, got {c}")
        self.chunk_sizes = [int(c) for c in sizes]
        if scaler is not None and not callable(getattr(scaler, "scale", None)):
            raise TypeError(f"scaler must have a .scale(loss) method (a torch.amp.GradScaler), "
                            f"got {type(scaler).__name__}")
        self.scaler = scaler
        if modules is None:
            self.modules = [_owner_module(m) for m in self.models]
        else:
            self.modules = _as_list(modules)
            if len(self.modules) != len(self.models):
                raise ValueError(f"modules gives {len(self.modules)} entries for "
                                 f"{len(self.models)} models (use None for a model without one)")
            for k, mod in enumerate(self.modules):
                if mod is not None and not isinstance(mod, nn.Module):
                    raise TypeError(f"modules[{k}] must be an nn.Module or None, got "
                                    f"{type(mod).__name__}")

    @property
    def chunk_size(self) -> Union[int, list[int]]:
        sizes = self.chunk_sizes
        return sizes[0] if len(set(sizes)) == 1 else list(sizes)

    def __repr__(self) -> str:
        names = [getattr(m, "__qualname__", type(m).__name__) for m in self.models]
        return (f"GradCache(models={names}, chunk_size={self.chunk_size}, "
                f"scaler={type(self.scaler).__name__ if self.scaler is not None else None})")

    # -----------------------------------------------------------------------------------------

    def _check_inputs(self, inputs) -> int:
        if len(inputs) != len(self.models):
            raise ValueError(f"GradCache has {len(self.models)} models but got {len(inputs)} "
                             f"inputs; pass one input per model (loss arguments by keyword)")
        sizes = [_batch_size(k, x) for k, x in enumerate(inputs)]
        if len(set(sizes)) != 1:
            raise ValueError(f"all inputs must have the same batch size (dim 0), got {sizes}")
        if sizes[0] == 0:
            raise ValueError("the batch is empty (batch size 0)")
        return sizes[0]

    def _needs_replay(self, k: int, x) -> bool:
        """False when model ``k`` certainly produces no gradient (a frozen tower)."""
        if any(t.requires_grad for t in _tensors(x)):
            return True
        module = self.modules[k]
        if module is None:
            return True  # a plain callable: decided per chunk by its output's requires_grad
        return any(p.requires_grad for p in module.parameters())

    def _ddp_wrappers(self, k: int) -> list[nn.Module]:
        ddp = _ddp_class()
        module = self.modules[k]
        if ddp is None or module is None:
            return []
        return [m for m in module.modules() if isinstance(m, ddp)]

    def __call__(self, *inputs, **loss_kwargs) -> Tensor:
        batch = self._check_inputs(inputs)
        grad_on = torch.is_grad_enabled()
        autocast_state = _capture_autocast()
        cache_enabled = torch.is_autocast_cache_enabled()
        bounds = [[(a, min(a + c, batch)) for a in range(0, batch, c)] for c in self.chunk_sizes]
        devices = [_cuda_devices(x, self.modules[k]) for k, x in enumerate(inputs)]
        replay = [grad_on and self._needs_replay(k, x) for k, x in enumerate(inputs)]

        # First pass: no autograd graph, one chunk at a time; record the random state per chunk.
        reps: list[Tensor] = []
        rng: list[list[_RngState]] = []
        with torch.no_grad(), _autocast(autocast_state, cache_enabled):
            for k, (model, x) in enumerate(zip(self.models, inputs)):
                outs, states = [], []
                for j, (a, b) in enumerate(bounds[k]):
                    states.append(_RngState(devices[k]) if replay[k] else None)
                    out = _call(model, _slice(x, a, b))
                    _check_output(out, k, j, b - a, outs[0] if outs else None)
                    outs.append(out)
                # detach: a model may return (a view of) its input; the leaf must be a new tensor.
                rep = torch.cat(outs) if len(outs) > 1 else outs[0].detach()
                del outs
                reps.append(rep.requires_grad_(replay[k]))
                rng.append(states)

        # Loss step: once, on the full representations (a stateful loss updates its state once).
        with _autocast(autocast_state, cache_enabled):
            loss = self.loss_fn(*reps, **loss_kwargs)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            got = (f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor)
                   else f"a {type(loss).__name__}")
            raise TypeError(f"loss_fn must return a one-element tensor (the loss), got {got}; "
                            "wrap a loss with output_dict=True as "
                            "lambda *a, **k: loss(*a, **k)['contrastive_loss']")
        value = loss.detach()
        if not (grad_on and loss.requires_grad):
            return value
        scaled = self.scaler.scale(loss) if self.scaler is not None else loss
        with _no_autocast(autocast_state):
            scaled.backward()
        del scaled, loss  # the loss graph's nodes go now, before the second pass
        grads = [r.grad if replay[k] else None for k, r in enumerate(reps)]
        del reps

        # Second pass plan: the chunks that backpropagate, in order; each DDP wrapper syncs only
        # at its last one (no_sync must cover the forward too: DDP decides at forward time).
        steps = [(k, j) for k in range(len(self.models)) if grads[k] is not None
                 for j in range(len(bounds[k]))]
        wrappers = [self._ddp_wrappers(k) for k in range(len(self.models))]
        last_step = {}
        for s, (k, _) in enumerate(steps):
            for w in wrappers[k]:
                last_step[id(w)] = s
        all_devices = sorted({d for k, _ in steps for d in devices[k]})

        # The caller's streams are saved here and restored after the replay, so the second pass
        # leaves them exactly where the first pass and the loss did.
        with torch.random.fork_rng(devices=all_devices, device_type="cuda"):
            for s, (k, j) in enumerate(steps):
                a, b = bounds[k][j]
                g = grads[k][a:b]
                with contextlib.ExitStack() as stack:
                    for w in wrappers[k]:
                        if last_step[id(w)] != s:
                            stack.enter_context(w.no_sync())
                    rng[k][j].restore()
                    with _autocast(autocast_state, cache_enabled):
                        out = _call(self.models[k], _slice(inputs[k], a, b))
                    if not isinstance(out, Tensor) or out.shape != g.shape or out.dtype != g.dtype:
                        got = (f"shape {tuple(out.shape)} {out.dtype}" if isinstance(out, Tensor)
                               else f"a {type(out).__name__}")
                        raise RuntimeError(
                            f"model {k} chunk {j}: the replay returned {got}, the first pass shape "
                            f"{tuple(g.shape)} {g.dtype}; the model must be a deterministic "
                            "function of its input, parameters and random state")
                    if out.requires_grad:
                        with _no_autocast(autocast_state):
                            torch.autograd.backward(out, g)
                    del out, g
            del grads
        return value
