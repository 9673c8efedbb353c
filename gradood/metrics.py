"""OOD detection metrics, exact and in float64.

Conventions: scores are ID-scores (higher = more in-distribution) and ID is
the positive class unless a name says otherwise. Inputs are 1-D tensors,
arrays or sequences; they are converted to float64 NumPy arrays. ±inf are
ordinary (extreme) scores. NaN scores are never dropped silently: every
metric raises, giving their count. Empty inputs raise.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

__all__ = [
    "auroc",
    "fpr_at_95_tpr",
    "fpr_at_95_tpr_ood_positive",
    "aupr_in",
    "aupr_out",
    "detection_error",
    "bootstrap",
    "BootstrapResult",
]

Scores = Any  # torch.Tensor | np.ndarray | Sequence[float]


def _as_scores(where: str, name: str, scores: Scores) -> np.ndarray:
    # Complex scores are refused, not cast (the cast drops the imaginary part with a warning).
    if scores.is_complex() if isinstance(scores, torch.Tensor) else np.iscomplexobj(scores):
        raise TypeError(f"{where}: {name} must be real scores, got complex values")
    if isinstance(scores, torch.Tensor):
        array = scores.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        try:
            array = np.asarray(scores, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{where}: {name} must be a 1-D tensor or array of real scores ({error})") from error
    if array.ndim != 1:
        raise ValueError(f"{where}: {name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{where}: {name} is empty; a metric needs at least one score")
    nan_count = int(np.isnan(array).sum())
    if nan_count:
        raise ValueError(
            f"{where}: {name} contains {nan_count} NaN score(s) out of {array.size}; "
            "NaN scores are not dropped silently: fix or remove them first"
        )
    return array


def _pair(where: str, id_scores: Scores, ood_scores: Scores) -> tuple:
    return _as_scores(where, "id_scores", id_scores), _as_scores(where, "ood_scores", ood_scores)


def _rates_at(id_array: np.ndarray, ood_array: np.ndarray, thresholds: np.ndarray) -> tuple:
    """(TPR, FPR) at each threshold t: fractions of ID and of OOD scores >= t."""

    def at_or_above(scores: np.ndarray) -> np.ndarray:
        ordered = np.sort(scores)
        return (ordered.size - np.searchsorted(ordered, thresholds, side="left")) / ordered.size

    return at_or_above(id_array), at_or_above(ood_array)


def auroc(id_scores: Scores, ood_scores: Scores) -> float:
    """Area under the ROC curve: P(ID score > OOD score) + P(equal) / 2.

    The exact Mann–Whitney statistic, counted in integers (ties 1/2), divided
    once in float64. Symmetric in the choice of positive class.
    """
    id_array, ood_array = _pair("gradood.metrics.auroc", id_scores, ood_scores)
    ood_sorted = np.sort(ood_array)
    below = np.searchsorted(ood_sorted, id_array, side="left")  # OOD < id_i
    at_or_below = np.searchsorted(ood_sorted, id_array, side="right")  # OOD <= id_i
    twice_wins = int(below.sum(dtype=np.int64)) + int(at_or_below.sum(dtype=np.int64))
    return twice_wins / (2 * id_array.size * ood_array.size)


def _tpr_threshold(where: str, positives: np.ndarray, tpr: float) -> float:
    """The largest threshold t with fraction(positives >= t) >= tpr."""
    if not 0 < tpr <= 1:
        raise ValueError(f"{where}: tpr must be in (0, 1], got {tpr!r}")
    # ceil(tpr * n) in exact rational arithmetic: 0.95 * 100 is 95, not 96.
    needed = -((-positives.size * Fraction(tpr).limit_denominator(10**9)) // 1)
    kth_largest = positives.size - int(needed)
    return float(np.partition(positives, kth_largest)[kth_largest])


def fpr_at_95_tpr(id_scores: Scores, ood_scores: Scores, tpr: float = 0.95) -> float:
    """FPR at 95% TPR with ID as the positive class (ODIN, GradNorm, ReAct, RG papers).

    threshold = the largest score keeping at least 95% of ID samples at or
    above it (the ceil(0.95·n_ID)-th largest ID score); value = fraction of
    OOD samples at or above that threshold. Lower is better.
    """
    where = "gradood.metrics.fpr_at_95_tpr"
    id_array, ood_array = _pair(where, id_scores, ood_scores)
    threshold = _tpr_threshold(where, id_array, tpr)
    return float(np.count_nonzero(ood_array >= threshold)) / ood_array.size


def fpr_at_95_tpr_ood_positive(id_scores: Scores, ood_scores: Scores, tpr: float = 0.95) -> float:
    """FPR at 95% TPR with OOD as the positive class (OpenOOD, pytorch-ood).

    With outlier scores -s: threshold keeps at least 95% of OOD samples at or
    above it; value = fraction of ID samples flagged (at or above). Differs
    from `fpr_at_95_tpr` on the same data; never mix the two.
    """
    where = "gradood.metrics.fpr_at_95_tpr_ood_positive"
    id_array, ood_array = _pair(where, id_scores, ood_scores)
    threshold = _tpr_threshold(where, -ood_array, tpr)
    return float(np.count_nonzero(-id_array >= threshold)) / id_array.size


def _average_precision(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Step-wise average precision Σ_k (R_k - R_{k-1}) P_k over distinct thresholds."""
    scores = np.concatenate([positives, negatives])
    is_positive = np.concatenate([np.ones(positives.size, bool), np.zeros(negatives.size, bool)])
    order = np.argsort(-scores, kind="stable")
    scores, is_positive = scores[order], is_positive[order]
    # Last index of each group of equal scores (== keeps equal infinities together).
    group_ends = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))
    true_positives = np.cumsum(is_positive)[group_ends]
    predicted_positive = group_ends + 1
    precision = true_positives / predicted_positive
    recall_steps = np.diff(true_positives, prepend=0) / positives.size
    return float(np.sum(recall_steps * precision))


