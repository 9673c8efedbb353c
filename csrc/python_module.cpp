// The Python extension module gradood._C. Importing it loads this shared
// library, whose static initialisers register the operators with the
// dispatcher; the module itself holds nothing (ops are torch.ops.gradood.*).
// Not part of the CMake (libtorch) build, which needs no Python.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "gradood operators (torch.ops.gradood)",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
