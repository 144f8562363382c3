// Forward of the fused log-sum-exp (docs/internals.md): row_lse, pos and, optionally, col_lse of
// S = s·Q·Kᵀ in one sweep that never materialises S. The tile product and the copy pipeline are in
// lse_device.cuh, the checks shared with the backward in lse_host.cuh, the raw-pointer API in
// lse_kernels.h. Deterministic: no atomics anywhere.
//
// Statistics, all float32 in natural-log units: an online max for rows (the 4 lanes of a quad hold
// one row's 64 tile columns and share its running max; each sums its own columns, and the quad adds
// the sums once at the end); a per-(row block, column) partial (max, sum) for columns. Masked
// elements (row ≥ N or column ≥ M) are −inf, so they drop out of every max and sum.
//
// Column LSE across row blocks: every CTA writes (max, sum) of its 64 rows for each column into a
// [row blocks of the launch][M] float2 buffer; a merge kernel combines them in a fixed order, so the
// result is deterministic. All row blocks at once would need ceil(N/64)·M·8 bytes — 128 MiB at
// N = M = 32768 but 128 GiB at 2^20 — so the rows run in groups whose partials fit a budget (2 GiB by
// default, but never fewer than 4 CTAs per SM, to keep the GPU full): after each group the merge
// folds its partials into a running (max, sum) per column (M·8 bytes). Grouping performs the same
// operations in the same order as one pass, so the result is bitwise that of a single group. Extra
// traffic: one read of the partials, ~1/(8·D) of the forward's FLOP time. (The alternatives: a
// key-block-owned second pass, 2× the forward FLOPs; or atomics on a packed (max, sum) word,
// nondeterministic.)

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "lse_device.cuh"
#include "lse_host.cuh"
#include "lse_kernels.h"

namespace ck_cuda {
namespace {

struct FwdParams {
  const void* query;
  const void* keys;
  int N, M, D;
  int64_t ldq, ldk;
  const float* scale;
  const int64_t* labels;
  float* row_lse;
  float* pos;
  float2* col_part;  // [gridDim.x][M] (max, sum): max in natural units, sum relative to it; or nullptr
  int row_block0;    // first row block of this launch (the forward runs in row groups, see lse_fwd)
  bool vec_ok;
};

// One CTA per 64 query rows; sweeps all key blocks. Writes row_lse and pos for its rows and, when
// COL, the column partials (max, sum over its 64 rows) of every column.
template <int P, bool COL>
__global__ void __launch_bounds__(kThreads) lse_fwd_kernel(const FwdParams p) {
#if CK_ARCH_OK
  using Tr = PathTraits<P>;
  using T = typename Tr::T;
  constexpr int kBK = Tr::kBK;
  constexpr int LDS = kBK + Tr::kPad;
  constexpr int NT = kTile / 8;

  __shared__ __align__(16) T sA[2][kTile * LDS];
  __shared__ __align__(16) T sB[2][kTile * LDS];
  __shared__ float2 sColPart[COL ? kWarps : 1][kTile];

  const T* Q = static_cast<const T*>(p.query);
  const T* K = static_cast<const T*>(p.keys);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int m0 = (p.row_block0 + blockIdx.x) * kTile;
  const float s = __ldg(p.scale);
  const int nk = (p.D + kBK - 1) / kBK;
  const int nb = (p.M + kTile - 1) / kTile;

  // This lane's two tile rows (C-fragment rows g and g+8 of warp's 16-row slab).
  int row[2], label[2];
  bool rvalid[2];
  float run_max[2], run_sum[2];  // run_sum: this lane's columns only (all lanes of a quad share max)
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row[h] = m0 + warp * 16 + g + 8 * h;
    rvalid[h] = row[h] < p.N;
    label[h] = rvalid[h] ? (p.labels ? static_cast<int>(__ldg(p.labels + row[h])) : row[h]) : -1;
    run_max[h] = kNegInf;
    run_sum[h] = 0.f;
  }

  auto issue = [&](int n0, int kc, int stage) {
    load_chunk<P>(sA[stage], Q, p.ldq, p.N, p.D, m0, kc * kBK, p.vec_ok);
    load_chunk<P>(sB[stage], K, p.ldk, p.M, p.D, n0, kc * kBK, p.vec_ok);
  };

  issue(0, 0, 0);
  cp_async_commit();

