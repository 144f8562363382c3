// Fused row/column log-sum-exp of S = s·Q·Kᵀ and its backward (docs/internals.md, math.md §2).
//
// Plain CUDA: no torch/ATen include, so `nvcc -c` compiles this file on machines without a CUDA torch
// (tools/compile_cuda.sh). Requires sm_80+ (mma.sync m16n8k16 / m16n8k8 and cp.async).
//
// ---------------------------------------------------------------------------------------------------
// Work decomposition
//   A CTA (4 warps, 128 threads) owns a block of kTile = 64 rows of an "A" operand and sweeps every
//   64-row block of the "B" operand. The 64×64 tile T = A_blk·B_blkᵀ is accumulated in registers over
//   D in chunks of kBK columns (64 bytes per row: 32 half/bf16 or 16 float). Each chunk of A_blk and
//   B_blk is copied global→shared with 16-byte cp.async into one of two stages (double buffering:
//   chunk k+1 is in flight while chunk k is multiplied; the first chunk of the next tile/phase is
//   issued before the current tile's epilogue so its latency hides behind the exps).
//   Warp w owns tile rows 16w..16w+15 and all 64 columns: eight m16n8 accumulator fragments.
//
// Tensor-core paths (Path):
//   F16 / BF16  mma.sync.m16n8k16, 16-bit operands, float32 accumulators.
//   TF32        float32 inputs when the caller allows TF32: mma.sync.m16n8k8.tf32, operands rounded
//               with cvt.rna.tf32 when the fragment is loaded.
//   F32         exact float32: plain FFMA that reproduces the *same* fragment layout, so every
//               epilogue below is shared by all four paths.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16 / m16n8k8"), lane = 4·g + t:
//   C/D (16×8 float): c[0]=(g, 2t) c[1]=(g, 2t+1) c[2]=(g+8, 2t) c[3]=(g+8, 2t+1)
//   A m16n8k16: reg0=(g, 2t..2t+1) reg1=(g+8, 2t..) reg2=(g, 2t+8..) reg3=(g+8, 2t+8..); low half = lower k
//   B m16n8k16: reg0=(k 2t..2t+1, n g) reg1=(k 2t+8..2t+9, n g)
//   A m16n8k8 tf32: a0=(g, t) a1=(g+8, t) a2=(g, t+4) a3=(g+8, t+4)
//   B m16n8k8 tf32: b0=(k t, n g) b1=(k t+4, n g)
//   Fragments are read from shared memory with 32-bit (pair) or scalar loads — no ldmatrix — which
//   keeps any operand orientation expressible with one helper (warp_mma<..., A_KCONTIG, B_KCONTIG>).
//   Row paddings (8 halves / 4 floats) make the 16-bit loads bank-conflict free in every orientation
//   used here; the float paths see at most 2-way conflicts in the transposed (backward) products.
//
// Numerics: every logit is rounded once, S = fl(dot·s) with __fmul_rn (which nvcc never contracts
// into an FMA), exactly as torch rounds its logits, and the forward and the backward see the same
// bits. Exponentials are one ex2.approx of (S − max)·log2 e: log2 e multiplies the *small*
// difference. Folding log2 e into the scale (x = dot·(s·log2 e)) would save that multiply but puts
// the roundings of s·log2 e, of x and of lse·log2 e on numbers as large as |S|·1.44; at |S| ≈ 500
// that is a relative error of ~5e-5 on every backward weight, several times torch's own. (The
// Triton and CPU kernels made the same choice; benchmarks/NOTES.md.) Online max for rows;
// per-(row block, column) partial (max, sum) for columns; all accumulation in float32. Masked
// elements (row ≥ N or column ≥ M) are −inf in the forward and contribute 0 in the backward;
// out-of-range rows/columns of D are zero-filled in shared memory, so the products never see garbage.
//
// Forward column LSE across row blocks: every CTA writes (max, sum) of its 64 rows for each column
// into a [row blocks of the launch][M] float2 buffer; a merge kernel combines them in a fixed order,
// so the result is deterministic. All row blocks at once would need ceil(N/64)·M·8 bytes — 128 MiB
// at N = M = 32768 but 128 GiB at 2^20 — so the rows run in groups whose partials fit a budget
// (2 GiB by default, but never fewer than 4 CTAs per SM, to keep the GPU full): after each group the
// merge folds its partials into a running (max, sum) per column (M·8 bytes). Extra traffic: one read
// of the partials, ~1/(8·D) of the forward's FLOP time. (The alternatives: a key-block-owned second
// pass, 2× the forward FLOPs; or atomics on a packed (max, sum) word, nondeterministic.)
//
// Backward (per tile): recompute T, form the weight W = G (or Gᵀ) in registers, stage it in shared
// memory in the operand type, then for each D chunk:
//   own   += W  · B_chunk   (grad of the CTA's own rows: read-modify-write in global float32, unique
//                           owner per element → deterministic)
//   other += Wᵀ · A_chunk   (grad of the swept rows: float32 atomicAdd; fused mode only)
// Deterministic mode runs two passes instead: Q-owned (own = grad_query) then K-owned (own =
// grad_keys), no atomics. For fp16 inputs the weights are rescaled per tile by a power of two before
// the fp16 conversion (undone exactly on output): G ~ 1/(2N)·exp(..) would otherwise sit in fp16's
// subnormal range. bf16 and float have float32's exponent range and need no rescaling.
// ---------------------------------------------------------------------------------------------------

