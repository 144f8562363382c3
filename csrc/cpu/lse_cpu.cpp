// CPU kernels of ck_native::lse_fwd / ck_native::lse_bwd (schema: csrc/ops.cpp, contract:
// docs/internals.md). The N×M logit matrix S = s·Q·Kᵀ is never stored: it is produced one tile at a
// time by BLAS into a per-thread buffer, consumed by a vectorised pass (lse_tiles.cpp), and dropped.
//
// Work split. One at::parallel_for starts one task per thread; the tasks pull row blocks of Q from a
// shared atomic counter (dynamic scheduling: the machine is shared, so a static split would wait for
// the slowest core). A task owns its row block outright (row statistics, grad_query rows: no
// synchronisation, no false sharing) and sweeps all column tiles of K in the same order as the other
// tasks, so the K tile just read by one core is usually still in the shared L3 for the other.
// Per-column results (column statistics, grad_keys) go to per-task buffers merged at the end:
// O(threads·M·D) extra memory, never O(N·M).
//
// FLOPs. Forward: one GEMM per tile (2·N·M·D in total); the positive logits are picked out of the
// tiles that hold them. Backward: the tile is recomputed once, turned into G in place, and feeds both
// gradient GEMMs (6·N·M·D). BLAS runs single-threaded inside each task, so all parallelism is ours
// and the tiles stay core-local. At N = M = 8192, D = 256 on 2 cores this runs at 100–115% of the
// dense 2-thread sgemm rate (single-threaded tile GEMMs avoid MKL's threading overheads).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "lse_tiles.h"

