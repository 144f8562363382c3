"""Host-side choices of the Triton kernels: tile sizes, autotune configs, the shared-memory model,
the column-split plan, the fp32 input precision, and the ``CK_TRITON_*`` environment knobs.

Nothing here launches a kernel. The forward and backward host code read every choice through
:func:`current_tuning` (environment, overridden by :func:`tuning` in tests and benchmarks) and the
device helpers below; ``tools/triton_offline_compile.py`` replaces :func:`num_sms` and
:func:`smem_limit` on this module to plan launches as on an H100 without one.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, replace

import torch
import triton


def interpreting() -> bool:
    """Whether Triton runs in its interpreter (CPU tensors; set by the tests, never the library)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# Tuning: BLOCK_M, BLOCK_D and the column split are chosen on the host (they size the partial
# buffers); the autotuner picks BLOCK_N, num_warps and num_stages per size bucket.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tuning:
    """Host-side choices. Defaults come from the environment; tests override them."""

    fwd_block_m: int = 128
    bwd_block_m: int = 64
    fwd_max_single_d: int = 128   # D up to this: Q block resident in registers (D_SINGLE)
    bwd_max_single_d: int = 128   # ... and the dQ accumulator too
    chunk_d: int = 64             # D chunk of the GEMM main loop when not D_SINGLE
    # Dg chunk of the guide dot (one dot, no inner loop, while Dg fits). Offline sm_90 compile of
    # the masked bf16 forward at D = 128, Dg = 64 (tools/triton_offline_compile.py, triton 3.9):
    # one 64-wide fp32 FFMA dot spills 4272 B at BLOCK_M = 128 (and the larger configs exceed the
    # shared memory); 16-wide chunks in a K-loop spill 528 B (as the unmasked SupCon kernel: 552 B)
    guide_chunk_d: int = 16
    split: int = 0                # column splits; 0 = heuristic (fill the SMs twice over)
    col_reduce: str = "auto"      # auto | partial | atomic
    bwd_mode: str = "auto"        # auto | fused | two_pass | gemm
    gemm_budget_bytes: int = 64 << 20  # G slab of the "gemm" backward (1024 rows at M = 32768)
    gemm_min_rows: int = 1024
    deterministic: bool | None = None  # None: env CK_TRITON_DETERMINISTIC / torch's flag
    partial_budget_bytes: int = 1 << 30


# environment variable -> Tuning field, integers
_INT_KNOBS = (("CK_TRITON_FWD_BLOCK_M", "fwd_block_m"), ("CK_TRITON_BWD_BLOCK_M", "bwd_block_m"),
              ("CK_TRITON_FWD_MAX_SINGLE_D", "fwd_max_single_d"),
              ("CK_TRITON_BWD_MAX_SINGLE_D", "bwd_max_single_d"),
              ("CK_TRITON_CHUNK_D", "chunk_d"), ("CK_TRITON_GUIDE_CHUNK_D", "guide_chunk_d"),
              ("CK_TRITON_SPLIT", "split"))


def _env_tuning() -> Tuning:
    t = Tuning()
    if interpreting():  # small tiles: the interpreter runs each program in numpy
        t = replace(t, fwd_block_m=32, bwd_block_m=32, fwd_max_single_d=256, bwd_max_single_d=256,
                    chunk_d=32, guide_chunk_d=32)
    env = os.environ
    kw = {}
    for name, field in _INT_KNOBS:
        if env.get(name):
            kw[field] = int(env[name])
    if env.get("CK_TRITON_GEMM_MB"):
        kw["gemm_budget_bytes"] = int(float(env["CK_TRITON_GEMM_MB"]) * (1 << 20))
    if env.get("CK_TRITON_PARTIAL_MB"):
        kw["partial_budget_bytes"] = int(float(env["CK_TRITON_PARTIAL_MB"]) * (1 << 20))
    if env.get("CK_TRITON_COL_REDUCE"):
        kw["col_reduce"] = env["CK_TRITON_COL_REDUCE"]
    if env.get("CK_TRITON_BWD"):
        kw["bwd_mode"] = env["CK_TRITON_BWD"]
    if env.get("CK_TRITON_DETERMINISTIC"):
        kw["deterministic"] = env["CK_TRITON_DETERMINISTIC"] not in ("0", "", "false", "False")
    return replace(t, **kw)


