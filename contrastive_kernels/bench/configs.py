"""Named configurations of the one harness: what the CLI sweep, the GPU kit and CPU tuning run.

Each configuration turns the command-line options into points (op, N, D, dtype, mode, providers)
and defaults (repeats, warm-up, memory). Options given on the command line override a
configuration's defaults. ``--dry-run`` shrinks any configuration to tiny sizes on the CPU (the GPU
kit's plumbing check; Triton then needs ``TRITON_INTERPRET=1``, which the kit's dry run sets).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional

from .providers import PEERS, canonical
from .runner import Point

CPU_NS = (1024, 2048, 4096, 8192, 16384)
CUDA_NS = (4096, 8192, 16384, 32768, 65536)
QUICK_NS = (256, 512)
HEADLINE = dict(n=32768, d=512, dtype="bfloat16")
HUGE_N = 1 << 20


@dataclass
class Config:
    name: str
    help: str
    build: Callable  # (args, device) -> list[Point]
    repeats: Optional[int] = None
    warmup: Optional[int] = None
    memory: bool = True
    timer: str = "auto"
    minutes: str = ""  # rough run time, for --list
    defaults: dict = field(default_factory=dict)


def _default_providers(op: str, device) -> list:
    """Every peer of the op and every fused backend that can run on this device (not reference)."""
    if device.type == "cpu":  # inf-cl's kernels need CUDA tensors
        return [p for p in PEERS[op] if p != "inf_cl"] + ["ck.chunked", "ck.cpu"]
    ours = ["ck.triton", "ck.cuda", "ck.chunked"] if op == "clip" else ["ck.triton", "ck.chunked"]
    return list(PEERS[op]) + ours  # the cuda backend has the plain log-sum-exp op only


def _providers(args, op, device, fallback=None):
    if args.providers:
        return [canonical(p.strip()) for p in args.providers.split(",") if p.strip()]
    return list(fallback) if fallback else _default_providers(op, device)


def _dtype(args, device, default=None):
    return args.dtype or default or ("bfloat16" if device.type == "cuda" else "float32")


def _sweep(args, device):
    ns = args.n or (QUICK_NS if args.quick else (CUDA_NS if device.type == "cuda" else CPU_NS))
    modes = args.mode or ["fwd_bwd"]
    prov = _providers(args, args.op, device)
    return [Point(args.op, n, args.d or 256, _dtype(args, device), m, prov)
            for m in modes for n in ns]


def _headline(args, device):
    prov = _providers(args, "clip", device, ["ck.triton", "ck.cuda", "dense", "inf_cl"])
    modes = args.mode or ["fwd_bwd", "fwd", "bwd"]
    n = (args.n or [HEADLINE["n"]])[0]
    return [Point("clip", n, args.d or HEADLINE["d"], _dtype(args, device, HEADLINE["dtype"]), m, prov)
            for m in modes]


def _huge(args, device):
    prov = _providers(args, "clip", device, ["ck.triton", "ck.cuda"])
    n = (args.n or [HUGE_N])[0]
    # autotune at 65536 (the same autotune bucket): tuning at 2^20 would take minutes
    return [Point("clip", n, args.d or HEADLINE["d"], _dtype(args, device, "bfloat16"), "fwd_bwd",
                  [p], warmup_n=min(n, 65536)) for p in prov]


def _gpu_sweep(args, device):
    prov = _providers(args, "clip", device, ["ck.triton", "ck.cuda", "dense", "inf_cl"])
    ns = args.n or [8192, 16384, 65536]
    dtypes = [args.dtype] if args.dtype else ["bfloat16", "float32"]
    return [Point("clip", n, args.d or HEADLINE["d"], dt, "fwd_bwd", prov)
            for dt, n in itertools.product(dtypes, ns)]


# CPU tile sizes of csrc/cpu (CK_CPU_BLOCK_ROWS × CK_CPU_BLOCK_COLS), tried at one point.
_CPU_TILES = list(itertools.product((256, 512, 1024), (256, 512)))


def _cpu_tune(args, device):
    n = (args.n or [8192])[0]
    pts = []
    for rows, cols in _CPU_TILES:
        pts.append(Point("clip", n, args.d or 256, _dtype(args, device), "fwd_bwd", ["ck.cpu"],
                         env={"CK_CPU_BLOCK_ROWS": rows, "CK_CPU_BLOCK_COLS": cols},
                         tag=f"rows={rows},cols={cols}"))
    return pts


def _bf16(args, device):
    """bfloat16 against float32 in one run (issue 25): torch.mm and the clip loss on the native CPU
    kernels, the mm points first so that both ratios come from the same minutes of the machine."""
    n = (args.n or [8192])[0]
    d = args.d or 256
    prov = _providers(args, "clip", device, ["ck.cpu"])
    mms = [Point("mm", n, d, dt, "mm", ["torch.mm"]) for dt in ("bfloat16", "float32")]
    return mms + [Point("clip", n, d, dt, "fwd_bwd", prov) for dt in ("bfloat16", "float32")]


# Host-side alternatives of the Triton backend at the headline point (benchmarks/NOTES.md).
_TRITON_VARIANTS = [
    ("bwd=gemm", {"CK_TRITON_BWD": "gemm"}),
    ("bwd=fused", {"CK_TRITON_BWD": "fused"}),
    ("bwd=fused,single_d=512", {"CK_TRITON_BWD": "fused", "CK_TRITON_BWD_MAX_SINGLE_D": 512}),
    ("col=atomic", {"CK_TRITON_COL_REDUCE": "atomic"}),
    ("deterministic", {"CK_TRITON_DETERMINISTIC": 1}),
]


def _gpu_variants(args, device):
    n = (args.n or [HEADLINE["n"]])[0]
    return [Point("clip", n, args.d or HEADLINE["d"], _dtype(args, device, "bfloat16"), "fwd_bwd",
                  ["ck.triton"], env=env, tag=tag) for tag, env in _TRITON_VARIANTS]


def _family(op, cpu_n, default_d):
    def build(args, device):
        ns = args.n or (QUICK_NS if args.quick else cpu_n)
        prov = _providers(args, op, device)
        return [Point(op, n, args.d or default_d, _dtype(args, device), m, prov)
                for m in (args.mode or ["fwd_bwd"]) for n in ns]
    return build


CONFIGS = {c.name: c for c in [
    Config("sweep", "clip (or --op) fwd+bwd vs N against dense and the peers: the main job",
           _sweep, minutes="~9 min on 2 CPU cores; --quick: ~1 min"),
    Config("headline", "GPU acceptance point: clip fwd_bwd/fwd/bwd, bf16, N=M=32768, D=512",
           _headline, repeats=10, warmup=2, minutes="~1.5 min on an H100 (estimate)"),
    Config("huge", "one clip fwd+bwd at N=M=2^20, D=512, bf16 per GPU backend (triton first)",
           _huge, repeats=1, warmup=0, timer="events", minutes="~10-30 s per backend (estimate)"),
    Config("gpu-sweep", "clip fwd_bwd at N in 8192..65536, bf16 and fp32, D=512 (GPU)",
           _gpu_sweep, repeats=5, warmup=1, minutes="~2-4 min on an H100 (estimate)"),
    Config("gpu-variants", "Triton host-choice variants at the headline point",
           _gpu_variants, repeats=5, warmup=1, memory=False, minutes="~1 min on a GPU (estimate)"),
    Config("cpu-tune", "tile sizes of the native CPU kernels (CK_CPU_BLOCK_ROWS/COLS)",
           _cpu_tune, repeats=5, warmup=1, memory=False, minutes="~3 min at N=8192 (estimate)"),
    Config("bf16", "bf16 vs fp32 on the CPU: torch.mm and clip fwd_bwd (ck.cpu), N=M=8192, D=256",
           _bf16, repeats=5, warmup=1, memory=False, minutes="~1 min on 2 CPU cores"),
    Config("siglip", "sigmoid loss fwd+bwd vs N: ck vs open_clip's SigLipLoss and dense",
           _family("siglip", (1024, 2048, 4096, 8192), 256), minutes="~4 min on 2 CPU cores"),
    Config("supcon", "SupCon fwd+bwd vs N: ck vs pytorch-metric-learning and dense",
           _family("supcon", (1024, 2048, 4096, 8192), 128), minutes="~4 min on 2 CPU cores"),
    Config("ntxent", "SimCLR NT-Xent fwd+bwd vs N (2N views): ck vs pytorch-metric-learning",
           _family("ntxent", (512, 1024, 2048, 4096), 128),
           minutes="~9 min on 2 CPU cores, most of it PML at N=512"),
]}


def dry_run(points: list) -> list:
    """The same points at tiny sizes on the CPU: N → 64 or 128, D → 32 (the plumbing, not speed)."""
    small = []
    seen = set()
    for pt in points:
        n = 128 if pt.n >= 32768 else 64
        key = (pt.op, n, pt.dtype, pt.mode, tuple(pt.providers), pt.tag)
        if key in seen:
            continue
        seen.add(key)
        small.append(Point(pt.op, n, 32, pt.dtype, pt.mode, pt.providers, env=pt.env, tag=pt.tag,
                           warmup_n=min(pt.warmup_n, 32) if pt.warmup_n else 0))
    return small
