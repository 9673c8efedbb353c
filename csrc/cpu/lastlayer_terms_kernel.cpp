// CPU kernel of gradood::lastlayer_terms: rows split across threads with
// at::parallel_for; each row is read in two passes over the logits (online
// max/log-sum-exp, then the softmax sums) and one over the features.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/lastlayer_terms_math.h"
#include "ops/lastlayer_terms.h"

namespace gradood {
namespace {

template <typename scalar_t, typename acc_t>
void logit_terms_row(const scalar_t* logits, int64_t num_classes,
                     acc_t temperature, acc_t* out, int64_t* argmax) {
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
    accumulate_softmax(sums, static_cast<acc_t>(logits[j]), state.max,
                       inv_temperature, inv_sum, uniform);
  }
  finalize_logit_terms(state, sums, num_classes, temperature, out);
  *argmax = state.argmax;
}

template <typename scalar_t, typename acc_t>
void feature_terms_row(const scalar_t* features, int64_t num_features,
                       acc_t clip, acc_t* out) {
  FeatureSums<acc_t> sums{acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t i = 0; i < num_features; ++i) {
    accumulate_feature(sums, static_cast<acc_t>(features[i]), clip);
  }
  finalize_feature_terms(sums, out);
}

std::tuple<at::Tensor, at::Tensor> lastlayer_terms_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& features,
    double temperature, double clip) {
  check_lastlayer_terms_inputs(logits, features, temperature, clip);
  TORCH_CHECK(logits.device().is_cpu(),
              "lastlayer_terms (CPU kernel): logits must be on the CPU, got ",
              logits.device());
  const at::Tensor logits_c = logits.contiguous();
  const at::Tensor features_c =
      features.has_value() ? features->contiguous() : at::Tensor();
  const int64_t batch = logits_c.size(0);
  const int64_t num_classes = logits_c.size(1);
  const int64_t num_features = features_c.defined() ? features_c.size(1) : 0;
  const int64_t num_terms = features_c.defined() ? kNumTerms : kNumLogitTerms;
  const auto acc_dtype =
      logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor terms = at::empty({batch, num_terms}, logits.options().dtype(acc_dtype));
  at::Tensor argmax = at::empty({batch}, logits.options().dtype(at::kLong));
  if (batch == 0) return {terms, argmax};

  // About 32k elements per task keeps the scheduling overhead negligible.
  const int64_t grain = std::max<int64_t>(1, 32768 / (num_classes + num_features));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "lastlayer_terms_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* logits_ptr = logits_c.const_data_ptr<scalar_t>();
        const scalar_t* features_ptr =
            features_c.defined() ? features_c.const_data_ptr<scalar_t>() : nullptr;
        acc_t* terms_ptr = terms.mutable_data_ptr<acc_t>();
        int64_t* argmax_ptr = argmax.mutable_data_ptr<int64_t>();
        at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; ++row) {
            acc_t* row_terms = terms_ptr + row * num_terms;
            logit_terms_row<scalar_t, acc_t>(
                logits_ptr + row * num_classes, num_classes,
                static_cast<acc_t>(temperature), row_terms, argmax_ptr + row);
            if (features_ptr != nullptr) {
              feature_terms_row<scalar_t, acc_t>(
                  features_ptr + row * num_features, num_features,
                  static_cast<acc_t>(clip), row_terms);
            }
          }
        });
      });
  return {terms, argmax};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradood, CPU, m) {
  m.impl("lastlayer_terms", &lastlayer_terms_cpu);
}

}  // namespace gradood
