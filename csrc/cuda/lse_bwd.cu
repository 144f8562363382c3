// Backward of the fused log-sum-exp (docs/internals.md): grad_query = s·G·K and grad_keys = s·Gᵀ·Q
// with G_ij = grad_row_i·exp(S_ij − r_i) + grad_col_j·exp(S_ij − c_j) + grad_pos_i·1[j = l_i], G never
// stored beyond one 64×64 tile. The tile product and the copy pipeline are in lse_device.cuh, the
// checks shared with the forward in lse_host.cuh, the raw-pointer API in lse_kernels.h.
//
// Per tile: recompute T, form the weight W = G (or Gᵀ) in registers, stage it in shared memory in the
// operand type, then for each D chunk:
//   own   += W  · B_chunk   (grad of the CTA's own rows: read-modify-write in global float32, unique
//                           owner per element → deterministic)
//   other += Wᵀ · A_chunk   (grad of the swept rows: float32 atomicAdd; fused mode only)
// Deterministic mode runs two passes instead: Q-owned (own = grad_query) then K-owned (own =
// grad_keys), no atomics, at the price of one more recomputation of S. Masked elements (row ≥ N or
// column ≥ M) contribute a zero weight.
//
// For fp16 inputs the weights are rescaled per tile by a power of two before the fp16 conversion
// (undone exactly on output): G ~ 1/(2N)·exp(..) would otherwise sit in fp16's subnormal range.
// bf16 and float have float32's exponent range and need no rescaling.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "lse_device.cuh"
#include "lse_host.cuh"
#include "lse_kernels.h"

