// C++ entry points of the per-sample squared-norm operators, for libtorch
// users. Schemas: csrc/gradood.cpp; kernels: csrc/cpu/persample_norms_kernel.cpp
// and csrc/cuda/persample_norms_*.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace gradood {

// Per sample n: ‖Σ_t g_{n,t} a_{n,t}ᵀ‖_F² for activations [N, T, d] and
// grads [N, T, p] (any strides), method "ghost" (Σ_{t,s} ⟨a_t,a_s⟩⟨g_t,g_s⟩)
// or "materialise" (the p×d product, squared and summed); the two are equal
// in exact arithmetic and differ in cost. Returns [N]: float64 for float64
// inputs, else float32.
at::Tensor outer_product_sq_norm(const at::Tensor& activations, const at::Tensor& grads,
                                 const std::string& method);

// Per sample b: ‖∂ℓ_b/∂W‖_F² of a 2-D convolution's weight, from its input
// after padding, padded_input [B, C_in, H, W], and the gradient of the loss
// w.r.t. its output, grad_output [B, C_out, H_out, W_out]; per group the
// patches are the activations of outer_product_sq_norm (never unfolded on
// CUDA). Returns [B] (float64 for float64 inputs, else float32).
at::Tensor conv2d_weight_sq_norm(const at::Tensor& padded_input, const at::Tensor& grad_output,
                                 at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                 at::IntArrayRef dilation, int64_t groups,
                                 const std::string& method);

// Shared validation of every backend; the method as 0 (ghost) or 1 (materialise).
int check_outer_product_inputs(const at::Tensor& activations, const at::Tensor& grads,
                               const std::string& method);
int check_conv2d_inputs(const at::Tensor& padded_input, const at::Tensor& grad_output,
                        at::IntArrayRef kernel_size, at::IntArrayRef stride,
                        at::IntArrayRef dilation, int64_t groups, const std::string& method);

}  // namespace gradood
