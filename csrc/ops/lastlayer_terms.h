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
std::tuple<at::Tensor, at::Tensor> lastlayer_terms(const at::Tensor& logits,
                                                   const std::optional<at::Tensor>& features,
                                                   double temperature, double clip);

// One score per row, [B] (float64 for float64 inputs, else float32), from the
// same pass: compose_score of the row's terms with the given spec (see
// ScoreSpec). feature_term is a feature column or kNoFeatureTerm; features
// must be given exactly when it is a feature column.
at::Tensor lastlayer_score(const at::Tensor& logits, const std::optional<at::Tensor>& features,
                           int64_t logit_term, double logit_scale, int64_t feature_term,
                           bool with_bias, int64_t combine, double alpha, double temperature,
                           double clip);

// Names of the output columns, in order (the LastLayerTerm enum as strings).
std::vector<std::string> lastlayer_term_names();

// Shared validation of every backend: shapes, dtypes, devices, parameters.
void check_lastlayer_terms_inputs(const at::Tensor& logits,
                                  const std::optional<at::Tensor>& features, double temperature,
                                  double clip);

// Validation of lastlayer_score's spec arguments.
void check_lastlayer_score_spec(const std::optional<at::Tensor>& features, int64_t logit_term,
                                int64_t feature_term, bool with_bias, int64_t combine);

}  // namespace gradood
