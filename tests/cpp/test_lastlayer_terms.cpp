// Calls gradood::lastlayer_terms through its C++ API on a hand-computable
// batch and checks every term against closed forms written out here.
// Exit status 0 when all checks pass.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <string>

#include "ops/lastlayer_terms.h"
#include "ops/react_energy.h"

namespace {

int failures = 0;

void expect_near(const std::string& name, double actual, double expected) {
  const double tolerance = 1e-12 * std::max(1.0, std::fabs(expected));
  const bool ok = std::fabs(actual - expected) <= tolerance;
  std::printf("%-22s %.15f (expected %.15f) %s\n", name.c_str(), actual, expected,
              ok ? "ok" : "MISMATCH");
  if (!ok) ++failures;
}

}  // namespace

int main() {
  // One row: logits (1, 3, 2), features (0.5, -2, 1.5), T = 2, clip = 1.
  const double temperature = 2.0;
  const double clip = 1.0;
  const at::Tensor logits = at::tensor({1.0, 3.0, 2.0}, at::kDouble).reshape({1, 3});
  const at::Tensor features = at::tensor({0.5, -2.0, 1.5}, at::kDouble).reshape({1, 3});
  const auto [terms, argmax] = gradood::lastlayer_terms(logits, features, temperature, clip);

  const double e1 = std::exp(1.0 / temperature), e3 = std::exp(3.0 / temperature),
               e2 = std::exp(2.0 / temperature);
  const double total = e1 + e2 + e3;
  const double p1 = e1 / total, p2 = e2 / total, p3 = e3 / total;  // p3 is the max
  const double u = 1.0 / 3.0;
  const auto term = [&](gradood::LastLayerTerm column) {
    return terms.index({0, static_cast<int64_t>(column)}).item<double>();
  };

  if (argmax.item<int64_t>() != 1) {
    std::printf("argmax %lld (expected 1) MISMATCH\n",
                static_cast<long long>(argmax.item<int64_t>()));
    ++failures;
  }
  expect_near("max_logit", term(gradood::kMaxLogit), 3.0);
  expect_near("energy", term(gradood::kEnergy), temperature * std::log(total));
  expect_near("max_softmax", term(gradood::kMaxSoftmax), p3);
  expect_near("uniform_deviation_l1", term(gradood::kUniformDeviationL1),
              std::fabs(p1 - u) + std::fabs(p2 - u) + std::fabs(p3 - u));
  expect_near("gini", term(gradood::kGini), p1 * (1 - p1) + p2 * (1 - p2) + p3 * (1 - p3));
  expect_near("onehot_deviation_l2", term(gradood::kOneHotDeviationL2),
              std::sqrt(p1 * p1 + p2 * p2 + (1 - p3) * (1 - p3)));
  expect_near("feature_l1", term(gradood::kFeatureL1), 4.0);
  expect_near("feature_l2", term(gradood::kFeatureL2), std::sqrt(0.25 + 4.0 + 2.25));
  expect_near("feature_clipped_l1", term(gradood::kFeatureClippedL1), 0.5 + 1.0 + 1.0);

  // A score composed the way gradood.scores.rg does: energy x clipped L1.
  const double rg_score = term(gradood::kEnergy) * term(gradood::kFeatureClippedL1);
  std::printf("RG score (T=2, clip=1): %.15f\n", rg_score);
  expect_near("rg", rg_score, temperature * std::log(total) * 2.5);
  // The same score from the fused op: energy x clipped L1, composed in the kernel.
  const at::Tensor fused = gradood::lastlayer_score(
      logits, features, gradood::kEnergy, 1.0, gradood::kFeatureClippedL1,
      /*with_bias=*/false, gradood::kCombineProduct, /*alpha=*/0.0, temperature, clip);
  expect_near("lastlayer_score rg", fused.item<double>(), temperature * std::log(total) * 2.5);

  // ReAct: W = [[1, 0, 1], [0, 2, 0]], b = (0.5, -1): the clipped features
  // (0.5, -2, 1) give logits (2, -5).
  const at::Tensor weight = at::tensor({1.0, 0.0, 1.0, 0.0, 2.0, 0.0}, at::kDouble).reshape({2, 3});
  const at::Tensor bias = at::tensor({0.5, -1.0}, at::kDouble);
  const at::Tensor react = gradood::react_energy(features, weight, bias, clip);
  expect_near("react_energy", react.item<double>(), std::log(std::exp(2.0) + std::exp(-5.0)));

  if (failures != 0) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
