// Element-wise tile passes of the sigmoid kernels (see sigmoid_tiles.h for the contract).
//
// Cost model: per logit the forward does 2·D FLOPs of GEMM and, here, one exponential and one
// log1p (~14 and ~10 vector ops, the log1p with one division); the backward 6·D FLOPs of GEMM and
// one exponential and one division here. std::log1p costs ~11 ns a call on the 2-core AVX2 EPYC
// this was written on: 0.37 s for the 67 M elements of N = M = 8192 on 2 cores, more than the
// forward's GEMMs, hence the vector log1p of simd.h. The flip z = ±1 is a sign flip
// of the masked lanes, so the positives cost one int32 compare per element and no branch.

#include "sigmoid_tiles.h"

#include <algorithm>
#include <cmath>

#include "isa.h"
#include "simd.h"

namespace ck::cpu {
namespace {

// --------------------------------------------------------------------------------------------------
// Generic code: float64 checking path, float on CPUs without AVX2, and the AVX2 tails.
// --------------------------------------------------------------------------------------------------

template <typename T>
inline T softplus(T x) {
  return std::max(x, T(0)) + std::log1p(std::exp(-std::abs(x)));
}

template <typename T>
inline T sigmoid(T x) {
  const T t = std::exp(-std::abs(x));
  return (x >= T(0) ? T(1) : t) / (T(1) + t);
}

template <typename T>
void fwd_tile_generic(const T* S, int64_t rows, int64_t cols, int64_t ld, T bias,
                      const int32_t* row_ids, const int32_t* col_ids, T* row_loss) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = S + i * ld;
    T acc = 0;
    for (int64_t j = 0; j < cols; ++j) {
      const T l = s[j] + bias;
      acc += softplus(row_ids && col_ids[j] == row_ids[i] ? -l : l);
    }
    row_loss[i] += acc;
  }
}

template <typename T>
void bwd_tile_generic(T* S, int64_t rows, int64_t cols, int64_t ld, T bias, const int32_t* row_ids,
                      const int32_t* col_ids, const T* row_w, T* grad_bias) {
  for (int64_t i = 0; i < rows; ++i) {
    T* s = S + i * ld;
    const T w = row_w[i];
    T acc = 0;
    for (int64_t j = 0; j < cols; ++j) {
      const T l = s[j] + bias;
      const bool positive = row_ids && col_ids[j] == row_ids[i];
      const T g = w * sigmoid(positive ? -l : l);
      s[j] = positive ? -g : g;
      acc += s[j];
    }
    grad_bias[i] += acc;
  }
}

#if CK_X86_SIMD

// ---------------------------------------- AVX-512 --------------------------------------------------

// x = −z·L for 16 lanes: L with the sign flipped where the ids match (integer ops: AVX-512F has no
// float xor). `positive` receives the mask of the flipped lanes.
template <bool POS>
CK_AVX512 inline __m512 signed_logit_avx512(const float* s, const int32_t* col_ids, __mmask16 k,
                                            __m512 bias, __m512i ri, __mmask16* positive) {
  const __m512 l = _mm512_add_ps(_mm512_maskz_loadu_ps(k, s), bias);
  if (!POS) return l;
  *positive = _mm512_mask_cmpeq_epi32_mask(k, _mm512_maskz_loadu_epi32(k, col_ids), ri);
  const __m512i bits = _mm512_castps_si512(l);
  return _mm512_castsi512_ps(
      _mm512_mask_xor_epi32(bits, *positive, bits, _mm512_set1_epi32(INT32_MIN)));
}

// exp(−|x|): setting the sign bit is −|x| (one op).
CK_AVX512 inline __m512 exp_neg_abs_avx512(__m512 x) {
  return exp_nonpos_avx512(_mm512_castsi512_ps(
      _mm512_or_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN))));
}

template <bool POS>
CK_AVX512 void fwd_tile_avx512_impl(const float* S, int64_t rows, int64_t cols, int64_t ld,
                                    float bias, const int32_t* row_ids, const int32_t* col_ids,
                                    float* row_loss) {
  const int64_t nfull = cols & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (cols - nfull)) - 1u);
  const __m512 b = _mm512_set1_ps(bias), zero = _mm512_setzero_ps();
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = S + i * ld;
    const __m512i ri = _mm512_set1_epi32(POS ? row_ids[i] : 0);
    __m512 acc = zero;
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 k = j < nfull ? static_cast<__mmask16>(0xFFFF) : tail;
      __mmask16 positive = 0;
      const __m512 x = signed_logit_avx512<POS>(s + j, col_ids + j, k, b, ri, &positive);
      const __m512 t = exp_neg_abs_avx512(x);
      const __m512 sp = _mm512_add_ps(_mm512_max_ps(x, zero), log1p01_avx512(t));
      acc = _mm512_mask_add_ps(acc, k, acc, sp);
    }
    row_loss[i] += _mm512_reduce_add_ps(acc);
  }
}

