// Element-wise tile passes of the CPU kernels (see lse_tiles.h for the contract).
//
// Cost model: per logit the forward does 2·D FLOPs of GEMM and the backward 6·D, against two
// exponentials (~12 vector ops each) and a few max/add/fma here: at D = 256 on AVX-512 this file
// is ~8% of the forward and ~3% of the backward. It is written for throughput: the tile (≤ 512 KiB)
// stays in L2 between the GEMM that writes it and the passes that read it, every loop is a
// unit-stride vector loop, and tails are masked (AVX-512) or scalar (AVX2), never padded.
//
// Portability: the SIMD variants are ordinary functions with GCC/Clang `target` attributes, selected
// at run time by cpuid. Nothing else in the extension is compiled for more than the baseline ISA, so
// a wheel built here runs on any x86-64 CPU (and the generic code on any other architecture).

#include "lse_tiles.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define CK_X86_SIMD 1
#include <immintrin.h>
// GCC's _mm512_reduce_* start from _mm256_undefined_pd(), which -Wmaybe-uninitialized flags.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#else
#define CK_X86_SIMD 0
#endif

namespace ck::cpu {
namespace {

// --------------------------------------------------------------------------------------------------
// Generic code: float64 checking path, and float on CPUs without AVX2.
// --------------------------------------------------------------------------------------------------

template <typename T, bool COL>
void fwd_tile_generic_impl(const T* S, int64_t rows, int64_t cols, int64_t ld, T* row_max,
                           T* row_sum, T* col_max, T* col_sum, T* col_scratch) {
  const T ninf = -std::numeric_limits<T>::infinity();
  if (COL) std::fill(col_scratch, col_scratch + cols, ninf);
  // Pass 1: the tile's row and column maxima, then rescale the running sums to the new maxima.
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = S + i * ld;
    T m = ninf;
    for (int64_t j = 0; j < cols; ++j) {
      m = std::max(m, s[j]);
      if (COL) col_scratch[j] = std::max(col_scratch[j], s[j]);
    }
    const T m_new = std::max(row_max[i], m);
    row_sum[i] *= std::exp(row_max[i] - m_new);
    row_max[i] = m_new;
  }
  if (COL) {
    for (int64_t j = 0; j < cols; ++j) {
      const T m_new = std::max(col_max[j], col_scratch[j]);
      col_sum[j] *= std::exp(col_max[j] - m_new);
      col_max[j] = m_new;
    }
  }
  // Pass 2: the two shifted exponentials of every element.
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = S + i * ld;
    const T m = row_max[i];
    T acc = 0;
    for (int64_t j = 0; j < cols; ++j) {
      acc += std::exp(s[j] - m);
      if (COL) col_sum[j] += std::exp(s[j] - col_max[j]);
    }
    row_sum[i] += acc;
  }
}

template <typename T>
void fwd_tile_generic(const T* S, int64_t rows, int64_t cols, int64_t ld, T* row_max, T* row_sum,
                      T* col_max, T* col_sum, T* col_scratch) {
  if (col_max != nullptr) {
    fwd_tile_generic_impl<T, true>(S, rows, cols, ld, row_max, row_sum, col_max, col_sum,
                                   col_scratch);
  } else {
    fwd_tile_generic_impl<T, false>(S, rows, cols, ld, row_max, row_sum, nullptr, nullptr,
                                    nullptr);
  }
}

template <typename T>
void bwd_tile_generic(T* S, int64_t rows, int64_t cols, int64_t ld, const T* row_off,
                      const T* row_w, const T* col_off, const T* col_w) {
  for (int64_t i = 0; i < rows; ++i) {
    T* s = S + i * ld;
    const T ro = row_w ? row_off[i] : T(0);
    const T rw = row_w ? row_w[i] : T(0);
    for (int64_t j = 0; j < cols; ++j) {
      T g = row_w ? rw * std::exp(s[j] - ro) : T(0);
      if (col_w) g += col_w[j] * std::exp(s[j] - col_off[j]);
      s[j] = g;
    }
  }
}

#if CK_X86_SIMD