def aupr_in(id_scores: Scores, ood_scores: Scores) -> float:
    """Area under the precision–recall curve with ID positive (scores as given),
    as step-wise average precision."""
    id_array, ood_array = _pair("gradood.metrics.aupr_in", id_scores, ood_scores)
    return _average_precision(id_array, ood_array)


def aupr_out(id_scores: Scores, ood_scores: Scores) -> float:
    """Area under the precision–recall curve with OOD positive (scores negated),
    as step-wise average precision."""
    id_array, ood_array = _pair("gradood.metrics.aupr_out", id_scores, ood_scores)
    return _average_precision(-ood_array, -id_array)


def detection_error(id_scores: Scores, ood_scores: Scores) -> float:
    """Minimum over thresholds t of 0.5 · (1 - TPR(t)) + 0.5 · FPR(t) (ODIN),
    with TPR(t) = fraction of ID >= t and FPR(t) = fraction of OOD >= t; a
    threshold above every score gives 0.5."""
    id_array, ood_array = _pair("gradood.metrics.detection_error", id_scores, ood_scores)
    tpr, fpr = _rates_at(id_array, ood_array, np.unique(np.concatenate([id_array, ood_array])))
    return float(min(0.5, np.min(0.5 * (1 - tpr) + 0.5 * fpr)))


class BootstrapResult(NamedTuple):
    mean: float
    std: float


def bootstrap(
    metric: Callable[[np.ndarray, np.ndarray], float],
    id_scores: Scores,
    ood_scores: Scores,
    n: int = 100,
    seed: int = 0,
) -> BootstrapResult:
    """Mean and standard deviation (ddof=1) of `metric` over `n` bootstrap
    resamples, ID and OOD sets each resampled with replacement at their own
    size (GRODIN reports μ ± σ over 100 resamples). Reproducible per seed."""
    where = "gradood.metrics.bootstrap"
    if not callable(metric):
        raise TypeError(f"{where}: metric must be callable (id_scores, ood_scores) -> float, got {metric!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"{where}: n must be an integer >= 2, got {n!r}")
    id_array, ood_array = _pair(where, id_scores, ood_scores)
    rng = np.random.default_rng(seed)
    values = np.empty(n)
    for i in range(n):
        id_sample = id_array[rng.integers(0, id_array.size, id_array.size)]
        ood_sample = ood_array[rng.integers(0, ood_array.size, ood_array.size)]
        values[i] = metric(id_sample, ood_sample)
    return BootstrapResult(float(values.mean()), float(values.std(ddof=1)))
