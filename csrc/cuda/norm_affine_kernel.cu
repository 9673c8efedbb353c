// CUDA kernel of gradood::norm_affine_grads (norm_affine_launch.h). Blocks of
// 256 threads cover one sample and 8 channels (positions adjacent in memory:
// a warp per channel, lanes along t) or 32 channels (channels adjacent, as in
// LayerNorm's [B, T, C]: lanes along c, the 8 warps splitting t), so loads are
// coalesced in both layouts.
#include "cuda/device.h"
#include "cuda/norm_affine_launch.h"
#include "cuda/warp_reduce.h"

namespace gradood {
namespace cuda {
namespace {

template <typename scalar_t>
struct Inputs {
  const scalar_t* grad_output;
  Strided3 grad;
  const scalar_t* input;
  Strided3 in;
  const scalar_t* shift;  // may be nullptr
  Strided3 sh;
  const scalar_t* scale;
  Strided3 sc;
};

// Accumulates the two sums of (b, c) over t = first, first + step, ...
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void accumulate(const Inputs<scalar_t>& in, int64_t b, int64_t c,
                                           int64_t first, int64_t step, int64_t positions,
                                           acc_t& weight, acc_t& bias) {
  for (int64_t t = first; t < positions; t += step) {
    const acc_t g = to_acc<acc_t>(
        in.grad_output[b * in.grad.batch + c * in.grad.channel + t * in.grad.position]);
    acc_t x = to_acc<acc_t>(in.input[b * in.in.batch + c * in.in.channel + t * in.in.position]);
    if (in.shift != nullptr)
      x -= to_acc<acc_t>(in.shift[b * in.sh.batch + c * in.sh.channel + t * in.sh.position]);
    x *= to_acc<acc_t>(in.scale[b * in.sc.batch + c * in.sc.channel + t * in.sc.position]);
    weight += g * x;
    bias += g;
  }
}

// grid (B, ceil(C / 8)): warp w of the block owns channel 8·blockIdx.y + w.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    lanes_along_positions_kernel(Inputs<scalar_t> in, int64_t channels, int64_t positions,
                                 acc_t* __restrict__ weight, acc_t* __restrict__ bias) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t b = blockIdx.x, c = static_cast<int64_t>(blockIdx.y) * kWarps + warp;
  acc_t weight_sum = 0, bias_sum = 0;
  if (c < channels) accumulate(in, b, c, lane, kWarpSize, positions, weight_sum, bias_sum);
  weight_sum = warp_sum(weight_sum);
  bias_sum = warp_sum(bias_sum);
  if (lane == 0 && c < channels) {
    weight[b * channels + c] = weight_sum;
    bias[b * channels + c] = bias_sum;
  }
}

// grid (B, ceil(C / 32)): lane l owns channel 32·blockIdx.y + l; the 8 warps
// take every 8th position and are added in shared memory.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    lanes_along_channels_kernel(Inputs<scalar_t> in, int64_t channels, int64_t positions,
                                acc_t* __restrict__ weight, acc_t* __restrict__ bias) {
  __shared__ acc_t weight_part[kWarps][kWarpSize];
  __shared__ acc_t bias_part[kWarps][kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t b = blockIdx.x, c = static_cast<int64_t>(blockIdx.y) * kWarpSize + lane;
  acc_t weight_sum = 0, bias_sum = 0;
  if (c < channels) accumulate(in, b, c, warp, kWarps, positions, weight_sum, bias_sum);
  weight_part[warp][lane] = weight_sum;
  bias_part[warp][lane] = bias_sum;
  __syncthreads();
  if (warp == 0 && c < channels) {
    for (int w = 1; w < kWarps; ++w) {
      weight_sum += weight_part[w][lane];
      bias_sum += bias_part[w][lane];
    }
    weight[b * channels + c] = weight_sum;
    bias[b * channels + c] = bias_sum;
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

template <typename scalar_t, typename acc_t>
cudaError_t launch_norm_affine_grads(const scalar_t* grad_output, Strided3 grad_strides,
                                     const scalar_t* input, Strided3 input_strides,
                                     const scalar_t* shift, Strided3 shift_strides,
                                     const scalar_t* scale, Strided3 scale_strides, int64_t batch,
                                     int64_t channels, int64_t positions, acc_t* weight,
                                     acc_t* bias, cudaStream_t stream) {
  if (batch == 0 || channels == 0) return cudaSuccess;
  const Inputs<scalar_t> in{grad_output, grad_strides,  input, input_strides,
                            shift,       shift_strides, scale, scale_strides};
  const bool positions_adjacent = grad_strides.position == 1 || grad_strides.channel != 1;
  const int64_t per_block = positions_adjacent ? kWarps : kWarpSize;
  const int64_t channel_blocks = ceil_div(channels, per_block);
  if (batch > 0x7fffffffLL || channel_blocks > 65535) return cudaErrorInvalidValue;  // grid limits
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(channel_blocks));
  if (positions_adjacent) {
    GRADOOD_LAUNCH(grid, kThreads, stream, lanes_along_positions_kernel<scalar_t, acc_t>)(
        in, channels, positions, weight, bias);
  } else {
    GRADOOD_LAUNCH(grid, kThreads, stream, lanes_along_channels_kernel<scalar_t, acc_t>)(
        in, channels, positions, weight, bias);
  }
  return gradood_launch_status();
}

#define GRADOOD_INSTANTIATE_NORM_AFFINE(scalar_t, acc_t)                               \
  template cudaError_t launch_norm_affine_grads<scalar_t, acc_t>(                      \
      const scalar_t*, Strided3, const scalar_t*, Strided3, const scalar_t*, Strided3, \
      const scalar_t*, Strided3, int64_t, int64_t, int64_t, acc_t*, acc_t*, cudaStream_t);

GRADOOD_INSTANTIATE_NORM_AFFINE(float, float)
GRADOOD_INSTANTIATE_NORM_AFFINE(__half, float)
GRADOOD_INSTANTIATE_NORM_AFFINE(__nv_bfloat16, float)
GRADOOD_INSTANTIATE_NORM_AFFINE(double, double)

#undef GRADOOD_INSTANTIATE_NORM_AFFINE

}  // namespace cuda
}  // namespace gradood
