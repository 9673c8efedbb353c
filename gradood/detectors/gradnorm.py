"""GradNorm (Huang et al. 2021): ‖∇_W KL(u ‖ softmax(f/T))‖_1 of the last layer,
(Σ_j |p_j − 1/C| / T) · ‖v‖_1 in closed form: one forward, no backward. ID-high."""

from __future__ import annotations

from typing import Optional

from torch import nn

from gradood import scores
from gradood.detectors._base import Detector
from gradood.detectors._head import HeadName
from gradood.model_io import LogitsFn


class GradNorm(Detector):
    def __init__(
        self,
        model: nn.Module,
        temperature: float = 1.0,
        scale: str = "paper",
        head: Optional[HeadName] = None,
        logits: LogitsFn = None,
    ):
        super().__init__(model, head, logits)
        self.temperature = temperature
        self.scale = scale
        scores.spec_gradnorm(2, temperature, scale, where=type(self).__name__)  # checked now, not at first use

    def lastlayer_spec(self, num_classes: int) -> scores.ScoreSpec:
        return scores.spec_gradnorm(num_classes, self.temperature, self.scale)