// 2^f on [-1/2, 1/2]: degree-6 polynomial fitted for relative error (1.9e-9 in exact arithmetic,
// ≤ 1.1e-7 ≈ 1 ulp with float32 Horner). Shared by the AVX-512 and AVX2 paths.
constexpr float kP0 = 1.000000000e+00f, kP1 = 6.931471825e-01f, kP2 = 2.402264625e-01f,
                kP3 = 5.550328642e-02f, kP4 = 9.618489072e-03f, kP5 = 1.339993090e-03f,
                kP6 = 1.534581097e-04f;
constexpr float kLog2ef = 1.44269504088896341f;

#define CK_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define CK_AVX2 __attribute__((target("avx2,fma")))

// ---------------------------------------- AVX-512 --------------------------------------------------

// exp2(x) = 2^n · 2^f with n = round(x), f = x − n ∈ [−1/2, 1/2]; vscalefps applies 2^n with correct
// overflow (→ inf) and underflow (→ 0/denormal). Clamping at −127 keeps n in range; anything below
// that is < 2^-126, far below float resolution relative to the (≥ 1) sums it is added to.
// max(c, x) returns x when x is NaN, so NaN propagates into the statistics instead of vanishing.
CK_AVX512 inline __m512 exp2_avx512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-127.f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kP6), f, _mm512_set1_ps(kP5));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP4));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP3));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP1));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP0));
  return _mm512_scalef_ps(p, n);
}

// e^x for x = S − offset, the (small) difference of two float logits: the offset is subtracted
// first, exactly where the weight matters, and only then scaled by log2(e). (Folding log2(e) into
// the GEMM instead would round the row/column offsets a second time; at |S| ~ 10^4 — scale 100,
// unnormalised inputs — that alone is a ~5e-4 relative error in the weights. The multiply costs one
// op of the ~12 per exponential.)
CK_AVX512 inline __m512 exp_avx512(__m512 x) {
  return exp2_avx512(_mm512_mul_ps(x, _mm512_set1_ps(kLog2ef)));
}

template <bool COL>
CK_AVX512 void fwd_tile_avx512_impl(const float* S, int64_t rows, int64_t cols, int64_t ld,
                                    float* row_max, float* row_sum, float* col_max,
                                    float* col_sum, float* col_scratch) {
  const int64_t nfull = cols & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (cols - nfull)) - 1u);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 zero = _mm512_setzero_ps();

  // Pass 1: row maxima (two accumulators for ILP) and column maxima of the tile, then move the
  // running row sums to the new row maxima.
  if (COL) {
    for (int64_t j = 0; j < nfull; j += 16) _mm512_storeu_ps(col_scratch + j, ninf);
    if (tail) _mm512_mask_storeu_ps(col_scratch + nfull, tail, ninf);
  }
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = S + i * ld;
    __m512 m0 = ninf, m1 = ninf;
    int64_t j = 0;
    for (; j + 32 <= nfull; j += 32) {
      const __m512 x0 = _mm512_loadu_ps(s + j);
      const __m512 x1 = _mm512_loadu_ps(s + j + 16);
      m0 = _mm512_max_ps(m0, x0);
      m1 = _mm512_max_ps(m1, x1);
      if (COL) {
        _mm512_storeu_ps(col_scratch + j, _mm512_max_ps(_mm512_loadu_ps(col_scratch + j), x0));
        _mm512_storeu_ps(col_scratch + j + 16,
                         _mm512_max_ps(_mm512_loadu_ps(col_scratch + j + 16), x1));
      }
    }
    for (; j < nfull; j += 16) {
      const __m512 x = _mm512_loadu_ps(s + j);
      m0 = _mm512_max_ps(m0, x);
      if (COL) _mm512_storeu_ps(col_scratch + j, _mm512_max_ps(_mm512_loadu_ps(col_scratch + j), x));
    }
    if (tail) {
      const __m512 x = _mm512_mask_loadu_ps(ninf, tail, s + nfull);
      m0 = _mm512_max_ps(m0, x);
      if (COL) {
        const __m512 c = _mm512_mask_loadu_ps(ninf, tail, col_scratch + nfull);
        _mm512_mask_storeu_ps(col_scratch + nfull, tail, _mm512_max_ps(c, x));
      }
    }
    const float m_new = std::max(row_max[i], _mm512_reduce_max_ps(_mm512_max_ps(m0, m1)));
    row_sum[i] *= std::exp(row_max[i] - m_new);
    row_max[i] = m_new;
  }
  if (COL) {
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 k = j < nfull ? static_cast<__mmask16>(0xFFFF) : tail;
      const __m512 cm = _mm512_maskz_loadu_ps(k, col_max + j);
      const __m512 cn = _mm512_max_ps(cm, _mm512_maskz_loadu_ps(k, col_scratch + j));
      const __m512 cs = _mm512_maskz_loadu_ps(k, col_sum + j);
      _mm512_mask_storeu_ps(col_sum + j, k, _mm512_mul_ps(cs, exp_avx512(_mm512_sub_ps(cm, cn))));
      _mm512_mask_storeu_ps(col_max + j, k, cn);
    }
  }

  // Pass 2: exp(S − row max) summed along the row (one vector accumulator per row, reduced once)
  // and exp(S − column max) added to the column sums, which stay in L1 across the rows.
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = S + i * ld;
    const __m512 mi = _mm512_set1_ps(row_max[i]);
    __m512 acc = zero;
    for (int64_t j = 0; j < nfull; j += 16) {
      const __m512 x = _mm512_loadu_ps(s + j);
      acc = _mm512_add_ps(acc, exp_avx512(_mm512_sub_ps(x, mi)));
      if (COL) {
        const __m512 e = exp_avx512(_mm512_sub_ps(x, _mm512_loadu_ps(col_max + j)));
        _mm512_storeu_ps(col_sum + j, _mm512_add_ps(_mm512_loadu_ps(col_sum + j), e));
      }
    }
    if (tail) {
      const __m512 x = _mm512_maskz_loadu_ps(tail, s + nfull);
      acc = _mm512_mask_add_ps(acc, tail, acc, exp_avx512(_mm512_sub_ps(x, mi)));
      if (COL) {
        const __m512 e = exp_avx512(_mm512_sub_ps(x, _mm512_maskz_loadu_ps(tail, col_max + nfull)));
        const __m512 cs = _mm512_maskz_loadu_ps(tail, col_sum + nfull);
        _mm512_mask_storeu_ps(col_sum + nfull, tail, _mm512_add_ps(cs, e));
      }
    }
    row_sum[i] += _mm512_reduce_add_ps(acc);
  }
}

