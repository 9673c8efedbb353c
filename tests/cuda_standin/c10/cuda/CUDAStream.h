// Stand-in for c10/cuda/CUDAStream.h (see CUDAException.h).
#pragma once
#include <cuda_runtime.h>
namespace c10::cuda {
struct CUDAStream {
  operator cudaStream_t() const;
  cudaStream_t stream() const;
};
CUDAStream getCurrentCUDAStream(signed char device_index = -1);
}  // namespace c10::cuda
