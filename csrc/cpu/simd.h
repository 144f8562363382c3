// Vector math shared by the element-wise tile passes (lse_tiles.cpp, sigmoid_tiles.cpp): e^x and
// log1p for float32 lanes in AVX-512 and AVX2 variants, plus the scalar guards of the online max.
//
// Only these two files include this header, and every SIMD function carries a `target` attribute:
// nothing else in the extension is compiled for more than the baseline ISA (see isa.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
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

// ------------------------------------------------------------------------------------------------
// Scalar guards of the online max (every ISA uses them once per row or column, never per element).
// ------------------------------------------------------------------------------------------------

// Exponent of the rescale `sum *= exp(old_max − new_max)`: 0 when the maximum did not move. That
// keeps it NaN-free when both are −inf, i.e. a row or column that has so far seen only excluded
// (−inf) elements; its sum is 0 and stays 0.
template <typename T>
inline T rescale_exponent(T old_max, T new_max) {
  return old_max == new_max ? T(0) : old_max - new_max;
}

// The offset o of the second pass, exp(x − o). A running max of −inf means every element seen so
// far, x included, is −inf (excluded): o = +inf turns exp(−inf − (−inf)) = NaN into exp(−inf) = 0.
template <typename T>
inline T exp_offset(T running_max) {
  return running_max == -std::numeric_limits<T>::infinity() ? std::numeric_limits<T>::infinity()
                                                             : running_max;
}

#if CK_X86_SIMD

#define CK_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define CK_AVX2 __attribute__((target("avx2,fma")))

// 2^f on [-1/2, 1/2]: degree-6 polynomial fitted for relative error (1.9e-9 in exact arithmetic,
// ≤ 1.1e-7 ≈ 1 ulp with float32 Horner). p(0) = 1 exactly, so the element that holds a running
// max contributes exactly 1 to its sum (the reason row_lse ≥ every logit of its row, bit for bit).
constexpr float kP0 = 1.000000000e+00f, kP1 = 6.931471825e-01f, kP2 = 2.402264625e-01f,
                kP3 = 5.550328642e-02f, kP4 = 9.618489072e-03f, kP5 = 1.339993090e-03f,
                kP6 = 1.534581097e-04f;
constexpr float kLog2ef = 1.44269504088896341f;

// e^r on |r| ≤ ln2/2 as 1 + r + r²·E(r) (Cephes expf; ≤ 1 ulp), for exp_nonpos_*: there the
// argument is reduced as r = x − n·ln2 in two FMAs (Cody–Waite, ln2 = kLn2Hi + kLn2Lo with n·kLn2Hi
// exact), so the result keeps ~1 ulp relative accuracy for any x, where exp2(x·log2e) loses
// |x·log2e|·2^-24 in the product (4e-6 relative at x = −68).
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kE2 = 5.0000001201e-1f, kE3 = 1.6666665459e-1f, kE4 = 4.1665795894e-2f,
                kE5 = 8.3334519073e-3f, kE6 = 1.3981999507e-3f, kE7 = 1.9875691500e-4f;

// log1p(t) for t ∈ [0, 1] (softplus and σ only ever need log1p(exp(−|x|))) as 2·atanh(w),
// w = t/(2 + t) ∈ [0, 1/3], evaluated as 2w·P(w²) with P of degree 4 fitted for relative error
// (4.5e-9 in exact arithmetic, ≤ 2.6 ulp in float32 for t from 2^-100 to 1). Relative accuracy as
// t → 0 is the point: log(1 + t) drops t entirely below 2^-24 and is 2.6e-3 relative off already
// at t = 4.5e-5, the softplus of a SigLIP negative at initialisation (logit ≈ −10), which is most
// of the loss. The division is the one long-latency op; it is correctly rounded, and the lanes are
// independent, so its latency is hidden by the other rows' work.
constexpr float kL0 = 1.0f, kL1 = 0.3333320915699005f, kL2 = 0.2001076340675354f,
                kL3 = 0.14000901579856873f, kL4 = 0.14005997776985168f;

// ---------------------------------------- AVX-512 --------------------------------------------------

// exp2(x) = 2^n · 2^f with n = round(x), f = x − n ∈ [−1/2, 1/2]; vscalefps applies 2^n with
// correct overflow (→ inf) and gradual underflow. The clamp at −151 keeps n in range and makes
// every input below it (−inf: an excluded element, or a +inf offset) exactly 0, since 2^-151
// rounds to 0.
// max(c, x) returns x when x is NaN, so NaN propagates into the statistics instead of vanishing.
CK_AVX512 inline __m512 exp2_avx512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-151.f), x);
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

// e^x for x ≤ 0 (the sigmoid family's exp(−|x|)), accurate to ~1 ulp over the whole range, with
// gradual underflow; −inf and anything below −104 give exactly 0 (e^-104 < 2^-150). NaN propagates.
CK_AVX512 inline __m512 exp_nonpos_avx512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2ef)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kE7), r, _mm512_set1_ps(kE6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kE5));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kE4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kE3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kE2));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

CK_AVX512 inline __m512 log1p01_avx512(__m512 t) {
  const __m512 w = _mm512_div_ps(t, _mm512_add_ps(_mm512_set1_ps(2.f), t));
  const __m512 v = _mm512_mul_ps(w, w);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kL4), v, _mm512_set1_ps(kL3));
  p = _mm512_fmadd_ps(p, v, _mm512_set1_ps(kL2));
  p = _mm512_fmadd_ps(p, v, _mm512_set1_ps(kL1));
  p = _mm512_fmadd_ps(p, v, _mm512_set1_ps(kL0));
  return _mm512_mul_ps(_mm512_add_ps(w, w), p);
}

// ------------------------------------------ AVX2 ---------------------------------------------------

// Same polynomial; 2^n is built in the exponent field. n = −127 gives exactly 0 (so do −inf
// inputs), n = 128 gives +inf.
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

// As exp_nonpos_avx512, but 2^n is built in the exponent field, so results below 2^-126 (x < −87.3)
// flush to 0 instead of underflowing gradually; −inf gives exactly 0.
CK_AVX2 inline __m256 exp_nonpos_avx2(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-88.5f), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2ef)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kE7), r, _mm256_set1_ps(kE6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kE5));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kE4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kE3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kE2));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  // n = −127 (and a NaN's integer conversion, INT_MIN) give an exponent field of 0: the factor 0.
  const __m256i ni = _mm256_max_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(-127));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

CK_AVX2 inline __m256 log1p01_avx2(__m256 t) {
  const __m256 w = _mm256_div_ps(t, _mm256_add_ps(_mm256_set1_ps(2.f), t));
  const __m256 v = _mm256_mul_ps(w, w);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kL4), v, _mm256_set1_ps(kL3));
  p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(kL2));
  p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(kL1));
  p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(kL0));
  return _mm256_mul_ps(_mm256_add_ps(w, w), p);
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

#endif  // CK_X86_SIMD

}  // namespace ck::cpu
