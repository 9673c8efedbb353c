"""SCALE ("Scaling for Training Time and Post-hoc Out-of-distribution Detection Enhancement",
Xu, Chen, Franchi & Yao, ICLR 2024, arXiv:2310.00227): ASH-S's scale without its pruning. The
penultimate features v [B, D] of each sample, all of them, are multiplied by exp(s₁ / s₂),
s₁ = Σ_i v_i and s₂ the sum of its k = D − round(D · p / 100) largest entries (ties at the
threshold: the lowest indices), and the score is the energy of the head on them (ID-high):

    score = log Σ_j exp(exp(s₁ / s₂) · (W v)_j + b_j)

p = 85 by default (OpenOOD's setting). Numerics and degenerate rows as ASH's
(gradood.detectors.ash): an all-zero row has logits b; s₂ = 0 otherwise gives NaN, as does a
NaN feature. One forward, no fit."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from gradood.detectors._base import Detector
from gradood.detectors._head import HeadName
from gradood.detectors.ash import _check_percentile, shaped_energy
from gradood.model_io import LogitsFn


def scale_energy(
    features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], percentile: float = 85.0
) -> torch.Tensor:
    """SCALE's ID-score [B] of penultimate features [B, D] and a head (W [C, D], b [C] or None)."""
    return shaped_energy(features, weight, bias, "scale", percentile, "gradood.detectors.scale")


class SCALE(Detector):
    def __init__(
        self,
        model: nn.Module,
        percentile: float = 85.0,
        head: Optional[HeadName] = None,
        logits: LogitsFn = None,
    ):
        super().__init__(model, head, logits)
        self.percentile = _check_percentile(type(self).__name__, percentile)

    def score_features(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        weight, bias = self.head_weight_bias()
        return scale_energy(features, weight, bias, self.percentile)
