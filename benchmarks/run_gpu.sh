#!/usr/bin/env bash
# The one GPU command: environment, build, GPU tests, the headline benchmark, the 2^20 run, the rest
# of the GPU tests, memcheck, further sweep points — in that order of value, under one deadline.
#
#   CK_COMMIT=<sha> bash benchmarks/run_gpu.sh                   # on the GPU machine (OUT set by it)
#   CK_GPU_DRY_RUN=1 PYTHON=.venv/bin/python OUT=/tmp/kit bash benchmarks/run_gpu.sh   # CPU dry run
#
# TOTAL_S (default 490) is the deadline of the whole script: every step gets a cap computed from
# the time left, keeping a reserve for the steps after it, so a slow step cannot starve the more
# valuable ones behind it. Every result lands in $OUT the moment it exists, as at most 7 files:
#   log                    everything printed (unbuffered)
#   tests_cuda.xml         JUnit: CUDA GPU tests that need no Triton compilation
#   tests_triton.xml       JUnit: Triton at the headline sizes, CUDA vs Triton at small shapes
#   tests_rest.xml         JUnit: every remaining GPU test
#   headline.csv           benchmark rows (one schema): clip bf16 N=M=32768 D=512 + roofs
#   huge.csv               N=M=2^20 D=512 bf16 fwd+bwd per backend
#   sweep.csv              further sweep points, with whatever time remains
# so a command killed at its limit still returns everything before it. Wheels brought along in
# .whl/ (make gpu-wheels: inf-cl, open-clip-torch) are installed with --target into a temporary
# folder on PYTHONPATH, never into the image's environment. CK_GPU_DRY_RUN=1 walks every step on
# tiny sizes on the CPU (Triton interpreter; CUDA-only steps report themselves skipped): CI runs it.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT_DIR="${OUT:-${1:-results_gpu}}"
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/log"
: > "$LOG"
PY="${PYTHON:-python3}"
DRY="${CK_GPU_DRY_RUN:-0}"
TOTAL_S="${TOTAL_S:-490}"
START=$(date +%s)
export PYTHONUNBUFFERED=1
export CK_TEST_TIMEOUT="${CK_TEST_TIMEOUT:-90}"   # per test (tests/conftest.py)
SITE=$(mktemp -d /tmp/ck-site.XXXXXX)
trap 'rm -rf "$SITE"' EXIT
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ "$DRY" == "1" ]]; then
  export TRITON_INTERPRET=1   # the dry run's Triton runs in the interpreter on CPU tensors
  BENCH_EXTRA=(--dry-run --quiet)
  REQUIRE_CUDA=0
else
  BENCH_EXTRA=(--quiet)
  REQUIRE_CUDA=1   # a CUDA kernel that failed to build fails its tests instead of skipping
fi

FAILED_STEPS=()
log() { echo "$@" | tee -a "$LOG"; }
# note NAME RC: remember a step that failed (the exit status of the whole script)
note() { (( $2 != 0 )) && FAILED_STEPS+=("$1(exit $2)"); return 0; }
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
# cap WANT RESERVE MIN: seconds this step may take (WANT at most, keeping RESERVE for later
# steps); prints 0 when fewer than MIN seconds would be left for it.
cap() {
  local c=$(( $(left) - $2 ))
  (( c > $1 )) && c=$1
  (( c < $3 )) && c=0
  echo "$c"
}
# run CAP CMD...: the command under a time limit (SIGINT first, so pytest still writes its JUnit
# XML and the harness its rows), its output into the log as it happens.
run() {
  local c=$1; shift
  timeout -s INT -k 15 "$c" "$@" 2>&1 | tee -a "$LOG"
  return "${PIPESTATUS[0]}"
}
step() { log ""; log "== [$(( $(date +%s) - START ))s, $(left)s left] $*"; }
pytest_block() {  # NAME CAP ARGS...: verbose, per-test timeout, JUnit XML
  local name=$1 c=$2; shift 2
  CK_REQUIRE_CUDA=$REQUIRE_CUDA run "$c" "$PY" -m pytest -v -rfE -p no:cacheprovider \
    --junitxml="$OUT_DIR/$name.xml" -o junit_suite_name="$name" "$@"
  local rc=$?
  log "$name: pytest exit $rc"
  note "$name" "$rc"
}

# ---- 1. environment ---------------------------------------------------------------------------
step "1. environment (dry run: $DRY)"
if [[ "$DRY" != "1" ]] && command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
else
  log "nvidia-smi: skipped (dry run or not found)"
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl 2>&1 | tail -3 | tee -a "$LOG"
  log "wheels from .whl/ installed into $SITE: $(ls .whl | tr '\n' ' ')"
else
  log "no .whl/ folder: inf_cl and open_clip providers will be skipped"
