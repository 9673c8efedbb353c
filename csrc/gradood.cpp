// Every schema of the gradood operator library, and how autograd treats them.
// Kernels register themselves per backend in cpu/ and cuda/; fake (meta) kernels
// are registered from Python in gradood/_ops.py.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "cpu/lastlayer_rows.h"
#include "ops/lastlayer_terms.h"

TORCH_LIBRARY(gradood, m) {
  m.def(
      "lastlayer_terms(Tensor logits, Tensor? features, float temperature, "
      "float clip) -> (Tensor terms, Tensor argmax)");
  // One score per row composed from one logit term and at most one feature
  // term (ScoreSpec in common/lastlayer_terms_math.h), in the same pass.
  m.def(
      "lastlayer_score(Tensor logits, Tensor? features, int logit_term, "
      "float logit_scale, int feature_term, bool with_bias, int combine, "
      "float alpha, float temperature, float clip) -> Tensor");
  // Column names of lastlayer_terms' `terms`, so Python and C++ read one list.
  m.def("lastlayer_term_names() -> str[]", &gradood::lastlayer_term_names);
  // The instruction-set level of the CPU row kernels in use (cpu/lastlayer_rows.h).
  m.def("cpu_capability() -> str", &gradood::cpu::cpu_capability);
  // Per-sample squared gradient norms of a layer's weight (ops/persample_norms.h).
  m.def("outer_product_sq_norm(Tensor activations, Tensor grads, str method) -> Tensor");
  m.def(
      "conv2d_weight_sq_norm(Tensor padded_input, Tensor grad_output, "
      "int[2] kernel_size, int[2] stride, int[2] dilation, int groups, "
      "str method) -> Tensor");
  // Per-sample dγ, dβ of a normalisation layer (ops/norm_affine.h).
  m.def(
      "norm_affine_grads(Tensor grad_output, Tensor input, Tensor? shift, "
      "Tensor scale) -> (Tensor weight, Tensor bias)");
  // ReAct's energy, logsumexp(W min(v, clip) + b), fused (ops/react_energy.h).
  m.def("react_energy(Tensor features, Tensor weight, Tensor? bias, float clip) -> Tensor");
  // ASH's and SCALE's pruning, and the head on the kept features (ops/pruned_linear.h).
  m.def(
      "top_features(Tensor features, int keep) -> (Tensor values, Tensor indices, "
      "Tensor total, Tensor kept_sum)");
  m.def(
      "pruned_linear(Tensor values, Tensor indices, Tensor weight_blocks, int classes) -> "
      "Tensor");
}

// The scores are not differentiable. Without an Autograd kernel PyTorch only
// warns and backward silently yields no gradient; with this one, backward through
// a score raises (forward with inputs that require grad still works).
// The score operators' backward formulas are registered from Python
// (gradood/_autograd.py, torch.library.register_autograd); the per-sample
// norm operators have none: they are reductions of gradients, not scores.
TORCH_LIBRARY_IMPL(gradood, Autograd, m) {
  m.impl("outer_product_sq_norm", torch::autograd::autogradNotImplementedFallback());
  m.impl("conv2d_weight_sq_norm", torch::autograd::autogradNotImplementedFallback());
  m.impl("norm_affine_grads", torch::autograd::autogradNotImplementedFallback());
  m.impl("top_features", torch::autograd::autogradNotImplementedFallback());
  m.impl("pruned_linear", torch::autograd::autogradNotImplementedFallback());
}
