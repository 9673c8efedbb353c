"""RG, Reactivate GradNorm
("RG: Out-of-Distribution Detection with Reactivate GradNorm" (anonymous, under review, OpenReview)), both variants. ID-high.

RG:          T · log Σ_j exp(f_j / T) · Σ_i min(|v_i|, k)                 (eq. 8)
RGAdditive:  log Σ_j exp(f_j) + a · α_s · Σ_i min(|v_i|, k)              (eq. 12)
             α_s = std_ID[log Σ exp f] / std_ID[Σ min(v_i, k)], fitted on ID data

k = clip, or, when `percentile` is given, that percentile of the flattened ID
penultimate activations (fitted, like ReAct's threshold).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from gradood import scores
from gradood.detectors._base import Data, Detector, fitted
from gradood.detectors._head import HeadName
from gradood.model_io import LogitsFn


def check_percentile(where: str, percentile: Optional[float]) -> None:
    if percentile is None:
        return
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 <= percentile <= 100:
        raise ValueError(f"{where}: percentile must be a number in [0, 100], got {percentile!r}")


def numpy_percentile(values: torch.Tensor, percentile: float) -> float:
    """np.percentile of every entry (linear interpolation), by numpy itself on a float64 copy:
    the official codes' threshold to the last bit (the textbook position formula differs)."""
    return float(np.percentile(values.detach().double().cpu().numpy(), percentile))


def activation_percentile(features: torch.Tensor, percentile: float, where: str = "fit") -> float:
    """The `percentile`-th percentile of all activations (numpy's linear interpolation, as ReAct).
    A clip that is not > 0 (sparse ReLU features, mostly zeros) is refused here, at fit
    time, rather than by every later score."""
    values = features.detach().flatten().double().cpu().numpy()
    clip = float(np.percentile(values, percentile))
    if not clip > 0:
        share = float((values <= 0).mean()) if values.size else 1.0
        raise ValueError(
            f"{where}: the {percentile}th percentile of the ID features is {clip} ({share:.1%} of them are ≤ 0, as "
            "sparse ReLU features are), so the clip would zero every feature; choose a percentile above "
            f"{100 * share:.1f}, or pass clip="
        )
    return clip


class RG(Detector):
    fitted = ("clip",)

    def __init__(
        self,
        model: nn.Module,
        clip: float = 1.0,
        temperature: float = 1.0,
        percentile: Optional[float] = None,
        head: Optional[HeadName] = None,
        logits: LogitsFn = None,
    ):
        super().__init__(model, head, logits)
        check_percentile(type(self).__name__, percentile)
        # With a percentile the clip is fitted: scoring before fit is an error, not clip=1.
        self.clip = None if percentile is not None else clip
        self.temperature, self.percentile = temperature, percentile

    def fit(self, id_data: Data) -> RG:
        if self.percentile is not None:
            self.clip = activation_percentile(self.collect(id_data)[1], self.percentile, f"{type(self).__name__}.fit")
        return self

    def lastlayer_spec(self, num_classes: int) -> scores.ScoreSpec:
        self._require_fitted()
        return scores.spec_rg(fitted(self.clip), self.temperature)


class RGAdditive(Detector):
    fitted = ("clip", "alpha")

    def __init__(
        self,
        model: nn.Module,
        clip: float = 1.0,
        a: float = 0.6,
        percentile: Optional[float] = None,
        head: Optional[HeadName] = None,
        logits: LogitsFn = None,
    ):
        super().__init__(model, head, logits)
        check_percentile(type(self).__name__, percentile)
        self.clip, self.a, self.percentile = clip, a, percentile
        self.alpha: Optional[float] = None

    def fit(self, id_data: Data) -> RGAdditive:
        logits, features = self.collect(id_data)
        if self.percentile is not None:
            self.clip = activation_percentile(features, self.percentile, f"{type(self).__name__}.fit")
        energy = torch.logsumexp(logits.double(), dim=1)
        clipped = features.double().abs().clamp_max(self.clip).sum(1)
        alpha_s = float(energy.std() / clipped.std())
        if not np.isfinite(alpha_s):
            raise ValueError("RGAdditive.fit: the ID data give a zero or undefined spread; use more than one sample")
        self.alpha = self.a * alpha_s
        return self

    def lastlayer_spec(self, num_classes: int) -> scores.ScoreSpec:
        self._require_fitted()
        return scores.spec_rg_additive(fitted(self.clip), fitted(self.alpha))
