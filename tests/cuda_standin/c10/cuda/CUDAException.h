// Stand-in for a CUDA torch's c10/cuda/CUDAException.h: only what
// tests/check_cuda_registration.sh needs to type-check csrc/cuda/*_cuda.cpp
// against a CPU torch. Never linked or run.
#pragma once
#include <cuda_runtime.h>
#include <c10/util/Exception.h>
#define C10_CUDA_CHECK(EXPR)                                              \
  do {                                                                    \
    const cudaError_t gradood_standin_error = (EXPR);                     \
    TORCH_CHECK(gradood_standin_error == cudaSuccess, "CUDA error");      \
  } while (0)
