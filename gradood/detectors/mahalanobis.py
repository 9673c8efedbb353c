"""Mahalanobis on the penultimate features ("A Simple Unified Framework for Detecting
Out-of-Distribution Samples and Adversarial Attacks", Lee, Lee, Lee & Shin, NeurIPS 2018,
arXiv:1807.03888), in the feature-only form OpenOOD and pytorch-ood evaluate (no input
pre-processing, no layer ensemble):

    score = −min_c (v − μ_c)ᵀ Σ⁻¹ (v − μ_c)          ID-high

with class means μ_c and the shared covariance Σ of the ID features, classes from the
fit data's labels (or the model's predictions: classes="predicted"). relative=True is
the Relative Mahalanobis distance ("A Simple Fix to Mahalanobis Distance for Improving
Near-OOD Detection", Ren et al., 2021, arXiv:2106.09022): each class distance minus the
distance under one Gaussian of all ID features, score = −min_c (d_c(v) − d_0(v)).

Fitted and scored in float64 by gradood.mahalanobis (Cholesky solves, never an explicit
inverse; a singular covariance — dead ReLU units, or fewer ID samples than feature
dimensions plus classes — is an error, or with singular="pseudo-inverse" the distance
within the span of the ID covariance, as scikit-learn's EmpiricalCovariance). One forward per batch plus two D×D triangular solves per row."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from gradood import model_io
from gradood._checks import check_choice, check_class_indices, check_features
from gradood.detectors._base import Data, Detector, fitted
from gradood.detectors._head import HeadName
from gradood.mahalanobis import SINGULAR, ClassGaussians, fit_class_gaussians, mahalanobis_score
from gradood.model_io import LogitsFn


class Mahalanobis(Detector):
    fitted = ("gaussians", "background")

    def __init__(
        self,
        model: nn.Module,
        classes: str = "labels",
        relative: bool = False,
        singular: str = "error",
        head: Optional[HeadName] = None,
        logits: LogitsFn = None,
    ):
        super().__init__(model, head, logits)
        self.classes = check_choice(type(self).__name__, "classes", classes, ("labels", "predicted"))
        if not isinstance(relative, bool):
            raise ValueError(f"{type(self).__name__}: relative must be True or False, got {relative!r}")
        self.relative = relative
        self.singular = check_choice(type(self).__name__, "singular", singular, SINGULAR)
        self.gaussians: Optional[dict] = None
        self.background: Optional[dict] = None

    def fit(self, id_data: Data) -> Mahalanobis:
        name = type(self).__name__
        features, targets = [], []
        for inputs, labels in model_io.iterate(id_data):
            logits, batch_features = self.forward_features(inputs)
            features.append(batch_features.clone())  # a model may reuse its feature buffer between batches
            if self.classes == "predicted":
                targets.append(logits.argmax(1))
            elif labels is None:
                raise ValueError(
                    f"{name}.fit: the fit data give no labels: pass batches of (inputs, labels), or "
                    "classes='predicted' (the model's predicted classes)"
                )
            else:
                check_class_indices(f"{name}.fit", "labels", labels)
                targets.append(labels.reshape(-1).to(logits.device).long())
        if not features:
            raise ValueError(f"{name}.fit: the data holds no batch")
        v, y = torch.cat(features), torch.cat(targets)
        if y.shape[0] != v.shape[0]:
            raise ValueError(f"{name}.fit: one label per sample expected, got {y.shape[0]} for {v.shape[0]} samples")
        self.gaussians = fit_class_gaussians(v, y, f"{name}.fit", self.singular)._asdict()
        self.background = (
            fit_class_gaussians(
                v, torch.zeros_like(y), f"{name}.fit (the background Gaussian)", self.singular
            )._asdict()
            if self.relative
            else {}
        )
        return self

    def score_features(self, logits, features):
        self._require_fitted()
        check_features(f"{type(self).__name__}.score_features", features, logits)
        score = mahalanobis_score(features, ClassGaussians(**fitted(self.gaussians)))
        if self.relative:
            score = score - mahalanobis_score(features, ClassGaussians(**fitted(self.background)))
        return score

    def to(self, device) -> Mahalanobis:
        for name in ("gaussians", "background"):
            value = getattr(self, name)
            if value:
                setattr(self, name, {k: None if t is None else t.to(device) for k, t in value.items()})
        return self
