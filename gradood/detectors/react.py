"""ReAct (Sun et al. 2021): log Σ_j exp((W min(v, c) + b)_j), the energy of logits
recomputed from features clipped at c, the `percentile`-th percentile (90 by
default) of ID activations, fitted on ID data. ID-high."""

from __future__ import annotations

from typing import Optional

from torch import nn

from gradood import scores
from gradood.detectors._base import Data, Detector
from gradood.detectors._head import HeadName
from gradood.detectors.rg import activation_percentile
from gradood.model_io import LogitsFn


class ReAct(Detector):
    fitted = ("clip",)

    def __init__(
        self,
        model: nn.Module,
        percentile: float = 90.0,
        clip: Optional[float] = None,
        head: Optional[HeadName] = None,
        logits: LogitsFn = None,
    ):
        super().__init__(model, head, logits)
        self.percentile = percentile
        self.clip = clip

    def fit(self, id_data: Data) -> ReAct:
        self.clip = activation_percentile(self.collect(id_data)[1], self.percentile, f"{type(self).__name__}.fit")
        return self

    def score_features(self, logits, features):
        self._require_fitted()
        weight, bias = self.head_weight_bias()
        return scores.react(
            features, weight.to(features.dtype), None if bias is None else bias.to(features.dtype), self.clip
        )
