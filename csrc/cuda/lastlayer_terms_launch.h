// Launchers of the lastlayer_terms CUDA kernels: raw pointers, sizes and a
// stream, no torch headers, so the kernels compile with nvcc alone (CI checks
// that on machines without a CUDA torch) and are usable without libtorch.
#pragma once

#include <cstdint>

#include "common/lastlayer_terms_math.h"
#include "cuda/device.h"

namespace gradood {
namespace cuda {

// logits: [batch, num_classes] row-major; features: [batch, num_features]
// row-major or nullptr (then num_features is ignored and `terms` has
// kNumLogitTerms columns, else kNumTerms). acc_t is float, or double for
// double inputs. Returns the launch status; no host synchronisation.
template <typename scalar_t, typename acc_t>
cudaError_t launch_lastlayer_terms(const scalar_t* logits, const scalar_t* features, int64_t batch,
                                   int64_t num_classes, int64_t num_features, double temperature,
                                   double clip, acc_t* terms, int64_t* argmax, cudaStream_t stream);

// One score per row: compose_score(terms, spec) written to scores[row].
template <typename scalar_t, typename acc_t>
cudaError_t launch_lastlayer_score(const scalar_t* logits, const scalar_t* features, int64_t batch,
                                   int64_t num_classes, int64_t num_features, double temperature,
                                   double clip, const ScoreSpec<acc_t>& spec, acc_t* scores,
                                   cudaStream_t stream);

}  // namespace cuda
}  // namespace gradood