_OVERRIDE: dict = {}


@contextlib.contextmanager
def tuning(**overrides):
    """Temporarily override host-side choices (``Tuning`` fields), e.g. in tests and benchmarks."""
    bad = set(overrides) - set(Tuning.__dataclass_fields__)
    if bad:
        raise ValueError(f"unknown tuning fields {sorted(bad)}")
    old = dict(_OVERRIDE)
    _OVERRIDE.update(overrides)
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(old)


def current_tuning() -> Tuning:
    t = replace(_env_tuning(), **_OVERRIDE)
    if t.col_reduce not in ("auto", "partial", "atomic"):
        raise ValueError(f"col_reduce must be auto|partial|atomic, got {t.col_reduce!r}")
    if t.bwd_mode not in ("auto", "fused", "two_pass", "gemm"):
        raise ValueError(f"bwd_mode must be auto|fused|two_pass|gemm, got {t.bwd_mode!r}")
    for f in ("fwd_block_m", "bwd_block_m", "chunk_d", "guide_chunk_d"):
        v = getattr(t, f)
        if v < 16 or v & (v - 1):
            raise ValueError(f"{f} must be a power of two >= 16, got {v}")
    return t


def deterministic(t: Tuning) -> bool:
    if t.deterministic is not None:
        return t.deterministic
    return torch.are_deterministic_algorithms_enabled()


def bwd_mode(t: Tuning, d_single: bool) -> str:
    """The backward mode in force: ``fused`` while the dQ accumulator fits in registers, ``gemm``
    beyond (the fused kernel spills at D = 512), ``two_pass`` / ``gemm`` when deterministic.

    Determinism wins over a forced ``fused`` (its float32 atomics reorder from run to run), as the
    forward ignores a forced ``atomic`` column reduction: a user who asked for
    ``torch.use_deterministic_algorithms(True)`` never silently gets an atomic backward."""
    if deterministic(t):
        if t.bwd_mode in ("two_pass", "gemm"):
            return t.bwd_mode
        return "two_pass" if d_single else "gemm"
    if t.bwd_mode != "auto":
        return t.bwd_mode
    return "fused" if d_single or interpreting() else "gemm"


def describe() -> str:
    """One line of the host choices in force (for benchmark logs)."""
    t = current_tuning()
    return (f"fwd BLOCK_M={t.fwd_block_m} bwd BLOCK_M={t.bwd_block_m} single-D<= "
            f"{t.fwd_max_single_d}/{t.bwd_max_single_d} chunk_d={t.chunk_d} "
            f"guide_chunk_d={t.guide_chunk_d} col_reduce={t.col_reduce} "
            f"bwd={t.bwd_mode} deterministic={deterministic(t)} partial_budget={t.partial_budget_bytes >> 20}MiB")


# ---------------------------------------------------------------------------------------------
# autotune configs and the shared-memory model
# ---------------------------------------------------------------------------------------------

def fwd_configs():
    if interpreting():  # several configs cannot be benchmarked without a GPU
        return [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)]
    # offline sm_90 compile (ptxas via cuobjdump --dump-resource-usage, see benchmarks/NOTES.md):
    # BLOCK_M=128 with BLOCK_N=128 spills at 4 warps and BLOCK_N=256 spills at 8; these do not
    # (every config compiles on first use of each specialisation: a few seconds each on the GPU
    # machine, whose command time is scarce, so the lists stay short)
    return [
        triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=4),
    ]


def bwd_configs():
    if interpreting():
        return [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)]
    # fused/two-pass programs own BLOCK_M = 64 rows; the G writer of the gemm mode owns 128
    return [
        triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=3),
    ]


# Opt-in shared memory per block when the device does not say (sm_90: 227 KiB).
DEFAULT_SMEM_LIMIT = 227 * 1024


@functools.lru_cache(maxsize=None)
def _cuda_props(index: int):
    return torch.cuda.get_device_properties(index)


def device_props(device: torch.device):
    """torch's properties of a CUDA device (cached per index); None for any other device."""
    if device.type != "cuda":
        return None
    return _cuda_props(device.index if device.index is not None else torch.cuda.current_device())


