// C++ entry point of gradood::norm_affine_grads, for libtorch users. Schema:
// csrc/gradood.cpp; kernels: csrc/cpu/norm_affine_kernel.cpp, csrc/cuda/norm_affine_*.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace gradood {

// Per-sample gradients of a normalisation layer's affine parameters, from
// tensors viewed as [B, C, T] (C: the parameter's entries, T: the positions a
// sample sums over; any strides, expanded views welcome):
//   weight[b, c] = Σ_t g · (x − shift) · scale,   bias[b, c] = Σ_t g
// shift may be absent (RMSNorm). Returns ([B, C], [B, C]) in float64 for
// float64 inputs, else float32.
std::tuple<at::Tensor, at::Tensor> norm_affine_grads(const at::Tensor& grad_output,
                                                     const at::Tensor& input,
                                                     const std::optional<at::Tensor>& shift,
                                                     const at::Tensor& scale);

// Shared validation of every backend.
void check_norm_affine_inputs(const at::Tensor& grad_output, const at::Tensor& input,
                              const std::optional<at::Tensor>& shift, const at::Tensor& scale);

}  // namespace gradood
