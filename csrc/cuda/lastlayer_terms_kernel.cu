// CUDA kernels of gradood::lastlayer_terms and lastlayer_score. A row is
// processed by a group of kRowThreads threads: a whole 256-thread block (long
// rows) or one warp (short rows: 8 rows per block, no block-wide barriers). The group strides over
// the row's logits twice (online max/log-sum-exp, then the softmax sums) and over its features
// once, with 16-byte loads where the row is 16-byte aligned, and reduces
// with warp shuffles (and shared memory across the warps of a block). Row
// math: common/lastlayer_terms_math.h.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common/lastlayer_terms_math.h"
#include "cuda/device.h"
#include "cuda/lastlayer_terms_launch.h"
#include "cuda/warp_reduce.h"

namespace gradood {
namespace cuda {
namespace {

// Calls visit(value, index) for the elements of row[0, n) this thread owns, in
// order: chunks of 16 bytes' worth of elements, chunk c to thread
// c mod kRowThreads, and the partial last chunk to the thread next in turn.
// A row that starts on a 16-byte boundary is read with one 16-byte load per
// chunk, any other row element by element; the ownership and order are the
// same either way, so a row's sums do not depend on where it sits in memory
// (a row gives the same bits alone and inside a batch).
template <int kRowThreads, typename scalar_t, typename Visit>
__device__ __forceinline__ void for_each_element(const scalar_t* row, int64_t n, int thread,
                                                 Visit&& visit) {
  constexpr int64_t kVector = 16 / sizeof(scalar_t);
  const bool aligned = reinterpret_cast<uintptr_t>(row) % 16 == 0;
  const int64_t chunks = n / kVector;
  for (int64_t c = thread; c < chunks; c += kRowThreads) {
    scalar_t values[kVector];
    if (aligned) {
      const uint4 packed = reinterpret_cast<const uint4*>(row)[c];
      memcpy(static_cast<void*>(values), &packed, sizeof(packed));
    } else {
#pragma unroll
      for (int64_t k = 0; k < kVector; ++k) values[k] = row[c * kVector + k];
    }
#pragma unroll
    for (int64_t k = 0; k < kVector; ++k)
      visit(to_acc<accumulator_t<scalar_t>>(values[k]), c * kVector + k);
  }
  if (thread == chunks % kRowThreads) {
    for (int64_t j = chunks * kVector; j < n; ++j)
      visit(to_acc<accumulator_t<scalar_t>>(row[j]), j);
  }
}

template <typename acc_t>
__device__ MaxState<acc_t> shuffle_down(const MaxState<acc_t>& state, int offset) {
  MaxState<acc_t> other;
  other.max = __shfl_down_sync(0xffffffffu, state.max, offset);
  other.argmax = static_cast<int64_t>(
      __shfl_down_sync(0xffffffffu, static_cast<long long>(state.argmax), offset));
  other.others = __shfl_down_sync(0xffffffffu, state.others, offset);
  return other;
}

template <typename acc_t>
__device__ MaxState<acc_t> warp_merge(MaxState<acc_t> state, acc_t inv_temperature) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    state = merge(state, shuffle_down(state, offset), inv_temperature);
  }
  return state;  // complete in lane 0
}

// Reductions over the kRowThreads threads of one row.
template <int kRowThreads>
struct RowGroup;

template <>
struct RowGroup<kWarpSize> {  // one warp per row: shuffles only
  template <typename acc_t>
  static __device__ MaxState<acc_t> merge_all(MaxState<acc_t> state, acc_t inv_temperature) {
    state = warp_merge(state, inv_temperature);
    MaxState<acc_t> result;  // lane 0's state, to every lane
    result.max = __shfl_sync(0xffffffffu, state.max, 0);
    result.argmax =
        static_cast<int64_t>(__shfl_sync(0xffffffffu, static_cast<long long>(state.argmax), 0));
    result.others = __shfl_sync(0xffffffffu, state.others, 0);
    return result;
  }
  template <typename acc_t, int N>
  static __device__ void sum(acc_t (&values)[N]) {  // valid in lane 0 only
    warp_sum(values);
  }
};

template <>
struct RowGroup<kThreads> {  // one block per row: warps, then shared memory
  template <typename acc_t>
  static __device__ MaxState<acc_t> merge_all(MaxState<acc_t> state, acc_t inv_temperature) {
    __shared__ MaxState<acc_t> partial[kWarps];
    const int lane = threadIdx.x % kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    state = warp_merge(state, inv_temperature);
    if (lane == 0) partial[warp] = state;
    __syncthreads();
    if (warp == 0) {
      state = lane < kWarps ? partial[lane] : empty_max_state<acc_t>();
      state = warp_merge(state, inv_temperature);
      if (lane == 0) partial[0] = state;
    }
    __syncthreads();
    const MaxState<acc_t> result = partial[0];
    __syncthreads();  // partial may be reused by the caller's next reduction
    return result;
  }
  template <typename acc_t, int N>
  static __device__ void sum(acc_t (&values)[N]) {  // valid in thread 0 only
    __shared__ acc_t partial[N][kWarps];
    const int lane = threadIdx.x % kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    warp_sum(values);
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < N; ++k) partial[k][warp] = values[k];
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
      for (int k = 0; k < N; ++k) values[k] = lane < kWarps ? partial[k][lane] : acc_t(0);
      warp_sum(values);
    }
    __syncthreads();
  }
};

