// Device building blocks shared by both stages of the fused row/column log-sum-exp of S = s·Q·Kᵀ
// (docs/internals.md, docs/math.md §2): the tile shape, the per-dtype paths, the 64×64 tile product on
// tensor cores (or exact FFMA) and the double-buffered global→shared pipeline. The forward
// (lse_fwd.cu) and the backward (lse_bwd.cu) sweep the same tiles with the same product; sharing this
// code, not copying it, is what lets the backward recompute the forward's logits bit for bit.
//
// Plain CUDA: no torch/ATen include, so `nvcc -c` compiles every .cu that includes this header on
// machines without a CUDA torch (tools/compile_cuda.sh). Requires sm_80+ (mma.sync m16n8k16 / m16n8k8
// and cp.async). Everything is in an anonymous namespace: each translation unit gets its own
// (force-inlined) copy, so nothing defined here is a symbol two objects could both export.
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
//               epilogue of both stages is shared by all four paths.
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
// Numerics shared by both stages: every logit is rounded once, S = fl(dot·s) with __fmul_rn (which
// nvcc never contracts into an FMA), exactly as torch rounds its logits, and the forward and the
// backward see the same bits. Exponentials are one ex2.approx of (S − max)·log2 e: log2 e multiplies
// the *small* difference. Folding log2 e into the scale (x = dot·(s·log2 e)) would save that multiply
// but puts the roundings of s·log2 e, of x and of lse·log2 e on numbers as large as |S|·1.44; at
// |S| ≈ 500 that is a relative error of ~5e-5 on every backward weight, several times torch's own.
// (The Triton and CPU kernels made the same choice; benchmarks/NOTES.md.) All accumulation is in
// float32; out-of-range rows/columns of D are zero-filled in shared memory, so the products never
// see garbage.
// ---------------------------------------------------------------------------------------------------
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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

}  // namespace
}  // namespace ck_cuda
