#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu with plain nvcc (no torch headers), for sm_80 and sm_90.
# Compile only (-c); objects go to a temporary directory that is removed afterwards.
# Exit status: non-zero if any file fails; 0 (with a message) when there is nothing to do.
#   NVCC=...            nvcc to use (default: nvcc on PATH)
#   NVCC_EXTRA_FLAGS=.. extra flags, e.g. "-Xptxas -v" to print register / spill reports
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc_bin="${NVCC:-nvcc}"

shopt -s nullglob
sources=("$root"/csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "compile_cuda: no csrc/cuda/*.cu files; nothing to compile"
  exit 0
fi
if ! command -v "$nvcc_bin" >/dev/null 2>&1; then
  echo "compile_cuda: nvcc not found (set NVCC=...); skipping the CUDA compile check"
  exit 0
fi

echo "compile_cuda: $("$nvcc_bin" --version | tail -n 1)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# shellcheck disable=SC2206
extra=(${NVCC_EXTRA_FLAGS:-})
failed=0
for f in "${sources[@]}"; do
  rel="${f#"$root"/}"
  obj="$tmp/$(basename "${f%.cu}").o"
  cmd=("$nvcc_bin" -std=c++17 -O3 -c "$f" -o "$obj" -I"$root/csrc/cuda"
       -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
       -Werror all-warnings "${extra[@]}")
  echo "compile_cuda: ${cmd[*]}"
  if "${cmd[@]}"; then
    echo "compile_cuda: OK   $rel"
  else
    echo "compile_cuda: FAIL $rel"
    failed=1
  fi
done
exit "$failed"
