// A minimal Python module: importing flash_ext._C loads this library, whose
// static initializers register the operators (no pybind11 needed). It also
// tells Python whether CUDA kernels were built and which family serves a GPU.
#include <Python.h>

#ifdef FLASH_EXT_WITH_CUDA
#include <exception>

#include "cuda/api.h"
#endif

namespace {

#ifdef FLASH_EXT_WITH_CUDA
// _last_cuda_kernel_family() -> the family whose kernel was launched last.
PyObject* last_cuda_kernel_family(PyObject*, PyObject*) {
  return PyUnicode_FromString(flash_ext::cuda::last_kernel_family());
}

// set(spec) for a str spec; a bad spec raises ValueError with its message.
template <void (*set)(const std::string&)>
PyObject* set_tuning(PyObject*, PyObject* arg) {
  const char* spec = PyUnicode_AsUTF8(arg);
  if (spec == nullptr) return nullptr;  // not a str: TypeError set
  try {
    set(spec);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"_last_cuda_kernel_family", last_cuda_kernel_family, METH_NOARGS,
     "kernel family of the last CUDA attention launch"},
    {"_set_fwd_tuning", set_tuning<flash_ext::cuda::set_fwd_tuning>, METH_O,
     "replace the Hopper forward's FLASH_EXT_FWD_TUNING knobs in this process (timing scripts)"},
    {"_set_bwd_tuning", set_tuning<flash_ext::cuda::set_bwd_tuning>, METH_O,
     "replace the Hopper backward's FLASH_EXT_BWD_TUNING knobs in this process (timing scripts)"},
    {"_set_decode_tuning", set_tuning<flash_ext::cuda::set_decode_tuning>, METH_O,
     "replace the split-KV decoding's FLASH_EXT_DECODE_TUNING knobs in this process (timing scripts)"},
    {nullptr, nullptr, 0, nullptr},
};
constexpr long kWithCuda = 1;
#else
PyMethodDef methods[] = {{nullptr, nullptr, 0, nullptr}};
constexpr long kWithCuda = 0;
#endif
// The CUDA kernel families built, in the order the dispatch tries them
// (csrc/cuda/dispatch.cu); flash_ext/_support.py mirrors its rule.
#if defined(FLASH_EXT_WITH_CUDA) && defined(FLASH_EXT_SM90A)
constexpr const char* kCudaFamilies = "sm90,sm80";
#elif defined(FLASH_EXT_WITH_CUDA)
constexpr const char* kCudaFamilies = "sm80";
#else
constexpr const char* kCudaFamilies = "";
#endif

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "flash_ext operators", -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && (PyModule_AddIntConstant(module, "WITH_CUDA", kWithCuda) != 0 ||
                            PyModule_AddStringConstant(module, "CUDA_FAMILIES", kCudaFamilies) != 0)) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