CK_AVX512 void fwd_tile_avx512(const float* S, int64_t rows, int64_t cols, int64_t ld,
                               float* row_max, float* row_sum, float* col_max, float* col_sum,
                               float* col_scratch) {
  if (col_max != nullptr) {
    fwd_tile_avx512_impl<true>(S, rows, cols, ld, row_max, row_sum, col_max, col_sum, col_scratch);
  } else {
    fwd_tile_avx512_impl<false>(S, rows, cols, ld, row_max, row_sum, nullptr, nullptr, nullptr);
  }
}

template <bool ROW, bool COL>
CK_AVX512 void bwd_tile_avx512_impl(float* S, int64_t rows, int64_t cols, int64_t ld,
                                    const float* row_off, const float* row_w,
                                    const float* col_off, const float* col_w) {
  const int64_t nfull = cols & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (cols - nfull)) - 1u);
  for (int64_t i = 0; i < rows; ++i) {
    float* s = S + i * ld;
    const __m512 ro = _mm512_set1_ps(ROW ? row_off[i] : 0.f);
    const __m512 rw = _mm512_set1_ps(ROW ? row_w[i] : 0.f);
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 k = j < nfull ? static_cast<__mmask16>(0xFFFF) : tail;
      const __m512 x = _mm512_maskz_loadu_ps(k, s + j);
      __m512 g = ROW ? _mm512_mul_ps(rw, exp_avx512(_mm512_sub_ps(x, ro))) : _mm512_setzero_ps();
      if (COL) {
        const __m512 e = exp_avx512(_mm512_sub_ps(x, _mm512_maskz_loadu_ps(k, col_off + j)));
        g = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, col_w + j), e, g);
      }
      _mm512_mask_storeu_ps(s + j, k, g);
    }
  }
}

