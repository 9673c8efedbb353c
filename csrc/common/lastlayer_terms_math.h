// Row math shared by the CPU and CUDA kernels of `gradood::lastlayer_terms`.
//
// Everything here is plain C++ on accumulator types (float or double), usable
// from host code and from CUDA device code. The kernels only decide how rows
// are split between threads; the numerics live in this one place.
//
// Numerics:
//   * softmax at temperature T is taken relative to the running max m, so
//     every exponent is <= 0 (an online, max-subtracted log-sum-exp);
//   * the mass of the non-argmax classes, 1 - p_max, is accumulated directly as
//     `others = sum_{j != argmax} exp((f_j - m) / T)` and never formed as
//     1 - p_max, which is pure round-off for confident rows;
//   * rows with an infinite max take the softmax's limit: the logits equal to the max
//     share the mass evenly (one +inf logit has probability 1; a row of -inf is
//     uniform), every other logit has probability 0, and the energy is the max; a NaN
//     logit makes every term of its row NaN.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define GRADOOD_HOST_DEVICE __host__ __device__ __forceinline__
#else
// Internal linkage on the host: the CPU row kernels compile this header once per
// instruction-set level (csrc/cpu/capability/), and a shared inline definition would
// let the linker keep an AVX-512 copy for every caller.
#define GRADOOD_HOST_DEVICE static inline
#endif

