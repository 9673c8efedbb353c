"""fDBD, the fast decision-boundary detector ("Fast Decision Boundary based Out-of-Distribution
Detector", Liu & Qin, ICML 2024, arXiv:2312.11536): a sample's mean distance, in the feature
space, to the decision boundaries between its predicted class and each other class, over its
distance to the mean ID feature (ID-high: in-distribution samples lie far from the boundaries
for how far they are from the ID mean):

    score = (1 / (C − 1)) Σ_{c≠ŷ} (f_ŷ − f_c) / ‖w_ŷ − w_c‖₂  /  ‖v − μ‖₂

with f = W v + b the head, ŷ = argmax_j f_j (the lowest index among tied maxima) and μ the mean
ID feature; (f_ŷ − f_c)/‖w_ŷ − w_c‖ is exactly the Euclidean distance from v to the hyperplane
where classes ŷ and c tie. normalizer="norm" divides by ‖v‖₂ instead (OpenOOD's alternative, which
it picks on validation data). OpenOOD's code sums over the classes without the 1/(C − 1) factor:
its scores are C − 1 times these (the same ranking).

The logit gaps are taken in float64 from the logits; ‖w_ŷ − w_c‖ comes from float64 Gram rows,
‖w_ŷ‖² + ‖w_c‖² − 2 w_ŷ·w_c, recomputed from the differences themselves for a pair whose distance
is below 1e-4 of the norms (where the Gram form cancels); C × C of them are cached for C ≤ 4096,
otherwise the rows of each batch's predicted classes are built per batch. Two classes with
identical weights have no boundary distance: a sample predicted as one of them raises. A sample
whose logits all tie (on every boundary) scores 0; one at the mean ID feature, +inf; NaN logits
or features, NaN. One forward, plus the mean ID feature streamed over the fit data in float64."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from gradood._checks import check_choice, check_features
from gradood.detectors._base import Data, Detector, fitted, iterate_inputs
from gradood.detectors._head import HeadName, derived_from_weight
from gradood.model_io import LogitsFn

NORMALIZERS = ("distance", "norm")

#: Classes up to which the C × C boundary norms are cached (128 MB of float64 at 4096).
_CACHED_CLASSES = 4096


def boundary_norms(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """‖w_r − w_c‖₂ for the classes r in `rows` [R] and every class c: [R, C], float64."""
    w = weight.detach().double()
    picked = w[rows]
    squares = w.square().sum(1)
    gram = squares[rows][:, None] + squares[None, :] - 2 * picked @ w.T
    close = gram < 1e-8 * (squares[rows][:, None] + squares[None, :])  # distance < 1e-4 of the norms
    if bool(close.any()):
        r, c = close.nonzero(as_tuple=True)
        gram[r, c] = (picked[r] - w[c]).square().sum(1)
    return gram.clamp_min(0).sqrt()


class FDBD(Detector):
    fitted = ("mean_features",)

    def __init__(
        self,
        model: nn.Module,
        normalizer: str = "distance",
        head: Optional[HeadName] = None,
        logits: LogitsFn = None,
    ):
        super().__init__(model, head, logits)
        self.normalizer = check_choice(type(self).__name__, "normalizer", normalizer, NORMALIZERS)
        self.mean_features: Optional[torch.Tensor] = None  # μ [D], float64

    def fit(self, id_data: Data) -> FDBD:
        name = f"{type(self).__name__}.fit"
        total: Optional[torch.Tensor] = None
        count = 0
        for inputs in iterate_inputs(id_data):
            features = self.forward_features(inputs)[1]
            batch_sum = features.double().sum(0)
            total = batch_sum if total is None else total + batch_sum
            count += features.shape[0]
        if total is None or count == 0:
            raise ValueError(f"{name}: the data holds no sample")
        mean = total / count
        if not bool(torch.isfinite(mean).all()):
            raise ValueError(f"{name}: the ID features hold NaN or Inf")
        self.mean_features = mean
        return self

    def score_features(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        where = f"{type(self).__name__}.score_features"
        if self.normalizer == "distance":
            self._require_fitted()
        check_features(where, features, logits)
        weight, _ = self.head_weight_bias()
        classes = weight.shape[0]
        if tuple(logits.shape[1:]) != (classes,) or weight.shape[1] != features.shape[1]:
            raise ValueError(
                f"{where}: logits [B, {classes}] and features [B, {weight.shape[1]}] expected (the head's), got "
                f"{tuple(logits.shape)} and {tuple(features.shape)}"
            )
        if classes < 2:
            raise ValueError(f"{where}: fDBD needs at least two classes (a decision boundary), got {classes}")
        f = logits.double()
        top, predicted = f.max(1)  # the first maximal index
        norms = self._norm_rows(weight, predicted)  # [B, C]: ‖w_ŷ − w_c‖
        gaps = top[:, None] - f
        others = torch.ones_like(gaps, dtype=torch.bool).scatter_(1, predicted[:, None], False)
        degenerate = others & (norms == 0)
        if bool(degenerate.any()):
            row, c = (int(i) for i in degenerate.nonzero()[0])
            raise ValueError(
                f"{where}: classes {int(predicted[row])} and {c} have identical weights in the head, so the "
                f"distance to their decision boundary is undefined (sample {row} is predicted as {int(predicted[row])})"
            )
        distances = torch.where(
            others, gaps / torch.where(others, norms, torch.ones_like(norms)), torch.zeros_like(gaps)
        )
        mean_distance = distances.sum(1) / (classes - 1)
        v = features.double()
        if self.normalizer == "distance":
            v = v - fitted(self.mean_features).to(v.device)
        spread = torch.linalg.vector_norm(v, dim=1)
        score = torch.where(mean_distance == 0, torch.zeros_like(mean_distance), mean_distance / spread)
        bad = logits.isnan().any(1) | features.isnan().any(1)
        score = torch.where(bad, torch.full_like(score, math.nan), score)
        return score.to(torch.float64 if features.dtype == torch.float64 else torch.float32)

    def _norm_rows(self, weight: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        classes = weight.shape[0]
        if classes <= _CACHED_CLASSES:
            table = derived_from_weight(
                self,
                "_boundary_cache",
                weight,
                lambda: boundary_norms(weight, torch.arange(classes, device=weight.device)),
            )
            return table[predicted]
        unique, inverse = torch.unique(predicted, return_inverse=True)
        return boundary_norms(weight, unique)[inverse]