def smem_limit(device: torch.device) -> int:
    """Largest dynamic shared memory one program may use on ``device`` (bytes)."""
    props = device_props(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or DEFAULT_SMEM_LIMIT)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 0 elsewhere (the interpreter: one column split)."""
    props = device_props(device)
    return props.multi_processor_count if props is not None else 0


def smem_estimate(cfg, elem: int, block_m: int, block_d: int, d_single: bool,
                  block_dg: int = 0) -> int:
    """Shared memory of the forward's pipelined tile loop: num_stages buffers of the swept key
    tile (BLOCK_N × BLOCK_D, plus the BLOCK_M × BLOCK_D query chunk when D is chunked, since both
    are re-loaded per chunk) and, with D resident, one copy of the query block.

    Checked against every forward config of the offline sm_90 compiles
    (tools/triton_offline_compile.py, triton 3.6 and 3.9): never more than 4 KiB below the
    compiled size, and above it where the compiler does not pipeline (16-byte-unaligned rows, fp32
    "ieee" dots). E.g. fp32, D = 128 resident, BLOCK_N = 128, 3 stages: 262144 estimated, 262656
    compiled, over the H100's 227 KiB. The backward is not modelled (its two dot stages keep G and
    the operands of the second MMA in shared memory too); its largest compiled config uses 192 KiB.

    ``block_dg`` > 0 (the guide mask): the float32 guide chunks of both sides (BLOCK_DG ×
    (BLOCK_N + BLOCK_M)) counted as pipelined too, an upper bound (a conservative prune).
    """
    bn = cfg.kwargs["BLOCK_N"]
    per_stage = block_d * (bn + (0 if d_single else block_m))
    resident = block_m * block_d if d_single else 0
    guide = cfg.num_stages * block_dg * (bn + block_m) * 4
    return elem * (cfg.num_stages * per_stage + resident) + guide


def prune_fwd_by_smem(configs, named_args, **kwargs):
    """early_config_prune of the forward autotuner: drop configs whose estimated shared memory
    exceeds the device's limit (they would fail with OutOfResources at launch, after a compile the
    GPU session pays for); keep the smallest when none fits, so the launch error names the problem."""
    q = named_args["Q"]
    limit = smem_limit(q.device)
    bdg = kwargs["BLOCK_DG"] if kwargs.get("HAS_GUIDE", False) else 0
    est = [(smem_estimate(c, q.element_size(), kwargs["BLOCK_M"], kwargs["BLOCK_D"], kwargs["D_SINGLE"],
                          bdg), i)
           for i, c in enumerate(configs)]
    keep = [configs[i] for e, i in est if e <= limit]
    return keep or [configs[min(est)[1]]]


# ---------------------------------------------------------------------------------------------
# launch planning
# ---------------------------------------------------------------------------------------------

def bucket(n: int) -> int:
    """Autotune key: one tuning per size class, not per exact size."""
    return 0 if n < 8192 else (1 if n < 65536 else 2)


SPLIT_ALIGN = 256  # every BLOCK_N divides it, so split boundaries fall on tile boundaries


def plan_split(row_blocks: int, ncols: int, device: torch.device, forced: int) -> tuple[int, int]:
    """(column splits, columns per split) so that row_blocks·split programs fill the GPU about
    twice over, each split ≥ 1024 columns and aligned to whole tiles."""
    sms = num_sms(device)
    if forced > 0:
        split = forced
    elif sms > 0:
        target = 2 * sms
        split = 1 if row_blocks >= target else -(-target // row_blocks)
        split = min(split, max(1, ncols // 1024))  # keep >= 1024 columns per split
    else:
        split = 1
    cols_per_split = -(-ncols // split)
    cols_per_split = -(-cols_per_split // SPLIT_ALIGN) * SPLIT_ALIGN
    split = -(-ncols // cols_per_split)  # no empty split
    return split, cols_per_split


def block_dg(Dg: int, chunk: int) -> tuple[int, bool]:
    """(BLOCK_DG, DG_SINGLE) of the guide dot: the whole padded guide row when it fits in one
    chunk (one dot per tile, no inner loop to stop the column loop's pipelining), else chunks."""
    bd = max(16, triton.next_power_of_2(max(Dg, 1)))
    if bd <= chunk:
        return bd, True
    return max(16, chunk), False


def block_d(D: int, max_single: int, chunk: int) -> tuple[int, bool]:
    """(BLOCK_D, D_SINGLE): the whole padded row when it fits, else chunks of ``chunk``."""
    bd = max(16, triton.next_power_of_2(D))
    if bd <= max_single:
        return bd, True
    return max(16, min(chunk, bd)), False


# FP contraction off: with it, LLVM/ptxas fuse `acc*scale - max` into an FMA in some places and not
# in others, so the forward and the backward would see differently rounded logits (the peaked-row
# weight exp(S_max - lse) would drift from exactly 1). Only scalar FP32 ops are affected: tl.dot
# is an MMA either way. (Ignored by the interpreter, whose numpy ops never contract.)
LAUNCH_OPTS = dict(enable_fp_fusion=False)


def fp32_matmul_uses_tf32() -> bool:
    """Whether torch itself would run a float32 CUDA matmul on TF32 tensor cores right now.

    Reads ``torch.backends.cuda.matmul.fp32_precision`` (torch >= 2.9: already resolved against the
    global ``torch.backends.fp32_precision``, and it never raises), falling back to
    ``torch.get_float32_matmul_precision()`` on older torch. The fallback cannot be the first
    choice: since 2.9 it raises RuntimeError as soon as the new API was used (even alone, e.g.
    ``torch.backends.cuda.matmul.fp32_precision = "tf32"``).
    """
    try:
        precision = torch.backends.cuda.matmul.fp32_precision
    except (AttributeError, RuntimeError):
        precision = None
    if isinstance(precision, str):
        return precision == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


def input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not interpreting() and fp32_matmul_uses_tf32():
        return "tf32"
    if dtype == torch.float32:
        return "ieee"
    return "tf32"  # ignored for 16-bit operands (tensor cores, fp32 accumulation)


def prepare(query, keys, *vectors):
    """Checked, contiguous operands; under the interpreter bfloat16 is upcast exactly (numpy has
    no bfloat16, so the interpreter computes it silently wrong). Integer vectors are made
    contiguous (None stays None)."""
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"triton backend supports float32/float16/bfloat16 inputs, got {query.dtype}")
    if interpreting() and query.dtype == torch.bfloat16:
        query, keys = query.float(), keys.float()
    out = [query.contiguous(), keys.contiguous()]
    out += [None if v is None else v.contiguous() for v in vectors]
    return tuple(out)


