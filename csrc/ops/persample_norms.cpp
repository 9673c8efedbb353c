#include "ops/persample_norms.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

namespace gradood {

at::Tensor outer_product_sq_norm(const at::Tensor& activations, const at::Tensor& grads,
                                 const std::string& method) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gradood::outer_product_sq_norm", "")
                       .typed<decltype(outer_product_sq_norm)>();
  return op.call(activations, grads, method);
}

at::Tensor conv2d_weight_sq_norm(const at::Tensor& padded_input, const at::Tensor& grad_output,
                                 at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                 at::IntArrayRef dilation, int64_t groups,
                                 const std::string& method) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gradood::conv2d_weight_sq_norm", "")
                       .typed<decltype(conv2d_weight_sq_norm)>();
  return op.call(padded_input, grad_output, kernel_size, stride, dilation, groups, method);
}

namespace {

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
         dtype == at::kBFloat16;
}

int parse_method(const char* op, const std::string& method) {
  if (method == "ghost") return 0;
  if (method == "materialise") return 1;
  TORCH_CHECK(false, op, ": method must be \"ghost\" or \"materialise\", got \"", method, "\"");
}

void check_pair(const char* op, const char* first_name, const at::Tensor& first,
                const char* second_name, const at::Tensor& second) {
  TORCH_CHECK(is_supported_dtype(first.scalar_type()), op, ": ", first_name,
              " must be float32, float64, float16 or bfloat16, got ", first.scalar_type());
  TORCH_CHECK(first.scalar_type() == second.scalar_type(), op, ": ", first_name, " and ",
              second_name, " must have one dtype, got ", first.scalar_type(), " and ",
              second.scalar_type());
  TORCH_CHECK(first.device() == second.device(), op, ": ", first_name, " and ", second_name,
              " must be on one device, got ", first.device(), " and ", second.device());
}

}  // namespace

int check_outer_product_inputs(const at::Tensor& activations, const at::Tensor& grads,
                               const std::string& method) {
  constexpr const char* op = "outer_product_sq_norm";
  TORCH_CHECK(activations.dim() == 3, op, ": activations must be 3-D [N, T, d], got shape ",
              activations.sizes());
  TORCH_CHECK(grads.dim() == 3, op, ": grads must be 3-D [N, T, p], got shape ", grads.sizes());
  TORCH_CHECK(activations.size(0) == grads.size(0) && activations.size(1) == grads.size(1), op,
              ": activations [N, T, d] and grads [N, T, p] must agree in N and T, got ",
              activations.sizes(), " and ", grads.sizes());
  check_pair(op, "activations", activations, "grads", grads);
  return parse_method(op, method);
}

int check_conv2d_inputs(const at::Tensor& padded_input, const at::Tensor& grad_output,
                        at::IntArrayRef kernel_size, at::IntArrayRef stride,
                        at::IntArrayRef dilation, int64_t groups, const std::string& method) {
  constexpr const char* op = "conv2d_weight_sq_norm";
  TORCH_CHECK(padded_input.dim() == 4, op, ": padded_input must be 4-D [B, C_in, H, W], got shape ",
              padded_input.sizes());
  TORCH_CHECK(grad_output.dim() == 4, op,
              ": grad_output must be 4-D [B, C_out, H_out, W_out], got shape ",
              grad_output.sizes());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && dilation.size() == 2, op,
              ": kernel_size, stride and dilation must have two entries each");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(kernel_size[i] >= 1 && stride[i] >= 1 && dilation[i] >= 1, op,
                ": kernel_size, stride and dilation must be >= 1, got ", kernel_size, ", ", stride,
                ", ", dilation);
  }
  TORCH_CHECK(
      groups >= 1 && padded_input.size(1) % groups == 0 && grad_output.size(1) % groups == 0, op,
      ": groups (", groups, ") must divide C_in (", padded_input.size(1), ") and C_out (",
      grad_output.size(1), ")");
  TORCH_CHECK(padded_input.size(0) == grad_output.size(0), op,
              ": batch sizes differ: ", padded_input.size(0), " and ", grad_output.size(0));
  for (int i = 0; i < 2; ++i) {
    const int64_t span = dilation[i] * (kernel_size[i] - 1) + 1;
    const int64_t expected =
        padded_input.size(2 + i) >= span ? (padded_input.size(2 + i) - span) / stride[i] + 1 : 0;
    TORCH_CHECK(grad_output.size(2 + i) == expected, op, ": grad_output's spatial size ",
                grad_output.sizes().slice(2), " does not match the convolution of padded_input ",
                padded_input.sizes().slice(2), " (expected ", expected, " along dim ", 2 + i, ")");
  }
  check_pair(op, "padded_input", padded_input, "grad_output", grad_output);
  return parse_method(op, method);
}

}  // namespace gradood
