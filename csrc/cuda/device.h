// What every file in csrc/cuda includes instead of the CUDA runtime headers:
// CUDA itself, or, when GRADOOD_CUDA_EMULATION is defined (a host C++
// compiler building the .cu files as C++20), the CPU emulation of
// csrc/emulation/cuda_emulation.h, which is how the kernels are tested on
// machines without a GPU (tests/test_cuda_emulated.py).
//
//   GRADOOD_LAUNCH(grid, block, stream, kernel<...>)(args...);
//   return gradood_launch_status();
#pragma once

#if !defined(GRADOOD_CUDA_EMULATION)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#if defined(__CUDACC__)
#define GRADOOD_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>

inline cudaError_t gradood_launch_status() { return cudaGetLastError(); }
#endif

#else

#include "emulation/cuda_emulation.h"

#define GRADOOD_LAUNCH(grid, block, stream, ...) \
  ::gradood::emulation::launcher(&__VA_ARGS__, dim3(grid), dim3(block))

inline cudaError_t gradood_launch_status() { return ::gradood::emulation::take_last_error(); }

#endif

#include <type_traits>

namespace gradood {
namespace cuda {

// The accumulator of a kernel input type: double for double, float otherwise.
template <typename scalar_t>
using accumulator_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// An input element (float, double, __half, __nv_bfloat16) as acc_t.
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(float value) {
  return static_cast<acc_t>(value);
}
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(double value) {
  return static_cast<acc_t>(value);
}
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(__half value) {
  return static_cast<acc_t>(__half2float(value));
}
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(__nv_bfloat16 value) {
  return static_cast<acc_t>(__bfloat162float(value));
}

}  // namespace cuda
}  // namespace gradood
