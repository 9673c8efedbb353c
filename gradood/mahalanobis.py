"""Class-conditional Gaussians with one shared covariance, and the Mahalanobis
score ("A Simple Unified Framework for Detecting Out-of-Distribution Samples and
Adversarial Attacks", Lee, Lee, Lee and Shin, NeurIPS 2018, arXiv:1807.03888):

    score(x) = − min_c (x − μ_c)ᵀ Σ⁻¹ (x − μ_c)          ID-high

with μ_c the mean of the ID rows of class c and Σ = (1/N) Σ_i (x_i − μ_{y_i})(x_i − μ_{y_i})ᵀ
(the maximum-likelihood shared covariance, as the paper's sklearn EmpiricalCovariance).

Numerics: fitted in float64; Σ = L Lᵀ by Cholesky, and the distances are
‖L⁻¹x − L⁻¹μ_c‖² from triangular solves (never an explicit inverse), the
differences formed directly (no ‖a‖² + ‖b‖² − 2aᵀb cancellation). Classes with no
ID row have no mean and take no part in the minimum.

A covariance that is not positive definite (dead ReLU units, constant or duplicated
features, fewer rows than dimensions plus classes) is an error by default. With
singular="pseudo-inverse" the distance is taken with Σ's pseudo-inverse, as
scikit-learn's EmpiricalCovariance (and so OpenOOD) computes it: Σ = U Λ Uᵀ by a
symmetric eigendecomposition, eigenvalues ≤ K·eps·λ_max dropped (eps of the rows' own
dtype, as scipy's pinvh that scikit-learn calls: float32 features are not exact to
float64's eps), and
d = ‖Λ_r^{-1/2} U_rᵀ (x − μ_c)‖² on the r kept directions. It ignores whatever a
query does along the dropped directions (an OOD input that activates a unit dead on
all ID data gains nothing there): that is the choice this option names.

In the default mode a covariance that Cholesky accepts only thanks to the rows'
rounding (an eigenvalue ≤ K·eps²·λ_max, eps of the rows' dtype: float32 features
from a rank-r bottleneck, class-mean directions that sum to zero) is also refused:
its inverse would follow the rounding noise.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from gradood._checks import check_class_indices

# Query × class × dimension elements per block of differences (≈128 MB in float64).
_BLOCK_ELEMENTS = 1 << 24


SINGULAR = ("error", "pseudo-inverse")


class ClassGaussians(NamedTuple):
    cholesky: Optional[torch.Tensor]  # L [K, K], float64, Σ = L Lᵀ (None: the pseudo-inverse's whitening)
    whitened_means: torch.Tensor  # L⁻¹ μ_c (or W μ_c) for the classes present, [C', K or r], float64
    classes: torch.Tensor  # the class index of each row of whitened_means, [C'] int64
    whitening: Optional[torch.Tensor] = None  # W = Λ_r^{-1/2} U_rᵀ [r, K] (singular="pseudo-inverse")


def fit_class_gaussians(
    rows: torch.Tensor, targets: torch.Tensor, where: str = "Mahalanobis.fit", singular: str = "error"
) -> ClassGaussians:
    """The class means and shared covariance of rows [N, K] with classes targets [N]."""
    if singular not in SINGULAR:
        raise ValueError(f"{where}: singular must be one of {SINGULAR}, got {singular!r}")
    if rows.dim() != 2 or targets.shape != rows.shape[:1]:
        raise ValueError(
            f"{where}: rows [N, K] and targets [N] expected, got {tuple(rows.shape)} and {tuple(targets.shape)}"
        )
    check_class_indices(where, "targets", targets)
    eps = torch.finfo(rows.dtype).eps if rows.is_floating_point() else torch.finfo(torch.float64).eps
    x = rows.detach().double()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{where}: the ID rows hold NaN or Inf")
    y = targets.to(x.device).long()
    present, inverse = torch.unique(y, return_inverse=True)
    counts = torch.bincount(inverse, minlength=present.numel()).double()
    means = torch.zeros(present.numel(), x.shape[1], dtype=torch.float64, device=x.device)
    means.index_add_(0, inverse, x)
    means /= counts[:, None]
    centred = x - means[inverse]
    covariance = centred.T @ centred / x.shape[0]
    if singular == "pseudo-inverse":
        values, vectors = torch.linalg.eigh((covariance + covariance.T) / 2)
        keep = values > x.shape[1] * eps * values.max().clamp_min(0)
        if not bool(keep.any()):
            raise ValueError(
                f"{where}: no direction of the ID rows' within-class covariance rises above the rounding of "
                f"{rows.dtype} rows in {x.shape[1]} dimensions (K·eps·λ_max): the rows do not vary within their "
                "classes, or their dtype is too coarse; pass them in float32 or float64"
            )
        whitening = vectors[:, keep].T / values[keep].sqrt()[:, None]  # [r, K]
        return ClassGaussians(None, means @ whitening.T, present, whitening)
    cholesky, info = torch.linalg.cholesky_ex(covariance)
    if int(info) != 0 or _positive_only_by_rounding(covariance, eps):
        raise ValueError(
            f"{where}: the shared within-class covariance of the {x.shape[1]}-dimensional ID rows is singular "
            f"(rank < {x.shape[1]}, or singular up to the rounding of {rows.dtype} rows; {x.shape[0]} rows in "
            f"{present.numel()} classes; constant features such as dead "
            "ReLU units make it so): fit on more samples than dimensions plus classes, use fewer dimensions, or "
            "pass singular='pseudo-inverse' (distances within the span of the ID covariance, as scikit-learn's)"
        )
    whitened = torch.linalg.solve_triangular(cholesky, means.T, upper=False).T
    return ClassGaussians(cholesky, whitened, present)


def _positive_only_by_rounding(covariance: torch.Tensor, eps: float) -> bool:
    """Whether the smallest eigenvalue is within the rows' rounding (≤ K·eps²·λ_max); float64
    rows need no test beyond Cholesky's."""
    if eps <= torch.finfo(torch.float64).eps:
        return False
    values = torch.linalg.eigvalsh(covariance)
    return bool(values.min() <= covariance.shape[0] * eps * eps * values.max())


def mahalanobis_score(rows: torch.Tensor, gaussians: ClassGaussians) -> torch.Tensor:
    """ID-scores [B]: minus the smallest squared Mahalanobis distance to a class mean
    (float64, on the rows' device)."""
    means = gaussians.whitened_means.to(rows.device)
    transform = gaussians.cholesky if gaussians.cholesky is not None else gaussians.whitening
    if transform is None:
        raise ValueError("gradood.mahalanobis_score: the Gaussians have neither a Cholesky factor nor a whitening")
    transform = transform.to(rows.device)
    if rows.dim() != 2 or rows.shape[1] != transform.shape[1]:
        raise ValueError(f"gradood.mahalanobis_score: rows [B, {transform.shape[1]}] expected, got {tuple(rows.shape)}")
    if gaussians.cholesky is not None:
        z = torch.linalg.solve_triangular(transform, rows.double().T, upper=False).T  # [B, K]
    else:
        z = rows.double() @ transform.T  # [B, r]
    block = max(1, _BLOCK_ELEMENTS // max(1, z.shape[0] * z.shape[1]))
    best = None
    for start in range(0, means.shape[0], block):
        distances = (z[:, None, :] - means[None, start : start + block, :]).square().sum(2)
        smallest = distances.amin(1)
        best = smallest if best is None else torch.minimum(best, smallest)
    if best is None:  # pragma: no cover - fit_class_gaussians always has a class
        raise ValueError("gradood.mahalanobis_score: no class mean")
    return -best
