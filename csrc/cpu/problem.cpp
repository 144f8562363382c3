// Validation shared by the CPU entry points (see problem.h).

#include "problem.h"

#include <cmath>
#include <limits>
#include <tuple>

#include "isa.h"

namespace ck::cpu {

Problem check_problem(const char* op, const at::Tensor& query, const at::Tensor& keys,
                      const at::Tensor& scale) {
  TORCH_CHECK(query.device().is_cpu() && keys.device().is_cpu(), op,
              ": query and keys must be CPU tensors, got ", query.device(), " and ",
              keys.device());
  TORCH_CHECK(query.dim() == 2 && keys.dim() == 2, op,
              ": query and keys must be 2-D (N, D) and (M, D), got shapes ", query.sizes(),
              " and ", keys.sizes());
  TORCH_CHECK(query.scalar_type() == keys.scalar_type(), op,
              ": query and keys must have the same dtype, got ", query.scalar_type(), " and ",
              keys.scalar_type());
  const auto dt = query.scalar_type();
  TORCH_CHECK(dt == at::kDouble || dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": dtype must be float64, float32, bfloat16 or float16, got ", dt);
  const int64_t N = query.size(0), M = keys.size(0), D = query.size(1);
  TORCH_CHECK(keys.size(1) == D, op, ": query and keys must have the same feature size, got ",
              query.sizes(), " and ", keys.sizes());
  TORCH_CHECK(N >= 1 && M >= 1 && D >= 1, op, ": N, M and D must be >= 1, got N=", N, ", M=", M,
              ", D=", D);
  TORCH_CHECK(query.is_contiguous() && keys.is_contiguous(), op,
              ": query and keys must be contiguous, got strides ", query.strides(), " and ",
              keys.strides());
  const at::ScalarType stat = dt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == stat && scale.device().is_cpu(), op,
              ": scale must be a one-element ", stat, " CPU tensor (the statistic dtype of ", dt,
              " inputs), got shape ", scale.sizes(), ", dtype ", scale.scalar_type(), ", device ",
              scale.device());
  const double s = scale.item<double>();
  TORCH_CHECK(std::isfinite(s) && s > 0, op, ": scale must be finite and > 0, got ", s);
  return {N, M, D, stat, s};
}

double check_bias(const char* op, const at::Tensor& bias, const Problem& p) {
  TORCH_CHECK(bias.numel() == 1 && bias.scalar_type() == p.stat && bias.device().is_cpu(), op,
              ": bias must be a one-element ", p.stat,
              " CPU tensor (the statistic dtype of the inputs), got shape ", bias.sizes(),
              ", dtype ", bias.scalar_type(), ", device ", bias.device());
  const double b = bias.item<double>();
  TORCH_CHECK(std::isfinite(b), op, ": bias must be finite, got ", b);
  return b;
}

namespace {

// int32 ids index N + M entries (and the tile passes compare them as int32).
void check_id_range(const char* op, const Problem& p) {
  TORCH_CHECK(p.N + p.M <= std::numeric_limits<int32_t>::max(), op,
              ": N + M must be < 2^31 when positives are given by classes or the diagonal "
              "(int32 ids), got N=", p.N, ", M=", p.M);
}

void check_class_vector(const char* op, const char* name, const at::Tensor& t, int64_t len) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 &&
                  t.size(0) == len,
              op, ": ", name, " must be an int64 CPU tensor of shape (", len, "), got dtype ",
              t.scalar_type(), ", shape ", t.sizes(), ", device ", t.device());
}

}  // namespace

ClassIds check_classes(const char* op, const std::optional<at::Tensor>& row_classes,
                       const std::optional<at::Tensor>& col_classes, const Problem& p) {
  const bool has_row = row_classes.has_value(), has_col = col_classes.has_value();
  if (!has_row && !has_col) return {};
  TORCH_CHECK(has_row && has_col, op,
              ": row_classes and col_classes must be given together (both or neither), got ",
              has_row ? "row_classes of shape " : "row_classes None",
              has_row ? c10::str(row_classes->sizes()) : std::string(), " and ",
              has_col ? "col_classes of shape " : "col_classes None",
              has_col ? c10::str(col_classes->sizes()) : std::string());
  check_class_vector(op, "row_classes", *row_classes, p.N);
  check_class_vector(op, "col_classes", *col_classes, p.M);
  check_id_range(op, p);
  // Dense ids through one sorted unique of both vectors: O((N + M)·log(N + M)), nothing per tile.
  const at::Tensor all = at::cat({row_classes->contiguous(), col_classes->contiguous()});
  const auto [values, inverse, counts] =
      at::_unique2(all, /*sorted=*/true, /*return_inverse=*/true, /*return_counts=*/false);
  const at::Tensor ids = inverse.to(at::kInt).contiguous();
  return {ids.narrow(0, 0, p.N), ids.narrow(0, p.N, p.M), values.size(0)};
}

ClassIds diagonal_ids(const char* op, const Problem& p) {
  check_id_range(op, p);
  const auto opts = at::TensorOptions().dtype(at::kInt);
  return {at::arange(p.N, opts), at::arange(p.M, opts), std::max(p.N, p.M)};
}

