// CPU kernels of gradood::lastlayer_terms and gradood::lastlayer_score. Rows
// are split across threads with at::parallel_for. float32/float16/bfloat16
// rows use the vectorised float kernels of lastlayer_rows.h (one per instruction-set
// level); float64
// rows, and rows with a NaN or an infinite max, use the scalar kernels below
// (two passes over the logits: online max/log-sum-exp, then the softmax sums;
// one over the features), which define the results of such rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "common/lastlayer_terms_math.h"
#include "cpu/lastlayer_rows.h"
#include "ops/lastlayer_terms.h"

namespace gradood {
namespace {

template <typename scalar_t, typename acc_t>
void logit_terms_row(const scalar_t* logits, int64_t num_classes, acc_t temperature, acc_t* out,
                     int64_t* argmax) {
  const acc_t inv_temperature = acc_t(1) / temperature;
  MaxState<acc_t> state = empty_max_state<acc_t>();
  for (int64_t j = 0; j < num_classes; ++j) {
    state = push(state, static_cast<acc_t>(logits[j]), j, inv_temperature);
  }
  const acc_t inv_sum = acc_t(1) / (acc_t(1) + state.others);
  const acc_t uniform = acc_t(1) / static_cast<acc_t>(num_classes);
  SoftmaxSums<acc_t> sums{acc_t(0), acc_t(0)};
  for (int64_t j = 0; j < num_classes; ++j) {
    if (j == state.argmax) continue;
    accumulate_softmax(sums, static_cast<acc_t>(logits[j]), state.max, inv_temperature, inv_sum,
                       uniform);
  }
  finalize_logit_terms(state, sums, num_classes, temperature, out);
  *argmax = state.argmax;
}

template <typename scalar_t, typename acc_t>
void feature_terms_row(const scalar_t* features, int64_t num_features, acc_t clip, acc_t* out) {
  FeatureSums<acc_t> sums{acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t i = 0; i < num_features; ++i) {
    accumulate_feature(sums, static_cast<acc_t>(features[i]), clip);
  }
  finalize_feature_terms(sums, out);
}

// A float view of a row: the row itself for float32, else widened into `buffer`.
template <typename scalar_t>
const float* as_float(const cpu::RowKernels& kernels, const scalar_t* row, int64_t count,
                      float* buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    const auto* bits = reinterpret_cast<const uint16_t*>(row);
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      kernels.widen_bfloat16(bits, count, buffer);
    } else {
      kernels.widen_half(bits, count, buffer);
    }
    return buffer;
  }
}

struct RowProblem {
  int64_t batch;
  int64_t num_classes;
  int64_t num_features;  // 0 without features
  double temperature;
  double clip;
  TermMask wanted;  // the terms emit reads
};

// Computes every term of every row (in parallel) and passes each row's terms
// to emit(row, terms, argmax). Terms are accumulated in double for float64
// inputs and in float otherwise.
template <typename scalar_t, typename Emit>
void for_each_row(const scalar_t* logits, const scalar_t* features, const RowProblem& problem,
                  const Emit& emit) {
  const int64_t num_classes = problem.num_classes;
  const int64_t num_features = problem.num_features;
  // About 32k elements per task keeps the scheduling overhead negligible.
  const int64_t grain = std::max<int64_t>(1, 32768 / (num_classes + num_features));
  at::parallel_for(0, problem.batch, grain, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, double>) {
      double terms[kNumTerms];
      for (int64_t row = begin; row < end; ++row) {
        int64_t argmax = 0;
        logit_terms_row<double, double>(logits + row * num_classes, num_classes,
                                        problem.temperature, terms, &argmax);
        if (features != nullptr) {
          feature_terms_row<double, double>(features + row * num_features, num_features,
                                            problem.clip, terms);
        }
        emit(row, terms, argmax);
      }
    } else {
      // Short rows go kRowTile at a time (one per vector lane), long rows one at a time.
      const cpu::RowKernels& kernels = cpu::row_kernels();
      const bool short_rows = num_classes <= cpu::kMaxShortRow;
      const int64_t tile_rows = short_rows ? cpu::kRowTile : 1;
      constexpr bool kWiden = !std::is_same_v<scalar_t, float>;
      std::vector<float> scratch(num_classes +
                                 (kWiden ? tile_rows * num_classes + num_features : 0));
      float* exps = scratch.data();
      float* widened_logits = exps + num_classes;
      float* widened_features = widened_logits + tile_rows * num_classes;
      const auto temperature = static_cast<float>(problem.temperature);
      float terms[cpu::kRowTile * kNumTerms];
      int64_t argmax[cpu::kRowTile];
      bool fast[cpu::kRowTile];
      for (int64_t start = begin; start < end; start += tile_rows) {
        const int64_t rows = std::min(tile_rows, end - start);
        const float* tile_logits =
            as_float(kernels, logits + start * num_classes, rows * num_classes, widened_logits);
        if (short_rows) {
          kernels.logit_terms_short_rows(tile_logits, rows, num_classes, temperature,
                                         problem.wanted, terms, argmax, fast);
        } else {
          fast[0] = kernels.logit_terms_row(tile_logits, num_classes, temperature, problem.wanted,
                                            terms, argmax, exps);
        }
        for (int64_t r = 0; r < rows; ++r) {
          float* row_terms = terms + r * kNumTerms;
          if (!fast[r]) {
            logit_terms_row<float, float>(tile_logits + r * num_classes, num_classes, temperature,
                                          row_terms, argmax + r);
          }
          if (features != nullptr) {
            const int64_t row = start + r;
            const float* row_features =
                as_float(kernels, features + row * num_features, num_features, widened_features);
            kernels.feature_terms_row(row_features, num_features, static_cast<float>(problem.clip),
                                      problem.wanted, row_terms);
          }
          emit(start + r, row_terms, argmax[r]);
        }
      }
    }
  });
}