// kScore = false: writes the row's terms (kNumTerms or kNumLogitTerms columns)
// to out[row * num_terms] and its argmax; kScore = true: writes
// compose_score(terms, spec) to out[row].
template <typename scalar_t, typename acc_t, bool kScore, int kRowThreads>
__global__ void __launch_bounds__(kThreads)
    lastlayer_kernel(const scalar_t* __restrict__ logits, const scalar_t* __restrict__ features,
                     int64_t batch, int64_t num_classes, int64_t num_features, acc_t temperature,
                     acc_t clip, ScoreSpec<acc_t> spec, acc_t* __restrict__ out,
                     int64_t* __restrict__ argmax) {
  using Group = RowGroup<kRowThreads>;
  constexpr int kRowsPerBlock = kThreads / kRowThreads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kRowThreads;
  const int thread = threadIdx.x % kRowThreads;
  if (row >= batch) return;  // whole warps only, and only when kRowThreads is a warp
  const scalar_t* row_logits = logits + row * num_classes;
  const acc_t inv_temperature = acc_t(1) / temperature;

  MaxState<acc_t> state = empty_max_state<acc_t>();
  for_each_element<kRowThreads>(row_logits, num_classes, thread, [&](acc_t value, int64_t j) {
    state = push(state, value, j, inv_temperature);
  });
  state = Group::merge_all(state, inv_temperature);

  const acc_t inv_sum = acc_t(1) / (acc_t(1) + state.others);
  const acc_t uniform = acc_t(1) / static_cast<acc_t>(num_classes);
  SoftmaxSums<acc_t> softmax_sums{acc_t(0), acc_t(0)};
  for_each_element<kRowThreads>(row_logits, num_classes, thread, [&](acc_t value, int64_t j) {
    if (j != state.argmax) {
      accumulate_softmax(softmax_sums, value, state.max, inv_temperature, inv_sum, uniform);
    }
  });
  acc_t logit_sums[2] = {softmax_sums.uniform_deviation, softmax_sums.squares};
  Group::sum(logit_sums);

  acc_t terms[kNumTerms];  // complete in the row's first thread only
  if (thread == 0) {
    finalize_logit_terms(state, SoftmaxSums<acc_t>{logit_sums[0], logit_sums[1]}, num_classes,
                         temperature, terms);
  }
  if (features != nullptr) {  // uniform across the block
    FeatureSums<acc_t> feature_sums{acc_t(0), acc_t(0), acc_t(0)};
    for_each_element<kRowThreads>(
        features + row * num_features, num_features, thread,
        [&](acc_t value, int64_t) { accumulate_feature(feature_sums, value, clip); });
    acc_t feature_values[3] = {feature_sums.l1, feature_sums.squares, feature_sums.clipped_l1};
    Group::sum(feature_values);
    if (thread == 0) {
      finalize_feature_terms(
          FeatureSums<acc_t>{feature_values[0], feature_values[1], feature_values[2]}, terms);
    }
  }
  if (thread != 0) return;
  if constexpr (kScore) {
    out[row] = compose_score(terms, spec);
  } else {
    const int64_t num_terms = features != nullptr ? kNumTerms : kNumLogitTerms;
    for (int64_t k = 0; k < num_terms; ++k) out[row * num_terms + k] = terms[k];
    argmax[row] = state.argmax;
  }
}