namespace ck_cuda {
namespace {

enum Role : int {
  kRoleRow = 0,  // A = query (owned rows i), B = keys (swept columns j): tile element (m, n) = S[i, j]
  kRoleCol = 1,  // A = keys (owned columns j), B = query (swept rows i): tile element (m, n) = S[i=n, j=m]
};

struct BwdParams {
  const void* A;  // owned operand
  const void* B;  // swept operand
  int RA, RB;     // their row counts
  int64_t lda, ldb;
  int N, M, D;
  const float* scale;
  const int64_t* labels;
  const float* row_lse;
  const float* col_lse;
  const float* grad_row;
  const float* grad_col;
  const float* grad_pos;
  float* grad_own;    // (RA, D): read-modify-write, one owner per element
  float* grad_other;  // (RB, D): atomicAdd (EMIT_OTHER only)
  bool vec_ok;
  bool pair_ok;  // D even and both outputs 8-byte aligned: float2 RMW / (sm_90) float2 atomics
};

struct RowStat {
  float lse;    // row_lse
  float gr;     // grad_row
  float gp;     // grad_pos
  int label;    // positive column (-1 for rows past N)
};
struct ColStat {
  float lse;    // col_lse
  float gc;     // grad_col
};

template <int P, int ROLE, bool EMIT_OTHER>
__global__ void __launch_bounds__(kThreads) lse_bwd_kernel(const BwdParams p) {
  static_assert(!(EMIT_OTHER && ROLE == kRoleCol), "the fused (atomic) pass is Q-owned");
#if CK_ARCH_OK
  using Tr = PathTraits<P>;
  using T = typename Tr::T;
  constexpr int kBK = Tr::kBK;
  constexpr int LDS = kBK + Tr::kPad;
  constexpr int LDG = kTile + Tr::kGPad;
  constexpr int NT = kTile / 8;  // GEMM1 n-tiles (64 columns)
  constexpr int NT2 = kBK / 8;   // GEMM2 n-tiles (one D chunk)
  constexpr bool kRescale = (P == kPathF16);

  __shared__ __align__(16) T sA[2][kTile * LDS];
  __shared__ __align__(16) T sB[2][kTile * LDS];
  __shared__ __align__(16) T sG[kTile * LDG];  // W[m][n] in the operand type
  __shared__ RowStat sRow[kTile];              // stats of the tile's 64 query rows i
  __shared__ ColStat sCol[kTile];              // stats of the tile's 64 key columns j
  __shared__ float sRed[kWarps];

  const T* A = static_cast<const T*>(p.A);
  const T* B = static_cast<const T*>(p.B);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.x * kTile;
  const float s = __ldg(p.scale);
  const int nk = (p.D + kBK - 1) / kBK;
  const int nb = (p.RB + kTile - 1) / kTile;
  const bool has_gr = p.grad_row != nullptr;
  const bool has_gc = p.grad_col != nullptr;
  const bool has_gp = p.grad_pos != nullptr;

  auto issue = [&](int n0, int kc, int stage) {
    load_chunk<P>(sA[stage], A, p.lda, p.RA, p.D, m0, kc * kBK, p.vec_ok);
    load_chunk<P>(sB[stage], B, p.ldb, p.RB, p.D, n0, kc * kBK, p.vec_ok);
  };

  issue(0, 0, 0);
  cp_async_commit();

  for (int jb = 0; jb < nb; ++jb) {
    const int n0 = jb * kTile;
    const int i0 = (ROLE == kRoleRow) ? m0 : n0;  // first query row of the tile
    const int j0 = (ROLE == kRoleRow) ? n0 : m0;  // first key column of the tile

    // ---- stage the tile's per-row / per-column statistics (read in the epilogue, after barriers) ----
    if (tid < kTile) {
      const int i = i0 + tid;
      RowStat r{0.f, 0.f, 0.f, -1};
      if (i < p.N) {
        if (has_gr) {
          r.lse = __ldg(p.row_lse + i);
          r.gr = __ldg(p.grad_row + i);
        }
        if (has_gp) r.gp = __ldg(p.grad_pos + i);
        r.label = p.labels ? static_cast<int>(__ldg(p.labels + i)) : i;
      }
      sRow[tid] = r;
    } else {
      const int jl = tid - kTile;
      const int j = j0 + jl;
      ColStat c{0.f, 0.f};
      if (j < p.M && has_gc) {
        c.lse = __ldg(p.col_lse + j);
        c.gc = __ldg(p.grad_col + j);
      }
      sCol[jl] = c;
    }

    // ---- GEMM1: T = A_blk · B_blkᵀ (recomputed once per tile) ----
    float acc[NT][4];
    zero_acc(acc);
    pipelined_chunks(
        nk, [&](int kc, int stage) { issue(n0, kc, stage); },
        [&](int, int stage) {
          warp_mma<P, NT, kBK, true, true>(acc, sA[stage] + warp * 16 * LDS, LDS, sB[stage], LDS);
        });
    issue(n0, 0, 0);  // chunk 0 again, for GEMM2, under the epilogue
    cp_async_commit();

    // ---- epilogue: W = G (or Gᵀ) in registers ----
    float amax = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int ml = warp * 16 + g + 8 * (r >> 1);  // tile-local m
        const int nl = nt * 8 + 2 * t + (r & 1);      // tile-local n
        const int il = (ROLE == kRoleRow) ? ml : nl;
        const int jl = (ROLE == kRoleRow) ? nl : ml;
        const bool valid = (i0 + il < p.N) && (j0 + jl < p.M);
        const float x = __fmul_rn(acc[nt][r], s);  // the forward's logit, bit for bit
        const RowStat rs = sRow[il];
        float w = 0.f;
        if (valid) {
          if (has_gr) w += rs.gr * exp_diff(x, rs.lse);  // ≤ |grad_row|: exp(S − r) ≤ 1
          if (has_gc) {
            const ColStat cs = sCol[jl];
            w += cs.gc * exp_diff(x, cs.lse);
          }
          if (j0 + jl == rs.label) w += rs.gp;
        }
        acc[nt][r] = w;
        amax = nan_max(amax, fabsf(w));
      }
    }
    // block-wide max |W|: lets an all-zero tile skip GEMM2 and sets the fp16 rescaling
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    if (lane == 0) sRed[warp] = amax;
    __syncthreads();
    amax = sRed[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) amax = nan_max(amax, sRed[w]);
    // (sRed is rewritten only after the GEMM2 / next GEMM1 barriers)

