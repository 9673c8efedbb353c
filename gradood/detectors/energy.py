"""Energy: T · log Σ_j exp(f_j / T) (Liu et al. 2020). ID-high."""

from __future__ import annotations

from typing import Optional

from torch import nn

from gradood import scores
from gradood.detectors._base import Detector
from gradood.detectors._head import HeadName
from gradood.model_io import LogitsFn


class Energy(Detector):
    uses_features = False

    def __init__(
        self, model: nn.Module, temperature: float = 1.0, head: Optional[HeadName] = None, logits: LogitsFn = None
    ):
        super().__init__(model, head, logits)
        self.temperature = temperature
        scores.spec_energy(temperature, where=type(self).__name__)  # the arguments checked now, not at first use

    def lastlayer_spec(self, num_classes: int) -> scores.ScoreSpec:
        return scores.spec_energy(self.temperature)
