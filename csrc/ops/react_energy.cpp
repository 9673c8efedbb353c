// gradood::react_energy: its C++ entry point, its checks, and its kernel, one
// composition for every device (registered as CompositeExplicitAutograd):
//   clamp_max (skipped for an infinite clip) → addmm on the device's GEMM
//   library (MKL/oneDNN, cuBLAS) → the fused energy pass of lastlayer_score.
// A block-fused CPU kernel (clip, GEMM and log-sum-exp per block of 256 rows
// while in cache) was measured against this and gained nothing reliable: the
// GEMM dominates (2·B·C·D flops against B·D + B·C extra elements moved), and
// per-thread GEMMs on small blocks lost what the saved passes gained (float32
// within ±6% of eager, bfloat16 with C = 10 several times slower;
// benchmarks/RESULTS.md). On CUDA the GEMM library has no operand prologue to
// take the clip.
#include "ops/react_energy.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>

#include "common/lastlayer_terms_math.h"
#include "ops/checks.h"
#include "ops/lastlayer_terms.h"

namespace gradood {

at::Tensor react_energy(const at::Tensor& features, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, double clip) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gradood::react_energy", "")
                       .typed<decltype(react_energy)>();
  return op.call(features, weight, bias, clip);
}

void check_react_energy_inputs(const at::Tensor& features, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, double clip) {
  constexpr const char* op = "react_energy";
  TORCH_CHECK(features.dim() == 2, op, ": features must be 2-D [B, D], got shape ",
              features.sizes());
  const auto dtype = features.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      op, ": features must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == features.size(1) && weight.size(0) >= 1, op,
              ": weight must be [C, ", features.size(1),
              "] with C >= 1 to match features [B, D], got shape ", weight.sizes());
  check_dtype_and_device_match(op, "weight", weight, "the features'", features);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be [",
                weight.size(0), "] or absent, got shape ", bias->sizes());
    check_dtype_and_device_match(op, "bias", *bias, "the features'", features);
  }
  TORCH_CHECK(clip > 0, op, ": clip must be > 0 (inf for no clipping), got ", clip);
}

namespace {

at::Tensor react_energy_composite(const at::Tensor& features, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, double clip) {
  check_react_energy_inputs(features, weight, bias, clip);
  const at::Tensor clipped = std::isinf(clip) ? features : features.clamp_max(clip);
  const at::Tensor logits =
      bias.has_value() ? at::addmm(*bias, clipped, weight.t()) : at::mm(clipped, weight.t());
  return lastlayer_score(logits, std::nullopt, kEnergy, 1.0, kNoFeatureTerm, false, kCombineProduct,
                         0.0, 1.0, INFINITY);
}

}  // namespace

TORCH_LIBRARY_IMPL(gradood, CompositeExplicitAutograd, m) {
  m.impl("react_energy", &react_energy_composite);
}

}  // namespace gradood