#include "lse_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

// The kernels need sm_80+ (mma.sync bf16/tf32, cp.async). Device passes for older targets (should a
// build's arch list contain one) compile to empty kernels; lse_fwd/lse_bwd refuse such devices at
// run time, so those bodies are never launched.
#if !defined(__CUDA_ARCH__) || (__CUDA_ARCH__ >= 800)
#define CK_ARCH_OK 1
#else
#define CK_ARCH_OK 0
#endif

namespace ck_cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTile = 16 * kWarps;  // rows of A per CTA = rows of B per tile = 64
static_assert(kThreads == 2 * kTile, "the backward stages 64 row + 64 column statistics with one thread each");
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -INFINITY;

enum Path : int { kPathF16 = 0, kPathBF16 = 1, kPathTF32 = 2, kPathF32 = 3 };

template <int P>
struct PathTraits;
template <>
struct PathTraits<kPathF16> {
  using T = __half;
  static constexpr int kBK = 32;  // D chunk (64 bytes per row)
  static constexpr int kPad = 8;  // 16 bytes: keeps cp.async destinations aligned
  static constexpr int kGPad = 8;
};
template <>
struct PathTraits<kPathBF16> {
  using T = __nv_bfloat16;
  static constexpr int kBK = 32;
  static constexpr int kPad = 8;
  static constexpr int kGPad = 8;
};
template <>
struct PathTraits<kPathTF32> {
  using T = float;
  static constexpr int kBK = 16;
  static constexpr int kPad = 4;
  static constexpr int kGPad = 4;
};
template <>
struct PathTraits<kPathF32> : PathTraits<kPathTF32> {};

template <int P>
constexpr bool kIs16Bit = (P == kPathF16 || P == kPathBF16);

// ------------------------------------------------------------------------------------------------
// Small device helpers
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ float ex2(float x) {  // 2^x; ex2(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// e^(a − b) for a ≤ b (natural-log statistics): the difference first, then log2 e. a = −inf gives 0.
__device__ __forceinline__ float exp_diff(float a, float b) { return ex2((a - b) * kLog2e); }

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t y;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(y) : "f"(x));
  return y;
}