def prepare_masks(query, keys, row_groups, col_groups, guide_query, guide_keys, guide_threshold):
    """The optional exclusion masks of the log-sum-exp family, checked and contiguous:
    ``(row_groups, col_groups, guide_query, guide_keys, guide_threshold)``. Groups are int64 and
    come both or neither; the guide comes all three or none, float32 (the statistic dtype; the
    front door already converts, this only guards direct callers), Dg equal on both sides."""
    if (row_groups is None) != (col_groups is None):
        raise ValueError("row_groups and col_groups come together (both or neither)")
    guide = (guide_query, guide_keys, guide_threshold)
    if any(g is None for g in guide) and any(g is not None for g in guide):
        raise ValueError("guide_query, guide_keys and guide_threshold come together (all or none)")
    N, M = query.shape[0], keys.shape[0]
    if row_groups is not None:
        if row_groups.shape != (N,) or col_groups.shape != (M,):
            raise ValueError(f"row_groups/col_groups must be ({N},)/({M},), got "
                             f"{tuple(row_groups.shape)}/{tuple(col_groups.shape)}")
        row_groups = row_groups.to(device=query.device, dtype=torch.int64).contiguous()
        col_groups = col_groups.to(device=query.device, dtype=torch.int64).contiguous()
    if guide_query is not None:
        if (guide_query.dim() != 2 or guide_keys.dim() != 2 or guide_query.shape[0] != N
                or guide_keys.shape[0] != M or guide_query.shape[1] != guide_keys.shape[1]
                or guide_threshold.shape != (N,)):
            raise ValueError(f"guide_query (N, Dg), guide_keys (M, Dg), guide_threshold (N,) expected "
                             f"for N={N}, M={M}; got {tuple(guide_query.shape)}, "
                             f"{tuple(guide_keys.shape)}, {tuple(guide_threshold.shape)}")
        guide_query, guide_keys, guide_threshold = (
            g.to(device=query.device, dtype=torch.float32).contiguous() for g in guide)
    return row_groups, col_groups, guide_query, guide_keys, guide_threshold


@contextlib.contextmanager
def device_guard(device: torch.device):
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield
