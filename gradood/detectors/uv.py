"""The U·V family (Igoe et al. 2022): an output-space term U(f) times a feature
norm V(v); see gradood.reference.uv. ID-high."""

from __future__ import annotations

from typing import Optional

from torch import nn

from gradood import scores
from gradood.detectors._base import Detector
from gradood.detectors._head import HeadName
from gradood.model_io import LogitsFn


class UV(Detector):
    def __init__(
        self,
        model: nn.Module,
        u: str = "energy",
        v: str = "l1",
        clip: Optional[float] = None,
        temperature: float = 1.0,
        head: Optional[HeadName] = None,
        logits: LogitsFn = None,
    ):
        super().__init__(model, head, logits)
        self.u, self.v, self.clip, self.temperature = u, v, clip, temperature
        scores.spec_uv(u, v, clip, temperature, where=type(self).__name__)  # checked now, not at first use

    def lastlayer_spec(self, num_classes: int) -> scores.ScoreSpec:
        return scores.spec_uv(self.u, self.v, self.clip, self.temperature)
