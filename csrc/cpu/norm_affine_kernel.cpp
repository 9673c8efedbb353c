// CPU kernel of gradood::norm_affine_grads, composed from ATen (one fused
// elementwise expression and two reductions; the [B, C, T] product is the
// input's size, so no chunking is needed).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/norm_affine.h"

namespace gradood {
namespace {

std::tuple<at::Tensor, at::Tensor> norm_affine_grads_cpu(const at::Tensor& grad_output,
                                                         const at::Tensor& input,
                                                         const std::optional<at::Tensor>& shift,
                                                         const at::Tensor& scale) {
  check_norm_affine_inputs(grad_output, input, shift, scale);
  const auto acc = grad_output.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = grad_output.to(acc);
  at::Tensor normalised = input.to(acc);
  if (shift.has_value()) normalised = normalised - shift->to(acc);
  normalised = normalised * scale.to(acc);
  return {(g * normalised).sum(2), g.sum(2)};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradood, CPU, m) { m.impl("norm_affine_grads", &norm_affine_grads_cpu); }

}  // namespace gradood
