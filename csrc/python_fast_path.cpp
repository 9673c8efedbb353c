// gradood._C._plain_cpu_score: the scores of gradood.scores for the common case of
// plain CPU tensors, called from Python without the Python-side checks and the
// torch.ops call (together ~5 us a call, more than the kernel itself at small B).
//
// It answers None, and the caller takes the checked path (gradood/_ops.py), for
// anything it cannot prove plain: a tensor subclass (FakeTensor, Parameter), a
// tensor with any dispatch key beyond a dense CPU tensor's (functorch wrappers,
// Python, ZeroTensor, sparse), a gradient that could flow, an active dispatch or
// function mode, keys forced on for this thread (functorch transforms, autocast),
// wrong shapes, dtypes or scalars. So every error message and every transform,
// mode and autograd behaviour stays the checked path's. Python-only: not part of
// the CMake (libtorch) build.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/max.h>
#include <ATen/ops/empty.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <optional>
#include <string_view>
#include <tuple>

#include "common/lastlayer_terms_math.h"
#include "cpu/lastlayer_rows.h"
#include "ops/lastlayer_terms.h"
#include "python_fast_path.h"

namespace gradood {
namespace {

// Where max_logit runs the kernel's max pass (one read of each row, NaN kept) rather than
// ATen's reduction. AVX2/AVX-512: a small batch (B=1, C=1000: 0.8 us against 1.2 for
// at::amax, whose set-up dominates); beyond 16384 logits at::amax is faster. DEFAULT: rows
// longer than the short-row tile at any B (B=1024, C=1000: 0.24 ms against 0.59 for
// at::max(dim), the faster of ATen's two there), short rows in a small batch only (C=10,
// B=1024: at::max(dim) 11 us, the short-row kernel 23) (AMD EPYC, 2026-12-07).
bool kernel_max_logit(const at::Tensor& logits) {
  if (cpu::row_kernels().capability == std::string_view("DEFAULT")) {
    return logits.size(1) > cpu::kMaxShortRow || logits.size(0) <= 16;
  }
  return logits.numel() <= 16384;
}

// The dispatch keys of a dense strided CPU tensor (bitwise: DispatchKeySet's `-`
// keeps backend bits, so subsets are tested with isSupersetOf).
c10::DispatchKeySet plain_cpu_keys() {
  static const c10::DispatchKeySet keys = [] {
    c10::InferenceMode normal_tensors(false);  // a first call inside inference_mode must not
    return at::empty({1}).key_set();           // take an inference tensor's smaller key set
  }();
  return keys;
}

bool is_plain_cpu_matrix(const at::Tensor& tensor) {
  const at::ScalarType dtype = tensor.scalar_type();
  return plain_cpu_keys().isSupersetOf(tensor.key_set()) && tensor.layout() == at::kStrided &&
         tensor.device().is_cpu() && tensor.dim() == 2 && tensor.size(0) >= 1 &&
         tensor.size(1) >= 1 &&
         (dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
          dtype == at::kBFloat16);
}

bool nothing_intercepts() {
  const c10::impl::LocalDispatchKeySet local = c10::impl::tls_local_dispatch_key_set();
  // Python threads include BackendSelect and ADInplaceOrView and exclude the autocast
  // keys by default; a transform, the tracer or autocast changes these sets.
  return c10::default_included_set.isSupersetOf(local.included_) &&
         local.excluded_.isSupersetOf(c10::default_excluded_set) &&
         c10::impl::TorchDispatchModeTLS::stack_len() == 0 &&
         at::impl::PythonTorchFunctionTLS::stack_len() == 0;
}

// A Python float or int (not bool) as a double; nullopt for anything else.
std::optional<double> as_number(PyObject* object) {
  if (PyFloat_CheckExact(object)) return PyFloat_AS_DOUBLE(object);
  if (PyLong_CheckExact(object)) {
    const double value = PyLong_AsDouble(object);
    if (value == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return std::nullopt;
    }
    return value;
  }
  return std::nullopt;
}

std::optional<int64_t> as_int(PyObject* object) {
  if (!PyLong_CheckExact(object)) return std::nullopt;
  const long long value = PyLong_AsLongLong(object);
  if (value == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return std::nullopt;
  }
  return value;
}

// args: logits, features (Tensor or None), logit_term, logit_scale, feature_term,
// with_bias, combine, alpha, temperature, clip: the schema of gradood::lastlayer_score.
PyObject* plain_cpu_score(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 10) {
    PyErr_SetString(PyExc_TypeError, "_plain_cpu_score takes 10 arguments");
    return nullptr;
  }
  if (!THPVariable_CheckExact(args[0]) ||
      !(args[1] == Py_None || THPVariable_CheckExact(args[1]))) {
    Py_RETURN_NONE;
  }
  const at::Tensor& logits = THPVariable_Unpack(args[0]);
  std::optional<at::Tensor> features;
  if (args[1] != Py_None) features = THPVariable_Unpack(args[1]);
  const auto logit_term = as_int(args[2]);
  const auto logit_scale = as_number(args[3]);
  const auto feature_term = as_int(args[4]);
  const bool bias_is_bool = PyBool_Check(args[5]);
  const auto combine = as_int(args[6]);
  const auto alpha = as_number(args[7]);
  const auto temperature = as_number(args[8]);
  const auto clip = as_number(args[9]);
  if (!logit_term || !logit_scale || !feature_term || !bias_is_bool || !combine || !alpha ||
      !temperature || !clip) {
    Py_RETURN_NONE;
  }
  const bool with_bias = args[5] == Py_True;
  const bool valid_spec =
      *logit_term >= 0 && *logit_term < kNumLogitTerms &&
      (features.has_value() ? *feature_term >= kNumLogitTerms && *feature_term < kNumTerms
                            : *feature_term == kNoFeatureTerm) &&
      (*combine == 0 || *combine == 1) && std::isfinite(*logit_scale) && std::isfinite(*alpha) &&
      std::isfinite(*temperature) && *temperature > 0 && *clip > 0;  // NaN clip fails > 0
  const bool may_need_grad =
      at::GradMode::is_enabled() &&
      (logits.requires_grad() || (features.has_value() && features->requires_grad()));
  if (!valid_spec || may_need_grad || !nothing_intercepts() || !is_plain_cpu_matrix(logits) ||
      (features.has_value() &&
       (!is_plain_cpu_matrix(*features) || features->size(0) != logits.size(0) ||
        features->scalar_type() != logits.scalar_type()))) {
    Py_RETURN_NONE;
  }
  at::Tensor score;
  {
    pybind11::gil_scoped_release no_gil;  // a large batch runs for milliseconds
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    if (*logit_term == kMaxLogit && !features.has_value() && *logit_scale == 1.0 &&
        !kernel_max_logit(logits)) {
      // One read of the logits by ATen's fastest reduction at this level (NaN rows stay
      // NaN, as the checked path's amax): at DEFAULT max(dim) is vectorised, amax is not
      // (B=1024, C=1000: 0.60 ms against 1.0; C=10: 5.6 us against 9.9).
      score = cpu::row_kernels().capability == std::string_view("DEFAULT")
                  ? std::get<0>(at::max(logits, 1))
                  : at::amax(logits, 1);
      if (score.scalar_type() != at::kDouble && score.scalar_type() != at::kFloat) {
        score = score.to(at::kFloat);
      }
    } else {
      score = lastlayer_score(logits, features, *logit_term, *logit_scale, *feature_term, with_bias,
                              *combine, *alpha, *temperature, *clip);
    }
  }
  return THPVariable_Wrap(std::move(score));
  END_HANDLE_TH_ERRORS
}

PyMethodDef fast_path_methods[] = {
    {"_plain_cpu_score",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(plain_cpu_score)), METH_FASTCALL,
     "lastlayer_score for plain CPU tensors with no gradient, mode or transform in play; "
     "None where the checked path must run (gradood/_ops.py)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* python_fast_path_methods() { return fast_path_methods; }

}  // namespace gradood