    if (amax == 0.f) {  // uniform across the block; nothing to add from this tile
      cp_async_wait<0>();  // retire the speculative chunk-0 copy before stage 0 is reused
      __syncthreads();
      if (jb + 1 < nb) {
        issue(n0 + kTile, 0, 0);
        cp_async_commit();
      }
      continue;
    }

    // fp16: scale W by 2^sh so that max|W|·2^sh ∈ [2^14, 2^15) (exact power of two, undone below)
    float wscale = 1.f;
    if constexpr (kRescale) {
      if (amax > 0.f && amax < INFINITY) {
        int ex;
        frexpf(amax, &ex);  // amax = f·2^ex, f ∈ [0.5, 1)
        const int sh = min(max(15 - ex, -126), 126);
        wscale = ldexpf(1.f, sh);
      }
    }
    const float out_scale = s / wscale;

    // W → shared memory, m-major: sG[ml][nl]. Each lane stores its (2t, 2t+1) column pairs.
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int ml = warp * 16 + g + 8 * h;
        const int nl = nt * 8 + 2 * t;
        const float w0 = acc[nt][2 * h] * wscale, w1 = acc[nt][2 * h + 1] * wscale;
        if constexpr (P == kPathF16) {
          *reinterpret_cast<__half2*>(&sG[ml * LDG + nl]) = __floats2half2_rn(w0, w1);
        } else if constexpr (P == kPathBF16) {
          *reinterpret_cast<__nv_bfloat162*>(&sG[ml * LDG + nl]) = __floats2bfloat162_rn(w0, w1);
        } else {
          *reinterpret_cast<float2*>(&sG[ml * LDG + nl]) = make_float2(w0, w1);
        }
      }
    }
    // (visible to all warps after the first barrier inside pipelined_chunks)

    // ---- GEMM2 over D chunks: own += W·B_chunk, other += Wᵀ·A_chunk ----
    pipelined_chunks(
        nk, [&](int kc, int stage) { issue(n0, kc, stage); },
        [&](int kc, int stage) {
          const int d0 = kc * kBK;
          {
            float o[NT2][4];
            zero_acc(o);
            // A operand: W rows of this warp, k = n (contiguous in sG); B operand: B_chunk[n][d]
            warp_mma<P, NT2, kTile, true, false>(o, sG + warp * 16 * LDG, LDG, sB[stage], LDS);
#pragma unroll
            for (int nt = 0; nt < NT2; ++nt) {
              const int d = d0 + nt * 8 + 2 * t;
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const int m = m0 + warp * 16 + g + 8 * h;
                if (m >= p.RA) continue;
                float* dst = p.grad_own + static_cast<int64_t>(m) * p.D + d;
                const float v0 = o[nt][2 * h] * out_scale, v1 = o[nt][2 * h + 1] * out_scale;
                if (p.pair_ok && d + 1 < p.D) {
                  float2 cur = *reinterpret_cast<float2*>(dst);
                  cur.x += v0;
                  cur.y += v1;
                  *reinterpret_cast<float2*>(dst) = cur;
                } else {
                  if (d < p.D) dst[0] += v0;
                  if (d + 1 < p.D) dst[1] += v1;
                }
              }
            }
          }
          if constexpr (EMIT_OTHER) {
            float o[NT2][4];
            zero_acc(o);
            // A operand: Wᵀ — row = n (this warp's 16 swept rows), k = m (strided in sG);
            // B operand: A_chunk[m][d]
            warp_mma<P, NT2, kTile, false, false>(o, sG + warp * 16, LDG, sA[stage], LDS);
#pragma unroll
            for (int nt = 0; nt < NT2; ++nt) {
              const int d = d0 + nt * 8 + 2 * t;
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const int n = n0 + warp * 16 + g + 8 * h;
                if (n >= p.RB) continue;
                float* dst = p.grad_other + static_cast<int64_t>(n) * p.D + d;
                const float v0 = o[nt][2 * h] * out_scale, v1 = o[nt][2 * h + 1] * out_scale;
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
                if (p.pair_ok && d + 1 < p.D) {  // one vector reduction instead of two
                  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(v0, v1));
                  continue;
                }
#endif
                if (d < p.D) atomicAdd(dst, v0);
                if (d + 1 < p.D) atomicAdd(dst + 1, v1);
              }
            }
          }
        });
    if (jb + 1 < nb) {
      issue(n0 + kTile, 0, 0);
      cp_async_commit();
    }
  }
  cp_async_wait<0>();  // belt and braces: no copy may be in flight when the CTA exits