struct ContiguousInputs {
  at::Tensor logits;
  at::Tensor features;  // undefined without features
  RowProblem problem;
};

ContiguousInputs prepare(const at::Tensor& logits, const std::optional<at::Tensor>& features,
                         double temperature, double clip, TermMask wanted) {
  check_lastlayer_terms_inputs(logits, features, temperature, clip);
  TORCH_CHECK(logits.device().is_cpu(), "gradood CPU kernel: logits must be on the CPU, got ",
              logits.device());
  ContiguousInputs inputs;
  inputs.logits = logits.contiguous();
  if (features.has_value()) inputs.features = features->contiguous();
  inputs.problem =
      RowProblem{logits.size(0), logits.size(1), features.has_value() ? features->size(1) : 0,
                 temperature,    clip,           wanted};
  return inputs;
}

at::ScalarType accumulator_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename scalar_t>
const scalar_t* features_ptr(const ContiguousInputs& inputs) {
  return inputs.features.defined() ? inputs.features.const_data_ptr<scalar_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> lastlayer_terms_cpu(const at::Tensor& logits,
                                                       const std::optional<at::Tensor>& features,
                                                       double temperature, double clip) {
  const ContiguousInputs inputs = prepare(logits, features, temperature, clip, kAllTerms);
  const int64_t num_terms = features.has_value() ? kNumTerms : kNumLogitTerms;
  const int64_t batch = inputs.problem.batch;
  at::Tensor terms =
      at::empty({batch, num_terms}, logits.options().dtype(accumulator_dtype(logits)));
  at::Tensor argmax = at::empty({batch}, logits.options().dtype(at::kLong));
  if (batch == 0) return {terms, argmax};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "lastlayer_terms_cpu", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        acc_t* terms_out = terms.mutable_data_ptr<acc_t>();
        int64_t* argmax_out = argmax.mutable_data_ptr<int64_t>();
        for_each_row(inputs.logits.const_data_ptr<scalar_t>(), features_ptr<scalar_t>(inputs),
                     inputs.problem, [&](int64_t row, const acc_t* row_terms, int64_t row_argmax) {
                       std::copy(row_terms, row_terms + num_terms, terms_out + row * num_terms);
                       argmax_out[row] = row_argmax;
                     });
      });
  return {terms, argmax};
}

at::Tensor lastlayer_score_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& features,
                               int64_t logit_term, double logit_scale, int64_t feature_term,
                               bool with_bias, int64_t combine, double alpha, double temperature,
                               double clip) {
  check_lastlayer_score_spec(features, logit_term, feature_term, with_bias, combine);
  const TermMask wanted = score_terms(
      ScoreSpec<double>{logit_term, logit_scale, feature_term, with_bias, combine, alpha});
  const ContiguousInputs inputs = prepare(logits, features, temperature, clip, wanted);
  const int64_t batch = inputs.problem.batch;
  at::Tensor scores = at::empty({batch}, logits.options().dtype(accumulator_dtype(logits)));
  if (batch == 0) return scores;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "lastlayer_score_cpu", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        const ScoreSpec<acc_t> spec{logit_term,   static_cast<acc_t>(logit_scale),
                                    feature_term, with_bias,
                                    combine,      static_cast<acc_t>(alpha)};
        acc_t* scores_out = scores.mutable_data_ptr<acc_t>();
        for_each_row(inputs.logits.const_data_ptr<scalar_t>(), features_ptr<scalar_t>(inputs),
                     inputs.problem, [&](int64_t row, const acc_t* row_terms, int64_t) {
                       scores_out[row] = compose_score(row_terms, spec);
                     });
      });
  return scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradood, CPU, m) {
  m.impl("lastlayer_terms", &lastlayer_terms_cpu);
  m.impl("lastlayer_score", &lastlayer_score_cpu);
}

}  // namespace gradood