template <bool POS>
CK_AVX512 void bwd_tile_avx512_impl(float* S, int64_t rows, int64_t cols, int64_t ld, float bias,
                                    const int32_t* row_ids, const int32_t* col_ids,
                                    const float* row_w, float* grad_bias) {
  const int64_t nfull = cols & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (cols - nfull)) - 1u);
  const __m512 b = _mm512_set1_ps(bias), zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < rows; ++i) {
    float* s = S + i * ld;
    const __m512i ri = _mm512_set1_epi32(POS ? row_ids[i] : 0);
    const __m512 w = _mm512_set1_ps(row_w[i]);
    __m512 acc = zero;
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 k = j < nfull ? static_cast<__mmask16>(0xFFFF) : tail;
      __mmask16 positive = 0;
      const __m512 x = signed_logit_avx512<POS>(s + j, col_ids + j, k, b, ri, &positive);
      const __m512 t = exp_neg_abs_avx512(x);
      const __m512 num = _mm512_mask_mov_ps(t, _mm512_cmp_ps_mask(x, zero, _CMP_GE_OQ), one);
      __m512 g = _mm512_mul_ps(w, _mm512_div_ps(num, _mm512_add_ps(one, t)));
      if (POS) g = _mm512_mask_sub_ps(g, positive, zero, g);
      _mm512_mask_storeu_ps(s + j, k, g);
      acc = _mm512_mask_add_ps(acc, k, acc, g);
    }
    grad_bias[i] += _mm512_reduce_add_ps(acc);
  }
}

CK_AVX512 void fwd_tile_avx512(const float* S, int64_t rows, int64_t cols, int64_t ld, float bias,
                               const int32_t* row_ids, const int32_t* col_ids, float* row_loss) {
  if (row_ids) fwd_tile_avx512_impl<true>(S, rows, cols, ld, bias, row_ids, col_ids, row_loss);
  else fwd_tile_avx512_impl<false>(S, rows, cols, ld, bias, nullptr, nullptr, row_loss);
}

CK_AVX512 void bwd_tile_avx512(float* S, int64_t rows, int64_t cols, int64_t ld, float bias,
                               const int32_t* row_ids, const int32_t* col_ids, const float* row_w,
                               float* grad_bias) {
  if (row_ids) {
    bwd_tile_avx512_impl<true>(S, rows, cols, ld, bias, row_ids, col_ids, row_w, grad_bias);
  } else {
    bwd_tile_avx512_impl<false>(S, rows, cols, ld, bias, nullptr, nullptr, row_w, grad_bias);
  }
}

// ------------------------------------------ AVX2 ---------------------------------------------------

template <bool POS>
CK_AVX2 inline __m256 signed_logit_avx2(const float* s, const int32_t* col_ids, __m256 bias,
                                        __m256i ri, __m256* positive) {
  const __m256 l = _mm256_add_ps(_mm256_loadu_ps(s), bias);
  if (!POS) return l;
  const __m256i ids = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col_ids));
  *positive = _mm256_castsi256_ps(_mm256_cmpeq_epi32(ids, ri));
  return _mm256_xor_ps(l, _mm256_and_ps(*positive, _mm256_set1_ps(-0.f)));
}

template <bool POS>
CK_AVX2 void fwd_tile_avx2_impl(const float* S, int64_t rows, int64_t cols, int64_t ld, float bias,
                                const int32_t* row_ids, const int32_t* col_ids, float* row_loss) {
  const int64_t nfull = cols & ~int64_t(7);
  const __m256 b = _mm256_set1_ps(bias), zero = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.f);
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = S + i * ld;
    const int32_t ri_s = POS ? row_ids[i] : 0;
    const __m256i ri = _mm256_set1_epi32(ri_s);
    __m256 acc = zero;
    for (int64_t j = 0; j < nfull; j += 8) {
      __m256 positive;
      const __m256 x = signed_logit_avx2<POS>(s + j, col_ids + j, b, ri, &positive);
      const __m256 t = exp_nonpos_avx2(_mm256_or_ps(x, sign));
      acc = _mm256_add_ps(acc, _mm256_add_ps(_mm256_max_ps(x, zero), log1p01_avx2(t)));
    }
    float a = hsum_avx2(acc);
    for (int64_t j = nfull; j < cols; ++j) {
      const float l = s[j] + bias;
      a += softplus(POS && col_ids[j] == ri_s ? -l : l);
    }
    row_loss[i] += a;
  }
}

