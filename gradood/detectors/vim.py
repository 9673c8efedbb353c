"""ViM, virtual-logit matching ("ViM: Out-Of-Distribution with Virtual-logit Matching", Wang,
Li, Feng & Zhang, CVPR 2022, arXiv:2203.10807): the energy of the logits minus a virtual logit,
the norm of the feature's residual outside the principal subspace of the ID features (ID-high):

    o = −W⁺ b                           the origin at which the head's logits are all zero
    R = the eigenvectors of Σ = (1/N) Σ_n (v_n − o)(v_n − o)ᵀ beyond the `dim` largest eigenvalues
    α = mean_n max_c f_nc / mean_n ‖Rᵀ (v_n − o)‖     over the fit data
    score = log Σ_c exp(f_c) − α ‖Rᵀ (v − o)‖

W⁺ the pseudo-inverse of the head's weight (o = 0 for a head without bias). dim defaults to
the official code's rule: 1000 for D ≥ 2048, 512 for D ≥ 768, else D // 2. Fitted in float64
(Σ uncentred about o, as the official code's EmpiricalCovariance(assume_centered=True); its
eigenvectors by torch.linalg.eigh); scored with the residual as one GEMM with R [D, D − dim]
in float64 for float64 features, float32 otherwise (as the head's own GEMM: ~1e-6 absolute
error at D = 2048), the energy on the model's logits by the fused kernel (no clipping:
pytorch-ood clips them at ±100).
A fit is refused where the residual space is not determined (the dim-th and (dim + 1)-th
eigenvalues equal to round-off: fewer ID samples than dim, or tied directions), where the ID
features have no residual (α undefined), and where the mean ID max logit is ≤ 0 (α ≤ 0 would
count the residual as evidence for ID). The residual space belongs to the head's weights at fit
time: fit again after fine-tuning. One forward and one B × D × (D − dim) GEMM per batch; the fit
holds the ID features (N × D) and one D × D eigendecomposition."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from gradood import model_io, scores
from gradood._checks import check_features
from gradood.detectors._base import Data, Detector, fitted
from gradood.detectors._head import HeadName
from gradood.model_io import LogitsFn


def default_dim(features: int) -> int:
    """The principal dimension of the official code for D-dimensional features."""
    if features >= 2048:
        return 1000
    if features >= 768:
        return 512
    return features // 2


def vim_origin(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """o = −W⁺ b [D] in float64 (zeros without a bias)."""
    if bias is None:
        return torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    return -(torch.linalg.pinv(weight.detach().double()) @ bias.detach().double())


def vim_residual(features: torch.Tensor, origin: torch.Tensor, null_space: torch.Tensor) -> torch.Tensor:
    """‖Rᵀ (v − o)‖ [B] in float64."""
    return torch.linalg.vector_norm((features.double() - origin) @ null_space, dim=1)


class ViM(Detector):
    fitted = ("origin", "null_space", "alpha")

    def __init__(
        self,
        model: nn.Module,
        dim: Optional[int] = None,
        head: Optional[HeadName] = None,
        logits: LogitsFn = None,
    ):
        super().__init__(model, head, logits)
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ValueError(f"{type(self).__name__}: dim must be a positive integer or None, got {dim!r}")
        self.dim = dim
        self.origin: Optional[torch.Tensor] = None  # o [D], float64
        self.null_space: Optional[torch.Tensor] = None  # R [D, D − dim], float64
        self.alpha: Optional[float] = None

    def fit(self, id_data: Data) -> ViM:
        name = f"{type(self).__name__}.fit"
        features, max_logits = [], []
        for inputs, _ in model_io.iterate(id_data):
            batch_logits, batch_features = self.forward_features(inputs)
            check_features(name, batch_features, batch_logits)
            features.append(batch_features)
            max_logits.append(batch_logits.double().amax(1))
        if not features or sum(f.shape[0] for f in features) == 0:
            raise ValueError(f"{name}: the data holds no sample")
        v = torch.cat(features).double()
        top = torch.cat(max_logits)
        if not bool(torch.isfinite(v).all()) or not bool(torch.isfinite(top).all()):
            raise ValueError(f"{name}: the ID features or logits hold NaN or Inf")
        d = v.shape[1]
        dim = default_dim(d) if self.dim is None else self.dim
        if not 1 <= dim < d:
            raise ValueError(
                f"{name}: dim={dim} leaves no residual space in {d}-dimensional features; pass 1 <= dim < {d}"
            )
        weight, bias = self.head_weight_bias()
        origin = vim_origin(weight, bias).to(v.device)
        centred = v - origin
        covariance = centred.T @ centred / v.shape[0]
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        kept, dropped = float(eigenvalues[d - dim]), float(eigenvalues[d - dim - 1])
        tolerance = d * torch.finfo(torch.float64).eps * max(float(eigenvalues[-1]), 0.0)
        if kept - dropped <= tolerance:
            raise ValueError(
                f"{name}: the {dim}-th and {dim + 1}-th eigenvalues of the ID feature covariance are equal "
                f"({kept:.6g} and {dropped:.6g}; {v.shape[0]} samples, {d} dimensions), so the residual space "
                "is not determined: pass another dim, or fit on more ID samples"
            )
        null_space = eigenvectors[:, : d - dim].contiguous()
        mean_residual = float(vim_residual(v, origin, null_space).mean())
        mean_top = float(top.mean())
        if not mean_residual > 0.0:
            raise ValueError(f"{name}: the ID features have no residual outside the top {dim} directions")
        if not mean_top > 0.0:
            raise ValueError(
                f"{name}: the mean ID max logit is {mean_top:.6g} <= 0, so alpha would reward the residual "
                "(ViM assumes positive ID max logits)"
            )
        self.origin, self.null_space, self.alpha = origin, null_space, mean_top / mean_residual
        return self

    def score_features(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        self._require_fitted()
        check_features(f"{type(self).__name__}.score_features", features, logits)
        origin, null_space = fitted(self.origin).to(features.device), fitted(self.null_space).to(features.device)
        if features.shape[1] != origin.shape[0]:
            raise ValueError(
                f"{type(self).__name__}: fitted on {origin.shape[0]}-dimensional features, got "
                f"{features.shape[1]}: fit again on this model"
            )
        acc = torch.float64 if features.dtype == torch.float64 else torch.float32
        origin, null_space = self._statistics(origin, null_space, acc)
        residual = torch.linalg.vector_norm((features.to(acc) - origin) @ null_space, dim=1)
        return scores.energy(logits).to(acc) - fitted(self.alpha) * residual

    def _statistics(self, origin: torch.Tensor, null_space: torch.Tensor, dtype: torch.dtype):
        """o and R in `dtype` (float32 for float32 and half features, as the head's own GEMM),
        converted once per fitted state, dtype and device (the cast of R costs a third of the
        score at B = 64, D = 2048)."""
        # The fitted tensors themselves are held and compared by identity (a freed tensor's
        # address could be reused by a new fit's), with their in-place versions.
        fitted_origin, fitted_null = fitted(self.origin), fitted(self.null_space)
        versions = (fitted_origin._version, fitted_null._version, dtype, origin.device)
        cached = self.__dict__.get("_cast_cache")
        if cached is None or cached[0] is not fitted_origin or cached[1] is not fitted_null or cached[2] != versions:
            cached = (fitted_origin, fitted_null, versions, origin.to(dtype), null_space.to(dtype))
            self.__dict__["_cast_cache"] = cached
        return cached[3], cached[4]
