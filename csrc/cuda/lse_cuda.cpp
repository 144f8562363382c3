// CUDA implementations of the private native ops ck_native::lse_fwd / ck_native::lse_bwd
// (schemas in csrc/ops.cpp and docs/internals.md). This file only validates, allocates and calls
// the raw-pointer launchers of lse_fwd.cu / lse_bwd.cu on the current stream; it is compiled only
// when setup.py builds the CUDA extension (CK_WITH_CUDA).
//
// The schema's self-pair exclusion (exclude_self), class positives (row_classes / col_classes) and
// exclusion masks (row_groups / col_groups, guide_*) are not implemented by these kernels yet: both
// ops refuse them up front, before any check or
// allocation, so a caller learns which backend to use instead of getting a wrong statistic. Without
// classes pos_count is the schema's empty (0,) float32 tensor.
//
// Precondition checks are repeated here with values even though functional.py validates first: the
// native op is reachable directly through torch.ops.ck_native, and a bad pointer on a GPU is an
// illegal memory access, not an exception. Nothing here syncs with the host: `scale` is passed to the
// kernels as a device pointer, and its finiteness / sign is functional.py's job.

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// at::cuda::getCurrentCUDAStream is c10::cuda::getCurrentCUDAStream (ATen does `using namespace c10`);
// this light header avoids ATen/cuda/CUDAContext.h, which drags in the cuBLAS/cuSPARSE/cuSOLVER headers.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>

#include "lse_kernels.h"

namespace {

using at::Tensor;

ck_cuda::DType kernel_dtype(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ck_cuda::DType::kFloat32;
    case at::kHalf:
      return ck_cuda::DType::kFloat16;
    case at::kBFloat16:
      return ck_cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "ck_native (CUDA): query/keys dtype ", t.scalar_type(),
                  " is not supported by the CUDA backend (float32, float16, bfloat16); float64 runs on "
                  "the CPU backends ('cpu', 'chunked', 'reference')");
  }
}

// TF32 tiles for float32 inputs exactly when torch itself would use TF32 for a float32 CUDA matmul.
// Since torch 2.9 the precision has a new API (torch.backends[.cuda.matmul].fp32_precision), and
// allowTF32CuBLAS() — the legacy getter — throws once it was used, even alone (checked on torch
// 2.13: torch.backends.cuda.matmul.fp32_precision = "tf32" makes it raise). float32Precision(CUDA,
// MATMUL) is what the new API sets and never throws. The enum overload is used from 2.10 on (seen in
// 2.13's headers; 2.9 is not checked here, so it keeps the legacy getter).
bool tf32_allowed() {
#if defined(TORCH_VERSION_MAJOR) && (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10))
  return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
         at::Float32Precision::TF32;
#else
  return at::globalContext().allowTF32CuBLAS();
#endif
}

void check_features(const Tensor& query, const Tensor& keys) {
  TORCH_CHECK(query.is_cuda() && keys.is_cuda(), "ck_native (CUDA): query and keys must be CUDA tensors, got ",
              query.device(), " and ", keys.device());
  TORCH_CHECK(query.device() == keys.device(), "ck_native (CUDA): query on ", query.device(), " but keys on ",
              keys.device());
  TORCH_CHECK(query.dim() == 2 && keys.dim() == 2, "ck_native (CUDA): query and keys must be 2-D, got shapes ",
              query.sizes(), " and ", keys.sizes());
  TORCH_CHECK(query.scalar_type() == keys.scalar_type(), "ck_native (CUDA): query dtype ", query.scalar_type(),
              " != keys dtype ", keys.scalar_type());
  kernel_dtype(query);  // rejects float64 and others with a message
  const int64_t N = query.size(0), M = keys.size(0), D = query.size(1);
  TORCH_CHECK(keys.size(1) == D, "ck_native (CUDA): feature dims differ: query ", query.sizes(), ", keys ",
              keys.sizes());
  TORCH_CHECK(N >= 1 && M >= 1 && D >= 1, "ck_native (CUDA): empty input: N=", N, ", M=", M, ", D=", D);
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(N <= kMax && M <= kMax && D <= kMax, "ck_native (CUDA): sizes must be < 2^31, got N=", N, ", M=", M,
              ", D=", D);
  TORCH_CHECK(query.is_contiguous() && keys.is_contiguous(),
              "ck_native (CUDA): query and keys must be contiguous (strides ", query.strides(), " and ",
              keys.strides(), ")");
}