template <bool POS>
CK_AVX2 void bwd_tile_avx2_impl(float* S, int64_t rows, int64_t cols, int64_t ld, float bias,
                                const int32_t* row_ids, const int32_t* col_ids, const float* row_w,
                                float* grad_bias) {
  const int64_t nfull = cols & ~int64_t(7);
  const __m256 b = _mm256_set1_ps(bias), zero = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.f);
  const __m256 one = _mm256_set1_ps(1.f);
  for (int64_t i = 0; i < rows; ++i) {
    float* s = S + i * ld;
    const int32_t ri_s = POS ? row_ids[i] : 0;
    const __m256i ri = _mm256_set1_epi32(ri_s);
    const float w_s = row_w[i];
    const __m256 w = _mm256_set1_ps(w_s);
    __m256 acc = zero;
    for (int64_t j = 0; j < nfull; j += 8) {
      __m256 positive = zero;
      const __m256 x = signed_logit_avx2<POS>(s + j, col_ids + j, b, ri, &positive);
      const __m256 t = exp_nonpos_avx2(_mm256_or_ps(x, sign));
      const __m256 num = _mm256_blendv_ps(t, one, _mm256_cmp_ps(x, zero, _CMP_GE_OQ));
      __m256 g = _mm256_mul_ps(w, _mm256_div_ps(num, _mm256_add_ps(one, t)));
      if (POS) g = _mm256_xor_ps(g, _mm256_and_ps(positive, sign));
      _mm256_storeu_ps(s + j, g);
      acc = _mm256_add_ps(acc, g);
    }
    float a = hsum_avx2(acc);
    for (int64_t j = nfull; j < cols; ++j) {
      const float l = s[j] + bias;
      const bool positive = POS && col_ids[j] == ri_s;
      const float g = w_s * sigmoid(positive ? -l : l);
      s[j] = positive ? -g : g;
      a += s[j];
    }
    grad_bias[i] += a;
  }
}

CK_AVX2 void fwd_tile_avx2(const float* S, int64_t rows, int64_t cols, int64_t ld, float bias,
                           const int32_t* row_ids, const int32_t* col_ids, float* row_loss) {
  if (row_ids) fwd_tile_avx2_impl<true>(S, rows, cols, ld, bias, row_ids, col_ids, row_loss);
  else fwd_tile_avx2_impl<false>(S, rows, cols, ld, bias, nullptr, nullptr, row_loss);
}

CK_AVX2 void bwd_tile_avx2(float* S, int64_t rows, int64_t cols, int64_t ld, float bias,
                           const int32_t* row_ids, const int32_t* col_ids, const float* row_w,
                           float* grad_bias) {
  if (row_ids) {
    bwd_tile_avx2_impl<true>(S, rows, cols, ld, bias, row_ids, col_ids, row_w, grad_bias);
  } else {
    bwd_tile_avx2_impl<false>(S, rows, cols, ld, bias, nullptr, nullptr, row_w, grad_bias);
  }
}

#endif  // CK_X86_SIMD

}  // namespace

template <>
SigmoidTileKernels<float> sigmoid_tile_kernels<float>() {
  const Isa isa = selected_isa();
  switch (isa) {
#if CK_X86_SIMD
    case Isa::kAvx512Bf16:  // the same float32 passes; bf16 only changes the tile GEMMs
    case Isa::kAvx512:
      return {&fwd_tile_avx512, &bwd_tile_avx512, isa_name(isa)};
    case Isa::kAvx2:
      return {&fwd_tile_avx2, &bwd_tile_avx2, isa_name(isa)};
#endif
    default:
      return {&fwd_tile_generic<float>, &bwd_tile_generic<float>, isa_name(Isa::kScalar)};
  }
}

template <>
SigmoidTileKernels<double> sigmoid_tile_kernels<double>() {
  return {&fwd_tile_generic<double>, &bwd_tile_generic<double>, isa_name(Isa::kScalar)};
}

}  // namespace ck::cpu
