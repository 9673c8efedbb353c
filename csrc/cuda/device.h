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
