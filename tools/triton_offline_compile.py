#!/usr/bin/env python
"""Compile Triton launches of the host code for a GPU target, offline (no GPU needed): the full
case matrix, or with --quick a subset of one case per kernel mode (what CI runs).

The Triton kernels are tested numerically under the interpreter on CPU machines, but the
interpreter never runs the GPU compiler: a kernel can pass every interpreter test and still fail to
compile for sm_90 (a ``tl.dot`` shape the MMA lowering rejects, a config that needs more shared
memory than the SM has, a Triton version that changed an API). This script closes that gap
without a GPU:

1. It makes Triton believe the current device is a GPU of the requested architecture (a stand-in
   driver that only answers "which device / stream / target").
2. It runs the real host functions of ``contrastive_kernels/backends/triton`` (``forward.lse_fwd``,
   ``backward.lse_bwd``, ``sigmoid.sigmoid_fwd`` / ``sigmoid_bwd``, ``prefix.*_prefix_fwd/bwd``,
   ``soft_xent.soft_xent_fwd/bwd``) on
   CPU tensors for a matrix of cases (dtypes, D resident vs chunked, labels, exclusion and class
   positives, the in-tile same-group and guide masks, column modes, backward modes, the prefix
   (Matryoshka) families, distillation's soft-target family, round and awkward sizes), with the
   host planning as on an H100 (132 SMs, so column splits and atomic dQ appear as they would
   there).
3. Every kernel launch is replaced by ``warmup``: Triton specialises on the real arguments exactly as
   in a launch and compiles every autotune config down to a cubin (bundled ptxas), launching
   nothing. The host's follow-up torch work (merges, the cuBLAS part of the gemm backward) runs on
   the CPU tensors and is irrelevant here.
4. For each distinct compiled kernel it reads registers and spill bytes (``cuobjdump
   --dump-resource-usage``) and the dynamic shared memory from Triton's metadata, and fails when a
   kernel did not compile or needs more shared memory than the target allows per block.

Usage (set TRITON_INTERPRET=0; the script does it for you):

    python tools/triton_offline_compile.py                 # the full matrix for sm_90
    python tools/triton_offline_compile.py --quick         # one case per kernel mode (CI)
    make triton-check TRITON_CHECK_ARGS="--quick --strict" # the same through the dev venv
    python tools/triton_offline_compile.py --arch 80 --csv out.csv

Exit status: 0 when everything compiled and fits; 1 otherwise. When triton's NVIDIA backend is
missing: 0 with a message, or 1 with ``--strict`` (CI).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

# Must precede every triton import: the kernel module otherwise switches to the interpreter on a
# machine without CUDA, and interpreter launches compile nothing.
os.environ["TRITON_INTERPRET"] = "0"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Opt-in maximum dynamic shared memory per block (CUDA programming guide, compute capabilities).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
H100_SMS = 132


@dataclass
class Case:
    name: str
    n: int
    m: int
    d: int
    dtype: str                       # float32 | float16 | bfloat16
    labels: bool = False
    compute_col: bool = True
    grads: str = "row,col,pos"       # which upstream gradients are non-None
    tuning: dict = field(default_factory=dict)
    fp32_precision: str = "high"     # torch.set_float32_matmul_precision (tf32 vs ieee dots)
    family: str = "lse"              # lse | sigmoid | prefix_lse | prefix_sigmoid | soft_xent
    exclude_self: bool = False       # lse: the self pair left out (NT-Xent, SupCon)
    classes: bool = False            # class positives (SupCon) / equal-label positives (SigLIP)
    groups: bool = False             # lse: same-group exclusion (row_groups / col_groups)
    guide_dg: int = 0                # lse: guided false-negative mask with a (·, Dg) guide; 0: none
    dims: tuple = ()                 # prefix_*: the Matryoshka prefix dimensions
    prefix_scales: bool = True       # prefix_*: per-row/per-column factors (cosine at every prefix)
    teacher_d: int = 0               # soft_xent: the teacher's feature dimension
    teacher_dtype: str = ""          # soft_xent: the teacher's dtype ("" = the student's)
    teacher_grad: bool = True        # soft_xent: the teacher's gradients too


def cases(quick: bool) -> list[Case]:
    """The launch matrix. Sizes matter only through Triton's specialisation (multiples of 16 or
    not, equal to 1) and the host's plans (resident vs chunked D, splits, slabs)."""
    out: list[Case] = []
    for dt in ("bfloat16", "float32", "float16"):
        # the symmetric CLIP loss at a round size: forward with column stats, auto backward
        out.append(Case(f"clip-{dt}-d64", 4096, 4096, 64, dt))            # D resident, fused bwd
        out.append(Case(f"clip-{dt}-d512", 4096, 4096, 512, dt))          # D chunked, gemm bwd
        if quick:
            continue
        out.append(Case(f"awkward-{dt}-d37", 300, 200, 37, dt, labels=True))
        out.append(Case(f"awkward-{dt}-d130", 300, 1000, 130, dt))
        out.append(Case(f"atomic-cols-{dt}", 4096, 4096, 512, dt, tuning={"col_reduce": "atomic"}))
        out.append(Case(f"two-pass-{dt}", 4096, 4096, 128, dt, tuning={"deterministic": True}))
        out.append(Case(f"fused-chunked-{dt}", 4096, 4096, 512, dt, tuning={"bwd_mode": "fused"}))
        out.append(Case(f"rows-only-{dt}", 4096, 4096, 256, dt, compute_col=False, grads="row,pos",
                        labels=True))
    out.append(Case("clip-float32-ieee", 4096, 4096, 256, "float32", fp32_precision="highest"))
    # the second-wave families: self-excluded class positives (SupCon), NT-Xent's exclusion with
    # labels, the sigmoid family (diagonal and classes), at the resident and the chunked D
    for d in (128, 512):
        out.append(Case(f"supcon-bfloat16-d{d}", 4096, 4096, d, "bfloat16", exclude_self=True,
                        classes=True, compute_col=False, grads="row,pos"))
        out.append(Case(f"siglip-bfloat16-d{d}", 4096, 4096, d, "bfloat16", family="sigmoid",
                        grads="row"))
    if not quick:
        for dt in ("float32", "float16"):
            out.append(Case(f"ntxent-{dt}", 4096, 4096, 128, dt, exclude_self=True, labels=True,
                            compute_col=False, grads="row,pos"))
            out.append(Case(f"siglip-classes-{dt}", 4096, 4096, 256, dt, family="sigmoid",
                            classes=True, grads="row"))
            out.append(Case(f"siglip-two-pass-{dt}", 4096, 4096, 128, dt, family="sigmoid",
                            grads="row", tuning={"deterministic": True}))
    # the in-tile masks (same-group exclusion, guided false negatives): the guide dot in one chunk
    # (Dg ≤ guide_chunk_d) and in a K-loop (Dg = 384), forward + fused / two-pass / gemm backward
    out.append(Case("masked-bfloat16-d128", 4096, 4096, 128, "bfloat16", exclude_self=True,
                    groups=True, guide_dg=64))
    out.append(Case("masked-two-pass-bfloat16-d512-dg384", 4096, 4096, 512, "bfloat16", classes=True,
                    groups=True, guide_dg=384, tuning={"deterministic": True}))
    if not quick:
        for dt in ("float32", "float16"):
            out.append(Case(f"masked-{dt}-d64", 4096, 4096, 64, dt, labels=True, groups=True,
                            guide_dg=64))
            out.append(Case(f"masked-two-pass-{dt}-d128-dg384", 4096, 4096, 128, dt,
                            exclude_self=True, guide_dg=384, tuning={"deterministic": True}))
        out.append(Case("masked-atomic-cols-bfloat16", 4096, 4096, 256, "bfloat16", groups=True,
                        guide_dg=32, tuning={"col_reduce": "atomic"}))
        out.append(Case("masked-gemm-bfloat16", 4096, 4096, 512, "bfloat16", labels=True,
                        groups=True, guide_dg=64))
    # the prefix (Matryoshka) families: masked log-sum-exp with every mask and the per-prefix
    # factors, and the sigmoid family, at the GPU test's D = 768 with five prefixes
    mrl = (64, 128, 256, 512, 768)
    out.append(Case("prefix-masked-bfloat16-d768", 4096, 4096, 768, "bfloat16", labels=True,
                    exclude_self=True, groups=True, guide_dg=64, family="prefix_lse", dims=mrl))
    out.append(Case("prefix-siglip-bfloat16-d768", 4096, 4096, 768, "bfloat16",
                    family="prefix_sigmoid", grads="row", dims=mrl))
    if not quick:
        for dt in ("float32", "float16"):
            out.append(Case(f"prefix-clip-{dt}-d256", 4096, 4096, 256, dt, family="prefix_lse",
                            dims=(32, 64, 256), prefix_scales=False))
            out.append(Case(f"prefix-supcon-{dt}-d100", 300, 300, 100, dt, family="prefix_lse",
                            exclude_self=True, classes=True, compute_col=False, grads="row,pos",
                            dims=(7, 33, 100)))
            out.append(Case(f"prefix-siglip-classes-{dt}-d256", 4096, 4096, 256, dt,
                            family="prefix_sigmoid", classes=True, grads="row", dims=(64, 256)))
    # the soft-target family (distillation): a student and a teacher tile side by side, the
    # teacher wider (both feature rows resident or chunked), a frozen teacher, a float32 teacher
    out.append(Case("distill-bfloat16-d512-dt768", 4096, 4096, 512, "bfloat16", family="soft_xent",
                    teacher_d=768))
    if not quick:
        out.append(Case("distill-float32-d128", 4096, 4096, 128, "float32", family="soft_xent",
                        teacher_d=128))
        out.append(Case("distill-frozen-bfloat16-d200-dt96", 300, 1000, 200, "bfloat16",
                        family="soft_xent", teacher_d=96, teacher_grad=False, compute_col=False,
                        grads="row"))
        out.append(Case("distill-mixed-bfloat16-d256", 4096, 4096, 256, "bfloat16",
                        family="soft_xent", teacher_d=256, teacher_dtype="float32"))
    if quick:
        out.append(Case("atomic-cols-bfloat16", 4096, 4096, 512, "bfloat16",
                        tuning={"col_reduce": "atomic"}))
        out.append(Case("two-pass-bfloat16", 4096, 4096, 128, "bfloat16",
                        tuning={"deterministic": True}))
    return out


