// Launcher of the gradood::norm_affine_grads CUDA kernel: raw pointers,
// strides and a stream, no torch headers (see lastlayer_terms_launch.h).
//
// For tensors viewed as [B, C, T] (C: the affine parameter's entries, T: the
// positions each sample sums over; any strides, 0 for broadcast dims):
//   weight[b, c] = Σ_t g[b,c,t] · (x[b,c,t] − shift[b,c,t]) · scale[b,c,t]
//   bias[b, c]   = Σ_t g[b,c,t]
// i.e. each sample's dγ and dβ, without forming g ⊙ x̂.
#pragma once

#include <cstdint>

#include "cuda/device.h"

namespace gradood {
namespace cuda {

struct Strided3 {
  int64_t batch, channel, position;  // strides in elements
};

// shift may be nullptr (RMSNorm: no centring). weight and bias are [B, C]
// contiguous, in acc_t (float, or double for double inputs).
template <typename scalar_t, typename acc_t>
cudaError_t launch_norm_affine_grads(const scalar_t* grad_output, Strided3 grad_strides,
                                     const scalar_t* input, Strided3 input_strides,
                                     const scalar_t* shift, Strided3 shift_strides,
                                     const scalar_t* scale, Strided3 scale_strides, int64_t batch,
                                     int64_t channels, int64_t positions, acc_t* weight,
                                     acc_t* bias, cudaStream_t stream);

}  // namespace cuda
}  // namespace gradood
