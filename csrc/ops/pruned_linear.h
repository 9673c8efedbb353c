// C++ entry points of gradood::top_features and gradood::pruned_linear (ASH's and SCALE's
// feature pruning and the head product on the kept features), for libtorch users. Schemas:
// csrc/gradood.cpp; checks: csrc/ops/pruned_linear.cpp; kernels:
// csrc/cpu/pruned_linear_kernel.cpp (CPU only: gradood/detectors/ash.py composes ATen
// ops on other devices).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace gradood {

// Each row's `keep` largest entries of features [B, D] (float32 or float64, 1 <= keep <= D),
// ties at the threshold (the keep-th largest value) broken by the lower index, so that a
// row's selection does not depend on its batch:
//   values [B, keep]   the kept entries, in increasing index order (features' dtype)
//   indices [B, keep]  their indices (int64, increasing)
//   total [B]          s₁ = Σ_j v_j over the whole row (float64)
//   kept_sum [B]       s₂ = Σ of the kept entries (float64)
// A row holding a NaN gets NaN values, total and kept_sum, and indices 0 … keep-1.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> top_features(const at::Tensor& features,
                                                                        int64_t keep);

// The head applied to pruned features given by (values, indices) [B, K]:
//   out[b, c] = Σ_i values[b, i] · W[c, indices[b, i]]      (no bias), c < classes
// with the head W [C, D] passed as weight_blocks [ceil(C / 64), D, 64]: block n holds Wᵀ's
// columns 64n … 64n + 63, zero beyond C (gradood._ops.pruned_linear_blocks builds it, once per
// head). Same dtype and device as values; indices int64 in [0, D). Each sum runs over i in
// order, in float32 for float32 (float64 for float64): K products per logit instead of a dense
// GEMM's D.
at::Tensor pruned_linear(const at::Tensor& values, const at::Tensor& indices,
                         const at::Tensor& weight_blocks, int64_t classes);

// Columns of each block of pruned_linear's weight_blocks.
constexpr int64_t kPrunedLinearBlock = 64;

// Shared validation of every backend.
void check_top_features_inputs(const at::Tensor& features, int64_t keep);
void check_pruned_linear_inputs(const at::Tensor& values, const at::Tensor& indices,
                                const at::Tensor& weight_blocks, int64_t classes);

}  // namespace gradood
