// Calls the per-sample norm operators through their C++ API
// (gradood::outer_product_sq_norm, conv2d_weight_sq_norm, norm_affine_grads)
// and checks them against the per-sample products written out here with ATen.
// Exit status 0 when all checks pass.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <string>

#include "ops/norm_affine.h"
#include "ops/persample_norms.h"

namespace {

int failures = 0;

void expect_close(const std::string& name, const at::Tensor& actual, const at::Tensor& expected) {
  const bool ok =
      actual.sizes() == expected.sizes() && at::allclose(actual, expected, 1e-12, 1e-12);
  std::printf("%-36s %s\n", name.c_str(), ok ? "ok" : "MISMATCH");
  if (!ok) ++failures;
}

}  // namespace

int main() {
  at::manual_seed(0);
  const auto options = at::TensorOptions().dtype(at::kDouble);

  // A linear layer on [N, T, d] input: ‖Σ_t g_t a_tᵀ‖² per sample, both methods.
  const at::Tensor activations = at::randn({3, 5, 7}, options);
  const at::Tensor grads = at::randn({3, 5, 4}, options);
  const at::Tensor product = at::einsum("ntp,ntd->npd", {grads, activations});
  const at::Tensor expected = product.square().sum({1, 2});
  expect_close("outer_product_sq_norm ghost",
               gradood::outer_product_sq_norm(activations, grads, "ghost"), expected);
  expect_close("outer_product_sq_norm materialise",
               gradood::outer_product_sq_norm(activations, grads, "materialise"), expected);

  // A grouped 3x3 convolution: the per-sample weight gradient from im2col, per group.
  const int64_t groups = 2;
  const at::Tensor padded = at::randn({2, 4, 6, 6}, options);
  const at::Tensor grad_output = at::randn({2, 6, 4, 4}, options);
  const at::Tensor patches = at::im2col(padded, {3, 3}, {1, 1}, {0, 0}, {1, 1})  // [B, 4·9, 16]
                                 .reshape({2, groups, 18, 16});
  const at::Tensor per_group = grad_output.reshape({2, groups, 3, 16});
  const at::Tensor conv_expected =
      at::einsum("bgpt,bgdt->bgpd", {per_group, patches}).square().sum({1, 2, 3});
  expect_close("conv2d_weight_sq_norm",
               gradood::conv2d_weight_sq_norm(padded, grad_output, {3, 3}, {1, 1}, {1, 1}, groups,
                                              "materialise"),
               conv_expected);

  // BatchNorm-style statistics, expanded over [B, C, T].
  const at::Tensor g = at::randn({2, 3, 5}, options), x = at::randn({2, 3, 5}, options);
  const at::Tensor shift = at::randn({1, 3, 1}, options).expand({2, 3, 5});
  const at::Tensor scale = (at::rand({1, 3, 1}, options) + 0.5).expand({2, 3, 5});
  const auto [weight, bias] = gradood::norm_affine_grads(g, x, shift, scale);
  expect_close("norm_affine_grads weight", weight, (g * (x - shift) * scale).sum(2));
  expect_close("norm_affine_grads bias", bias, g.sum(2));

  if (failures != 0) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
