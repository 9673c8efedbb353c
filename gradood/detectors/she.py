"""SHE, simplified Hopfield energy ("Out-of-Distribution Detection based on In-Distribution Data
Patterns Memorization with Modern Hopfield Energy", Zhang, Fu, Chen, Du, Li, Wang, Liu, Han &
Zhang, ICLR 2023, OpenReview KkazG4lgKL): each class's stored pattern is the mean penultimate
feature of the fit samples of that class the model classifies correctly (the paper averages a
class's training features; the correctness filter is pytorch-ood's, which gradood matches), and
the score is the inner product of a sample's features with the pattern of its predicted class
(ID-high):

    S_c = mean{ v_i : y_i = c, argmax f(x_i) = c }
    score = vᵀ S_ŷ,        ŷ = argmax_j f_j (the lowest index among tied maxima)

classes="labels" (the default) needs labelled fit data; classes="predicted" takes every fit
sample as its predicted class (no labels; the correctness filter is then void). The sums are
streamed over the fit data in float64 (memory C·D, whatever the data's size), the score is a
float64 dot product. A class without a correctly classified fit sample has no pattern: the fit
raises, naming it. A row whose logits hold a NaN has no predicted class and scores NaN. One
forward, no fit-time GEMM."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from gradood import model_io
from gradood._checks import check_choice, check_class_indices, check_features
from gradood.detectors._base import Data, Detector, fitted
from gradood.detectors._head import HeadName
from gradood.model_io import LogitsFn

#: Samples scored at a time (128 × D float64 features and patterns: 2 MB at D = 2048).
_CHUNK = 128


class SHE(Detector):
    fitted = ("patterns",)

    def __init__(
        self,
        model: nn.Module,
        classes: str = "labels",
        head: Optional[HeadName] = None,
        logits: LogitsFn = None,
    ):
        super().__init__(model, head, logits)
        self.classes = check_choice(type(self).__name__, "classes", classes, ("labels", "predicted"))
        self.patterns: Optional[torch.Tensor] = None  # S [C, D], float64

    def fit(self, id_data: Data) -> SHE:
        name = f"{type(self).__name__}.fit"
        sums: Optional[torch.Tensor] = None
        counts: Optional[torch.Tensor] = None
        for inputs, labels in model_io.iterate(id_data):
            logits, features = self.forward_features(inputs)
            predicted = logits.argmax(1)
            if self.classes == "predicted":
                keep, target = ~logits.isnan().any(1), predicted
            elif labels is None:
                raise ValueError(
                    f"{name}: the fit data give no labels: pass batches of (inputs, labels), or "
                    "classes='predicted' (every fit sample as its predicted class)"
                )
            else:
                check_class_indices(name, "labels", labels, logits.shape[1])
                target = labels.reshape(-1).to(logits.device).long()
                if target.shape[0] != logits.shape[0]:
                    raise ValueError(
                        f"{name}: one label per sample expected, got {target.shape[0]} for {logits.shape[0]}"
                    )
                keep = (predicted == target) & ~logits.isnan().any(1)
            if sums is None:
                sums = features.new_zeros(logits.shape[1], features.shape[1], dtype=torch.float64)
                counts = torch.zeros(logits.shape[1], dtype=torch.int64, device=logits.device)
            assert counts is not None
            if sums.shape != (logits.shape[1], features.shape[1]):
                raise ValueError(f"{name}: the batches' logits or features change shape")
            sums.index_add_(0, target[keep], features[keep].double())
            counts += torch.bincount(target[keep], minlength=logits.shape[1])
        if sums is None or counts is None:
            raise ValueError(f"{name}: the data holds no batch")
        empty = (counts == 0).nonzero().squeeze(1).tolist()
        if empty:
            shown = ", ".join(str(c) for c in empty[:10]) + (", ..." if len(empty) > 10 else "")
            what = "correctly classified fit sample" if self.classes == "labels" else "fit sample predicted as it"
            raise ValueError(
                f"{name}: class(es) {shown} ({len(empty)} of {counts.numel()}) have no {what}, so their stored "
                "pattern is undefined; fit on more ID data covering every class"
            )
        patterns = sums / counts[:, None]
        if not bool(torch.isfinite(patterns).all()):
            raise ValueError(f"{name}: the ID features hold NaN or Inf")
        self.patterns = patterns
        return self

    def score_features(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        self._require_fitted()
        where = f"{type(self).__name__}.score_features"
        check_features(where, features, logits)
        patterns = fitted(self.patterns).to(features.device)
        if tuple(patterns.shape) != (logits.shape[1], features.shape[1]):
            raise ValueError(
                f"{where}: the fitted patterns are {tuple(patterns.shape)} (classes × features) but the logits and "
                f"features give {(logits.shape[1], features.shape[1])}: fit again on this model"
            )
        predicted = logits.argmax(1)
        score = features.new_empty(features.shape[0], dtype=torch.float64)
        for start in range(0, features.shape[0], _CHUNK):  # the float64 rows stay in cache: ~2x faster
            rows = slice(start, start + _CHUNK)
            score[rows] = (features[rows].double() * patterns[predicted[rows]]).sum(1)
        score = torch.where(logits.isnan().any(1), torch.full_like(score, math.nan), score)
        return score.to(torch.float64 if features.dtype == torch.float64 else torch.float32)
