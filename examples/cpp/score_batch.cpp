// Loads a TorchScript model whose forward returns (logits, score) — a scripted
// gradood.OODHead — and a batch, scores it, and prints one line per sample:
// the predicted class, its probability and the OOD score (ID-high).
//
//   score_batch model.pt inputs.pt
//
// inputs.pt is a TorchScript module holding the batch as its attribute
// `inputs` (examples/cpp/make_model.py writes both files).
#include <torch/script.h>

#include <cstdio>
#include <string>

#include "ops/lastlayer_terms.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s model.pt inputs.pt\n", argv[0]);
    return 2;
  }
  // Linking libgradood registers gradood::* with the dispatcher; the scripted
  // model calls them by name. The term names come from the same library.
  std::printf("# gradood terms:");
  for (const std::string& name : gradood::lastlayer_term_names()) std::printf(" %s", name.c_str());
  std::printf("\n");

  torch::jit::Module model = torch::jit::load(argv[1]);
  model.eval();
  const at::Tensor inputs = torch::jit::load(argv[2]).attr("inputs").toTensor();
  torch::NoGradGuard no_grad;
  const auto outputs = model.forward({inputs}).toTuple();
  const at::Tensor logits = outputs->elements()[0].toTensor();
  const at::Tensor scores = outputs->elements()[1].toTensor();
  const auto [probability, label] = at::softmax(logits, 1).max(1);
  std::printf("# class probability score\n");
  for (int64_t i = 0; i < scores.size(0); ++i) {
    std::printf("%lld %.9g %.9g\n", static_cast<long long>(label[i].item<int64_t>()),
                probability[i].item<double>(), scores[i].item<double>());
  }
  return 0;
}