// max that propagates NaN (used for the per-tile |G| maximum so a NaN weight is never skipped)
__device__ __forceinline__ float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = valid ? 16 : 0;  // 0 → the 16 bytes are zero-filled, nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <int P>
__device__ __forceinline__ void mma_tile(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (P == kPathBF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else if constexpr (P == kPathF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(P == kPathTF32, "mma_tile: no tensor-core instruction for this path");
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Operand element (row, k) of a shared-memory matrix. KCONTIG: stored at p[row·ld + k] (k is the
// contiguous axis), else at p[k·ld + row]. "row" is m for an A operand and n for a B operand.
template <bool KCONTIG>
__device__ __forceinline__ uint32_t ld_pair16(const uint16_t* p, int ld, int row, int k) {
  // two consecutive k (k even): low 16 bits = element k, as the mma fragments expect
  if constexpr (KCONTIG) {
    return *reinterpret_cast<const uint32_t*>(p + row * ld + k);
  } else {
    return static_cast<uint32_t>(p[k * ld + row]) | (static_cast<uint32_t>(p[(k + 1) * ld + row]) << 16);
  }
}
template <bool KCONTIG>
__device__ __forceinline__ float ld_f32(const float* p, int ld, int row, int k) {
  if constexpr (KCONTIG) {
    return p[row * ld + k];
  } else {
    return p[k * ld + row];
  }
}

// acc[nt] (16×8 fragment, C layout above) += A(16×KDIM) · B(KDIM × 8·NT), operands in shared memory.
// `a` points at the warp's 16 rows, `b` at column 0 of B. Identical C layout on all four paths.
template <int P, int NT, int KDIM, bool A_KCONTIG, bool B_KCONTIG>
__device__ __forceinline__ void warp_mma(float (&acc)[NT][4], const typename PathTraits<P>::T* a, int lda,
                                         const typename PathTraits<P>::T* b, int ldb) {
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  if constexpr (kIs16Bit<P>) {
    static_assert(KDIM % 16 == 0, "KDIM must be a multiple of 16");
    const uint16_t* a16 = reinterpret_cast<const uint16_t*>(a);
    const uint16_t* b16 = reinterpret_cast<const uint16_t*>(b);
#pragma unroll
    for (int k0 = 0; k0 < KDIM; k0 += 16) {
      uint32_t af[4];
      af[0] = ld_pair16<A_KCONTIG>(a16, lda, g, k0 + 2 * t);
      af[1] = ld_pair16<A_KCONTIG>(a16, lda, g + 8, k0 + 2 * t);
      af[2] = ld_pair16<A_KCONTIG>(a16, lda, g, k0 + 2 * t + 8);
      af[3] = ld_pair16<A_KCONTIG>(a16, lda, g + 8, k0 + 2 * t + 8);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint32_t b0 = ld_pair16<B_KCONTIG>(b16, ldb, nt * 8 + g, k0 + 2 * t);
        const uint32_t b1 = ld_pair16<B_KCONTIG>(b16, ldb, nt * 8 + g, k0 + 2 * t + 8);
        mma_tile<P>(acc[nt], af, b0, b1);
      }
    }
  } else if constexpr (P == kPathTF32) {
    static_assert(KDIM % 8 == 0, "KDIM must be a multiple of 8");
#pragma unroll
    for (int k0 = 0; k0 < KDIM; k0 += 8) {
      uint32_t af[4];
      af[0] = to_tf32(ld_f32<A_KCONTIG>(a, lda, g, k0 + t));
      af[1] = to_tf32(ld_f32<A_KCONTIG>(a, lda, g + 8, k0 + t));
      af[2] = to_tf32(ld_f32<A_KCONTIG>(a, lda, g, k0 + t + 4));
      af[3] = to_tf32(ld_f32<A_KCONTIG>(a, lda, g + 8, k0 + t + 4));
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint32_t b0 = to_tf32(ld_f32<B_KCONTIG>(b, ldb, nt * 8 + g, k0 + t));
        const uint32_t b1 = to_tf32(ld_f32<B_KCONTIG>(b, ldb, nt * 8 + g, k0 + t + 4));
        mma_tile<P>(acc[nt], af, b0, b1);
      }
    }
  } else {
    // Exact float32: each lane computes exactly the four C-fragment elements it would own after an
    // mma (rows g, g+8; columns 2t, 2t+1 of every n-tile). Shared-memory bound (about two loads per
    // four FFMA) — this is the correctness path, TF32 is the fast float32 path.
#pragma unroll 4
    for (int k = 0; k < KDIM; ++k) {
      const float a_lo = ld_f32<A_KCONTIG>(a, lda, g, k);
      const float a_hi = ld_f32<A_KCONTIG>(a, lda, g + 8, k);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float b0 = ld_f32<B_KCONTIG>(b, ldb, nt * 8 + 2 * t, k);
        const float b1 = ld_f32<B_KCONTIG>(b, ldb, nt * 8 + 2 * t + 1, k);
        acc[nt][0] = fmaf(a_lo, b0, acc[nt][0]);
        acc[nt][1] = fmaf(a_lo, b1, acc[nt][1]);
        acc[nt][2] = fmaf(a_hi, b0, acc[nt][2]);
        acc[nt][3] = fmaf(a_hi, b1, acc[nt][3]);
      }
    }
  }
}

template <int NT>
__device__ __forceinline__ void zero_acc(float (&acc)[NT][4]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[nt][r] = 0.f;
  }
}

