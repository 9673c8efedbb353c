"""Entropy: Σ_j p_j log p_j, minus the Shannon entropy of the softmax (ID-high: a
confident ID prediction has low entropy). The baseline of "A Baseline for Detecting
Misclassified and Out-of-Distribution Examples in Neural Networks" (Hendrycks &
Gimpel, ICLR 2017, arXiv:1610.02136) and OpenOOD's/pytorch-ood's Entropy, sign
flipped to ID-high. From log-softmax in float64 (p log p = 0 for p = 0, a −inf
logit included; a NaN logit gives NaN). One forward, no fitting."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from gradood._checks import check_logits
from gradood.detectors._base import Detector
from gradood.detectors._head import HeadName
from gradood.model_io import LogitsFn


def negative_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Σ_j p_j log p_j [B] of logits [B, C], float64."""
    check_logits("gradood.detectors.entropy", logits)
    log_p = torch.log_softmax(logits.double(), dim=1)
    terms = torch.where(log_p == -torch.inf, torch.zeros_like(log_p), log_p.exp() * log_p)
    return terms.sum(1)


class Entropy(Detector):
    uses_features = False

    def __init__(self, model: nn.Module, head: Optional[HeadName] = None, logits: LogitsFn = None):
        super().__init__(model, head, logits)

    def score_features(self, logits, features=None):
        return negative_entropy(logits)
