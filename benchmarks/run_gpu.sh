#!/usr/bin/env bash
# The one GPU command: correctness of everything the library ships first, then the numbers, under
# one deadline. Steps, in this order (KIT_ORDER below; docs/gpu-kit.md and benchmarks/NOTES.md give
# the per-step time estimate):
#
#   env            nvidia-smi, versions, the wheels brought along in .whl/
#   build          setup.py build_ext --inplace for the visible device's architecture
#   tests_cuda     CUDA C++ GPU tests that need no Triton compilation
#   tests_families every family's GPU tests on Triton: the sync-debug training step first, then
#                  second wave (NT-Xent, SupCon, SigLIP), several launches, no quadratic memory,
#                  determinism, column-reduce modes, CUDA vs Triton at small shapes
#   tests_large    Triton at the headline sizes (N = M = 32768, D = 512) against a blocked reference
#   headline       clip fwd+bwd/fwd/bwd bf16 N = M = 32768, D = 512 vs dense and inf_cl, + roofs
#   huge_triton    N = M = 2^20, D = 512, bf16 fwd+bwd, Triton
#   memcheck       compute-sanitizer memcheck on small ragged CUDA cases (a refusal is reported)
#   huge_cuda      the same 2^20 point on CUDA C++ (its backward is ~30–40 s of dQ traffic)
#   sweep          further sweep points, with whatever time remains
#
#   CK_COMMIT=<sha> TOTAL_S=490 bash benchmarks/run_gpu.sh        # on the GPU machine
#   CK_GPU_DRY_RUN=1 PYTHON=.venv/bin/python OUT=/tmp/kit bash benchmarks/run_gpu.sh   # CPU dry run
#   CK_GPU_PLAN=1 bash benchmarks/run_gpu.sh    # print the step order and pytest selections, exit
#
# TOTAL_S (default 490) is the deadline of the whole script: every step gets a cap computed from
# the time left, keeping a reserve for the steps after it, so a slow step cannot starve the more
# valuable ones behind it. Every result lands in $OUT the moment it exists, as at most 7 files:
#   log                 everything printed (unbuffered)
#   tests_cuda.xml      JUnit of tests_cuda
#   tests_families.xml  JUnit of tests_families
#   tests_large.xml     JUnit of tests_large
#   headline.csv        benchmark rows (one schema): the headline point + roofs
#   huge.csv            N = M = 2^20 rows: Triton, then CUDA C++ if time remained
#   sweep.csv           further sweep points
# so a command killed at its limit still returns everything before it. Wheels brought along in
# .whl/ (make gpu-wheels: inf-cl, open-clip-torch) are installed with --target into a temporary
# folder on PYTHONPATH, never into the image's environment. CK_GPU_DRY_RUN=1 walks every step on
# tiny sizes on the CPU (Triton interpreter; GPU-marked tests are listed as skipped, so the log
# shows what the GPU run will execute and in which order): CI runs it.
set -uo pipefail

cd "$(dirname "$0")/.."

KIT_ORDER=(env build tests_cuda tests_families tests_large headline huge_triton memcheck huge_cuda
           sweep)
# pytest selections (after -m gpu). Files are named in the order they should run: pytest keeps the
# command line's file order (a directory argument would sort them).
SEL_tests_cuda=(tests/test_cuda.py -k "not triton")
SEL_tests_families=(tests/test_no_host_sync.py tests/test_triton.py tests/test_gpu_features.py tests/test_cuda.py
                    --deselect tests/test_triton.py::test_gpu_large -k "not test_cuda or triton")
SEL_tests_large=(tests/test_triton.py -k "test_gpu_large")

if [[ "${CK_GPU_PLAN:-0}" == "1" ]]; then
  echo "order: ${KIT_ORDER[*]}"
  for s in tests_cuda tests_families tests_large; do
    declare -n sel="SEL_$s"
    printf 'select %s:' "$s"; printf ' %q' "${sel[@]}"; echo
  done
  exit 0
fi

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
pytest_block() {  # NAME CAP: verbose, per-test timeout, JUnit XML, the step's selection
  local name=$1 c=$2
  declare -n sel="SEL_$name"
  CK_REQUIRE_CUDA=$REQUIRE_CUDA run "$c" "$PY" -m pytest -v -rfE -p no:cacheprovider \
    --junitxml="$OUT_DIR/$name.xml" -o junit_suite_name="$name" -m gpu --maxfail=40 "${sel[@]}"
  local rc=$?
  log "$name: pytest exit $rc"
  note "$name" "$rc"
}
skipped() { log "$1: skipped, out of time"; }

# ---- the steps --------------------------------------------------------------------------------
# Each: cap WANT RESERVE MIN, where RESERVE is roughly the minimum useful time of the steps after
# it that matter more than its own tail (NOTES.md: "GPU kit: step order and time estimate").

step_env() {
  step "env (dry run: $DRY)"
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
  log "commit: ${CK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
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
}

