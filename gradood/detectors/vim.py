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
error at D = 2048), as Rᵀv − Rᵀo with Rᵀo and the norm in float64 (no cancellation against a
large ‖o‖, no overflow), the energy on the model's logits by the fused kernel (no clipping:
pytorch-ood clips them at ±100).
A fit is refused where the residual space is not determined (the dim-th and (dim + 1)-th
eigenvalues equal to round-off: fewer ID samples than dim, or tied directions), where the ID
features have no residual beyond round-off (α undefined), and where the mean ID max logit is ≤ 0 (α ≤ 0 would
count the residual as evidence for ID). The residual space belongs to the head's weights at fit
time: fit again after fine-tuning. One forward and one B × D × (D − dim) GEMM per batch; the fit
holds the ID features (N × D) and one D × D eigendecomposition."""

from __future__ import annotations

from typing import Optional, Tuple

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
        feature_eps = torch.finfo(torch.float64).eps
        for inputs, _ in model_io.iterate(id_data):
            batch_logits, batch_features = self.forward_features(inputs)
            check_features(name, batch_features, batch_logits)
            # float64 copies: a model may write its features into a buffer it reuses between batches
            features.append(batch_features.to(torch.float64, copy=True))
            feature_eps = torch.finfo(batch_features.dtype).eps
            max_logits.append(batch_logits.double().amax(1))
        if not features or sum(f.shape[0] for f in features) == 0:
            raise ValueError(f"{name}: the data holds no sample")
        v = torch.cat(features)
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
        if not bool(torch.isfinite(covariance).all()):
            raise ValueError(f"{name}: the ID feature covariance overflows float64 (features of about 1e154 or more)")
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
        # A residual of round-off only (features of rank dim about o, stored in the features'
        # precision) would make α ~1/eps and the scores noise.
        noise = d * feature_eps * float(torch.linalg.vector_norm(centred, dim=1).mean())
        if not mean_residual > noise:
            raise ValueError(
                f"{name}: the ID features have no residual outside the top {dim} directions (mean "
                f"{mean_residual:.3g}, round-off level {noise:.3g}): pass a smaller dim"
            )
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
        width = fitted(self.origin).shape[0]
        if features.shape[1] != width:
            raise ValueError(
                f"{type(self).__name__}: fitted on {width}-dimensional features, got {features.shape[1]}: "
                "fit again on this model"
            )
        acc = torch.float64 if features.dtype == torch.float64 else torch.float32
        null_space, origin_projection = self._statistics(acc, features.device)
        # Rᵀv − Rᵀo with Rᵀo from float64: subtracting o from float32 features first would lose
        # ‖o‖·eps per element; the norm in float64 neither overflows nor underflows.
        projection = (features.to(acc) @ null_space).double() - origin_projection
        residual = torch.linalg.vector_norm(projection, dim=1)
        return (scores.energy(logits).double() - fitted(self.alpha) * residual).to(acc)

    def _statistics(self, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(R in `dtype` — float32 for float32 and half features, as the head's own GEMM — and
        Rᵀo in float64) on `device`, made once per fitted state, dtype and device (casting R costs
        a third of the score at B = 64, D = 2048; moving it, a transfer per batch)."""
        # The fitted tensors themselves are held and compared by identity (a freed tensor's
        # address could be reused by a new fit's), with their in-place versions (edits through
        # .data or numpy bypass these: refit, or load a state, instead).
        origin, null_space = fitted(self.origin), fitted(self.null_space)
        versions = (origin._version, null_space._version, dtype, torch.device(device))
        cached = self.__dict__.get("_cast_cache")
        if cached is None or cached[0] is not origin or cached[1] is not null_space or cached[2] != versions:
            null64 = null_space.to(device, torch.float64)
            projection = origin.to(device, torch.float64) @ null64
            cached = (origin, null_space, versions, null64.to(dtype), projection)
            self.__dict__["_cast_cache"] = cached
        return cached[3], cached[4]
