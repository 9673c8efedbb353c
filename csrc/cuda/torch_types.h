// For the CUDA registration files (csrc/cuda/*_cuda.cpp): torch's element types
// as the CUDA types the kernels are written in, and typed device pointers.
#pragma once

#include <ATen/core/Tensor.h>

#include <type_traits>

#include "cuda/device.h"

namespace gradood {
namespace cuda {

template <typename scalar_t>
struct CudaType {
  using type = scalar_t;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// The tensor's data as the kernels' element type; nullptr for an undefined tensor.
template <typename scalar_t>
const typename CudaType<scalar_t>::type* device_ptr(const at::Tensor& tensor) {
  if (!tensor.defined()) return nullptr;
  return reinterpret_cast<const typename CudaType<scalar_t>::type*>(
      tensor.const_data_ptr<scalar_t>());
}

}  // namespace cuda
}  // namespace gradood