fi
run 60 "$PY" - <<'EOF'
import platform, sys
import torch
print("python", sys.version.split()[0], platform.machine(), "| torch", torch.__version__,
      "| CUDA build", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB")
    torch.set_float32_matmul_precision("high")
    print("after set_float32_matmul_precision('high'): torch.backends.cuda.matmul.fp32_precision =",
          getattr(torch.backends.cuda.matmul, "fp32_precision", "n/a"))
else:
    print("no CUDA device visible")
for name in ("inf_cl", "open_clip"):
    import importlib.util
    print(f"{name}:", "importable" if importlib.util.find_spec(name) else "absent")
EOF

# ---- 2. build ---------------------------------------------------------------------------------
step "2. build in place for the visible device's architecture"
C=$(cap 240 270 30)
# The dry run does not recompile an in-place extension that is newer than every native source
# (CI has just built it through `make setup`; a second CPU build would cost minutes and prove
# nothing the first did not). The GPU run always compiles: its extension must have CUDA kernels.
SO=$(ls contrastive_kernels/_C*.so 2>/dev/null | head -1)
if [[ "$DRY" == "1" && -n "$SO" && -z "$(find setup.py csrc -newer "$SO" -type f 2>/dev/null | head -1)" ]]; then
  log "build: dry run, $SO is newer than setup.py and csrc/: not recompiled"
  run 60 "$PY" -m contrastive_kernels info
elif (( C > 0 )); then
  ARCH=$("$PY" -c "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else None; print(f'{c[0]}.{c[1]}' if c else '')" 2>/dev/null)
  log "arch: ${ARCH:-none (CPU build)}; MAX_JOBS=${MAX_JOBS:-$(nproc)}"
  TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-$(nproc)}" run "$C" "$PY" setup.py -q build_ext --inplace
  rc=$?; log "build exit $rc"; note build "$rc"
  run 60 "$PY" -m contrastive_kernels info
else
  log "build: skipped, out of time"
fi

# ---- 3. CUDA GPU tests that need no Triton ----------------------------------------------------
step "3. CUDA GPU tests (no Triton compilation)"
C=$(cap 150 210 20)
if (( C > 0 )); then
  pytest_block tests_cuda "$C" -m gpu tests/test_cuda.py -k "not triton" --maxfail=40
else
  log "tests_cuda: skipped, out of time"
fi

# ---- 4. Triton at the headline sizes, CUDA vs Triton at two small shapes -----------------------
step "4. Triton at N=M=32768 D=512 (bf16, fp32); CUDA vs Triton at small shapes"
C=$(cap 120 160 20)
if (( C > 0 )); then
  pytest_block tests_triton "$C" -m gpu tests/test_triton.py tests/test_cuda.py \
    -k "test_gpu_large or test_agrees_with_triton" --maxfail=20
else
  log "tests_triton: skipped, out of time"
fi

# ---- 5. the headline benchmark ----------------------------------------------------------------
step "5. headline: clip fwd_bwd/fwd/bwd bf16 N=M=32768 D=512 (triton, cuda, dense, inf_cl) + roofs"
C=$(cap 160 70 30)
if (( C > 0 )); then
  run "$C" "$PY" -m contrastive_kernels bench headline --csv "$OUT_DIR/headline.csv" --no-plot \
    --time-budget $(( C - 20 )) "${BENCH_EXTRA[@]}"
  rc=$?; log "headline: exit $rc"; note headline "$rc"
else
  log "headline: skipped, out of time"
fi

# ---- 6. N = M = 2^20 ---------------------------------------------------------------------------
step "6. N=M=2^20 D=512 bf16 fwd+bwd (triton first)"
C=$(cap 120 20 20)
if (( C > 0 )); then
  run "$C" "$PY" -m contrastive_kernels bench huge --csv "$OUT_DIR/huge.csv" --no-plot \
    "${BENCH_EXTRA[@]}"
  rc=$?; log "huge: exit $rc"; note huge "$rc"
else
  log "huge: skipped, out of time"
fi

# ---- 7. the remaining GPU tests, then memcheck on small ragged CUDA cases ----------------------
step "7. remaining GPU tests"
C=$(cap 240 40 20)
if (( C > 0 )); then
  pytest_block tests_rest "$C" -m gpu tests/ --maxfail=40 \
    --deselect tests/test_triton.py::test_gpu_large \
    -k "not (test_cuda and not triton) and not test_agrees_with_triton"
else
  log "tests_rest: skipped, out of time"
fi
C=$(cap 90 30 30)
if (( C > 0 )) && [[ "$DRY" != "1" ]] && command -v compute-sanitizer >/dev/null 2>&1; then
  step "7b. compute-sanitizer memcheck, small ragged CUDA cases"
  CK_REQUIRE_CUDA=1 run "$C" compute-sanitizer --tool memcheck --error-exitcode 99 \
    "$PY" -m pytest -q -x -p no:cacheprovider -m gpu tests/test_cuda.py \
    -k "(matches_float64 and (7x7x7 or 130x37x40 or 257x1x7)) or row_groups or unaligned"
  rc=$?; log "memcheck: exit $rc"; note memcheck "$rc"
else
  log "memcheck: skipped ($( [[ "$DRY" == "1" ]] && echo "dry run" || echo "no time or no compute-sanitizer"))"
fi

# ---- 8. further sweep points ------------------------------------------------------------------
step "8. sweep: clip fwd_bwd N in 8192..65536, bf16 and fp32, D=512"
C=$(cap 600 10 30)
if (( C > 0 )); then
  run "$C" "$PY" -m contrastive_kernels bench gpu-sweep --csv "$OUT_DIR/sweep.csv" --no-plot \
    --time-budget $(( C - 15 )) "${BENCH_EXTRA[@]}"
  rc=$?; log "sweep: exit $rc"; note sweep "$rc"
else
  log "sweep: skipped, out of time"
fi

# ---- acceptance figures -----------------------------------------------------------------------
step "summary"
run 30 "$PY" -m contrastive_kernels bench summary "$OUT_DIR"/headline.csv "$OUT_DIR"/huge.csv \
  "$OUT_DIR"/sweep.csv "$OUT_DIR"/tests_*.xml
log "files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
log "== done in $(( $(date +%s) - START ))s (deadline ${TOTAL_S}s); failed steps: ${FAILED_STEPS[*]:-none}"
(( ${#FAILED_STEPS[@]} == 0 ))
