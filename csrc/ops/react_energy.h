// C++ entry point of gradood::react_energy, for libtorch users. Schema:
// csrc/gradood.cpp; kernel (one composition for every device):
// csrc/ops/react_energy.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace gradood {

// ReAct's score (Sun et al. 2021), the energy of the logits recomputed from
// clipped features:
//   score[b] = log Σ_j exp((W min(v_b, clip) + bias)_j)
// features [B, D], weight [C, D], bias [C] or absent, all of one dtype
// (float32, float64, float16, bfloat16) and device; clip > 0 (inf: no clip).
// A NaN feature stays NaN (its row's score is NaN; other rows unaffected).
// Returns [B] in float64 for float64 inputs, else float32. As in the eager
// composition (features.clamp_max(c), F.linear, logsumexp), the clipped
// features and the logits are in the input dtype (the GEMM accumulates in
// float32 or better) and the log-sum-exp in float32 (float64).
at::Tensor react_energy(const at::Tensor& features, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, double clip);

// Shared validation of every backend.
void check_react_energy_inputs(const at::Tensor& features, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, double clip);

}  // namespace gradood
