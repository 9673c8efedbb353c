"""KL matching (Hendrycks et al. 2022): −min_k KL(p ‖ d_k) (mode="min", as OpenOOD)
or −KL(p ‖ d_ŷ) (mode="predicted", as pytorch-ood), with d_k the mean softmax of
the ID samples predicted as class k, fitted on ID data. A class no fit sample is
predicted as has no template (a NaN row): it is left out of the minimum, and in
mode="predicted" a sample predicted as it scores −inf. (A uniform template would
be the posterior of a maximally uncertain input and give OOD-like inputs the
highest score.) Computed in float32. ID-high."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from gradood import scores
from gradood._checks import check_choice
from gradood.detectors._base import Data, Detector
from gradood.detectors._head import HeadName
from gradood.model_io import LogitsFn


class KLMatching(Detector):
    uses_features = False

    fitted = ("templates",)

    def __init__(self, model: nn.Module, mode: str = "min", head: Optional[HeadName] = None, logits: LogitsFn = None):
        super().__init__(model, head, logits)
        self.mode = check_choice(type(self).__name__, "mode", mode, ("min", "predicted"))
        self.templates: Optional[torch.Tensor] = None

    def fit(self, id_data: Data) -> KLMatching:
        logits = self.collect(id_data)[0].double()
        probs = torch.softmax(logits, dim=1)
        num_classes = logits.shape[1]
        predicted = logits.argmax(1)
        sums = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=logits.device).index_add_(
            0, predicted, probs
        )
        counts = torch.bincount(predicted, minlength=num_classes).unsqueeze(1).double()
        self.templates = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float("nan")))
        return self

    def score_features(self, logits, features=None):
        self._require_fitted()
        return scores.kl_matching(logits, self.templates, self.mode)  # logs of the float64 templates (reference)
