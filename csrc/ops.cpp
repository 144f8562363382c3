// Schema of the private native ops behind the `cpu` and `cuda` backends (docs/internals.md).
//
// The schema is defined exactly once, here; each device registers its kernels separately with
// TORCH_LIBRARY_IMPL(ck_native, CPU|CUDA, m) (csrc/cpu/lse_cpu.cpp, csrc/cpu/sigmoid_cpu.cpp,
// csrc/cuda/). Loading the shared object `contrastive_kernels._C` is what runs these static
// registrations; the Python module it defines is an empty stub (as in pytorch/extension-cpp), so
// no pybind11 is needed and the extension can be built against the stable Python ABI.
//
// Common to all ops: query (N, D) and keys (M, D) contiguous, same dtype ∈ {float64, float32,
// bfloat16, float16}; every output is in the statistic dtype st (float64 for float64 inputs, else
// float32), and so are scale and bias (one element, scale finite > 0, bias finite). The logit is
// S_ij = fl(s·⟨q_i, k_j⟩), rounded once, and every statistic is computed from that element.
// row_classes (N,) / col_classes (M,): int64, both or neither.
//
// LSE family. The excluded set E is the union of
//   {(i, i) : i < min(N, M)}                       when exclude_self;
//   {(i, j) : row_groups_i = col_groups_j}         when the groups are given;
//   {(i, j) : ⟨guide_query_i, guide_keys_j⟩ > guide_threshold_i, j not designated for i}
//                                                  when the guide is given,
// where the designated positives of row i are, with classes, every j with col_classes_j =
// row_classes_i, else the labelled column l_i (below). An excluded pair enters no statistic and no
// positive (a designated positive that is excluded, e.g. same-group, is no positive), and its
// logit gradient is exactly 0. The masks, all optional (None), trailing in both ops:
//   row_groups (N,) / col_groups (M,): int64, same device, both or neither;
//   guide_query (N, Dg) / guide_keys (M, Dg): contiguous, in st (Dg may differ from D), and
//   guide_threshold (N,) in st: all three or none. The guide dot is computed in st inside each
//   tile and compared with a strict >; no N×M mask is ever stored, and the guide gets no gradient.
//   The CUDA kernels do not implement the masks and refuse them.
//   row_lse_i = log Σ_{j:(i,j)∉E} exp(S_ij)   (−inf when nothing is left); col_lse likewise, (0,)
//               when compute_col is false.
//   pos_i     = with classes: Σ_{j∈P(i)} S_ij, P(i) = {j : (i,j)∉E, col_classes_j = row_classes_i},
//               and pos_count_i = |P(i)|; without: S_{i,l_i} (l_i = labels_i, or i when labels is
//               None, which needs M ≥ N), 0 if (i, l_i) ∈ E, and pos_count has shape (0,).
//   lse_bwd: G_ij = grad_row_i·exp(S_ij − row_lse_i) + grad_col_j·exp(S_ij − col_lse_j)
//            + grad_pos_i·[j is a positive of i], 0 on E; grad_query = s·G·K, grad_keys = s·Gᵀ·Q.
//            A None gradient is zero and its statistic is not read.
// Sigmoid family (SigLIP). z_ij = +1 if the classes are given and equal, or if they are None,
// diagonal is true and i = j; else −1. L_ij = S_ij + bias.
//   row_loss_i = Σ_j softplus(−z_ij·L_ij)
//   sigmoid_bwd: G_ij = grad_row_i·(−z_ij)·σ(−z_ij·L_ij); grad_query = s·G·K, grad_keys = s·Gᵀ·Q,
//            grad_bias_row_i = Σ_j G_ij.
// cpu_isa(): the SIMD path the CPU kernels take now ("avx512_bf16", "avx512", "avx2" or "scalar";
// avx512_bf16: bfloat16 inputs of the LSE and sigmoid families on the bf16 units), honouring
// CK_CPU_ISA as they do.

#include <Python.h>

#include <torch/library.h>

#include "cpu/isa.h"