class _TargetOnlyDriver:
    """Answers what Triton's JIT asks of a driver before a launch, for a GPU that is not here."""

    def __init__(self, target):
        self._target = target

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self._target

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def get_device_interface(self):
        raise RuntimeError("offline compile: no device interface (nothing may launch)")

    def get_benchmarker(self):
        raise RuntimeError("offline compile: nothing may be benchmarked")

    def map_python_to_cpp_type(self, ty):
        from triton.backends.nvidia.driver import ty_to_cpp
        return ty_to_cpp(ty)


@dataclass
class Compiled:
    kernel: str
    case: str
    constexprs: str
    num_warps: int
    num_stages: int
    shared: int
    regs: int = -1
    stack: int = -1
    key: str = ""


class _CompileInsteadOfLaunch:
    """Stands in for a (possibly autotuned) kernel object: ``k[grid](*args, **kw)`` compiles every
    config for the current target and records the results instead of launching."""

    def __init__(self, name, inner, sink):
        self.name, self.inner, self.sink = name, inner, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if not hasattr(self.inner, "configs"):  # a plain JITFunction
                self.sink(self.name, self.inner.warmup(*args, grid=grid, **kwargs), kwargs)
                return
            # an Autotuner: every config that survives its pruning, as a launch would benchmark
            self.inner.nargs = dict(zip(self.inner.arg_names, args))
            configs = self.inner.prune_configs(kwargs)
            self.inner.nargs = None
            for cfg in configs:
                compiled = self.inner.fn.warmup(*args, grid=grid, **kwargs, **cfg.all_kwargs())
                self.sink(self.name, compiled, {**kwargs, **cfg.kwargs})
        return launch


