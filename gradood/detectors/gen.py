"""GEN, the generalized entropy of the softmax ("GEN: Pushing the Limits of
Softmax-Based Out-of-Distribution Detection", Liu, Lochman & Zach, CVPR 2023):

    score = −Σ_{j ∈ top-M} p_j^γ (1 − p_j)^γ        ID-high

over the M largest probabilities (γ = 0.1, M = 100 by default, as the paper; M is
capped at C). In float64, with 1 − p_max from the other classes' mass (not 1 minus a
rounded p_max), so that confident rows keep their order. One forward, no fitting."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from gradood._checks import check_logits
from gradood.detectors._base import Detector
from gradood.detectors._head import HeadName
from gradood.model_io import LogitsFn


def generalized_entropy_score(logits: torch.Tensor, gamma: float = 0.1, top: int = 100) -> torch.Tensor:
    """−Σ_{top-M} p^γ (1 − p)^γ [B] of logits [B, C], float64."""
    check_logits("gradood.detectors.gen", logits)
    f = logits.double()
    shifted = f - f.amax(1, keepdim=True)
    exps = shifted.exp()  # the max's is 1
    argmax = f.argmax(1, keepdim=True)
    others = exps.scatter(1, argmax, 0.0).sum(1, keepdim=True)  # Σ_{j ≠ argmax} e_j
    total = 1.0 + others
    p = exps / total
    complement = (1.0 - p).scatter(1, argmax, others / total)  # 1 − p_max = others / (1 + others)
    values = p.pow(gamma) * complement.pow(gamma)
    m = min(top, f.shape[1])
    chosen = p.topk(m, dim=1).indices
    score = -values.gather(1, chosen).sum(1)
    broken = (torch.isnan(f) | (f == math.inf)).any(1)  # NaN or +inf logits: no softmax
    return torch.where(broken, torch.full_like(score, math.nan), score)


class GEN(Detector):
    uses_features = False

    def __init__(
        self,
        model: nn.Module,
        gamma: float = 0.1,
        top: int = 100,
        head: Optional[HeadName] = None,
        logits: LogitsFn = None,
    ):
        super().__init__(model, head, logits)
        name = type(self).__name__
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not math.isfinite(gamma) or gamma <= 0:
            raise ValueError(f"{name}: gamma must be a finite number > 0, got {gamma!r}")
        if not isinstance(top, int) or isinstance(top, bool) or top < 1:
            raise ValueError(f"{name}: top must be an integer ≥ 1, got {top!r}")
        self.gamma, self.top = float(gamma), top

    def score_features(self, logits, features=None):
        return generalized_entropy_score(logits, self.gamma, self.top)
