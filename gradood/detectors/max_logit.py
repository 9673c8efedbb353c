"""MaxLogit: max_j f_j (Hendrycks et al. 2022). ID-high."""

from __future__ import annotations

from gradood import scores
from gradood.detectors._base import Detector


class MaxLogit(Detector):
    uses_features = False

    def lastlayer_spec(self, num_classes: int) -> scores.ScoreSpec:
        return scores.spec_max_logit()
