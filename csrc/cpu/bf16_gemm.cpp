// bfloat16 GEMM on AVX512-BF16 (contract and layouts: bf16_gemm.h).
//
// Micro-kernel: kRows rows × one 64-column panel of C in 24 zmm accumulators; per pair of k, 4
// loads of B (one panel row of 64 words), kRows 32-bit broadcasts of A and 4·kRows vdpbf16ps.
// Row strips are the outer loop: the strip of A (kRows × k) stays in L1 while the panels of B
// stream from L2 (a 256 × 256 B is 128 KiB packed).

#include "bf16_gemm.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define CK_BF16_SIMD 1
#include <immintrin.h>
#define CK_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))
#else
#define CK_BF16_SIMD 0
#endif

namespace ck::cpu::bf16 {
namespace {

inline uint16_t bits(c10::BFloat16 v) { return v.x; }

// out = packed B with B[r][c] = get(r, c) for r < k, c < n (zero padding elsewhere).
template <typename Get>
void pack(int64_t k, int64_t n, const Get& get, uint32_t* out) {
  const int64_t kp = (k + 1) / 2;
  for (int64_t n0 = 0; n0 < n; n0 += kPanel) {
    const int64_t nc = std::min(kPanel, n - n0);
    for (int64_t p = 0; p < kp; ++p) {
      uint32_t* o = out + (n0 / kPanel * kp + p) * kPanel;
      const bool hi = 2 * p + 1 < k;
      for (int64_t c = 0; c < nc; ++c) {
        const uint32_t lo16 = get(2 * p, n0 + c);
        const uint32_t hi16 = hi ? get(2 * p + 1, n0 + c) : 0u;
        o[c] = lo16 | hi16 << 16;
      }
      std::fill(o + nc, o + kPanel, 0u);
    }
  }
}

#if CK_BF16_SIMD

inline uint32_t load_pair(const c10::BFloat16* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// acc[r][v] += the products of one k-pair: A's 32-bit word a_word(r) of row r (a bf16 pair) with
// the 64 words of the packed panel row b.
template <int kRows, typename AWord>
CK_AVX512BF16 inline void pair_step(__m512 (&acc)[kRows][4], const uint32_t* b,
                                    const AWord& a_word) {
  const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b);
  const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + 16);
  const __m512bh b2 = (__m512bh)_mm512_loadu_si512(b + 32);
  const __m512bh b3 = (__m512bh)_mm512_loadu_si512(b + 48);
  for (int r = 0; r < kRows; ++r) {
    const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a_word(r)));
    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
    acc[r][2] = _mm512_dpbf16_ps(acc[r][2], av, b2);
    acc[r][3] = _mm512_dpbf16_ps(acc[r][3], av, b3);
  }
}

template <int kRows>
CK_AVX512BF16 void micro(int64_t k, float alpha, const c10::BFloat16* A, int64_t a_row,
                         int64_t a_pair, const uint32_t* Bp, int64_t nc, float beta, float* C,
                         int64_t ldc) {
  __m512 acc[kRows][4];
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  const int64_t full = k / 2;
  for (int64_t p = 0; p < full; ++p) {
    const c10::BFloat16* a = A + p * a_pair;
    pair_step<kRows>(acc, Bp + p * kPanel, [&](int r) { return load_pair(a + r * a_row); });
  }
  if (k % 2) {  // the last, unpaired k: low half only (the packed high half is 0 anyway)
    const c10::BFloat16* a = A + full * a_pair;
    pair_step<kRows>(acc, Bp + full * kPanel,
                     [&](int r) { return static_cast<uint32_t>(bits(a[r * a_row])); });
  }
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  for (int v = 0; v < 4; ++v) {
    const int64_t c0 = 16 * v;
    if (c0 >= nc) break;
    const __mmask16 m =
        nc - c0 >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (nc - c0)) - 1);
    for (int r = 0; r < kRows; ++r) {
      float* c = C + r * ldc + c0;
      __m512 out = _mm512_mul_ps(acc[r][v], va);
      if (beta != 0.0f) out = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, c), vb, out);
      _mm512_mask_storeu_ps(c, m, out);
    }
  }
}

constexpr int kStrip = 6;  // rows per micro-kernel call (24 accumulators)