// Row stride in elements. A one-row tensor is contiguous whatever its stride(0) (torch ignores the
// stride of a size-1 dimension: torch.randn(D, 1).T has strides (1, 1)), and its only row starts at
// the data pointer, so D is as good a stride as any and keeps the launchers' ld >= D precondition.
int64_t row_stride(const Tensor& t) { return t.size(0) == 1 ? t.size(1) : t.stride(0); }

// CK_CUDA_PARTIAL_MB: cap (MiB, fractional allowed) on the forward's column partials per row group;
// unset = the launcher's default. A testing and tuning knob: tiny values force many row groups.
size_t partial_budget_from_env() {
  const char* v = std::getenv("CK_CUDA_PARTIAL_MB");
  if (v == nullptr || *v == '\0') return 0;
  char* end = nullptr;
  const double mb = std::strtod(v, &end);
  TORCH_CHECK(end != v && *end == '\0' && mb > 0.0, "ck_native (CUDA): CK_CUDA_PARTIAL_MB must be a positive "
              "number of MiB, got '", v, "'");
  return std::max<size_t>(1, static_cast<size_t>(mb * 1024.0 * 1024.0));
}

// mma.sync bf16/tf32 and cp.async: Ampere (sm_80) or newer.
void check_arch(const Tensor& query) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, query.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, query.get_device()));
  TORCH_CHECK(major >= 8, "ck_native (CUDA): the CUDA backend needs compute capability >= 8.0, but ", query.device(),
              " is ", major, ".", minor, "; use backend='triton' or 'chunked'");
}

void check_scale(const Tensor& scale, const Tensor& query) {
  TORCH_CHECK(scale.dim() == 0, "ck_native (CUDA): scale must be a 0-d tensor, got shape ", scale.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat, "ck_native (CUDA): scale must be float32, got ",
              scale.scalar_type());
  TORCH_CHECK(scale.device() == query.device(), "ck_native (CUDA): scale on ", scale.device(), " but query on ",
              query.device());
}

// Returns the device pointer of the labels (or nullptr for the default diagonal).
const int64_t* check_labels(const std::optional<Tensor>& labels, const Tensor& query, int64_t N, int64_t M) {
  if (!labels.has_value()) {
    TORCH_CHECK(M >= N, "ck_native (CUDA): labels=None means the positive of row i is column i, which needs M >= N; "
                        "got N=", N, ", M=", M);
    return nullptr;
  }
  const Tensor& l = *labels;
  TORCH_CHECK(l.scalar_type() == at::kLong, "ck_native (CUDA): labels must be int64, got ", l.scalar_type());
  TORCH_CHECK(l.dim() == 1 && l.size(0) == N, "ck_native (CUDA): labels must have shape (", N, ",), got ", l.sizes());
  TORCH_CHECK(l.device() == query.device(), "ck_native (CUDA): labels on ", l.device(), " but query on ",
              query.device());
  TORCH_CHECK(l.is_contiguous(), "ck_native (CUDA): labels must be contiguous");
  return l.data_ptr<int64_t>();
}

// A float32 statistic vector of length n on the query's device (or nullptr when absent).
const float* check_stat(const std::optional<Tensor>& t, const char* name, int64_t n, const Tensor& query) {
  if (!t.has_value()) return nullptr;
  const Tensor& v = *t;
  TORCH_CHECK(v.scalar_type() == at::kFloat, "ck_native (CUDA): ", name, " must be float32, got ", v.scalar_type());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n, "ck_native (CUDA): ", name, " must have shape (", n, ",), got ",
              v.sizes());
  TORCH_CHECK(v.device() == query.device(), "ck_native (CUDA): ", name, " on ", v.device(), " but query on ",
              query.device());
  TORCH_CHECK(v.is_contiguous(), "ck_native (CUDA): ", name, " must be contiguous");
  return v.data_ptr<float>();
}

