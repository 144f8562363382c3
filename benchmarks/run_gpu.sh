#!/usr/bin/env bash
# The one GPU script of issues 3 and 4: build, GPU tests (Triton and CUDA), compute-sanitizer on the
# CUDA kernels, the sweep, tuning variants, the N = 2^20 runs. Everything lands in one folder: $OUT
# (the device runner's output folder) or $1 or results_gpu/.
#
#   bash benchmarks/run_gpu.sh                       # all steps (tight in one 10-minute command)
#   STEPS=build,tests,sanitize bash benchmarks/run_gpu.sh          # first command: correctness
#   STEPS=build,sweep,variants,huge bash benchmarks/run_gpu.sh     # second: speed (build: no-op if warm)
#
# A GPU command may run 10 minutes: each step has its own timeout and the sweep a time budget
# computed from what is left (TOTAL_S, default 570 s). Wheels of inf-cl / open-clip-torch brought
# along in .whl/ (pip download --no-deps -d .whl inf-cl open-clip-torch, on a machine with the
# registry) are installed offline first. CK_COMMIT names the commit in the CSV (no .git there).
set -uo pipefail

OUT_DIR="${OUT:-${1:-results_gpu}}"
mkdir -p "$OUT_DIR"
STEPS="${STEPS:-build,tests,sanitize,sweep,variants,huge}"
TOTAL_S="${TOTAL_S:-570}"
PY="${PYTHON:-python}"
cd "$(dirname "$0")/.."

has() { [[ ",$STEPS," == *",$1,"* ]]; }
left() { echo $(( TOTAL_S - SECONDS )); }

main() {
  echo "== $(date -u +%FT%TZ) run_gpu.sh steps=$STEPS out=$OUT_DIR"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
  "$PY" -c "import triton; print('triton', triton.__version__)" || true

  if compgen -G ".whl/*.whl" > /dev/null; then
    echo "== offline wheels"
    "$PY" -m pip install --no-deps --no-index .whl/*.whl 2>&1 | tail -3 || true
  fi

  if has build; then
    echo "== build ($(left)s left)"
    timeout 300 "$PY" -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -5
    echo "build rc=${PIPESTATUS[0]}"
  fi
  "$PY" -m contrastive_kernels info 2>&1 | tail -20 || true

  if has tests; then
    echo "== GPU tests ($(left)s left)"
    # CK_REQUIRE_CUDA=1: a CUDA kernel that failed to build fails the tests instead of skipping them.
    # --maxfail, not -x: a first run on a GPU should show every failing case, not just the first.
    CK_REQUIRE_CUDA=1 timeout "$(( $(left) > 400 ? 240 : 120 ))" "$PY" -m pytest -m gpu -q --maxfail=25 \
      -p no:cacheprovider -rf tests/test_cuda.py tests/test_triton.py 2>&1 | tee "$OUT_DIR/gpu_tests.log" | tail -40
    echo "tests rc=${PIPESTATUS[0]}"
  fi

  if has sanitize; then
    # memcheck + racecheck on small, ragged shapes of the CUDA kernels (every path, masks on all axes)
    if command -v compute-sanitizer >/dev/null 2>&1; then
      for tool in memcheck racecheck; do
        echo "== compute-sanitizer --tool $tool ($(left)s left)"
        CK_REQUIRE_CUDA=1 timeout 150 compute-sanitizer --tool "$tool" --error-exitcode 99 \
          "$PY" -m pytest -m gpu -q -x -p no:cacheprovider tests/test_cuda.py \
          -k "(matches_float64 and (7x7x7 or 130x37x40 or 257x1x7)) or row_groups or unaligned" 2>&1 | tail -15
        echo "sanitize $tool rc=${PIPESTATUS[0]}"
      done
    else
      echo "sanitize: compute-sanitizer not found"
    fi
  fi

  if has sweep; then
    # leave ~150 s for the variants and the 2^20 run
    budget=$(( $(left) - 150 - 40 ))
    (( budget < 60 )) && budget=60
    echo "== sweep (budget ${budget}s, $(left)s left)"
    timeout "$(( budget + 120 ))" "$PY" benchmarks/gpu_sweep.py --out "$OUT_DIR" --budget-s "$budget" 2>&1
    echo "sweep rc=${PIPESTATUS[0]}"
  fi

  if has variants; then
    # host-side alternatives at the acceptance point, to pick the defaults (see NOTES.md)
    for v in "CK_TRITON_BWD=gemm" "CK_TRITON_BWD=fused" "CK_TRITON_BWD=fused CK_TRITON_BWD_MAX_SINGLE_D=512" \
             "CK_TRITON_COL_REDUCE=atomic" "CK_TRITON_DETERMINISTIC=1"; do
      (( $(left) < 90 )) && { echo "variants: out of time before [$v]"; break; }
      tag=$(echo "$v" | tr ' =' '__' | tr 'A-Z' 'a-z')
      echo "== variant [$v] ($(left)s left)"
      env $v timeout 100 "$PY" benchmarks/gpu_sweep.py --out "$OUT_DIR" --tag "$tag" --providers triton \
        --ns 32768 --ds 512 --dtypes bf16 --modes fwd_bwd,bwd,fwd --skip-roof --no-plot --budget-s 60 2>&1 \
        | grep -E "provider=|Error|error" | tail -5
    done
  fi

  if has huge; then
    echo "== N = M = 2^20, D = 512, bf16 fwd+bwd, triton and cuda ($(left)s left)"
    timeout "$(( $(left) > 60 ? $(left) - 10 : 60 ))" "$PY" benchmarks/gpu_sweep.py --out "$OUT_DIR" --tag huge \
      --providers triton,cuda --ns 65536 --ds 512 --dtypes bf16 --modes fwd_bwd --skip-roof --no-plot \
      --huge 1048576 --budget-s 30 2>&1 | grep -E "provider=|Error|error" | tail -5
  fi

  echo "== files"
  ls -la "$OUT_DIR"
  echo "== summary (main sweep)"
  if [[ -f "$OUT_DIR/clip_sweep.csv" ]]; then
    "$PY" - "$OUT_DIR/clip_sweep.csv" <<'EOF'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["mode"] == "fwd_bwd" and r["d"] == "512"
        and r["dtype"] == "bf16" and r["provider"] != "matmul_roof"]
for r in sorted(rows, key=lambda r: (int(r["n"]), r["provider"])):
    print(f'{r["provider"]:8} n={r["n"]:>7} {r["ms_p50"] or "-":>10} ms {r["tflops"] or "-":>8} TF '
          f'{r["pct_roof"] or "-":>5}% roof {r["peak_mem_mb"] or "-":>9} MiB {r["note"][:40]}')
EOF
  fi
  echo "== done in ${SECONDS}s"
}

main 2>&1 | tee "$OUT_DIR/log"
