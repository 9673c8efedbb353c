"""SCALE ("Scaling for Training Time and Post-hoc Out-of-distribution Detection Enhancement",
Xu, Chen, Franchi & Yao, ICLR 2024, arXiv:2310.00227): ASH-S's scale without its pruning. The
penultimate features v [B, D] of each sample, all of them, are multiplied by exp(s₁ / s₂),
s₁ = Σ_i v_i and s₂ the sum of its k = D − round(D · p / 100) largest entries (ties at the
threshold: the lowest indices), and the score is the energy of the head on them (ID-high):

    score = log Σ_j exp(exp(s₁ / s₂) · (W v)_j + b_j)

p = 85 by default (OpenOOD's setting). Numerics and degenerate rows as ASH's
(gradood.detectors.ash): an all-zero row has logits b; s₂ = 0 otherwise gives NaN, as does a
NaN feature. One forward, no fit, and no second GEMM: the scale multiplies W v, which the
detector reads from the model's logits as f − b (the logits must be the head's output on the
features, as score() passes them; a spot check raises otherwise). float16/bfloat16 logits,
whose rounding the scale would multiply, and the plain function `scale_energy` run the head's
GEMM on the features in float32."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from gradood._checks import check_features
from gradood.detectors._base import Detector
from gradood.detectors._head import HeadName
from gradood.detectors.ash import _check_percentile, shaped_energy
from gradood.model_io import LogitsFn


def scale_energy(
    features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], percentile: float = 85.0
) -> torch.Tensor:
    """SCALE's ID-score [B] of penultimate features [B, D] and a head (W [C, D], b [C] or None)."""
    return shaped_energy(features, weight, bias, "scale", percentile, "gradood.detectors.scale")


class SCALE(Detector):
    def __init__(
        self,
        model: nn.Module,
        percentile: float = 85.0,
        head: Optional[HeadName] = None,
        logits: LogitsFn = None,
    ):
        super().__init__(model, head, logits)
        self.percentile = _check_percentile(type(self).__name__, percentile)

    def score_features(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        where = f"{type(self).__name__}.score_features"
        check_features(where, features, logits)
        weight, bias = self.head_weight_bias()
        products = head_products_of_logits(where, logits, features, weight, bias)
        return shaped_energy(
            features, weight, bias, "scale", self.percentile, "gradood.detectors.scale", head_products=products
        )


#: Classes and samples the spot check of head_products_of_logits recomputes.
_CHECKED_CLASSES, _CHECKED_SAMPLES = 64, 8


def head_products_of_logits(
    where: str, logits: torch.Tensor, features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> Optional[torch.Tensor]:
    """W v [B, C] = f − b read from the logits f [B, C] of the features v [B, D] (one rounding),
    or None for float16/bfloat16 logits. The logits must be the head's output on these
    features: the first sample among the first 8 whose features and logits are finite is
    recomputed on the first 64 classes, W v + b in the logits' dtype, and a logit off by more than
    1e-3 · (Σ_j |w_cj v_j| + |b_c|) raises (logits divided by a temperature, from another head
    or of other inputs); an error below that bound passes, and the rows not checked are taken
    as given."""
    if logits.dtype not in (torch.float32, torch.float64):
        return None
    if logits.dim() != 2 or logits.shape[1] != weight.shape[0]:
        raise ValueError(
            f"{where}: logits must be [B, C] with C = {weight.shape[0]} (the head's classes), got shape "
            f"{tuple(logits.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != features.shape[1]:
        return None  # shaped_energy reports the mismatch
    dtype = logits.dtype
    weight = weight.detach()
    head = weight[:_CHECKED_CLASSES].to(dtype)
    offset = None if bias is None else bias.detach()[:_CHECKED_CLASSES].to(dtype)
    first = features[:_CHECKED_SAMPLES]
    finite = (torch.isfinite(first).all(1) & torch.isfinite(logits[:_CHECKED_SAMPLES]).all(1)).nonzero()
    if finite.numel():
        i = int(finite[0])
        v = features[i]
        expected = head @ v
        size = head.abs() @ v.abs()
        if offset is not None:
            expected, size = expected + offset, size + offset.abs()
        got = logits[i, :_CHECKED_CLASSES]
        off = (got - expected).abs() > 1e-3 * size + torch.finfo(dtype).tiny
        if bool(off.any()):
            c = int(off.nonzero()[0])
            raise ValueError(
                f"{where}: the logits are not the head's output on these features (sample {i}, class {c}: "
                f"{float(got[c]):.6g}, but W v + b = {float(expected[c]):.6g}); pass the logits the model "
                "computed from these features (not divided by a temperature, not another head's), or call "
                "score() on the inputs"
            )
    return logits if bias is None else logits - bias.detach().to(dtype)
