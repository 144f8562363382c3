// Element-wise tile passes of the LSE kernels (see lse_tiles.h for the contract).
//
// Cost model: per logit the forward does 2·D FLOPs of GEMM and the backward 6·D, against two
// exponentials (~12 vector ops each) and a few max/add/fma here: at D = 256 on AVX-512 this file
// is ~8% of the forward and ~3% of the backward. It is written for throughput: the tile (≤ 512 KiB)
// stays in L2 between the GEMM that writes it and the passes that read it, every loop is a
// unit-stride vector loop, and tails are masked (AVX-512) or scalar (AVX2), never padded.
//
// The −inf guards of the online max (simd.h: rescale_exponent, exp_offset) are applied once per row
// and once per column of a tile, never per element: the plain path pays O(rows + cols) per tile for
// them, and the element loops are the same as without exclusion.

#include "lse_tiles.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "isa.h"
#include "simd.h"

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
    row_sum[i] *= std::exp(rescale_exponent(row_max[i], m_new));
    row_max[i] = m_new;
  }
  if (COL) {
    for (int64_t j = 0; j < cols; ++j) {
      const T m_new = std::max(col_max[j], col_scratch[j]);
      col_sum[j] *= std::exp(rescale_exponent(col_max[j], m_new));
      col_max[j] = m_new;
      col_scratch[j] = exp_offset(m_new);
    }
  }
  // Pass 2: the two shifted exponentials of every element.
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = S + i * ld;
    const T o = exp_offset(row_max[i]);
    T acc = 0;
    for (int64_t j = 0; j < cols; ++j) {
      acc += std::exp(s[j] - o);
      if (COL) col_sum[j] += std::exp(s[j] - col_scratch[j]);
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

template <typename T>
void pos_sum_generic(const T* S, int64_t rows, int64_t cols, int64_t ld, const int32_t* row_ids,
                     const int32_t* col_ids, T* pos) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = S + i * ld;
    const int32_t ri = row_ids[i];
    T acc = 0;
    for (int64_t j = 0; j < cols; ++j) acc += col_ids[j] == ri ? s[j] : T(0);
    pos[i] += acc;
  }
}

template <typename T>
void pos_add_generic(T* G, int64_t rows, int64_t cols, int64_t ld, const int32_t* row_ids,
                     const int32_t* col_ids, const T* grad_pos) {
  for (int64_t i = 0; i < rows; ++i) {
    T* g = G + i * ld;
    const int32_t ri = row_ids[i];
    const T gp = grad_pos[i];
    for (int64_t j = 0; j < cols; ++j) {
      if (col_ids[j] == ri) g[j] += gp;
    }
  }
}

#if CK_X86_SIMD

// ---------------------------------------- AVX-512 --------------------------------------------------

template <bool COL>
CK_AVX512 void fwd_tile_avx512_impl(const float* S, int64_t rows, int64_t cols, int64_t ld,
                                    float* row_max, float* row_sum, float* col_max,
                                    float* col_sum, float* col_scratch) {
  const int64_t nfull = cols & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (cols - nfull)) - 1u);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 pinf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
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
      if (COL) {
        _mm512_storeu_ps(col_scratch + j, _mm512_max_ps(_mm512_loadu_ps(col_scratch + j), x));
      }
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
    row_sum[i] *= std::exp(rescale_exponent(row_max[i], m_new));
    row_max[i] = m_new;
  }
  if (COL) {
    // New column maxima; the scratch then holds the offsets of pass 2 (+inf where the max is −inf).
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 k = j < nfull ? static_cast<__mmask16>(0xFFFF) : tail;
      const __m512 cm = _mm512_maskz_loadu_ps(k, col_max + j);
      const __m512 cn = _mm512_max_ps(cm, _mm512_maskz_loadu_ps(k, col_scratch + j));
      const __mmask16 same = _mm512_cmp_ps_mask(cm, cn, _CMP_EQ_OQ);
      const __m512 e = exp_avx512(_mm512_mask_mov_ps(_mm512_sub_ps(cm, cn), same, zero));
      const __m512 cs = _mm512_maskz_loadu_ps(k, col_sum + j);
      _mm512_mask_storeu_ps(col_sum + j, k, _mm512_mul_ps(cs, e));
      _mm512_mask_storeu_ps(col_max + j, k, cn);
      const __mmask16 empty = _mm512_cmp_ps_mask(cn, ninf, _CMP_EQ_OQ);
      _mm512_mask_storeu_ps(col_scratch + j, k, _mm512_mask_mov_ps(cn, empty, pinf));
    }
  }

  // Pass 2: exp(S − row max) summed along the row (one vector accumulator per row, reduced once)
  // and exp(S − column max) added to the column sums, which stay in L1 across the rows.
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = S + i * ld;
    const __m512 mi = _mm512_set1_ps(exp_offset(row_max[i]));
    __m512 acc = zero;
    for (int64_t j = 0; j < nfull; j += 16) {
      const __m512 x = _mm512_loadu_ps(s + j);
      acc = _mm512_add_ps(acc, exp_avx512(_mm512_sub_ps(x, mi)));
      if (COL) {
        const __m512 e = exp_avx512(_mm512_sub_ps(x, _mm512_loadu_ps(col_scratch + j)));
        _mm512_storeu_ps(col_sum + j, _mm512_add_ps(_mm512_loadu_ps(col_sum + j), e));
      }
    }
    if (tail) {
      const __m512 x = _mm512_maskz_loadu_ps(tail, s + nfull);
      acc = _mm512_mask_add_ps(acc, tail, acc, exp_avx512(_mm512_sub_ps(x, mi)));
      if (COL) {
        const __m512 o = _mm512_maskz_loadu_ps(tail, col_scratch + nfull);
        const __m512 e = exp_avx512(_mm512_sub_ps(x, o));
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

// Class passes: one int32 compare per element; only the positive lanes are loaded (sum) or
// written (add), so a masked-out lane costs nothing but the compare.
CK_AVX512 void pos_sum_avx512(const float* S, int64_t rows, int64_t cols, int64_t ld,
                              const int32_t* row_ids, const int32_t* col_ids, float* pos) {
  const int64_t nfull = cols & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (cols - nfull)) - 1u);
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = S + i * ld;
    const __m512i ri = _mm512_set1_epi32(row_ids[i]);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 k = j < nfull ? static_cast<__mmask16>(0xFFFF) : tail;
      const __m512i ids = _mm512_maskz_loadu_epi32(k, col_ids + j);
      const __mmask16 eq = _mm512_mask_cmpeq_epi32_mask(k, ids, ri);
      acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(eq, s + j));
    }
    pos[i] += _mm512_reduce_add_ps(acc);
  }
}