namespace ck::cpu {
namespace {

// ------------------------------------------------------------------------------------------------
// GEMM on row-major operands: C[m×n] = alpha·op(A)·op(B) + beta·C, op(X) = Xᵀ when trans_X.
// ------------------------------------------------------------------------------------------------

// BLAS through ATen (MKL in PyTorch's x86 wheels, whatever torch was built with elsewhere) on
// non-owning views of our buffers. The wrapping costs a few µs per call against ~1 ms of GEMM per
// tile: no measurable difference from calling MKL's sgemm_ directly (tried). Inside an OpenMP
// parallel region MKL runs single-threaded (nested regions are inactive), which is what we want.
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

// ------------------------------------------------------------------------------------------------
// Tiling.
// ------------------------------------------------------------------------------------------------

// A positive integer from the environment, or `fallback` when the variable is unset or empty.
int64_t env_int(const char* name, int64_t fallback) {
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
// L2. Measured with benchmarks/tune_cpu.py on the 2-core AVX-512 EPYC this was developed on
// (D = 128…512, N = 4096…16384): 256…1024 rows × 256…512 columns are all within the ±5% run-to-run
// noise; 512×256 (a 512 KiB tile, half the 1 MiB L2) was the most consistent, 128-row blocks and
// 1024-column tiles were measurably slower. CK_CPU_BLOCK_ROWS / CK_CPU_BLOCK_COLS override the
// defaults exactly (tuning, tests).
constexpr int64_t kDefaultRows = 512;
constexpr int64_t kDefaultCols = 256;

Tiling make_tiling(int64_t N, int64_t M) {
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

// ------------------------------------------------------------------------------------------------
// Forward.
// ------------------------------------------------------------------------------------------------

template <typename T>
void lse_fwd_impl(const T* Q, const T* K, int64_t N, int64_t M, int64_t D, double scale,
                  const int64_t* labels, bool compute_col, T* row_lse, T* col_lse, T* pos) {
  const TileKernels<T> tk = [] {
    if constexpr (std::is_same_v<T, float>) return tile_kernels_f32();
    else return tile_kernels_f64();
  }();
  const Tiling tl = make_tiling(N, M);
  const T alpha = static_cast<T>(scale);
  const T ninf = -std::numeric_limits<T>::infinity();

  // Per task: tile (rows×cols), row stats (2·rows), column scratch (cols), column stats (2·M).
  const int64_t per_task = tl.rows * tl.cols + 2 * tl.rows + tl.cols + (compute_col ? 2 * M : 0);
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor work = at::empty({tl.tasks, per_task}, opts);
  T* work_ptr = work.data_ptr<T>();
  std::atomic<int64_t> next_block{0};

  run_tasks(tl.tasks, [&](int64_t slot) {
    T* tile = work_ptr + slot * per_task;
    T* rmax = tile + tl.rows * tl.cols;
    T* rsum = rmax + tl.rows;
    T* scratch = rsum + tl.rows;
    T* cmax = compute_col ? scratch + tl.cols : nullptr;
    T* csum = compute_col ? cmax + M : nullptr;
    if (compute_col) {
      std::fill(cmax, cmax + M, ninf);
      std::fill(csum, csum + M, T(0));
    }
    for (int64_t blk = next_block.fetch_add(1); blk < tl.blocks; blk = next_block.fetch_add(1)) {
      const int64_t i0 = blk * tl.rows;
      const int64_t ib = std::min(tl.rows, N - i0);
      std::fill(rmax, rmax + ib, ninf);
      std::fill(rsum, rsum + ib, T(0));
      for (int64_t j0 = 0; j0 < M; j0 += tl.cols) {
        const int64_t jt = std::min(tl.cols, M - j0);
        gemm<T>(false, true, ib, jt, D, alpha, Q + i0 * D, D, K + j0 * D, D, T(0), tile,
                tl.cols);
        // The positive logit is read from the tile that holds it: exactly the value the row's
        // log-sum-exp saw, so row_lse − pos ≥ 0 holds in floating point too.
        for (int64_t i = 0; i < ib; ++i) {
          const int64_t l = labels ? labels[i0 + i] : i0 + i;
          if (l >= j0 && l < j0 + jt) pos[i0 + i] = tile[i * tl.cols + (l - j0)];
        }
        tk.fwd(tile, ib, jt, tl.cols, rmax, rsum, compute_col ? cmax + j0 : nullptr,
               compute_col ? csum + j0 : nullptr, scratch);
      }
      for (int64_t i = 0; i < ib; ++i) {
        row_lse[i0 + i] =
            static_cast<T>(static_cast<double>(rmax[i]) + std::log(static_cast<double>(rsum[i])));
      }
    }
  });

  if (compute_col) {
    // Merge the per-task (max, sum) pairs of every column: a log-sum-exp of log-sum-exps.
    at::parallel_for(0, M, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        double m = -std::numeric_limits<double>::infinity();
        for (int64_t t = 0; t < tl.tasks; ++t) {
          const T* cmax = work_ptr + t * per_task + tl.rows * tl.cols + 2 * tl.rows + tl.cols;
          m = std::max(m, static_cast<double>(cmax[j]));
        }
        double s = 0;
        for (int64_t t = 0; t < tl.tasks; ++t) {
          const T* cmax = work_ptr + t * per_task + tl.rows * tl.cols + 2 * tl.rows + tl.cols;
          const T* csum = cmax + M;
          // Tasks that never saw column j hold (−inf, 0); `!= 0` keeps a NaN sum visible.
          if (csum[j] != 0) s += static_cast<double>(csum[j]) * std::exp(cmax[j] - m);
        }
        col_lse[j] = static_cast<T>(m + std::log(s));
      }
    });
  }

}

// ------------------------------------------------------------------------------------------------
// Backward.
// ------------------------------------------------------------------------------------------------

template <typename T>
void lse_bwd_impl(const T* Q, const T* K, int64_t N, int64_t M, int64_t D, double scale,
                  const int64_t* labels, const T* row_lse, const T* col_lse, const T* grad_row,
                  const T* grad_col, const T* grad_pos, T* grad_q, T* grad_k) {
  // grad_q, grad_k arrive zeroed.
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const T s = static_cast<T>(scale);

  const bool dense_terms = grad_row != nullptr || grad_col != nullptr;
  if (dense_terms) {
    const TileKernels<T> tk = [] {
      if constexpr (std::is_same_v<T, float>) return tile_kernels_f32();
      else return tile_kernels_f64();
    }();
    const Tiling tl = make_tiling(N, M);

    // Task 0 accumulates grad_keys in place; the others into zeroed private copies.
    at::Tensor tiles = at::empty({tl.tasks, tl.rows * tl.cols}, opts);
    at::Tensor dk_private = at::zeros({tl.tasks - 1, M * D}, opts);
    T* tiles_ptr = tiles.data_ptr<T>();
    T* dk_ptr = dk_private.data_ptr<T>();
    std::atomic<int64_t> next_block{0};

    run_tasks(tl.tasks, [&](int64_t slot) {
      T* tile = tiles_ptr + slot * tl.rows * tl.cols;
      T* dk = slot == 0 ? grad_k : dk_ptr + (slot - 1) * M * D;
      for (int64_t blk = next_block.fetch_add(1); blk < tl.blocks; blk = next_block.fetch_add(1)) {
        const int64_t i0 = blk * tl.rows;
        const int64_t ib = std::min(tl.rows, N - i0);
        for (int64_t j0 = 0; j0 < M; j0 += tl.cols) {
          const int64_t jt = std::min(tl.cols, M - j0);
          // Recompute the tile, turn it into G in place, then both gradient GEMMs read it while it
          // is still in cache: dQ_blk += s·G·K_tile, dK_tile += s·Gᵀ·Q_blk.
          gemm<T>(false, true, ib, jt, D, s, Q + i0 * D, D, K + j0 * D, D, T(0), tile,
                  tl.cols);
          tk.bwd(tile, ib, jt, tl.cols, grad_row ? row_lse + i0 : nullptr,
                 grad_row ? grad_row + i0 : nullptr, grad_col ? col_lse + j0 : nullptr,
                 grad_col ? grad_col + j0 : nullptr);
          // The sparse positive term, where the tile holds (i, l_i): G_{i,l_i} += grad_pos_i.
          for (int64_t i = 0; grad_pos && i < ib; ++i) {
            const int64_t l = labels ? labels[i0 + i] : i0 + i;
            if (l >= j0 && l < j0 + jt) tile[i * tl.cols + (l - j0)] += grad_pos[i0 + i];
          }
          gemm<T>(false, false, ib, D, jt, s, tile, tl.cols, K + j0 * D, D, T(1),
                  grad_q + i0 * D, D);
          gemm<T>(true, false, jt, D, ib, s, tile, tl.cols, Q + i0 * D, D, T(1),
                  dk + j0 * D, D);
        }
      }
    });

    if (tl.tasks > 1) {
      at::parallel_for(0, M * D, 1 << 14, [&](int64_t begin, int64_t end) {
        for (int64_t t = 0; t + 1 < tl.tasks; ++t) {
          const T* src = dk_ptr + t * M * D;
          for (int64_t e = begin; e < end; ++e) grad_k[e] += src[e];
        }
      });
    }
  }

  if (grad_pos != nullptr && !dense_terms) {
    // Only the sparse term: G has one entry per row, so skip the tiles, O(N·D). Serial, because
    // labels may repeat (several rows scattering into one row of grad_keys).
    for (int64_t i = 0; i < N; ++i) {
      const int64_t l = labels ? labels[i] : i;
      const T g = s * grad_pos[i];
      T* dq = grad_q + i * D;
      T* dk = grad_k + l * D;
      const T* q = Q + i * D;
      const T* k = K + l * D;
      for (int64_t d = 0; d < D; ++d) {
        dq[d] += g * k[d];
        dk[d] += g * q[d];
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Op entry points: validation (defensive: functional.py checks the same things first), dtype
// handling, dispatch on the accumulation type.
// ------------------------------------------------------------------------------------------------

struct Problem {
  int64_t N, M, D;
  at::ScalarType stat;  // accumulation / output dtype
  double scale;
  at::Tensor labels;  // contiguous int64 or undefined
};

Problem check_problem(const char* op, const at::Tensor& query, const at::Tensor& keys,
                      const at::Tensor& scale, const std::optional<at::Tensor>& labels) {
  TORCH_CHECK(query.device().is_cpu() && keys.device().is_cpu(), op,
              ": query and keys must be CPU tensors, got ", query.device(), " and ",
              keys.device());
  TORCH_CHECK(query.dim() == 2 && keys.dim() == 2, op,
              ": query and keys must be 2-D (N, D) and (M, D), got shapes ", query.sizes(),
              " and ", keys.sizes());
  TORCH_CHECK(query.scalar_type() == keys.scalar_type(), op,
              ": query and keys must have the same dtype, got ", query.scalar_type(), " and ",
              keys.scalar_type());
  const auto dt = query.scalar_type();
  TORCH_CHECK(dt == at::kDouble || dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": dtype must be float64, float32, bfloat16 or float16, got ", dt);
  const int64_t N = query.size(0), M = keys.size(0), D = query.size(1);
  TORCH_CHECK(keys.size(1) == D, op, ": query and keys must have the same feature size, got ",
              query.sizes(), " and ", keys.sizes());
  TORCH_CHECK(N >= 1 && M >= 1 && D >= 1, op, ": N, M and D must be >= 1, got N=", N, ", M=", M,
              ", D=", D);
  TORCH_CHECK(query.is_contiguous() && keys.is_contiguous(), op,
              ": query and keys must be contiguous, got strides ", query.strides(), " and ",
              keys.strides());
  const at::ScalarType stat = dt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == stat && scale.device().is_cpu(), op,
              ": scale must be a one-element ", stat, " CPU tensor (the statistic dtype of ", dt,
              " inputs), got shape ", scale.sizes(), ", dtype ", scale.scalar_type(), ", device ",
              scale.device());
  const double s = scale.item<double>();
  TORCH_CHECK(std::isfinite(s) && s > 0, op, ": scale must be finite and > 0, got ", s);

  Problem p{N, M, D, stat, s, at::Tensor()};
  if (labels.has_value()) {
    const at::Tensor& l = *labels;
    TORCH_CHECK(l.device().is_cpu() && l.scalar_type() == at::kLong && l.dim() == 1 &&
                    l.size(0) == N,
                op, ": labels must be an int64 CPU tensor of shape (", N, "), got dtype ",
                l.scalar_type(), ", shape ", l.sizes(), ", device ", l.device());
    p.labels = l.contiguous();
    const int64_t* lp = p.labels.data_ptr<int64_t>();
    for (int64_t i = 0; i < N; ++i) {
      TORCH_CHECK(lp[i] >= 0 && lp[i] < M, op, ": labels must lie in [0, ", M, "), got labels[",
                  i, "] = ", lp[i]);
    }
  } else {
    TORCH_CHECK(M >= N, op, ": without labels the positive of row i is column i, so M >= N is ",
                "required, got N=", N, ", M=", M);
  }
  return p;
}

// A float64 or float32 contiguous copy (a no-op for float32/float64 inputs).
at::Tensor as_stat(const at::Tensor& t, at::ScalarType stat) {
  return t.scalar_type() == stat ? t : t.to(stat).contiguous();
}

// Optional per-sample vector of the statistic dtype; expanded (stride-0) gradients from autograd are
// made contiguous here.
at::Tensor check_vector(const char* op, const char* name, const std::optional<at::Tensor>& t,
                        int64_t len, at::ScalarType stat) {
  if (!t.has_value()) return at::Tensor();
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == stat && t->dim() == 1 &&
                  t->size(0) == len,
              op, ": ", name, " must be a ", stat, " CPU tensor of shape (", len,
              "), got dtype ", t->scalar_type(), ", shape ", t->sizes(), ", device ", t->device());
  return t->contiguous();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_fwd_cpu(const at::Tensor& query,
                                                          const at::Tensor& keys,
                                                          const at::Tensor& scale,
                                                          const std::optional<at::Tensor>& labels,
                                                          bool compute_col) {
  const Problem p = check_problem("ck_native::lse_fwd", query, keys, scale, labels);
  const at::Tensor q = as_stat(query, p.stat), k = as_stat(keys, p.stat);
  const auto opts = query.options().dtype(p.stat);
  at::Tensor row_lse = at::empty({p.N}, opts);
  at::Tensor col_lse = at::empty({compute_col ? p.M : 0}, opts);
  at::Tensor pos = at::empty({p.N}, opts);
  const int64_t* lp = ptr_or_null<int64_t>(p.labels);
  if (p.stat == at::kDouble) {
    lse_fwd_impl<double>(q.data_ptr<double>(), k.data_ptr<double>(), p.N, p.M, p.D, p.scale, lp,
                         compute_col, row_lse.data_ptr<double>(),
                         compute_col ? col_lse.data_ptr<double>() : nullptr,
                         pos.data_ptr<double>());
  } else {
    lse_fwd_impl<float>(q.data_ptr<float>(), k.data_ptr<float>(), p.N, p.M, p.D, p.scale, lp,
                        compute_col, row_lse.data_ptr<float>(),
                        compute_col ? col_lse.data_ptr<float>() : nullptr, pos.data_ptr<float>());
  }
  return {row_lse, col_lse, pos};
}

std::tuple<at::Tensor, at::Tensor> lse_bwd_cpu(
    const at::Tensor& query, const at::Tensor& keys, const at::Tensor& scale,
    const std::optional<at::Tensor>& labels, const at::Tensor& row_lse, const at::Tensor& col_lse,
    const std::optional<at::Tensor>& grad_row, const std::optional<at::Tensor>& grad_col,
    const std::optional<at::Tensor>& grad_pos) {
  static const char* op = "ck_native::lse_bwd";
  const Problem p = check_problem(op, query, keys, scale, labels);
  const at::Tensor gr = check_vector(op, "grad_row", grad_row, p.N, p.stat);
  const at::Tensor gc = check_vector(op, "grad_col", grad_col, p.M, p.stat);
  const at::Tensor gp = check_vector(op, "grad_pos", grad_pos, p.N, p.stat);
  // The statistics are read only for the terms that are present (col_lse may be empty otherwise).
  const at::Tensor rl = gr.defined() ? check_vector(op, "row_lse", row_lse, p.N, p.stat)
                                     : at::Tensor();
  const at::Tensor cl = gc.defined() ? check_vector(op, "col_lse", col_lse, p.M, p.stat)
                                     : at::Tensor();
  const at::Tensor q = as_stat(query, p.stat), k = as_stat(keys, p.stat);
  const auto opts = query.options().dtype(p.stat);
  at::Tensor grad_q = at::zeros({p.N, p.D}, opts);
  at::Tensor grad_k = at::zeros({p.M, p.D}, opts);
  const int64_t* lp = ptr_or_null<int64_t>(p.labels);
  if (p.stat == at::kDouble) {
    lse_bwd_impl<double>(q.data_ptr<double>(), k.data_ptr<double>(), p.N, p.M, p.D, p.scale, lp,
                         ptr_or_null<double>(rl), ptr_or_null<double>(cl),
                         ptr_or_null<double>(gr), ptr_or_null<double>(gc),
                         ptr_or_null<double>(gp), grad_q.data_ptr<double>(),
                         grad_k.data_ptr<double>());
  } else {
    lse_bwd_impl<float>(q.data_ptr<float>(), k.data_ptr<float>(), p.N, p.M, p.D, p.scale, lp,
                        ptr_or_null<float>(rl), ptr_or_null<float>(cl), ptr_or_null<float>(gr),
                        ptr_or_null<float>(gc), ptr_or_null<float>(gp), grad_q.data_ptr<float>(),
                        grad_k.data_ptr<float>());
  }
  return {grad_q, grad_k};
}

}  // namespace

TORCH_LIBRARY_IMPL(ck_native, CPU, m) {
  m.impl("lse_fwd", &lse_fwd_cpu);
  m.impl("lse_bwd", &lse_bwd_cpu);
}

}  // namespace ck::cpu
