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

‖w_ŷ − w_c‖ comes from float64 Gram rows, ‖w_ŷ‖² + ‖w_c‖² − 2 w_ŷ·w_c, recomputed from the
differences themselves for a pair whose distance is below 1e-4 of the norms (where the Gram form
cancels); their inverses, C × C in the logits' precision (float32, or float64 for float64), are
cached for C ≤ 4096, otherwise the rows of each batch's predicted classes are built per batch. The
sum over classes runs over the logit gaps (all ≥ 0: no cancellation) times those inverses, in
float32 for float32 logits. Two classes with
identical weights have no boundary distance: a sample predicted as one of them raises. A sample
whose logits all tie (on every boundary) scores 0; one at the mean ID feature, +inf; one with a
+inf maximum or a −inf logit (infinitely far from a boundary), +inf; two +inf maxima, NaN logits
or features, NaN. Rows whose gaps, class sum or ‖v − μ‖² overflow the float range (float32 logits
or features past ~1e19) are scored again in float64 from inputs scaled by their largest entry. One forward, plus the mean ID feature streamed over the fit data in float64."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from gradood._checks import check_choice, check_features
from gradood._ops import TERM_NAMES, cpu_capability
from gradood.detectors._base import Data, Detector, fitted
from gradood.detectors._head import HeadName, derived_from_weight
from gradood.model_io import LogitsFn

NORMALIZERS = ("distance", "norm")
_MAX_LOGIT = TERM_NAMES.index("max_logit")

