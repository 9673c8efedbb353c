// Vectorised float32 row kernels of lastlayer_terms; see lastlayer_rows_float.h.
//
// Loops are written for the compiler's vectoriser: `omp simd` reductions
// (which permit the reassociation a vector sum needs, and sum in several
// lanes, more accurately than one running sum), selects instead of branches,
// and an exponential built from plain arithmetic (exp_nonpositive) because a
// call to std::exp does not vectorise without -ffast-math.
#include "cpu/lastlayer_rows_float.h"

#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "common/lastlayer_terms_math.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(_WIN32)
#define GRADOOD_CPU_CLONES \
  __attribute__((target_clones("default", "avx2", "arch=x86-64-v4")))
#else
#define GRADOOD_CPU_CLONES
#endif

namespace gradood {
namespace cpu {
namespace {

inline float float_from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline uint32_t bits_from_float(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// exp(x) for x <= 0, relative error below 2e-7 where the result is a normal
// float; 0 below -87.3 (and for -inf). NaN stays NaN. Cody–Waite reduction
// x = n ln2 + r, |r| <= ln2/2, and the degree-6 polynomial of Cephes' expf.
inline float exp_nonpositive(float x) {
  constexpr float kLowest = -87.3f;  // keeps 2^n a normal float
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const bool underflow = x < kLowest;    // false for NaN
  const float clamped = underflow ? kLowest : x;
  const float shifted = clamped * kLog2e + kRound;
  const float n = shifted - kRound;  // round-to-nearest of x / ln2
  const float r = (clamped - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float poly = p * r * r + r + 1.0f;
  // 2^n from the integer n held in the low mantissa bits of `shifted`.
  const uint32_t exponent = bits_from_float(shifted) - bits_from_float(kRound) + 127u;
  const float scale = float_from_bits(exponent << 23);
  return underflow ? 0.0f : poly * scale;
}

constexpr int64_t kBlock = 64;

struct ExpSums {
  float sum = 0.0f;
  float squares = 0.0f;
};

// e_j = exp((x_j - max) / T) for begin <= j < end, stored to scratch and summed.
inline void exp_range(const float* logits, int64_t begin, int64_t end, float max,
                      float inv_temperature, float* scratch, ExpSums& sums) {
  float sum = 0.0f, squares = 0.0f;
#pragma omp simd reduction(+ : sum, squares)
  for (int64_t j = begin; j < end; ++j) {
    const float e = exp_nonpositive((logits[j] - max) * inv_temperature);
    scratch[j] = e;
    sum += e;
    squares += e * e;
  }
  sums.sum += sum;
  sums.squares += squares;
}

// sum_{begin <= j < end} |e_j / s - u|
inline float deviation_range(const float* exps, int64_t begin, int64_t end,
                             float inv_sum, float uniform) {
  float deviation = 0.0f;
#pragma omp simd reduction(+ : deviation)
  for (int64_t j = begin; j < end; ++j) {
    deviation += std::fabs(exps[j] * inv_sum - uniform);
  }
  return deviation;
}

}  // namespace

GRADOOD_CPU_CLONES
bool logit_terms_row_float(const float* logits, int64_t num_classes,
                           float temperature, TermMask wanted, float* out,
                           int64_t* argmax, float* scratch) {
  // Max by blocks, keeping the first block that reaches it, then the first
  // index of the max inside that block: the argmax torch.max reports.
  float max = -std::numeric_limits<float>::infinity();
  int64_t max_block = 0;
  for (int64_t start = 0; start < num_classes; start += kBlock) {
    const int64_t stop = std::min(start + kBlock, num_classes);
    float block_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : block_max)
    for (int64_t j = start; j < stop; ++j) {
      block_max = logits[j] > block_max ? logits[j] : block_max;
    }
    if (block_max > max) {
      max = block_max;
      max_block = start;
    }
  }
  if (!std::isfinite(max)) return false;  // +inf, or a row of -inf / NaN
  int64_t top = max_block;
  while (logits[top] != max) ++top;

  // Sums over j != top as two contiguous ranges, [0, top) and (top, C): no
  // per-element index test in the vector loops.
  const float inv_temperature = 1.0f / temperature;
  ExpSums others;
  exp_range(logits, 0, top, max, inv_temperature, scratch, others);
  exp_range(logits, top + 1, num_classes, max, inv_temperature, scratch, others);
  if (std::isnan(others.sum)) return false;  // a NaN logit

  const float inv_sum = 1.0f / (1.0f + others.sum);
  float deviation = 0.0f;
  if (wanted & term_bit(kUniformDeviationL1)) {
    const float uniform = 1.0f / static_cast<float>(num_classes);
    deviation = deviation_range(scratch, 0, top, inv_sum, uniform) +
                deviation_range(scratch, top + 1, num_classes, inv_sum, uniform);
  }
  const MaxState<float> state{max, top, others.sum};
  const SoftmaxSums<float> sums{deviation, others.squares * inv_sum * inv_sum};
  finalize_logit_terms(state, sums, num_classes, temperature, out, wanted);
  *argmax = top;
  return true;
}

GRADOOD_CPU_CLONES
void logit_terms_short_rows_float(const float* logits, int64_t rows,
                                  int64_t num_classes, float temperature,
                                  TermMask wanted, float* out, int64_t* argmax,
                                  bool* ok) {
  // tile[j][lane] = logit j of row `lane`; lanes past `rows` hold zeros and are ignored.
  alignas(64) float tile[kMaxShortRow][kRowTile];
  for (int64_t j = 0; j < num_classes; ++j) {
    for (int64_t lane = 0; lane < kRowTile; ++lane) {
      tile[j][lane] = lane < rows ? logits[lane * num_classes + j] : 0.0f;
    }
  }
  alignas(64) float max[kRowTile];
  alignas(64) int32_t top[kRowTile];
#pragma omp simd
  for (int64_t lane = 0; lane < kRowTile; ++lane) max[lane] = tile[0][lane];
  for (int64_t j = 1; j < num_classes; ++j) {
#pragma omp simd
    for (int64_t lane = 0; lane < kRowTile; ++lane) {
      max[lane] = tile[j][lane] > max[lane] ? tile[j][lane] : max[lane];
    }
  }
#pragma omp simd
  for (int64_t lane = 0; lane < kRowTile; ++lane) top[lane] = 0;
  for (int64_t j = num_classes - 1; j >= 0; --j) {  // ends on the first index of the max
#pragma omp simd
    for (int64_t lane = 0; lane < kRowTile; ++lane) {
      top[lane] = tile[j][lane] == max[lane] ? static_cast<int32_t>(j) : top[lane];
    }
  }
  const float inv_temperature = 1.0f / temperature;
  alignas(64) float others[kRowTile] = {};
  alignas(64) float squares[kRowTile] = {};
  for (int64_t j = 0; j < num_classes; ++j) {
#pragma omp simd
    for (int64_t lane = 0; lane < kRowTile; ++lane) {
      const float e = exp_nonpositive((tile[j][lane] - max[lane]) * inv_temperature);
      const float other = top[lane] == j ? 0.0f : e;
      tile[j][lane] = other;
      others[lane] += other;
      squares[lane] += other * other;
    }
  }
  alignas(64) float inv_sum[kRowTile];
  alignas(64) float deviation[kRowTile] = {};
#pragma omp simd
  for (int64_t lane = 0; lane < kRowTile; ++lane) inv_sum[lane] = 1.0f / (1.0f + others[lane]);
  if (wanted & term_bit(kUniformDeviationL1)) {
    const float uniform = 1.0f / static_cast<float>(num_classes);
    for (int64_t j = 0; j < num_classes; ++j) {
#pragma omp simd
      for (int64_t lane = 0; lane < kRowTile; ++lane) {
        const float d = std::fabs(tile[j][lane] * inv_sum[lane] - uniform);
        deviation[lane] += top[lane] == j ? 0.0f : d;
      }
    }
  }
  for (int64_t lane = 0; lane < rows; ++lane) {
    ok[lane] = std::isfinite(max[lane]) && !std::isnan(others[lane]);
    if (!ok[lane]) continue;
    const MaxState<float> state{max[lane], top[lane], others[lane]};
    const SoftmaxSums<float> sums{deviation[lane], squares[lane] * inv_sum[lane] * inv_sum[lane]};
    finalize_logit_terms(state, sums, num_classes, temperature, out + lane * kNumTerms, wanted);
    argmax[lane] = top[lane];
  }
}

GRADOOD_CPU_CLONES
void feature_terms_row_float(const float* features, int64_t num_features,
                             float clip, TermMask wanted, float* out) {
  float l1 = 0.0f, squares = 0.0f, clipped = 0.0f;
#pragma omp simd reduction(+ : l1, squares, clipped)
  for (int64_t i = 0; i < num_features; ++i) {
    const float magnitude = std::fabs(features[i]);
    l1 += magnitude;
    squares += magnitude * magnitude;
    clipped += magnitude > clip ? clip : magnitude;  // keeps NaN
  }
  finalize_feature_terms(FeatureSums<float>{l1, squares, clipped}, out, wanted);
}

GRADOOD_CPU_CLONES
void widen_bfloat16(const uint16_t* bits, int64_t count, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    out[i] = float_from_bits(static_cast<uint32_t>(bits[i]) << 16);
  }
}

GRADOOD_CPU_CLONES
void widen_half(const uint16_t* bits, int64_t count, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    out[i] = c10::detail::fp16_ieee_to_fp32_value(bits[i]);
  }
}

}  // namespace cpu
}  // namespace gradood
