"""Temperature scaling ("On Calibration of Modern Neural Networks", Guo, Pleiss, Sun & Weinberger,
ICML 2017, arXiv:1706.04599) as an OOD detector: MSP at the temperature T that minimises the
negative log-likelihood of labelled held-out ID data (ID-high):

    T = argmin_T  (1/N) Σ_n [log Σ_j exp(f_nj / T) − f_n,y_n / T]
    score = max_j softmax(f / T)_j

The NLL is convex in β = 1/T (its second derivative is the mean variance of f under
softmax(β f)), so T is found exactly: the root of the derivative (1/N) Σ_n (E_softmax(βf_n)[f_n] −
f_n,y_n) by Newton steps on β kept inside a bisection bracket, in float64, to round-off — not by a
fixed number of optimiser steps (pytorch-ood runs 50 L-BFGS iterations at lr 0.01 from T = 1). A
fit is refused where no finite positive T minimises the NLL: when no fit sample is misclassified
(the NLL keeps falling as T → 0: fit on held-out data, not the training set) or when the labels are no better than uniform under every temperature (T → ∞). One forward per batch,
scored by the fused MSP kernel; exported by OODHead as MSP at the fitted T."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from gradood import model_io, scores
from gradood._checks import check_class_indices
from gradood.detectors._base import Data, Detector, fitted
from gradood.detectors._head import HeadName
from gradood.model_io import LogitsFn

_MAX_STEPS = 200


def _slope(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> Tuple[float, float]:
    """(dNLL/dβ, d²NLL/dβ²) at β: the means of E_p[f] − f_y and of Var_p(f), p = softmax(β f)."""
    p = torch.softmax(logits * beta, 1)
    mean = (p * logits).sum(1)
    variance = (p * (logits - mean[:, None]).square()).sum(1)
    return float((mean - logits.gather(1, labels[:, None]).squeeze(1)).mean()), float(variance.mean())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, where: str = "fit_temperature") -> float:
    """The NLL-minimising temperature of logits [N, C] (float64 inside) with labels [N]."""
    f, y = logits.double(), labels.long().to(logits.device)
    # The slope's limits: β → 0 gives mean_j f_j − f_y, β → ∞ the mean of the tied maxima − f_y.
    at_zero = float((f.mean(1) - f.gather(1, y[:, None]).squeeze(1)).mean())
    if at_zero >= 0.0:
        raise ValueError(
            f"{where}: the labels are no more likely than uniform at any temperature (the NLL falls as T → ∞); "
            "check the labels and the model"
        )
    top = f.amax(1, keepdim=True)
    tied = (f == top).double()
    at_infinity = float(((f * tied).sum(1) / tied.sum(1) - f.gather(1, y[:, None]).squeeze(1)).mean())
    if at_infinity <= 0.0:
        raise ValueError(
            f"{where}: no fit sample is misclassified (a label tied at the maximum counts as half right), so "
            "the NLL keeps falling as T → 0 and no temperature minimises it; fit on held-out ID data the "
            "model gets partly wrong"
        )
    low, high, beta = 0.0, math.inf, 1.0
    for _ in range(_MAX_STEPS):
        slope, curvature = _slope(f, y, beta)
        if slope < 0.0:
            low = beta
        elif slope > 0.0:
            high = beta
        else:
            return 1.0 / beta
        step = beta - slope / curvature if curvature > 0.0 else math.nan
        if not low < step < high:  # outside the bracket: bisect (geometrically while unbounded)
            step = beta * 2.0 if math.isinf(high) else (0.5 * (low + high) if low == 0.0 else math.sqrt(low * high))
        if abs(step - beta) <= 4 * torch.finfo(torch.float64).eps * beta:
            return 1.0 / step
        beta = step
    raise ValueError(
        f"{where}: the temperature did not converge in {_MAX_STEPS} steps (bracket [{low}, {high}] on 1/T)"
    )


class TemperatureScaling(Detector):
    uses_features = False
    fitted = ("temperature",)

    def __init__(self, model: nn.Module, head: Optional[HeadName] = None, logits: LogitsFn = None):
        super().__init__(model, head, logits)
        self.temperature: Optional[float] = None

    def fit(self, id_data: Data) -> TemperatureScaling:
        name = f"{type(self).__name__}.fit"
        all_logits, all_labels = [], []
        for inputs, labels in model_io.iterate(id_data):
            if labels is None:
                raise ValueError(
                    f"{name}: temperature scaling needs labelled ID data: pass batches of (inputs, labels)"
                )
            batch_logits = self.forward_features(inputs)[0]
            check_class_indices(name, "labels", labels)
            labels = labels.reshape(-1).to(batch_logits.device).long()
            classes = batch_logits.shape[1]
            if labels.shape[0] != batch_logits.shape[0] or (
                labels.numel() > 0 and (int(labels.min()) < 0 or int(labels.max()) >= classes)
            ):
                raise ValueError(
                    f"{name}: one label in [0, {classes}) per sample expected, got {labels.shape[0]} labels "
                    f"for {batch_logits.shape[0]} samples"
                )
            all_logits.append(batch_logits.to(torch.float64, copy=True))  # a model may reuse its output buffer
            all_labels.append(labels)
        if not all_logits or sum(f.shape[0] for f in all_logits) == 0:
            raise ValueError(f"{name}: the data holds no sample")
        f = torch.cat(all_logits)
        if not bool(torch.isfinite(f).all()):
            raise ValueError(f"{name}: the ID logits hold NaN or Inf")
        self.temperature = fit_temperature(f, torch.cat(all_labels), name)
        return self

    def lastlayer_spec(self, num_classes: int) -> scores.ScoreSpec:
        self._require_fitted()
        return scores.spec_msp(fitted(self.temperature))
