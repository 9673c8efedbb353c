"""SCALE ("Scaling for Training Time and Post-hoc Out-of-distribution Detection Enhancement",
Xu, Chen, Franchi & Yao, ICLR 2024, arXiv:2310.00227): ASH-S's scale without its pruning. The
penultimate features v [B, D] of each sample, all of them, are multiplied by exp(s₁ / s₂),
s₁ = Σ_i v_i and s₂ the sum of its k = D − round(D · p / 100) largest entries (ties at the
threshold: the lowest indices), and the score is the energy of the head on them (ID-high):

    score = log Σ_j exp(exp(s₁ / s₂) · (W v)_j + b_j)

p = 85 by default (OpenOOD's setting). Numerics and degenerate rows as ASH's
(gradood.detectors.ash): an all-zero row has logits b; s₂ = 0 otherwise gives NaN, as does a
NaN feature. One forward, no fit, and no second GEMM: the scale multiplies W v, which the
detector reads from the model's logits as f − b where the bias is small next to W v
(head_products_of_logits; rows whose bias dominates, float16/bfloat16 logits, features or
logits that require a gradient, and the plain function `scale_energy` run the head's GEMM on
the features). The logits must be the head's output on the features, as score() passes them:
up to 8 samples spread over the batch are recomputed on the first 64 classes and a mismatch
there raises; the rest is taken as given."""

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
        # Differentiated, the score must be the definition's function of the features (the
        # logits take no part in it): the GEMM route then.
        differentiated = torch.is_grad_enabled() and (features.requires_grad or logits.requires_grad)
        products = None if differentiated else head_products_of_logits(where, logits, features, weight, bias)
        return shaped_energy(
            features, weight, bias, "scale", self.percentile, "gradood.detectors.scale", head_products=products
        )


#: Classes and samples the spot check of head_products_of_logits recomputes.
_CHECKED_CLASSES, _CHECKED_SAMPLES = 64, 8
#: f − b is used on rows where max_c |b_c| is at most this times max_c |f_c − b_c|: its rounding,
#: u · (|f| + |b|), then stays within a few ulp of the largest |W v| (the scale multiplies it).
_BIAS_RATIO = 4.0


def head_products_of_logits(
    where: str, logits: torch.Tensor, features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> Optional[torch.Tensor]:
    """W v [B, C] from the logits f [B, C] of the features v [B, D]: f − b (one rounding) on rows
    where the bias is small next to W v (max_c |b_c| ≤ 4 · max_c |f_c − b_c|), the GEMM on the
    features on the others (there f − b would lose the bits of W v that |b| covers: 8.6e-4
    relative error at b = 100, |W v| ~ 0.05, p = 99); None for float16/bfloat16 logits (the caller
    runs the GEMM). The logits must be the head's output on these features, and are spot-checked:
    up to 8 samples spread over the batch (its first and last among them), those whose features
    and logits are finite, are recomputed on the first 64 classes (W v + b in the logits' dtype),
    and a logit off by more than 1e-3 · (Σ_j |w_cj v_j| + |b_c|) raises — the mismatches the check
    is for: logits divided by a temperature (beyond 1 ± 1e-3), another head's, another batch's. A
    difference below that bound, or on the rows and classes not checked, passes unseen."""
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
    _spot_check(
        where,
        logits,
        features,
        weight[:_CHECKED_CLASSES].to(dtype),
        None if bias is None else bias.detach()[:_CHECKED_CLASSES].to(dtype),
    )
    if bias is None:
        return logits
    offset = bias.detach().to(dtype)
    products = logits - offset
    covered = offset.abs().amax() > _BIAS_RATIO * products.abs().amax(1)  # NaN rows: False
    if bool(covered.any()):
        rows = covered.nonzero().squeeze(1)
        products[rows] = features[rows].to(dtype) @ weight.to(dtype).T
    return products


def _spot_check(
    where: str, logits: torch.Tensor, features: torch.Tensor, head: torch.Tensor, offset: Optional[torch.Tensor]
) -> None:
    batch = logits.shape[0]
    rows = torch.linspace(0, batch - 1, min(batch, _CHECKED_SAMPLES), device=logits.device).round().long().unique()
    finite = torch.isfinite(features[rows]).all(1) & torch.isfinite(logits[rows]).all(1)
    rows = rows[finite]
    if rows.numel() == 0:
        return
    v = features[rows]
    expected = v @ head.T
    size = v.abs() @ head.abs().T
    if offset is not None:
        expected, size = expected + offset, size + offset.abs()
    got = logits[rows, : head.shape[0]]
    off = (got - expected).abs() > 1e-3 * size + torch.finfo(logits.dtype).tiny
    if bool(off.any()):
        r, c = (int(i) for i in off.nonzero()[0])
        raise ValueError(
            f"{where}: the logits are not the head's output on these features (sample {int(rows[r])}, class {c}: "
            f"{float(got[r, c]):.6g}, but W v + b = {float(expected[r, c]):.6g}); pass the logits the model "
            "computed from these features (not divided by a temperature, not another head's), or call "
            "score() on the inputs"
        )