// exclude_self and class positives: refused until the kernels implement them (see the file comment).
void check_no_unimplemented_options(const char* op, const std::optional<Tensor>& row_classes,
                                    const std::optional<Tensor>& col_classes, bool exclude_self) {
  if (exclude_self || row_classes.has_value() || col_classes.has_value()) {
    TORCH_CHECK(false, op, " on CUDA: exclude_self / class positives are not implemented in the cuda backend yet; "
                "use backend='triton' or 'chunked' (got exclude_self=", exclude_self ? "True" : "False",
                ", row_classes=", row_classes.has_value() ? "given" : "None", ", col_classes=",
                col_classes.has_value() ? "given" : "None", ")");
  }
}

// The exclusion masks (row_groups / col_groups, guide_query / guide_keys / guide_threshold): not
// implemented by these kernels; the Python layer routes such calls elsewhere (backends.MISSING),
// and a direct call is refused up front.
void check_no_masks(const char* op, const std::optional<Tensor>& row_groups,
                    const std::optional<Tensor>& col_groups, const std::optional<Tensor>& guide_query,
                    const std::optional<Tensor>& guide_keys, const std::optional<Tensor>& guide_threshold) {
  const bool groups = row_groups.has_value() || col_groups.has_value();
  const bool guide = guide_query.has_value() || guide_keys.has_value() || guide_threshold.has_value();
  TORCH_CHECK(!groups && !guide, op, " on CUDA: the ", groups ? "same-group" : "guided false-negative",
              " exclusion mask (", groups ? "row_groups / col_groups" : "guide_query / guide_keys / guide_threshold",
              ") is not implemented for the cuda backend; use backend='cpu', 'chunked' or 'reference'");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lse_fwd_cuda(const Tensor& query, const Tensor& keys, const Tensor& scale,
                                                        const std::optional<Tensor>& labels,
                                                        const std::optional<Tensor>& row_classes,
                                                        const std::optional<Tensor>& col_classes, bool exclude_self,
                                                        bool compute_col, const std::optional<Tensor>& row_groups,
                                                        const std::optional<Tensor>& col_groups,
                                                        const std::optional<Tensor>& guide_query,
                                                        const std::optional<Tensor>& guide_keys,
                                                        const std::optional<Tensor>& guide_threshold) {
  check_no_masks("ck_native::lse_fwd", row_groups, col_groups, guide_query, guide_keys, guide_threshold);
  check_no_unimplemented_options("ck_native::lse_fwd", row_classes, col_classes, exclude_self);
  check_features(query, keys);
  check_scale(scale, query);
  const int64_t N = query.size(0), M = keys.size(0), D = query.size(1);
  const c10::cuda::CUDAGuard guard(query.device());
  check_arch(query);
  const int64_t* labels_ptr = check_labels(labels, query, N, M);

  const auto f32 = query.options().dtype(at::kFloat);
  Tensor row_lse = at::empty({N}, f32);
  Tensor col_lse = at::empty({compute_col ? M : 0}, f32);
  Tensor pos = at::empty({N}, f32);
  Tensor pos_count = at::empty({0}, f32);  // (0,): counts exist only with class positives
  const size_t budget = partial_budget_from_env();
  const size_t ws_bytes = ck_cuda::lse_fwd_workspace_bytes(N, M, compute_col, budget);
  // caching allocator, stream-ordered: freed when this function returns, reused safely after the kernels
  Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, query.options().dtype(at::kByte));

  ck_cuda::LseFwdArgs a;
  a.query = query.data_ptr();
  a.keys = keys.data_ptr();
  a.N = N;
  a.M = M;
  a.D = D;
  a.ldq = row_stride(query);
  a.ldk = row_stride(keys);
  a.scale = scale.data_ptr<float>();
  a.labels = labels_ptr;
  a.row_lse = row_lse.data_ptr<float>();
  a.col_lse = compute_col ? col_lse.data_ptr<float>() : nullptr;
  a.pos = pos.data_ptr<float>();
  a.workspace = ws_bytes ? workspace.data_ptr() : nullptr;
  a.partial_budget_bytes = budget;
  a.dtype = kernel_dtype(query);
  a.allow_tf32 = tf32_allowed();
  C10_CUDA_CHECK(ck_cuda::lse_fwd(a, at::cuda::getCurrentCUDAStream()));
  return {row_lse, col_lse, pos, pos_count};
}

