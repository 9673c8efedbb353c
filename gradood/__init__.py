"""gradood: gradient-based out-of-distribution scores for PyTorch classifiers.

Every score is an ID-score: higher means more in-distribution.

    gradood.scores     scores backed by the compiled operators (CPU and CUDA)
    gradood.reference  pure-PyTorch definitions, the oracle for the kernels
    gradood.metrics    AUROC, FPR@95TPR (both conventions), AUPR, bootstrap
    gradood.testing    autograd oracles for the gradient-norm closed forms
    gradood.persample_grad_norms
                       full-network per-sample gradient norms, one forward + one backward
    gradood.persample_gradients
                       per-sample gradients as an operator (projections, weighted sums, moments)
    gradood.GradientSubspace, gradood.knn_score, gradood.mahalanobis_score
                       the low-dimensional-gradient method's subspace, its KNN and Mahalanobis scores
    gradood.detectors  detectors for any classifier (MSP ... GRODIN), fit/score/calibrate
    gradood.evaluate, gradood.tune
                       metric tables and reports; grid search by AUROC

The operators are also reachable as torch.ops.gradood.* (Python, TorchScript)
and from C++ (csrc/ops/*.h).
"""

from gradood import (
    _extension,  # noqa: F401  (fails with build instructions if unbuilt)
    detectors,
    export,  # gradood.export.to_onnx (onnxscript loads on use)
    metrics,
    reference,
    scores,
)
from gradood._ops import TERM_NAMES, LastLayerTerms, cpu_capability, lastlayer_terms
from gradood._version import __version__
from gradood.evaluation import Evaluation, evaluate
from gradood.gradient_subspace import GradientSubspace
from gradood.knn import knn_score
from gradood.mahalanobis import ClassGaussians, fit_class_gaussians, mahalanobis_score
from gradood.ood_head import OODHead
from gradood.persample import PerSampleGradients, PerSampleGradNorms, persample_grad_norms, persample_gradients
from gradood.tuning import TuneResult, tune

__all__ = [
    "metrics",
    "reference",
    "scores",
    "lastlayer_terms",
    "cpu_capability",
    "LastLayerTerms",
    "TERM_NAMES",
    "persample_grad_norms",
    "PerSampleGradNorms",
    "persample_gradients",
    "PerSampleGradients",
    "GradientSubspace",
    "knn_score",
    "fit_class_gaussians",
    "mahalanobis_score",
    "ClassGaussians",
    "detectors",
    "OODHead",
    "export",
    "evaluate",
    "Evaluation",
    "tune",
    "TuneResult",
    "__version__",
]