namespace gradood {

// Columns of the [B, n_terms] output of lastlayer_terms. The logit terms come
// first; the feature terms are present only when features are given.
enum LastLayerTerm : int64_t {
  kMaxLogit = 0,            // max_j f_j
  kEnergy = 1,              // T * logsumexp(f / T)
  kMaxSoftmax = 2,          // max_j softmax(f / T)_j
  kUniformDeviationL1 = 3,  // sum_j |p_j - 1/C|
  kGini = 4,                // sum_j p_j (1 - p_j)
  kOneHotDeviationL2 = 5,   // || p - e_argmax ||_2
  kNumLogitTerms = 6,
  kFeatureL1 = 6,         // sum_i |v_i|
  kFeatureL2 = 7,         // sqrt(sum_i v_i^2)
  kFeatureClippedL1 = 8,  // sum_i min(|v_i|, clip)
  kNumTerms = 9,
};

// A set of LastLayerTerm columns, as bits; kernels computing one score
// finalise only the terms it reads.
using TermMask = uint32_t;
constexpr TermMask kAllTerms = (1u << kNumTerms) - 1u;
GRADOOD_HOST_DEVICE constexpr TermMask term_bit(int64_t term) {
  return 1u << static_cast<uint32_t>(term);
}

// Running max, its first index, and the exp-mass of every other element
// relative to that max. `argmax == kNoIndex` marks the empty state (the
// identity of `merge`), which a thread holds when a row has fewer elements
// than there are threads.
constexpr int64_t kNoIndex = std::numeric_limits<int64_t>::max();

template <typename acc_t>
struct MaxState {
  acc_t max;
  int64_t argmax;
  acc_t others;  // sum_{j != argmax} exp((f_j - max) / T)
};

template <typename acc_t>
GRADOOD_HOST_DEVICE MaxState<acc_t> empty_max_state() {
  return {-static_cast<acc_t>(INFINITY), kNoIndex, acc_t(0)};
}

// Ordering of candidates for the max: NaN wins (so a NaN row reports NaN, as
// torch.max does), then the larger value, then the lower index.
template <typename acc_t>
GRADOOD_HOST_DEVICE bool precedes(acc_t a, int64_t ia, acc_t b, int64_t ib) {
  const bool a_nan = a != a;
  const bool b_nan = b != b;
  if (a_nan || b_nan) {
    return a_nan && (!b_nan || ia < ib);
  }
  return a > b || (a == b && ia < ib);
}

// Associative merge of two states (online softmax with an argmax).
template <typename acc_t>
GRADOOD_HOST_DEVICE MaxState<acc_t> merge(const MaxState<acc_t>& a, const MaxState<acc_t>& b,
                                          acc_t inv_temperature) {
  if (b.argmax == kNoIndex) return a;
  if (a.argmax == kNoIndex) return b;
  const bool a_wins = precedes(a.max, a.argmax, b.max, b.argmax);
  const MaxState<acc_t>& win = a_wins ? a : b;
  const MaxState<acc_t>& lose = a_wins ? b : a;
  // The loser's max becomes one of the "others" of the winner. Equal maxima rescale by 1,
  // also when both are +inf or both -inf (where the difference is NaN): a row with two +inf
  // logits has energy +inf, an all -inf row -inf, as log-sum-exp has.
  const acc_t rescale =
      lose.max == win.max ? acc_t(1) : std::exp((lose.max - win.max) * inv_temperature);
  return {win.max, win.argmax, win.others + (lose.others + acc_t(1)) * rescale};
}

template <typename acc_t>
GRADOOD_HOST_DEVICE MaxState<acc_t> push(const MaxState<acc_t>& state, acc_t logit, int64_t index,
                                         acc_t inv_temperature) {
  return merge(state, MaxState<acc_t>{logit, index, acc_t(0)}, inv_temperature);
}

// Second pass over a row: sums over j != argmax of |p_j - 1/C| and p_j^2.
template <typename acc_t>
struct SoftmaxSums {
  acc_t uniform_deviation;  // sum_{j != argmax} |p_j - 1/C|
  acc_t squares;            // sum_{j != argmax} p_j^2
};

template <typename acc_t>
GRADOOD_HOST_DEVICE void accumulate_softmax(SoftmaxSums<acc_t>& sums, acc_t logit, acc_t max,
                                            acc_t inv_temperature, acc_t inv_sum, acc_t uniform) {
  // A logit equal to an infinite max (tied +inf logits, or a row of -inf) has the max's
  // share, as `merge` counted it: exp(0), not exp(inf - inf) = NaN.
  const acc_t relative = logit == max ? acc_t(1) : std::exp((logit - max) * inv_temperature);
  const acc_t p = relative * inv_sum;
  sums.uniform_deviation += std::fabs(p - uniform);
  sums.squares += p * p;
}

template <typename acc_t>
struct FeatureSums {
  acc_t l1;
  acc_t squares;
  acc_t clipped_l1;
};

template <typename acc_t>
GRADOOD_HOST_DEVICE void accumulate_feature(FeatureSums<acc_t>& sums, acc_t value, acc_t clip) {
  const acc_t magnitude = std::fabs(value);
  sums.l1 += magnitude;
  sums.squares += magnitude * magnitude;
  // Written so that a NaN feature stays NaN (std::fmin would drop it).
  sums.clipped_l1 += magnitude > clip ? clip : magnitude;
}

// Composes the logit terms of one row from the two passes' results; only the
// `wanted` ones are written (the others are left untouched).
template <typename acc_t>
GRADOOD_HOST_DEVICE void finalize_logit_terms(const MaxState<acc_t>& state,
                                              const SoftmaxSums<acc_t>& sums, int64_t num_classes,
                                              acc_t temperature, acc_t* out,
                                              TermMask wanted = kAllTerms) {
  // A NaN max (a NaN logit) makes every term NaN, also for one class, where no
  // other logit carries the NaN into `others`.
  const acc_t others = state.max != state.max ? state.max : state.others;
  const acc_t total = acc_t(1) + others;
  const acc_t max_softmax = acc_t(1) / total;
  const acc_t one_minus_max_softmax = others / total;
  if (wanted & term_bit(kMaxLogit)) out[kMaxLogit] = state.max;
  if (wanted & term_bit(kEnergy)) {
    out[kEnergy] = state.max + temperature * std::log1p(others);
  }
  if (wanted & term_bit(kMaxSoftmax)) out[kMaxSoftmax] = max_softmax;
  if (wanted & term_bit(kUniformDeviationL1)) {
    // p_max - 1/C as (1 - 1/C) - (1 - p_max): no cancellation in 1 - p_max.
    const acc_t uniform = acc_t(1) / static_cast<acc_t>(num_classes);
    out[kUniformDeviationL1] =
        std::fabs((acc_t(1) - uniform) - one_minus_max_softmax) + sums.uniform_deviation;
  }
  if (wanted & term_bit(kGini)) {
    // p_max (1 - p_max) + sum_{j != argmax} (p_j - p_j^2), with
    // sum_{j != argmax} p_j = 1 - p_max.
    out[kGini] = max_softmax * one_minus_max_softmax + (one_minus_max_softmax - sums.squares);
  }
  if (wanted & term_bit(kOneHotDeviationL2)) {
    out[kOneHotDeviationL2] =
        std::sqrt(one_minus_max_softmax * one_minus_max_softmax + sums.squares);
  }
}

template <typename acc_t>
GRADOOD_HOST_DEVICE void finalize_feature_terms(const FeatureSums<acc_t>& sums, acc_t* out,
                                                TermMask wanted = kAllTerms) {
  if (wanted & term_bit(kFeatureL1)) out[kFeatureL1] = sums.l1;
  if (wanted & term_bit(kFeatureL2)) out[kFeatureL2] = std::sqrt(sums.squares);
  if (wanted & term_bit(kFeatureClippedL1)) out[kFeatureClippedL1] = sums.clipped_l1;
}

// lastlayer_score: one score per row from one logit term U and optionally
// one feature term V (columns of LastLayerTerm):
//   kCombineProduct:  score = logit_scale * U * V'     (U alone without V)
//   kCombineSum:      score = logit_scale * U + alpha * V'
// where V' = V, or with_bias: ‖[v, 1]‖ (feature_l1 + 1, sqrt(feature_l2² + 1)).
enum ScoreCombine : int64_t { kCombineProduct = 0, kCombineSum = 1 };
constexpr int64_t kNoFeatureTerm = -1;

template <typename acc_t>
struct ScoreSpec {
  int64_t logit_term;
  acc_t logit_scale;
  int64_t feature_term;  // a feature column, or kNoFeatureTerm
  bool with_bias;
  int64_t combine;
  acc_t alpha;
};

template <typename acc_t>
GRADOOD_HOST_DEVICE TermMask score_terms(const ScoreSpec<acc_t>& spec) {
  return term_bit(spec.logit_term) |
         (spec.feature_term == kNoFeatureTerm ? 0u : term_bit(spec.feature_term));
}

template <typename acc_t>
GRADOOD_HOST_DEVICE acc_t compose_score(const acc_t* terms, const ScoreSpec<acc_t>& spec) {
  const acc_t output_term = spec.logit_scale * terms[spec.logit_term];
  if (spec.feature_term == kNoFeatureTerm) return output_term;
  acc_t feature_term = terms[spec.feature_term];
  if (spec.with_bias) {
    feature_term = spec.feature_term == kFeatureL2
                       ? std::sqrt(feature_term * feature_term + acc_t(1))
                       : feature_term + acc_t(1);
  }
  return spec.combine == kCombineSum ? output_term + spec.alpha * feature_term
                                     : output_term * feature_term;
}

}  // namespace gradood
