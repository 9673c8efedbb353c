"""ExGrad (Igoe et al. 2022): −(2/T) Σ_j p_j (1 − p_j) · ‖v‖_1, the negated expected
last-layer gradient L1 norm with labels drawn from the prediction. ID-high."""

from __future__ import annotations

from typing import Optional

from torch import nn

from gradood import scores
from gradood.detectors._base import Detector


class ExGrad(Detector):
    def __init__(self, model: nn.Module, temperature: float = 1.0, head: Optional[str] = None):
        super().__init__(model, head)
        self.temperature = temperature

    def lastlayer_spec(self, num_classes: int) -> scores.ScoreSpec:
        return scores.spec_exgrad(self.temperature)
