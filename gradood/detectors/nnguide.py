"""NNGuide, nearest-neighbour guidance ("Nearest Neighbor Guidance for Out-of-Distribution
Detection", Park, Jung & Teoh, ICCV 2023, arXiv:2309.14888): the energy score scaled by how close
the sample's normalised feature lies to the ID bank, each bank row weighted by its own energy
(ID-high: a confident sample near confident ID samples scores high):

    score = E(x) · (1/k) Σ_{i ∈ top-k} v̂ · (E(x_i) v̂_i),   E = log Σ_j exp f_j,  v̂ = v / ‖v‖₂

the k largest inner products of v̂ with the bank rows E(x_i) v̂_i of the fit samples. The paper
and OpenOOD take k = 100 and a bank of 1% of the ImageNet training set (OpenOOD's `alpha`; give
that subset, or max_samples). OpenOOD normalises by x / ‖x‖ + 1e-10 (the constant added to every
entry), gradood by x / (‖x‖ + 1e-10), as its KNN: a difference of ~1e-10 per entry. The energy
is not clipped at 0: where E < 0 (every logit far below 0) the sign of the product flips, as in
the paper's formula. Exact top-k over the whole bank by blocked GEMMs (OpenOOD: faiss's exact
IndexFlatIP, the same values). One forward, plus B × N × D for the inner products."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from gradood import scores
from gradood._checks import check_counts, check_features
from gradood.detectors._base import Data, Detector, fitted
from gradood.detectors._head import HeadName
from gradood.knn import largest_inner_products, normalise_rows
from gradood.model_io import LogitsFn


class NNGuide(Detector):
    fitted = ("bank",)

    def __init__(
        self,
        model: nn.Module,
        neighbours: int = 100,
        max_samples: Optional[int] = None,
        head: Optional[HeadName] = None,
        logits: LogitsFn = None,
    ):
        super().__init__(model, head, logits)
        name = type(self).__name__
        check_counts(name, neighbours=neighbours, max_samples=max_samples)
        self.neighbours, self.max_samples = neighbours, max_samples
        self.bank: Optional[torch.Tensor] = None  # [N, D]: E(x_i) v̂_i

    def fit(self, id_data: Data) -> NNGuide:
        name = type(self).__name__
        rows = []
        for logits, features in self.first_samples(id_data, self.max_samples):
            dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
            energy = scores.energy(logits.to(dtype))
            rows.append(normalise_rows(features.to(dtype)) * energy[:, None].to(dtype))
        seen = sum(row.shape[0] for row in rows)
        if seen < self.neighbours:
            raise ValueError(
                f"{name}.fit: neighbours={self.neighbours} needs at least that many fit samples, got {seen}"
            )
        bank = torch.cat(rows)
        if not bool(torch.isfinite(bank).all()):
            raise ValueError(f"{name}.fit: the ID features or logits hold NaN or Inf")
        self.bank = bank
        return self

    def score_features(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        self._require_fitted()
        check_features(f"{type(self).__name__}.score_features", features, logits)
        bank = fitted(self.bank)
        dtype = torch.float64 if torch.float64 in (features.dtype, bank.dtype) else torch.float32
        queries = normalise_rows(features.to(dtype))
        guidance = largest_inner_products(queries, bank.to(device=queries.device), self.neighbours).mean(1)
        # A NaN or infinite feature makes its whole normalised row NaN, so all its products and
        # its score are NaN (top-k keeps NaN).
        return scores.energy(logits.to(dtype)) * guidance