step_build() {
  step "build in place for the visible device's architecture"
  local C; C=$(cap 240 300 30)
  # The dry run does not recompile an in-place extension that is newer than every native source
  # (CI has just built it through `make setup`; a second CPU build would cost minutes and prove
  # nothing the first did not). The GPU run always compiles: its extension must have CUDA kernels.
  local SO; SO=$(ls contrastive_kernels/_C*.so 2>/dev/null | head -1)
  if [[ "$DRY" == "1" && -n "$SO" && -z "$(find setup.py csrc -newer "$SO" -type f 2>/dev/null | head -1)" ]]; then
    log "build: dry run, $SO is newer than setup.py and csrc/: not recompiled"
  elif (( C > 0 )); then
    local ARCH
    ARCH=$("$PY" -c "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else None; print(f'{c[0]}.{c[1]}' if c else '')" 2>/dev/null)
    log "arch: ${ARCH:-none (CPU build)}; MAX_JOBS=${MAX_JOBS:-$(nproc)}"
    TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-$(nproc)}" run "$C" "$PY" setup.py -q build_ext --inplace
    local rc=$?; log "build exit $rc"; note build "$rc"
  else
    skipped build; return
  fi
  run 60 "$PY" -m contrastive_kernels info
}

test_step() {  # NAME WANT RESERVE MIN TITLE
  step "$5"
  local C; C=$(cap "$2" "$3" "$4")
  if (( C > 0 )); then pytest_block "$1" "$C"; else skipped "$1"; fi
}
step_tests_cuda() { test_step tests_cuda 150 240 20 "CUDA C++ GPU tests (no Triton compilation)"; }
step_tests_families() {
  test_step tests_families 240 150 30 \
    "every family's GPU tests on Triton (sync-debug step first), CUDA vs Triton"
}
step_tests_large() {
  test_step tests_large 90 130 20 "Triton at the headline sizes N=M=32768 D=512 (bf16, fp16, fp32)"
}

step_headline() {
  step "headline: clip fwd_bwd/fwd/bwd bf16 N=M=32768 D=512 (triton, cuda, dense, inf_cl) + roofs"
  local C; C=$(cap 150 40 30)
  if (( C > 0 )); then
    run "$C" "$PY" -m contrastive_kernels bench headline --csv "$OUT_DIR/headline.csv" --no-plot \
      --time-budget $(( C - 20 )) "${BENCH_EXTRA[@]}"
    local rc=$?; log "headline: exit $rc"; note headline "$rc"
  else
    skipped headline
  fi
}

huge() {  # NAME PROVIDER CAP [--append]
  local name=$1 prov=$2 c=$3; shift 3
  run "$c" "$PY" -m contrastive_kernels bench huge --providers "$prov" --csv "$OUT_DIR/huge.csv" \
    --no-plot "$@" "${BENCH_EXTRA[@]}"
  local rc=$?; log "$name: exit $rc"; note "$name" "$rc"
}

step_huge_triton() {
  step "N=M=2^20 D=512 bf16 fwd+bwd, Triton"
  local C; C=$(cap 90 10 20)
  if (( C > 0 )); then huge huge_triton ck.triton "$C"; else skipped huge_triton; fi
}

step_memcheck() {
  local C; C=$(cap 60 10 30)
  if [[ "$DRY" == "1" ]]; then
    step "compute-sanitizer memcheck"; log "memcheck: skipped (dry run)"; return
  fi
  step "compute-sanitizer memcheck, small ragged CUDA cases"
  if ! command -v compute-sanitizer >/dev/null 2>&1; then
    log "memcheck: compute-sanitizer not found on this machine"; return
  fi
  if (( C == 0 )); then skipped memcheck; return; fi
  CK_REQUIRE_CUDA=1 run "$C" compute-sanitizer --tool memcheck --error-exitcode 99 \
    "$PY" -m pytest -q -x -p no:cacheprovider -m gpu tests/test_cuda.py \
    -k "(matches_float64 and (7x7x7 or 130x37x40 or 257x1x7)) or row_groups or unaligned"
  local rc=$?
  # The machine may refuse the sanitizer (no profiling permission, driver mismatch): that is
  # reported as a refusal, not as a memory error of ours.
  if (( rc != 0 )) && grep -qiE "ERR_NVGPUCTRPERM|not supported|permission|Unable to (open|find)|failed to (initialize|launch)" \
      <(tail -40 "$LOG"); then
    log "memcheck: REFUSED by the machine (exit $rc): see the lines above"
  else
    log "memcheck: exit $rc"; note memcheck "$rc"
  fi
}

step_huge_cuda() {
  step "N=M=2^20 D=512 bf16 fwd+bwd, CUDA C++ (after the rest, time permitting)"
  local C; C=$(cap 90 10 40)
  # appended to huge.csv; the roof rows are already there from the Triton step
  if (( C > 0 )); then huge huge_cuda ck.cuda "$C" --append --no-roof; else skipped huge_cuda; fi
}

step_sweep() {
  step "sweep: clip fwd_bwd N in 8192..65536, bf16 and fp32, D=512"
  local C; C=$(cap 600 10 30)
  if (( C > 0 )); then
    run "$C" "$PY" -m contrastive_kernels bench gpu-sweep --csv "$OUT_DIR/sweep.csv" --no-plot \
      --time-budget $(( C - 15 )) "${BENCH_EXTRA[@]}"
    local rc=$?; log "sweep: exit $rc"; note sweep "$rc"
  else
    skipped sweep
  fi
}

for s in "${KIT_ORDER[@]}"; do
  "step_$s"
done

# ---- acceptance figures -----------------------------------------------------------------------
step "summary"
run 30 "$PY" -m contrastive_kernels bench summary "$OUT_DIR"/headline.csv "$OUT_DIR"/huge.csv \
  "$OUT_DIR"/sweep.csv "$OUT_DIR"/tests_*.xml
log "files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
log "== done in $(( $(date +%s) - START ))s (deadline ${TOTAL_S}s); failed steps: ${FAILED_STEPS[*]:-none}"
(( ${#FAILED_STEPS[@]} == 0 ))
