// The methods of gradood._C (csrc/python_module.cpp); see python_fast_path.cpp.
#pragma once

#include <Python.h>

namespace gradood {
PyMethodDef* python_fast_path_methods();
}  // namespace gradood
