// Raw-pointer launchers of the fused log-sum-exp kernels (docs/internals.md).
//
// This header is deliberately free of torch/ATen: lse_fwd.cu and lse_bwd.cu implement it and compile
// with plain nvcc (tools/compile_cuda.sh), and lse_cuda.cpp (the torch binding) includes it to call
// the launchers. Everything is expressed as raw device pointers, element strides and a stream.
//
// Conventions shared by both launchers
//   S = s·Q·Kᵀ (N×M), s read from `scale` (a device pointer: no host sync).
//   query (N, D) and keys (M, D): row-major with row strides ldq / ldk (elements, >= D); dtype given
//   by `dtype`. Unit stride along D is required.
//   labels: nullptr (positive of row i is column i; requires M >= N) or N int64 values in [0, M).
//   All statistics and gradients are float32 and contiguous.
//   N, M, D >= 1 and < 2^31 (element offsets are computed in int64).
//   Return value: the first CUDA error (launch configuration), cudaSuccess otherwise. Launches are
//   asynchronous on `stream`.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace ck_cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct LseFwdArgs {
  const void* query = nullptr;   // (N, D), dtype
  const void* keys = nullptr;    // (M, D), dtype
  int64_t N = 0, M = 0, D = 0;
  int64_t ldq = 0, ldk = 0;      // row strides in elements
  const float* scale = nullptr;  // device pointer to one float (s > 0)
  const int64_t* labels = nullptr;  // (N,) or nullptr
  float* row_lse = nullptr;      // (N,) out
  float* col_lse = nullptr;      // (M,) out, or nullptr: column LSE not computed
  float* pos = nullptr;          // (N,) out: S[i, l_i]
  // Scratch of at least lse_fwd_workspace_bytes(N, M, col_lse != nullptr, partial_budget_bytes)
  // bytes, 16-byte aligned (may be nullptr when that size is 0). Holds the per-row-block column
  // partials of one row group and, with several groups, the running per-column (max, sum).
  void* workspace = nullptr;
  // Cap on the column partials of one row group, in bytes. 0: the default (2 GiB, but at least
  // 4 CTAs per SM per group). Non-zero: exactly this cap (at least one row block), for tests.
  size_t partial_budget_bytes = 0;
  DType dtype = DType::kFloat32;
  // float32 inputs only: multiply tiles on tensor cores in TF32 (10-bit mantissa operands, float32
  // accumulation). false = exact float32 FFMA path. Ignored for 16-bit inputs.
  bool allow_tf32 = false;
};

struct LseBwdArgs {
  const void* query = nullptr;
  const void* keys = nullptr;
  int64_t N = 0, M = 0, D = 0;
  int64_t ldq = 0, ldk = 0;
  const float* scale = nullptr;
  const int64_t* labels = nullptr;
  const float* row_lse = nullptr;   // (N,); read only when grad_row != nullptr
  const float* col_lse = nullptr;   // (M,); read only when grad_col != nullptr
  const float* grad_row = nullptr;  // (N,) or nullptr (= zero)
  const float* grad_col = nullptr;  // (M,) or nullptr (= zero)
  const float* grad_pos = nullptr;  // (N,) or nullptr (= zero)
  float* grad_query = nullptr;      // (N, D) contiguous out; the launcher zero-fills it first
  float* grad_keys = nullptr;       // (M, D) contiguous out; the launcher zero-fills it first
  DType dtype = DType::kFloat32;
  bool allow_tf32 = false;
  // false: one fused pass; grad_keys accumulated with float32 atomicAdd (run-to-run rounding noise).
  // true: two passes (row-block-owned for grad_query, key-block-owned for grad_keys), no atomics,
  //       bitwise reproducible; costs one extra recomputation of S (8·N·M·D instead of 6·N·M·D).
  bool deterministic = false;
};

// Bytes of scratch lse_fwd needs when the column LSE is asked for (else 0): (G + [G < R])·M·8, with
// R = ceil(N/64) row blocks and G the row blocks per group (all R when they fit the budget).
// Call with the device that will run lse_fwd current (the default budget depends on its SM count).
size_t lse_fwd_workspace_bytes(int64_t N, int64_t M, bool compute_col, size_t partial_budget_bytes = 0);

// row_lse, col_lse (optional), pos. Deterministic (no atomics).
cudaError_t lse_fwd(const LseFwdArgs& args, cudaStream_t stream);

// grad_query = s·G·K, grad_keys = s·Gᵀ·Q with
// G_ij = grad_row_i·exp(S_ij − r_i) + grad_col_j·exp(S_ij − c_j) + grad_pos_i·1[j = l_i].
cudaError_t lse_bwd(const LseBwdArgs& args, cudaStream_t stream);

}  // namespace ck_cuda
