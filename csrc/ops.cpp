// Schema of the private native ops behind the `cpu` and `cuda` backends (docs/internals.md).
//
// The schema is defined exactly once, here; each device registers its kernels separately with
// TORCH_LIBRARY_IMPL(ck_native, CPU|CUDA, m) (csrc/cpu/lse_cpu.cpp, csrc/cuda/). Loading the shared
// object `contrastive_kernels._C` is what runs these static registrations; the Python module it
// defines is an empty stub (as in pytorch/extension-cpp), so no pybind11 is needed and the
// extension can be built against the stable Python ABI.

#include <Python.h>

#include <torch/library.h>

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
      "lse_fwd(Tensor query, Tensor keys, Tensor scale, Tensor? labels, bool compute_col)"
      " -> (Tensor row_lse, Tensor col_lse, Tensor pos)");
  m.def(
      "lse_bwd(Tensor query, Tensor keys, Tensor scale, Tensor? labels, Tensor row_lse,"
      " Tensor col_lse, Tensor? grad_row, Tensor? grad_col, Tensor? grad_pos)"
      " -> (Tensor grad_query, Tensor grad_keys)");
}
