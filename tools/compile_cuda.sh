#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu with plain nvcc (no torch headers), for sm_80 and sm_90; with
# TORCH_PYTHON set, also syntax-check the torch binding (csrc/cuda/*.cpp).
# Compile only (-c); objects go to a temporary directory that is removed afterwards.
# Exit status: non-zero if any file fails; 0 (with a message) when there is nothing to do.
#   NVCC=...            nvcc to use (default: nvcc on PATH)
#   NVCC_EXTRA_FLAGS=.. extra flags, e.g. "-Xptxas -v" to print register / spill reports
#   TORCH_PYTHON=...    also syntax-check the torch binding csrc/cuda/*.cpp against that torch's headers
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
# The torch-facing binding (csrc/cuda/*.cpp) is compiled only by a CUDA build of the extension, which
# no CPU machine does. With TORCH_PYTHON set to a python whose torch ships its C++ headers (the CPU
# wheel does), syntax-check it against them: -fsyntax-only, host compiler, CUDA runtime headers from
# the nvcc installation. The CPU wheel lacks one generated header (c10/cuda/impl/cuda_cmake_macros.h,
# a list of build macros); an empty stand-in suffices for a syntax check.
if [ -n "${TORCH_PYTHON:-}" ]; then
  torch_inc="$("$TORCH_PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' 2>/dev/null || true)"
  if [ -z "$torch_inc" ] || [ ! -d "$torch_inc/ATen" ]; then
    echo "compile_cuda: FAIL no torch C++ headers through TORCH_PYTHON=$TORCH_PYTHON"
    failed=1
  else
    # nvcc's own include directory (nvcc may be a wrapper script, so ask it rather than its path)
    touch "$tmp/probe.cu"
    cuda_inc="$("$nvcc_bin" --dryrun -c "$tmp/probe.cu" -o "$tmp/probe.o" 2>&1 | sed -n 's/.*INCLUDES="-I\([^" ]*\).*/\1/p' | head -n 1)"
    mkdir -p "$tmp/stub/c10/cuda/impl"
    echo "#pragma once" > "$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
    for f in "$root"/csrc/cuda/*.cpp; do
      rel="${f#"$root"/}"
      cmd=("${CXX:-c++}" -std=c++17 -fsyntax-only -DCK_WITH_CUDA -I"$tmp/stub" -I"$torch_inc"
           -I"$torch_inc/torch/csrc/api/include" -I"$cuda_inc" -I"$root/csrc/cuda" "$f")
      echo "compile_cuda: ${cmd[*]}"
      # torch's own headers warn under -Wall; only errors fail the check
      if "${cmd[@]}" 2>"$tmp/err"; then
        echo "compile_cuda: OK   $rel (syntax, torch $("$TORCH_PYTHON" -c 'import torch; print(torch.__version__)'))"
      else
        grep -E "error" "$tmp/err" | head -20
        echo "compile_cuda: FAIL $rel"
        failed=1
      fi
    done
  fi
fi
exit "$failed"
