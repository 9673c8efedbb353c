#include "ops/norm_affine.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include "ops/checks.h"

namespace gradood {

std::tuple<at::Tensor, at::Tensor> norm_affine_grads(const at::Tensor& grad_output,
                                                     const at::Tensor& input,
                                                     const std::optional<at::Tensor>& shift,
                                                     const at::Tensor& scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gradood::norm_affine_grads", "")
                       .typed<decltype(norm_affine_grads)>();
  return op.call(grad_output, input, shift, scale);
}

namespace {

void check_like(const char* name, const at::Tensor& tensor, const at::Tensor& grad_output) {
  constexpr const char* op = "norm_affine_grads";
  TORCH_CHECK(tensor.sizes() == grad_output.sizes(), op, ": ", name,
              " must have grad_output's shape ", grad_output.sizes(),
              " (expand broadcast statistics), got ", tensor.sizes());
  check_dtype_and_device_match(op, name, tensor, "grad_output's", grad_output);
}

}  // namespace

void check_norm_affine_inputs(const at::Tensor& grad_output, const at::Tensor& input,
                              const std::optional<at::Tensor>& shift, const at::Tensor& scale) {
  constexpr const char* op = "norm_affine_grads";
  TORCH_CHECK(grad_output.dim() == 3, op, ": grad_output must be 3-D [B, C, T], got shape ",
              grad_output.sizes());
  const auto dtype = grad_output.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      op, ": grad_output must be float32, float64, float16 or bfloat16, got ", dtype);
  check_like("input", input, grad_output);
  if (shift.has_value()) check_like("shift", *shift, grad_output);
  check_like("scale", scale, grad_output);
}

}  // namespace gradood