#: Classes up to which the C × C inverse boundary norms are cached (64 MB of float32 at 4096).
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
        mean = self.mean_id_features(id_data)
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
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        f = logits.to(acc)
        top, predicted = _max_and_index(f)
        inverse = self._inverse_rows(weight, predicted, acc)  # [B, C]: 1/‖w_ŷ − w_c‖, 0 at c = ŷ
        gaps = top[:, None] - f  # >= 0; 0 at ŷ
        # ŷ's own gap is 0 by definition (top − top is NaN for a +inf logit, and 0 · NaN is NaN).
        gaps.scatter_(1, predicted[:, None].to(gaps.device), 0.0)
        # Σ_c gap_c / ‖w_ŷ − w_c‖ (every term >= 0: no cancellation), then the mean over the
        # C − 1 other classes. A NaN logit is the row's max (torch.max propagates it), so its
        # gaps and score are NaN; a NaN feature makes the spread NaN.
        mean_distance = (gaps * inverse).sum(1) / (classes - 1)
        mean = fitted(self.mean_features) if self.normalizer == "distance" else None
        v = features.to(acc)
        if mean is not None:
            v = v - mean.to(device=v.device, dtype=acc)
        spread = torch.linalg.vector_norm(v, dim=1)
        tied = (mean_distance == 0) & ~spread.isnan()  # on every boundary at once: 0, even at v = μ
        score = torch.where(tied, torch.zeros_like(mean_distance), mean_distance / spread)
        overflowed = ~(torch.isfinite(mean_distance) & torch.isfinite(spread))
        if bool(overflowed.any()):
            # A gap, the class sum or ‖v − μ‖² past the float range although the inputs may be
            # finite (logits or features beyond ~1e19 in float32): those rows again, scaled; rows
            # with non-finite inputs keep the result above (NaN, or +inf for an infinite gap).
            rows = overflowed.nonzero().squeeze(1)
            exact = _scaled_rows(logits[rows], features[rows], inverse[rows], mean, predicted[rows])
            redo = ~exact.isnan()
            score[rows[redo]] = exact[redo].to(score.dtype)
        return score

    def _inverse_rows(self, weight: torch.Tensor, predicted: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """1 / ‖w_ŷ − w_c‖ for each sample's predicted class ŷ [B, C] in `dtype` (0 at c = ŷ);
        raises where two classes, one of them predicted, have identical weights."""
        classes = weight.shape[0]
        if classes <= _CACHED_CLASSES:
            table, twins = derived_from_weight(
                self, "_boundary_cache", weight, lambda: _inverse_norms(weight, torch.arange(classes), dtype), dtype
            )
            if twins:
                _refuse_twins(type(self).__name__, table.index_select(0, predicted), predicted)
            return table.index_select(0, predicted.to(table.device))
        unique, position = torch.unique(predicted, return_inverse=True)
        rows, _ = _inverse_norms(weight, unique, dtype)
        rows = rows[position]
        _refuse_twins(type(self).__name__, rows, predicted)
        return rows


def _max_and_index(f: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each row's max and its first index. At the AVX2 and AVX-512 levels by the fused last-layer
    kernel, whose max pass finds both (B = 1024, C = 1000: 0.19-0.27 ms against 0.33-0.58 for
    torch.max(dim), ATen's indexed reductions being slow); torch.max at DEFAULT (where the kernel's
    other terms cost more: 1.0 ms against 0.6), where the logits are differentiated and on other
    devices."""
    fast = f.device.type == "cpu" and not torch.compiler.is_compiling() and cpu_capability() in ("AVX2", "AVX512")
    if fast and not (torch.is_grad_enabled() and f.requires_grad):
        terms, index = torch.ops.gradood.lastlayer_terms(f, None, 1.0, math.inf)
        return terms[:, _MAX_LOGIT].to(f.dtype), index
    values, index = f.max(1)
    return values, index


def _scaled_rows(
    logits: torch.Tensor, features: torch.Tensor, inverse: torch.Tensor, mean: Optional[torch.Tensor], predicted
) -> torch.Tensor:
    """The score of each row in float64 with the logits and the features divided by their row's
    largest magnitude first, so that neither the gaps, the class sum nor the squares overflow;
    NaN for rows whose inputs are not all finite."""
    tiny = torch.finfo(torch.float64).tiny
    f = logits.double()
    v = features.double() if mean is None else features.double() - mean.to(device=features.device)
    index = predicted[:, None].to(f.device)
    f_scale = f.abs().amax(1, keepdim=True).clamp_min(tiny)
    gaps = (f / f_scale).gather(1, index) - f / f_scale  # in [0, 2]
    gaps.scatter_(1, index, 0.0)
    v_scale = v.abs().amax(1, keepdim=True).clamp_min(tiny)
    # (Σ_c gap_c · inverse_c / (C − 1)) · f_scale / (‖v / v_scale‖ · v_scale), scales last
    ratio = (gaps * inverse.double()).sum(1) / (f.shape[1] - 1) / torch.linalg.vector_norm(v / v_scale, dim=1)
    score = ratio * (f_scale.squeeze(1) / v_scale.squeeze(1))
    score = torch.where(ratio == 0, torch.zeros_like(score), score)  # tied on every boundary
    finite = torch.isfinite(f).all(1) & torch.isfinite(v).all(1)
    return torch.where(finite, score, torch.full_like(score, math.nan))


def _inverse_norms(weight: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, bool]:
    """(1 / ‖w_r − w_c‖ [R, C] in `dtype`, 0 at c = r and inf for identical rows; whether any
    two distinct classes have identical weights)."""
    rows = rows.to(weight.device)
    norms = boundary_norms(weight, rows)
    own = torch.zeros_like(norms, dtype=torch.bool)
    own[torch.arange(rows.numel(), device=rows.device), rows] = True
    twins = bool(((norms == 0) & ~own).any())
    inverse = torch.where(own, torch.zeros_like(norms), 1.0 / norms)
    return inverse.to(dtype), twins


def _refuse_twins(name: str, inverse: torch.Tensor, predicted: torch.Tensor) -> None:
    infinite = torch.isinf(inverse)
    if bool(infinite.any()):
        row, c = (int(i) for i in infinite.nonzero()[0])
        raise ValueError(
            f"{name}.score_features: classes {int(predicted[row])} and {c} have identical weights in the head, so "
            f"the distance to their decision boundary is undefined (sample {row} is predicted as "
            f"{int(predicted[row])})"
        )
