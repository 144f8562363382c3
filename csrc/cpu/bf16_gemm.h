// bfloat16 × bfloat16 → float32 GEMM on the CPU's bf16 dot-product units (AVX512-BF16,
// vdpbf16ps), for the tile GEMMs of the LSE and sigmoid kernels when their inputs are bfloat16 and
// selected_isa() is kAvx512Bf16 (isa.h). Products of two bf16 values are exact in float32 and the
// accumulation is float32, one k-pair at a time in ascending k, so a result depends on (m, n, k)
// and the operands only: bitwise repeatable, whatever the buffer, thread or alignment.
//
// Why our own kernel: PyTorch exports no bf16 × bf16 → float32 GEMM that uses these units on a CPU
// without AMX (issue 25, benchmarks/NOTES.md "bf16 tile GEMMs"): cpublas::brgemm falls back to a
// float32-speed path there (could_pack(kBFloat16) is false), MKL's cblas_gemm_bf16bf16f32 runs at
// float32 speed on AMD, torch.mm(out_dtype=float32) is not implemented on CPU and oneDNN's fast
// bf16 matmul only writes bf16 outputs (logits rounded to bf16: not acceptable here).
//
// B is packed once ("VNNI" layout): panels of kPanel columns; inside a panel, for every pair of
// rows (2p, 2p + 1) of B, kPanel 32-bit words (B[2p][c] | B[2p + 1][c] << 16). Padding (an odd last
// row, columns past n) is zero. A is read in place, pair (r, p) = the 32 bits at
// A + r·a_row + p·a_pair (in bf16 elements): a_row = lda, a_pair = 2 for a row-major A, and
// a_row = 2, a_pair = 2·ld for an A stored as interleaved row pairs (interleave_pairs): the
// transposed operand Gᵀ of grad_keys without a transpose. An odd k reads the low half of the last
// pair only.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace ck::cpu::bf16 {

constexpr int64_t kPanel = 64;  // columns per packed panel (4 vectors of 16 floats)

// 32-bit words of a packed k × n matrix.
inline int64_t packed_words(int64_t k, int64_t n) {
  return (n + kPanel - 1) / kPanel * kPanel * ((k + 1) / 2);
}

// Pack B (k × n, row-major, leading dimension ldb) into `out` (packed_words(k, n) words).
void pack_rows(const c10::BFloat16* B, int64_t ldb, int64_t k, int64_t n, uint32_t* out);
// Pack B = Btᵀ given Bt (n × k, row-major, leading dimension ldbt): the keys of S = Q·Kᵀ.
void pack_transposed(const c10::BFloat16* Bt, int64_t ldbt, int64_t k, int64_t n, uint32_t* out);

// C[m×n] = alpha·A·B + beta·C (beta = 0: C is not read). Requires the AVX512-BF16 path
// (selected_isa() == kAvx512Bf16); single-threaded.
void gemm(int64_t m, int64_t n, int64_t k, float alpha, const c10::BFloat16* A, int64_t a_row,
          int64_t a_pair, const uint32_t* Bp, float beta, float* C, int64_t ldc);

// The float rows×cols tile G (leading dimension ldg) rounded to bfloat16 (round to nearest even),
// twice: row-major into `rm` (leading dimension ld_rm), and as interleaved row pairs into `pairs`
// ((rows + 1) / 2 rows of ld_pairs ≥ cols words, word (p, c) = rm[2p][c] | rm[2p + 1][c] << 16, an
// odd last row paired with 0). Requires the AVX512-BF16 path.
void round_tile(const float* G, int64_t rows, int64_t cols, int64_t ldg, c10::BFloat16* rm,
                int64_t ld_rm, uint32_t* pairs, int64_t ld_pairs);

}  // namespace ck::cpu::bf16