  for (int jb = 0; jb < nb; ++jb) {
    const int n0 = jb * kTile;
    float acc[NT][4];
    zero_acc(acc);
    pipelined_chunks(
        nk, [&](int kc, int stage) { issue(n0, kc, stage); },
        [&](int, int stage) {
          warp_mma<P, NT, kBK, true, true>(acc, sA[stage] + warp * 16 * LDS, LDS, sB[stage], LDS);
        });
    if (jb + 1 < nb) {  // prefetch the next tile's first chunk under this epilogue
      issue(n0 + kTile, 0, 0);
      cp_async_commit();
    }

    // ---- epilogue: logits S = fl(dot·s), masked to -inf; positives ----
    float tile_max[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = n0 + nt * 8 + 2 * t + e;
        const bool cvalid = col < p.M;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float& v = acc[nt][2 * h + e];
          const float logit = __fmul_rn(v, s);  // the backward recomputes these exact bits
          if (col == label[h]) p.pos[row[h]] = logit;  // label[h] == -1 for invalid rows
          v = (cvalid && rvalid[h]) ? logit : kNegInf;
          tile_max[h] = fmaxf(tile_max[h], v);
        }
      }
    }

    // ---- row statistics: online max, quad (4 lanes = one row's 64 columns) reduction ----
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float tm = tile_max[h];
      tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 1));
      tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 2));
      const float new_max = fmaxf(run_max[h], tm);
      const float shift = (new_max == kNegInf) ? 0.f : new_max;  // fully masked row: avoid inf-inf
      float sum = run_sum[h] * exp_diff(run_max[h], shift);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) sum += exp_diff(acc[nt][2 * h], shift) + exp_diff(acc[nt][2 * h + 1], shift);
      run_sum[h] = sum;
      run_max[h] = new_max;
    }

    // ---- column partials over this CTA's 64 rows ----
    if constexpr (COL) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float x0 = acc[nt][e], x1 = acc[nt][2 + e];
          // lanes with equal t hold the same column: reduce over g (lane bits 2..4) → 16 rows
          float cm = fmaxf(x0, x1);
          cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, 4));
          cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, 8));
          cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, 16));
          const float shift = (cm == kNegInf) ? 0.f : cm;
          float cs = exp_diff(x0, shift) + exp_diff(x1, shift);
          cs += __shfl_xor_sync(0xffffffffu, cs, 4);
          cs += __shfl_xor_sync(0xffffffffu, cs, 8);
          cs += __shfl_xor_sync(0xffffffffu, cs, 16);
          if (g == 0) sColPart[warp][nt * 8 + 2 * t + e] = make_float2(cm, cs);
        }
      }
      __syncthreads();
      if (tid < kTile) {
        const int col = n0 + tid;
        if (col < p.M) {
          // merge the 4 warps' (max, sum); the block has >= 1 valid row, so the max is finite
          float cm = kNegInf;
#pragma unroll
          for (int w = 0; w < kWarps; ++w) cm = fmaxf(cm, sColPart[w][tid].x);
          float cs = 0.f;
#pragma unroll
          for (int w = 0; w < kWarps; ++w) cs += sColPart[w][tid].y * exp_diff(sColPart[w][tid].x, cm);
          p.col_part[static_cast<int64_t>(blockIdx.x) * p.M + col] = make_float2(cm, cs);
        }
      }
      // sColPart is rewritten only after the next tile's pipelined_chunks barriers.
    }
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float sum = run_sum[h];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    if (t == 0 && rvalid[h]) p.row_lse[row[h]] = run_max[h] + logf(sum);
  }
#endif  // CK_ARCH_OK
}

// Folds one row group's per-row-block column partials, in row-block order (deterministic), into
// (max, sum) per column: starting from `running` when `fold_running` (earlier groups), and writing
// either col_lse = max + log(sum) (`col_lse` non-null: the last group) or `running` (more to come).
__global__ void __launch_bounds__(256) col_lse_merge_kernel(const float2* __restrict__ part, int num_blocks, int M,
                                                            float2* __restrict__ running, bool fold_running,
                                                            float* __restrict__ col_lse) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= M) return;
  float m = kNegInf, sum = 0.f;
  if (fold_running) {
    const float2 r = running[j];
    m = r.x;
    sum = r.y;
  }
  for (int b = 0; b < num_blocks; ++b) {
    const float2 v = part[static_cast<int64_t>(b) * M + j];  // coalesced across j
    if (v.x > m) {
      sum = sum * exp_diff(m, v.x) + v.y;  // m = -inf on the first step: 0·0 + v.y
      m = v.x;
    } else {
      sum += v.y * exp_diff(v.x, m);
    }
  }
  if (col_lse != nullptr) {
    col_lse[j] = m + logf(sum);
  } else {
    running[j] = make_float2(m, sum);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

template <int P>
cudaError_t launch_fwd(const FwdParams& fp, bool col, int num_row_blocks, cudaStream_t stream) {
  const dim3 grid(num_row_blocks), block(kThreads);
  if (col) {
    lse_fwd_kernel<P, true><<<grid, block, 0, stream>>>(fp);
  } else {
    lse_fwd_kernel<P, false><<<grid, block, 0, stream>>>(fp);
  }
  return cudaGetLastError();
}

constexpr size_t kDefaultPartialBudget = size_t{2} << 30;  // bytes of column partials per row group
constexpr int kMinCtasPerSm = 4;  // a row group never shrinks below this many CTAs per SM

// Row blocks per forward launch when the column LSE is computed (see "Column LSE across row blocks"
// at the top).
int64_t fwd_row_blocks_per_group(int64_t N, int64_t M, size_t partial_budget_bytes) {
  const int64_t total = blocks_for(N);
  const int64_t per_block = M * static_cast<int64_t>(sizeof(float2));
  int64_t group = static_cast<int64_t>((partial_budget_bytes ? partial_budget_bytes : kDefaultPartialBudget) /
                                       static_cast<size_t>(per_block));
  if (partial_budget_bytes == 0) group = std::max<int64_t>(group, int64_t{kMinCtasPerSm} * sm_count());
  return std::min(total, std::max<int64_t>(group, 1));
}

}  // namespace