template <int kRows>
CK_AVX512BF16 void strip(int64_t n, int64_t k, float alpha, const c10::BFloat16* A, int64_t a_row,
                         int64_t a_pair, const uint32_t* Bp, float beta, float* C, int64_t ldc) {
  const int64_t panel_words = (k + 1) / 2 * kPanel;
  for (int64_t n0 = 0; n0 < n; n0 += kPanel) {
    micro<kRows>(k, alpha, A, a_row, a_pair, Bp + n0 / kPanel * panel_words,
                 std::min(kPanel, n - n0), beta, C + n0, ldc);
  }
}

#endif  // CK_BF16_SIMD

}  // namespace

void pack_rows(const c10::BFloat16* B, int64_t ldb, int64_t k, int64_t n, uint32_t* out) {
  pack(k, n, [&](int64_t r, int64_t c) { return bits(B[r * ldb + c]); }, out);
}

void pack_transposed(const c10::BFloat16* Bt, int64_t ldbt, int64_t k, int64_t n, uint32_t* out) {
  pack(k, n, [&](int64_t r, int64_t c) { return bits(Bt[c * ldbt + r]); }, out);
}

void gemm(int64_t m, int64_t n, int64_t k, float alpha, const c10::BFloat16* A, int64_t a_row,
          int64_t a_pair, const uint32_t* Bp, float beta, float* C, int64_t ldc) {
#if CK_BF16_SIMD
  int64_t i = 0;
  for (; i + kStrip <= m; i += kStrip) {
    strip<kStrip>(n, k, alpha, A + i * a_row, a_row, a_pair, Bp, beta, C + i * ldc, ldc);
  }
  const c10::BFloat16* a = A + i * a_row;
  float* c = C + i * ldc;
  switch (m - i) {
    case 5: strip<5>(n, k, alpha, a, a_row, a_pair, Bp, beta, c, ldc); break;
    case 4: strip<4>(n, k, alpha, a, a_row, a_pair, Bp, beta, c, ldc); break;
    case 3: strip<3>(n, k, alpha, a, a_row, a_pair, Bp, beta, c, ldc); break;
    case 2: strip<2>(n, k, alpha, a, a_row, a_pair, Bp, beta, c, ldc); break;
    case 1: strip<1>(n, k, alpha, a, a_row, a_pair, Bp, beta, c, ldc); break;
    default: break;
  }
#else
  TORCH_CHECK(false, "bf16 GEMM: no AVX512-BF16 path in this build");
#endif
}

#if CK_BF16_SIMD
CK_AVX512BF16 void round_tile(const float* G, int64_t rows, int64_t cols, int64_t ldg,
                              c10::BFloat16* rm, int64_t ld_rm, uint32_t* pairs,
                              int64_t ld_pairs) {
  const int64_t full = cols & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (cols - full)) - 1);
  for (int64_t i = 0; i < rows; ++i) {
    const float* g = G + i * ldg;
    c10::BFloat16* o = rm + i * ld_rm;
    for (int64_t j = 0; j < full; j += 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + j),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(g + j)));
    }
    if (tail) {
      _mm256_mask_storeu_epi16(o + full, tail,
                               (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(tail, g + full)));
    }
  }
  for (int64_t p = 0; p < (rows + 1) / 2; ++p) {
    const uint16_t* r0 = reinterpret_cast<const uint16_t*>(rm + 2 * p * ld_rm);
    const uint16_t* r1 = reinterpret_cast<const uint16_t*>(rm + (2 * p + 1) * ld_rm);
    uint32_t* o = pairs + p * ld_pairs;
    if (2 * p + 1 == rows) {  // odd last row: paired with 0
      for (int64_t j = 0; j < cols; ++j) o[j] = r0[j];
    } else {
      for (int64_t j = 0; j < cols; ++j) o[j] = uint32_t(r0[j]) | uint32_t(r1[j]) << 16;
    }
  }
}
#else
void round_tile(const float*, int64_t, int64_t, int64_t, c10::BFloat16*, int64_t, uint32_t*,
                int64_t) {
  TORCH_CHECK(false, "bf16 GEMM: no AVX512-BF16 path in this build");
}
#endif

}  // namespace ck::cpu::bf16
