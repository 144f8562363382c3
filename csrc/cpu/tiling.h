// Work split and BLAS plumbing shared by every CPU kernel (LSE and sigmoid families).
//
// Every kernel has the same shape: the N×M logit matrix S = s·Q·Kᵀ is produced one rows×cols tile
// at a time by BLAS into a per-thread buffer, consumed by an element-wise pass (lse_tiles.cpp,
// sigmoid_tiles.cpp) and dropped, so memory stays O((N+M)·D).
//
// One at::parallel_for starts one task per thread; the tasks pull row blocks of Q from a shared
// atomic counter (dynamic scheduling: the machine is shared, so a static split would wait for the
// slowest core). A task owns its row block outright (row statistics, grad_query rows: no
// synchronisation, no false sharing) and sweeps all column tiles of K in the same order as the
// other tasks, so the K tile just read by one core is usually still in the shared L3 for the
// other.
// Per-column results (column statistics, grad_keys) go to per-task buffers merged at the end:
// O(threads·M·D) extra memory, never O(N·M). BLAS runs single-threaded inside each task (nested
// OpenMP regions are inactive), so all parallelism is ours and the tiles stay core-local.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace ck::cpu {

// GEMM on row-major operands: C[m×n] = alpha·op(A)·op(B) + beta·C, op(X) = Xᵀ when trans_X.
// BLAS through ATen (MKL in PyTorch's x86 wheels, whatever torch was built with elsewhere) on
// non-owning views of our buffers. The wrapping costs a few µs per call against ~1 ms of GEMM per
// tile: no measurable difference from calling MKL's sgemm_ directly (tried).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* A,
          int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    at::Tensor t = at::from_blob(const_cast<T*>(p), {trans ? cols : rows, trans ? rows : cols},
                                 {ld, 1}, opts);
    return trans ? t.t() : t;
  };
  at::Tensor c = at::from_blob(C, {m, n}, {ldc, 1}, opts);
  at::addmm_out(c, c, view(A, m, k, lda, trans_a), view(B, k, n, ldb, trans_b), beta, alpha);
}

// A positive integer from the environment, or `fallback` when the variable is unset or empty.
inline int64_t env_int(const char* name, int64_t fallback) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && v > 0, name, " must be a positive integer, got '", env,
              "'");
  return v;
}

struct Tiling {
  int64_t rows;   // row block of Q owned by one task at a time
  int64_t cols;   // column tile of K
  int64_t tasks;  // parallel tasks (≤ threads, ≤ row blocks)
  int64_t blocks;
};

// Tile sizes. BLAS repacks both operands on every call, a cost ∝ (1/rows + 1/cols) of the GEMM
// (~5% at 512×256), so larger tiles amortise it; the element-wise pass wants the rows×cols tile in
// L2. Measured with `contrastive-kernels bench cpu-tune` on a 2-core AVX-512 EPYC with 1 MiB L2
// (D = 128…512, N = 4096…16384): 256…1024 rows × 256…512 columns are all within the ±5%
// run-to-run noise; 512×256 (a 512 KiB float tile) was the most consistent, 128-row blocks and
// 1024-column tiles were measurably slower. CK_CPU_BLOCK_ROWS / CK_CPU_BLOCK_COLS override the
// defaults exactly (tuning, tests).
constexpr int64_t kDefaultRows = 512;
constexpr int64_t kDefaultCols = 256;

inline Tiling make_tiling(int64_t N, int64_t M) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t cols = std::min(env_int("CK_CPU_BLOCK_COLS", kDefaultCols), M);
  int64_t rows = env_int("CK_CPU_BLOCK_ROWS", 0 /* unset */);
  if (rows == 0) {
    // Aim for ≥ 4 blocks per thread (dynamic scheduling needs some slack on a shared machine) but
    // keep blocks ≥ 64 rows for BLAS efficiency, and never leave a thread without a block.
    auto round16 = [](int64_t v) { return (v + 15) / 16 * 16; };
    const int64_t quarter = round16((N + 4 * threads - 1) / (4 * threads));
    rows = std::min(kDefaultRows, std::max<int64_t>(64, quarter));
    rows = std::min(rows, round16((N + threads - 1) / threads));
  }
  rows = std::min(rows, N);
  const int64_t blocks = (N + rows - 1) / rows;
  return {rows, cols, std::min(threads, blocks), blocks};
}

// Run `body(slot)` on `tasks` parallel tasks; slot ∈ [0, tasks) is unique per task and indexes the
// per-task buffers. (parallel_for's `begin` is unique per chunk; at::get_thread_num() is not a safe
// index when this op is itself called from inside a parallel region.)
// The caller's thread-local state (dispatch keys, grad mode, ...) is installed in every task:
// at::parallel_for does not propagate it, and the tasks run ATen ops (the GEMMs).
template <typename F>
void run_tasks(int64_t tasks, const F& body) {
  const at::ThreadLocalState state;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t /*end*/) {
    at::ThreadLocalStateGuard guard(state);
    body(begin);
  });
}

// The self-pairs (d, d) inside the tile of rows [i0, i0 + ib) × columns [j0, j0 + jt): calls
// f(r, c) with the tile coordinates of each (at most min(ib, jt) of them, none for most tiles).
// Self-exclusion touches exactly these elements and nothing else.
template <typename F>
void for_each_self_pair(int64_t i0, int64_t ib, int64_t j0, int64_t jt, const F& f) {
  const int64_t lo = std::max(i0, j0), hi = std::min(i0 + ib, j0 + jt);
  for (int64_t d = lo; d < hi; ++d) f(d - i0, d - j0);
}

// grad_keys of every task but the first (which writes the output directly) are summed in.
template <typename T>
void merge_private_grad_keys(T* grad_k, const T* private_dk, int64_t copies, int64_t numel) {
  if (copies == 0) return;
  at::parallel_for(0, numel, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t t = 0; t < copies; ++t) {
      const T* src = private_dk + t * numel;
      for (int64_t e = begin; e < end; ++e) grad_k[e] += src[e];
    }
  });
}

}  // namespace ck::cpu
