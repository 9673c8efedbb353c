// CUDA registration of gradood::lastlayer_terms and lastlayer_score: device
// guard, current stream, output allocation, dtype dispatch. Compiled only
// against a CUDA build of torch (c10/cuda headers); the kernels themselves are
// in lastlayer_terms_kernel.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/lastlayer_terms_launch.h"
#include "cuda/torch_types.h"
#include "ops/lastlayer_terms.h"

namespace gradood {
namespace {

struct CudaInputs {
  at::Tensor logits;    // contiguous
  at::Tensor features;  // contiguous, or undefined
  int64_t num_features;
  at::TensorOptions accumulator_options;
};

CudaInputs prepare(const at::Tensor& logits, const std::optional<at::Tensor>& features,
                   double temperature, double clip) {
  check_lastlayer_terms_inputs(logits, features, temperature, clip);
  TORCH_CHECK(logits.is_cuda(), "gradood CUDA kernel: logits must be on a CUDA device, got ",
              logits.device());
  CudaInputs inputs;
  inputs.logits = logits.contiguous();
  if (features.has_value()) inputs.features = features->contiguous();
  inputs.num_features = features.has_value() ? features->size(1) : 0;
  inputs.accumulator_options =
      logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  return inputs;
}

std::tuple<at::Tensor, at::Tensor> lastlayer_terms_cuda(const at::Tensor& logits,
                                                        const std::optional<at::Tensor>& features,
                                                        double temperature, double clip) {
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const CudaInputs inputs = prepare(logits, features, temperature, clip);
  const int64_t batch = logits.size(0);
  const int64_t num_terms = features.has_value() ? kNumTerms : kNumLogitTerms;
  at::Tensor terms = at::empty({batch, num_terms}, inputs.accumulator_options);
  at::Tensor argmax = at::empty({batch}, logits.options().dtype(at::kLong));
  if (batch == 0) return {terms, argmax};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "lastlayer_terms_cuda", [&] {
        using cuda_t = typename cuda::CudaType<scalar_t>::type;
        using acc_t = cuda::accumulator_t<scalar_t>;
        C10_CUDA_CHECK((cuda::launch_lastlayer_terms<cuda_t, acc_t>(
            cuda::device_ptr<scalar_t>(inputs.logits), cuda::device_ptr<scalar_t>(inputs.features),
            batch, logits.size(1), inputs.num_features, temperature, clip,
            terms.mutable_data_ptr<acc_t>(), argmax.mutable_data_ptr<int64_t>(), stream)));
      });
  return {terms, argmax};
}

at::Tensor lastlayer_score_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& features,
                                int64_t logit_term, double logit_scale, int64_t feature_term,
                                bool with_bias, int64_t combine, double alpha, double temperature,
                                double clip) {
  check_lastlayer_score_spec(features, logit_term, feature_term, with_bias, combine);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const CudaInputs inputs = prepare(logits, features, temperature, clip);
  const int64_t batch = logits.size(0);
  at::Tensor scores = at::empty({batch}, inputs.accumulator_options);
  if (batch == 0) return scores;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "lastlayer_score_cuda", [&] {
        using cuda_t = typename cuda::CudaType<scalar_t>::type;
        using acc_t = cuda::accumulator_t<scalar_t>;
        const ScoreSpec<acc_t> spec{logit_term,   static_cast<acc_t>(logit_scale),
                                    feature_term, with_bias,
                                    combine,      static_cast<acc_t>(alpha)};
        C10_CUDA_CHECK((cuda::launch_lastlayer_score<cuda_t, acc_t>(
            cuda::device_ptr<scalar_t>(inputs.logits), cuda::device_ptr<scalar_t>(inputs.features),
            batch, logits.size(1), inputs.num_features, temperature, clip, spec,
            scores.mutable_data_ptr<acc_t>(), stream)));
      });
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradood, CUDA, m) {
  m.impl("lastlayer_terms", &lastlayer_terms_cuda);
  m.impl("lastlayer_score", &lastlayer_score_cuda);
}

}  // namespace gradood
