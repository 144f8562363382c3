// Work split and BLAS plumbing shared by every CPU kernel (LSE and sigmoid families).
//
// Every kernel has the same shape: the N×M logit matrix S = s·Q·Kᵀ is produced one rows×cols tile
// at a time by BLAS into a per-task buffer, consumed by an element-wise pass (lse_tiles.cpp,
// sigmoid_tiles.cpp) and dropped, so memory stays O((N+M)·D).
//
// Rows of Q are cut into row blocks, and the row blocks into `groups` runs of consecutive
// blocks (make_tiling). One at::parallel_for starts one task per thread; the tasks pull whole
// groups from a shared atomic counter (dynamic scheduling: the machine is shared, so a static
// split would wait for the slowest core) and run a group's blocks in ascending order. A block's
// rows belong to the task running it (row statistics, grad_query rows: no synchronisation, no
// false sharing); every block sweeps all column tiles of K in the same order, so the K tile just
// read by one core is usually still in the shared L3 for the other.
//
// Bitwise reproducibility (docs/determinism.md). Per-column results (column statistics, grad_keys)
// are sums over row blocks, and float addition is not associative. They go to one buffer per
// *group*, not per task: a group's buffer receives the same blocks in the same order whichever task
// claimed it, and the group buffers are merged in group order at the end. So the partition and
// every summation order are fixed by (N, M, tile sizes, thread count) alone, never by which thread
// ran what, and repeats at a fixed thread count give identical bits. (Per-task buffers, the earlier
// scheme, summed whatever blocks a task happened to claim: last-bit differences from run to run.)
// The per-task tile buffers sit 64-byte aligned at the same alignment in every slot, so a GEMM's
// result cannot depend on the slot that ran it either. Rows never cross groups, so row results were
// and are reproducible. Different thread counts give different groups, hence different last bits.
//
// Cost: groups = 2 × tasks (kGroupsPerTask; 1 with one task, where nothing changes), so dynamic
// scheduling keeps a granularity of half a task's share, and grad_keys needs groups − 1 private
// copies, O(2·threads·M·D) extra memory (was threads − 1 copies), never O(N·M); a copy needs no
// zeroing (its group's first block writes it with β = 0) and the merge reads it once. Time: no
// cost distinguishable from the ±5% noise of a shared machine (benchmarks/NOTES.md, "CPU
// determinism (issue 21.2)").
// BLAS runs single-threaded inside each task (nested OpenMP regions are inactive), so all
// parallelism is ours and the tiles stay core-local.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
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
  int64_t rows;    // row block of Q owned by one task at a time
  int64_t cols;    // column tile of K
  int64_t tasks;   // parallel tasks (≤ threads, ≤ groups)
  int64_t blocks;  // row blocks, ceil(N / rows)
  int64_t groups;  // runs of consecutive row blocks; one per-column buffer each (see the top)

  // Row blocks [group_begin(g), group_begin(g + 1)) form group g; sizes differ by at most one.
  int64_t group_begin(int64_t g) const { return g * blocks / groups; }
};

// Groups per task when there are several tasks: 2 lets a task that got slowed down by a neighbour
// on the shared machine hand over up to half of its share, at one extra grad_keys copy per task.
// Measured (2 threads, D = 256, N = M = 4096 and 8192, paired alternating calls): 2 was as fast as
// the per-task scheme (ratios 0.96–1.02), 4 about 1–2% slower and 8 up to 7% slower (more
// grad_keys copies to zero and merge); benchmarks/NOTES.md, "CPU determinism (issue 21.2)".
constexpr int64_t kGroupsPerTask = 2;

// `n` elements rounded up to a multiple of 64 bytes: the stride of per-task buffers, so every
// slot's buffer has the same alignment (BLAS results may depend on the alignment of the output).
template <typename T>
constexpr int64_t aligned_stride(int64_t n) {
  constexpr int64_t per_line = 64 / static_cast<int64_t>(sizeof(T));
  return (n + per_line - 1) / per_line * per_line;
}

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
  const int64_t tasks = std::min(threads, blocks);
  // One task: one group, the same sums as a serial sweep and no extra buffer.
  const int64_t groups = tasks == 1 ? 1 : std::min(blocks, kGroupsPerTask * tasks);
  return {rows, cols, tasks, blocks, groups};
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

// The row blocks of every group, in a fixed order within each group: on_group(slot, g) when a task
// claims group g (set up the group's buffers there), then on_block(slot, g, blk) for its blocks in
// ascending order. Which task claims which group varies from run to run; nothing a group produces
// may depend on that except through `slot`-indexed scratch.
template <typename OnGroup, typename OnBlock>
void for_each_row_block(const Tiling& tl, const OnGroup& on_group, const OnBlock& on_block) {
  std::atomic<int64_t> next_group{0};
  run_tasks(tl.tasks, [&](int64_t slot) {
    for (int64_t g = next_group.fetch_add(1); g < tl.groups; g = next_group.fetch_add(1)) {
      on_group(slot, g);
      for (int64_t blk = tl.group_begin(g); blk < tl.group_begin(g + 1); ++blk) {
        on_block(slot, g, blk);
      }
    }
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

// grad_keys of every group but the first (which writes the output directly) are summed in, in
// group order for every element (parallel over elements only): a fixed summation order.
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
