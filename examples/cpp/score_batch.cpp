// Loads a model whose forward returns (logits, score) — a gradood.OODHead,
// scripted with TorchScript (model.pt) or packaged with AOTInductor
// (model.pt2) — and a batch, scores it, and prints one line per sample: the
// predicted class, its probability and the OOD score (ID-high).
//
//   score_batch model.pt|model.pt2 inputs.pt
//
// inputs.pt is a TorchScript module holding the batch as its attribute
// `inputs` (examples/cpp/make_model.py writes both files).
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include <cstdio>
#include <string>
#include <utility>

#include "ops/lastlayer_terms.h"

namespace {

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// (logits, scores) of the model at `path` on `inputs`.
std::pair<at::Tensor, at::Tensor> run_model(const std::string& path, const at::Tensor& inputs) {
  if (ends_with(path, ".pt2")) {  // AOTInductor package
    torch::inductor::AOTIModelPackageLoader loader(path);
    const std::vector<at::Tensor> outputs = loader.run({inputs});
    return {outputs.at(0), outputs.at(1)};
  }
  torch::jit::Module model = torch::jit::load(path);
  model.eval();
  const auto outputs = model.forward({inputs}).toTuple();
  return {outputs->elements()[0].toTensor(), outputs->elements()[1].toTensor()};
}

}  // namespace

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

  const at::Tensor inputs = torch::jit::load(argv[2]).attr("inputs").toTensor();
  torch::NoGradGuard no_grad;
  const auto [logits, scores] = run_model(argv[1], inputs);
  const auto [probability, label] = at::softmax(logits, 1).max(1);
  std::printf("# class probability score\n");
  for (int64_t i = 0; i < scores.size(0); ++i) {
    std::printf("%lld %.9g %.9g\n", static_cast<long long>(label[i].item<int64_t>()),
                probability[i].item<double>(), scores[i].item<double>());
  }
  return 0;
}
