// CUDA kernels of gradood::lastlayer_terms and lastlayer_score: one thread block per row. The
// block strides over the row's logits twice (online max/log-sum-exp, then the
// softmax sums) and over its features once, reducing with warp shuffles and
// shared memory. Row math: common/lastlayer_terms_math.h.
#include "common/lastlayer_terms_math.h"
#include "cuda/device.h"
#include "cuda/lastlayer_terms_launch.h"

namespace gradood {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;

template <typename scalar_t>
__device__ __forceinline__ float to_acc(scalar_t value) {
  return static_cast<float>(value);
}
template <>
__device__ __forceinline__ float to_acc<__half>(__half value) {
  return __half2float(value);
}
template <>
__device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 value) {
  return __bfloat162float(value);
}
__device__ __forceinline__ double to_acc(double value) { return value; }

template <typename acc_t>
__device__ MaxState<acc_t> shuffle_down(const MaxState<acc_t>& state,
                                        int offset) {
  MaxState<acc_t> other;
  other.max = __shfl_down_sync(0xffffffffu, state.max, offset);
  other.argmax = static_cast<int64_t>(__shfl_down_sync(
      0xffffffffu, static_cast<long long>(state.argmax), offset));
  other.others = __shfl_down_sync(0xffffffffu, state.others, offset);
  return other;
}

// Block-wide merge of MaxState; the result is returned to every thread.
template <typename acc_t>
__device__ MaxState<acc_t> block_merge(MaxState<acc_t> state,
                                       acc_t inv_temperature) {
  __shared__ MaxState<acc_t> partial[kWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    state = merge(state, shuffle_down(state, offset), inv_temperature);
  }
  if (lane == 0) partial[warp] = state;
  __syncthreads();
  if (warp == 0) {
    state = lane < kWarps ? partial[lane] : empty_max_state<acc_t>();
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      state = merge(state, shuffle_down(state, offset), inv_temperature);
    }
    if (lane == 0) partial[0] = state;
  }
  __syncthreads();
  const MaxState<acc_t> result = partial[0];
  __syncthreads();  // partial may be reused by the caller's next reduction
  return result;
}

// Block-wide sum of N values; the result is valid in thread 0 only.
template <typename acc_t, int N>
__device__ void block_sum(acc_t (&values)[N]) {
  __shared__ acc_t partial[N][kWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      values[k] += __shfl_down_sync(0xffffffffu, values[k], offset);
    }
    if (lane == 0) partial[k][warp] = values[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      values[k] = lane < kWarps ? partial[k][lane] : acc_t(0);
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
        values[k] += __shfl_down_sync(0xffffffffu, values[k], offset);
      }
    }
  }
  __syncthreads();
}

// kScore = false: writes the row's terms (kNumTerms or kNumLogitTerms columns)
// to out[row * num_terms] and its argmax; kScore = true: writes
// compose_score(terms, spec) to out[row].
template <typename scalar_t, typename acc_t, bool kScore>
__global__ void __launch_bounds__(kThreads)
    lastlayer_kernel(const scalar_t* __restrict__ logits,
                     const scalar_t* __restrict__ features, int64_t num_classes,
                     int64_t num_features, acc_t temperature, acc_t clip,
                     ScoreSpec<acc_t> spec, acc_t* __restrict__ out,
                     int64_t* __restrict__ argmax) {
  const int64_t row = blockIdx.x;
  const scalar_t* row_logits = logits + row * num_classes;
  const acc_t inv_temperature = acc_t(1) / temperature;

  MaxState<acc_t> state = empty_max_state<acc_t>();
  for (int64_t j = threadIdx.x; j < num_classes; j += kThreads) {
    state = push(state, static_cast<acc_t>(to_acc(row_logits[j])), j,
                 inv_temperature);
  }
  state = block_merge(state, inv_temperature);

  const acc_t inv_sum = acc_t(1) / (acc_t(1) + state.others);
  const acc_t uniform = acc_t(1) / static_cast<acc_t>(num_classes);
  SoftmaxSums<acc_t> softmax_sums{acc_t(0), acc_t(0)};
  for (int64_t j = threadIdx.x; j < num_classes; j += kThreads) {
    if (j == state.argmax) continue;
    accumulate_softmax(softmax_sums, static_cast<acc_t>(to_acc(row_logits[j])),
                       state.max, inv_temperature, inv_sum, uniform);
  }
  acc_t logit_sums[2] = {softmax_sums.uniform_deviation, softmax_sums.squares};
  block_sum(logit_sums);

  acc_t terms[kNumTerms];  // complete in thread 0 only
  if (threadIdx.x == 0) {
    finalize_logit_terms(state, SoftmaxSums<acc_t>{logit_sums[0], logit_sums[1]},
                         num_classes, temperature, terms);
  }
  if (features != nullptr) {  // uniform across the block
    const scalar_t* row_features = features + row * num_features;
    FeatureSums<acc_t> feature_sums{acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t i = threadIdx.x; i < num_features; i += kThreads) {
      accumulate_feature(feature_sums,
                         static_cast<acc_t>(to_acc(row_features[i])), clip);
    }
    acc_t feature_values[3] = {feature_sums.l1, feature_sums.squares,
                               feature_sums.clipped_l1};
    block_sum(feature_values);
    if (threadIdx.x == 0) {
      finalize_feature_terms(FeatureSums<acc_t>{feature_values[0], feature_values[1],
                                                feature_values[2]},
                             terms);
    }
  }
  if (threadIdx.x != 0) return;
  if constexpr (kScore) {
    out[row] = compose_score(terms, spec);
  } else {
    const int64_t num_terms = features != nullptr ? kNumTerms : kNumLogitTerms;
    for (int64_t k = 0; k < num_terms; ++k) out[row * num_terms + k] = terms[k];
    argmax[row] = state.argmax;
  }
}

