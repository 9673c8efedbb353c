// CUDA registration of gradood::outer_product_sq_norm and
// conv2d_weight_sq_norm: device guard, current stream, workspace, the strided
// views the kernels read, dtype dispatch. Compiled only against a CUDA build of
// torch; the kernels are in persample_norms_kernel.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/persample_norms_launch.h"
#include "cuda/torch_types.h"
#include "ops/persample_norms.h"

namespace gradood {
namespace {

// [N, T, k] with its own strides, one group per sample.
template <typename scalar_t>
cuda::DenseRows<typename cuda::CudaType<scalar_t>::type> dense_rows(const at::Tensor& rows) {
  return {cuda::device_ptr<scalar_t>(rows),
          1,
          rows.size(1),
          rows.size(2),
          rows.stride(0),
          0,
          rows.stride(1),
          rows.stride(2)};
}

at::ScalarType accumulator_type(const at::Tensor& tensor) {
  return tensor.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_cuda(const char* op, const at::Tensor& tensor) {
  TORCH_CHECK(tensor.is_cuda(), "gradood CUDA kernel ", op,
              ": inputs must be on a CUDA device, got ", tensor.device());
}

at::Tensor outer_product_sq_norm_cuda(const at::Tensor& activations, const at::Tensor& grads,
                                      const std::string& method_name) {
  const int method = check_outer_product_inputs(activations, grads, method_name);
  check_cuda("outer_product_sq_norm", activations);
  const c10::cuda::CUDAGuard guard(activations.device());
  const auto options = activations.options().dtype(accumulator_type(activations));
  const int64_t count = activations.size(0);
  at::Tensor out = at::empty({count}, options);
  at::Tensor workspace =
      at::empty({cuda::sq_norm_workspace_size(method, count, activations.size(1),
                                              activations.size(2), grads.size(2))},
                options);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, activations.scalar_type(), "outer_product_sq_norm", [&] {
        using acc_t = cuda::accumulator_t<scalar_t>;
        C10_CUDA_CHECK(cuda::launch_outer_product_sq_norm(
            dense_rows<scalar_t>(activations), dense_rows<scalar_t>(grads), count, method,
            workspace.data_ptr<acc_t>(), out.data_ptr<acc_t>(), c10::cuda::getCurrentCUDAStream()));
      });
  return out;
}

at::Tensor conv2d_weight_sq_norm_cuda(const at::Tensor& padded_input,
                                      const at::Tensor& grad_output_in, at::IntArrayRef kernel_size,
                                      at::IntArrayRef stride, at::IntArrayRef dilation,
                                      int64_t groups, const std::string& method_name) {
  const int method = check_conv2d_inputs(padded_input, grad_output_in, kernel_size, stride,
                                         dilation, groups, method_name);
  check_cuda("conv2d_weight_sq_norm", padded_input);
  const c10::cuda::CUDAGuard guard(padded_input.device());
  // The kernels read output positions as one flat index t = y·W_out + x.
  const at::Tensor grad_output =
      grad_output_in.stride(2) == grad_output_in.stride(3) * grad_output_in.size(3)
          ? grad_output_in
          : grad_output_in.contiguous();
  const auto options = padded_input.options().dtype(accumulator_type(padded_input));
  const int64_t batch = padded_input.size(0);
  const int64_t out_h = grad_output.size(2), out_w = grad_output.size(3);
  const int64_t in_per_group = padded_input.size(1) / groups;
  const int64_t out_per_group = grad_output.size(1) / groups;
  at::Tensor out = at::empty({batch}, options);
  at::Tensor workspace = at::empty(
      {cuda::sq_norm_workspace_size(method, batch * groups, out_h * out_w,
                                    in_per_group * kernel_size[0] * kernel_size[1], out_per_group)},
      options);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, padded_input.scalar_type(), "conv2d_weight_sq_norm", [&] {
        using acc_t = cuda::accumulator_t<scalar_t>;
        const cuda::PatchRows<typename cuda::CudaType<scalar_t>::type> patches{
            cuda::device_ptr<scalar_t>(padded_input),
            groups,
            in_per_group,
            padded_input.stride(0),
            padded_input.stride(1),
            padded_input.stride(2),
            padded_input.stride(3),
            kernel_size[0],
            kernel_size[1],
            stride[0],
            stride[1],
            dilation[0],
            dilation[1],
            out_h,
            out_w};
        const cuda::DenseRows<typename cuda::CudaType<scalar_t>::type> grads{
            cuda::device_ptr<scalar_t>(grad_output),
            groups,
            out_h * out_w,
            out_per_group,
            grad_output.stride(0),
            grad_output.stride(1) * out_per_group,
            grad_output.stride(3),
            grad_output.stride(1)};
        C10_CUDA_CHECK(cuda::launch_conv2d_weight_sq_norm(
            patches, grads, batch, method, workspace.data_ptr<acc_t>(), out.data_ptr<acc_t>(),
            c10::cuda::getCurrentCUDAStream()));
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradood, CUDA, m) {
  m.impl("outer_product_sq_norm", &outer_product_sq_norm_cuda);
  m.impl("conv2d_weight_sq_norm", &conv2d_weight_sq_norm_cuda);
}

}  // namespace gradood
