// A minimal Python module: importing flash_ext._C loads this library, whose
// static initializers register the operators (no pybind11 needed).
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "flash_ext operators", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
#ifdef FLASH_EXT_WITH_CUDA
  constexpr long kWithCuda = 1;
#else
  constexpr long kWithCuda = 0;
#endif
  if (module != nullptr && PyModule_AddIntConstant(module, "WITH_CUDA", kWithCuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
