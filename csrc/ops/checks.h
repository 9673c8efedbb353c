// Argument checks shared by the operators' C++ entry points.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace gradood {

// `tensor` (called `name`) must have the dtype and device of `reference`;
// `owner` names the reference in the message: "the features'", "grad_output's".
inline void check_dtype_and_device_match(const char* op, const char* name, const at::Tensor& tensor,
                                         const char* owner, const at::Tensor& reference) {
  TORCH_CHECK(tensor.scalar_type() == reference.scalar_type(), op, ": ", name, " must have ", owner,
              " dtype ", reference.scalar_type(), ", got ", tensor.scalar_type());
  TORCH_CHECK(tensor.device() == reference.device(), op, ": ", name, " must be on ", owner,
              " device ", reference.device(), ", got ", tensor.device());
}

}  // namespace gradood