// Threads per row: a warp for short rows, a block for long ones. The choice
// depends on the row's length only, never on the batch size, so a row's result
// is the same bit for bit in any batch. GRADOOD_LASTLAYER_ROW_THREADS=32|256
// forces one (for benchmarking both on the GPU).
int row_threads(int64_t num_classes, int64_t num_features) {
  static const int forced = [] {
    const char* value = std::getenv("GRADOOD_LASTLAYER_ROW_THREADS");
    return value == nullptr ? 0 : std::atoi(value);
  }();
  if (forced == kWarpSize || forced == kThreads) return forced;
  return num_classes + num_features <= 1024 ? kWarpSize : kThreads;
}

template <typename scalar_t, typename acc_t, bool kScore>
cudaError_t launch(const scalar_t* logits, const scalar_t* features, int64_t batch,
                   int64_t num_classes, int64_t num_features, double temperature, double clip,
                   const ScoreSpec<acc_t>& spec, acc_t* out, int64_t* argmax, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  const acc_t t = static_cast<acc_t>(temperature), c = static_cast<acc_t>(clip);
  if (row_threads(num_classes, num_features) == kWarpSize) {
    const int64_t blocks = (batch + kWarps - 1) / kWarps;
    if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;  // grid.x limit
    GRADOOD_LAUNCH(static_cast<unsigned int>(blocks), kThreads, stream,
                   lastlayer_kernel<scalar_t, acc_t, kScore, kWarpSize>)(
        logits, features, batch, num_classes, num_features, t, c, spec, out, argmax);
  } else {
    if (batch > 0x7fffffffLL) return cudaErrorInvalidValue;
    GRADOOD_LAUNCH(static_cast<unsigned int>(batch), kThreads, stream,
                   lastlayer_kernel<scalar_t, acc_t, kScore, kThreads>)(
        logits, features, batch, num_classes, num_features, t, c, spec, out, argmax);
  }
  return gradood_launch_status();
}

}  // namespace

template <typename scalar_t, typename acc_t>
cudaError_t launch_lastlayer_terms(const scalar_t* logits, const scalar_t* features, int64_t batch,
                                   int64_t num_classes, int64_t num_features, double temperature,
                                   double clip, acc_t* terms, int64_t* argmax,
                                   cudaStream_t stream) {
  const ScoreSpec<acc_t> unused{};
  return launch<scalar_t, acc_t, false>(logits, features, batch, num_classes, num_features,
                                        temperature, clip, unused, terms, argmax, stream);
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_lastlayer_score(const scalar_t* logits, const scalar_t* features, int64_t batch,
                                   int64_t num_classes, int64_t num_features, double temperature,
                                   double clip, const ScoreSpec<acc_t>& spec, acc_t* scores,
                                   cudaStream_t stream) {
  return launch<scalar_t, acc_t, true>(logits, features, batch, num_classes, num_features,
                                       temperature, clip, spec, scores, nullptr, stream);
}

#define GRADOOD_INSTANTIATE_LASTLAYER_TERMS(scalar_t, acc_t)                               \
  template cudaError_t launch_lastlayer_terms<scalar_t, acc_t>(                            \
      const scalar_t*, const scalar_t*, int64_t, int64_t, int64_t, double, double, acc_t*, \
      int64_t*, cudaStream_t);                                                             \
  template cudaError_t launch_lastlayer_score<scalar_t, acc_t>(                            \
      const scalar_t*, const scalar_t*, int64_t, int64_t, int64_t, double, double,         \
      const ScoreSpec<acc_t>&, acc_t*, cudaStream_t);

GRADOOD_INSTANTIATE_LASTLAYER_TERMS(float, float)
GRADOOD_INSTANTIATE_LASTLAYER_TERMS(__half, float)
GRADOOD_INSTANTIATE_LASTLAYER_TERMS(__nv_bfloat16, float)
GRADOOD_INSTANTIATE_LASTLAYER_TERMS(double, double)

#undef GRADOOD_INSTANTIATE_LASTLAYER_TERMS

}  // namespace cuda
}  // namespace gradood