CK_AVX512 void pos_add_avx512(float* G, int64_t rows, int64_t cols, int64_t ld,
                              const int32_t* row_ids, const int32_t* col_ids,
                              const float* grad_pos) {
  const int64_t nfull = cols & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (cols - nfull)) - 1u);
  for (int64_t i = 0; i < rows; ++i) {
    float* g = G + i * ld;
    const __m512i ri = _mm512_set1_epi32(row_ids[i]);
    const __m512 gp = _mm512_set1_ps(grad_pos[i]);
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 k = j < nfull ? static_cast<__mmask16>(0xFFFF) : tail;
      const __m512i ids = _mm512_maskz_loadu_epi32(k, col_ids + j);
      const __mmask16 eq = _mm512_mask_cmpeq_epi32_mask(k, ids, ri);
      _mm512_mask_storeu_ps(g + j, eq, _mm512_add_ps(_mm512_maskz_loadu_ps(eq, g + j), gp));
    }
  }
}

// ------------------------------------------ AVX2 ---------------------------------------------------

template <bool COL>
CK_AVX2 void fwd_tile_avx2_impl(const float* S, int64_t rows, int64_t cols, int64_t ld,
                                float* row_max, float* row_sum, float* col_max, float* col_sum,
                                float* col_scratch) {
  const int64_t nfull = cols & ~int64_t(7);
  const float ninf_s = -std::numeric_limits<float>::infinity();
  const __m256 ninf = _mm256_set1_ps(ninf_s);
  const __m256 pinf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  if (COL) std::fill(col_scratch, col_scratch + cols, ninf_s);
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = S + i * ld;
    __m256 m0 = ninf;
    for (int64_t j = 0; j < nfull; j += 8) {
      const __m256 x = _mm256_loadu_ps(s + j);
      m0 = _mm256_max_ps(m0, x);
      if (COL) {
        _mm256_storeu_ps(col_scratch + j, _mm256_max_ps(_mm256_loadu_ps(col_scratch + j), x));
      }
    }
    float m = hmax_avx2(m0);
    for (int64_t j = nfull; j < cols; ++j) {
      m = std::max(m, s[j]);
      if (COL) col_scratch[j] = std::max(col_scratch[j], s[j]);
    }
    const float m_new = std::max(row_max[i], m);
    row_sum[i] *= std::exp(rescale_exponent(row_max[i], m_new));
    row_max[i] = m_new;
  }
  if (COL) {
    for (int64_t j = 0; j < nfull; j += 8) {
      const __m256 cm = _mm256_loadu_ps(col_max + j);
      const __m256 cn = _mm256_max_ps(cm, _mm256_loadu_ps(col_scratch + j));
      const __m256 same = _mm256_cmp_ps(cm, cn, _CMP_EQ_OQ);
      const __m256 e = exp_avx2(_mm256_andnot_ps(same, _mm256_sub_ps(cm, cn)));
      _mm256_storeu_ps(col_sum + j, _mm256_mul_ps(_mm256_loadu_ps(col_sum + j), e));
      _mm256_storeu_ps(col_max + j, cn);
      _mm256_storeu_ps(col_scratch + j,
                       _mm256_blendv_ps(cn, pinf, _mm256_cmp_ps(cn, ninf, _CMP_EQ_OQ)));
    }
    for (int64_t j = nfull; j < cols; ++j) {
      const float cn = std::max(col_max[j], col_scratch[j]);
      col_sum[j] *= std::exp(rescale_exponent(col_max[j], cn));
      col_max[j] = cn;
      col_scratch[j] = exp_offset(cn);
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = S + i * ld;
    const float o = exp_offset(row_max[i]);
    const __m256 mi = _mm256_set1_ps(o);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < nfull; j += 8) {
      const __m256 x = _mm256_loadu_ps(s + j);
      acc = _mm256_add_ps(acc, exp_avx2(_mm256_sub_ps(x, mi)));
      if (COL) {
        const __m256 e = exp_avx2(_mm256_sub_ps(x, _mm256_loadu_ps(col_scratch + j)));
        _mm256_storeu_ps(col_sum + j, _mm256_add_ps(_mm256_loadu_ps(col_sum + j), e));
      }
    }
    float a = hsum_avx2(acc);
    for (int64_t j = nfull; j < cols; ++j) {
      a += std::exp(s[j] - o);
      if (COL) col_sum[j] += std::exp(s[j] - col_scratch[j]);
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

CK_AVX2 void pos_sum_avx2(const float* S, int64_t rows, int64_t cols, int64_t ld,
                          const int32_t* row_ids, const int32_t* col_ids, float* pos) {
  const int64_t nfull = cols & ~int64_t(7);
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = S + i * ld;
    const int32_t ri_s = row_ids[i];
    const __m256i ri = _mm256_set1_epi32(ri_s);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < nfull; j += 8) {
      const __m256i ids = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col_ids + j));
      const __m256 eq = _mm256_castsi256_ps(_mm256_cmpeq_epi32(ids, ri));
      acc = _mm256_add_ps(acc, _mm256_and_ps(eq, _mm256_loadu_ps(s + j)));
    }
    float a = hsum_avx2(acc);
    for (int64_t j = nfull; j < cols; ++j) a += col_ids[j] == ri_s ? s[j] : 0.f;
    pos[i] += a;
  }
}

