#include "ops/lastlayer_terms.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace gradood {

std::tuple<at::Tensor, at::Tensor> lastlayer_terms(const at::Tensor& logits,
                                                   const std::optional<at::Tensor>& features,
                                                   double temperature, double clip) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gradood::lastlayer_terms", "")
                       .typed<decltype(lastlayer_terms)>();
  return op.call(logits, features, temperature, clip);
}

at::Tensor lastlayer_score(const at::Tensor& logits, const std::optional<at::Tensor>& features,
                           int64_t logit_term, double logit_scale, int64_t feature_term,
                           bool with_bias, int64_t combine, double alpha, double temperature,
                           double clip) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gradood::lastlayer_score", "")
                       .typed<decltype(lastlayer_score)>();
  return op.call(logits, features, logit_term, logit_scale, feature_term, with_bias, combine, alpha,
                 temperature, clip);
}

std::vector<std::string> lastlayer_term_names() {
  return {"max_logit",           "energy",     "max_softmax", "uniform_deviation_l1", "gini",
          "onehot_deviation_l2", "feature_l1", "feature_l2",  "feature_clipped_l1"};
}

namespace {
bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
         dtype == at::kBFloat16;
}
}  // namespace

void check_lastlayer_terms_inputs(const at::Tensor& logits,
                                  const std::optional<at::Tensor>& features, double temperature,
                                  double clip) {
  TORCH_CHECK(logits.dim() == 2, "lastlayer_terms: logits must be 2-D [B, C], got shape ",
              logits.sizes());
  TORCH_CHECK(logits.size(1) >= 1,
              "lastlayer_terms: logits must have at least one class, got shape ", logits.sizes());
  TORCH_CHECK(is_supported_dtype(logits.scalar_type()),
              "lastlayer_terms: logits must be float16, bfloat16, float32 or "
              "float64, got ",
              logits.scalar_type());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
              "lastlayer_terms: temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK(clip > 0, "lastlayer_terms: clip must be > 0, got ", clip);
  if (!features.has_value()) return;
  const at::Tensor& feats = *features;
  TORCH_CHECK(feats.dim() == 2, "lastlayer_terms: features must be 2-D [B, D], got shape ",
              feats.sizes());
  TORCH_CHECK(feats.size(0) == logits.size(0),
              "lastlayer_terms: features must have the batch size of logits (", logits.size(0),
              "), got shape ", feats.sizes());
  TORCH_CHECK(feats.size(1) >= 1,
              "lastlayer_terms: features must have at least one column, got "
              "shape ",
              feats.sizes());
  TORCH_CHECK(feats.scalar_type() == logits.scalar_type(),
              "lastlayer_terms: features must have the dtype of logits (", logits.scalar_type(),
              "), got ", feats.scalar_type());
  TORCH_CHECK(feats.device() == logits.device(),
              "lastlayer_terms: features must be on the device of logits (", logits.device(),
              "), got ", feats.device());
}

void check_lastlayer_score_spec(const std::optional<at::Tensor>& features, int64_t logit_term,
                                int64_t feature_term, bool with_bias, int64_t combine) {
  TORCH_CHECK(logit_term >= 0 && logit_term < kNumLogitTerms,
              "lastlayer_score: logit_term must be a logit column in [0, ", kNumLogitTerms,
              "), got ", logit_term);
  const bool has_feature_term = feature_term != kNoFeatureTerm;
  TORCH_CHECK(!has_feature_term || (feature_term >= kNumLogitTerms && feature_term < kNumTerms),
              "lastlayer_score: feature_term must be -1 or a feature column in [", kNumLogitTerms,
              ", ", kNumTerms, "), got ", feature_term);
  TORCH_CHECK(has_feature_term == features.has_value(),
              has_feature_term ? "lastlayer_score: a feature_term needs features"
                               : "lastlayer_score: features given but feature_term is -1");
  TORCH_CHECK(!with_bias || feature_term == kFeatureL1 || feature_term == kFeatureL2,
              "lastlayer_score: with_bias needs feature_term feature_l1 or "
              "feature_l2, got ",
              feature_term);
  TORCH_CHECK(combine == kCombineProduct || combine == kCombineSum,
              "lastlayer_score: combine must be 0 (product) or 1 (sum), got ", combine);
}

}  // namespace gradood