CK_AVX512 void bwd_tile_avx512(float* S, int64_t rows, int64_t cols, int64_t ld,
                               const float* row_off, const float* row_w, const float* col_off,
                               const float* col_w) {
  if (row_w && col_w) {
    bwd_tile_avx512_impl<true, true>(S, rows, cols, ld, row_off, row_w, col_off, col_w);
  } else if (row_w) {
    bwd_tile_avx512_impl<true, false>(S, rows, cols, ld, row_off, row_w, nullptr, nullptr);
  } else if (col_w) {
    bwd_tile_avx512_impl<false, true>(S, rows, cols, ld, nullptr, nullptr, col_off, col_w);
  } else {
    for (int64_t i = 0; i < rows; ++i) std::fill(S + i * ld, S + i * ld + cols, 0.f);
  }
}

// ------------------------------------------ AVX2 ---------------------------------------------------

// Same polynomial; 2^n is built in the exponent field. n = −127 gives exactly 0, n = 128 gives +inf.
CK_AVX2 inline __m256 exp2_avx2(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-127.f), x);
  x = _mm256_min_ps(_mm256_set1_ps(128.f), x);
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kP6), f, _mm256_set1_ps(kP5));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP0));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

CK_AVX2 inline __m256 exp_avx2(__m256 x) {
  return exp2_avx2(_mm256_mul_ps(x, _mm256_set1_ps(kLog2ef)));
}

CK_AVX2 inline float hmax_avx2(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

CK_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  m = _mm_add_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

template <bool COL>
CK_AVX2 void fwd_tile_avx2_impl(const float* S, int64_t rows, int64_t cols, int64_t ld,
                                float* row_max, float* row_sum, float* col_max, float* col_sum,
                                float* col_scratch) {
  const int64_t nfull = cols & ~int64_t(7);
  const float ninf_s = -std::numeric_limits<float>::infinity();
  const __m256 ninf = _mm256_set1_ps(ninf_s);
  if (COL) std::fill(col_scratch, col_scratch + cols, ninf_s);
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = S + i * ld;
    __m256 m0 = ninf;
    for (int64_t j = 0; j < nfull; j += 8) {
      const __m256 x = _mm256_loadu_ps(s + j);
      m0 = _mm256_max_ps(m0, x);
      if (COL) _mm256_storeu_ps(col_scratch + j, _mm256_max_ps(_mm256_loadu_ps(col_scratch + j), x));
    }
    float m = hmax_avx2(m0);
    for (int64_t j = nfull; j < cols; ++j) {
      m = std::max(m, s[j]);
      if (COL) col_scratch[j] = std::max(col_scratch[j], s[j]);
    }
    const float m_new = std::max(row_max[i], m);
    row_sum[i] *= std::exp(row_max[i] - m_new);
    row_max[i] = m_new;
  }
  if (COL) {
    for (int64_t j = 0; j < nfull; j += 8) {
      const __m256 cm = _mm256_loadu_ps(col_max + j);
      const __m256 cn = _mm256_max_ps(cm, _mm256_loadu_ps(col_scratch + j));
      const __m256 cs = _mm256_loadu_ps(col_sum + j);
      _mm256_storeu_ps(col_sum + j, _mm256_mul_ps(cs, exp_avx2(_mm256_sub_ps(cm, cn))));
      _mm256_storeu_ps(col_max + j, cn);
    }
    for (int64_t j = nfull; j < cols; ++j) {
      const float cn = std::max(col_max[j], col_scratch[j]);
      col_sum[j] *= std::exp(col_max[j] - cn);
      col_max[j] = cn;
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = S + i * ld;
    const __m256 mi = _mm256_set1_ps(row_max[i]);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < nfull; j += 8) {
      const __m256 x = _mm256_loadu_ps(s + j);
      acc = _mm256_add_ps(acc, exp_avx2(_mm256_sub_ps(x, mi)));
      if (COL) {
        const __m256 e = exp_avx2(_mm256_sub_ps(x, _mm256_loadu_ps(col_max + j)));
        _mm256_storeu_ps(col_sum + j, _mm256_add_ps(_mm256_loadu_ps(col_sum + j), e));
      }
    }
    float a = hsum_avx2(acc);
    for (int64_t j = nfull; j < cols; ++j) {
      a += std::exp(s[j] - row_max[i]);
      if (COL) col_sum[j] += std::exp(s[j] - col_max[j]);
    }
    row_sum[i] += a;
  }
}

