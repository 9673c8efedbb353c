"""ExGrad (Igoe et al. 2022): −(2/T) Σ_j p_j (1 − p_j) · ‖v‖_1, the negated expected
last-layer gradient L1 norm with labels drawn from the prediction. ID-high."""

from __future__ import annotations

from typing import Optional

from torch import nn

from gradood import scores
from gradood.detectors._base import Detector
from gradood.detectors._head import HeadName
from gradood.model_io import LogitsFn


class ExGrad(Detector):
    def __init__(
        self, model: nn.Module, temperature: float = 1.0, head: Optional[HeadName] = None, logits: LogitsFn = None
    ):
        super().__init__(model, head, logits)
        self.temperature = temperature
        scores.spec_exgrad(temperature, where=type(self).__name__)  # the arguments checked now, not at first use

    def lastlayer_spec(self, num_classes: int) -> scores.ScoreSpec:
        return scores.spec_exgrad(self.temperature)
