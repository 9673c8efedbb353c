// CPU kernels of gradood::outer_product_sq_norm and conv2d_weight_sq_norm,
// composed from ATen: on the CPU the batched GEMMs (MKL/oneDNN) and oneDNN's grouped
// convolution backward are what a hand-written loop would call anyway. Per-sample convolution
// weight gradients come from the grouped backward, or, for few input channels per group, from a
// GEMM of the patches (unfolded by one strided copy, never at::im2col). Samples are processed in
// chunks so no intermediate (Gram matrices, per-sample products, unfolded patches) is larger than
// the op's own two inputs together (or kMinChunkElements, for small layers), and never
// kMaxChunkElements: the norms are computed during the backward, and their scratch memory stays
// within what that layer's backward already holds. Half-precision inputs are upcast per chunk.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/persample_norms.h"

namespace gradood {
namespace {

constexpr int64_t kMinChunkElements = int64_t(1) << 18;
constexpr int64_t kMaxChunkElements = int64_t(1) << 26;

at::ScalarType accumulator_type(const at::Tensor& tensor) {
  return tensor.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ‖Σ_t g_t a_tᵀ‖² per sample of one chunk, already in the accumulator type.
at::Tensor chunk_sq_norm(const at::Tensor& a, const at::Tensor& g, int method) {
  if (method == 0) {
    return (at::bmm(a, a.transpose(1, 2)) * at::bmm(g, g.transpose(1, 2))).sum({1, 2});
  }
  return at::bmm(g.transpose(1, 2), a).square().sum({1, 2});
}

// Samples per chunk when each holds `per_sample` intermediate elements and the
// op's inputs hold `input_elements`.
int64_t chunk_rows(int64_t per_sample, int64_t input_elements) {
  const int64_t budget = std::min(kMaxChunkElements, std::max(kMinChunkElements, input_elements));
  return std::max<int64_t>(1, budget / std::max<int64_t>(1, per_sample));
}

at::Tensor outer_product_sq_norm_cpu(const at::Tensor& activations, const at::Tensor& grads,
                                     const std::string& method_name) {
  const int method = check_outer_product_inputs(activations, grads, method_name);
  const auto acc = accumulator_type(activations);
  const int64_t count = activations.size(0), positions = activations.size(1);
  const int64_t in_features = activations.size(2), out_features = grads.size(2);
  at::Tensor out = at::zeros({count}, activations.options().dtype(acc));
  if (count == 0 || positions == 0 || in_features == 0 || out_features == 0) return out;
  const int64_t rows = chunk_rows(
      method == 0 ? positions * positions
                  : std::max(in_features * out_features, positions * (in_features + out_features)),
      activations.numel() + grads.numel());
  for (int64_t start = 0; start < count; start += rows) {
    const int64_t length = std::min(rows, count - start);
    out.narrow(0, start, length)
        .copy_(chunk_sq_norm(activations.narrow(0, start, length).to(acc),
                             grads.narrow(0, start, length).to(acc), method));
  }
  return out;
}

// The patches of a (padded) input, [b, C_in·kh·kw, T] with the positions innermost: a strided
// view copied once (each copied run is a row of the output, contiguous for stride 1), 10x
// faster than at::im2col's scalar loop on the MNIST CNN's first layer.
at::Tensor unfold_patches(const at::Tensor& input, at::IntArrayRef kernel_size,
                          at::IntArrayRef stride, at::IntArrayRef dilation) {
  const int64_t height = input.size(2), width = input.size(3);
  const int64_t out_h = (height - dilation[0] * (kernel_size[0] - 1) - 1) / stride[0] + 1;
  const int64_t out_w = (width - dilation[1] * (kernel_size[1] - 1) - 1) / stride[1] + 1;
  const at::Tensor view = input.as_strided(
      {input.size(0), input.size(1), kernel_size[0], kernel_size[1], out_h, out_w},
      {input.stride(0), input.stride(1), dilation[0] * input.stride(2),
       dilation[1] * input.stride(3), stride[0] * input.stride(2), stride[1] * input.stride(3)},
      input.storage_offset());
  return view.reshape(
      {input.size(0), input.size(1) * kernel_size[0] * kernel_size[1], out_h * out_w});
}

// Input channels per group up to which the per-sample weight gradients are one batched GEMM
// of the patches (an MNIST or RGB stem: 1.2-8x faster than the grouped convolution backward,
// whose kernel for one channel per group is slow); above it the grouped backward wins, except on
// x86-64 CPUs without AVX2 (ATen's DEFAULT level), where oneDNN's SSE4.1 grouped kernel lost to
// the GEMM by 1.2-1.8x for 16 and 64 channels too (benchmarks/RESULTS.md).
constexpr int64_t kFewChannels = 4;

bool gemm_for_every_width() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool baseline = at::get_cpu_capability() == "DEFAULT";
  return baseline;
#else
  return false;  // not measured on other CPUs: the grouped backward, as for wide layers on x86
#endif
}

// Per sample and group, Σ_t g_t a_tᵀ as a batched GEMM of the unfolded patches:
// [b·groups, C_out/groups, C_in/groups·kh·kw].
at::Tensor per_sample_conv2d_weight_grads_unfolded(const at::Tensor& input, const at::Tensor& grads,
                                                   at::IntArrayRef kernel_size,
                                                   at::IntArrayRef stride, at::IntArrayRef dilation,
                                                   int64_t groups) {
  const int64_t length = input.size(0), positions = grads.size(2) * grads.size(3);
  const at::Tensor patches = unfold_patches(input, kernel_size, stride, dilation);
  const at::Tensor a = patches.reshape({length * groups, patches.size(1) / groups, positions});
  const at::Tensor g = grads.reshape({length * groups, grads.size(1) / groups, positions});
  return at::bmm(g, a.transpose(1, 2));
}

// The per-sample weight gradients of a convolution, [b·C_out, C_in/groups, kh, kw],
// as one convolution backward with the samples as extra groups (the batch folded
// into the channels): oneDNN's grouped weight-gradient kernel, several times faster
// on the CPU than unfolding the patches (at::im2col is a scalar loop) and a GEMM.
at::Tensor per_sample_conv2d_weight_grads(const at::Tensor& input, const at::Tensor& grads,
                                          at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                          at::IntArrayRef dilation, int64_t groups) {
  const int64_t length = input.size(0), in_channels = input.size(1);
  const int64_t out_channels = grads.size(1);
  const at::Tensor folded_input =
      input.reshape({1, length * in_channels, input.size(2), input.size(3)});
  const at::Tensor folded_grads =
      grads.reshape({1, length * out_channels, grads.size(2), grads.size(3)});
  // Only the weight's shape is read when only its gradient is asked for.
  const at::Tensor weight =
      at::empty({length * out_channels, in_channels / groups, kernel_size[0], kernel_size[1]},
                input.options());
  return std::get<1>(at::convolution_backward(folded_grads, folded_input, weight, c10::nullopt,
                                              stride, {0, 0}, dilation, false, {0, 0},
                                              length * groups, {false, true, false}));
}

// ‖Σ_t g_t a_tᵀ‖² per sample and group by the ghost identity, from the unfolded
// patches: [b] for one chunk, already in the accumulator type.
at::Tensor conv2d_ghost_sq_norm(const at::Tensor& input, const at::Tensor& grads,
                                at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                at::IntArrayRef dilation, int64_t groups) {
  const int64_t length = input.size(0), positions = grads.size(2) * grads.size(3);
  const at::Tensor patches = unfold_patches(input, kernel_size, stride, dilation);
  // [b·groups, T, d] and [b·groups, T, p] as transposed views: the GEMMs take them
  // as they are, so neither the patches nor the gradients are copied again.
  const at::Tensor a =
      patches.reshape({length * groups, patches.size(1) / groups, positions}).transpose(1, 2);
  const at::Tensor g =
      grads.reshape({length * groups, grads.size(1) / groups, positions}).transpose(1, 2);
  return chunk_sq_norm(a, g, 0).reshape({length, groups}).sum(1);
}

at::Tensor conv2d_weight_sq_norm_cpu(const at::Tensor& padded_input, const at::Tensor& grad_output,
                                     at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                     at::IntArrayRef dilation, int64_t groups,
                                     const std::string& method_name) {
  const int method = check_conv2d_inputs(padded_input, grad_output, kernel_size, stride, dilation,
                                         groups, method_name);
  const auto acc = accumulator_type(padded_input);
  const int64_t batch = padded_input.size(0);
  const int64_t positions = grad_output.size(2) * grad_output.size(3);
  const int64_t in_per_group = padded_input.size(1) / groups * kernel_size[0] * kernel_size[1];
  const int64_t out_per_group = grad_output.size(1) / groups;
  at::Tensor out = at::zeros({batch}, padded_input.options().dtype(acc));
  if (batch == 0 || positions == 0 || in_per_group == 0 || out_per_group == 0) return out;
  // Per sample, the ghost method holds the unfolded patches and a T×T Gram matrix; the
  // materialising one its gradients, and the convolution backward its own scratch, bounded
  // the same way (counting the patches there too keeps the peak within a training step's).
  const int64_t product = method == 0 ? positions * positions : in_per_group * out_per_group;
  const int64_t per_sample = groups * std::max(product, positions * in_per_group);
  const int64_t rows = chunk_rows(per_sample, padded_input.numel() + grad_output.numel());
  for (int64_t start = 0; start < batch; start += rows) {
    const int64_t length = std::min(rows, batch - start);
    const at::Tensor input = padded_input.narrow(0, start, length).to(acc);
    const at::Tensor grads = grad_output.narrow(0, start, length).to(acc);
    if (method == 0) {
      out.narrow(0, start, length)
          .copy_(conv2d_ghost_sq_norm(input, grads, kernel_size, stride, dilation, groups));
      continue;
    }
    const at::Tensor weight_grads =
        padded_input.size(1) / groups <= kFewChannels || gemm_for_every_width()
            ? per_sample_conv2d_weight_grads_unfolded(input, grads, kernel_size, stride, dilation,
                                                      groups)
            : per_sample_conv2d_weight_grads(input, grads, kernel_size, stride, dilation, groups);
    out.narrow(0, start, length).copy_(weight_grads.reshape({length, -1}).square().sum(1));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradood, CPU, m) {
  m.impl("outer_product_sq_norm", &outer_product_sq_norm_cpu);
  m.impl("conv2d_weight_sq_norm", &conv2d_weight_sq_norm_cpu);
}

}  // namespace gradood
