// Validation and input plumbing shared by the entry points of both op families (lse_cpu.cpp,
// sigmoid_cpu.cpp). Defensive: the Python front doors check the same things first, but every
// precondition the kernels rely on is a TORCH_CHECK here, naming the values it saw.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "tile_operands.h"

namespace ck::cpu {

struct Problem {
  int64_t N, M, D;
  at::ScalarType stat;  // accumulation / output dtype: float64 for float64 inputs, else float32
  double scale;
};

// query (N, D), keys (M, D): contiguous, same dtype ∈ {float64, float32, bfloat16, float16},
// N, M, D ≥ 1; scale a one-element `stat` CPU tensor, finite and > 0.
Problem check_problem(const char* op, const at::Tensor& query, const at::Tensor& keys,
                      const at::Tensor& scale);

// A one-element `stat` CPU tensor holding a finite value (the sigmoid family's bias).
double check_bias(const char* op, const at::Tensor& bias, const Problem& p);

// Class ids as dense int32 (equal ids ⇔ equal int64 classes), so the tile passes compare 16 lanes
// at a time and read half the bytes; `row` (N,) and `col` (M,) are contiguous. Undefined without
// classes.
struct ClassIds {
  at::Tensor row, col;
  int64_t count = 0;  // number of distinct classes
  bool defined() const { return row.defined(); }
  const int32_t* row_ptr() const { return defined() ? row.data_ptr<int32_t>() : nullptr; }
  const int32_t* col_ptr() const { return defined() ? col.data_ptr<int32_t>() : nullptr; }
};

// row_classes (N,) and col_classes (M,): int64 CPU tensors, both or neither.
ClassIds check_classes(const char* op, const std::optional<at::Tensor>& row_classes,
                       const std::optional<at::Tensor>& col_classes, const Problem& p);

// Ids 0..N−1 and 0..M−1: "class" positives that are exactly the pairs (i, i).
ClassIds diagonal_ids(const char* op, const Problem& p);

// labels (N,) int64 in [0, M), or undefined. Must be None when classes are given; without labels
// and classes the positive of row i is column i, which needs M ≥ N.
at::Tensor check_labels(const char* op, const std::optional<at::Tensor>& labels, const Problem& p,
                        bool with_classes);

// Optional per-sample vector of the statistic dtype; expanded (stride-0) gradients from autograd
// are made contiguous here.
at::Tensor check_vector(const char* op, const char* name, const std::optional<at::Tensor>& t,
                        int64_t len, at::ScalarType stat);

// The optional exclusion masks of the LSE family (lse_masks.h), validated: row_groups (N,) and
// col_groups (M,) int64 CPU tensors, both or neither; guide_query (N, Dg), guide_keys (M, Dg) and
// guide_threshold (N,) CPU tensors in `stat` (the Python front door converts them), all three or
// none, Dg ≥ 1 (it may differ from D). Returned contiguous; undefined where not given.
struct MaskInputs {
  at::Tensor row_groups, col_groups;
  at::Tensor guide_query, guide_keys, guide_threshold;
  int64_t Dg = 0;
  bool groups() const { return row_groups.defined(); }
  bool guide() const { return guide_query.defined(); }
  bool active() const { return groups() || guide(); }
};

MaskInputs check_masks(const char* op, const std::optional<at::Tensor>& row_groups,
                       const std::optional<at::Tensor>& col_groups,
                       const std::optional<at::Tensor>& guide_query,
                       const std::optional<at::Tensor>& guide_keys,
                       const std::optional<at::Tensor>& guide_threshold, const Problem& p);

// A float64 or float32 contiguous copy (a no-op for float32/float64 inputs): 16-bit inputs are
// converted once, and every tile is then a float32 GEMM with float32 accumulation.
inline at::Tensor as_stat(const at::Tensor& t, at::ScalarType stat) {
  return t.scalar_type() == stat ? t : t.to(stat).contiguous();
}

// The tile operands of the LSE and sigmoid kernels (tile_gemm.h): bfloat16 inputs stay bfloat16
// when the bf16 GEMM path is selected (isa.h kAvx512Bf16), everything else is as_stat's copy.
// float16 is always upcast (no fp16 dot-product path).
struct TileInputs {
  at::Tensor q, k;
  bool bf16 = false;
  template <typename T>
  Operands<T> operands() const {
    Operands<T> op;
    if (bf16) {
      op.Qh = q.data_ptr<at::BFloat16>();
      op.Kh = k.data_ptr<at::BFloat16>();
    } else {
      op.Q = q.data_ptr<T>();
      op.K = k.data_ptr<T>();
    }
    return op;
  }
};
TileInputs tile_inputs(const at::Tensor& query, const at::Tensor& keys, at::ScalarType stat);

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// f(T{}) with T = double or float, the statistic type.
template <typename F>
void dispatch_stat(at::ScalarType stat, const F& f) {
  if (stat == at::kDouble) f(double{});
  else f(float{});
}

}  // namespace ck::cpu
