// CUDA registration of gradood::norm_affine_grads: device guard, current
// stream, outputs, strides, dtype dispatch. Compiled only against a CUDA build
// of torch; the kernel is in norm_affine_kernel.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/norm_affine_launch.h"
#include "cuda/torch_types.h"
#include "ops/norm_affine.h"

namespace gradood {
namespace {

cuda::Strided3 strides_of(const at::Tensor& tensor) {
  return {tensor.stride(0), tensor.stride(1), tensor.stride(2)};
}

std::tuple<at::Tensor, at::Tensor> norm_affine_grads_cuda(const at::Tensor& grad_output,
                                                          const at::Tensor& input,
                                                          const std::optional<at::Tensor>& shift,
                                                          const at::Tensor& scale) {
  check_norm_affine_inputs(grad_output, input, shift, scale);
  TORCH_CHECK(grad_output.is_cuda(),
              "gradood CUDA kernel norm_affine_grads: inputs must be on a CUDA device, got ",
              grad_output.device());
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const auto acc = grad_output.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t batch = grad_output.size(0), channels = grad_output.size(1),
                positions = grad_output.size(2);
  at::Tensor weight = at::empty({batch, channels}, grad_output.options().dtype(acc));
  at::Tensor bias = at::empty({batch, channels}, grad_output.options().dtype(acc));
  const at::Tensor no_shift;
  const at::Tensor& shift_tensor = shift.has_value() ? *shift : no_shift;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_output.scalar_type(), "norm_affine_grads", [&] {
        using acc_t = cuda::accumulator_t<scalar_t>;
        C10_CUDA_CHECK(cuda::launch_norm_affine_grads(
            cuda::device_ptr<scalar_t>(grad_output), strides_of(grad_output),
            cuda::device_ptr<scalar_t>(input), strides_of(input),
            shift.has_value() ? cuda::device_ptr<scalar_t>(shift_tensor) : nullptr,
            shift.has_value() ? strides_of(shift_tensor) : cuda::Strided3{0, 0, 0},
            cuda::device_ptr<scalar_t>(scale), strides_of(scale), batch, channels, positions,
            weight.data_ptr<acc_t>(), bias.data_ptr<acc_t>(), c10::cuda::getCurrentCUDAStream()));
      });
  return {weight, bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradood, CUDA, m) { m.impl("norm_affine_grads", &norm_affine_grads_cuda); }

}  // namespace gradood