CK_AVX2 void fwd_tile_avx2(const float* S, int64_t rows, int64_t cols, int64_t ld, float* row_max,
                           float* row_sum, float* col_max, float* col_sum, float* col_scratch) {
  if (col_max != nullptr) {
    fwd_tile_avx2_impl<true>(S, rows, cols, ld, row_max, row_sum, col_max, col_sum, col_scratch);
  } else {
    fwd_tile_avx2_impl<false>(S, rows, cols, ld, row_max, row_sum, nullptr, nullptr, nullptr);
  }
}

template <bool ROW, bool COL>
CK_AVX2 void bwd_tile_avx2_impl(float* S, int64_t rows, int64_t cols, int64_t ld,
                                const float* row_off, const float* row_w, const float* col_off,
                                const float* col_w) {
  const int64_t nfull = cols & ~int64_t(7);
  for (int64_t i = 0; i < rows; ++i) {
    float* s = S + i * ld;
    const float ro_s = ROW ? row_off[i] : 0.f, rw_s = ROW ? row_w[i] : 0.f;
    const __m256 ro = _mm256_set1_ps(ro_s), rw = _mm256_set1_ps(rw_s);
    for (int64_t j = 0; j < nfull; j += 8) {
      const __m256 x = _mm256_loadu_ps(s + j);
      __m256 g = ROW ? _mm256_mul_ps(rw, exp_avx2(_mm256_sub_ps(x, ro))) : _mm256_setzero_ps();
      if (COL) {
        const __m256 e = exp_avx2(_mm256_sub_ps(x, _mm256_loadu_ps(col_off + j)));
        g = _mm256_fmadd_ps(_mm256_loadu_ps(col_w + j), e, g);
      }
      _mm256_storeu_ps(s + j, g);
    }
    for (int64_t j = nfull; j < cols; ++j) {
      float g = ROW ? rw_s * std::exp(s[j] - ro_s) : 0.f;
      if (COL) g += col_w[j] * std::exp(s[j] - col_off[j]);
      s[j] = g;
    }
  }
}

CK_AVX2 void bwd_tile_avx2(float* S, int64_t rows, int64_t cols, int64_t ld, const float* row_off,
                           const float* row_w, const float* col_off, const float* col_w) {
  if (row_w && col_w) {
    bwd_tile_avx2_impl<true, true>(S, rows, cols, ld, row_off, row_w, col_off, col_w);
  } else if (row_w) {
    bwd_tile_avx2_impl<true, false>(S, rows, cols, ld, row_off, row_w, nullptr, nullptr);
  } else if (col_w) {
    bwd_tile_avx2_impl<false, true>(S, rows, cols, ld, nullptr, nullptr, col_off, col_w);
  } else {
    for (int64_t i = 0; i < rows; ++i) std::fill(S + i * ld, S + i * ld + cols, 0.f);
  }
}

#endif  // CK_X86_SIMD

// --------------------------------------------------------------------------------------------------
// Run-time selection.
// --------------------------------------------------------------------------------------------------

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa hardware_isa() {
  static const Isa isa = [] {
#if CK_X86_SIMD
    __builtin_cpu_init();
    // cpuid feature bits; GCC/Clang also check that the OS saves the wider register state.
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma")) {
      return Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
    return Isa::kScalar;
  }();
  return isa;
}

Isa selected_isa() {
  const Isa hw = hardware_isa();
  const char* env = std::getenv("CK_CPU_ISA");
  if (env == nullptr || *env == '\0') return hw;
  Isa want = hw;
  if (std::strcmp(env, "scalar") == 0) want = Isa::kScalar;
  else if (std::strcmp(env, "avx2") == 0) want = Isa::kAvx2;
  else if (std::strcmp(env, "avx512") == 0) want = Isa::kAvx512;
  return static_cast<Isa>(std::min(static_cast<int>(want), static_cast<int>(hw)));
}

}  // namespace

TileKernels<float> tile_kernels_f32() {
  switch (selected_isa()) {
#if CK_X86_SIMD
    case Isa::kAvx512:
      return {&fwd_tile_avx512, &bwd_tile_avx512, "avx512"};
    case Isa::kAvx2:
      return {&fwd_tile_avx2, &bwd_tile_avx2, "avx2"};
#endif
    default:
      return {&fwd_tile_generic<float>, &bwd_tile_generic<float>, "scalar"};
  }
}

TileKernels<double> tile_kernels_f64() {
  return {&fwd_tile_generic<double>, &bwd_tile_generic<double>, "scalar"};
}

}  // namespace ck::cpu