std::tuple<Tensor, Tensor> lse_bwd_cuda(const Tensor& query, const Tensor& keys, const Tensor& scale,
                                        const std::optional<Tensor>& labels, const std::optional<Tensor>& row_classes,
                                        const std::optional<Tensor>& col_classes, bool exclude_self,
                                        const Tensor& row_lse, const Tensor& col_lse,
                                        const std::optional<Tensor>& grad_row, const std::optional<Tensor>& grad_col,
                                        const std::optional<Tensor>& grad_pos, const std::optional<Tensor>& row_groups,
                                        const std::optional<Tensor>& col_groups,
                                        const std::optional<Tensor>& guide_query,
                                        const std::optional<Tensor>& guide_keys,
                                        const std::optional<Tensor>& guide_threshold) {
  check_no_masks("ck_native::lse_bwd", row_groups, col_groups, guide_query, guide_keys, guide_threshold);
  check_no_unimplemented_options("ck_native::lse_bwd", row_classes, col_classes, exclude_self);
  check_features(query, keys);
  check_scale(scale, query);
  const int64_t N = query.size(0), M = keys.size(0), D = query.size(1);
  const c10::cuda::CUDAGuard guard(query.device());
  check_arch(query);
  const int64_t* labels_ptr = check_labels(labels, query, N, M);

  const float* gr = check_stat(grad_row, "grad_row", N, query);
  const float* gc = check_stat(grad_col, "grad_col", M, query);
  const float* gp = check_stat(grad_pos, "grad_pos", N, query);
  // row_lse is always passed; it is read only when grad_row is given (likewise col_lse / grad_col,
  // which is (0,) when the forward did not compute it).
  const float* rl = gr ? check_stat(row_lse, "row_lse", N, query) : nullptr;
  const float* cl = gc ? check_stat(col_lse, "col_lse", M, query) : nullptr;

  const auto f32 = query.options().dtype(at::kFloat);
  Tensor grad_query = at::empty({N, D}, f32);  // zero-filled by the launcher (stream-ordered)
  Tensor grad_keys = at::empty({M, D}, f32);

  ck_cuda::LseBwdArgs a;
  a.query = query.data_ptr();
  a.keys = keys.data_ptr();
  a.N = N;
  a.M = M;
  a.D = D;
  a.ldq = row_stride(query);
  a.ldk = row_stride(keys);
  a.scale = scale.data_ptr<float>();
  a.labels = labels_ptr;
  a.row_lse = rl;
  a.col_lse = cl;
  a.grad_row = gr;
  a.grad_col = gc;
  a.grad_pos = gp;
  a.grad_query = grad_query.data_ptr<float>();
  a.grad_keys = grad_keys.data_ptr<float>();
  a.dtype = kernel_dtype(query);
  a.allow_tf32 = tf32_allowed();
  // torch.use_deterministic_algorithms(True) → the atomic-free two-pass backward (bitwise reproducible)
  a.deterministic = at::globalContext().deterministicAlgorithms();
  C10_CUDA_CHECK(ck_cuda::lse_bwd(a, at::cuda::getCurrentCUDAStream()));
  return {grad_query, grad_keys};
}

}  // namespace

TORCH_LIBRARY_IMPL(ck_native, CUDA, m) {
  m.impl("lse_fwd", &lse_fwd_cuda);
  m.impl("lse_bwd", &lse_bwd_cuda);
}
