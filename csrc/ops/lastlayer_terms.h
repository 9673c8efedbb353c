// C++ entry point of the `gradood::lastlayer_terms` operator, for libtorch
// users. The schema lives in csrc/gradood.cpp, the kernels in
// csrc/cpu/lastlayer_terms_kernel.cpp and csrc/cuda/lastlayer_terms_*.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/lastlayer_terms_math.h"

namespace gradood {

// One pass over each row of `logits` [B, C] (and, when given, `features`
// [B, D]) computing the terms every last-layer OOD score is made of; see
// LastLayerTerm for the columns. Returns (terms, argmax): terms is
// [B, kNumTerms] (or [B, kNumLogitTerms] without features) in float64 for
// float64 inputs and float32 otherwise; argmax is int64 [B].
// Non-contiguous inputs are made contiguous once.
std::tuple<at::Tensor, at::Tensor> lastlayer_terms(
    const at::Tensor& logits, const std::optional<at::Tensor>& features,
    double temperature, double clip);

// Names of the output columns, in order (the LastLayerTerm enum as strings).
std::vector<std::string> lastlayer_term_names();

// Shared validation of every backend: shapes, dtypes, devices, parameters.
void check_lastlayer_terms_inputs(const at::Tensor& logits,
                                  const std::optional<at::Tensor>& features,
                                  double temperature, double clip);

}  // namespace gradood
