// A minimal Python module: importing flash_ext._C loads this library, whose
// static initializers register the operators (no pybind11 needed). It also
// tells Python whether CUDA kernels were built and which family serves a GPU.
#include <Python.h>

#include <exception>

#ifdef FLASH_EXT_WITH_CUDA
#include "cuda/api.h"
#endif

namespace {

#ifdef FLASH_EXT_WITH_CUDA
// _cuda_path(major, minor) -> the kernel family serving that compute capability.
PyObject* cuda_path(PyObject*, PyObject* args) {
  int major = 0, minor = 0;
  if (!PyArg_ParseTuple(args, "ii", &major, &minor)) return nullptr;
  try {
    return PyUnicode_FromString(flash_ext::cuda::active_path(major, minor));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

// _last_cuda_kernel_family() -> the family whose kernel this thread ran last.
PyObject* last_cuda_kernel_family(PyObject*, PyObject*) {
  return PyUnicode_FromString(flash_ext::cuda::last_kernel_family());
}

PyMethodDef methods[] = {
    {"_cuda_path", cuda_path, METH_VARARGS, "kernel family serving compute capability (major, minor)"},
    {"_last_cuda_kernel_family", last_cuda_kernel_family, METH_NOARGS,
     "kernel family of this thread's last CUDA attention launch"},
    {nullptr, nullptr, 0, nullptr},
};
constexpr long kWithCuda = 1;
#else
PyMethodDef methods[] = {{nullptr, nullptr, 0, nullptr}};
constexpr long kWithCuda = 0;
#endif

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "flash_ext operators", -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddIntConstant(module, "WITH_CUDA", kWithCuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