def _resource_usage(cubin: bytes, cuobjdump: str) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True,
                             text=True, check=True).stdout
    finally:
        os.unlink(path)
    reg = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return (int(reg.group(1)) if reg else -1, int(stack.group(1)) if stack else -1)


def _find_cuobjdump() -> str | None:
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(bundled):
        return bundled
    return shutil.which("cuobjdump")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability ×10 (default 90)")
    ap.add_argument("--quick", action="store_true", help="a reduced case list (CI)")
    ap.add_argument("--csv", help="write one row per compiled kernel here")
    ap.add_argument("--only", help="run only cases whose name contains this")
    ap.add_argument("--strict", action="store_true",
                    help="fail (instead of skipping) when triton's NVIDIA backend is missing (CI)")
    args = ap.parse_args(argv)

    try:
        import torch
        import triton
        from triton.backends.compiler import GPUTarget
        import triton.backends.nvidia.compiler  # noqa: F401  (the NVIDIA backend and its ptxas)
    except Exception as e:  # pragma: no cover - depends on the installed triton
        print(f"triton_offline_compile: triton's NVIDIA backend is not importable ({e}); "
              + ("failing (--strict)" if args.strict else "skipping"))
        return 1 if args.strict else 0
    from triton.runtime.driver import driver

    from contrastive_kernels.backends.triton import (backward, forward, prefix, sigmoid, soft_xent,
                                                     tuning)

    cuobjdump = _find_cuobjdump()
    limit = SMEM_LIMIT.get(args.arch, 99 * 1024)
    driver.set_active(_TargetOnlyDriver(GPUTarget("cuda", args.arch, 32)))
    tuning.num_sms = lambda device: H100_SMS  # plan splits / launches as on an H100
    tuning.smem_limit = lambda device: limit     # and prune autotune configs for the target
    print(f"triton_offline_compile: triton {triton.__version__}, torch {torch.__version__}, "
          f"target sm_{args.arch}, shared-memory limit {limit} B, cuobjdump: {cuobjdump or 'none'}")

    seen: dict[str, Compiled] = {}
    current = {"case": ""}

    def record(name, k, kwargs):
        consts = {a: b for a, b in kwargs.items() if a.isupper()}
        key = k.hash if hasattr(k, "hash") else str(id(k))
        if key in seen:
            return
        md = k.metadata
        c = Compiled(name, current["case"], " ".join(f"{a}={b}" for a, b in sorted(consts.items())),
                     md.num_warps, md.num_stages, md.shared, key=key)
        if cuobjdump and "cubin" in k.asm:
            c.regs, c.stack = _resource_usage(k.asm["cubin"], cuobjdump)
        seen[key] = c

    kernels = [(forward, "_lse_fwd_kernel"), (forward, "_lse_merge_kernel"), (backward, "_bwd_kernel"),
               (sigmoid, "_sigmoid_fwd_kernel"), (prefix, "_prefix_fwd_kernel"),
               (prefix, "_prefix_bwd_kernel"), (soft_xent, "_soft_xent_fwd_kernel"),
               (soft_xent, "_soft_xent_bwd_kernel")]
    originals = {(mod, n): getattr(mod, n) for mod, n in kernels}
    for (mod, n), k in originals.items():
        setattr(mod, n, _CompileInsteadOfLaunch(n.strip("_"), k, record))

    failures: list[str] = []
    t0 = time.time()
    old_prec = torch.get_float32_matmul_precision()
    try:
        for case in cases(args.quick):
            if args.only and args.only not in case.name:
                continue
            current["case"] = case.name
            dtype = getattr(torch, case.dtype)
            torch.set_float32_matmul_precision(case.fp32_precision)
            tc = time.time()
            try:
                q = torch.randn(case.n, case.d).to(dtype)
                k = torch.randn(case.m, case.d).to(dtype)
                s = torch.tensor(10.0)
                lab = torch.randint(0, case.m, (case.n,)) if case.labels else None
                with tuning.tuning(**case.tuning):
                    rc = torch.randint(0, 4, (case.n,)) if case.classes else None
                    cc = torch.randint(0, 4, (case.m,)) if case.classes else None
                    g = case.grads.split(",")
                    kk = len(case.dims)
                    r_f = torch.rand(case.n, kk) + 0.5 if case.prefix_scales and kk else None
                    c_f = torch.rand(case.m, kk) + 0.5 if case.prefix_scales and kk else None
                    if case.family == "prefix_sigmoid":
                        b = torch.tensor(-10.0)
                        pa = (q, k, s, b, case.dims, r_f, c_f, rc, cc, not case.classes)
                        prefix.sigmoid_prefix_fwd(*pa)
                        prefix.sigmoid_prefix_bwd(*pa, torch.ones(kk, case.n))
                    elif case.family == "soft_xent":
                        t_dtype = getattr(torch, case.teacher_dtype or case.dtype)
                        ta = torch.randn(case.n, case.teacher_d).to(t_dtype)
                        tb = torch.randn(case.m, case.teacher_d).to(t_dtype)
                        lse = (torch.zeros(case.n), torch.zeros(case.m))
                        soft_xent.soft_xent_fwd(q, k, s, ta, tb, s, *lse, case.compute_col)
                        # the cross's and the student log-sum-exp's upstream gradients alike
                        gr = torch.ones(case.n) if "row" in g else None
                        gc = torch.ones(case.m) if "col" in g and case.compute_col else None
                        soft_xent.soft_xent_bwd(
                            q, k, s, ta, tb, s, *lse, lse[0],
                            lse[1] if case.compute_col else torch.zeros(0), gr, gc, gr, gc,
                            case.teacher_grad)
                    elif case.family == "sigmoid":
                        b = torch.tensor(-10.0)
                        sigmoid.sigmoid_fwd(q, k, s, b, rc, cc, not case.classes)
                        sigmoid.sigmoid_bwd(q, k, s, b, rc, cc, not case.classes, torch.ones(case.n))
                    else:
                        masks = {}
                        if case.groups:
                            masks.update(row_groups=torch.randint(0, 64, (case.n,)),
                                         col_groups=torch.randint(0, 64, (case.m,)))
                        if case.guide_dg:
                            masks.update(guide_query=torch.randn(case.n, case.guide_dg),
                                         guide_keys=torch.randn(case.m, case.guide_dg),
                                         guide_threshold=torch.zeros(case.n))
                        if case.family == "prefix_lse":
                            pa = (q, k, s, case.dims, r_f, c_f, lab, rc, cc, case.exclude_self)
                            prefix.lse_prefix_fwd(*pa, case.compute_col, **masks)
                            prefix.lse_prefix_bwd(
                                *pa, torch.zeros(kk, case.n),
                                torch.zeros(kk, case.m if case.compute_col else 0),
                                torch.ones(kk, case.n) if "row" in g else None,
                                torch.ones(kk, case.m) if "col" in g and case.compute_col else None,
                                torch.ones(kk, case.n) if "pos" in g else None, **masks)
                        else:
                            forward.lse_fwd(q, k, s, lab, rc, cc, case.exclude_self, case.compute_col,
                                            **masks)
                            backward.lse_bwd(
                                q, k, s, lab, rc, cc, case.exclude_self, torch.zeros(case.n),
                                torch.zeros(case.m if case.compute_col else 0),
                                torch.ones(case.n) if "row" in g else None,
                                torch.ones(case.m) if "col" in g and case.compute_col else None,
                                torch.ones(case.n) if "pos" in g else None, **masks)
                print(f"  case {case.name:<28} ok   {time.time() - tc:6.1f} s")
            except Exception as e:
                msg = f"{case.name}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
                failures.append(msg)
                print(f"  case {case.name:<28} FAIL {msg}")
    finally:
        for (mod, n), k in originals.items():
            setattr(mod, n, k)
        torch.set_float32_matmul_precision(old_prec)

    rows = sorted(seen.values(), key=lambda c: (c.kernel, c.case, c.num_warps, c.num_stages))
    print(f"\n{'kernel':<16} {'warps':>5} {'stages':>6} {'regs':>5} {'spill B':>7} {'smem B':>7}  case / constexprs")
    for c in rows:
        flag = ""
        if c.shared > limit:
            flag = "  <-- exceeds the shared-memory limit"
            failures.append(f"{c.kernel} ({c.case}, warps {c.num_warps}, stages {c.num_stages}): "
                            f"{c.shared} B shared memory > {limit} B")
        print(f"{c.kernel:<16} {c.num_warps:>5} {c.num_stages:>6} {c.regs:>5} {c.stack:>7} {c.shared:>7}  "
              f"{c.case}: {c.constexprs}{flag}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["triton", "arch", "kernel", "case", "num_warps", "num_stages", "regs",
                        "spill_bytes", "shared_bytes", "constexprs"])
            for c in rows:
                w.writerow([triton.__version__, args.arch, c.kernel, c.case, c.num_warps, c.num_stages,
                            c.regs, c.stack, c.shared, c.constexprs])
    spilled = sum(1 for c in rows if c.stack > 0)
    print(f"\ntriton_offline_compile: {len(rows)} kernels compiled for sm_{args.arch} in "
          f"{time.time() - t0:.0f} s; {spilled} spill; {len(failures)} failure(s)")
    for f in failures:
        print(f"  FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
