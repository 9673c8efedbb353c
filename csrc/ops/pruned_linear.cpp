// gradood::top_features and gradood::pruned_linear: their C++ entry points and checks
// (ops/pruned_linear.h).
#include "ops/pruned_linear.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include "ops/checks.h"

namespace gradood {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> top_features(const at::Tensor& features,
                                                                        int64_t keep) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gradood::top_features", "")
                       .typed<decltype(top_features)>();
  return op.call(features, keep);
}

at::Tensor pruned_linear(const at::Tensor& values, const at::Tensor& indices,
                         const at::Tensor& weight_blocks, int64_t classes) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gradood::pruned_linear", "")
                       .typed<decltype(pruned_linear)>();
  return op.call(values, indices, weight_blocks, classes);
}

void check_top_features_inputs(const at::Tensor& features, int64_t keep) {
  constexpr const char* op = "top_features";
  TORCH_CHECK(features.dim() == 2, op, ": features must be 2-D [B, D], got shape ",
              features.sizes());
  TORCH_CHECK(features.scalar_type() == at::kFloat || features.scalar_type() == at::kDouble, op,
              ": features must be float32 or float64, got ", features.scalar_type());
  TORCH_CHECK(keep >= 1 && keep <= features.size(1), op, ": keep must be in [1, ", features.size(1),
              "] (the features' D), got ", keep);
}

void check_pruned_linear_inputs(const at::Tensor& values, const at::Tensor& indices,
                                const at::Tensor& weight_blocks, int64_t classes) {
  constexpr const char* op = "pruned_linear";
  TORCH_CHECK(values.dim() == 2, op, ": values must be 2-D [B, K], got shape ", values.sizes());
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble, op,
              ": values must be float32 or float64, got ", values.scalar_type());
  TORCH_CHECK(indices.sizes() == values.sizes(), op, ": indices must have the values' shape ",
              values.sizes(), ", got ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ",
              indices.scalar_type());
  TORCH_CHECK(indices.device() == values.device(), op, ": indices must be on the values' device ",
              values.device(), ", got ", indices.device());
  TORCH_CHECK(classes >= 1, op, ": classes must be >= 1, got ", classes);
  const int64_t blocks = (classes + kPrunedLinearBlock - 1) / kPrunedLinearBlock;
  TORCH_CHECK(weight_blocks.dim() == 3 && weight_blocks.size(0) == blocks &&
                  weight_blocks.size(2) == kPrunedLinearBlock,
              op, ": weight_blocks must be [", blocks, ", D, ", kPrunedLinearBlock, "] for ",
              classes, " classes (gradood._ops.pruned_linear_blocks), got shape ",
              weight_blocks.sizes());
  check_dtype_and_device_match(op, "weight_blocks", weight_blocks, "the values'", values);
}

}  // namespace gradood