extern "C" {
// `import contrastive_kernels._C` only needs a module object; the ops live in torch.ops.ck_native.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "Native kernels of contrastive_kernels; the ops are torch.ops.ck_native.*",  // doc
      -1,    // size of per-interpreter state
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ck_native, m) {
  m.def(
      "lse_fwd(Tensor query, Tensor keys, Tensor scale, Tensor? labels, Tensor? row_classes,"
      " Tensor? col_classes, bool exclude_self, bool compute_col, Tensor? row_groups=None,"
      " Tensor? col_groups=None, Tensor? guide_query=None, Tensor? guide_keys=None,"
      " Tensor? guide_threshold=None)"
      " -> (Tensor row_lse, Tensor col_lse, Tensor pos, Tensor pos_count)");
  m.def(
      "lse_bwd(Tensor query, Tensor keys, Tensor scale, Tensor? labels, Tensor? row_classes,"
      " Tensor? col_classes, bool exclude_self, Tensor row_lse, Tensor col_lse,"
      " Tensor? grad_row, Tensor? grad_col, Tensor? grad_pos, Tensor? row_groups=None,"
      " Tensor? col_groups=None, Tensor? guide_query=None, Tensor? guide_keys=None,"
      " Tensor? guide_threshold=None)"
      " -> (Tensor grad_query, Tensor grad_keys)");
  m.def(
      "sigmoid_fwd(Tensor query, Tensor keys, Tensor scale, Tensor bias, Tensor? row_classes,"
      " Tensor? col_classes, bool diagonal) -> Tensor row_loss");
  m.def(
      "sigmoid_bwd(Tensor query, Tensor keys, Tensor scale, Tensor bias, Tensor? row_classes,"
      " Tensor? col_classes, bool diagonal, Tensor grad_row)"
      " -> (Tensor grad_query, Tensor grad_keys, Tensor grad_bias_row)");
  // Prefix (Matryoshka) families (csrc/cpu/prefix_cpu.cpp; CPU kernels only): the ops above on
  // S^t = s·r_t·c_tᵀ ⊙ (Q[:, :d_t]·K[:, :d_t]ᵀ) for dims d_1 < … < d_k ≤ D, stacked (k, ·);
  // row_scale (N, k) / col_scale (M, k) optional factors (None: ones), the masks the same at every
  // prefix. The backward ops also return row_dot_ti = Σ_j G^t_ij·S^t_ij and
  // col_dot_tj = Σ_i G^t_ij·S^t_ij (G^t = 0 on E). Contract: contrastive_kernels/backends/_prefix.py.
  m.def(
      "lse_prefix_fwd(Tensor query, Tensor keys, Tensor scale, int[] dims, Tensor? row_scale,"
      " Tensor? col_scale, Tensor? labels, Tensor? row_classes, Tensor? col_classes,"
      " bool exclude_self, bool compute_col, Tensor? row_groups=None, Tensor? col_groups=None,"
      " Tensor? guide_query=None, Tensor? guide_keys=None, Tensor? guide_threshold=None)"
      " -> (Tensor row_lse, Tensor col_lse, Tensor pos, Tensor pos_count)");
  m.def(
      "lse_prefix_bwd(Tensor query, Tensor keys, Tensor scale, int[] dims, Tensor? row_scale,"
      " Tensor? col_scale, Tensor? labels, Tensor? row_classes, Tensor? col_classes,"
      " bool exclude_self, Tensor row_lse, Tensor col_lse, Tensor? grad_row, Tensor? grad_col,"
      " Tensor? grad_pos, Tensor? row_groups=None, Tensor? col_groups=None,"
      " Tensor? guide_query=None, Tensor? guide_keys=None, Tensor? guide_threshold=None)"
      " -> (Tensor grad_query, Tensor grad_keys, Tensor row_dot, Tensor col_dot)");
  m.def(
      "sigmoid_prefix_fwd(Tensor query, Tensor keys, Tensor scale, Tensor bias, int[] dims,"
      " Tensor? row_scale, Tensor? col_scale, Tensor? row_classes, Tensor? col_classes,"
      " bool diagonal) -> Tensor row_loss");
  m.def(
      "sigmoid_prefix_bwd(Tensor query, Tensor keys, Tensor scale, Tensor bias, int[] dims,"
      " Tensor? row_scale, Tensor? col_scale, Tensor? row_classes, Tensor? col_classes,"
      " bool diagonal, Tensor grad_row) -> (Tensor grad_query, Tensor grad_keys, Tensor row_dot,"
      " Tensor col_dot, Tensor grad_bias_row)");
  // Soft-target cross-entropy family (csrc/cpu/soft_xent_cpu.cpp; CPU kernels only, like the
  // prefix ops): the student S = s·Q·Kᵀ and the teacher T = t·A·Bᵀ, A = t_query (N, Dt),
  // B = t_keys (M, Dt), contiguous, one dtype of the four (it may differ from the student's; Dt
  // may differ from D), converted to the student's statistic dtype st; t_scale like scale; the
  // teacher's log-sum-exp t_row_lse (N,) / t_col_lse (M,) in st (t_col_lse read only when
  // compute_col, resp. grad_col, is given). With p = exp(T − t_row_lse_i) and
  // p' = exp(T − t_col_lse_j):
  //   row_cross_i = Σ_j p_ij·S_ij; col_cross_j = Σ_i p'_ij·S_ij ((0,) unless compute_col);
  //   row_lse_i = log Σ_j exp(S_ij); col_lse_j = log Σ_i exp(S_ij) ((0,) unless compute_col):
  //            the student's, from the same sweep, as lse_fwd computes them.
  //   soft_xent_bwd: for the upstream gradients g = grad_row, h = grad_col, u = grad_row_lse,
  //            v = grad_col_lse (None: zero, and the statistic it weights is not read; row_lse /
  //            col_lse (in st) are read only with u / v),
  //            G^X = g_i·p + h_j·p', G^S = G^X + u_i·exp(S − row_lse_i) + v_j·exp(S − col_lse_j),
  //            G^T = G^X ⊙ S; grad_query = s·G^S·K, grad_keys = s·G^Sᵀ·Q, grad_t_query = t·G^T·B,
  //            grad_t_keys = t·G^Tᵀ·A (both (0,) unless teacher_grad).
  //            Contract: contrastive_kernels/backends/_soft_xent.py.
  m.def(
      "soft_xent_fwd(Tensor query, Tensor keys, Tensor scale, Tensor t_query, Tensor t_keys,"
      " Tensor t_scale, Tensor t_row_lse, Tensor t_col_lse, bool compute_col)"
      " -> (Tensor row_cross, Tensor col_cross, Tensor row_lse, Tensor col_lse)");
  m.def(
      "soft_xent_bwd(Tensor query, Tensor keys, Tensor scale, Tensor t_query, Tensor t_keys,"
      " Tensor t_scale, Tensor t_row_lse, Tensor t_col_lse, Tensor row_lse, Tensor col_lse,"
      " Tensor? grad_row, Tensor? grad_col, Tensor? grad_row_lse, Tensor? grad_col_lse,"
      " bool teacher_grad)"
      " -> (Tensor grad_query, Tensor grad_keys, Tensor grad_t_query, Tensor grad_t_keys)");
  // No tensor argument to dispatch on: a catch-all kernel (the CPU kernels are always built).
  m.def("cpu_isa() -> str", &ck::cpu::cpu_isa);
}
