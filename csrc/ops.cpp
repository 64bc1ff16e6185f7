// The one TORCH_LIBRARY block of attenscribble_ops: every operator schema, no math.
// Device implementations register themselves (csrc/cpu/*.cpp, csrc/cuda/*.cu) with
// TORCH_LIBRARY_IMPL; fake kernels and autograd are registered from Python
// (attenscribble_ops/native/*.py), so torch.library.opcheck and torch.compile see every op.
#include <Python.h>
#include <torch/library.h>

#ifndef AT_PARALLEL_OPENMP
#define ATTENSCRIBBLE_OPENMP 0
#else
#define ATTENSCRIBBLE_OPENMP 1
#endif

#ifdef WITH_CUDA
#define ATTENSCRIBBLE_CUDA 1
#else
#define ATTENSCRIBBLE_CUDA 0
#endif

extern "C" {
// A bare Python module: importing it runs the static registrations below and in every other
// translation unit. It carries only its build configuration; no pybind11 is needed.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "attenscribble_ops compiled operators", -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "WITH_CUDA", ATTENSCRIBBLE_CUDA) < 0 ||
      PyModule_AddIntConstant(m, "WITH_OPENMP", ATTENSCRIBBLE_OPENMP) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
}

TORCH_LIBRARY(attenscribble_ops, m) {
  // Shared helper: a mask at prediction resolution with NaN -> 0 and values < 1 -> 0 (the Gated
  // CRF convention for interpolated mask edges), converted to `dtype`.
  m.def("clean_mask(Tensor mask, ScalarType dtype) -> Tensor");
  // Masked CRF loss (attenscribble_ops/native/masked_crf.py): the un-normalised loss sum, 0-d, in
  // the accumulate dtype (float; double for double probs), and, with with_grad, its gradient
  // w.r.t. probs from the same pass (accumulate dtype, shape of probs; shape (0,) without).
  // image/masks/compat are in the accumulate dtype at the resolution of probs; table is the
  // row-major (K, 2 + F) descriptor table [weight, 1/sigma_xy, 1/sigma_image_f...] (0 = unused);
  // radius and spacing have one value per spatial axis.
  m.def("masked_crf_forward(Tensor probs, Tensor? image, Tensor? mask_dst, Tensor? mask_src, Tensor? compat, "
        "float[] table, int[] radius, float[] spacing, bool zero_padding, bool with_grad) -> (Tensor, Tensor)");
}
