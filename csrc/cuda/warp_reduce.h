// Block shape and warp reductions shared by the CUDA kernels (device code;
// included after cuda/device.h, so also built by the CPU emulation).
#pragma once

#include "cuda/device.h"

namespace gradood {
namespace cuda {

constexpr int kThreads = 256;  // threads per block of every kernel here
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;

// Sums each of `values` over the warp by shuffles; the totals are valid in lane 0.
template <typename acc_t, int N>
__device__ __forceinline__ void warp_sum(acc_t (&values)[N]) {
#pragma unroll
  for (int k = 0; k < N; ++k) {
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      values[k] += __shfl_down_sync(0xffffffffu, values[k], offset);
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t value) {
  acc_t values[1] = {value};
  warp_sum(values);
  return values[0];
}

}  // namespace cuda
}  // namespace gradood
