// Every schema of the gradood operator library, and nothing else. Kernels
// register themselves per backend in cpu/ and cuda/; fake (meta) kernels are
// registered from Python in gradood/_ops.py.
#include <torch/library.h>

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
}