// Copy rows [r0, r0+64) × columns [k0, k0+kBK) of a row-major (rows × D, row stride ld) matrix into
// smem tile `dst` (row stride LDS). Out-of-range elements become 0.
//   vec_ok: D and ld are multiples of the 16-byte vector and the base pointer is 16-byte aligned, so
//   every 16-byte vector is either entirely in range or entirely out → asynchronous cp.async with
//   zero-fill. Otherwise a synchronous element-wise fallback (any D, any alignment; slower).
template <int P>
__device__ __forceinline__ void load_chunk(typename PathTraits<P>::T* dst, const typename PathTraits<P>::T* src,
                                           int64_t ld, int rows, int D, int r0, int k0, bool vec_ok) {
  using T = typename PathTraits<P>::T;
  using Bits = std::conditional_t<sizeof(T) == 2, uint16_t, uint32_t>;
  constexpr int kBK = PathTraits<P>::kBK;
  constexpr int LDS = kBK + PathTraits<P>::kPad;
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  constexpr int kVecPerRow = kBK / kVec;  // 4
  constexpr int kNumVec = kTile * kVecPerRow;
  static_assert(kNumVec % kThreads == 0, "load_chunk: uneven split");
#pragma unroll
  for (int it = 0; it < kNumVec / kThreads; ++it) {
    const int v = threadIdx.x + it * kThreads;
    const int r = v / kVecPerRow;
    const int c = (v % kVecPerRow) * kVec;
    const int gr = r0 + r, gc = k0 + c;
    T* d = dst + r * LDS + c;
    if (vec_ok) {
      const bool valid = gr < rows && gc < D;
      const T* s = valid ? src + static_cast<int64_t>(gr) * ld + gc : src;
      cp_async16(d, s, valid);
    } else {
      const Bits* s = reinterpret_cast<const Bits*>(src) + static_cast<int64_t>(gr) * ld + gc;
      Bits* db = reinterpret_cast<Bits*>(d);
#pragma unroll
      for (int e = 0; e < kVec; ++e) db[e] = (gr < rows && gc + e < D) ? s[e] : Bits(0);
    }
  }
}

// Double-buffered sweep over the nk D-chunks of one tile. Precondition: chunk 0 was issued into stage
// 0 (and committed) by the caller, so that its latency overlaps whatever the caller did in between.
// load(kc, stage) issues chunk kc; compute(kc, stage) consumes it. Ends with a barrier: on return no
// warp reads either stage any more, and the caller may issue the next chunk 0.
template <class Load, class Compute>
__device__ __forceinline__ void pipelined_chunks(int nk, Load&& load, Compute&& compute) {
  for (int kc = 0; kc < nk; ++kc) {
    if (kc + 1 < nk) {
      load(kc + 1, (kc + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();  // everything but the newest group done → chunk kc has landed
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // chunk kc visible to all warps (also covers the synchronous fallback)
    compute(kc, kc & 1);
    __syncthreads();  // stage kc&1 is overwritten by the load issued in the next iteration
  }
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

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
// Backward
// ------------------------------------------------------------------------------------------------

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

constexpr int64_t kMaxDim = (int64_t{1} << 31) - 1;

int pick_path(DType dt, bool allow_tf32) {
  switch (dt) {
    case DType::kFloat16:
      return kPathF16;
    case DType::kBFloat16:
      return kPathBF16;
    case DType::kFloat32:
    default:
      return allow_tf32 ? kPathTF32 : kPathF32;
  }
}

int64_t elem_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// 16-byte vectors never straddle the end of a row nor an unaligned address.
bool vec_ok_for(const void* ptr, int64_t ld, int64_t D, DType dt) {
  const int64_t vec = 16 / elem_size(dt);
  return aligned(ptr, 16) && D % vec == 0 && ld % vec == 0;
}

int blocks_for(int64_t n) { return static_cast<int>((n + kTile - 1) / kTile); }

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

// The current device must be sm_80+ (see CK_ARCH_OK).
cudaError_t check_device_arch() {
  int dev = 0, major = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err != cudaSuccess) return err;
  return major >= 8 ? cudaSuccess : cudaErrorInvalidDeviceFunction;
}

bool sizes_ok(int64_t N, int64_t M, int64_t D, int64_t ldq, int64_t ldk) {
  return N >= 1 && M >= 1 && D >= 1 && N <= kMaxDim && M <= kMaxDim && D <= kMaxDim && ldq >= D && ldk >= D;
}

constexpr size_t kDefaultPartialBudget = size_t{2} << 30;  // bytes of column partials per row group
constexpr int kMinCtasPerSm = 4;  // a row group never shrinks below this many CTAs per SM

int sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) {
    (void)cudaGetLastError();  // not sticky; the launch that follows reports a real device problem
    return 132;                // H100 SXM
  }
  return sms;
}

// Row blocks per forward launch when the column LSE is computed (see "Forward column LSE" above).
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
