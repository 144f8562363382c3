// The tile GEMMs of the LSE and sigmoid kernels (tiling.h), on one of two paths chosen per call:
//
// * upcast (float32 / float64 operands, every dtype on a CPU without bf16 units, float16 always):
//   BLAS through gemm<T> on the statistic-type copies of Q and K (problem.h as_stat);
// * bf16 (bfloat16 inputs when selected_isa() is kAvx512Bf16, isa.h): Q and K stay bfloat16 and
//   the tiles run on the bf16 dot-product units (bf16_gemm.h), products exact, float32
//   accumulation, float32 logits and gradients. The keys are packed once per call (Kᵀ for the
//   logits; K, too, for grad_query), the row block of Q once per block for grad_keys (backward):
//   O((N_threads·rows + M)·D) bf16 words. The backward's G is float32 and is rounded to bf16 per
//   tile for its two GEMMs, as dense bf16 autograd does; s is applied in float32.
// Both paths compute every tile the same way whichever task runs it, so the determinism argument of
// tiling.h holds on both.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

#include "bf16_gemm.h"
#include "tile_operands.h"
#include "tiling.h"

namespace ck::cpu {

template <typename T>
class TileGemms {
 public:
  // `backward`: also set up grads() (the packed K rows and the per-task buffers).
  TileGemms(const Operands<T>& op, int64_t M, int64_t D, const Tiling& tl, bool backward)
      : op_(op), D_(D), tl_(tl) {
    if (!op.bf16()) return;
    TORCH_CHECK((std::is_same_v<T, float>), "bf16 tile GEMMs need float32 statistics");
    const int64_t tiles = (M + tl.cols - 1) / tl.cols;
    kt_words_ = bf16::packed_words(D, tl.cols);
    k_words_ = backward ? bf16::packed_words(tl.cols, D) : 0;
    const auto u32 = at::TensorOptions().dtype(at::kInt);
    kt_ = at::empty({tiles, kt_words_}, u32);
    k_ = at::empty({tiles, k_words_}, u32);
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t j0 = t * tl.cols, jt = std::min(tl.cols, M - j0);
        bf16::pack_transposed(op.Kh + j0 * D, D, D, jt, words(kt_) + t * kt_words_);
        if (backward) bf16::pack_rows(op.Kh + j0 * D, D, jt, D, words(k_) + t * k_words_);
      }
    });
    if (!backward) return;
    // Per task: the packed row block of Q, G in bf16 row-major and as row pairs.
    q_words_ = bf16::packed_words(tl.rows, D);
    rm_stride_ = aligned_stride<c10::BFloat16>(tl.rows * tl.cols);
    pairs_words_ = aligned_stride<uint32_t>((tl.rows + 1) / 2 * tl.cols);
    q_ = at::empty({tl.tasks, q_words_}, u32);
    rm_ = at::empty({tl.tasks, rm_stride_}, at::TensorOptions().dtype(at::kBFloat16));
    pairs_ = at::empty({tl.tasks, pairs_words_}, u32);
  }

  // tile[ib×jt] (leading dimension ldt) = alpha·Q[i0 : i0+ib]·K[j0 : j0+jt]ᵀ.
  void logits(int64_t i0, int64_t ib, int64_t j0, int64_t jt, T alpha, T* tile,
              int64_t ldt) const {
    if constexpr (std::is_same_v<T, float>) {
      if (op_.bf16()) {
        bf16::gemm(ib, jt, D_, alpha, op_.Qh + i0 * D_, D_, 2,
                   words(kt_) + j0 / tl_.cols * kt_words_, 0.0f, tile, ldt);
        return;
      }
    }
    gemm<T>(false, true, ib, jt, D_, alpha, op_.Q + i0 * D_, D_, op_.K + j0 * D_, D_, T(0), tile,
            ldt);
  }

  // Before the grads() of a row block in task `slot` (bf16 path: packs the block of Q).
  void begin_block(int64_t slot, int64_t i0, int64_t ib) const {
    if (op_.bf16()) bf16::pack_rows(op_.Qh + i0 * D_, D_, ib, D_, words(q_) + slot * q_words_);
  }

  // grad_q[i0 : i0+ib] += s·G·K[j0 : j0+jt] and dk[j0 : j0+jt] = dk_beta·dk + s·Gᵀ·Q[i0 : i0+ib]
  // for the ib×jt tile G (leading dimension ldg); grad_q and dk are (·, D) row-major.
  void grads(int64_t slot, int64_t i0, int64_t ib, int64_t j0, int64_t jt, T s, const T* G,
             int64_t ldg, T* grad_q, T* dk, T dk_beta) const {
    if constexpr (std::is_same_v<T, float>) {
      if (op_.bf16()) {
        auto* rm = rm_.data_ptr<at::BFloat16>() + slot * rm_stride_;
        uint32_t* pairs = words(pairs_) + slot * pairs_words_;
        bf16::round_tile(G, ib, jt, ldg, rm, tl_.cols, pairs, tl_.cols);
        bf16::gemm(ib, D_, jt, s, rm, tl_.cols, 2, words(k_) + j0 / tl_.cols * k_words_, 1.0f,
                   grad_q + i0 * D_, D_);
        bf16::gemm(jt, D_, ib, s, reinterpret_cast<const c10::BFloat16*>(pairs), 2, 2 * tl_.cols,
                   words(q_) + slot * q_words_, dk_beta, dk + j0 * D_, D_);
        return;
      }
    }
    gemm<T>(false, false, ib, D_, jt, s, G, ldg, op_.K + j0 * D_, D_, T(1), grad_q + i0 * D_, D_);
    gemm<T>(true, false, jt, D_, ib, s, G, ldg, op_.Q + i0 * D_, D_, dk_beta, dk + j0 * D_, D_);
  }

 private:
  static uint32_t* words(const at::Tensor& t) {
    return reinterpret_cast<uint32_t*>(t.data_ptr<int32_t>());
  }

  Operands<T> op_;
  int64_t D_;
  Tiling tl_;
  at::Tensor kt_, k_, q_, rm_, pairs_;
  int64_t kt_words_ = 0, k_words_ = 0, q_words_ = 0, rm_stride_ = 0, pairs_words_ = 0;
};

}  // namespace ck::cpu