at::Tensor check_labels(const char* op, const std::optional<at::Tensor>& labels, const Problem& p,
                        bool with_classes) {
  const int64_t N = p.N, M = p.M;
  if (labels.has_value()) {
    const at::Tensor& l = *labels;
    TORCH_CHECK(!with_classes, op,
                ": labels must be None when row_classes and col_classes are given (the positives "
                "are then the same-class pairs), got labels of shape ", l.sizes());
    TORCH_CHECK(l.device().is_cpu() && l.scalar_type() == at::kLong && l.dim() == 1 &&
                    l.size(0) == N,
                op, ": labels must be an int64 CPU tensor of shape (", N, "), got dtype ",
                l.scalar_type(), ", shape ", l.sizes(), ", device ", l.device());
    at::Tensor lc = l.contiguous();
    const int64_t* lp = lc.data_ptr<int64_t>();
    for (int64_t i = 0; i < N; ++i) {
      TORCH_CHECK(lp[i] >= 0 && lp[i] < M, op, ": labels must lie in [0, ", M, "), got labels[",
                  i, "] = ", lp[i]);
    }
    return lc;
  }
  if (!with_classes) {
    TORCH_CHECK(M >= N, op, ": without labels the positive of row i is column i, so M >= N is ",
                "required, got N=", N, ", M=", M);
  }
  return at::Tensor();
}

MaskInputs check_masks(const char* op, const std::optional<at::Tensor>& row_groups,
                       const std::optional<at::Tensor>& col_groups,
                       const std::optional<at::Tensor>& guide_query,
                       const std::optional<at::Tensor>& guide_keys,
                       const std::optional<at::Tensor>& guide_threshold, const Problem& p) {
  MaskInputs mi;
  const bool has_rg = row_groups.has_value(), has_cg = col_groups.has_value();
  TORCH_CHECK(has_rg == has_cg, op,
              ": row_groups and col_groups must be given together (both or neither), got ",
              has_rg ? "row_groups given" : "row_groups None", " and ",
              has_cg ? "col_groups given" : "col_groups None");
  if (has_rg) {
    auto check_groups = [&](const char* name, const at::Tensor& t, int64_t len) {
      TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 &&
                      t.size(0) == len,
                  op, ": ", name, " must be an int64 CPU tensor of shape (", len,
                  "), got dtype ", t.scalar_type(), ", shape ", t.sizes(), ", device ",
                  t.device());
    };
    check_groups("row_groups", *row_groups, p.N);
    check_groups("col_groups", *col_groups, p.M);
    mi.row_groups = row_groups->contiguous();
    mi.col_groups = col_groups->contiguous();
  }
  const int given = int(guide_query.has_value()) + int(guide_keys.has_value()) +
                    int(guide_threshold.has_value());
  TORCH_CHECK(given == 0 || given == 3, op,
              ": guide_query, guide_keys and guide_threshold must be given together (all three or "
              "none), got guide_query ", guide_query.has_value() ? "given" : "None",
              ", guide_keys ", guide_keys.has_value() ? "given" : "None", ", guide_threshold ",
              guide_threshold.has_value() ? "given" : "None");
  if (given == 3) {
    const at::Tensor& gq = *guide_query;
    const at::Tensor& gk = *guide_keys;
    TORCH_CHECK(gq.device().is_cpu() && gk.device().is_cpu() && gq.scalar_type() == p.stat &&
                    gk.scalar_type() == p.stat && gq.dim() == 2 && gk.dim() == 2,
                op, ": guide_query and guide_keys must be 2-D ", p.stat,
                " CPU tensors (the statistic dtype of the inputs), got dtypes ", gq.scalar_type(),
                " and ", gk.scalar_type(), ", shapes ", gq.sizes(), " and ", gk.sizes(),
                ", devices ", gq.device(), " and ", gk.device());
    TORCH_CHECK(gq.size(0) == p.N && gk.size(0) == p.M && gq.size(1) == gk.size(1) &&
                    gq.size(1) >= 1,
                op, ": guide_query and guide_keys must have shapes (N, Dg) and (M, Dg) with N=",
                p.N, ", M=", p.M, ", Dg >= 1, got ", gq.sizes(), " and ", gk.sizes());
    mi.guide_query = gq.contiguous();
    mi.guide_keys = gk.contiguous();
    mi.guide_threshold = check_vector(op, "guide_threshold", guide_threshold, p.N, p.stat);
    mi.Dg = gq.size(1);
  }
  return mi;
}

at::Tensor check_vector(const char* op, const char* name, const std::optional<at::Tensor>& t,
                        int64_t len, at::ScalarType stat) {
  if (!t.has_value()) return at::Tensor();
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == stat && t->dim() == 1 &&
                  t->size(0) == len,
              op, ": ", name, " must be a ", stat, " CPU tensor of shape (", len,
              "), got dtype ", t->scalar_type(), ", shape ", t->sizes(), ", device ", t->device());
  return t->contiguous();
}

TileInputs tile_inputs(const at::Tensor& query, const at::Tensor& keys, at::ScalarType stat) {
  if (query.scalar_type() == at::kBFloat16 && selected_isa() == Isa::kAvx512Bf16) {
    return {query, keys, true};  // contiguous (check_problem)
  }
  return {as_stat(query, stat), as_stat(keys, stat), false};
}

}  // namespace ck::cpu