#endif  // CK_ARCH_OK
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

template <int P>
cudaError_t launch_bwd(const LseBwdArgs& a, cudaStream_t stream, bool vec_ok, bool pair_ok) {
  BwdParams bp{};
  bp.N = static_cast<int>(a.N);
  bp.M = static_cast<int>(a.M);
  bp.D = static_cast<int>(a.D);
  bp.scale = a.scale;
  bp.labels = a.labels;
  bp.row_lse = a.row_lse;
  bp.col_lse = a.col_lse;
  bp.grad_row = a.grad_row;
  bp.grad_col = a.grad_col;
  bp.grad_pos = a.grad_pos;
  bp.vec_ok = vec_ok;
  bp.pair_ok = pair_ok;

  // pass 1 (or the only pass): Q-owned
  bp.A = a.query;
  bp.B = a.keys;
  bp.RA = bp.N;
  bp.RB = bp.M;
  bp.lda = a.ldq;
  bp.ldb = a.ldk;
  bp.grad_own = a.grad_query;
  bp.grad_other = a.grad_keys;
  const dim3 block(kThreads);
  if (!a.deterministic) {
    lse_bwd_kernel<P, kRoleRow, true><<<dim3(blocks_for(a.N)), block, 0, stream>>>(bp);
    return cudaGetLastError();
  }
  lse_bwd_kernel<P, kRoleRow, false><<<dim3(blocks_for(a.N)), block, 0, stream>>>(bp);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  // pass 2: K-owned, grad_keys
  bp.A = a.keys;
  bp.B = a.query;
  bp.RA = bp.M;
  bp.RB = bp.N;
  bp.lda = a.ldk;
  bp.ldb = a.ldq;
  bp.grad_own = a.grad_keys;
  bp.grad_other = nullptr;
  lse_bwd_kernel<P, kRoleCol, false><<<dim3(blocks_for(a.M)), block, 0, stream>>>(bp);
  return cudaGetLastError();
}

}  // namespace

cudaError_t lse_bwd(const LseBwdArgs& a, cudaStream_t stream) {
  if (!sizes_ok(a.N, a.M, a.D, a.ldq, a.ldk) || !a.query || !a.keys || !a.scale || !a.grad_query ||
      !a.grad_keys) {
    return cudaErrorInvalidValue;
  }
  if ((a.grad_row && !a.row_lse) || (a.grad_col && !a.col_lse)) return cudaErrorInvalidValue;
  if (!a.labels && a.M < a.N) return cudaErrorInvalidValue;
  if (const cudaError_t e = check_device_arch(); e != cudaSuccess) return e;

  cudaError_t err = cudaMemsetAsync(a.grad_query, 0, static_cast<size_t>(a.N * a.D) * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(a.grad_keys, 0, static_cast<size_t>(a.M * a.D) * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  if (!a.grad_row && !a.grad_col && !a.grad_pos) return cudaSuccess;  // G ≡ 0

  const bool vec_ok = vec_ok_for(a.query, a.ldq, a.D, a.dtype) && vec_ok_for(a.keys, a.ldk, a.D, a.dtype);
  const bool pair_ok = a.D % 2 == 0 && aligned(a.grad_query, 8) && aligned(a.grad_keys, 8);
  switch (pick_path(a.dtype, a.allow_tf32)) {
    case kPathF16:
      return launch_bwd<kPathF16>(a, stream, vec_ok, pair_ok);
    case kPathBF16:
      return launch_bwd<kPathBF16>(a, stream, vec_ok, pair_ok);
    case kPathTF32:
      return launch_bwd<kPathTF32>(a, stream, vec_ok, pair_ok);
    default:
      return launch_bwd<kPathF32>(a, stream, vec_ok, pair_ok);
  }
}

}  // namespace ck_cuda
