// Every schema of the gradood operator library, and nothing else. Kernels
// register themselves per backend in cpu/ and cuda/; fake (meta) kernels are
// registered from Python in gradood/_ops.py.
#include <torch/library.h>

#include "ops/lastlayer_terms.h"

TORCH_LIBRARY(gradood, m) {
  m.def(
      "lastlayer_terms(Tensor logits, Tensor? features, float temperature, "
      "float clip) -> (Tensor terms, Tensor argmax)");
  // Column names of lastlayer_terms' `terms`, so Python and C++ read one list.
  m.def("lastlayer_term_names() -> str[]", &gradood::lastlayer_term_names);
}
