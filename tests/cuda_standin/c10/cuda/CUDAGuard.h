// Stand-in for c10/cuda/CUDAGuard.h (see CUDAException.h).
#pragma once
#include <c10/core/Device.h>
namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device device);
  CUDAGuard(const CUDAGuard&) = delete;
};
}  // namespace c10::cuda