size_t lse_fwd_workspace_bytes(int64_t N, int64_t M, bool compute_col, size_t partial_budget_bytes) {
  if (!compute_col || N <= 0 || M <= 0) return 0;
  const int64_t total = blocks_for(N);
  const int64_t group = fwd_row_blocks_per_group(N, M, partial_budget_bytes);
  const int64_t blocks = group + (group < total ? 1 : 0);  // + the running (max, sum) of several groups
  return static_cast<size_t>(blocks) * static_cast<size_t>(M) * sizeof(float2);
}

cudaError_t lse_fwd(const LseFwdArgs& a, cudaStream_t stream) {
  if (!sizes_ok(a.N, a.M, a.D, a.ldq, a.ldk) || !a.query || !a.keys || !a.scale || !a.row_lse || !a.pos) {
    return cudaErrorInvalidValue;
  }
  const bool col = a.col_lse != nullptr;
  if (col && (a.workspace == nullptr || !aligned(a.workspace, 16))) return cudaErrorInvalidValue;
  if (!a.labels && a.M < a.N) return cudaErrorInvalidValue;  // default diagonal needs M >= N
  if (const cudaError_t err = check_device_arch(); err != cudaSuccess) return err;

  FwdParams fp{};
  fp.query = a.query;
  fp.keys = a.keys;
  fp.N = static_cast<int>(a.N);
  fp.M = static_cast<int>(a.M);
  fp.D = static_cast<int>(a.D);
  fp.ldq = a.ldq;
  fp.ldk = a.ldk;
  fp.scale = a.scale;
  fp.labels = a.labels;
  fp.row_lse = a.row_lse;
  fp.pos = a.pos;
  fp.col_part = col ? static_cast<float2*>(a.workspace) : nullptr;
  fp.vec_ok = vec_ok_for(a.query, a.ldq, a.D, a.dtype) && vec_ok_for(a.keys, a.ldk, a.D, a.dtype);

  const int64_t total = blocks_for(a.N);
  const int64_t group = col ? fwd_row_blocks_per_group(a.N, a.M, a.partial_budget_bytes) : total;
  // after the group partials: the running (max, sum) per column, used only with several groups
  float2* running = col ? fp.col_part + group * a.M : nullptr;
  const int threads = 256;
  const int merge_blocks = static_cast<int>((a.M + threads - 1) / threads);
  for (int64_t rb0 = 0; rb0 < total; rb0 += group) {
    const int n_rb = static_cast<int>(std::min(group, total - rb0));
    fp.row_block0 = static_cast<int>(rb0);
    cudaError_t err;
    switch (pick_path(a.dtype, a.allow_tf32)) {
      case kPathF16:
        err = launch_fwd<kPathF16>(fp, col, n_rb, stream);
        break;
      case kPathBF16:
        err = launch_fwd<kPathBF16>(fp, col, n_rb, stream);
        break;
      case kPathTF32:
        err = launch_fwd<kPathTF32>(fp, col, n_rb, stream);
        break;
      default:
        err = launch_fwd<kPathF32>(fp, col, n_rb, stream);
        break;
    }
    if (err != cudaSuccess || !col) return err;
    const bool last = rb0 + group >= total;
    col_lse_merge_kernel<<<merge_blocks, threads, 0, stream>>>(fp.col_part, n_rb, fp.M, running, rb0 > 0,
                                                               last ? a.col_lse : nullptr);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace ck_cuda