template <typename scalar_t, typename acc_t, bool kScore>
cudaError_t launch(const scalar_t* logits, const scalar_t* features,
                   int64_t batch, int64_t num_classes, int64_t num_features,
                   double temperature, double clip, const ScoreSpec<acc_t>& spec,
                   acc_t* out, int64_t* argmax, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  if (batch > 0x7fffffffLL) return cudaErrorInvalidValue;  // grid.x limit
  GRADOOD_LAUNCH(static_cast<unsigned int>(batch), kThreads, stream,
                 lastlayer_kernel<scalar_t, acc_t, kScore>)(
      logits, features, num_classes, num_features,
      static_cast<acc_t>(temperature), static_cast<acc_t>(clip), spec, out,
      argmax);
  return gradood_launch_status();
}

}  // namespace

template <typename scalar_t, typename acc_t>
cudaError_t launch_lastlayer_terms(const scalar_t* logits,
                                   const scalar_t* features, int64_t batch,
                                   int64_t num_classes, int64_t num_features,
                                   double temperature, double clip,
                                   acc_t* terms, int64_t* argmax,
                                   cudaStream_t stream) {
  const ScoreSpec<acc_t> unused{};
  return launch<scalar_t, acc_t, false>(logits, features, batch, num_classes,
                                        num_features, temperature, clip, unused,
                                        terms, argmax, stream);
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_lastlayer_score(const scalar_t* logits,
                                   const scalar_t* features, int64_t batch,
                                   int64_t num_classes, int64_t num_features,
                                   double temperature, double clip,
                                   const ScoreSpec<acc_t>& spec, acc_t* scores,
                                   cudaStream_t stream) {
  return launch<scalar_t, acc_t, true>(logits, features, batch, num_classes,
                                       num_features, temperature, clip, spec,
                                       scores, nullptr, stream);
}

#define GRADOOD_INSTANTIATE_LASTLAYER_TERMS(scalar_t, acc_t)                \
  template cudaError_t launch_lastlayer_terms<scalar_t, acc_t>(             \
      const scalar_t*, const scalar_t*, int64_t, int64_t, int64_t, double, \
      double, acc_t*, int64_t*, cudaStream_t);                             \
  template cudaError_t launch_lastlayer_score<scalar_t, acc_t>(             \
      const scalar_t*, const scalar_t*, int64_t, int64_t, int64_t, double, \
      double, const ScoreSpec<acc_t>&, acc_t*, cudaStream_t);

GRADOOD_INSTANTIATE_LASTLAYER_TERMS(float, float)
GRADOOD_INSTANTIATE_LASTLAYER_TERMS(__half, float)
GRADOOD_INSTANTIATE_LASTLAYER_TERMS(__nv_bfloat16, float)
GRADOOD_INSTANTIATE_LASTLAYER_TERMS(double, double)

#undef GRADOOD_INSTANTIATE_LASTLAYER_TERMS

}  // namespace cuda
}  // namespace gradood
