"""KNN on the penultimate features ("Out-of-Distribution Detection with Deep Nearest
Neighbors", Sun, Ming, Zhu & Li, ICML 2022, arXiv:2204.06507):

    score = −‖v̂ − b̂_(k)‖²,  v̂ = v / ‖v‖          ID-high

minus the squared distance of the L2-normalised feature to its k-th nearest
normalised ID feature (k = 50, the paper's CIFAR-10 setting; 1000 with a 1% bank for
ImageNet), exact: gradood.knn scans the whole bank in blocks of one GEMM each with a
running top-k (faiss IndexFlatL2's distances, without faiss). Fitted on every fit sample
(or the first max_samples). One forward per batch plus B × N × D for the distances."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from gradood._checks import check_counts, check_features
from gradood.detectors._base import Data, Detector, fitted
from gradood.detectors._head import HeadName
from gradood.knn import METRICS, knn_score, normalise_rows
from gradood.model_io import LogitsFn


class KNN(Detector):
    fitted = ("bank",)

    def __init__(
        self,
        model: nn.Module,
        neighbours: int = 50,
        metric: str = "squared_l2",
        max_samples: Optional[int] = None,
        head: Optional[HeadName] = None,
        logits: LogitsFn = None,
    ):
        super().__init__(model, head, logits)
        name = type(self).__name__
        check_counts(name, neighbours=neighbours, max_samples=max_samples)
        if metric not in METRICS:
            raise ValueError(f"{name}: metric must be one of {METRICS}, got {metric!r}")
        self.neighbours, self.metric, self.max_samples = neighbours, metric, max_samples
        self.bank: Optional[torch.Tensor] = None

    def fit(self, id_data: Data) -> KNN:
        name = type(self).__name__
        rows = [
            normalise_rows(features.float() if features.dtype != torch.float64 else features)
            for _, features in self.first_samples(id_data, self.max_samples)
        ]
        seen = sum(row.shape[0] for row in rows)
        if seen < self.neighbours:
            raise ValueError(
                f"{name}.fit: neighbours={self.neighbours} needs at least that many fit samples, got {seen}"
            )
        bank = torch.cat(rows)
        if not bool(torch.isfinite(bank).all()):
            raise ValueError(f"{name}.fit: the ID features hold NaN or Inf")
        self.bank = bank
        return self

    def score_features(self, logits, features):
        self._require_fitted()
        check_features(f"{type(self).__name__}.score_features", features, logits)
        bank = fitted(self.bank)
        return knn_score(features, bank.to(features.device), self.neighbours, self.metric)