CK_AVX2 void pos_add_avx2(float* G, int64_t rows, int64_t cols, int64_t ld,
                          const int32_t* row_ids, const int32_t* col_ids, const float* grad_pos) {
  const int64_t nfull = cols & ~int64_t(7);
  for (int64_t i = 0; i < rows; ++i) {
    float* g = G + i * ld;
    const int32_t ri_s = row_ids[i];
    const __m256i ri = _mm256_set1_epi32(ri_s);
    const __m256 gp = _mm256_set1_ps(grad_pos[i]);
    for (int64_t j = 0; j < nfull; j += 8) {
      const __m256i ids = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col_ids + j));
      const __m256 eq = _mm256_castsi256_ps(_mm256_cmpeq_epi32(ids, ri));
      _mm256_storeu_ps(g + j, _mm256_add_ps(_mm256_loadu_ps(g + j), _mm256_and_ps(eq, gp)));
    }
    for (int64_t j = nfull; j < cols; ++j) {
      if (col_ids[j] == ri_s) g[j] += grad_pos[i];
    }
  }
}

#endif  // CK_X86_SIMD

}  // namespace

template <>
LseTileKernels<float> lse_tile_kernels<float>() {
  const Isa isa = selected_isa();
  switch (isa) {
#if CK_X86_SIMD
    case Isa::kAvx512Bf16:  // the same float32 passes; bf16 only changes the tile GEMMs
    case Isa::kAvx512:
      return {&fwd_tile_avx512, &bwd_tile_avx512, &pos_sum_avx512, &pos_add_avx512, isa_name(isa)};
    case Isa::kAvx2:
      return {&fwd_tile_avx2, &bwd_tile_avx2, &pos_sum_avx2, &pos_add_avx2, isa_name(isa)};
#endif
    default:
      return {&fwd_tile_generic<float>, &bwd_tile_generic<float>, &pos_sum_generic<float>,
              &pos_add_generic<float>, isa_name(Isa::kScalar)};
  }
}

template <>
LseTileKernels<double> lse_tile_kernels<double>() {
  return {&fwd_tile_generic<double>, &bwd_tile_generic<double>, &pos_sum_generic<double>,
          &pos_add_generic<double>, isa_name(Isa::kScalar)};
}

}  // namespace ck::cpu
