// The Python extension module gradood._C. Importing it loads this shared
// library, whose static initialisers register the operators with the
// dispatcher (torch.ops.gradood.*); the module itself holds only the plain-CPU
// fast path of gradood.scores (python_fast_path.cpp).
// Not part of the CMake (libtorch) build, which needs no Python.
#include <Python.h>

#include "python_fast_path.h"

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "gradood operators (torch.ops.gradood)", -1,
                                          gradood::python_fast_path_methods()};
  return PyModule_Create(&module_def);
}
