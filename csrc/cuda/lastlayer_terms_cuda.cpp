// CUDA registration of gradood::lastlayer_terms: device guard, current stream,
// output allocation, dtype dispatch. Compiled only against a CUDA build of
// torch (c10/cuda headers); the kernel itself is in lastlayer_terms_kernel.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/lastlayer_terms_launch.h"
#include "ops/lastlayer_terms.h"

namespace gradood {
namespace {

// torch's element types and the CUDA types the kernels are written in.
template <typename scalar_t>
struct CudaType {
  using type = scalar_t;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

std::tuple<at::Tensor, at::Tensor> lastlayer_terms_cuda(
    const at::Tensor& logits, const std::optional<at::Tensor>& features,
    double temperature, double clip) {
  check_lastlayer_terms_inputs(logits, features, temperature, clip);
  TORCH_CHECK(logits.is_cuda(),
              "lastlayer_terms (CUDA kernel): logits must be on a CUDA device, got ",
              logits.device());
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const at::Tensor logits_c = logits.contiguous();
  const at::Tensor features_c =
      features.has_value() ? features->contiguous() : at::Tensor();
  const int64_t batch = logits_c.size(0);
  const int64_t num_terms = features_c.defined() ? kNumTerms : kNumLogitTerms;
  const auto acc_dtype =
      logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor terms = at::empty({batch, num_terms}, logits.options().dtype(acc_dtype));
  at::Tensor argmax = at::empty({batch}, logits.options().dtype(at::kLong));
  if (batch == 0) return {terms, argmax};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "lastlayer_terms_cuda", [&] {
        using cuda_t = typename CudaType<scalar_t>::type;
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        const auto* features_ptr =
            features_c.defined()
                ? reinterpret_cast<const cuda_t*>(features_c.const_data_ptr<scalar_t>())
                : nullptr;
        C10_CUDA_CHECK((cuda::launch_lastlayer_terms<cuda_t, acc_t>(
            reinterpret_cast<const cuda_t*>(logits_c.const_data_ptr<scalar_t>()),
            features_ptr, batch, logits_c.size(1),
            features_c.defined() ? features_c.size(1) : 0, temperature, clip,
            terms.mutable_data_ptr<acc_t>(), argmax.mutable_data_ptr<int64_t>(),
            stream)));
      });
  return {terms, argmax};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradood, CUDA, m) {
  m.impl("lastlayer_terms", &lastlayer_terms_cuda);
}

}  // namespace gradood
